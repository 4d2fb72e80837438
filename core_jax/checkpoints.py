"""SigLIP checkpoints: big_vision .npz, Hugging Face folders, orbax.

Everything is converted to one layout, big_vision's flat "/"-joined names
(`img/Transformer/encoderblock_0/LayerNorm_0/scale`, ...; see
`core_jax.models.siglip`), and the architecture is read from the arrays'
shapes, so any SigLIP-shaped checkpoint loads, not only the named variants.

Files are untrusted: .npz files are read with `allow_pickle=False` (an object
array is refused, never unpickled), safetensors hold raw tensors only, and
every problem is a `CheckpointError` (a ValueError) naming the file, the
parameter, its shape and the shape that was expected.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from core_jax.models import siglip
from core_jax.safetensors_files import CheckpointError, SafetensorsCheckpoint

__all__ = [
    "CheckpointError",
    "ParameterMismatchError",
    "check_variant",
    "flatten",
    "infer_config",
    "load_flat",
    "read_hf",
    "read_npz",
    "restore_orbax",
    "save_npz",
    "save_orbax",
    "to_params",
    "unflatten",
]

# Prefixes under which big_vision trainers store the model's parameters.
_NPZ_PREFIXES = ("params/", "opt/target/")


class ParameterMismatchError(CheckpointError):
    """Parameters are missing, extra, or shaped unlike the model expects."""


# ---------------------------------------------------------------------------
# Flat <-> nested trees.


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, object]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}}."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# ---------------------------------------------------------------------------
# big_vision .npz


_NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a big_vision .npz into flat big_vision names.

    A `params/` or `opt/target/` prefix is removed, and a checkpoint saved
    with scanned layers (`Transformer/encoderblock/...` stacked along a
    leading depth axis) is unrolled into `encoderblock_{i}`.

    Args:
      path: the .npz file.

    Returns:
      {name: array} as stored (any float dtype).

    Raises:
      CheckpointError: not a readable .npz, truncated, or holding pickled
        objects.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(6)
    # NumPy takes anything that is neither a zip archive nor a .npy array for
    # a pickle, and its refusal suggests unpickling it; say what we do instead.
    if not (magic.startswith(b"PK") or magic == _NPY_MAGIC):
        raise CheckpointError(
            f"{path}: not a valid .npz file (it starts with bytes {magic!r}, not "
            "a zip archive); NumPy would read it as a pickled object, which is "
            "never loaded"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        reason = str(error)
        if "pickle" in reason:
            reason = "it holds a pickled object, which is never loaded"
        raise CheckpointError(
            f"{path}: not a readable .npz file ({reason}); it may be truncated"
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: holds a single array, not an .npz archive")

    flat = {}
    with archive:
        for name in archive.files:
            try:
                flat[name] = archive[name]
            except ValueError as error:
                if "allow_pickle" in str(error) or "Object arrays" in str(error):
                    raise CheckpointError(
                        f"{path}: array {name!r} holds pickled Python objects, "
                        "which are never loaded (they can run arbitrary code); "
                        "expected numeric arrays only"
                    ) from error
                raise CheckpointError(
                    f"{path}: array {name!r} cannot be read ({error})"
                ) from error
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
                raise CheckpointError(
                    f"{path}: array {name!r} cannot be read ({error}); the file "
                    "may be truncated"
                ) from error

    flat = _strip_prefix(flat)
    return _unroll_scanned_layers(flat)


def _strip_prefix(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in _NPZ_PREFIXES:
        if any(name.startswith(prefix) for name in flat):
            # Trainer checkpoints also hold optimiser state; keep the model.
            return {
                name[len(prefix) :]: value
                for name, value in flat.items()
                if name.startswith(prefix)
            }
    return flat


def _unroll_scanned_layers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    unrolled = {}
    for name, value in flat.items():
        parts = name.split("/")
        if "encoderblock" not in parts:
            unrolled[name] = value
            continue
        where = parts.index("encoderblock")
        for i, layer in enumerate(value):
            parts[where] = f"encoderblock_{i}"
            unrolled["/".join(parts)] = layer
    return unrolled


def save_npz(params: Mapping, path: str | os.PathLike) -> None:
    """Writes parameters as a big_vision .npz (flat "/"-joined names).

    Args:
      params: nested parameter dict (what `siglip.load` returns).
      path: output file; written to a temporary name first and renamed, so an
        interrupted write never leaves a truncated checkpoint behind.
    """
    path = os.fspath(path)
    flat = {
        name: _storable(np.asarray(value)) for name, value in flatten(params).items()
    }
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)
    logging.info("wrote %d arrays to %s", len(flat), path)


# ---------------------------------------------------------------------------
# Hugging Face SigLIP folders


def _storable(value: np.ndarray) -> np.ndarray:
    # NumPy's .npy format has no bfloat16 (it would be written as opaque
    # 2-byte records); float32 holds every bfloat16 value exactly.
    if value.dtype.kind == "V" or value.dtype.name == "bfloat16":
        return value.astype(np.float32)
    return value


_HF_LAYER = re.compile(
    r"^(vision|text)_model\.encoder\.layers\.(\d+)\.(self_attn|layer_norm1|"
    r"layer_norm2|mlp)\.(.+)\.(weight|bias)$"
)


def read_hf(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Reads a Hugging Face `SiglipModel` folder into big_vision's flat names.

    Linear weights (out, in) become Dense kernels (in, out); attention
    projections become (D, heads, head_dim) and (heads, head_dim, D) kernels,
    with the number of heads taken from config.json (the tensors' shapes do
    not carry it); the MAP head's packed `in_proj` is split into query, key
    and value; the patch convolution (D, 3, p, p) becomes (p, p, 3, D).

    Args:
      folder: holds config.json and model.safetensors (or a sharded
        model.safetensors.index.json with its shards).

    Returns:
      ({big_vision name: float32 array}, the parsed config.json).

    Raises:
      CheckpointError: missing or unsupported config, unreadable shards,
        unknown or missing tensors.
    """
    folder = os.fspath(folder)
    hf_config = _read_hf_config(folder)
    heads = {
        "vision": int(hf_config["vision_config"]["num_attention_heads"]),
        "text": int(hf_config["text_config"]["num_attention_heads"]),
    }

    with SafetensorsCheckpoint(folder) as checkpoint:
        source = {name: checkpoint.get(name) for name in checkpoint.names}
    source = {
        name: np.asarray(value, np.float32)
        for name, value in source.items()
        if not name.endswith("position_ids")  # index buffers, not parameters
    }
    flat, used = _map_hf(source, heads, folder)

    unused = sorted(set(source) - used)
    if unused:
        details = ", ".join(f"{n} {source[n].shape}" for n in unused[:10])
        raise ParameterMismatchError(
            f"{folder}: {len(unused)} tensors are not part of a SigLIP model: {details}"
        )
    return flat, hf_config


def _read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{folder}: config.json is missing; a Hugging Face SigLIP folder needs "
            "it for the number of attention heads"
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        vision, text = config["vision_config"], config["text_config"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path}: expected JSON with 'vision_config' and 'text_config' ({error})"
        ) from error

    for tower, sub in (("vision_config", vision), ("text_config", text)):
        if "num_attention_heads" not in sub:
            raise CheckpointError(f"{path}: {tower}.num_attention_heads is missing")
        act = sub.get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise CheckpointError(
                f"{path}: {tower}.hidden_act is {act!r}; SigLIP uses the "
                "tanh-approximated GELU ('gelu_pytorch_tanh')"
            )
        eps = float(sub.get("layer_norm_eps", 1e-6))
        if eps != 1e-6:
            raise CheckpointError(
                f"{path}: {tower}.layer_norm_eps is {eps}; expected 1e-06"
            )
    if not vision.get("vision_use_head", True):
        raise CheckpointError(
            f"{path}: vision_config.vision_use_head is false; only SigLIP image "
            "towers with a MAP head are supported"
        )
    return config


def _linear(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight.T)


def _qkv_kernel(weight: np.ndarray, heads: int) -> np.ndarray:
    out_features, in_features = weight.shape
    return np.ascontiguousarray(weight.T.reshape(in_features, heads, -1))


def _out_kernel(weight: np.ndarray, heads: int) -> np.ndarray:
    out_features, in_features = weight.shape
    return np.ascontiguousarray(weight.T.reshape(heads, -1, out_features))


def _map_hf(
    source: dict[str, np.ndarray], heads: dict[str, int], folder: str
) -> tuple[dict[str, np.ndarray], set[str]]:
    flat: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in source:
            raise ParameterMismatchError(
                f"{folder}: tensor {name!r} is missing from the checkpoint"
            )
        used.add(name)
        return source[name]

    def attention(prefix: str, hf: str, n_heads: int) -> None:
        for ours, theirs in (
            ("query", "q_proj"),
            ("key", "k_proj"),
            ("value", "v_proj"),
        ):
            flat[f"{prefix}/{ours}/kernel"] = _qkv_kernel(
                take(f"{hf}.{theirs}.weight"), n_heads
            )
            flat[f"{prefix}/{ours}/bias"] = take(f"{hf}.{theirs}.bias").reshape(
                n_heads, -1
            )
        flat[f"{prefix}/out/kernel"] = _out_kernel(
            take(f"{hf}.out_proj.weight"), n_heads
        )
        flat[f"{prefix}/out/bias"] = take(f"{hf}.out_proj.bias")

    def layer_norm(prefix: str, hf: str) -> None:
        flat[f"{prefix}/scale"] = take(f"{hf}.weight")
        flat[f"{prefix}/bias"] = take(f"{hf}.bias")

    def dense(prefix: str, hf: str) -> None:
        flat[f"{prefix}/kernel"] = _linear(take(f"{hf}.weight"))
        flat[f"{prefix}/bias"] = take(f"{hf}.bias")

    def mlp(prefix: str, hf: str) -> None:
        dense(f"{prefix}/Dense_0", f"{hf}.fc1")
        dense(f"{prefix}/Dense_1", f"{hf}.fc2")

    def blocks(tower: str, ours: str) -> None:
        indices = sorted(
            {
                int(m.group(2))
                for m in map(_HF_LAYER.match, source)
                if m and m.group(1) == tower
            }
        )
        if indices != list(range(len(indices))):
            raise ParameterMismatchError(
                f"{folder}: {tower} layers are numbered {indices}; expected "
                f"0..{len(indices) - 1} with none missing"
            )
        for i in indices:
            hf = f"{tower}_model.encoder.layers.{i}"
            block = f"{ours}/encoderblock_{i}"
            layer_norm(f"{block}/LayerNorm_0", f"{hf}.layer_norm1")
            attention(
                f"{block}/MultiHeadDotProductAttention_0",
                f"{hf}.self_attn",
                heads[tower],
            )
            layer_norm(f"{block}/LayerNorm_1", f"{hf}.layer_norm2")
            mlp(f"{block}/MlpBlock_0", f"{hf}.mlp")

    # Image tower.
    conv = take("vision_model.embeddings.patch_embedding.weight")
    flat["img/embedding/kernel"] = np.ascontiguousarray(conv.transpose(2, 3, 1, 0))
    flat["img/embedding/bias"] = take("vision_model.embeddings.patch_embedding.bias")
    flat["img/pos_embedding"] = take(
        "vision_model.embeddings.position_embedding.weight"
    )[None]
    blocks("vision", "img/Transformer")
    layer_norm("img/Transformer/encoder_norm", "vision_model.post_layernorm")

    head = "vision_model.head"
    flat["img/MAPHead_0/probe"] = take(f"{head}.probe")
    packed_w = take(f"{head}.attention.in_proj_weight")
    packed_b = take(f"{head}.attention.in_proj_bias")
    width = packed_w.shape[1]
    n_heads = heads["vision"]
    for i, ours in enumerate(("query", "key", "value")):
        rows = slice(i * width, (i + 1) * width)
        prefix = f"img/MAPHead_0/MultiHeadDotProductAttention_0/{ours}"
        flat[f"{prefix}/kernel"] = _qkv_kernel(packed_w[rows], n_heads)
        flat[f"{prefix}/bias"] = packed_b[rows].reshape(n_heads, -1)
    prefix = "img/MAPHead_0/MultiHeadDotProductAttention_0/out"
    flat[f"{prefix}/kernel"] = _out_kernel(
        take(f"{head}.attention.out_proj.weight"), n_heads
    )
    flat[f"{prefix}/bias"] = take(f"{head}.attention.out_proj.bias")
    layer_norm("img/MAPHead_0/LayerNorm_0", f"{head}.layernorm")
    mlp("img/MAPHead_0/MlpBlock_0", f"{head}.mlp")

    # Text tower.
    flat["txt/Embed_0/embedding"] = take("text_model.embeddings.token_embedding.weight")
    flat["txt/pos_embedding"] = take("text_model.embeddings.position_embedding.weight")[
        None
    ]
    blocks("text", "txt/Encoder_0")
    layer_norm("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
    dense("txt/head", "text_model.head")

    # HF stores the log-temperature as `logit_scale`, as big_vision's `t`.
    flat["t"] = take("logit_scale").reshape(1)
    flat["b"] = take("logit_bias").reshape(1)
    return flat, used


# ---------------------------------------------------------------------------
# Architecture from shapes


def _shape(flat: Mapping[str, np.ndarray], name: str, ndim: int, source: str):
    if name not in flat:
        raise ParameterMismatchError(f"{source}: parameter {name!r} is missing")
    shape = tuple(flat[name].shape)
    if len(shape) != ndim:
        raise ParameterMismatchError(
            f"{source}: parameter {name!r} has shape {shape}; expected {ndim} axes"
        )
    return shape


def _tower(flat, encoder: str, source: str) -> tuple[int, int, int, int]:
    """(width, depth, mlp_dim, heads) of the encoder under `encoder`."""
    pattern = re.compile(re.escape(encoder) + r"/encoderblock_(\d+)/")
    depth = len({m.group(1) for m in map(pattern.match, flat) if m})
    if depth == 0:
        raise ParameterMismatchError(
            f"{source}: no {encoder}/encoderblock_* parameters found"
        )
    block = f"{encoder}/encoderblock_0"
    width, heads, _ = _shape(
        flat, f"{block}/MultiHeadDotProductAttention_0/query/kernel", 3, source
    )
    _, mlp_dim = _shape(flat, f"{block}/MlpBlock_0/Dense_0/kernel", 2, source)
    return width, depth, mlp_dim, heads


def infer_config(
    flat: Mapping[str, np.ndarray], source: str = "checkpoint"
) -> siglip.SigLIPConfig:
    """Reads the architecture from big_vision-named arrays' shapes.

    Widths, depths, MLP sizes and heads come from the attention and MLP
    kernels, patch size from the patch embedding, image size from the
    position embedding's grid, vocabulary and text length from the text
    embeddings, the embedding size from the text head.

    Args:
      flat: {big_vision name: array}.
      source: the file, for error messages.

    Returns:
      The `SigLIPConfig` the arrays describe.
    """
    patch, patch_w, channels, image_width = _shape(
        flat, "img/embedding/kernel", 4, source
    )
    if patch != patch_w or channels != 3:
        raise ParameterMismatchError(
            f"{source}: parameter 'img/embedding/kernel' has shape "
            f"{(patch, patch_w, channels, image_width)}; expected (p, p, 3, D)"
        )
    _, positions, _ = _shape(flat, "img/pos_embedding", 3, source)
    grid = int(round(positions**0.5))
    if grid * grid != positions:
        raise ParameterMismatchError(
            f"{source}: 'img/pos_embedding' has {positions} positions, not a "
            "square grid"
        )
    i_width, i_depth, i_mlp, i_heads = _tower(flat, "img/Transformer", source)
    t_width, t_depth, t_mlp, t_heads = _tower(flat, "txt/Encoder_0", source)
    vocab, _ = _shape(flat, "txt/Embed_0/embedding", 2, source)
    _, text_length, _ = _shape(flat, "txt/pos_embedding", 3, source)
    _, embed_dim = _shape(flat, "txt/head/kernel", 2, source)
    image_head = None
    if "img/head/kernel" in flat:
        _, image_head = _shape(flat, "img/head/kernel", 2, source)

    try:
        return siglip.SigLIPConfig(
            image_width=i_width,
            image_depth=i_depth,
            image_mlp_dim=i_mlp,
            image_heads=i_heads,
            patch_size=patch,
            image_size=_image_size(grid, patch),
            text_width=t_width,
            text_depth=t_depth,
            text_mlp_dim=t_mlp,
            text_heads=t_heads,
            vocab_size=vocab,
            text_length=text_length,
            embed_dim=embed_dim,
            image_head_dim=image_head,
        )
    except ValueError as error:
        raise ParameterMismatchError(f"{source}: {error}") from error


def _image_size(grid: int, patch: int) -> int:
    """The input side for a grid of patches: a released resolution when one
    gives this grid (So400m/14 at 384 px has a 27 x 27 grid), else grid * patch.
    """
    for size in siglip.IMAGE_SIZES:
        if size // patch == grid:
            return size
    return grid * patch


_CHECKED_FIELDS = (
    ("image_width", "image width"),
    ("image_depth", "image depth"),
    ("image_mlp_dim", "image MLP size"),
    ("image_heads", "image heads"),
    ("patch_size", "patch size"),
    ("text_width", "text width"),
    ("text_depth", "text depth"),
    ("text_mlp_dim", "text MLP size"),
    ("text_heads", "text heads"),
    ("embed_dim", "embedding size"),
)


def check_variant(
    config: siglip.SigLIPConfig, variant: str, source: str = "checkpoint"
) -> None:
    """Raises `ParameterMismatchError` where `config` differs from `variant`.

    The image size is checked only when the name gives one ("B/16@384");
    vocabulary and text length are the checkpoint's to choose.
    """
    expected = siglip.variant_config(variant, config.image_size)
    fields = list(_CHECKED_FIELDS)
    if "@" in variant:
        fields.append(("image_size", "image size"))
    problems = [
        f"{label} {getattr(config, field)} but variant {variant} expects "
        f"{getattr(expected, field)}"
        for field, label in fields
        if getattr(config, field) != getattr(expected, field)
    ]
    if problems:
        raise ParameterMismatchError(f"{source}: checkpoint has " + "; ".join(problems))


# ---------------------------------------------------------------------------
# Loading and checking


def load_flat(
    path: str | os.PathLike,
) -> tuple[dict[str, np.ndarray], siglip.SigLIPConfig]:
    """Reads a .npz file, an HF folder or an orbax directory.

    Returns (flat arrays, architecture).

    Non-finite values are reported with a `RuntimeWarning` naming the
    parameters (the checkpoint still loads: it may be a deliberate test).
    """
    path = os.fspath(path)
    if is_orbax(path):
        params = restore_orbax(path)
        flat = {n: np.asarray(v) for n, v in flatten(params).items()}
        hf_config, kind = None, "orbax checkpoint"
    elif os.path.isdir(path):
        flat, hf_config = read_hf(path)
        kind = "Hugging Face folder"
    else:
        flat, hf_config = read_npz(path), None
        kind = "big_vision .npz"

    config = infer_config(flat, source=path)
    if hf_config is not None:
        _check_hf_config(config, hf_config, path)
    _warn_non_finite(flat, path)
    logging.info(
        "loaded %s %s: image %d/%d@%d (width %d, depth %d), text width %d depth "
        "%d, vocab %d, length %d, embedding %d",
        kind,
        path,
        config.image_width,
        config.patch_size,
        config.image_size,
        config.image_width,
        config.image_depth,
        config.text_width,
        config.text_depth,
        config.vocab_size,
        config.text_length,
        config.embed_dim,
    )
    return flat, config


def _check_hf_config(config: siglip.SigLIPConfig, hf_config: dict, path: str) -> None:
    vision, text = hf_config["vision_config"], hf_config["text_config"]
    pairs = [
        ("vision_config.hidden_size", vision.get("hidden_size"), config.image_width),
        (
            "vision_config.num_hidden_layers",
            vision.get("num_hidden_layers"),
            config.image_depth,
        ),
        (
            "vision_config.intermediate_size",
            vision.get("intermediate_size"),
            config.image_mlp_dim,
        ),
        ("vision_config.patch_size", vision.get("patch_size"), config.patch_size),
        ("vision_config.image_size", vision.get("image_size"), config.image_size),
        ("text_config.hidden_size", text.get("hidden_size"), config.text_width),
        (
            "text_config.num_hidden_layers",
            text.get("num_hidden_layers"),
            config.text_depth,
        ),
        (
            "text_config.intermediate_size",
            text.get("intermediate_size"),
            config.text_mlp_dim,
        ),
        ("text_config.vocab_size", text.get("vocab_size"), config.vocab_size),
        (
            "text_config.max_position_embeddings",
            text.get("max_position_embeddings"),
            config.text_length,
        ),
    ]
    for key, stated, actual in pairs:
        if stated is not None and int(stated) != actual:
            raise ParameterMismatchError(
                f"{path}: config.json gives {key} = {stated} but the tensors "
                f"have {actual}"
            )


def _warn_non_finite(flat: Mapping[str, np.ndarray], source: str) -> None:
    bad = [
        name
        for name, value in flat.items()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()
    ]
    if bad:
        message = (
            f"{source}: {len(bad)} parameters hold NaN or inf values: "
            + ", ".join(sorted(bad)[:20])
        )
        logging.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def to_params(
    flat: Mapping[str, np.ndarray], model: siglip.SigLIP, source: str = "checkpoint"
) -> dict:
    """Checks flat arrays against `model`'s parameters; returns them nested.

    Args:
      flat: {big_vision name: array}.
      model: the `SigLIP` the parameters are for.
      source: the file, for error messages.

    Returns:
      Nested dict of float32 jax arrays.

    Raises:
      ParameterMismatchError: naming each missing, extra or mis-shaped
        parameter with its shape and the expected shape.
    """
    expected = {
        name: tuple(value.shape)
        for name, value in flatten(siglip.param_shapes(model)).items()
    }
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    wrong = sorted(
        name
        for name in set(expected) & set(flat)
        if tuple(flat[name].shape) != expected[name]
    )
    problems = (
        [f"parameter {n!r} is missing (expected shape {expected[n]})" for n in missing]
        + [
            f"parameter {n!r} with shape {tuple(flat[n].shape)} is not part of "
            "the model"
            for n in extra
        ]
        + [
            f"parameter {n!r} has shape {tuple(flat[n].shape)} but the model "
            f"expects {expected[n]}"
            for n in wrong
        ]
    )
    if problems:
        shown = "; ".join(problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ParameterMismatchError(f"{source}: {shown}{more}")

    for name, value in flat.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise ParameterMismatchError(
                f"{source}: parameter {name!r} has dtype {value.dtype}; expected "
                "floating point"
            )
    return unflatten(
        {name: jnp.asarray(value, jnp.float32) for name, value in flat.items()}
    )


# ---------------------------------------------------------------------------
# orbax


def is_orbax(path: str | os.PathLike) -> bool:
    """Whether `path` is an orbax checkpoint directory (it has orbax's
    metadata file and no HF config.json)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")) and not (
        os.path.exists(os.path.join(path, "config.json"))
    )


def save_orbax(params: Mapping, directory: str | os.PathLike) -> None:
    """Saves a parameter tree (any shardings) as an orbax checkpoint.

    Args:
      params: nested dict of jax or NumPy arrays.
      directory: must not exist yet; made absolute, as orbax requires.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, params)
    checkpointer.wait_until_finished()
    logging.info("wrote orbax checkpoint %s", directory)


def restore_orbax(
    directory: str | os.PathLike,
    target: Mapping | None = None,
    *,
    sharding: jax.sharding.Sharding | None = None,
) -> dict:
    """Restores an orbax checkpoint onto the devices of this process.

    The target shapes and shardings are always passed to orbax explicitly, so
    arrays saved across 8 devices restore on 1 (or any other layout) instead
    of on the devices recorded in the checkpoint.

    Args:
      directory: written by `save_orbax`.
      target: optional nested tree of arrays or `jax.ShapeDtypeStruct`s whose
        shapes, dtypes and shardings to restore into; by default the shapes
        and dtypes recorded in the checkpoint.
      sharding: the sharding for every array when `target` has none (or is
        not given); defaults to the first local device.

    Returns:
      Nested dict of jax arrays.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such orbax checkpoint directory")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    checkpointer = ocp.StandardCheckpointer()

    if target is None:
        try:
            metadata = checkpointer.metadata(directory).item_metadata.tree
        except (FileNotFoundError, ValueError) as error:
            raise CheckpointError(
                f"{directory}: not a readable orbax checkpoint ({error})"
            ) from error
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
            metadata,
        )
    else:
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(
                a.shape, a.dtype, sharding=getattr(a, "sharding", None) or sharding
            ),
            target,
        )
    restored = checkpointer.restore(directory, target)
    logging.info("restored orbax checkpoint %s", directory)
    return restored
