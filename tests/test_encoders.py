"""Specification of core_jax.encoders with the real tiny SigLIP.

The reference is the SigLIP model applied directly to the whole input at
once on one device; the encoders must give the same rows whatever the batch
length and device count (padding rows dropped). Tolerance 1e-5: float32
matmuls whose blocking changes with the batch shape.
"""

import jax
import numpy as np
import pytest

from core_jax import encoders, sharding, tokenizers
from core_jax.models import siglip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, real_captions):
    model = siglip.SigLIP.from_variant("Tiny/16", image_size=32)
    params = siglip.init_random(model, seed=0)
    prefix = tmp_path_factory.mktemp("spm") / "captions"
    model_file = tokenizers.train_sentencepiece(real_captions[:3000], prefix, 1000)
    tokenizer = tokenizers.SiglipTokenizer(model_file, length=model.text_length)
    return model, params, tokenizer


def _direct_text(model, params, tokens):
    _, ztxt, _ = model.apply({"params": params}, None, tokens)
    return np.asarray(ztxt)


def test_text_encoder_matches_direct_apply_on_eight_devices(tiny, real_captions):
    model, params, tokenizer = tiny
    texts = real_captions[:21]  # not a multiple of 8 nor of the batch
    encoder = encoders.SiglipTextEncoder(model, params, tokenizer, batch_size=10)
    assert encoder.batch_size == 16  # rounded up to the 8 devices
    got = encoder.encode(texts)
    want = _direct_text(model, params, tokenizer(texts))
    assert got.shape == (21, model.embed_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_text_encoder_same_on_one_device(tiny, real_captions):
    model, params, tokenizer = tiny
    one = sharding.make_mesh(jax.devices()[:1])
    texts = real_captions[100:113]
    got = encoders.SiglipTextEncoder(
        model, params, tokenizer, batch_size=4, mesh=one
    ).encode(texts)
    np.testing.assert_allclose(
        got, _direct_text(model, params, tokenizer(texts)), atol=1e-5
    )


def test_text_encoder_empty_input(tiny):
    model, params, tokenizer = tiny
    out = encoders.SiglipTextEncoder(model, params, tokenizer).encode([])
    assert out.shape == (0, model.embed_dim)


def test_text_encoder_is_a_text_encoder_with_stable_fingerprint(tiny):
    model, params, tokenizer = tiny
    a = encoders.SiglipTextEncoder(model, params, tokenizer)
    b = encoders.SiglipTextEncoder(model, params, tokenizer, batch_size=3)
    assert isinstance(a, encoders.TextEncoder)
    assert a.dim == model.embed_dim
    assert a.fingerprint == b.fingerprint  # batch size changes no embedding
    other = siglip.init_random(model, seed=1)
    c = encoders.SiglipTextEncoder(model, other, tokenizer)
    assert c.fingerprint != a.fingerprint


def test_image_encoder_matches_direct_apply(tiny):
    model, params, _ = tiny
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (11, 32, 32, 3)).astype(np.float32)
    got = encoders.SiglipImageEncoder(model, params, batch_size=8).encode(images)
    zimg, _, _ = model.apply({"params": params}, images, None)
    np.testing.assert_allclose(got, np.asarray(zimg), atol=1e-5)
    assert got.shape == (11, model.embed_dim)
