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
