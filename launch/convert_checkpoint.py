r"""Converts a SigLIP checkpoint into a big_vision .npz or an orbax directory.

    python -m launch.convert_checkpoint --input=/ckpt/siglip_hf_folder \
        --output=/ckpt/siglip.npz
    python -m launch.convert_checkpoint --input=/ckpt/siglip.npz \
        --output=/ckpt/siglip_orbax --variant=So400m/14

The input may be a big_vision .npz, a Hugging Face SigLIP folder
(config.json + safetensors) or an orbax directory written by this tool; the
output is a .npz when its name ends in .npz, else an orbax directory (Hugging
Face folders are read, never written). The output's parent folder must
exist: it is not created, so a mistyped path fails at once instead of
leaving a new directory tree behind. The architecture is read from the input
and checked (against --variant too, when given) before anything is written,
and the output is read back and compared.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging

from core_jax import checkpoints
from core_jax.models import siglip
from launch import common

_INPUT = flags.DEFINE_string("input", None, ".npz file, HF folder or orbax dir.")
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Output: a .npz file when the name ends in .npz, else an orbax directory; "
    "its parent folder must exist.",
)
_VARIANT = flags.DEFINE_string(
    "variant", None, "Optional variant name to check the checkpoint against."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output.")


def read(path: str) -> dict[str, np.ndarray]:
    """Reads any supported checkpoint into flat big_vision names (float32)."""
    flat, _ = checkpoints.load_flat(path)
    return {name: np.asarray(value, np.float32) for name, value in flat.items()}


def convert(
    source: str, destination: str, *, variant: str | None = None, overwrite=False
) -> siglip.SigLIPConfig:
    """Converts `source` into `destination` and verifies the result.

    Args:
      source: a .npz file, an HF SigLIP folder or an orbax directory.
      destination: a path ending in .npz, or an orbax directory.
      variant: checked against the checkpoint's architecture when given.
      overwrite: replace an existing destination.

    Returns:
      The architecture of the converted checkpoint.

    Raises:
      CheckpointError (a ValueError): unreadable input, an architecture that
        disagrees with `variant`, an existing destination or a missing
        parent folder of it, or a written file
        that does not read back identically.
    """
    source, destination = os.fspath(source), os.fspath(destination)
    if not os.path.exists(source):
        raise checkpoints.CheckpointError(f"{source}: no such file or directory")
    parent = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(parent):
        raise checkpoints.CheckpointError(
            f"{destination} (--output): its parent folder {parent} does not "
            "exist; create it first"
        )
    if os.path.exists(destination) and not overwrite:
        raise checkpoints.CheckpointError(
            f"{destination}: already exists; pass --overwrite to replace it"
        )

    flat = read(source)
    config = checkpoints.infer_config(flat, source=source)
    if variant:
        checkpoints.check_variant(config, variant, source=source)
    params = checkpoints.to_params(flat, siglip.SigLIP(config), source=source)

    if os.path.exists(destination):
        _remove(destination)
    if destination.endswith(".npz"):
        checkpoints.save_npz(params, destination)
    else:
        checkpoints.save_orbax(params, destination)

    written = read(destination)
    for name, value in flat.items():
        if name not in written or not np.array_equal(written[name], value):
            raise checkpoints.CheckpointError(
                f"{destination}: parameter {name!r} did not read back identically"
            )
    logging.info(
        "converted %s -> %s (%d parameters, %d values)",
        source,
        destination,
        len(flat),
        sum(v.size for v in flat.values()),
    )
    return config


def _remove(path: str) -> None:
    import shutil

    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    common.run_or_exit(
        lambda: convert(
            _INPUT.value,
            _OUTPUT.value,
            variant=_VARIANT.value,
            overwrite=_OVERWRITE.value,
        )
    )
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["input", "output"])
    app.run(main)
