"""Parity of the Flax SigLIP towers with transformers' PyTorch SiglipModel.

A small SiglipModel with every parameter randomised is saved in the real
Hugging Face format; core_jax loads it (directly, sharded, and through a
big_vision .npz written here by an independent name mapping) and must give
the same normalised embeddings as PyTorch's `get_image_features` /
`get_text_features` on real photographs and real captions.

Tolerance: 1e-5 max abs in float32. Both sides compute the same float32
arithmetic in a different order (flax scales queries before the dot product,
PyTorch after; different matmul kernels), which moves unit-norm embeddings by
~1e-7..1e-6; a wrong mapping or layout moves them by ~1e-1.
"""

from __future__ import annotations

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
skimage = pytest.importorskip("skimage")
from PIL import Image  # noqa: E402

from core_jax import checkpoints  # noqa: E402
from core_jax.models import siglip  # noqa: E402

IMAGE_SIZE = 64
PATCH = 16
TEXT_LENGTH = 64
VOCAB = 300
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
)


def _hf_config():
    # Towers of different widths, depths and head counts, so a mix-up of any
    # of them cannot go unnoticed.
    return transformers.SiglipConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=TEXT_LENGTH,
            projection_size=64,
            pad_token_id=1,
            bos_token_id=1,
            eos_token_id=1,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
        ),
    )


def _randomised_model(seed: int = 0):
    """A SiglipModel whose every parameter (biases, LayerNorms too) is random,
    so that each one's mapping matters."""
    torch.manual_seed(seed)
    model = transformers.SiglipModel(_hf_config()).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name or "layernorm" in name:
                param.copy_(
                    1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise
                )
            else:
                param.copy_(0.1 * noise)
    return model


@pytest.fixture(scope="module")
def hf_model():
    return _randomised_model()


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_siglip")
    hf_model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """Real photographs from scikit-image's wheel, (N, 64, 64, 3) in [-1, 1]."""
    data_dir = pathlib.Path(skimage.__file__).parent / "data"
    batch = []
    for name in PHOTOS:
        image = Image.open(data_dir / name).convert("RGB")
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        batch.append(np.asarray(image, np.float32) / 127.5 - 1.0)
    return np.stack(batch)


@pytest.fixture(scope="module")
def caption_tokens(real_captions) -> np.ndarray:
    """Real captions as ids: a word-level vocabulary of the first captions'
    words (ids 2..VOCAB-1, unknown words hashed into it), EOS = pad = 1
    appended and padded to the full length, as SigLIP's tokenizer does."""
    captions = real_captions[:12]
    words = sorted({w for c in captions for w in re.findall(r"\w+", c.lower())})
    vocab = {w: 2 + i % (VOCAB - 2) for i, w in enumerate(words)}
    rows = []
    for caption in captions:
        ids = [vocab[w] for w in re.findall(r"\w+", caption.lower())]
        ids = ids[: TEXT_LENGTH - 1] + [1]
        rows.append(ids + [1] * (TEXT_LENGTH - len(ids)))
    return np.asarray(rows, np.int32)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output; older versions a tensor.
    return getattr(output, "pooler_output", output)


@pytest.fixture(scope="module")
def reference(hf_model, photos, caption_tokens):
    """PyTorch's normalised image and text embeddings (no attention mask)."""
    with torch.no_grad():
        pixels = torch.from_numpy(photos).permute(0, 3, 1, 2)
        image = _features(hf_model.get_image_features(pixel_values=pixels))
        text = _features(
            hf_model.get_text_features(
                input_ids=torch.from_numpy(caption_tokens).long()
            )
        )
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return image.numpy(), text.numpy()


def _big_vision_npz(hf_model, path, prefix=""):
    """Writes the PyTorch weights under big_vision's names, mapped here
    independently of core_jax's reader."""
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    out = {}

    def attn(dst, src, heads, packed=False):
        if packed:
            w, b = sd[f"{src}.in_proj_weight"], sd[f"{src}.in_proj_bias"]
            d = w.shape[1]
            parts = {
                "query": (w[:d], b[:d]),
                "key": (w[d : 2 * d], b[d : 2 * d]),
                "value": (w[2 * d :], b[2 * d :]),
            }
        else:
            parts = {
                n: (sd[f"{src}.{p}_proj.weight"], sd[f"{src}.{p}_proj.bias"])
                for n, p in (("query", "q"), ("key", "k"), ("value", "v"))
            }
        for n, (w, b) in parts.items():
            d = w.shape[1]
            out[f"{dst}/{n}/kernel"] = w.T.reshape(d, heads, d // heads)
            out[f"{dst}/{n}/bias"] = b.reshape(heads, -1)
        w = sd[f"{src}.out_proj.weight"]
        out[f"{dst}/out/kernel"] = w.T.reshape(heads, -1, w.shape[0])
        out[f"{dst}/out/bias"] = sd[f"{src}.out_proj.bias"]

    def ln(dst, src):
        out[f"{dst}/scale"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def mlp(dst, src):
        for i, fc in enumerate(("fc1", "fc2")):
            out[f"{dst}/Dense_{i}/kernel"] = sd[f"{src}.{fc}.weight"].T
            out[f"{dst}/Dense_{i}/bias"] = sd[f"{src}.{fc}.bias"]

    def encoder(dst, src, depth, heads):
        for i in range(depth):
            s, d = f"{src}.layers.{i}", f"{dst}/encoderblock_{i}"
            ln(f"{d}/LayerNorm_0", f"{s}.layer_norm1")
            attn(f"{d}/MultiHeadDotProductAttention_0", f"{s}.self_attn", heads)
            ln(f"{d}/LayerNorm_1", f"{s}.layer_norm2")
            mlp(f"{d}/MlpBlock_0", f"{s}.mlp")

    out["img/embedding/kernel"] = sd[
        "vision_model.embeddings.patch_embedding.weight"
    ].transpose(2, 3, 1, 0)
    out["img/embedding/bias"] = sd["vision_model.embeddings.patch_embedding.bias"]
    out["img/pos_embedding"] = sd["vision_model.embeddings.position_embedding.weight"][
        None
    ]
    encoder("img/Transformer", "vision_model.encoder", 2, 4)
    ln("img/Transformer/encoder_norm", "vision_model.post_layernorm")
    out["img/MAPHead_0/probe"] = sd["vision_model.head.probe"]
    attn(
        "img/MAPHead_0/MultiHeadDotProductAttention_0",
        "vision_model.head.attention",
        4,
        packed=True,
    )
    ln("img/MAPHead_0/LayerNorm_0", "vision_model.head.layernorm")
    mlp("img/MAPHead_0/MlpBlock_0", "vision_model.head.mlp")
    out["txt/Embed_0/embedding"] = sd["text_model.embeddings.token_embedding.weight"]
    out["txt/pos_embedding"] = sd["text_model.embeddings.position_embedding.weight"][
        None
    ]
    encoder("txt/Encoder_0", "text_model.encoder", 3, 2)
    ln("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
    out["txt/head/kernel"] = sd["text_model.head.weight"].T
    out["txt/head/bias"] = sd["text_model.head.bias"]
    out["t"], out["b"] = sd["logit_scale"], sd["logit_bias"]
    np.savez(path, **{prefix + k: np.ascontiguousarray(v) for k, v in out.items()})
    return path


_COMPILED: dict = {}


def _apply(model):
    """One jitted `model.apply` per architecture and dtype, shared by the tests
    so each input signature compiles once (the machine is small)."""
    key = (model.config, model.dtype)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(model.apply)
    return _COMPILED[key]


def _embed(model, params, photos, tokens):
    zimg, ztxt, out = _apply(model)({"params": params}, photos, tokens)
    return np.asarray(zimg), np.asarray(ztxt), out


def _assert_parity(model, params, photos, caption_tokens, reference):
    zimg, ztxt, _ = _embed(model, params, photos, caption_tokens)
    np.testing.assert_allclose(zimg, reference[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ztxt, reference[1], atol=1e-5, rtol=0)


def test_hf_folder_matches_pytorch(hf_folder, photos, caption_tokens, reference):
    model, params = siglip.load(hf_folder)
    _assert_parity(model, params, photos, caption_tokens, reference)


def test_sharded_hf_folder_loads_identically(
    hf_model, tmp_path, photos, caption_tokens, reference
):
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1

    model, params = siglip.load(tmp_path)
    _assert_parity(model, params, photos, caption_tokens, reference)


def test_bfloat16_hf_folder_matches_pytorch_on_the_same_weights(
    tmp_path, photos, caption_tokens
):
    """Weights stored as bfloat16 are widened exactly to float32; the
    reference is PyTorch in float32 on the same (bfloat16-rounded) weights."""
    hf = _randomised_model(seed=1).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    hf = hf.float()
    with torch.no_grad():
        pixels = torch.from_numpy(photos).permute(0, 3, 1, 2)
        image = _features(hf.get_image_features(pixel_values=pixels))
        text = _features(
            hf.get_text_features(input_ids=torch.from_numpy(caption_tokens).long())
        )
    reference = (
        (image / image.norm(dim=-1, keepdim=True)).numpy(),
        (text / text.norm(dim=-1, keepdim=True)).numpy(),
    )
    model, params = siglip.load(tmp_path)
    _assert_parity(model, params, photos, caption_tokens, reference)


@pytest.mark.parametrize("prefix", ["", "params/", "opt/target/"])
def test_big_vision_npz_matches_pytorch(
    hf_model, tmp_path, prefix, photos, caption_tokens, reference
):
    path = _big_vision_npz(hf_model, tmp_path / "siglip.npz", prefix)
    model, params = siglip.load(path)
    _assert_parity(model, params, photos, caption_tokens, reference)


def test_scanned_big_vision_npz_loads(
    hf_model, tmp_path, photos, caption_tokens, reference
):
    """Checkpoints saved with scanned layers stack the blocks along axis 0."""
    path = _big_vision_npz(hf_model, tmp_path / "loop.npz")
    flat = dict(np.load(path))
    scanned = {}
    for name, value in flat.items():
        m = re.match(r"(.*)/encoderblock_(\d+)/(.*)", name)
        if not m:
            scanned[name] = value
            continue
        key = f"{m.group(1)}/encoderblock/{m.group(3)}"
        scanned.setdefault(key, {})[int(m.group(2))] = value
    scanned = {
        k: np.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v
        for k, v in scanned.items()
    }
    np.savez(tmp_path / "scan.npz", **scanned)

    model, params = siglip.load(tmp_path / "scan.npz")
    _assert_parity(model, params, photos, caption_tokens, reference)


def test_architecture_is_read_from_the_checkpoint(hf_folder):
    model, _ = siglip.load(hf_folder)
    c = model.config
    assert (c.image_width, c.image_depth, c.image_mlp_dim, c.image_heads) == (
        64,
        2,
        128,
        4,
    )
    assert (c.text_width, c.text_depth, c.text_mlp_dim, c.text_heads) == (48, 3, 96, 2)
    assert (c.patch_size, c.image_size) == (16, 64)
    assert (model.vocab_size, model.text_length, model.embed_dim) == (300, 64, 64)


def test_logits_use_temperature_and_bias(hf_model, hf_folder, photos, caption_tokens):
    model, params = siglip.load(hf_folder)
    zimg, ztxt, out = _embed(model, params, photos, caption_tokens)
    scale = float(np.exp(hf_model.logit_scale.detach().numpy()[0]))
    bias = float(hf_model.logit_bias.detach().numpy()[0])
    np.testing.assert_allclose(
        np.asarray(out["logits"]), zimg @ ztxt.T * scale + bias, rtol=1e-5, atol=1e-5
    )


def test_either_tower_may_be_skipped(hf_folder, photos, caption_tokens, reference):
    model, params = siglip.load(hf_folder)
    zimg, ztxt, out = _apply(model)({"params": params}, photos, None)
    assert ztxt is None and "logits" not in out
    np.testing.assert_allclose(np.asarray(zimg), reference[0], atol=1e-5, rtol=0)

    zimg, ztxt, out = _apply(model)({"params": params}, None, caption_tokens)
    assert zimg is None
    np.testing.assert_allclose(np.asarray(ztxt), reference[1], atol=1e-5, rtol=0)


def test_bfloat16_matmuls_stay_close(hf_folder, photos, caption_tokens, reference):
    """bfloat16 has an 8-bit mantissa (relative error 2**-8 per rounding);
    through a few layers unit embeddings move by ~1e-2, so 5e-2 max abs and a
    cosine above 0.999 are the stated bounds."""
    model, params = siglip.load(hf_folder, dtype=jnp.bfloat16)
    zimg, ztxt, _ = _embed(model, params, photos, caption_tokens)
    assert zimg.dtype == np.float32 and ztxt.dtype == np.float32
    np.testing.assert_allclose(zimg, reference[0], atol=5e-2, rtol=0)
    np.testing.assert_allclose(ztxt, reference[1], atol=5e-2, rtol=0)
    assert np.min(np.sum(zimg * reference[0], -1)) > 0.999
    assert np.min(np.sum(ztxt * reference[1], -1)) > 0.999


def test_tokens_shorter_than_the_text_length_are_refused(hf_folder, caption_tokens):
    model, params = siglip.load(hf_folder)
    with pytest.raises(ValueError, match=r"expects \(N, 64\)"):
        model.apply({"params": params}, None, caption_tokens[:, :20])


def test_images_of_the_wrong_size_are_refused(hf_folder, photos):
    model, params = siglip.load(hf_folder)
    with pytest.raises(ValueError, match=r"expects \(N, 64, 64, 3\)"):
        model.apply({"params": params}, photos[:, :32, :32], None)


def test_named_variant_is_checked_against_the_checkpoint(hf_folder):
    with pytest.raises(ValueError, match="image width 64 but variant B/16 expects 768"):
        siglip.load(hf_folder, variant="B/16")


def test_hf_position_interpolation_matches_resized_load(hf_model, hf_folder, photos):
    """Running at 96 px: core_jax resizes the position embedding bilinearly
    (big_vision's choice); PyTorch's interpolate_pos_encoding uses bicubic,
    so the two agree only loosely (cosine > 0.95), not to 1e-5."""
    model, params = siglip.load(hf_folder, image_size=96)
    assert model.image_size == 96
    assert params["img"]["pos_embedding"].shape == (1, 36, 64)
    big = (
        np.stack(
            [
                np.asarray(
                    Image.fromarray(((p + 1) * 127.5).astype(np.uint8)).resize((96, 96))
                )
                for p in photos
            ]
        ).astype(np.float32)
        / 127.5
        - 1.0
    )
    zimg, _, _ = _apply(model)({"params": params}, big, None)
    with torch.no_grad():
        ref = _features(
            hf_model.get_image_features(
                pixel_values=torch.from_numpy(big).permute(0, 3, 1, 2),
                interpolate_pos_encoding=True,
            )
        )
    ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
    assert np.min(np.sum(np.asarray(zimg) * ref, -1)) > 0.95


def test_resize_posemb_same_size_returns_the_array_unchanged():
    posemb = np.random.default_rng(0).normal(size=(1, 16, 8)).astype(np.float32)
    assert siglip.resize_posemb(posemb, 4) is posemb


def test_resize_posemb_is_bilinear():
    """A grid that is linear in its coordinates stays linear under bilinear
    resizing: values at the new pixel centres are given by the formula."""
    old, new = 4, 8
    ys, xs = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
    grid = np.stack([2.0 * ys + 3.0 * xs, np.ones_like(ys, float)], -1)
    posemb = grid.reshape(1, old * old, 2).astype(np.float32)

    resized = np.asarray(siglip.resize_posemb(posemb, new)).reshape(new, new, 2)

    # Half-pixel centres: new index i sits at old coordinate (i + .5) * 4/8 - .5,
    # clamped to the edge.
    coord = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0, old - 1)
    expected = 2.0 * coord[:, None] + 3.0 * coord[None, :]
    np.testing.assert_allclose(resized[..., 0], expected, atol=1e-5)
    np.testing.assert_allclose(resized[..., 1], 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "name, size, expected",
    [
        ("B/16", 224, (768, 12, 3072, 12, 16, 224)),
        ("L/16", 256, (1024, 24, 4096, 16, 16, 256)),
        ("So400m/14", 384, (1152, 27, 4304, 16, 14, 384)),
        ("B/16@512", 224, (768, 12, 3072, 12, 16, 512)),
    ],
)
def test_variants_have_big_vision_sizes(name, size, expected):
    model = siglip.SigLIP.from_variant(name, image_size=size)
    c = model.config
    got = (c.image_width, c.image_depth, c.image_mlp_dim, c.image_heads)
    assert got + (c.patch_size, c.image_size) == expected
    assert (c.text_width, model.embed_dim) == (expected[0], expected[0])
    assert (model.vocab_size, model.text_length) == (32_000, 64)


def test_variant_parameter_tree_has_big_vision_names():
    model = siglip.SigLIP.from_variant("So400m/14", image_size=384)
    flat = checkpoints.flatten(siglip.param_shapes(model))
    assert flat["img/embedding/kernel"].shape == (14, 14, 3, 1152)
    assert flat["img/pos_embedding"].shape == (1, 729, 1152)
    attention = "img/Transformer/encoderblock_26/MultiHeadDotProductAttention_0"
    assert flat[f"{attention}/query/kernel"].shape == (1152, 16, 72)
    assert flat[f"{attention}/out/kernel"].shape == (16, 72, 1152)
    assert flat["img/MAPHead_0/probe"].shape == (1, 1, 1152)
    assert flat["img/MAPHead_0/MlpBlock_0/Dense_1/kernel"].shape == (4304, 1152)
    assert flat["txt/Embed_0/embedding"].shape == (32_000, 1152)
    assert flat["txt/pos_embedding"].shape == (1, 64, 1152)
    assert flat["txt/Encoder_0/encoder_norm/scale"].shape == (1152,)
    assert flat["txt/head/kernel"].shape == (1152, 1152)
    assert flat["t"].shape == flat["b"].shape == (1,)
    assert "img/head/kernel" not in flat  # SigLIP's image tower has no head


def test_tiny_variant_runs_from_random_init():
    model = siglip.SigLIP.from_variant("Tiny/16", image_size=32)
    params = siglip.init_random(model, seed=0)
    images, tokens = siglip.dummy_inputs(model, batch=3)
    zimg, ztxt, out = _apply(model)({"params": params}, images, tokens)
    assert zimg.shape == ztxt.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zimg), axis=-1), 1, atol=1e-6)
    assert out["logits"].shape == (3, 3)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown SigLIP variant 'H/14'"):
        siglip.SigLIP.from_variant("H/14")


def test_a_saved_npz_reloads_to_the_same_embeddings(
    hf_folder, tmp_path, photos, caption_tokens, reference
):
    model, params = siglip.load(hf_folder)
    checkpoints.save_npz(params, tmp_path / "out.npz")
    assert "img/MAPHead_0/probe" in np.load(tmp_path / "out.npz").files
    model2, params2 = siglip.load(tmp_path / "out.npz")
    assert model2.config == model.config
    _assert_parity(model2, params2, photos, caption_tokens, reference)


def test_embeddings_match_on_an_eight_device_mesh(
    hf_folder, photos, caption_tokens, reference
):
    """The batch axis sharded over 8 devices gives the same embeddings."""
    from core_jax import sharding

    if len(jax.devices()) < 8 or os.environ.get("JAX_PLATFORMS") != "cpu":
        pytest.skip("needs the 8 simulated CPU devices of conftest.py")
    mesh = sharding.make_mesh()
    model, params = siglip.load(hf_folder)
    images = np.concatenate([photos, photos[:3]])  # 8 rows
    tokens = caption_tokens[:8]
    images = jax.device_put(images, sharding.batch_sharding(mesh, 4))
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
    params = jax.device_put(params, sharding.replicated(mesh))
    zimg, ztxt, _ = _apply(model)({"params": params}, images, tokens)
    np.testing.assert_allclose(np.asarray(zimg)[:5], reference[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ztxt), reference[1][:8], atol=1e-5, rtol=0)
