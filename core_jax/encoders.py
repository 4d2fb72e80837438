"""Encoders that turn captions and images into L2-normalised embeddings.

`TextEncoder` is what the caption database needs from a model: a name, a
fingerprint that changes whenever the embeddings could change (checkpoint,
tokenizer, configuration), a width, and `encode(texts)`. The SigLIP towers
implement it here; the LLM embedder in `core_jax.models.text_embedder`
implements the same protocol for text-to-text retrieval.

Batches have a fixed length (`batch_size`, rounded up to a multiple of the
device count) so the jitted tower compiles once; the last batch is padded
and its padding rows are dropped before anything is returned.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from core_jax import sharding


@runtime_checkable
class TextEncoder(Protocol):
    """A text model usable to fill a database column.

    Attributes:
      name: a readable model name, e.g. "siglip_text:So400m/14".
      fingerprint: a stable hash of checkpoint, tokenizer and configuration.
      dim: embedding width D.
    """

    name: str
    fingerprint: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 (n, dim), each row L2-normalised."""
        ...


def params_fingerprint(params) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes (tree order)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.asarray(leaf)
        header = f"{jax.tree_util.keystr(path)}|{array.shape}|{array.dtype}\n"
        digest.update(header.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _batch_length(batch_size: int, mesh: Mesh) -> int:
    multiple = sharding.batch_size_multiple(mesh)
    return max(multiple, math.ceil(batch_size / multiple) * multiple)


def _run_batched(fn, inputs: np.ndarray, batch: int, mesh: Mesh, dim: int):
    """Applies `fn` to fixed-length, sharded batches; drops padding rows."""
    if len(inputs) == 0:
        return np.zeros((0, dim), np.float32)
    placement = sharding.batch_sharding(mesh, inputs.ndim)
    outputs = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch]
        padded, real = sharding.pad_to_multiple(chunk, batch)
        result = fn(jax.device_put(padded, placement))
        outputs.append(np.asarray(result, np.float32)[:real])
    return np.concatenate(outputs)


class SiglipTextEncoder:
    """SigLIP's text tower as a `TextEncoder`.

    Args:
      model: a `core_jax.models.siglip.SigLIP`.
      params: its parameters.
      tokenizer: a `core_jax.tokenizers.SiglipTokenizer` (texts -> (N, L)).
      batch_size: texts per device call (rounded up to the device count).
      mesh: devices to shard batches over; all local devices by default.
    """

    def __init__(self, model, params, tokenizer, batch_size: int = 256, mesh=None):
        self.model = model
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.batch_size = _batch_length(batch_size, self.mesh)
        self.dim = int(model.embed_dim)
        variant = getattr(model.config, "name", None) or f"D{self.dim}"
        self.name = f"siglip_text:{variant}"

        @jax.jit
        def apply(tokens):
            _, ztxt, _ = model.apply({"params": params}, None, tokens)
            return ztxt.astype(jnp.float32)

        self._apply = apply

    @functools.cached_property
    def fingerprint(self) -> str:
        parts = {
            "kind": "siglip_text",
            "config": repr(getattr(self.model, "config", None)),
            "dtype": str(getattr(self.model, "dtype", None)),
            "params": params_fingerprint(self.params),
            "tokenizer": _tokenizer_fingerprint(self.tokenizer),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 (n, D), L2-normalised SigLIP text embeddings."""
        texts = list(texts)
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            tokens = np.asarray(self.tokenizer(texts[start : start + self.batch_size]))
            outputs.append(
                _run_batched(
                    self._apply,
                    tokens.astype(np.int32),
                    self.batch_size,
                    self.mesh,
                    self.dim,
                )
            )
        if not outputs:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(outputs)


def _tokenizer_fingerprint(tokenizer) -> str:
    model_file = getattr(tokenizer, "model_file", None)
    parts = {
        "class": type(tokenizer).__name__,
        "length": getattr(tokenizer, "length", None),
        "model": _file_sha256(model_file) if model_file else None,
    }
    if model_file is None:
        # No file to hash: fingerprint the tokenizer by what it produces.
        probe = ["a photo of a dog.", "Ünïcode, digits 0123 and CAPS!"]
        parts["probe"] = np.asarray(tokenizer(probe)).tolist()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class SiglipImageEncoder:
    """SigLIP's image tower: preprocessed images (N, S, S, 3) -> (N, D).

    Args:
      model: a `core_jax.models.siglip.SigLIP`.
      params: its parameters.
      batch_size: images per device call (rounded up to the device count).
      mesh: devices to shard batches over; all local devices by default.
    """

    def __init__(self, model, params, batch_size: int = 64, mesh=None):
        self.model = model
        self.params = params
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.batch_size = _batch_length(batch_size, self.mesh)
        self.dim = int(model.embed_dim)
        variant = getattr(model.config, "name", None) or f"D{self.dim}"
        self.name = f"siglip_image:{variant}"

        @jax.jit
        def apply(images):
            zimg, _, _ = model.apply({"params": params}, images, None)
            return zimg.astype(jnp.float32)

        self._apply = apply

    @functools.cached_property
    def fingerprint(self) -> str:
        parts = {
            "kind": "siglip_image",
            "config": repr(getattr(self.model, "config", None)),
            "dtype": str(getattr(self.model, "dtype", None)),
            "params": params_fingerprint(self.params),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def encode(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, S, S, 3) in [-1, 1] -> float32 (N, D), L2-normalised."""
        images = np.asarray(images, np.float32)
        return _run_batched(self._apply, images, self.batch_size, self.mesh, self.dim)
