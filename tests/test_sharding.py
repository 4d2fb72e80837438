"""Sharded CoRE logits on a simulated 8-device CPU mesh equal unsharded ones.

Each image row's logits are computed by the same operations on one device
whether or not the batch is split, so results are compared exactly where
only the batch axis is sharded. Splitting the class axis changes the shape of
the matrix product each device runs, and with it possibly the order of the
float32 accumulation, so there the comparison allows 1e-6 (a few float32
ulps of unit-scale logits).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from core_jax import fusion, sharding


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seed, n, c, k=5, k_class=4, d=16):
    rng = np.random.default_rng(seed)
    image_mask = rng.uniform(size=(n, k)) > 0.3
    image_mask[0] = False
    class_mask = rng.uniform(size=(c, k_class)) > 0.3
    class_mask[0] = False
    return dict(
        image_emb=unit(rng.normal(size=(n, d))).astype(np.float32),
        image_nbrs=unit(rng.normal(size=(n, k, d))).astype(np.float32),
        image_sims=rng.uniform(0, 1, size=(n, k)).astype(np.float32),
        image_mask=image_mask,
        class_emb=unit(rng.normal(size=(c, d))).astype(np.float32),
        class_nbrs=unit(rng.normal(size=(c, k_class, d))).astype(np.float32),
        class_sims=rng.uniform(0, 1, size=(c, k_class)).astype(np.float32),
        class_mask=class_mask,
    )


POINT = dict(alpha=0.4, beta=0.6, tau_i2t=0.05, tau_t2t=0.01)


def unsharded(inputs, weighting="softmax", **point):
    point = point or POINT
    compute = jax.jit(lambda *a, **p: fusion.core_logits(*a, **p, weighting=weighting))
    return np.asarray(compute(*inputs.values(), **point))


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


def test_make_mesh_shapes():
    assert sharding.make_mesh().shape == {"batch": 8, "model": 1}
    assert sharding.make_mesh(model_parallel=2).shape == {"batch": 4, "model": 2}
    with pytest.raises(ValueError, match="model_parallel=3"):
        sharding.make_mesh(model_parallel=3)


def test_pad_to_multiple_pads_with_zero_rows():
    padded, n = sharding.pad_to_multiple(np.ones((5, 2)), 4)
    assert n == 5 and padded.shape == (8, 2)
    np.testing.assert_array_equal(padded[5:], 0)
    same, n = sharding.pad_to_multiple(np.ones((8, 2)), 4)
    assert n == 8 and same.shape == (8, 2)


def test_class_and_logits_shardings_name_the_right_axes():
    mesh = sharding.make_mesh(model_parallel=2)
    assert sharding.class_sharding(mesh, 3).spec == PartitionSpec("model", None, None)
    assert sharding.logits_sharding(mesh).spec == PartitionSpec("batch", None)
    assert sharding.logits_sharding(mesh, shard_classes=True).spec == PartitionSpec(
        "batch", "model"
    )
    inputs, output = sharding.core_logits_shardings(mesh, shard_classes=True)
    assert len(inputs) == 12
    assert inputs[1].spec == PartitionSpec("batch", None, None)
    assert inputs[5].spec == PartitionSpec("model", None, None)
    assert inputs[-1].spec == PartitionSpec()


@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
def test_batch_sharded_logits_equal_unsharded_exactly(weighting):
    mesh = sharding.make_mesh()
    inputs = make_inputs(0, n=16, c=7)
    compute = sharding.sharded_core_logits(mesh, weighting=weighting)
    scalars = [np.float32(POINT[name]) for name in POINT]
    logits = compute(*inputs.values(), *scalars)
    assert logits.sharding.spec == PartitionSpec("batch", None)
    assert len(logits.addressable_shards) == 8
    np.testing.assert_array_equal(logits, unsharded(inputs, weighting))


def test_new_hyper_parameters_do_not_recompile():
    mesh = sharding.make_mesh()
    inputs = make_inputs(1, n=8, c=3)
    compute = sharding.sharded_core_logits(mesh)
    for alpha in (0.1, 0.2, 0.3):
        compute(*inputs.values(), *np.float32([alpha, 0.5, 0.1, 0.1]))
    assert compute._cache_size() == 1


@pytest.mark.parametrize("n", [1, 13, 21])
def test_padding_rows_are_dropped(n):
    mesh = sharding.make_mesh()
    inputs = make_inputs(2, n=n, c=6)
    logits = sharding.core_logits_on_mesh(mesh, *inputs.values(), **POINT)
    assert logits.shape == (n, 6)
    np.testing.assert_array_equal(logits, unsharded(inputs))


def test_chunks_equal_one_pass():
    mesh = sharding.make_mesh()
    inputs = make_inputs(3, n=30, c=5)
    logits = sharding.core_logits_on_mesh(
        mesh, *inputs.values(), **POINT, chunk_size=12
    )
    np.testing.assert_array_equal(logits, unsharded(inputs))


def test_masks_may_be_none():
    mesh = sharding.make_mesh()
    inputs = make_inputs(4, n=9, c=4)
    inputs["image_mask"] = None
    inputs["class_mask"] = None
    logits = sharding.core_logits_on_mesh(mesh, *inputs.values(), **POINT)
    everything = dict(inputs)
    everything["image_mask"] = np.ones((9, 5), bool)
    everything["class_mask"] = np.ones((4, 4), bool)
    np.testing.assert_array_equal(logits, unsharded(everything))


@pytest.mark.parametrize("model_parallel", [2, 8])
@pytest.mark.parametrize("c", [10, 16])
def test_class_sharded_logits_equal_unsharded(model_parallel, c):
    mesh = sharding.make_mesh(model_parallel=model_parallel)
    inputs = make_inputs(5, n=11, c=c)
    logits = sharding.core_logits_on_mesh(
        mesh, *inputs.values(), **POINT, shard_classes=True
    )
    assert logits.shape == (11, c)
    np.testing.assert_allclose(logits, unsharded(inputs), rtol=0, atol=1e-6)


def test_class_sharded_blocks_live_on_their_devices():
    mesh = sharding.make_mesh(model_parallel=2)
    inputs = make_inputs(6, n=8, c=6)
    compute = sharding.sharded_core_logits(mesh, shard_classes=True)
    logits = compute(*inputs.values(), *np.float32([0.5, 0.5, 0.1, 0.1]))
    shapes = {shard.data.shape for shard in logits.addressable_shards}
    assert shapes == {(2, 3)}


def test_alpha_beta_zero_on_the_mesh_is_exactly_zero_shot():
    mesh = sharding.make_mesh()
    inputs = make_inputs(7, n=10, c=5)
    rng = np.random.default_rng(7)
    inputs["image_emb"] = rng.integers(-8, 9, size=(10, 16)).astype(np.float32) / 8
    inputs["class_emb"] = rng.integers(-8, 9, size=(5, 16)).astype(np.float32) / 8
    logits = sharding.core_logits_on_mesh(
        mesh, *inputs.values(), alpha=0.0, beta=0.0, tau_i2t=0.01, tau_t2t=0.01
    )
    np.testing.assert_array_equal(logits, inputs["image_emb"] @ inputs["class_emb"].T)


def test_eager_core_logits_on_sharded_inputs_equal_unsharded():
    # Without jit: each operation runs on the sharded arrays as placed. The
    # reference is compiled as one program, whose fused arithmetic may round
    # differently from op-by-op execution by an ulp, hence 1e-6.
    mesh = sharding.make_mesh()
    inputs = make_inputs(8, n=16, c=5)
    placed = []
    for name, value in inputs.items():
        if name.startswith("image"):
            placed.append(
                jax.device_put(value, sharding.batch_sharding(mesh, value.ndim))
            )
        else:
            placed.append(jax.device_put(value, sharding.replicated(mesh)))
    logits = fusion.core_logits(*placed, **POINT)
    assert len(logits.addressable_shards) == 8
    np.testing.assert_allclose(logits, unsharded(inputs), rtol=0, atol=1e-6)
