"""Retrieval-enriched embeddings and logits: the CoRE method as pure functions.

Notation (all embeddings L2-normalised, `normalize(x) = x / max(||x||, eps)`):

    image side   r_q  = normalize(sum_j w_j t_j),  w = weights(s / tau_i2t)
                 z_q+ = normalize((1 - beta) z_q + beta r_q)
    class side   R_c  = normalize(sum_j w_j T_cj), w = softmax(s / tau_t2t)
                 W_c+ = normalize((1 - alpha) W_c + alpha R_c)
    logits       z+ @ W+.T                                        (N, C)

Everything here is jit-able and vmap-able; the scalars `alpha`, `beta`, `tau_*`
and `mix`, `tau` may be Python floats or 0-d arrays, so a grid search can vmap
over them. Matrix products run at `Precision.HIGHEST`: on TPUs the default
float32 matmul uses bfloat16 passes, which is enough to reorder near-tied
classes.

Two weightings of the retrieved neighbours are offered:

- `"softmax"` (the paper): `w = softmax(s / tau)` over the kept neighbours,
  computed after subtracting the row maximum, so tau = 1e-4 (exponents of
  1e4) stays finite.
- `"similarity"` (the reference release's image side): `w = s * tau`, then
  L1-normalised, `w / sum_j |w_j|`. The release multiplies each caption
  embedding by `similarity * temperature`, sums, and L2-normalises the sum;
  any positive rescaling of the weights leaves that normalised sum
  unchanged, so the temperature has no effect there and none here. Dividing
  by the sum of absolute values (rather than the signed sum) keeps the
  weights summing to 1 whenever the similarities are non-negative, and never
  flips the direction of the sum when they are not.

Neighbours masked out (padding, near-duplicates) get weight 0. A row with no
neighbour at all, or a mix of exactly 0, returns its base embedding unchanged
(bit for bit), so `alpha = beta = 0` gives exactly the zero-shot logits
`z @ W.T`.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

Weighting = Literal["softmax", "similarity"]
WEIGHTINGS = ("softmax", "similarity")

EPS = 1e-12
_HIGHEST = jax.lax.Precision.HIGHEST


def normalize(x: jax.Array, eps: float = EPS) -> jax.Array:
    """`x / max(||x||, eps)` along the last axis.

    Args:
      x: vectors, shape (..., D).
      eps: floor on the norm, so a zero vector stays zero instead of NaN.

    Returns:
      Unit vectors (or zeros), shape (..., D).
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"weighting={weighting!r} is not supported; expected one of {WEIGHTINGS}"
        )


def _check_scalar(name: str, value, *, positive: bool) -> None:
    """Checks a scalar hyper-parameter when its value is known at trace time."""
    if isinstance(value, jax.core.Tracer):
        return
    array = np.asarray(value)
    if array.ndim != 0:
        raise ValueError(
            f"{name} must be a scalar, got an array of shape {array.shape}"
        )
    if positive and not float(array) > 0:
        raise ValueError(f"{name}={float(array)} must be > 0")


def _full_mask(sims: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(sims.shape, dtype=bool)
    chex.assert_equal_shape([sims, mask])
    return mask.astype(bool)


def retrieval_weights(
    sims: jax.Array,
    tau,
    *,
    mask: jax.Array | None = None,
    weighting: Weighting = "softmax",
) -> jax.Array:
    """Weights of the retrieved neighbours of each query.

    softmax:    w_j = exp((s_j - m) / tau) / sum_{i kept} exp((s_i - m) / tau),
                m = max_{i kept} s_i
    similarity: w_j = s_j tau / sum_{i kept} |s_i tau|

    Masked neighbours get w_j = 0; a row with every neighbour masked (or, for
    "similarity", every kept similarity 0) gets all-zero weights.

    Args:
      sims: similarities of the neighbours to their query, shape (..., k).
      tau: temperature, > 0; a Python float or a 0-d array.
      mask: True for neighbours to use, shape (..., k); None keeps all.
      weighting: "softmax" (the paper) or "similarity" (the reference
        release's image side).

    Returns:
      float32 weights, shape (..., k); each row sums to 1 or is all zeros.
    """
    _check_weighting(weighting)
    _check_scalar("tau", tau, positive=True)
    sims = jnp.asarray(sims, dtype=jnp.promote_types(sims.dtype, jnp.float32))
    mask = _full_mask(sims, mask)
    tau = jnp.asarray(tau, dtype=sims.dtype)

    if weighting == "softmax":
        scaled = sims / tau
        row_max = jnp.max(jnp.where(mask, scaled, -jnp.inf), axis=-1, keepdims=True)
        # An all-masked row has max -inf; any finite value avoids inf - inf.
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        shifted = jnp.where(mask, scaled - row_max, 0.0)
        unnormalised = jnp.where(mask, jnp.exp(shifted), 0.0)
        total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    else:
        unnormalised = jnp.where(mask, sims * tau, 0.0)
        total = jnp.sum(jnp.abs(unnormalised), axis=-1, keepdims=True)

    return unnormalised / jnp.where(total > 0, total, 1.0)


def retrieval_embedding(
    neighbours: jax.Array,
    sims: jax.Array,
    tau,
    *,
    mask: jax.Array | None = None,
    weighting: Weighting = "softmax",
) -> jax.Array:
    """The normalised weighted sum of the neighbours, r = normalize(sum_j w_j t_j).

    Args:
      neighbours: neighbour embeddings t_j, shape (..., k, D).
      sims: their similarities to the query, shape (..., k).
      tau: temperature, > 0.
      mask: True for neighbours to use, shape (..., k); None keeps all.
      weighting: see `retrieval_weights`.

    Returns:
      r, shape (..., D); all zeros for a row with no usable neighbour.
    """
    chex.assert_rank(neighbours, sims.ndim + 1)
    chex.assert_equal_shape_prefix([neighbours, sims], sims.ndim)
    weights = retrieval_weights(sims, tau, mask=mask, weighting=weighting)
    summed = jnp.einsum(
        "...k,...kd->...d",
        weights.astype(neighbours.dtype),
        neighbours,
        precision=_HIGHEST,
    )
    return normalize(summed)


def enrich(
    base: jax.Array,
    neighbours: jax.Array,
    sims: jax.Array,
    *,
    mix,
    tau,
    mask: jax.Array | None = None,
    weighting: Weighting = "softmax",
) -> jax.Array:
    """Mixes each base embedding with the embedding of its retrieved neighbours.

        base+ = normalize((1 - mix) base + mix r),  r = retrieval_embedding(...)

    `base` comes back unchanged (not re-normalised) where `mix == 0` or the row
    has no unmasked neighbour, so base embeddings are expected to be unit-norm
    already.

    `mix` and `tau` are checked only when their values are known at trace
    time (Python floats or concrete arrays). Traced values, e.g. under `jit`
    with them as arguments or under `vmap` over a grid, are not checked: a
    traced tau of 0 gives NaN or inf embeddings rather than an error, which
    `core_jax.metrics` then refuses.

    Args:
      base: query or class embeddings, shape (..., D).
      neighbours: retrieved caption embeddings, shape (..., k, D).
      sims: their similarities, shape (..., k).
      mix: weight of the retrieval embedding, in [0, 1] (beta on the image
        side, alpha on the class side).
      tau: temperature, > 0.
      mask: True for neighbours to use, shape (..., k); None keeps all.
      weighting: see `retrieval_weights`.

    Returns:
      base+, shape (..., D), dtype of `base`.
    """
    chex.assert_rank(neighbours, base.ndim + 1)
    chex.assert_equal_shape_prefix([base, neighbours, sims], base.ndim - 1)
    chex.assert_equal(neighbours.shape[-1], base.shape[-1])
    chex.assert_equal(sims.shape[-1], neighbours.shape[-2])
    _check_scalar("mix", mix, positive=False)
    mask = _full_mask(sims, mask)

    retrieved = retrieval_embedding(
        neighbours, sims, tau, mask=mask, weighting=weighting
    ).astype(base.dtype)
    mix = jnp.asarray(mix, dtype=base.dtype)
    mixed = normalize((1 - mix) * base + mix * retrieved)

    keep_base = jnp.logical_or(mix == 0, ~jnp.any(mask, axis=-1, keepdims=True))
    return jnp.where(keep_base, base, mixed)


def core_logits(
    image_emb: jax.Array,
    image_nbrs: jax.Array,
    image_sims: jax.Array,
    image_mask: jax.Array | None,
    class_emb: jax.Array,
    class_nbrs: jax.Array,
    class_sims: jax.Array,
    class_mask: jax.Array | None,
    *,
    alpha,
    beta,
    tau_i2t,
    tau_t2t,
    weighting: Weighting = "softmax",
) -> jax.Array:
    """CoRE logits, `z+ @ W+.T`.

        z+ = enrich(z, image neighbours, mix=beta,  tau=tau_i2t, weighting)
        W+ = enrich(W, class neighbours, mix=alpha, tau=tau_t2t, "softmax")

    The class side always uses the softmax, as both the paper and the
    reference release do; `weighting` selects the image side's. With
    `alpha = beta = 0` the result is exactly `image_emb @ class_emb.T`.

    The mixes and temperatures are checked only when their values are known
    at trace time. Traced ones (arguments of a `jit`ted caller, or vmapped
    over a grid) are not: a traced temperature of 0 yields NaN or inf logits
    instead of an error, which `core_jax.metrics` then refuses.

    Args:
      image_emb: z, SigLIP image embeddings, shape (N, D).
      image_nbrs: their i2t neighbours' SigLIP text embeddings, (N, k, D).
      image_sims: image-to-caption similarities, (N, k).
      image_mask: True for neighbours to use, (N, k), or None.
      class_emb: W, zero-shot class prototypes, (C, D).
      class_nbrs: the t2t neighbours' SigLIP text embeddings, (C, k', D).
      class_sims: t2t similarities, (C, k').
      class_mask: True for neighbours to use, (C, k'), or None.
      alpha: class-side mix, in [0, 1].
      beta: image-side mix, in [0, 1].
      tau_i2t: image-side temperature, > 0.
      tau_t2t: class-side temperature, > 0.
      weighting: the image side's weighting, "softmax" or "similarity".

    Returns:
      Logits, shape (N, C).
    """
    chex.assert_rank([image_emb, image_nbrs, image_sims], [2, 3, 2])
    chex.assert_rank([class_emb, class_nbrs, class_sims], [2, 3, 2])
    chex.assert_equal(image_emb.shape[-1], class_emb.shape[-1])

    images = enrich(
        image_emb,
        image_nbrs,
        image_sims,
        mix=beta,
        tau=tau_i2t,
        mask=image_mask,
        weighting=weighting,
    )
    classes = enrich(
        class_emb,
        class_nbrs,
        class_sims,
        mix=alpha,
        tau=tau_t2t,
        mask=class_mask,
        weighting="softmax",
    )
    return jnp.matmul(images, classes.T, precision=_HIGHEST)
