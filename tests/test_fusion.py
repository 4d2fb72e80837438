"""Specification of core_jax.fusion against formulas written out in NumPy.

Tolerances: the NumPy references run in float64 and the code under test in
float32, so values agree to float32 rounding of a few chained operations;
1e-5 absolute on unit-scale quantities is two orders above that and far
below any difference that matters to a ranking of classes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import fusion

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_softmax_weights(sims, tau, mask):
    """exp(s / tau) over kept neighbours, shifted by the kept maximum."""
    sims = np.asarray(sims, np.float64)
    weights = np.zeros_like(sims)
    for index in np.ndindex(sims.shape[:-1]):
        kept = mask[index]
        if not kept.any():
            continue
        scaled = sims[index][kept] / tau
        exp = np.exp(scaled - scaled.max())
        weights[index][kept] = exp / exp.sum()
    return weights


def numpy_reference_release_retrieval(captions, sims, temperature):
    """The reference release's image side, as its dataset class computes it:
    caption embeddings times `similarity * temperature`, summed, L2-normalised.
    """
    weighted = captions * (sims * temperature)[:, None]
    summed = weighted.sum(axis=0)
    return summed / np.linalg.norm(summed)


def numpy_enrich(base, neighbours, sims, mix, tau, mask, weighting="softmax"):
    base = np.asarray(base, np.float64)
    out = base.copy()
    for index in np.ndindex(base.shape[:-1]):
        kept = mask[index]
        if mix == 0 or not kept.any():
            continue
        if weighting == "softmax":
            weights = numpy_softmax_weights(sims[index], tau, kept)
            retrieved = unit(weights @ neighbours[index])
        else:
            retrieved = numpy_reference_release_retrieval(
                neighbours[index][kept], sims[index][kept], tau
            )
        out[index] = unit((1 - mix) * base[index] + mix * retrieved)
    return out


def numpy_core_logits(inputs, alpha, beta, tau_i2t, tau_t2t, weighting="softmax"):
    z_plus = numpy_enrich(
        inputs["image_emb"],
        inputs["image_nbrs"],
        inputs["image_sims"],
        beta,
        tau_i2t,
        inputs["image_mask"],
        weighting,
    )
    w_plus = numpy_enrich(
        inputs["class_emb"],
        inputs["class_nbrs"],
        inputs["class_sims"],
        alpha,
        tau_t2t,
        inputs["class_mask"],
    )
    return z_plus @ w_plus.T


def make_inputs(seed, n=6, c=5, k=4, k_class=3, d=8, masked_rows=True):
    rng = np.random.default_rng(seed)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    image_mask = rng.uniform(size=(n, k)) > 0.3
    class_mask = rng.uniform(size=(c, k_class)) > 0.3
    if masked_rows:
        image_mask[0] = False
        class_mask[-1] = False
    return dict(
        image_emb=f32(unit(rng.normal(size=(n, d)))),
        image_nbrs=f32(unit(rng.normal(size=(n, k, d)))),
        image_sims=f32(rng.uniform(-0.2, 1.0, size=(n, k))),
        image_mask=image_mask,
        class_emb=f32(unit(rng.normal(size=(c, d)))),
        class_nbrs=f32(unit(rng.normal(size=(c, k_class, d)))),
        class_sims=f32(rng.uniform(-0.2, 1.0, size=(c, k_class))),
        class_mask=class_mask,
    )


def jitted(function, **static):
    return jax.jit(functools.partial(function, **static))


TRANSFORMS = {"eager": lambda f, **s: functools.partial(f, **s), "jit": jitted}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 6), (1, 1)])
@pytest.mark.parametrize("tau", [0.01, 0.5, 3.0])
def test_softmax_weights_match_numpy(transform, shape, tau):
    rng = np.random.default_rng(sum(shape))
    sims = rng.uniform(-1, 1, size=shape).astype(np.float32)
    mask = rng.uniform(size=shape) > 0.4
    weights = TRANSFORMS[transform](fusion.retrieval_weights, weighting="softmax")(
        sims, tau, mask=mask
    )
    np.testing.assert_allclose(
        weights, numpy_softmax_weights(sims, tau, mask), **TOLERANCE
    )


def test_no_mask_means_every_neighbour_is_used():
    sims = np.array([[0.1, 0.2, 0.7]], np.float32)
    expected = np.exp(sims / 0.5) / np.exp(sims / 0.5).sum()
    np.testing.assert_allclose(fusion.retrieval_weights(sims, 0.5), expected, 1e-6)


def test_masked_neighbours_get_zero_weight_and_rows_sum_to_one():
    sims = np.array([[0.9, 0.8, 0.1], [0.3, 0.2, 0.1]], np.float32)
    mask = np.array([[False, True, True], [True, True, True]])
    weights = np.asarray(fusion.retrieval_weights(sims, 0.1, mask=mask))
    assert weights[0, 0] == 0.0
    np.testing.assert_allclose(weights.sum(axis=1), [1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
def test_all_masked_row_gets_zero_weights(weighting):
    sims = np.array([[0.5, 0.4], [0.3, 0.2]], np.float32)
    mask = np.array([[False, False], [True, False]])
    weights = np.asarray(
        fusion.retrieval_weights(sims, 0.01, mask=mask, weighting=weighting)
    )
    np.testing.assert_array_equal(weights[0], [0.0, 0.0])
    np.testing.assert_allclose(weights[1], [1.0, 0.0])


@pytest.mark.parametrize("tau", [1e-4, 0.01, 1e4])
@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
def test_extreme_temperatures_stay_finite(tau, weighting):
    inputs = make_inputs(1)
    weights = fusion.retrieval_weights(
        inputs["image_sims"], tau, mask=inputs["image_mask"], weighting=weighting
    )
    logits = jitted(fusion.core_logits, weighting=weighting)(
        *inputs.values(), alpha=0.5, beta=0.5, tau_i2t=tau, tau_t2t=tau
    )
    assert np.isfinite(np.asarray(weights)).all()
    assert np.isfinite(np.asarray(logits)).all()


def test_tiny_temperature_puts_all_weight_on_the_best_kept_neighbour():
    sims = np.array([[0.30, 0.31, 0.99]], np.float32)
    mask = np.array([[True, True, False]])
    weights = fusion.retrieval_weights(sims, 1e-4, mask=mask)
    np.testing.assert_array_equal(weights, [[0.0, 1.0, 0.0]])


def test_huge_temperature_weights_kept_neighbours_uniformly():
    sims = np.array([[0.1, 0.9, 0.5, 0.7]], np.float32)
    mask = np.array([[True, True, True, False]])
    weights = fusion.retrieval_weights(sims, 1e4, mask=mask)
    np.testing.assert_allclose(weights, [[1 / 3, 1 / 3, 1 / 3, 0.0]], rtol=1e-4)


def test_similarity_weights_are_similarity_times_tau_l1_normalised():
    sims = np.array([[0.2, 0.6, 0.2], [0.5, -0.5, 1.0]], np.float32)
    mask = np.array([[True, True, True], [True, True, False]])
    weights = fusion.retrieval_weights(sims, 7.0, mask=mask, weighting="similarity")
    np.testing.assert_allclose(weights, [[0.2, 0.6, 0.2], [0.5, -0.5, 0.0]], 1e-6)


@pytest.mark.parametrize("tau", [0.01, 1.0, 100.0])
def test_similarity_mode_reproduces_the_reference_release(tau):
    rng = np.random.default_rng(3)
    n, k, d = 5, 10, 12
    base = unit(rng.normal(size=(n, d))).astype(np.float32)
    captions = unit(rng.normal(size=(n, k, d))).astype(np.float32)
    sims = rng.uniform(0.05, 0.3, size=(n, k)).astype(np.float32)
    beta = 0.4
    expected = np.stack(
        [
            unit(
                (1 - beta) * base[i]
                + beta * numpy_reference_release_retrieval(captions[i], sims[i], tau)
            )
            for i in range(n)
        ]
    )
    enriched = fusion.enrich(
        base, captions, sims, mix=beta, tau=tau, weighting="similarity"
    )
    np.testing.assert_allclose(enriched, expected, **TOLERANCE)


def test_similarity_mode_ignores_the_temperature():
    inputs = make_inputs(4)
    at = [
        fusion.enrich(
            inputs["image_emb"],
            inputs["image_nbrs"],
            inputs["image_sims"],
            mix=0.7,
            tau=tau,
            mask=inputs["image_mask"],
            weighting="similarity",
        )
        for tau in (0.01, 1.0, 100.0)
    ]
    np.testing.assert_allclose(at[0], at[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(at[0], at[2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
def test_enrich_matches_numpy(transform, weighting):
    inputs = make_inputs(5)
    args = [inputs[key] for key in ("image_emb", "image_nbrs", "image_sims")]
    enriched = TRANSFORMS[transform](fusion.enrich, weighting=weighting)(
        *args, mix=0.3, tau=0.1, mask=inputs["image_mask"]
    )
    expected = numpy_enrich(*args, 0.3, 0.1, inputs["image_mask"], weighting)
    np.testing.assert_allclose(enriched, expected, **TOLERANCE)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(enriched), axis=-1), 1.0, rtol=1e-6
    )


def test_enrich_works_on_extra_leading_axes():
    rng = np.random.default_rng(6)
    base = unit(rng.normal(size=(2, 3, 8))).astype(np.float32)
    neighbours = unit(rng.normal(size=(2, 3, 4, 8))).astype(np.float32)
    sims = rng.uniform(size=(2, 3, 4)).astype(np.float32)
    mask = rng.uniform(size=(2, 3, 4)) > 0.5
    enriched = fusion.enrich(base, neighbours, sims, mix=0.5, tau=0.2, mask=mask)
    expected = numpy_enrich(base, neighbours, sims, 0.5, 0.2, mask)
    np.testing.assert_allclose(enriched, expected, **TOLERANCE)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_query_without_neighbours_keeps_its_base_embedding_exactly(transform):
    inputs = make_inputs(7)
    base = inputs["image_emb"] * np.float32(1.01)  # not unit: must not be touched
    enriched = TRANSFORMS[transform](fusion.enrich)(
        base,
        inputs["image_nbrs"],
        inputs["image_sims"],
        mix=0.9,
        tau=0.01,
        mask=inputs["image_mask"],
    )
    assert not inputs["image_mask"][0].any()
    np.testing.assert_array_equal(np.asarray(enriched)[0], base[0])
    assert not np.allclose(np.asarray(enriched)[1], base[1])


def test_zero_mix_returns_base_exactly():
    inputs = make_inputs(8)
    base = inputs["image_emb"]
    enriched = fusion.enrich(
        base, inputs["image_nbrs"], inputs["image_sims"], mix=0.0, tau=0.1
    )
    np.testing.assert_array_equal(enriched, base)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
def test_alpha_beta_zero_gives_exactly_the_zero_shot_logits(transform, weighting):
    # Multiples of 1/8 in [-1, 1] make every product and partial sum exact in
    # float32, so NumPy's z @ W.T is the one right answer, bit for bit.
    rng = np.random.default_rng(9)
    inputs = make_inputs(9, n=10, c=6, d=16)
    inputs["image_emb"] = rng.integers(-8, 9, size=(10, 16)).astype(np.float32) / 8
    inputs["class_emb"] = rng.integers(-8, 9, size=(6, 16)).astype(np.float32) / 8
    logits = TRANSFORMS[transform](fusion.core_logits, weighting=weighting)(
        *inputs.values(), alpha=0.0, beta=0.0, tau_i2t=0.01, tau_t2t=0.01
    )
    np.testing.assert_array_equal(logits, inputs["image_emb"] @ inputs["class_emb"].T)


def test_alpha_beta_zero_equals_plain_matmul_on_unit_embeddings():
    inputs = make_inputs(10, n=9, c=7, d=32)
    logits = fusion.core_logits(
        *inputs.values(), alpha=0.0, beta=0.0, tau_i2t=1.0, tau_t2t=1.0
    )
    plain = jnp.matmul(
        inputs["image_emb"],
        inputs["class_emb"].T,
        precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_array_equal(logits, plain)


def test_alpha_beta_one_uses_retrieval_alone():
    inputs = make_inputs(11, masked_rows=False)
    logits = fusion.core_logits(
        *inputs.values(), alpha=1.0, beta=1.0, tau_i2t=0.1, tau_t2t=0.01
    )
    r = unit(
        np.einsum(
            "nk,nkd->nd",
            numpy_softmax_weights(inputs["image_sims"], 0.1, inputs["image_mask"]),
            inputs["image_nbrs"],
        )
    )
    big_r = unit(
        np.einsum(
            "ck,ckd->cd",
            numpy_softmax_weights(inputs["class_sims"], 0.01, inputs["class_mask"]),
            inputs["class_nbrs"],
        )
    )
    np.testing.assert_allclose(logits, r @ big_r.T, **TOLERANCE)


@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
@pytest.mark.parametrize(
    "sizes",
    [
        dict(n=1, c=1, k=1, k_class=1, d=4),
        dict(n=6, c=5),
        dict(n=13, c=9, k=10, k_class=7, d=24),
    ],
)
@pytest.mark.parametrize("point", [(0.2, 0.7, 0.01, 0.01), (0.9, 0.1, 10.0, 0.1)])
def test_core_logits_match_numpy(weighting, sizes, point):
    inputs = make_inputs(12, masked_rows=sizes["n"] > 1, **sizes)
    alpha, beta, tau_i2t, tau_t2t = point
    logits = jitted(fusion.core_logits, weighting=weighting)(
        *inputs.values(), alpha=alpha, beta=beta, tau_i2t=tau_i2t, tau_t2t=tau_t2t
    )
    expected = numpy_core_logits(inputs, alpha, beta, tau_i2t, tau_t2t, weighting)
    assert logits.shape == (sizes["n"], sizes["c"])
    np.testing.assert_allclose(logits, expected, **TOLERANCE)


def test_masks_may_be_none():
    inputs = make_inputs(13)
    inputs["image_mask"] = None
    inputs["class_mask"] = None
    logits = fusion.core_logits(
        *inputs.values(), alpha=0.5, beta=0.5, tau_i2t=0.1, tau_t2t=0.1
    )
    everything = make_inputs(13)
    everything["image_mask"] = np.ones_like(everything["image_mask"])
    everything["class_mask"] = np.ones_like(everything["class_mask"])
    np.testing.assert_allclose(
        logits, numpy_core_logits(everything, 0.5, 0.5, 0.1, 0.1), **TOLERANCE
    )


def test_class_side_always_uses_softmax():
    inputs = make_inputs(14)
    by_weighting = [
        fusion.core_logits(
            *inputs.values(),
            alpha=0.6,
            beta=0.0,
            tau_i2t=0.1,
            tau_t2t=0.1,
            weighting=weighting,
        )
        for weighting in fusion.WEIGHTINGS
    ]
    np.testing.assert_array_equal(by_weighting[0], by_weighting[1])


def test_vmap_over_temperatures_and_mixes():
    inputs = make_inputs(15)
    taus = jnp.array([1e-4, 0.01, 1.0, 1e4], jnp.float32)
    mixes = jnp.array([0.0, 0.25, 0.5, 1.0], jnp.float32)

    def at(alpha, beta, tau_i2t, tau_t2t):
        return fusion.core_logits(
            *inputs.values(), alpha=alpha, beta=beta, tau_i2t=tau_i2t, tau_t2t=tau_t2t
        )

    batched = jax.jit(jax.vmap(at))(mixes, mixes[::-1], taus, taus[::-1])
    assert batched.shape == (4, 6, 5)
    for i in range(4):
        expected = numpy_core_logits(
            inputs,
            float(mixes[i]),
            float(mixes[::-1][i]),
            float(taus[i]),
            float(taus[::-1][i]),
        )
        np.testing.assert_allclose(batched[i], expected, **TOLERANCE)


def test_scalars_may_be_zero_dimensional_arrays():
    inputs = make_inputs(16)
    logits = fusion.core_logits(
        *inputs.values(),
        alpha=np.float32(0.3),
        beta=jnp.asarray(0.4),
        tau_i2t=jnp.asarray(0.05),
        tau_t2t=np.asarray(0.2),
    )
    np.testing.assert_allclose(
        logits, numpy_core_logits(inputs, 0.3, 0.4, 0.05, 0.2), **TOLERANCE
    )


def test_unknown_weighting_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="'cosine'.*softmax.*similarity"):
        fusion.retrieval_weights(np.ones((2, 3), np.float32), 1.0, weighting="cosine")


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_non_positive_temperature_is_refused(tau):
    with pytest.raises(ValueError, match=f"tau={tau}"):
        fusion.retrieval_weights(np.ones((2, 3), np.float32), tau)


def test_mismatched_shapes_are_refused():
    inputs = make_inputs(17)
    inputs["class_emb"] = inputs["class_emb"][:, :-1]
    with pytest.raises(AssertionError):
        fusion.core_logits(
            *inputs.values(), alpha=0.5, beta=0.5, tau_i2t=0.1, tau_t2t=0.1
        )


def test_normalize_leaves_zero_vectors_at_zero():
    x = np.array([[0.0, 0.0], [3.0, 4.0]], np.float32)
    np.testing.assert_allclose(fusion.normalize(x), [[0.0, 0.0], [0.6, 0.8]])


def test_traced_zero_temperature_is_not_checked_and_metrics_refuse_the_result():
    # Under jit with the temperature as an argument its value is unknown when
    # tracing, so tau_t2t = 0 is not refused here; sims / 0 makes the class
    # weights inf / inf = NaN. The metrics must then refuse the logits rather
    # than score them (every comparison with NaN is False).
    from core_jax import metrics

    inputs = make_inputs(18)
    logits = jax.jit(
        lambda tau: fusion.core_logits(
            *inputs.values(), alpha=0.5, beta=0.5, tau_i2t=0.1, tau_t2t=tau
        )
    )(jnp.float32(0.0))
    assert not np.isfinite(np.asarray(logits)).all()
    labels = np.zeros(len(inputs["image_emb"]), np.int32)
    with pytest.raises(metrics.NonFiniteScoresError, match="temperature of 0"):
        metrics.top_k_accuracy(logits, labels, 1)
