"""Checkpoint files: reading untrusted .npz, shape inference, errors, orbax."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from core_jax import checkpoints
from core_jax.models import siglip
from launch import convert_checkpoint

BLOCK = "img/Transformer/encoderblock_1"


@pytest.fixture(scope="module")
def tiny():
    model = siglip.SigLIP.from_variant("Tiny/16", image_size=32)
    return model, siglip.init_random(model, seed=3)


@pytest.fixture
def tiny_flat(tiny):
    _, params = tiny
    return {k: np.asarray(v) for k, v in checkpoints.flatten(params).items()}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
        ),
    )
    folder = tmp_path_factory.mktemp("hf")
    transformers.SiglipModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _shapes_only(name: str, image_size: int) -> dict[str, np.ndarray]:
    """Zero-byte stand-ins (broadcast views) with a variant's parameter shapes."""
    model = siglip.SigLIP.from_variant(name, image_size=image_size)
    return {
        k: np.broadcast_to(np.zeros((), np.float32), v.shape)
        for k, v in checkpoints.flatten(siglip.param_shapes(model)).items()
    }


# --- architecture inference ------------------------------------------------


@pytest.mark.parametrize(
    "variant, size, expected",
    [
        ("B/16", 224, (768, 12, 3072, 12, 16, 224, 768)),
        ("L/16", 256, (1024, 24, 4096, 16, 16, 256, 1024)),
        ("So400m/14", 384, (1152, 27, 4304, 16, 14, 384, 1152)),
    ],
)
def test_architecture_is_inferred_from_shapes(variant, size, expected):
    c = checkpoints.infer_config(_shapes_only(variant, size))
    got = (c.image_width, c.image_depth, c.image_mlp_dim, c.image_heads)
    assert got + (c.patch_size, c.image_size, c.embed_dim) == expected
    assert (c.text_width, c.text_depth, c.text_heads) == (
        expected[0],
        expected[1],
        expected[3],
    )
    assert (c.vocab_size, c.text_length) == (32_000, 64)
    checkpoints.check_variant(c, variant)  # agrees with its own name


def test_an_image_head_is_read_from_the_checkpoint(tmp_path):
    """Some big_vision image towers end in a `head` Dense; its output size
    must then equal the text embedding size."""
    config = dataclasses.replace(
        siglip.variant_config("Tiny/16", 32),
        image_width=32,
        image_heads=2,
        image_head_dim=64,
    )
    model = siglip.SigLIP(config)
    params = siglip.init_random(model, seed=0)
    checkpoints.save_npz(params, tmp_path / "head.npz")

    loaded_model, _ = siglip.load(tmp_path / "head.npz")
    assert loaded_model.config.image_head_dim == 64
    assert loaded_model.config.image_width == 32
    assert params["img"]["head"]["kernel"].shape == (32, 64)


def test_a_variant_disagreeing_with_the_checkpoint_is_named():
    config = checkpoints.infer_config(_shapes_only("B/16", 224))
    with pytest.raises(ValueError) as error:
        checkpoints.check_variant(config, "So400m/14", source="ckpt.npz")
    message = str(error.value)
    assert "ckpt.npz" in message
    assert "text width 768 but variant So400m/14 expects 1152" in message
    assert "patch size 16 but variant So400m/14 expects 14" in message


def test_a_variant_with_a_resolution_checks_the_image_size():
    config = checkpoints.infer_config(_shapes_only("B/16", 224))
    with pytest.raises(ValueError, match="image size 224 but variant B/16@384"):
        checkpoints.check_variant(config, "B/16@384")


# --- .npz files ------------------------------------------------------------


def test_npz_round_trip_is_exact(tiny, tmp_path):
    model, params = tiny
    checkpoints.save_npz(params, tmp_path / "t.npz")
    loaded_model, loaded = siglip.load(tmp_path / "t.npz", variant="Tiny/16")
    assert loaded_model.config == model.config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_bfloat16_parameters_are_saved_as_exact_float32(tiny, tmp_path):
    _, params = tiny
    half = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
    checkpoints.save_npz(half, tmp_path / "h.npz")
    _, loaded = siglip.load(tmp_path / "h.npz")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(half), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))


def test_pickled_npz_is_refused_without_unpickling(tmp_path, tiny_flat):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    tiny_flat["img/embedding/kernel"] = np.array([Payload()], dtype=object)
    np.savez(tmp_path / "evil.npz", **tiny_flat)  # savez pickles object arrays

    with pytest.raises(checkpoints.CheckpointError, match="pickled"):
        siglip.load(tmp_path / "evil.npz")
    assert not marker.exists()


def test_truncated_npz_is_a_clear_error(tiny, tmp_path):
    _, params = tiny
    path = tmp_path / "t.npz"
    checkpoints.save_npz(params, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(checkpoints.CheckpointError, match="t.npz.*truncated"):
        siglip.load(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no such file"):
        siglip.load(tmp_path / "absent.npz")


def test_missing_parameter_is_named_with_its_expected_shape(tmp_path, tiny_flat):
    del tiny_flat[f"{BLOCK}/LayerNorm_1/scale"]
    np.savez(tmp_path / "m.npz", **tiny_flat)
    with pytest.raises(checkpoints.ParameterMismatchError) as error:
        siglip.load(tmp_path / "m.npz")
    assert f"'{BLOCK}/LayerNorm_1/scale' is missing (expected shape (64,))" in str(
        error.value
    )


def test_extra_parameter_is_named_with_its_shape(tmp_path, tiny_flat):
    tiny_flat["img/extra/kernel"] = np.zeros((3, 5), np.float32)
    np.savez(tmp_path / "x.npz", **tiny_flat)
    with pytest.raises(checkpoints.ParameterMismatchError) as error:
        siglip.load(tmp_path / "x.npz")
    assert "'img/extra/kernel' with shape (3, 5) is not part of the model" in str(
        error.value
    )


def test_misshapen_parameter_is_named_with_both_shapes(tmp_path, tiny_flat):
    name = f"{BLOCK}/MlpBlock_0/Dense_1/kernel"
    tiny_flat[name] = np.zeros((200, 64), np.float32)
    np.savez(tmp_path / "w.npz", **tiny_flat)
    with pytest.raises(checkpoints.ParameterMismatchError) as error:
        siglip.load(tmp_path / "w.npz")
    assert f"'{name}' has shape (200, 64) but the model expects (256, 64)" in str(
        error.value
    )


def test_integer_parameters_are_refused(tmp_path, tiny_flat):
    tiny_flat["t"] = np.zeros((1,), np.int32)
    np.savez(tmp_path / "i.npz", **tiny_flat)
    with pytest.raises(checkpoints.ParameterMismatchError, match="'t' has dtype int32"):
        siglip.load(tmp_path / "i.npz")


def test_non_finite_weights_warn_with_their_names(tmp_path, tiny_flat):
    name = "txt/Encoder_0/encoderblock_0/MlpBlock_0/Dense_0/bias"
    tiny_flat[name] = tiny_flat[name].copy()
    tiny_flat[name][3] = np.nan
    tiny_flat["b"] = np.array([np.inf], np.float32)
    np.savez(tmp_path / "n.npz", **tiny_flat)
    with pytest.warns(RuntimeWarning, match="2 parameters hold NaN or inf") as record:
        siglip.load(tmp_path / "n.npz")
    message = str(record[0].message)
    assert message.endswith(f"hold NaN or inf values: b, {name}")


# --- Hugging Face folders --------------------------------------------------


def test_hf_folder_without_config_is_refused(hf_folder, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(
        (hf_folder / "model.safetensors").read_bytes()
    )
    with pytest.raises(checkpoints.CheckpointError, match="config.json is missing"):
        siglip.load(tmp_path)


def test_hf_config_disagreeing_with_tensors_is_named(hf_folder, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(
        (hf_folder / "model.safetensors").read_bytes()
    )
    config = json.loads((hf_folder / "config.json").read_text())
    config["text_config"]["vocab_size"] = 32000
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        checkpoints.ParameterMismatchError,
        match="text_config.vocab_size = 32000 but the tensors have 100",
    ):
        siglip.load(tmp_path)


def test_hf_extra_and_missing_tensors_are_named(hf_folder, tmp_path):
    tensors = load_file(hf_folder / "model.safetensors")
    tensors["vision_model.surprise.weight"] = np.zeros((2, 3), np.float32)
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        checkpoints.ParameterMismatchError,
        match=r"vision_model.surprise.weight \(2, 3\)",
    ):
        siglip.load(tmp_path)

    del tensors["vision_model.surprise.weight"]
    del tensors["text_model.head.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        checkpoints.ParameterMismatchError, match="'text_model.head.bias' is missing"
    ):
        siglip.load(tmp_path)


def test_truncated_safetensors_is_a_clear_error(hf_folder, tmp_path):
    data = (hf_folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    (tmp_path / "config.json").write_text((hf_folder / "config.json").read_text())
    with pytest.raises(checkpoints.CheckpointError, match="model.safetensors"):
        siglip.load(tmp_path)


# --- orbax -----------------------------------------------------------------


def test_orbax_saved_on_eight_devices_restores_on_one_bit_for_bit(tiny, tmp_path):
    from core_jax import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 simulated CPU devices of conftest.py")
    _, params = tiny
    mesh = sharding.make_mesh()

    def spread(x):
        # Split the leading axis over the 8 devices where it divides.
        s = sharding.batch_sharding(mesh, x.ndim) if x.shape[0] % 8 == 0 else None
        return jax.device_put(x, s or sharding.replicated(mesh))

    sharded = jax.tree.map(spread, params)
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded))
    checkpoints.save_orbax(sharded, tmp_path / "ckpt")

    restored = checkpoints.restore_orbax(tmp_path / "ckpt")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        assert a.sharding.device_set == {jax.local_devices()[0]}
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(restored) == jax.tree.structure(params)


def test_orbax_restores_into_a_given_target(tiny, tmp_path):
    _, params = tiny
    checkpoints.save_orbax(params, tmp_path / "ckpt")
    device = jax.local_devices()[-1]
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
        ),
        params,
    )
    restored = checkpoints.restore_orbax(tmp_path / "ckpt", target)
    leaf = restored["txt"]["head"]["kernel"]
    assert leaf.sharding.device_set == {device}
    np.testing.assert_array_equal(leaf, params["txt"]["head"]["kernel"])


def test_siglip_load_reads_an_orbax_directory(tiny, tmp_path):
    model, params = tiny
    checkpoints.save_orbax(params, tmp_path / "ckpt")
    loaded_model, loaded = siglip.load(tmp_path / "ckpt", variant="Tiny/16")
    assert loaded_model.config == model.config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_orbax_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no such orbax"):
        checkpoints.restore_orbax(tmp_path / "absent")


# --- the converter ---------------------------------------------------------


def test_converter_goes_hf_to_npz_to_orbax_to_npz_exactly(hf_folder, tmp_path):
    flat_hf, _ = checkpoints.load_flat(hf_folder)

    convert_checkpoint.convert(str(hf_folder), str(tmp_path / "a.npz"))
    convert_checkpoint.convert(str(tmp_path / "a.npz"), str(tmp_path / "orbax"))
    convert_checkpoint.convert(str(tmp_path / "orbax"), str(tmp_path / "b.npz"))

    with np.load(tmp_path / "b.npz", allow_pickle=False) as final:
        assert sorted(final.files) == sorted(flat_hf)
        for name in final.files:
            np.testing.assert_array_equal(final[name], flat_hf[name])


def test_converter_refuses_to_overwrite_and_checks_the_variant(tiny, tmp_path):
    _, params = tiny
    checkpoints.save_npz(params, tmp_path / "a.npz")
    with pytest.raises(ValueError, match="already exists"):
        convert_checkpoint.convert(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"))
    with pytest.raises(ValueError, match="image width 64 but variant B/16"):
        convert_checkpoint.convert(
            str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), variant="B/16"
        )
    assert not (tmp_path / "b.npz").exists()


def test_converter_command_line_reports_errors_without_a_traceback(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.convert_checkpoint",
            f"--input={tmp_path / 'absent.npz'}",
            f"--output={tmp_path / 'out.npz'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=120,
    )
    assert result.returncode == 1
    assert "absent.npz: no such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_garbage_and_pickle_files_get_our_message_not_numpys(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.read_npz(garbage)
    message = str(error.value)
    assert str(garbage) in message and "not a valid .npz file" in message
    assert "never loaded" in message and "allow_pickle" not in message

    # A bare pickle (what np.save writes for an object array with
    # allow_pickle=True) behind an .npy header.
    pickled = tmp_path / "pickled.npz"
    np.save(pickled.with_suffix(".npy"), np.array([{}], dtype=object))
    os.replace(pickled.with_suffix(".npy"), pickled)
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.read_npz(pickled)
    message = str(error.value)
    assert str(pickled) in message and "pickled object" in message
    assert "allow_pickle" not in message and "If you trust" not in message


def test_converter_names_a_missing_output_folder(tiny, tmp_path):
    _, params = tiny
    checkpoints.save_npz(params, tmp_path / "a.npz")
    output = tmp_path / "no" / "such" / "dir" / "x.npz"
    with pytest.raises(checkpoints.CheckpointError) as error:
        convert_checkpoint.convert(str(tmp_path / "a.npz"), str(output))
    message = str(error.value)
    assert "--output" in message and f"{tmp_path / 'no' / 'such' / 'dir'}" in message
    assert not (tmp_path / "no").exists()


def _run_converter(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.convert_checkpoint", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=120,
    )


def test_converter_command_line_missing_output_folder_and_help(tiny, tmp_path):
    _, params = tiny
    checkpoints.save_npz(params, tmp_path / "a.npz")
    result = _run_converter(
        f"--input={tmp_path / 'a.npz'}", "--output=no/such/dir/x.npz"
    )
    assert result.returncode == 1
    assert "parent folder" in result.stderr and "no/such/dir" in result.stderr
    assert "Traceback" not in result.stderr

    result = _run_converter("--help")
    usage = result.stdout + result.stderr
    assert "into a big_vision .npz or an orbax directory" in usage
    assert "between big_vision .npz, orbax and HF" not in usage
