"""Nearest-neighbour search over caption embeddings: ScaNN and exact JAX.

Both backends answer the same question, maximum inner product search, and
return `(ids, sims)`: int64 row numbers into the database and float32 inner
products, each (Q, k), best first.

- `ExactIndex` holds the database on the devices of a mesh, rows split over
  the "batch" axis. Each device scores its rows against a chunk of queries,
  keeps its own top k (`jax.lax.top_k`, or `jax.lax.approx_max_k` where the
  accelerator has a fast approximate kernel, as TPUs do), and the per-device
  winners are merged into the global top k. Rows added to make the database
  divide by the device count score -inf and are never returned. Ties are
  broken towards the lower row number on any device count, so 1 and 8
  devices give the same answer. Exact search holds the whole database in
  device memory; above ~50M captions per host use the ScaNN backend.
- `ScannIndex` wraps ScaNN: brute force below `BRUTE_FORCE_BELOW` rows, a
  k-means tree with anisotropic asymmetric hashing and exact re-ordering
  above, with sizes chosen from the row count (all overridable). ScaNN's
  tree training is not bit-reproducible between runs; its results are.

`import scann` can fail with errors other than ImportError (its TensorFlow
op library is tied to one TensorFlow release), so `build(backend="scann")`
falls back to the exact backend with a logged warning when it does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec

from core_jax import sharding

BRUTE_FORCE_BELOW = 20_000
_META_FILE = "index.json"


class SearchError(ValueError):
    """A search request that cannot be answered (shape, k, backend)."""


class Index(Protocol):
    """What every backend offers."""

    size: int
    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> ids int64 (Q, k), sims float32 (Q, k), best first."""
        ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _check_queries(queries: np.ndarray, dim: int, k: int, size: int) -> np.ndarray:
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise SearchError(
            f"queries have shape {queries.shape}; expected (Q, {dim}) for this index"
        )
    if not isinstance(k, int | np.integer) or k < 1:
        raise SearchError(f"k={k!r} must be a positive integer")
    if k > size:
        raise SearchError(
            f"k={k} is larger than the database, which has {size} rows; "
            f"ask for at most {size} neighbours"
        )
    return queries


# ---------------------------------------------------------------------------
# Exact search in JAX.


def _top_k(scores: jax.Array, k: int, approximate: bool) -> tuple[jax.Array, ...]:
    if approximate:
        return jax.lax.approx_max_k(scores, k, recall_target=0.95)
    return jax.lax.top_k(scores, k)


def _local_search(
    queries: jax.Array,
    rows: jax.Array,
    *,
    k: int,
    block: int,
    size: int,
    approximate: bool,
) -> tuple[jax.Array, jax.Array]:
    """One device's top k over its rows, scanning them in blocks.

    Args:
      queries: (Q, D) float32, the same on every device.
      rows: (R, D) this device's slice of the database, R a multiple of block.
      k: neighbours to keep, at most `block`.
      block: rows scored at once, bounding the (Q, block) score matrix.
      size: real rows in the whole database; rows at or past it are padding.
      approximate: use `approx_max_k` for the per-block selection.

    Returns:
      (sims (Q, k) float32, global ids (Q, k) int32), best first.
    """
    num_rows = rows.shape[0]
    first_row = jax.lax.axis_index(sharding.BATCH) * num_rows
    blocks = rows.reshape(num_rows // block, block, rows.shape[1])
    q = queries.astype(rows.dtype)

    def step(carry, xs):
        best_sims, best_ids = carry
        index, rows_block = xs
        scores = jnp.einsum(
            "qd,nd->qn", q, rows_block, preferred_element_type=jnp.float32
        )
        ids = first_row + index * block + jnp.arange(block, dtype=jnp.int32)
        scores = jnp.where(ids[None, :] < size, scores, -jnp.inf)
        sims, positions = _top_k(scores, k, approximate)
        # Earlier blocks come first, so equal scores keep the lower row id.
        sims = jnp.concatenate([best_sims, sims], axis=1)
        ids = jnp.concatenate([best_ids, ids[positions]], axis=1)
        sims, order = jax.lax.top_k(sims, k)
        return (sims, jnp.take_along_axis(ids, order, axis=1)), None

    init = (
        jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
        jnp.full((q.shape[0], k), jnp.iinfo(jnp.int32).max, jnp.int32),
    )
    xs = (jnp.arange(num_rows // block, dtype=jnp.int32), blocks)
    (sims, ids), _ = jax.lax.scan(step, init, xs)
    return sims, ids


@dataclasses.dataclass
class ExactIndex:
    """Exact maximum inner product search, the database sharded over a mesh.

    Attributes:
      size: real rows in the database.
      dim: embedding width D.
      dtype: storage type on device, float32 or float16 (half the memory;
        queries are rounded to it too, so scores differ by ~1e-3).
      query_chunk: queries scored per call; a fixed shape, so one compile.
      block_rows: database rows per device scored at once.
      approximate: per-device `approx_max_k` instead of `top_k` (TPU).
    """

    size: int
    dim: int
    dtype: np.dtype
    query_chunk: int
    block_rows: int
    approximate: bool
    mesh: Mesh
    _rows: jax.Array
    _host_rows: np.ndarray
    _block: int

    @classmethod
    def create(
        cls,
        embeddings: np.ndarray,
        *,
        mesh: Mesh | None = None,
        dtype=np.float32,
        query_chunk: int = 256,
        block_rows: int = 65_536,
        approximate: bool = False,
    ) -> ExactIndex:
        """Places `embeddings` (N, D) on the mesh, rows over "batch"."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise SearchError(
                f"database embeddings have shape {embeddings.shape}; expected (N, D)"
                " with N >= 1"
            )
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise SearchError(f"dtype {dtype} must be float32 or float16")
        mesh = mesh if mesh is not None else sharding.make_mesh()
        devices = sharding.batch_size_multiple(mesh)
        size, dim = embeddings.shape

        per_device = math.ceil(size / devices)
        block = min(block_rows, per_device)
        per_device = math.ceil(per_device / block) * block
        host_rows = embeddings.astype(dtype, copy=False)
        padded = np.zeros((per_device * devices, dim), dtype)
        padded[:size] = host_rows
        rows = jax.device_put(padded, sharding.batch_sharding(mesh, 2))
        return cls(
            size=size,
            dim=dim,
            dtype=dtype,
            query_chunk=query_chunk,
            block_rows=block_rows,
            approximate=approximate,
            mesh=mesh,
            _rows=rows,
            _host_rows=host_rows,
            _block=block,
        )

    @functools.cached_property
    def _search_fns(self) -> dict:
        return {}

    def _compiled(self, k: int):
        if k not in self._search_fns:
            local_k = min(k, self._block)
            local = functools.partial(
                _local_search,
                k=local_k,
                block=self._block,
                size=self.size,
                approximate=self.approximate,
            )

            def sharded(queries, rows):
                sims, ids = local(queries, rows)
                # Gathered in device order, i.e. ascending row ids, so the
                # final top k breaks ties exactly as one device would.
                sims = jax.lax.all_gather(sims, sharding.BATCH, axis=1, tiled=True)
                ids = jax.lax.all_gather(ids, sharding.BATCH, axis=1, tiled=True)
                sims, order = jax.lax.top_k(sims, k)
                return sims, jnp.take_along_axis(ids, order, axis=1)

            fn = jax.shard_map(
                sharded,
                mesh=self.mesh,
                in_specs=(PartitionSpec(), PartitionSpec(sharding.BATCH, None)),
                out_specs=(PartitionSpec(), PartitionSpec()),
                check_vma=False,
            )
            self._search_fns[k] = jax.jit(fn)
        return self._search_fns[k]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top k by inner product.

        Args:
          queries: (Q, D) float.
          k: neighbours per query, 1 <= k <= size.

        Returns:
          ids int64 (Q, k) and sims float32 (Q, k), best first.
        """
        queries = _check_queries(queries, self.dim, k, self.size)
        fn = self._compiled(int(k))
        replicated = sharding.replicated(self.mesh)
        ids_out, sims_out = [], []
        for start in range(0, queries.shape[0], self.query_chunk):
            chunk = queries[start : start + self.query_chunk]
            padded = np.zeros((self.query_chunk, self.dim), np.float32)
            padded[: len(chunk)] = chunk
            sims, ids = fn(jax.device_put(padded, replicated), self._rows)
            sims_out.append(np.asarray(sims)[: len(chunk)])
            ids_out.append(np.asarray(ids)[: len(chunk)].astype(np.int64))
        if not ids_out:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(ids_out), np.concatenate(sims_out)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the rows (as stored) and the settings to `directory`."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_npy(directory / "rows.npy", self._host_rows)
        meta = {
            "backend": "exact",
            "size": self.size,
            "dim": self.dim,
            "dtype": self.dtype.name,
            "query_chunk": self.query_chunk,
            "block_rows": self.block_rows,
            "approximate": self.approximate,
        }
        _write_json(directory / _META_FILE, meta)


# ---------------------------------------------------------------------------
# ScaNN.


def import_scann():
    """Returns the scann module, or None (with a warning) when it cannot load.

    The import is lazy so core_jax never needs TensorFlow, and broad because
    a mismatched TensorFlow makes it raise errors that are not ImportError.
    """
    try:
        import scann  # noqa: PLC0415

        return scann
    except Exception as error:  # noqa: BLE001
        logging.warning(
            "ScaNN could not be imported (%s: %s); using exact search instead",
            type(error).__name__,
            error,
        )
        return None


@dataclasses.dataclass(frozen=True)
class ScannParams:
    """ScaNN settings; `choose` picks them from the database size.

    Attributes:
      brute_force: score every row exactly (small databases).
      num_leaves: k-means leaves of the tree, ~sqrt(N).
      leaves_to_search: leaves visited per query.
      training_sample_size: rows the tree and codebooks are trained on.
      dims_per_block: asymmetric hashing dimensions per 16-centre codebook.
      anisotropic_threshold: ScaNN's anisotropic quantisation threshold.
      reorder: candidates re-scored exactly before the final top k.
    """

    brute_force: bool
    num_leaves: int = 0
    leaves_to_search: int = 0
    training_sample_size: int = 0
    dims_per_block: int = 2
    anisotropic_threshold: float = 0.2
    reorder: int = 0

    @classmethod
    def choose(cls, size: int, **overrides) -> ScannParams:
        """Settings for `size` rows; the tree's are filled in even when brute
        force is chosen, so `brute_force=False` alone forces the tree."""
        leaves = max(16, int(round(math.sqrt(size))))
        params = cls(
            brute_force=size < BRUTE_FORCE_BELOW,
            num_leaves=leaves,
            # 15% of the leaves keeps recall@10 above 0.95 even on weakly
            # clustered data; fewer leaves trade recall for speed.
            leaves_to_search=min(leaves, max(8, int(math.ceil(leaves * 0.15)))),
            training_sample_size=min(size, 250_000),
            reorder=200,
        )
        return dataclasses.replace(params, **overrides)


@dataclasses.dataclass
class ScannIndex:
    """A ScaNN searcher over (N, D) float32 rows, maximum inner product."""

    size: int
    dim: int
    params: ScannParams
    _searcher: object

    @classmethod
    def create(cls, embeddings: np.ndarray, **overrides) -> ScannIndex:
        scann = import_scann()
        if scann is None:
            raise RuntimeError("ScaNN is not available")
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise SearchError(
                f"database embeddings have shape {embeddings.shape}; expected (N, D)"
                " with N >= 1"
            )
        size, dim = embeddings.shape
        params = ScannParams.choose(size, **overrides)
        builder = scann.scann_ops_pybind.builder(embeddings, 10, "dot_product")
        if params.brute_force:
            builder = builder.score_brute_force()
        else:
            builder = (
                builder.tree(
                    num_leaves=params.num_leaves,
                    num_leaves_to_search=params.leaves_to_search,
                    training_sample_size=params.training_sample_size,
                )
                .score_ah(
                    params.dims_per_block,
                    anisotropic_quantization_threshold=params.anisotropic_threshold,
                )
                .reorder(params.reorder)
            )
        logging.info(
            "Building ScaNN index over %d rows of width %d: %s",
            *embeddings.shape,
            params,
        )
        return cls(size=size, dim=dim, params=params, _searcher=builder.build())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k by inner product (approximate above BRUTE_FORCE_BELOW rows).

        Returns:
          ids int64 (Q, k) and sims float32 (Q, k), best first.
        """
        queries = np.ascontiguousarray(_check_queries(queries, self.dim, k, self.size))
        if queries.shape[0] == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        kwargs = {"final_num_neighbors": int(k)}
        if not self.params.brute_force:
            kwargs["pre_reorder_num_neighbors"] = max(self.params.reorder, int(k))
            kwargs["leaves_to_search"] = self.params.leaves_to_search
        ids, sims = self._searcher.search_batched_parallel(queries, **kwargs)
        ids = np.asarray(ids).astype(np.int64)
        sims = np.asarray(sims, dtype=np.float32)
        if ids.shape[1] < k:
            # ScaNN returns fewer columns when a query's visited leaves hold
            # fewer than k rows; widen with the -1 / -inf padding.
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        return ids, sims

    def save(self, directory: str | os.PathLike) -> None:
        """Serialises the searcher with relative asset paths into `directory`."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._searcher.serialize(str(directory), relative_path=True)
        meta = {
            "backend": "scann",
            "size": self.size,
            "dim": self.dim,
            "params": dataclasses.asdict(self.params),
        }
        _write_json(directory / _META_FILE, meta)


_ASSET_PATH = re.compile(r'asset_path:\s*"([^"]*)"')


def _load_scann(directory: pathlib.Path, meta: dict) -> ScannIndex:
    """Loads a serialised ScaNN searcher after checking its files in Python.

    ScaNN aborts the whole process from native code when an asset is
    missing, so every file named in scann_assets.pbtxt is checked first.
    ScaNN's own loader would also unpickle `scann_docids.pkl`; this one never
    does (ids here are row numbers), and refuses a directory that has it.
    """
    scann = import_scann()
    if scann is None:
        raise IndexLoadError(
            f"{directory} holds a ScaNN index but ScaNN cannot be imported here"
        )
    assets_file = directory / "scann_assets.pbtxt"
    required = [assets_file, directory / "scann_config.pb"]
    missing = [p.name for p in required if not p.is_file()]
    if missing:
        raise IndexLoadError(f"ScaNN index {directory} lacks {', '.join(missing)}")
    assets = assets_file.read_text()
    for relative in _ASSET_PATH.findall(assets):
        path = (directory / relative).resolve()
        if directory.resolve() not in path.parents:
            raise IndexLoadError(
                f"ScaNN index {directory}: asset {relative!r} lies outside the"
                " index directory"
            )
        if not path.is_file():
            raise IndexLoadError(
                f"ScaNN index {directory} lacks {relative}, named in scann_assets.pbtxt"
            )
    if (directory / "scann_docids.pkl").exists():
        raise IndexLoadError(
            f"ScaNN index {directory} has scann_docids.pkl; pickled ids are not"
            " loaded (ids are row numbers), remove the file"
        )
    # Relative asset paths resolve against the working directory in ScaNN.
    absolute = _ASSET_PATH.sub(
        lambda m: f'asset_path: "{(directory / m.group(1)).resolve()}"', assets
    )
    pybind = scann.scann_ops_pybind
    searcher = pybind.ScannSearcher(
        pybind.scann_pybind.ScannNumpy(str(directory), absolute)
    )
    params = ScannParams(**meta["params"])
    return ScannIndex(
        size=int(meta["size"]), dim=int(meta["dim"]), params=params, _searcher=searcher
    )


# ---------------------------------------------------------------------------
# Entry points.


class IndexLoadError(ValueError):
    """A saved index directory that is incomplete or inconsistent."""


def build(
    embeddings: np.ndarray,
    backend: str = "scann",
    *,
    mesh: Mesh | None = None,
    dtype=np.float32,
    query_chunk: int = 256,
    approximate: bool = False,
    **scann_overrides,
) -> Index:
    """Builds a search index over `embeddings` (N, D).

    Args:
      embeddings: (N, D) database rows (normalised for cosine search).
      backend: "scann" or "exact"; "scann" falls back to "exact" with a
        warning when ScaNN cannot be imported.
      mesh: devices for the exact backend (all devices by default).
      dtype: float32 or float16 storage for the exact backend.
      query_chunk: queries per device call for the exact backend.
      approximate: `approx_max_k` per device for the exact backend.
      **scann_overrides: fields of `ScannParams` to override.

    Returns:
      An index with `search(queries, k)` and `save(directory)`.
    """
    if backend not in ("scann", "exact"):
        raise SearchError(f"backend={backend!r}; expected 'scann' or 'exact'")
    if backend == "scann":
        if import_scann() is not None:
            return ScannIndex.create(embeddings, **scann_overrides)
        logging.warning("Falling back to the exact JAX backend")
    return ExactIndex.create(
        embeddings,
        mesh=mesh,
        dtype=dtype,
        query_chunk=query_chunk,
        approximate=approximate,
    )


def load(directory: str | os.PathLike, *, mesh: Mesh | None = None) -> Index:
    """Loads an index written by `save`."""
    directory = pathlib.Path(directory)
    meta_file = directory / _META_FILE
    if not meta_file.is_file():
        raise IndexLoadError(f"{directory} is not a saved index: {_META_FILE} missing")
    meta = json.loads(meta_file.read_text())
    backend = meta.get("backend")
    if backend == "scann":
        return _load_scann(directory, meta)
    if backend == "exact":
        rows_file = directory / "rows.npy"
        if not rows_file.is_file():
            raise IndexLoadError(f"exact index {directory} lacks rows.npy")
        rows = np.load(rows_file, mmap_mode="r", allow_pickle=False)
        if rows.shape != (meta["size"], meta["dim"]):
            raise IndexLoadError(
                f"{rows_file} has shape {rows.shape}; {_META_FILE} says"
                f" ({meta['size']}, {meta['dim']})"
            )
        return ExactIndex.create(
            rows,
            mesh=mesh,
            dtype=meta["dtype"],
            query_chunk=meta["query_chunk"],
            block_rows=meta["block_rows"],
            approximate=meta["approximate"],
        )
    raise IndexLoadError(f"{meta_file} names backend {backend!r}; expected scann/exact")


def recall_at_k(
    database: np.ndarray, queries: np.ndarray, ids: np.ndarray, k: int
) -> float:
    """Fraction of returned ids whose true score reaches the true k-th score.

    Ties at rank k count as hits, and the true scores use the same inner
    product the indexes search with. Computed in float32 NumPy, in chunks of
    queries, with a 1e-5 allowance for float32 rounding of equal scores.

    Args:
      database: (N, D). queries: (Q, D). ids: (Q, >=k) returned ids.
    """
    hits = 0
    database = np.asarray(database, np.float32)
    for start in range(0, len(queries), 256):
        q = np.asarray(queries[start : start + 256], np.float32)
        scores = q @ database.T
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
        got = ids[start : start + 256, :k]
        valid = got >= 0
        got_scores = np.take_along_axis(scores, np.where(valid, got, 0), axis=1)
        hits += int(np.sum(valid & (got_scores >= kth[:, None] - 1e-5)))
    return hits / (len(queries) * k)


def _write_npy(path: pathlib.Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _write_json(path: pathlib.Path, value: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
