"""Removal of near-duplicate neighbours, per query, by connected components.

The rule, as the reference release applies it: among the m candidates
fetched for one query (ranked best first), two candidates are linked when
the cosine of their embeddings is >= `threshold` (0.94). Candidates joined
by a chain of links form one component, and each component keeps only its
best-ranked member. A candidate is thus dropped when it is linked, directly
or through other candidates, to an earlier-ranked one, even when the
candidate in between was itself dropped: with A~B and B~C but not A~C, only
A is kept. The result depends on the candidates fetched, since a later
candidate can bridge two components; `search` therefore fetches a fixed,
per-query sequence of candidate counts so a query's answer never depends on
the other queries in its batch.

The first k kept candidates are returned in rank order; when fewer than k
survive (the database is small or full of duplicates) the remaining slots
are masked: id -1, similarity 0, embedding zeros, mask False.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_THRESHOLD = 0.94


def component_leaders(
    embeddings: jax.Array, valid: jax.Array, threshold: float = DEFAULT_THRESHOLD
) -> jax.Array:
    """Marks the best-ranked member of each near-duplicate component.

    Args:
      embeddings: (Q, m, D) candidates' embeddings, best-ranked first; they
        are re-normalised here so the link test is a true cosine.
      valid: (Q, m) bool, False for candidates that do not exist.
      threshold: cosine at or above which two candidates are linked.

    Returns:
      (Q, m) bool: True for the candidates kept.
    """
    m = embeddings.shape[1]
    unit = embeddings.astype(jnp.float32)
    unit = unit / jnp.maximum(jnp.linalg.norm(unit, axis=-1, keepdims=True), 1e-12)
    cosine = jnp.einsum("qid,qjd->qij", unit, unit)
    linked = (cosine >= threshold) & valid[:, :, None] & valid[:, None, :]

    # Every candidate takes the smallest rank it is linked to, and the label
    # of the candidate that rank names (pointer jumping), until nothing
    # changes: each component ends labelled with its best rank.
    def relabel(state):
        labels, _ = state
        neighbour_min = jnp.min(jnp.where(linked, labels[:, None, :], m), axis=-1)
        new = jnp.minimum(labels, neighbour_min)
        new = jnp.take_along_axis(new, new, axis=1)
        return new, jnp.any(new != labels)

    labels = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), valid.shape)
    labels, _ = jax.lax.while_loop(lambda s: s[1], relabel, (labels, True))
    return valid & (labels == jnp.arange(m, dtype=jnp.int32)[None, :])


@functools.partial(jax.jit, static_argnames=("k",))
def select_kept(
    ids: jax.Array,
    sims: jax.Array,
    embeddings: jax.Array,
    keep: jax.Array,
    k: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The first k kept candidates in rank order, the rest masked.

    Args:
      ids, sims: (Q, m) candidates, best first. embeddings: (Q, m, D).
      keep: (Q, m) bool from `component_leaders`.
      k: slots in the output, k <= m.

    Returns:
      ids (Q, k) (-1 where masked), sims (Q, k) (0 where masked),
      embeddings (Q, k, D) (zeros where masked), mask (Q, k) bool.
    """
    m = ids.shape[1]
    rank = jnp.arange(m)[None, :]
    order = jnp.argsort(jnp.where(keep, rank, m + rank), axis=1)[:, :k]
    mask = jnp.take_along_axis(keep, order, axis=1)
    ids = jnp.where(mask, jnp.take_along_axis(ids, order, axis=1), -1)
    sims = jnp.where(mask, jnp.take_along_axis(sims, order, axis=1), 0.0)
    embeddings = jnp.take_along_axis(embeddings, order[:, :, None], axis=1)
    embeddings = jnp.where(mask[:, :, None], embeddings, 0.0)
    return ids, sims, embeddings, mask


_leaders = jax.jit(component_leaders, static_argnames=("threshold",))


def deduplicate(
    ids: np.ndarray,
    sims: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Near-duplicate removal over already fetched candidates.

    Args:
      ids: (Q, m) int candidate ids, best first; negative ids are absent.
      sims: (Q, m) float similarities.
      embeddings: (Q, m, D) the candidates' embeddings.
      k: slots in the output.
      threshold: cosine at or above which candidates are linked.

    Returns:
      ids int64 (Q, k), sims float32 (Q, k), embeddings float32 (Q, k, D),
      mask bool (Q, k); see the module docstring for masked slots.
    """
    ids = np.asarray(ids, np.int64)
    valid = ids >= 0
    m = ids.shape[1]
    if m < k:
        pad = k - m
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        sims = np.pad(np.asarray(sims), ((0, 0), (0, pad)))
        embeddings = np.pad(np.asarray(embeddings), ((0, 0), (0, pad), (0, 0)))
        valid = np.pad(valid, ((0, 0), (0, pad)))
    # Bound the (chunk, m, m) link matrix to ~64 MB.
    chunk = max(1, (1 << 24) // max(1, ids.shape[1] ** 2))
    keep = np.concatenate(
        [
            np.asarray(
                _leaders(
                    jnp.asarray(embeddings[start : start + chunk], jnp.float32),
                    jnp.asarray(valid[start : start + chunk]),
                    threshold=float(threshold),
                )
            )
            for start in range(0, max(1, len(ids)), chunk)
        ]
    )
    embeddings = jnp.asarray(embeddings, jnp.float32)
    # Row ids index the database, which may exceed int32: select positions.
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    out_pos, out_sims, out_emb, mask = select_kept(
        jnp.asarray(positions, jnp.int32),
        jnp.asarray(sims, jnp.float32),
        embeddings,
        keep,
        k=k,
    )
    out_pos = np.asarray(out_pos)
    out_ids = np.where(
        out_pos >= 0, np.take_along_axis(ids, np.maximum(out_pos, 0), axis=1), -1
    )
    return (
        out_ids.astype(np.int64),
        np.asarray(out_sims, np.float32),
        np.asarray(out_emb, np.float32),
        np.asarray(mask),
    )


def search(
    search_fn: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    gather_fn: Callable[[np.ndarray], np.ndarray],
    queries: np.ndarray,
    k: int,
    size: int,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    overfetch: int = 4,
    max_fetch: int = 1024,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top k neighbours after near-duplicate removal, over-fetching as needed.

    Each query first fetches min(size, overfetch * k) candidates; a query
    left with fewer than k after de-duplication fetches twice as many again
    (alone, so its answer does not depend on the batch) until k remain, the
    whole database has been fetched, or `max_fetch` candidates (at least
    overfetch * k) were fetched; slots still empty then are masked. The cap
    bounds the cost on corpora where one caption repeats thousands of times.

    Args:
      search_fn: (queries (q, D), m) -> (ids (q, m), sims (q, m)).
      gather_fn: ids (q, m) -> embeddings (q, m, D) used for the cosine test
        (ids of -1 must give any row; they are never kept).
      queries: (Q, D). k: neighbours wanted. size: rows in the database.

    Returns:
      As `deduplicate`: ids (Q, k), sims (Q, k), embeddings (Q, k, D), mask.
    """
    queries = np.asarray(queries, np.float32)
    num = queries.shape[0]
    fetch = min(size, max(k, overfetch * k))
    limit = min(size, max(fetch, max_fetch))
    if num == 0:
        width = gather_fn(np.zeros((1, 1), np.int64)).shape[-1]
        return (
            np.zeros((0, k), np.int64),
            np.zeros((0, k), np.float32),
            np.zeros((0, k, width), np.float32),
            np.zeros((0, k), bool),
        )
    results = None
    pending = np.arange(num)
    while len(pending):
        ids, sims = search_fn(queries[pending], fetch)
        out = deduplicate(ids, sims, gather_fn(ids), k, threshold)
        if results is None:
            results = [np.zeros((num, *a.shape[1:]), a.dtype) for a in out]
        for target, value in zip(results, out, strict=True):
            target[pending] = value
        if fetch >= limit:
            break
        pending = pending[out[3].sum(axis=1) < k]
        fetch = min(limit, 2 * fetch)
    return tuple(results)
