"""Specification of core_jax.dedup against a NumPy union-find written here."""

import numpy as np
import pytest

from core_jax import dedup


def _numpy_keep(embeddings, valid, threshold):
    """Union-find over links cos >= threshold; keep each component's first."""
    m = len(embeddings)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    parent = list(range(m))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(m):
        for j in range(i + 1, m):
            if valid[i] and valid[j] and unit[i] @ unit[j] >= threshold:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    seen, keep = set(), []
    for i in range(m):
        root = find(i)
        keep.append(bool(valid[i]) and root not in seen)
        if valid[i]:
            seen.add(root)
    return np.array(keep)


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_chain_is_one_component():
    # A~B (cos 0.95), B~C (cos 0.95), A vs C cos ~0.805: C is dropped too.
    angle = np.arccos(0.95)
    a = [1, 0, 0]
    b = [np.cos(angle), np.sin(angle), 0]
    c = [np.cos(2 * angle), np.sin(2 * angle), 0]
    d = [0, 0, 1]
    emb = np.array([a, b, c, d], np.float32)[None]
    ids = np.array([[10, 11, 12, 13]])
    sims = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    out_ids, out_sims, out_emb, mask = dedup.deduplicate(ids, sims, emb, k=3)
    np.testing.assert_array_equal(out_ids, [[10, 13, -1]])
    np.testing.assert_array_equal(mask, [[True, True, False]])
    np.testing.assert_allclose(out_sims, [[0.9, 0.6, 0.0]])
    np.testing.assert_array_equal(out_emb[0, 1], d)
    np.testing.assert_array_equal(out_emb[0, 2], 0)


def test_threshold_is_inclusive():
    # cos exactly representable: 0.9375 >= 0.9375 links, 0.9375 < 0.94 not.
    emb = np.array([[[1.0, 0.0], [0.9375, np.sqrt(1 - 0.9375**2)]]], np.float32)
    ids, sims = np.array([[0, 1]]), np.zeros((1, 2), np.float32)
    assert dedup.deduplicate(ids, sims, emb, 2, threshold=0.9375)[3].sum() == 1
    assert dedup.deduplicate(ids, sims, emb, 2, threshold=0.94)[3].sum() == 2


def test_matches_numpy_union_find_on_random_candidates():
    rng = np.random.default_rng(0)
    q, m, d = 40, 24, 8
    # Few directions plus small noise: many links, chains and components.
    centres = rng.standard_normal((5, d))
    emb = centres[rng.integers(0, 5, (q, m))] + 0.25 * rng.standard_normal((q, m, d))
    valid = rng.random((q, m)) > 0.1
    ids = np.where(valid, np.arange(q * m).reshape(q, m), -1)
    sims = np.sort(rng.random((q, m)), axis=1)[:, ::-1].astype(np.float32)
    keep = np.stack([_numpy_keep(emb[i], valid[i], 0.94) for i in range(q)])
    assert 0 < keep.sum() < valid.sum()  # the data does exercise the rule
    k = 10
    out_ids, out_sims, _, mask = dedup.deduplicate(ids, sims, emb, k)
    for i in range(q):
        kept = np.flatnonzero(keep[i])[:k]
        want = np.full(k, -1)
        want[: len(kept)] = ids[i, kept]
        np.testing.assert_array_equal(out_ids[i], want)
        np.testing.assert_array_equal(mask[i], np.arange(k) < len(kept))
        np.testing.assert_allclose(out_sims[i, : len(kept)], sims[i, kept])


def test_search_overfetches_until_k_remain():
    # Database: 30 copies of one caption, then 5 distinct ones, then more.
    rng = np.random.default_rng(1)
    dup = np.tile(_unit(rng.standard_normal(16)), (30, 1))
    distinct = rng.standard_normal((20, 16))
    database = np.concatenate(
        [dup, distinct / np.linalg.norm(distinct, axis=1)[:, None]]
    )
    query = dup[:1] * 10  # duplicates rank first
    scores_calls = []

    def search_fn(queries, m):
        scores_calls.append(m)
        scores = queries @ database.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :m]
        return order, np.take_along_axis(scores, order, axis=1)

    ids, sims, emb, mask = dedup.search(
        search_fn, lambda i: database[i], query, k=5, size=len(database)
    )
    # The first 20 candidates are all copies (1 kept), so it fetches 40 more.
    assert scores_calls == [20, 40]
    assert mask.all()
    assert ids[0, 0] == 0 and len(set(ids[0].tolist())) == 5
    assert not np.isin(ids[0, 1:], np.arange(30)).any()
    np.testing.assert_allclose(emb[0], database[ids[0]], atol=1e-6)


def test_search_masks_when_database_is_exhausted():
    database = np.tile(np.eye(3)[:1], (4, 1))  # four copies of one vector
    database = np.concatenate([database, np.eye(3)[1:2]])

    def search_fn(queries, m):
        scores = queries @ database.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :m]
        return order, np.take_along_axis(scores, order, axis=1)

    ids, _, _, mask = dedup.search(
        search_fn, lambda i: database[i], np.eye(3)[:1], k=3, size=5
    )
    np.testing.assert_array_equal(ids, [[0, 4, -1]])
    np.testing.assert_array_equal(mask, [[True, True, False]])


@pytest.mark.parametrize("m", [1, 2, 3, 33])
def test_closure_is_complete_for_long_chains(m):
    # A chain of m candidates each linked only to the next: one component.
    angle = np.arccos(0.95)
    emb = np.array([[np.cos(i * angle), np.sin(i * angle)] for i in range(m)])
    mask = dedup.deduplicate(
        np.arange(m)[None], np.zeros((1, m)), emb[None].astype(np.float32), m
    )[3]
    assert mask.sum() == 1


def test_search_stops_at_max_fetch_and_masks():
    database = np.tile(np.eye(4)[:1], (100, 1))  # one caption, 100 times
    calls = []

    def search_fn(queries, m):
        calls.append(m)
        scores = queries @ database.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :m]
        return order, np.take_along_axis(scores, order, axis=1)

    ids, _, _, mask = dedup.search(
        search_fn, lambda i: database[i], np.eye(4)[:1], k=5, size=100, max_fetch=40
    )
    assert calls == [20, 40]
    np.testing.assert_array_equal(ids, [[0, -1, -1, -1, -1]])
    np.testing.assert_array_equal(mask, [[True, False, False, False, False]])
