"""A decoder-only LLM text embedder (Mistral / Llama family) in Flax.

CoRE's text-to-text retrieval encodes class prompts and captions with an LLM
embedder; the paper uses Salesforce SFR-Embedding-Mistral, a Mistral-7B
whose embedding is the final hidden state at the last token, L2-normalised,
with queries prefixed by an instruction ("Instruct: {task}\\nQuery: {query}")
and documents encoded as they are.

The network: token embedding, `num_hidden_layers` pre-norm decoder blocks
(RMSNorm, grouped-query self-attention with rotary positions, RMSNorm,
SwiGLU MLP), a final RMSNorm. Attention is causal, restricted to non-padding
keys and, when the config has one, to a sliding window. Position ids come
from the cumulative sum of the padding mask, so a row's embedding does not
depend on which side it is padded on.

Parameter names follow the Hugging Face checkpoints ("layers.3.mlp.up_proj.
weight" is `params["layers_3"]["mlp"]["up_proj"]["weight"]`) and matrices
keep their (out, in) layout, so loading needs no renaming or transposing.

    model, params = text_embedder.load(folder, dtype=jnp.bfloat16)
    emb = model.apply({"params": params}, ids, mask)      # (N, D), unit norm
    encoder = text_embedder.Encoder(folder)               # TextEncoder protocol
    captions_emb = encoder.encode(captions)               # documents, no prefix
    queries_emb = encoder.for_queries(task).encode(prompts)

Limitations: attention materialises the (N, heads, L, L) score tensor in
float32 (about 1 GiB per layer for 32 rows of 512 tokens with 32 heads), so
long texts need small batches; only the default rotary embedding is
implemented (configs with rotary scaling such as Llama 3's are refused).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from core_jax import sharding
from core_jax.safetensors_files import CheckpointError, SafetensorsCheckpoint

CONFIG_FILE = "config.json"
SUPPORTED_MODEL_TYPES = ("mistral", "llama")

# SFR-Embedding-Mistral's query format; documents carry no instruction.
DEFAULT_QUERY_FORMAT = "Instruct: {task}\nQuery: {query}"
DEFAULT_TASK = (
    "Given a web search query, retrieve relevant passages that answer the query"
)

# Checkpoint tensors that an embedder has no use for: the language-model head
# of a *ForCausalLM checkpoint, and rotary tables some old exports saved.
_IGNORED_TENSORS = re.compile(r"^(lm_head\.weight|.*rotary_emb\.inv_freq)$")


class ConfigError(ValueError):
    """A config.json describes a model this embedder cannot run."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The architecture of a Mistral/Llama decoder, read from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "mistral"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config") -> Config:
        """Reads and checks a Hugging Face config dict.

        Args:
          hf: the parsed config.json.
          source: where it came from, for error messages.

        Returns:
          The Config. Raises ConfigError for architectures this module does
          not implement (another model type, activation or rotary scaling).
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"expected one of {SUPPORTED_MODEL_TYPES}"
            )
        activation = hf.get("hidden_act", "silu")
        if activation != "silu":
            raise ConfigError(
                f"{source}: hidden_act {activation!r} is not supported; "
                "expected 'silu' (SwiGLU)"
            )

        # transformers >= 5 writes {"rope_parameters": {"rope_theta": ...}};
        # older exports have a top-level rope_theta and optional rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"{source}: rotary scaling {rope_type!r} is not supported; "
                "only the default rotary embedding is implemented"
            )
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))

        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            window = hf.get("sliding_window") if model_type == "mistral" else None
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                sliding_window=None if window is None else int(window),
                attention_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                model_type=model_type,
            )
        except KeyError as error:
            raise ConfigError(f"{source}: missing required key {error}") from error

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a "
                f"multiple of num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary")


# ----------------------------------------------------------------------------
# The network.


class Linear(nn.Module):
    """y = x W^T (+ b) with W stored (out, in), as the checkpoints store it."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        weight = self.param("weight", init, (self.features, x.shape[-1]), self.dtype)
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), weight)
        if self.use_bias:
            y = y + self.param(
                "bias", nn.initializers.zeros, (self.features,), self.dtype
            )
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(
            jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps
        )
        return weight * x32.astype(self.dtype)


def rotary_tables(
    positions: jax.Array, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """Cosine and sine tables for rotary position embedding, in float32.

    Always float32, whatever the model's dtype: bfloat16 has 8 mantissa bits,
    so integer positions above 256 (and the angles built from them) would be
    rounded, and tokens far into a caption would get their neighbours' angles.

    Args:
      positions: (N, L) integer positions.
      head_dim: the attention head width (even).
      theta: the rotary base (config's rope_theta).

    Returns:
      (cos, sin), each (N, L, head_dim) float32, the frequencies laid out
      twice ([f0..f_{d/2-1}, f0..f_{d/2-1}]) to match the rotate-half pairing.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inverse_frequency = 1.0 / (theta**exponents)
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequency
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates (N, L, heads, head_dim) `x` by the (N, L, head_dim) tables."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated_half * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(mask: jax.Array, sliding_window: int | None) -> jax.Array:
    """Which keys each query may attend to: causal, non-padding, in the window.

    Args:
      mask: (N, L) 1 for real tokens, 0 for padding.
      sliding_window: keys more than `sliding_window - 1` positions back are
        hidden (Mistral's convention); None for full causal attention.

    Returns:
      (N, 1, L, L) bool, [n, 0, query, key].
    """
    length = mask.shape[-1]
    query = jnp.arange(length)[:, None]
    key = jnp.arange(length)[None, :]
    allowed = key <= query
    if sliding_window is not None:
        allowed &= key > query - sliding_window
    return allowed[None, None] & (mask[:, None, None, :] > 0)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    config: Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, allowed):
        c = self.config
        batch, length, _ = x.shape
        groups = c.num_attention_heads // c.num_key_value_heads
        dense = lambda features, name: Linear(
            features, c.attention_bias, self.dtype, name=name
        )

        q = dense(c.num_attention_heads * c.head_dim, "q_proj")(x)
        k = dense(c.num_key_value_heads * c.head_dim, "k_proj")(x)
        v = dense(c.num_key_value_heads * c.head_dim, "v_proj")(x)
        q = q.reshape(batch, length, c.num_attention_heads, c.head_dim)
        k = k.reshape(batch, length, c.num_key_value_heads, c.head_dim)
        v = v.reshape(batch, length, c.num_key_value_heads, c.head_dim)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        # Query head h reads key/value head h // groups.
        q = q.reshape(batch, length, c.num_key_value_heads, groups, c.head_dim)
        scores = jnp.einsum(
            "nqhgd,nkhd->nhgqk", q, k, preferred_element_type=jnp.float32
        )
        scores = scores * (c.head_dim**-0.5)
        # A finite floor, not -inf: left-padding queries see no key at all, and
        # must give finite (ignored) rows rather than NaNs.
        scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("nhgqk,nkhd->nqhgd", weights, v)
        out = out.reshape(batch, length, c.num_attention_heads * c.head_dim)
        return dense(c.hidden_size, "o_proj")(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = Linear(c.intermediate_size, c.mlp_bias, self.dtype, name="gate_proj")(x)
        up = Linear(c.intermediate_size, c.mlp_bias, self.dtype, name="up_proj")(x)
        return Linear(c.hidden_size, c.mlp_bias, self.dtype, name="down_proj")(
            nn.silu(gate) * up
        )


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + MLP(norm(x))."""

    config: Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, allowed):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        x = x + Attention(c, self.dtype, name="self_attn")(h, cos, sin, allowed)
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(c, self.dtype, name="mlp")(h)


class Embedding(nn.Module):
    """Token embedding table (vocab_size, features), stored as "weight"."""

    vocab_size: int
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = self.param(
            "weight",
            nn.initializers.normal(0.02),
            (self.vocab_size, self.features),
            self.dtype,
        )
        return jnp.take(table, ids, axis=0)


def last_token_index(mask: jax.Array) -> jax.Array:
    """(N,) index of each row's last non-padding token, for either padding side."""
    length = mask.shape[-1]
    return length - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=-1)


class TextEmbedder(nn.Module):
    """Mistral/Llama decoder pooled at the last real token, L2-normalised.

    Attributes:
      config: the architecture.
      dtype: parameter and activation dtype (float32 or bfloat16); norms,
        softmax, rotary tables and the output are float32 regardless.
    """

    config: Config
    dtype: Any = jnp.float32

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Embeds token rows.

        Args:
          ids: (N, L) int32 token ids, padded on either side.
          mask: (N, L) 1 for real tokens, 0 for padding.

        Returns:
          (N, D) float32, unit-norm final hidden states at each row's last
          real token.
        """
        c = self.config
        mask = mask.astype(jnp.int32)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        cos, sin = rotary_tables(positions, c.head_dim, c.rope_theta)
        allowed = attention_mask(mask, c.sliding_window)

        x = Embedding(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")(ids)
        for i in range(c.num_hidden_layers):
            x = DecoderLayer(c, self.dtype, name=f"layers_{i}")(x, cos, sin, allowed)

        last = jnp.take_along_axis(x, last_token_index(mask)[:, None, None], axis=1)
        pooled = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(last[:, 0])
        return normalize(pooled.astype(jnp.float32))


def normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along the last axis."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps)


# ----------------------------------------------------------------------------
# Loading Hugging Face folders.


def read_config(folder: str | os.PathLike) -> Config:
    """Reads `folder/config.json` into a Config."""
    path = os.path.join(os.fspath(folder), CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: not found") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from error
    return Config.from_hf(hf, source=path)


def _as_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype {dtype} is not supported; use float32 or bfloat16")
    return dtype


def parameter_shapes(model: TextEmbedder) -> dict[str, tuple[int, ...]]:
    """Every parameter of `model` by its checkpoint name, with its shape."""
    abstract = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, 1), jnp.int32),
        jnp.ones((1, 1), jnp.int32),
    )["params"]
    flat = traverse_util.flatten_dict(abstract, sep=".")
    return {
        re.sub(r"^layers_(\d+)\.", r"layers.\1.", path): tuple(leaf.shape)
        for path, leaf in flat.items()
    }


def _checkpoint_name_map(names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Maps model parameter names to checkpoint names, and lists ignored ones.

    A *ForCausalLM checkpoint nests the decoder under "model."; a bare
    *Model checkpoint (SFR-Embedding-Mistral's) does not.
    """
    ignored = [name for name in names if _IGNORED_TENSORS.match(name)]
    kept = [name for name in names if not _IGNORED_TENSORS.match(name)]
    prefix = "model." if kept and all(n.startswith("model.") for n in kept) else ""
    return {name[len(prefix) :]: name for name in kept}, ignored


def _model_partition(name: str, shape: tuple[int, ...], model_size: int):
    """How parameter `name` is laid out over the "model" mesh axis.

    Column-parallel projections (q, k, v, gate, up) split their output rows,
    row-parallel ones (o, down) their input columns, the embedding its
    vocabulary; norms are replicated. A dimension that does not divide by the
    axis size stays whole.
    """
    model = sharding.MODEL
    if re.search(r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$", name):
        spec = [model] + [None] * (len(shape) - 1)
    elif re.search(r"(o_proj|down_proj)\.weight$", name):
        spec = [None, model]
    elif name == "embed_tokens.weight":
        spec = [model, None]
    else:
        return PartitionSpec()
    axis = spec.index(model)
    if shape[axis] % model_size:
        logging.warning(
            "%s: dimension %d of shape %s does not divide by model axis %d; replicated",
            name,
            axis,
            shape,
            model_size,
        )
        return PartitionSpec()
    return PartitionSpec(*spec)


def _check_tensors(
    folder: str,
    checkpoint: SafetensorsCheckpoint,
    expected: dict[str, tuple[int, ...]],
) -> dict[str, str]:
    """Matches checkpoint tensors to parameters by name and shape (headers only).

    Returns:
      parameter name -> checkpoint tensor name, one for every parameter.
    Raises CheckpointError naming every missing, unexpected and wrongly
    shaped tensor, before any tensor data is read.
    """
    by_name, ignored = _checkpoint_name_map(checkpoint.names)
    if ignored:
        logging.info("%s: ignoring %d tensors (%s)", folder, len(ignored), ignored[:3])

    missing = [f"{n} {expected[n]}" for n in expected if n not in by_name]
    unexpected = [
        f"{by_name[n]} {checkpoint.shape(by_name[n])}"
        for n in by_name
        if n not in expected
    ]
    wrong = []
    for name, shape in expected.items():
        if name in by_name:
            found = checkpoint.shape(by_name[name])
            if found != shape:
                wrong.append(f"{by_name[name]} has shape {found}, expected {shape}")

    problems = []
    for title, items in (
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("wrongly shaped tensors", wrong),
    ):
        if items:
            shown = "; ".join(items[:10])
            more = f" and {len(items) - 10} more" if len(items) > 10 else ""
            problems.append(f"{len(items)} {title}: {shown}{more}")
    if problems:
        raise CheckpointError(
            f"{folder}: checkpoint does not fit the config.json architecture: "
            + " | ".join(problems)
        )
    return {name: by_name[name] for name in expected}


def load(
    folder: str | os.PathLike,
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> tuple[TextEmbedder, dict]:
    """Loads a Hugging Face Mistral/Llama folder (config.json + safetensors).

    Tensors are read one at a time, converted to `dtype` and placed on device
    (sharded over the mesh's "model" axis when a mesh is given) before the
    next is read, and each file is unmapped after its read, so host memory
    holds at most one tensor beyond what the devices hold: a 7B model never
    needs two copies on the host.

    Args:
      folder: holds config.json and model.safetensors or a sharded
        model.safetensors.index.json.
      dtype: float32 or bfloat16, for parameters and activations.
      mesh: a ("batch", "model") mesh from `sharding.make_mesh`; None puts
        every parameter on the default device.
      progress: show a progress bar.

    Returns:
      (model, params), for `model.apply({"params": params}, ids, mask)`.
    """
    from tqdm import tqdm

    folder = os.fspath(folder)
    dtype = _as_dtype(dtype)
    config = read_config(folder)
    model = TextEmbedder(config, dtype)
    expected = parameter_shapes(model)

    checkpoint = SafetensorsCheckpoint(folder)
    try:
        source_of = _check_tensors(folder, checkpoint, expected)
        flat = {}
        model_size = mesh.shape[sharding.MODEL] if mesh is not None else 1
        for name in tqdm(
            source_of, desc="loading text embedder", unit="tensor", disable=not progress
        ):
            array = checkpoint.get(source_of[name])
            # Dropping the file maps after each read keeps the resident pages
            # of the checkpoint from adding up to a second copy of the model.
            checkpoint.close()
            array = np.asarray(array, dtype=dtype)
            if mesh is None:
                placed = jax.device_put(array)
            else:
                spec = _model_partition(name, array.shape, model_size)
                placed = jax.device_put(array, NamedSharding(mesh, spec))
            placed.block_until_ready()
            del array
            flat[tuple(_param_path(name))] = placed
    finally:
        checkpoint.close()

    params = traverse_util.unflatten_dict(flat)
    logging.info(
        "loaded text embedder from %s: %s, %d layers, width %d, %d heads "
        "(%d key/value), %.1fM parameters, %s",
        folder,
        config.model_type,
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        sum(int(np.prod(s)) for s in expected.values()) / 1e6,
        dtype.name,
    )
    return model, params


def _param_path(name: str) -> list[str]:
    return re.sub(r"^layers\.(\d+)\.", r"layers_\1.", name).split(".")


def init_random(model: TextEmbedder, seed: int = 0) -> dict:
    """Random parameters for `model` (tests and benchmarks)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return model.init(jax.random.key(seed), ids, jnp.ones_like(ids))["params"]


# ----------------------------------------------------------------------------
# Encoding text.


def _length_bucket(length: int, max_length: int, step: int = 32) -> int:
    """Rounds a batch's token length up, so jit compiles a handful of shapes."""
    return min(max_length, -(-length // step) * step)


class Encoder:
    """Encodes texts with an LLM embedder; implements the TextEncoder protocol.

    Texts are tokenized by the folder's own tokenizer (AutoTokenizer, local
    files only), EOS appended when the tokenizer does not add it itself (the
    last-token embedding is trained on EOS), padded on the tokenizer's
    padding side, sorted by length into batches, and embedded by one jitted
    function; results come back in the input order.

    Documents (captions) are encoded as they are; queries get an instruction
    through `for_queries(task)`, which returns an Encoder sharing the model.

    Attributes:
      name: "text_embedder:<folder name>" (plus the query task, if any).
      fingerprint: a hash of the config, tokenizer, checkpoint headers,
        dtype, maximum length and query instruction: it changes whenever the
        embeddings could.
      dim: embedding width.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        dtype=jnp.float32,
        mesh: Mesh | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        query_format: str = DEFAULT_QUERY_FORMAT,
        append_eos: bool | None = None,
    ):
        """Loads the model and tokenizer of `folder`.

        Args:
          folder: an HF folder with config.json, safetensors weights and a
            tokenizer (tokenizer.json or tokenizer.model + tokenizer_config).
          dtype: float32 or bfloat16.
          mesh: optional ("batch", "model") mesh: parameters sharded over
            "model", batches over "batch".
          batch_size: texts per jitted call (rounded up to the batch axis).
          max_length: tokens per text, EOS included; longer texts are cut.
          query_format: how `for_queries` builds a query, with {task} and
            {query} fields.
          append_eos: None to detect whether the tokenizer already ends rows
            with EOS; True/False to force.
        """
        from transformers import AutoTokenizer

        if "{query}" not in query_format or "{task}" not in query_format:
            raise ValueError(
                f"query_format {query_format!r} must contain {{task}} and {{query}}"
            )
        self.folder = os.fspath(folder)
        self.batch_size = batch_size
        self.max_length = max_length
        self.query_format = query_format
        self.task: str | None = None
        self.mesh = mesh

        self.model, self.params = load(self.folder, dtype=dtype, mesh=mesh)
        self.dim = self.model.dim
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.folder, local_files_only=True
        )
        if self.tokenizer.eos_token_id is None:
            raise ConfigError(f"{self.folder}: the tokenizer defines no EOS token")
        if append_eos is None:
            probe = self.tokenizer("a")["input_ids"]
            append_eos = not probe or probe[-1] != self.tokenizer.eos_token_id
        self.append_eos = append_eos
        logging.info(
            "text embedder tokenizer: %s, padding %s, EOS %s",
            type(self.tokenizer).__name__,
            self.tokenizer.padding_side,
            "appended here" if append_eos else "added by the tokenizer",
        )

        model = self.model
        self._embed = jax.jit(
            lambda params, ids, mask: model.apply({"params": params}, ids, mask)
        )
        self._folder_fingerprint = _folder_fingerprint(
            self.folder, jnp.dtype(dtype).name
        )
        self._set_identity()

    def _set_identity(self) -> None:
        self.name = f"text_embedder:{os.path.basename(os.path.normpath(self.folder))}"
        if self.task is not None:
            self.name += f":query({self.task})"
        query = None if self.task is None else [self.query_format, self.task]
        identity = [self._folder_fingerprint, self.max_length, query]
        self.fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()

    def for_queries(self, task: str = DEFAULT_TASK) -> Encoder:
        """An Encoder for queries, sharing this one's model and compiled calls.

        Its texts become `query_format.format(task=task, query=text)`.
        """
        queries = copy.copy(self)
        queries.task = task
        queries._set_identity()
        return queries

    def format(self, texts: Sequence[str]) -> list[str]:
        """The strings actually tokenized (with the instruction for queries)."""
        if self.task is None:
            return list(texts)
        return [self.query_format.format(task=self.task, query=t) for t in texts]

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask for already formatted texts.

        Returns:
          ids (N, L) int32 and mask (N, L) int32, padded on the tokenizer's
          padding side to the longest row rounded up to a multiple of 32.
        """
        room = self.max_length - (1 if self.append_eos else 0)
        rows = self.tokenizer(list(texts), truncation=True, max_length=room)[
            "input_ids"
        ]
        if self.append_eos:
            rows = [list(r) + [self.tokenizer.eos_token_id] for r in rows]
        length = _length_bucket(max(len(r) for r in rows), self.max_length)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        ids = np.full((len(rows), length), pad_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        left = self.tokenizer.padding_side == "left"
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if left else slice(0, len(row))
            ids[i, span] = row
            mask[i, span] = 1
        return ids, mask

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds texts.

        Args:
          texts: N strings (documents, or queries for a `for_queries` encoder).

        Returns:
          (N, D) float32, unit-norm rows in input order.
        """
        from tqdm import tqdm

        texts = self.format(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        lengths = [len(t) for t in texts]
        order = np.argsort(lengths, kind="stable")
        multiple = 1 if self.mesh is None else sharding.batch_size_multiple(self.mesh)
        batch_size = -(-self.batch_size // multiple) * multiple

        starts = range(0, len(texts), batch_size)
        for start in tqdm(
            starts, desc=self.name, unit="batch", disable=len(starts) < 10
        ):
            chosen = order[start : start + batch_size]
            ids, mask = self.tokenize([texts[i] for i in chosen])
            # A short last batch is padded to the full batch size so one
            # compiled shape serves every batch of a given length bucket.
            ids, n = sharding.pad_to_multiple(ids, batch_size)
            mask, _ = sharding.pad_to_multiple(mask, batch_size)
            if self.mesh is not None:
                placement = sharding.batch_sharding(self.mesh, 2)
                ids = jax.device_put(ids, placement)
                mask = jax.device_put(mask, placement)
            emb = self._embed(self.params, ids, mask)
            out[chosen] = np.asarray(emb, dtype=np.float32)[:n]
        return out


def _folder_fingerprint(folder: str, dtype_name: str) -> str:
    """A hash of what determines a folder's embeddings, cheap for a 7B model.

    Hashes config.json, the tokenizer files, the safetensors index, and for
    every weight file its header (names, shapes, dtypes, offsets) and three
    4 KiB windows (start, middle, end) of every tensor's bytes. Two
    checkpoints of one architecture with different weights differ in all
    of those windows; reading them costs a few MB, not the whole model.
    """
    window = 4096
    digest = hashlib.sha256(dtype_name.encode())
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            digest.update(name.encode())
            with open(path, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                header = f.read(header_size)
                digest.update(header)
                for tensor, entry in sorted(json.loads(header).items()):
                    if tensor == "__metadata__":
                        continue
                    begin, end = (8 + header_size + o for o in entry["data_offsets"])
                    middle = (begin + end) // 2
                    for offset in (begin, middle, max(begin, end - window)):
                        f.seek(offset)
                        digest.update(f.read(min(window, end - offset)))
        elif name.endswith((".json", ".model", ".txt")):
            with open(path, "rb") as f:
                digest.update(name.encode() + b":" + f.read())
    return digest.hexdigest()
