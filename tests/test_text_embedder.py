"""The LLM text embedder against transformers' PyTorch Mistral and Llama.

Every expected embedding comes from the PyTorch model on the same weights:
its `last_hidden_state` at each row's last non-padding token, normalised in
NumPy here. Position ids given to PyTorch are the mask's cumulative sum, the
convention the embedder uses, so both sides see the same positions whatever
the padding side.

Tolerances: float32 parity is 1e-5 max abs on unit vectors (the two
frameworks sum in different orders; observed ~3e-7). bfloat16 against the
float32 reference is 3e-2 max abs and cosine > 0.999: bfloat16 keeps 8 bits
of mantissa, so each of the two layers' matmuls rounds at ~4e-3 relative.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralModel,
    PreTrainedTokenizerFast,
)

from core_jax import sharding
from core_jax.models import text_embedder
from core_jax.safetensors_files import CheckpointError

EOS = "</s>"
WINDOW = 16  # between the shortest and longest test rows: the window matters


def make_tokenizer(captions, folder, *, padding_side="right", adds_eos=False):
    """A small BPE tokenizer trained on real captions, saved as an HF folder.

    Like Mistral's, it prepends BOS; with `adds_eos` it also appends EOS, as
    tokenizers configured with add_eos_token do.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", EOS])
    tokenizer.train_from_iterator(captions[:3000], trainer)
    template = "<s> $A </s>" if adds_eos else "<s> $A"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", 1), (EOS, 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token=EOS,
        unk_token="<unk>",
        padding_side=padding_side,
    )
    fast.save_pretrained(folder)
    return fast


def randomize_norms(model, seed):
    """Norm weights default to ones; random ones make the test see them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(
                    1 + 0.2 * torch.randn(parameter.shape, generator=generator)
                )


def mistral_config(vocab_size, **overrides):
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=WINDOW,
        rope_theta=1e6,
        initializer_range=0.1,
    )
    settings.update(overrides)
    return MistralConfig(**settings)


@pytest.fixture(scope="module")
def tokenizer(real_captions, tmp_path_factory):
    return make_tokenizer(real_captions, tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def mistral(tokenizer, tmp_path_factory):
    """(folder, torch model): a random 2-layer Mistral with a tokenizer."""
    torch.manual_seed(0)
    model = MistralModel(mistral_config(len(tokenizer))).eval()
    randomize_norms(model, 1)
    folder = tmp_path_factory.mktemp("mistral")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def mistral_sharded(mistral, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral_sharded")
    mistral[1].save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tokenizer, tmp_path_factory):
    """(folder, torch decoder): a Llama with biases and a wider head_dim,
    saved as a *ForCausalLM (tensors under "model.", plus an lm_head)."""
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        attention_bias=True,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
    )
    model = LlamaForCausalLM(config).eval()
    randomize_norms(model, 3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.model


def mixed_captions(captions, n=8):
    """n real captions of very different lengths, shortest to longest mixed."""
    pool = captions[:400]
    by_length = sorted(pool, key=len)
    picks = [by_length[int(i)] for i in np.linspace(0, len(pool) - 1, n)]
    return picks[::2] + picks[1::2]


def token_batch(tokenizer, texts, side):
    """ids, mask (N, L) int32 with EOS appended, padded on `side` with 0."""
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        span = slice(length - len(row), None) if side == "left" else slice(len(row))
        ids[i, span] = row
        mask[i, span] = 1
    return ids, mask


def torch_embeddings(decoder, ids, mask):
    """The reference: PyTorch last hidden state at the last real token, normalised."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        hidden = decoder(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        ).last_hidden_state.numpy()
    last = np.array([np.nonzero(row)[0][-1] for row in mask])
    pooled = hidden[np.arange(len(mask)), last].astype(np.float64)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def embed(model, params, ids, mask):
    return np.asarray(jax.jit(model.apply)({"params": params}, ids, mask))


@pytest.fixture(scope="module")
def mistral_float32(mistral):
    """(model, params, jitted apply) loaded once for the tests that share it."""
    model, params = text_embedder.load(mistral[0])
    return model, params, jax.jit(model.apply)


@pytest.fixture(scope="module")
def encoder(mistral):
    return text_embedder.Encoder(mistral[0], batch_size=8)


@pytest.mark.parametrize("side", ["left", "right"])
def test_float32_matches_pytorch_mistral(
    mistral, mistral_float32, tokenizer, real_captions, side
):
    ids, mask = token_batch(tokenizer, mixed_captions(real_captions), side)
    assert mask.sum(1).min() < WINDOW < mask.sum(1).max()

    model, params, apply = mistral_float32
    got = np.asarray(apply({"params": params}, ids, mask))

    assert got.shape == (8, 64) and got.dtype == np.float32
    expected = torch_embeddings(mistral[1], ids, mask)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sharded_checkpoint_matches_pytorch(
    mistral, mistral_sharded, tokenizer, real_captions
):
    assert (
        len([f for f in os.listdir(mistral_sharded) if f.endswith(".safetensors")]) > 2
    )
    ids, mask = token_batch(tokenizer, mixed_captions(real_captions), "left")

    model, params = text_embedder.load(mistral_sharded)

    # Every parameter of the module, each filled from the checkpoint.
    initialised = jax.eval_shape(lambda: text_embedder.init_random(model))
    assert jax.tree.structure(params) == jax.tree.structure(initialised)
    for name, parameter in mistral[1].state_dict().items():
        path = name.replace("layers.", "layers_").split(".")
        leaf = params
        for key in path:
            leaf = leaf[key]
        np.testing.assert_array_equal(np.asarray(leaf), parameter.numpy())
    expected = torch_embeddings(mistral[1], ids, mask)
    np.testing.assert_allclose(embed(model, params, ids, mask), expected, atol=1e-5)


def test_llama_causal_lm_checkpoint_matches_pytorch(llama, tokenizer, real_captions):
    folder, torch_decoder = llama
    ids, mask = token_batch(tokenizer, mixed_captions(real_captions), "right")

    model, params = text_embedder.load(folder)

    assert model.config.sliding_window is None and model.config.head_dim == 16
    expected = torch_embeddings(torch_decoder, ids, mask)
    np.testing.assert_allclose(embed(model, params, ids, mask), expected, atol=1e-5)


def test_padding_side_does_not_change_embeddings(
    mistral_float32, tokenizer, real_captions
):
    texts = mixed_captions(real_captions)
    _, params, apply = mistral_float32

    left = apply({"params": params}, *token_batch(tokenizer, texts, "left"))
    right = apply({"params": params}, *token_batch(tokenizer, texts, "right"))

    np.testing.assert_allclose(left, right, atol=1e-5)


def test_bfloat16_is_close_to_float32_reference(mistral, tokenizer, real_captions):
    folder, torch_model = mistral
    ids, mask = token_batch(tokenizer, mixed_captions(real_captions), "left")

    model, params = text_embedder.load(folder, dtype=jnp.bfloat16)
    got = embed(model, params, ids, mask)

    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    expected = torch_embeddings(torch_model, ids, mask)
    np.testing.assert_allclose(got, expected, atol=3e-2)
    assert np.min(np.sum(got * expected, axis=1)) > 0.999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_rotary_tables_are_float32_beyond_position_256():
    positions = jnp.array([[0, 1, 255, 256, 257, 300, 511, 1000]])
    cos, sin = text_embedder.rotary_tables(positions, head_dim=8, theta=10000.0)

    assert cos.dtype == jnp.float32 and sin.dtype == jnp.float32
    # In bfloat16, 257 rounds to 256: the angles of neighbours would coincide.
    assert jnp.bfloat16(257) == jnp.bfloat16(256)
    assert not np.allclose(cos[0, 3], cos[0, 4])
    inverse_frequency = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    angles = (
        np.array([0, 1, 255, 256, 257, 300, 511, 1000])[:, None] * inverse_frequency
    )
    angles = np.concatenate([angles, angles], axis=-1)
    # float32 angles near 1000 rad are rounded by ~3e-5 rad.
    np.testing.assert_allclose(cos[0], np.cos(angles), atol=1e-4)
    np.testing.assert_allclose(sin[0], np.sin(angles), atol=1e-4)


def test_bfloat16_long_rows_past_position_256_match(llama, tokenizer, real_captions):
    """Rows of 300+ tokens in bfloat16 stay close to the float32 reference."""
    folder, torch_decoder = llama
    long_texts = [" ".join(real_captions[i : i + 30]) for i in (0, 100)]
    ids, mask = token_batch(tokenizer, [*long_texts, real_captions[5]], "left")
    assert mask.sum(1).max() > 300

    model, params = text_embedder.load(folder, dtype=jnp.bfloat16)
    got = embed(model, params, ids, mask)

    expected = torch_embeddings(torch_decoder, ids, mask)
    np.testing.assert_allclose(got, expected, atol=3e-2)
    assert np.min(np.sum(got * expected, axis=1)) > 0.999


def test_attention_mask_is_causal_padded_and_windowed():
    mask = jnp.array([[0, 1, 1, 1, 1]])

    allowed = text_embedder.attention_mask(mask, sliding_window=2)

    expected = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(allowed[0, 0], expected)


def test_last_token_index_for_either_padding_side():
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(text_embedder.last_token_index(mask), [2, 4, 4])


@pytest.mark.parametrize("model_parallel", [2, 4])
def test_params_sharded_on_mesh_give_same_embeddings(
    mistral, tokenizer, real_captions, model_parallel
):
    ids, mask = token_batch(tokenizer, mixed_captions(real_captions), "right")
    mesh = sharding.make_mesh(model_parallel=model_parallel)

    model, params = text_embedder.load(mistral[0], mesh=mesh)
    batch = sharding.batch_sharding(mesh, 2)
    got = embed(model, params, jax.device_put(ids, batch), jax.device_put(mask, batch))

    q_proj = params["layers_0"]["self_attn"]["q_proj"]["weight"]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert q_proj.addressable_shards[0].data.shape == (64 // model_parallel, 64)
    down_proj = params["layers_1"]["mlp"]["down_proj"]["weight"]
    assert down_proj.addressable_shards[0].data.shape == (64, 128 // model_parallel)
    np.testing.assert_allclose(got, torch_embeddings(mistral[1], ids, mask), atol=1e-5)


# ----------------------------------------------------------------------------
# Checkpoints that do not fit.


def copy_folder(source, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    return target


def test_missing_shard_is_an_error_naming_it(mistral_sharded, tmp_path):
    folder = copy_folder(mistral_sharded, tmp_path)
    with open(folder / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(folder / shard)

    with pytest.raises(CheckpointError, match=shard):
        text_embedder.load(folder)


def test_missing_tensor_is_an_error_naming_it_and_its_shape(mistral, tmp_path):
    folder = copy_folder(mistral[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")

    with pytest.raises(
        CheckpointError, match=r"missing.*layers\.1\.mlp\.up_proj\.weight \(128, 64\)"
    ):
        text_embedder.load(folder)


def test_unexpected_tensor_is_an_error_naming_it(mistral, tmp_path):
    folder = copy_folder(mistral[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["layers.0.extra.weight"] = np.zeros((3, 5), np.float32)
    save_file(tensors, folder / "model.safetensors")

    with pytest.raises(
        CheckpointError, match=r"unexpected.*layers\.0\.extra\.weight \(3, 5\)"
    ):
        text_embedder.load(folder)


def test_wrong_shape_is_an_error_naming_both_shapes(mistral, tmp_path):
    folder = copy_folder(mistral[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(
        CheckpointError,
        match=r"gate_proj\.weight has shape \(128, 64\), expected \(96, 64\)",
    ):
        text_embedder.load(folder)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "qwen2"}, "model_type 'qwen2' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
            "rotary scaling 'llama3' is not supported",
        ),
    ],
)
def test_unsupported_architectures_are_refused(mistral, tmp_path, change, message):
    folder = copy_folder(mistral[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(text_embedder.ConfigError, match=message):
        text_embedder.load(folder)


def test_old_style_rope_theta_is_read(tmp_path):
    config = {
        "model_type": "mistral",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 123.0,
        "sliding_window": None,
    }
    parsed = text_embedder.Config.from_hf(config)
    assert parsed.rope_theta == 123.0
    assert parsed.num_key_value_heads == 2 and parsed.head_dim == 4
    assert parsed.sliding_window is None


# ----------------------------------------------------------------------------
# The Encoder (TextEncoder protocol).


def short_captions(captions, n):
    """n real captions short enough to share one 32-token bucket (one compile)."""
    return [c for c in captions if 20 < len(c) < 60][:n]


def test_encoder_appends_eos_and_matches_pytorch(mistral, encoder, real_captions):
    texts = short_captions(real_captions, 10)

    got = encoder.encode(texts)

    assert encoder.append_eos
    assert got.shape == (10, encoder.dim) and got.dtype == np.float32
    ids, mask = token_batch(encoder.tokenizer, texts, "right")
    expected = torch_embeddings(mistral[1], ids, mask)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_encoder_does_not_double_eos_and_honours_left_padding(
    mistral, real_captions, tmp_path
):
    folder = copy_folder(mistral[0], tmp_path)
    make_tokenizer(real_captions, folder, padding_side="left", adds_eos=True)
    encoder = text_embedder.Encoder(folder)

    ids, mask = encoder.tokenize(["a dog", "a dog on a beach at sunset"])

    assert not encoder.append_eos
    assert np.all(mask[:, -1] == 1)  # left padding: every row ends at the end
    assert np.sum(ids[0][mask[0] == 1] == encoder.tokenizer.eos_token_id) == 1
    assert ids.shape[1] % 32 == 0


def test_query_encoder_applies_instruction(encoder):
    queries = encoder.for_queries("Retrieve captions of a plant species")

    got = queries.encode(["Quercus robur (English oak)"])

    instructed = "Instruct: Retrieve captions of a plant species\nQuery: "
    expected = encoder.encode([instructed + "Quercus robur (English oak)"])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert queries.fingerprint != encoder.fingerprint
    assert queries.dim == encoder.dim == 64
    assert encoder.encode([]).shape == (0, 64)


def test_encoder_on_mesh_matches_single_device(mistral, encoder, real_captions):
    texts = short_captions(real_captions, 11)
    single = encoder.encode(texts)

    mesh = sharding.make_mesh(model_parallel=2)
    sharded = text_embedder.Encoder(mistral[0], batch_size=8, mesh=mesh).encode(texts)

    np.testing.assert_allclose(sharded, single, atol=1e-5)


def test_fingerprint_is_stable_and_tracks_weights_and_dtype(mistral, encoder, tmp_path):
    again = text_embedder.Encoder(mistral[0], batch_size=8)
    assert again.fingerprint == encoder.fingerprint

    in_bfloat16 = text_embedder.Encoder(mistral[0], dtype=jnp.bfloat16)
    assert in_bfloat16.fingerprint != encoder.fingerprint

    folder = copy_folder(mistral[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["norm.weight"] = tensors["norm.weight"] + 1.0  # same shapes and sizes
    save_file(tensors, folder / "model.safetensors")
    retrained = text_embedder.Encoder(folder)
    assert retrained.fingerprint != encoder.fingerprint


def test_long_texts_are_cut_to_max_length_and_still_end_with_eos(
    mistral, real_captions
):
    encoder = text_embedder.Encoder(mistral[0], max_length=40)
    long_text = " ".join(real_captions[:20])

    ids, mask = encoder.tokenize([long_text, "a dog"])

    assert ids.shape == (2, 40)
    assert mask[0].sum() == 40
    assert ids[0, -1] == encoder.tokenizer.eos_token_id
    assert ids[0, 0] == encoder.tokenizer.bos_token_id
