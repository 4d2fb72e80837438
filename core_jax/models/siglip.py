"""SigLIP's image and text towers in Flax, with big_vision's parameter names.

The parameter tree is big_vision's two-towers tree, so its checkpoints load
with no renaming (the names are part of the file format):

    img/embedding/{kernel,bias}                    patch embedding, (p, p, 3, D)
    img/pos_embedding                              (1, (size / p)**2, D)
    img/Transformer/encoderblock_{i}/...           pre-LayerNorm blocks
    img/Transformer/encoder_norm/{scale,bias}
    img/MAPHead_0/{probe,MultiHeadDotProductAttention_0,LayerNorm_0,MlpBlock_0}
    img/head/{kernel,bias}                         optional (absent in SigLIP)
    txt/Embed_0/embedding                          (vocab, D)
    txt/pos_embedding                              (1, L, D)
    txt/Encoder_0/encoderblock_{i}/...
    txt/Encoder_0/encoder_norm/{scale,bias}
    txt/head/{kernel,bias}                         (D, embed_dim)
    t, b                                           log-temperature and bias, (1,)

A block holds `LayerNorm_0`, `MultiHeadDotProductAttention_0/{query,key,value,
out}` (kernels (D, heads, head_dim) and (heads, head_dim, D)), `LayerNorm_1`
and `MlpBlock_0/Dense_{0,1}` with tanh-approximated GELU.

The text tower applies no padding mask and pools the last position, as the
checkpoints were trained: tokens must be padded to the full text length with
the pad id (which equals EOS). Masking the padding or pooling elsewhere gives
embeddings that no longer match the released weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any
DType = Any


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    """The architecture of both towers.

    Attributes:
      image_width, image_depth, image_mlp_dim, image_heads: the ViT's width D,
        number of blocks, MLP hidden size and attention heads.
      patch_size: side of the square patches, in pixels.
      image_size: side of the square input images, in pixels.
      image_head_dim: output size of the image tower's final `head` Dense, or
        None when it has none (SigLIP's released checkpoints have none: the
        MAP head's output is the embedding).
      text_width, text_depth, text_mlp_dim, text_heads: the text transformer's.
      vocab_size: rows of the token embedding.
      text_length: number of tokens L the text tower takes.
      embed_dim: output size of the text tower's `head`, the shared embedding
        size.
    """

    image_width: int
    image_depth: int
    image_mlp_dim: int
    image_heads: int
    patch_size: int
    image_size: int
    text_width: int
    text_depth: int
    text_mlp_dim: int
    text_heads: int
    vocab_size: int
    text_length: int
    embed_dim: int
    image_head_dim: int | None = None

    def __post_init__(self):
        for width, heads, tower in (
            (self.image_width, self.image_heads, "image"),
            (self.text_width, self.text_heads, "text"),
        ):
            if heads < 1 or width % heads:
                raise ValueError(
                    f"{tower} width {width} is not divisible by {heads} heads"
                )
        if self.image_size < self.patch_size:
            raise ValueError(
                f"image size {self.image_size} is smaller than the patch size "
                f"{self.patch_size}"
            )
        image_out = self.image_head_dim or self.image_width
        if image_out != self.embed_dim:
            raise ValueError(
                f"image embeddings have size {image_out} but text embeddings "
                f"have size {self.embed_dim}; the towers must agree"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side; the convolution drops a remainder of pixels, as
        So400m/14 at 384 px does (27 patches of 14 cover 378 px)."""
        return self.image_size // self.patch_size


# big_vision's ViT sizes: (width, depth, mlp_dim, heads).
_TOWER_SIZES = {
    "Tiny": (64, 2, 256, 4),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
}
# SigLIP pairs each image tower with a text tower of the same size; English
# checkpoints use a 32k SentencePiece vocabulary and 64 tokens.
_DEFAULT_VOCAB = {"Tiny": 1000}
VARIANTS = ("Tiny/16", "B/16", "L/16", "So400m/14")
IMAGE_SIZES = (224, 256, 384, 512)


def variant_config(
    name: str,
    image_size: int = 224,
    *,
    vocab_size: int | None = None,
    text_length: int = 64,
) -> SigLIPConfig:
    """The architecture of a named variant.

    Args:
      name: "B/16", "L/16", "So400m/14" or "Tiny/16" (a small model for
        tests); "B/16@384" sets the image size as well.
      image_size: input side in pixels (224, 256, 384 or 512 for the released
        checkpoints; any multiple of the patch size works).
      vocab_size: token vocabulary; 32,000 by default (1,000 for Tiny).
      text_length: number of tokens per text.

    Returns:
      The variant's `SigLIPConfig`.
    """
    if "@" in name:
        name, size = name.split("@", 1)
        image_size = int(size)
    size_name, _, patch = name.partition("/")
    if size_name not in _TOWER_SIZES or not patch.isdigit():
        raise ValueError(f"unknown SigLIP variant {name!r}; expected one of {VARIANTS}")
    width, depth, mlp_dim, heads = _TOWER_SIZES[size_name]
    return SigLIPConfig(
        image_width=width,
        image_depth=depth,
        image_mlp_dim=mlp_dim,
        image_heads=heads,
        patch_size=int(patch),
        image_size=image_size,
        text_width=width,
        text_depth=depth,
        text_mlp_dim=mlp_dim,
        text_heads=heads,
        vocab_size=vocab_size or _DEFAULT_VOCAB.get(size_name, 32_000),
        text_length=text_length,
        embed_dim=width,
    )


def normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) along the last axis."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head attention with flax's parameter layout.

    `query`, `key` and `value` kernels are (D, heads, head_dim) and `out` is
    (heads, head_dim, D), as in `flax.linen.MultiHeadDotProductAttention`, so
    big_vision checkpoints load unchanged. No mask: SigLIP attends everywhere.
    """

    num_heads: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array) -> Array:
        features = inputs_q.shape[-1]
        head_dim = features // self.num_heads
        dense = functools.partial(
            nn.DenseGeneral,
            features=(self.num_heads, head_dim),
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
        )
        query = dense(name="query")(inputs_q)
        key = dense(name="key")(inputs_kv)
        value = dense(name="value")(inputs_kv)

        # Heads are moved in front of the tokens before the two batched
        # matmuls: XLA's CPU backend runs (b, h, q, d) x (b, h, k, d) about 3x
        # faster than the same contraction written on (b, q, h, d) operands.
        query, key, value = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
        query = query / jnp.sqrt(head_dim).astype(query.dtype)
        logits = jnp.einsum("bhqd,bhkd->bhqk", query, key)
        # Softmax in float32 even for bfloat16 matmuls: the exponent's range
        # is what bfloat16 loses first.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        mixed = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(self.dtype), value)
        mixed = mixed.transpose(0, 2, 1, 3)

        return nn.DenseGeneral(
            features,
            axis=(-2, -1),
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )(mixed)


class MlpBlock(nn.Module):
    """Dense -> tanh-approximated GELU -> Dense."""

    mlp_dim: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )
        x = dense(self.mlp_dim)(x)
        x = nn.gelu(x, approximate=True)
        return dense(width)(x)


class Encoder1DBlock(nn.Module):
    """Pre-LayerNorm transformer block; the residual stream stays float32."""

    mlp_dim: int
    num_heads: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.LayerNorm(epsilon=1e-6)(x)
        y = MultiHeadDotProductAttention(self.num_heads, self.dtype)(y, y)
        x = x + y.astype(x.dtype)

        y = nn.LayerNorm(epsilon=1e-6)(x)
        y = MlpBlock(self.mlp_dim, self.dtype)(y)
        return x + y.astype(x.dtype)


class Encoder(nn.Module):
    """`depth` blocks named `encoderblock_{i}`, then `encoder_norm`."""

    depth: int
    mlp_dim: int
    num_heads: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.depth):
            x = Encoder1DBlock(
                self.mlp_dim, self.num_heads, self.dtype, name=f"encoderblock_{i}"
            )(x)
        return nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x)


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned probe attends to all tokens."""

    mlp_dim: int
    num_heads: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, _, width = x.shape
        probe = self.param(
            "probe", nn.initializers.xavier_uniform(), (1, 1, width), jnp.float32
        )
        probe = jnp.tile(probe, (n, 1, 1))
        x = MultiHeadDotProductAttention(self.num_heads, self.dtype)(probe, x)
        x = x.astype(jnp.float32)

        y = nn.LayerNorm(epsilon=1e-6)(x)
        x = x + MlpBlock(self.mlp_dim, self.dtype)(y).astype(x.dtype)
        return x[:, 0]


def _posemb_init(width: int):
    return nn.initializers.normal(stddev=1.0 / math.sqrt(width))


class ImageTower(nn.Module):
    """ViT with MAP pooling: images (N, H, W, 3) -> (N, D) unnormalised."""

    config: SigLIPConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, images: Array) -> Array:
        c = self.config
        p = c.patch_size
        x = nn.Conv(
            c.image_width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            name="embedding",
        )(images.astype(self.dtype))
        n, h, w, width = x.shape
        x = x.reshape(n, h * w, width).astype(jnp.float32)
        x = x + self.param(
            "pos_embedding", _posemb_init(width), (1, h * w, width), jnp.float32
        )

        x = Encoder(
            c.image_depth,
            c.image_mlp_dim,
            c.image_heads,
            self.dtype,
            name="Transformer",
        )(x)
        x = MAPHead(c.image_mlp_dim, c.image_heads, self.dtype)(x)
        if c.image_head_dim:
            x = nn.Dense(c.image_head_dim, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


class TextTower(nn.Module):
    """Text transformer: tokens (N, L) -> (N, embed_dim) unnormalised.

    No padding mask, last-position pooling: see the module docstring.
    """

    config: SigLIPConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        c = self.config
        x = nn.Embed(
            c.vocab_size,
            c.text_width,
            embedding_init=nn.initializers.normal(stddev=1.0 / math.sqrt(c.text_width)),
        )(tokens)
        x = x.astype(jnp.float32) + self.param(
            "pos_embedding",
            _posemb_init(c.text_width),
            (1, c.text_length, c.text_width),
            jnp.float32,
        )

        x = Encoder(c.text_depth, c.text_mlp_dim, c.text_heads, self.dtype)(x)
        x = x[:, -1, :]
        x = nn.Dense(c.embed_dim, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


class SigLIP(nn.Module):
    """SigLIP's two towers.

    `model.apply({"params": params}, images, tokens)` returns
    `(zimg, ztxt, out)`: `zimg` (N, embed_dim) and `ztxt` (M, embed_dim),
    L2-normalised float32, each None when its input is None, and `out` a dict
    with the temperature `t` (= exp of the stored log-temperature), the bias
    `b`, the unnormalised embeddings `img/pre_norm` and `txt/pre_norm`, and
    `logits` (N, M) = zimg @ ztxt.T * t + b when both inputs are given.

    Attributes:
      config: the architecture.
      dtype: matmul dtype (float32 or bfloat16); parameters, LayerNorms,
        softmax and the residual stream stay float32.
    """

    config: SigLIPConfig
    dtype: DType = jnp.float32

    @classmethod
    def from_variant(
        cls, name: str, image_size: int = 224, *, dtype: DType = jnp.float32, **kw
    ) -> SigLIP:
        """The model of a named variant; see `variant_config` for `kw`."""
        return cls(variant_config(name, image_size, **kw), dtype=dtype)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def text_length(self) -> int:
        return self.config.text_length

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @nn.compact
    def __call__(
        self, images: Array | None = None, tokens: Array | None = None
    ) -> tuple[Array | None, Array | None, dict[str, Array]]:
        c = self.config
        out: dict[str, Array] = {}
        zimg = ztxt = None

        if images is not None:
            expected = (c.image_size, c.image_size, 3)
            if images.ndim != 4 or tuple(images.shape[1:]) != expected:
                raise ValueError(
                    f"images have shape {tuple(images.shape)} but the model "
                    f"expects (N, {c.image_size}, {c.image_size}, 3)"
                )
            features = ImageTower(c, self.dtype, name="img")(images)
            out["img/pre_norm"] = features
            zimg = normalize(features)

        if tokens is not None:
            if tokens.ndim != 2 or tokens.shape[1] != c.text_length:
                raise ValueError(
                    f"tokens have shape {tuple(tokens.shape)} but the model "
                    f"expects (N, {c.text_length}): pad every text to the full "
                    "length with the pad id"
                )
            features = TextTower(c, self.dtype, name="txt")(tokens)
            out["txt/pre_norm"] = features
            ztxt = normalize(features)

        log_t = self.param("t", nn.initializers.constant(math.log(10.0)), (1,))
        bias = self.param("b", nn.initializers.constant(-10.0), (1,))
        out["t"] = jnp.exp(log_t)
        out["b"] = bias
        if zimg is not None and ztxt is not None:
            out["logits"] = zimg @ ztxt.T * out["t"] + bias
        return zimg, ztxt, out


def dummy_inputs(model: SigLIP, batch: int = 1) -> tuple[Array, Array]:
    """Zero images (batch, S, S, 3) float32 and tokens (batch, L) int32."""
    images = jnp.zeros((batch, model.image_size, model.image_size, 3), jnp.float32)
    tokens = jnp.zeros((batch, model.text_length), jnp.int32)
    return images, tokens


def _fan_in_axes(name: str) -> int:
    """How many leading kernel axes are inputs: (p, p, 3, D) convolution,
    (heads, head_dim, D) attention output, (D_in, ...) otherwise."""
    if name.endswith("embedding/kernel"):
        return 3
    if name.endswith("out/kernel"):
        return 2
    return 1


def init_random(model: SigLIP, seed: int = 0) -> dict:
    """Randomly initialised float32 parameters for `model`.

    Drawn with NumPy from the shapes `model.init` would give, by the same
    rules as the modules' initialisers (fan-in-scaled normal kernels,
    zero biases, unit LayerNorm scales, 1/sqrt(D) embeddings): compiling
    `model.init` for a deep model takes far longer on a CPU than drawing the
    numbers.

    Args:
      model: a `SigLIP`.
      seed: NumPy seed; the same seed gives the same parameters.

    Returns:
      The nested parameter dict (the value of `variables["params"]`).
    """
    rng = np.random.default_rng(seed)
    shapes = param_shapes(model)

    def draw(path, leaf):
        name = "/".join(str(getattr(part, "key", part)) for part in path)
        shape = leaf.shape
        if name == "t":
            return jnp.full(shape, math.log(10.0), jnp.float32)
        if name == "b":
            return jnp.full(shape, -10.0, jnp.float32)
        if name.endswith("scale"):
            return jnp.ones(shape, jnp.float32)
        if name.endswith("bias"):
            return jnp.zeros(shape, jnp.float32)
        if name.endswith("kernel"):
            std = 1.0 / math.sqrt(math.prod(shape[: _fan_in_axes(name)]))
        else:  # embeddings and the MAP probe
            std = 1.0 / math.sqrt(shape[-1])
        noise = rng.standard_normal(shape, dtype=np.float32)
        return jnp.asarray(noise * np.float32(std))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def param_shapes(model: SigLIP) -> dict:
    """The nested tree of `jax.ShapeDtypeStruct`s `model` expects, without
    allocating anything."""
    images, tokens = dummy_inputs(model)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)
    return variables["params"]


def resize_posemb(posemb: Array, grid_size: int) -> Array:
    """Resizes a (1, g*g, D) position embedding to (1, grid_size**2, D).

    Bilinear, as big_vision does; a same-size resize returns `posemb` itself,
    untouched.

    Args:
      posemb: (1, g*g, D) position embedding of a square g x g patch grid.
      grid_size: the new grid side.

    Returns:
      (1, grid_size**2, D) array of `posemb`'s dtype.
    """
    _, length, width = posemb.shape
    old = math.isqrt(length)
    if old * old != length:
        raise ValueError(
            f"position embedding of {length} positions is not a square grid"
        )
    if old == grid_size:
        return posemb
    grid = jnp.reshape(posemb, (old, old, width)).astype(jnp.float32)
    grid = jax.image.resize(grid, (grid_size, grid_size, width), method="bilinear")
    return jnp.reshape(grid, (1, grid_size * grid_size, width)).astype(posemb.dtype)


def load(
    path: str | os.PathLike,
    variant: str | None = None,
    dtype: DType = jnp.float32,
    *,
    image_size: int | None = None,
) -> tuple[SigLIP, dict]:
    """Loads a SigLIP checkpoint, reading its architecture from the file.

    Args:
      path: a big_vision .npz file, a Hugging Face SigLIP folder
        (config.json + model.safetensors, single-file or sharded), or an
        orbax directory written by `checkpoints.save_orbax`.
      variant: optional variant name ("So400m/14", ...) checked against what
        the checkpoint holds; a disagreement raises `CheckpointError`.
      dtype: matmul dtype of the returned model; parameters stay float32.
      image_size: run the model at this resolution, resizing the image
        position embedding bilinearly; defaults to the checkpoint's.

    Returns:
      (model, params) with params a nested dict of float32 jax arrays.

    Raises:
      CheckpointError (a ValueError): unreadable file, or parameters missing,
        extra or of the wrong shape (the message names each).
    """
    from core_jax import checkpoints

    flat, config = checkpoints.load_flat(path)
    if variant is not None:
        checkpoints.check_variant(config, variant, source=os.fspath(path))

    if image_size is not None and image_size != config.image_size:
        grid = image_size // config.patch_size
        flat["img/pos_embedding"] = np.asarray(
            resize_posemb(flat["img/pos_embedding"], grid)
        )
        config = dataclasses.replace(config, image_size=image_size)

    model = SigLIP(config, dtype=dtype)
    params = checkpoints.to_params(flat, model, source=os.fspath(path))
    return model, params
