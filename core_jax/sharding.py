"""Device meshes and the shardings used across core_jax.

One mesh axis, "batch", carries the data-parallel dimension: images, captions
or database rows are split across it, and small operands (class prototypes,
model parameters of the SigLIP towers) are replicated. A second axis,
"model", is available for parameters too large for one device (the LLM
embedder's matrices) and for the class axis when there are many classes.

A batch whose length does not divide the device count is padded to a
multiple with `pad_to_multiple`, and the padding rows are dropped before
anything is returned or counted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH = "batch"
MODEL = "model"


def make_mesh(
    devices: Sequence[jax.Device] | None = None,
    *,
    model_parallel: int = 1,
) -> Mesh:
    """A ("batch", "model") mesh over `devices` (all devices by default).

    Args:
      devices: the devices to use; defaults to `jax.devices()`.
      model_parallel: size of the "model" axis; must divide the device count.

    Returns:
      A mesh of shape (len(devices) // model_parallel, model_parallel).
    """
    devices = list(jax.devices() if devices is None else devices)
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(
            f"model_parallel={model_parallel} must be >= 1 and divide the "
            f"device count {len(devices)}"
        )
    grid = np.asarray(devices, dtype=object).reshape(-1, model_parallel)
    return Mesh(grid, (BATCH, MODEL))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading axis split over "batch", the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_size_multiple(mesh: Mesh) -> int:
    """The number a batch length must divide by to shard on "batch"."""
    return mesh.shape[BATCH]


def pad_to_multiple(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Pads the leading axis of `x` with zeros to a multiple of `multiple`.

    Returns:
      (padded array, number of real rows). Callers slice `[:n]` off results.
    """
    n = x.shape[0]
    remainder = (-n) % multiple
    if remainder == 0:
        return x, n
    padding = np.zeros((remainder, *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, padding], axis=0), n


# Sharded CoRE logits.
#
# Images are split over "batch"; class prototypes and their neighbours are
# replicated, or, for many classes (say 10,000 with k = 10 neighbours of
# 1152 floats: 460 MB), split over "model" so each device holds C / model
# classes and computes its (N / batch, C / model) block of the logits.


def class_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (class) axis split over "model", the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(MODEL, *([None] * (ndim - 1))))


def logits_sharding(mesh: Mesh, *, shard_classes: bool = False) -> NamedSharding:
    """(N, C) logits: rows over "batch", columns over "model" if requested."""
    return NamedSharding(mesh, PartitionSpec(BATCH, MODEL if shard_classes else None))


def core_logits_shardings(
    mesh: Mesh, *, shard_classes: bool = False
) -> tuple[tuple[NamedSharding, ...], NamedSharding]:
    """Input and output shardings for `fusion.core_logits` on `mesh`.

    Args:
      mesh: a ("batch", "model") mesh.
      shard_classes: split the class axis over "model" instead of
        replicating the class side.

    Returns:
      (in_shardings, out_sharding): in_shardings for the eight arrays
      (image_emb, image_nbrs, image_sims, image_mask, class_emb, class_nbrs,
      class_sims, class_mask) followed by the four scalars (alpha, beta,
      tau_i2t, tau_t2t), which are replicated.
    """
    classes = class_sharding if shard_classes else (lambda m, ndim: replicated(m))
    images = (
        batch_sharding(mesh, 2),
        batch_sharding(mesh, 3),
        batch_sharding(mesh, 2),
        batch_sharding(mesh, 2),
    )
    class_side = (
        classes(mesh, 2),
        classes(mesh, 3),
        classes(mesh, 2),
        classes(mesh, 2),
    )
    scalars = (replicated(mesh),) * 4
    return images + class_side + scalars, logits_sharding(
        mesh, shard_classes=shard_classes
    )


@functools.lru_cache(maxsize=32)
def sharded_core_logits(
    mesh: Mesh, *, shard_classes: bool = False, weighting: str = "softmax"
):
    """`fusion.core_logits` compiled for `mesh`.

    The returned function takes the eight arrays of `core_logits` (masks as
    bool arrays, not None) and then alpha, beta, tau_i2t, tau_t2t as
    positional 0-d arrays, so new hyper-parameters do not recompile. N must
    divide by `batch_size_multiple(mesh)` and, with `shard_classes`, C by
    the "model" axis size; `core_logits_on_mesh` pads for you.

    Returns:
      A jitted function returning (N, C) logits sharded as
      `logits_sharding(mesh, shard_classes=shard_classes)`.
    """
    from core_jax import fusion

    def logits(*arrays):
        *inputs, alpha, beta, tau_i2t, tau_t2t = arrays
        return fusion.core_logits(
            *inputs,
            alpha=alpha,
            beta=beta,
            tau_i2t=tau_i2t,
            tau_t2t=tau_t2t,
            weighting=weighting,
        )

    in_shardings, out_sharding = core_logits_shardings(
        mesh, shard_classes=shard_classes
    )
    return jax.jit(logits, in_shardings=in_shardings, out_shardings=out_sharding)


def _mask_or_all(mask: np.ndarray | None, sims: np.ndarray) -> np.ndarray:
    if mask is None:
        return np.ones(np.shape(sims), dtype=bool)
    return np.asarray(mask, dtype=bool)


def core_logits_on_mesh(
    mesh: Mesh,
    image_emb: np.ndarray,
    image_nbrs: np.ndarray,
    image_sims: np.ndarray,
    image_mask: np.ndarray | None,
    class_emb: np.ndarray,
    class_nbrs: np.ndarray,
    class_sims: np.ndarray,
    class_mask: np.ndarray | None,
    *,
    alpha: float,
    beta: float,
    tau_i2t: float,
    tau_t2t: float,
    weighting: str = "softmax",
    shard_classes: bool = False,
    chunk_size: int | None = None,
) -> np.ndarray:
    """CoRE logits for any N (and C) on `mesh`, padding rows dropped.

    Images are processed `chunk_size` rows at a time (all at once by
    default); each chunk, and with `shard_classes` the class axis, is padded
    with zero rows whose masks are False to a multiple of the mesh axis, and
    the padding is sliced off before returning.

    Args:
      mesh: a ("batch", "model") mesh.
      image_emb, image_nbrs, image_sims, image_mask, class_emb, class_nbrs,
        class_sims, class_mask, alpha, beta, tau_i2t, tau_t2t, weighting:
        as for `fusion.core_logits`; shapes (N, D), (N, k, D), (N, k),
        (N, k) or None, (C, D), (C, k', D), (C, k'), (C, k') or None.
      shard_classes: split the class axis over "model".
      chunk_size: images per call; rounded up to a multiple of the "batch"
        axis size.

    Returns:
      float32 logits, shape (N, C), as a NumPy array.
    """
    image_mask = _mask_or_all(image_mask, image_sims)
    class_mask = _mask_or_all(class_mask, class_sims)
    num_images = np.shape(image_emb)[0]
    num_classes = np.shape(class_emb)[0]

    class_side = [class_emb, class_nbrs, class_sims, class_mask]
    if shard_classes:
        class_side = [
            pad_to_multiple(np.asarray(x), mesh.shape[MODEL])[0] for x in class_side
        ]

    multiple = batch_size_multiple(mesh)
    chunk_size = num_images if chunk_size is None else chunk_size
    chunk_size = max(multiple, -(-max(chunk_size, 1) // multiple) * multiple)
    compute = sharded_core_logits(
        mesh, shard_classes=shard_classes, weighting=weighting
    )
    scalars = [np.float32(value) for value in (alpha, beta, tau_i2t, tau_t2t)]

    blocks = []
    for start in range(0, num_images, chunk_size):
        rows = slice(start, start + chunk_size)
        image_side = [
            pad_to_multiple(np.asarray(x[rows]), multiple)[0]
            for x in (image_emb, image_nbrs, image_sims, image_mask)
        ]
        n_real = min(chunk_size, num_images - start)
        logits = compute(*image_side, *class_side, *scalars)
        blocks.append(np.asarray(logits)[:n_real, :num_classes])
    if not blocks:
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(blocks, axis=0)
