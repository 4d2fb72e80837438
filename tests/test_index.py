"""Specification of core_jax.index: exact JAX search and ScaNN.

Expected neighbours come from NumPy written out here: a full score matrix
and a stable argsort (ties to the lower row id). Inputs are deterministic
clustered vectors; an index over arbitrary vectors is a real index test.
"""

import jax
import numpy as np
import pytest

from core_jax import index, sharding


def _clustered(n, d, seed, clusters=32):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _numpy_top_k(database, queries, k):
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def _numpy_recall(database, queries, ids, k):
    # Hits are returned rows scoring at least the true k-th score (ties).
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    kth = np.sort(scores, axis=1)[:, -k]
    got = np.take_along_axis(scores, ids[:, :k], axis=1)
    return float(np.mean(got >= kth[:, None] - 1e-6))


@pytest.fixture(scope="module")
def data():
    return _clustered(1003, 32, 0), _clustered(37, 32, 1)


def test_exact_matches_numpy(data):
    database, queries = data
    idx = index.build(database, backend="exact")
    ids, sims = idx.search(queries, 10)
    want_ids, want_sims = _numpy_top_k(database, queries, 10)
    assert ids.dtype == np.int64 and sims.dtype == np.float32
    assert ids.shape == sims.shape == (37, 10)
    np.testing.assert_array_equal(ids, want_ids)
    # float32 dot products of unit vectors: rounding below 1e-5.
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)


def test_exact_identical_on_one_and_eight_devices(data):
    database, queries = data
    assert len(jax.devices()) == 8
    one = index.build(
        database, backend="exact", mesh=sharding.make_mesh(jax.devices()[:1])
    )
    eight = index.build(database, backend="exact", mesh=sharding.make_mesh())
    ids1, sims1 = one.search(queries, 25)
    ids8, sims8 = eight.search(queries, 25)
    np.testing.assert_array_equal(ids1, ids8)
    np.testing.assert_array_equal(sims1, sims8)


def test_exact_breaks_ties_towards_lower_ids_on_any_mesh():
    # Rows 0..15 are two repeated vectors: every score ties within a group.
    base = np.eye(4, dtype=np.float32)
    database = np.concatenate([np.tile(base[:1], (9, 1)), np.tile(base[1:2], (7, 1))])
    query = np.array([[1.0, 0.5, 0, 0]], np.float32)
    for devices in (jax.devices()[:1], jax.devices()[:2], jax.devices()):
        idx = index.build(database, backend="exact", mesh=sharding.make_mesh(devices))
        ids, sims = idx.search(query, 12)
        np.testing.assert_array_equal(ids[0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
        np.testing.assert_array_equal(sims[0], [1.0] * 9 + [0.5] * 3)


def test_exact_never_returns_padding_rows():
    # 11 rows over 8 devices: 5 padding rows (zeros would score 0 > -1).
    database = -np.ones((11, 4), np.float32) / 2
    idx = index.build(database, backend="exact")
    ids, sims = idx.search(np.ones((1, 4), np.float32), 11)
    assert sorted(ids[0].tolist()) == list(range(11))
    np.testing.assert_array_equal(sims, -2.0)


def test_exact_small_blocks_and_chunks_agree_with_numpy(data):
    database, queries = data
    idx = index.ExactIndex.create(database, query_chunk=8, block_rows=16)
    ids, _ = idx.search(queries, 20)
    np.testing.assert_array_equal(ids, _numpy_top_k(database, queries, 20)[0])


def test_exact_float16_storage_close_to_float32(data):
    database, queries = data
    idx = index.build(database, backend="exact", dtype=np.float16)
    ids, sims = idx.search(queries, 10)
    # Rows and queries rounded to float16 (rel. 2^-11) on 32-d unit vectors.
    _, want_sims = _numpy_top_k(database, queries, 10)
    np.testing.assert_allclose(sims, want_sims, atol=5e-3)
    assert _numpy_recall(database, queries, ids, 10) >= 0.98


def test_k_larger_than_database_is_a_clear_error(data):
    database, queries = data
    idx = index.build(database[:5], backend="exact")
    with pytest.raises(ValueError, match=r"k=6 is larger than the database.* 5 rows"):
        idx.search(queries, 6)


def test_query_width_mismatch_is_a_clear_error(data):
    database, _ = data
    idx = index.build(database, backend="exact")
    with pytest.raises(ValueError, match=r"\(Q, 32\)"):
        idx.search(np.zeros((2, 31), np.float32), 3)


def test_exact_save_and_load(tmp_path, data):
    database, queries = data
    idx = index.build(database, backend="exact", dtype=np.float16)
    idx.save(tmp_path / "exact")
    loaded = index.load(tmp_path / "exact")
    for a, b in zip(idx.search(queries, 7), loaded.search(queries, 7), strict=True):
        np.testing.assert_array_equal(a, b)


scann = pytest.importorskip("scann", exc_type=ImportError)


def test_scann_brute_force_matches_numpy(data):
    database, queries = data
    idx = index.build(database, backend="scann")
    assert isinstance(idx, index.ScannIndex) and idx.params.brute_force
    ids, sims = idx.search(queries, 10)
    assert ids.dtype == np.int64 and sims.dtype == np.float32
    assert _numpy_recall(database, queries, ids, 10) == 1.0


@pytest.fixture(scope="module")
def tree_index():
    database = _clustered(30_000, 32, 2, clusters=200)
    return database, index.build(database, backend="scann")


def test_scann_tree_recall_at_10(tree_index):
    database, idx = tree_index
    assert not idx.params.brute_force
    assert idx.params.num_leaves == round(np.sqrt(30_000))
    queries = _clustered(200, 32, 3, clusters=200)
    ids, sims = idx.search(queries, 10)
    assert np.all(np.diff(sims, axis=1) <= 1e-6)  # best first
    assert _numpy_recall(database, queries, ids, 10) >= 0.95


def test_scann_save_load_round_trip(tmp_path, tree_index):
    database, idx = tree_index
    queries = database[:20]
    idx.save(tmp_path / "s")
    loaded = index.load(tmp_path / "s")
    for a, b in zip(idx.search(queries, 5), loaded.search(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "victim", ["dataset.npy", "hashed_dataset.npy", "serialized_partitioner.pb"]
)
def test_scann_load_refuses_missing_asset_before_native_code(
    tmp_path, tree_index, victim
):
    _, idx = tree_index
    idx.save(tmp_path / "s")
    (tmp_path / "s" / victim).unlink()
    with pytest.raises(index.IndexLoadError, match=victim):
        index.load(tmp_path / "s")


def test_scann_load_refuses_pickled_docids(tmp_path, data):
    database, _ = data
    index.build(database, backend="scann").save(tmp_path / "s")
    (tmp_path / "s" / "scann_docids.pkl").write_bytes(b"not loaded")
    with pytest.raises(index.IndexLoadError, match="scann_docids.pkl"):
        index.load(tmp_path / "s")


def test_scann_import_failure_that_is_not_import_error_falls_back_to_exact(
    monkeypatch, data
):
    # A TensorFlow op library with missing symbols raises NotFoundError, not
    # ImportError; any exception must lead to the exact backend.
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "scann":
            raise RuntimeError("undefined symbol: _ZN4absl12lts_2025")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    database, queries = data
    idx = index.build(database, backend="scann")
    assert isinstance(idx, index.ExactIndex)
    np.testing.assert_array_equal(
        idx.search(queries, 3)[0], _numpy_top_k(database, queries, 3)[0]
    )


def test_exact_with_approx_max_k_keeps_recall(data):
    # approx_max_k is exact on CPU; on TPU it targets recall 0.95 per device.
    database, queries = data
    idx = index.build(database, backend="exact", approximate=True)
    ids, _ = idx.search(queries, 10)
    assert _numpy_recall(database, queries, ids, 10) >= 0.95
