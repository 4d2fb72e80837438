"""Reading Hugging Face safetensors checkpoints, single-file or sharded.

A sharded checkpoint is described by `model.safetensors.index.json`, whose
`weight_map` names the shard that holds each tensor. The index is the truth:
a listed shard that is missing is an error, files it does not list are
ignored, and a tensor is read from the one shard the index names for it.

Tensors are read one at a time through memory maps, so a caller that converts
and places each tensor before asking for the next never holds two copies of a
large model in host memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model."""


class SafetensorsCheckpoint:
    """Lazy, tensor-by-tensor access to the tensors of a safetensors folder.

    Attributes:
      folder: the checkpoint folder.
      names: every tensor name, sorted.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self._shard_of = _shard_map(self.folder)
        self.names = sorted(self._shard_of)
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._shard_of

    def __len__(self) -> int:
        return len(self._shard_of)

    def _handle(self, name: str):
        shard = self._shard_of[name]
        if shard not in self._handles:
            path = os.path.join(self.folder, shard)
            try:
                self._handles[shard] = safe_open(path, framework="numpy")
            except (SafetensorError, OSError) as error:
                raise CheckpointError(
                    f"{path}: not a readable safetensors file ({error})"
                ) from error
        return self._handles[shard]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`, read from the header only."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as a NumPy array (bfloat16 comes back as float32)."""
        if name not in self._shard_of:
            raise CheckpointError(f"{self.folder}: no tensor named {name!r}")
        handle = self._handle(name)
        try:
            return handle.get_tensor(name)
        except TypeError:
            # NumPy has no bfloat16: read the raw bits through the torch-free
            # path by widening to float32 via ml_dtypes.
            return _read_bfloat16(self.folder, self._shard_of[name], name)
        except SafetensorError as error:
            path = os.path.join(self.folder, self._shard_of[name])
            raise CheckpointError(
                f"{path}: tensor {name!r} cannot be read ({error}); "
                "the file may be truncated"
            ) from error

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, array) one tensor at a time, in sorted name order."""
        for name in self.names:
            yield name, self.get(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shard_map(folder: str) -> dict[str, str]:
    """Maps each tensor name to the file (relative to `folder`) that holds it."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a directory")

    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{index_path}: expected JSON with a 'weight_map' object ({error})"
            ) from error
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: 'weight_map' is not an object")
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard:
                raise CheckpointError(
                    f"{index_path}: shard name {shard!r} must be a plain file name"
                )
            if not os.path.isfile(os.path.join(folder, shard)):
                raise CheckpointError(
                    f"{index_path}: lists shard {shard!r}, which is missing "
                    f"from {folder}"
                )
        return dict(weight_map)

    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        try:
            with safe_open(single, framework="numpy") as f:
                return {name: SINGLE_FILE for name in f.keys()}
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{single}: not a readable safetensors file ({error})"
            ) from error

    raise CheckpointError(
        f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
        f"(files: {sorted(os.listdir(folder))[:10]})"
    )


def _read_bfloat16(folder: str, shard: str, name: str) -> np.ndarray:
    """Reads a bfloat16 tensor by its header offsets and widens it to float32."""
    import ml_dtypes

    path = os.path.join(folder, shard)
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
    entry = header[name]
    if entry["dtype"] != "BF16":
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}")
    start, end = entry["data_offsets"]
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size + start)
    raw = np.asarray(data[: end - start]).view(ml_dtypes.bfloat16)
    return raw.reshape(entry["shape"]).astype(np.float32)
