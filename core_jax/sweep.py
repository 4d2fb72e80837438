"""Grid search over alpha x beta x tau_i2t x tau_t2t in one compiled call.

Every grid point needs the logits

    z+_n . W+_c,  z+ = normalize((1 - b) z + b r),  W+ = normalize((1 - a) W + a R)

where r depends only on tau_i2t and R only on tau_t2t. Expanding the
products, the un-normalised score is bilinear in the four (N, C) blocks

    (1-b)(1-a) zW  +  (1-b) a zR  +  b (1-a) rW  +  b a rR

and the norms are per-row and per-column scalars:

    ||(1-b) z_n + b r_n||^2 = (1-b)^2 ||z_n||^2 + b^2 ||r_n||^2 + 2b(1-b) z_n.r_n
    ||(1-a) W_c + a R_c||^2 = (1-a)^2 ||W_c||^2 + a^2 ||R_c||^2 + 2a(1-a) W_c.R_c

So four matrix products per (tau_i2t, tau_t2t) pair (zW once, zR once per
tau_t2t, rW once per tau_i2t) give every (alpha, beta) point by
element-wise arithmetic. `decomposed_logits` returns those logits for
inspection; the accuracy path leaves out the per-row norm, a positive factor
per image that cannot change the order of its classes.

Rows and classes without any unmasked neighbour keep their base embedding,
as in `fusion.enrich`: their effective mix is 0. A mix of exactly 0 uses the
base embedding unchanged, so alpha = beta = 0 reproduces the zero-shot
logits `z @ W.T` bit for bit.

Acc@k counts use the tie rule of `core_jax.metrics` (the true class loses a
tie only to classes of lower index). Memory is bounded by processing the
images in chunks on the host and the grid sequentially per tau pair and
alpha inside the compiled call; the betas of one alpha are vectorised.
The class side (W and R for every tau_t2t, Tt * C * D floats) is replicated
on every device, so it must fit on one: about 230 MB for 10,000 classes at
D = 1152 with five temperatures. Images are split over the mesh's "batch"
axis; the class axis is not split here (`sharding.core_logits_on_mesh` can
split it for the logits at one point).

Best point: the highest Acc@1 on the split the sweep ran on (the few-shot
"train" split); among equal Acc@1 (compared as integer counts), the first
point in grid order, i.e. the smallest index in (alpha, beta, tau_i2t,
tau_t2t) lexicographically, as the grid values are listed. With the default
ascending grid that favours the smallest alpha, then beta: the least change
from zero-shot. When the zero-shot baseline is included it is considered
first and so wins ties.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from core_jax import fusion, metrics, sharding

DEFAULT_MIXES = tuple(round(0.1 * i, 1) for i in range(1, 11))
DEFAULT_TAUS = (0.01, 0.1, 1.0, 10.0, 100.0)
TOP_KS = (1, 5)
DEFAULT_MEMORY_BUDGET = 512 * 2**20
CACHE_BLOCK_ELEMENTS = 2**16

_HIGHEST = jax.lax.Precision.HIGHEST


class ImageSet(NamedTuple):
    """Query images of one split with their i2t neighbours.

    Attributes:
      emb: SigLIP image embeddings z, (N, D).
      nbrs: the neighbours' SigLIP text embeddings, (N, k, D).
      sims: image-to-caption similarities, (N, k).
      mask: True for neighbours to use, (N, k), or None for all.
      labels: true classes, (N,) integers in [0, C).
    """

    emb: np.ndarray
    nbrs: np.ndarray
    sims: np.ndarray
    mask: np.ndarray | None
    labels: np.ndarray


class ClassSet(NamedTuple):
    """Class prototypes with their t2t neighbours.

    Attributes:
      emb: zero-shot prototypes W, (C, D).
      nbrs: the neighbours' SigLIP text embeddings, (C, k, D).
      sims: t2t similarities, (C, k).
      mask: True for neighbours to use, (C, k), or None for all.
    """

    emb: np.ndarray
    nbrs: np.ndarray
    sims: np.ndarray
    mask: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Grid:
    """The hyper-parameter values to try; the reference's grid by default."""

    alphas: tuple[float, ...] = DEFAULT_MIXES
    betas: tuple[float, ...] = DEFAULT_MIXES
    taus_i2t: tuple[float, ...] = DEFAULT_TAUS
    taus_t2t: tuple[float, ...] = DEFAULT_TAUS

    def __post_init__(self):
        for name in ("alphas", "betas", "taus_i2t", "taus_t2t"):
            values = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)
            if not values:
                raise ValueError(f"grid {name} is empty")
            for value in values:
                if name.startswith("tau") and not (np.isfinite(value) and value > 0):
                    raise ValueError(
                        f"grid {name} holds {value}; taus must be finite and > 0"
                    )
                if name in ("alphas", "betas") and not 0 <= value <= 1:
                    raise ValueError(
                        f"grid {name} holds {value}; mixes must lie in [0, 1]"
                    )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(A, B, Ti, Tt)."""
        return (
            len(self.alphas),
            len(self.betas),
            len(self.taus_i2t),
            len(self.taus_t2t),
        )

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def point(self, index: Sequence[int]) -> GridPoint:
        a, b, i, t = index
        return GridPoint(
            alpha=self.alphas[a],
            beta=self.betas[b],
            tau_i2t=self.taus_i2t[i],
            tau_t2t=self.taus_t2t[t],
        )


@dataclasses.dataclass(frozen=True)
class GridPoint:
    alpha: float
    beta: float
    tau_i2t: float
    tau_t2t: float


@dataclasses.dataclass(frozen=True)
class BestPoint:
    """The chosen hyper-parameters and their accuracies on the sweep's split.

    Attributes:
      point: alpha, beta, tau_i2t, tau_t2t. For the zero-shot baseline alpha =
        beta = 0 and the taus are the grid's first (they have no effect).
      index: (a, b, i, t) into the grid, or None for the zero-shot baseline.
      acc1, acc5: Acc@1 and Acc@5 at that point.
    """

    point: GridPoint
    index: tuple[int, int, int, int] | None
    acc1: float
    acc5: float

    @property
    def is_zero_shot(self) -> bool:
        return self.index is None


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """Accuracies at every grid point of one split.

    Attributes:
      grid: the grid swept.
      weighting: the image side's weighting.
      num_images: N, padding excluded.
      correct1, correct5: int64 counts of Acc@1 / Acc@5 hits, (A, B, Ti, Tt).
      zero_shot_correct1, zero_shot_correct5: the same for alpha = beta = 0
        (plain `z @ W.T`), or None when not computed.
    """

    grid: Grid
    weighting: str
    num_images: int
    correct1: np.ndarray
    correct5: np.ndarray
    zero_shot_correct1: int | None = None
    zero_shot_correct5: int | None = None

    @property
    def acc1(self) -> np.ndarray:
        """Acc@1, (A, B, Ti, Tt)."""
        return self.correct1 / max(self.num_images, 1)

    @property
    def acc5(self) -> np.ndarray:
        """Acc@5, (A, B, Ti, Tt)."""
        return self.correct5 / max(self.num_images, 1)

    @property
    def zero_shot_acc1(self) -> float | None:
        if self.zero_shot_correct1 is None:
            return None
        return self.zero_shot_correct1 / max(self.num_images, 1)

    @property
    def zero_shot_acc5(self) -> float | None:
        if self.zero_shot_correct5 is None:
            return None
        return self.zero_shot_correct5 / max(self.num_images, 1)

    def best(self, *, include_zero_shot: bool = False) -> BestPoint:
        """The point with the highest Acc@1; ties as in the module doc.

        Args:
          include_zero_shot: let alpha = beta = 0 compete (it wins ties).

        Returns:
          The chosen point with its Acc@1 and Acc@5.
        """
        flat = int(np.argmax(self.correct1.reshape(-1)))  # first maximum
        index = tuple(int(i) for i in np.unravel_index(flat, self.grid.shape))
        best = BestPoint(
            point=self.grid.point(index),
            index=index,
            acc1=float(self.acc1[index]),
            acc5=float(self.acc5[index]),
        )
        if include_zero_shot:
            if self.zero_shot_correct1 is None:
                raise ValueError(
                    "include_zero_shot=True but the sweep ran without the "
                    "zero-shot baseline; run it with include_zero_shot=True"
                )
            if self.zero_shot_correct1 >= self.correct1[index]:
                best = BestPoint(
                    point=GridPoint(
                        alpha=0.0,
                        beta=0.0,
                        tau_i2t=self.grid.taus_i2t[0],
                        tau_t2t=self.grid.taus_t2t[0],
                    ),
                    index=None,
                    acc1=self.zero_shot_acc1,
                    acc5=self.zero_shot_acc5,
                )
        return best

    def rows(self) -> list[dict[str, float]]:
        """One dict per grid point (alpha, beta, tau_i2t, tau_t2t, acc1, acc5)."""
        rows = []
        for index in itertools.product(*(range(n) for n in self.grid.shape)):
            point = self.grid.point(index)
            rows.append(
                dict(
                    dataclasses.asdict(point),
                    acc1=float(self.acc1[index]),
                    acc5=float(self.acc5[index]),
                )
            )
        return rows


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """Hyper-parameters chosen on one split and applied once to another.

    Attributes:
      sweep: the sweep on the tuning ("train") split.
      best: the point chosen there.
      test_logits: logits on the evaluation ("test") split at `best`, (N, C).
      test_acc1, test_acc5, test_balanced_acc1: its metrics there.
      test_zero_shot_acc1, test_zero_shot_acc5: plain zero-shot on "test".
    """

    sweep: SweepResult
    best: BestPoint
    test_logits: np.ndarray
    test_acc1: float
    test_acc5: float
    test_balanced_acc1: float
    test_zero_shot_acc1: float
    test_zero_shot_acc5: float


def _as_float32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _mask_or_all(mask, sims) -> np.ndarray:
    if mask is None:
        return np.ones(np.shape(sims), dtype=bool)
    return np.asarray(mask, dtype=bool)


def _check_inputs(images: ImageSet, classes: ClassSet) -> None:
    n, d = np.shape(images.emb)
    c, d_class = np.shape(classes.emb)
    expected = {
        "images.nbrs": (np.shape(images.nbrs), (n, None, d)),
        "images.sims": (np.shape(images.sims), (n, np.shape(images.nbrs)[1])),
        "images.labels": (np.shape(images.labels), (n,)),
        "classes.emb": ((c, d_class), (None, d)),
        "classes.nbrs": (np.shape(classes.nbrs), (c, None, d)),
        "classes.sims": (np.shape(classes.sims), (c, np.shape(classes.nbrs)[1])),
    }
    if images.mask is not None:
        expected["images.mask"] = (np.shape(images.mask), np.shape(images.sims))
    if classes.mask is not None:
        expected["classes.mask"] = (np.shape(classes.mask), np.shape(classes.sims))
    for name, (shape, want) in expected.items():
        ok = len(shape) == len(want) and all(
            w is None or s == w for s, w in zip(shape, want, strict=True)
        )
        if not ok:
            pattern = tuple("*" if w is None else w for w in want)
            raise ValueError(f"{name} has shape {shape}; expected {pattern}")
    metrics.check_labels(images.labels, c)
    image_mask = _mask_or_all(images.mask, images.sims)
    class_mask = _mask_or_all(classes.mask, classes.sims)
    _check_finite("image embeddings", images.emb)
    # A masked-out neighbour still enters the weighted sum with weight 0,
    # and 0 * NaN is NaN, so every neighbour embedding must be finite;
    # masked-out similarities are never read (search pads them with -inf).
    _check_finite("image neighbour embeddings", images.nbrs)
    _check_finite("image neighbour similarities", images.sims, image_mask)
    _check_finite("class embeddings", classes.emb)
    _check_finite("class neighbour embeddings", classes.nbrs)
    _check_finite("class neighbour similarities", classes.sims, class_mask)


class NonFiniteInputError(ValueError):
    """An input array of the sweep holds NaN or infinite values."""


def _check_finite(name: str, values, used=None) -> None:
    """Raises `NonFiniteInputError` naming `name` if a used entry is not finite.

    Args:
      name: what the array is, for the message.
      values: (rows, ...) floats.
      used: bool, shape of `values` or a prefix of it; entries where it is
        False are not checked. None checks everything.
    """
    values = np.asarray(values)
    if not values.size or not np.issubdtype(values.dtype, np.inexact):
        return
    bad = ~np.isfinite(values)
    if used is not None:
        used = np.asarray(used, bool)
        bad &= used.reshape(used.shape + (1,) * (values.ndim - used.ndim))
    if not bad.any():
        return
    rows = np.flatnonzero(bad.reshape(values.shape[0], -1).any(axis=1))
    kinds = " or ".join(
        kind
        for kind, found in (
            ("NaN", np.isnan(values[bad]).any()),
            ("inf", np.isinf(values[bad]).any()),
        )
        if found
    )
    raise NonFiniteInputError(
        f"{name}: {rows.size} of {values.shape[0]} row(s) contain {kinds}, "
        f"first row {int(rows[0])}"
    )


def _class_side(class_emb, class_nbrs, class_sims, class_mask, alphas, taus_t2t):
    """Class-side quantities shared by every image chunk.

    Returns:
      R (Tt, C, D) retrieval prototypes; mix (A, C) the effective alpha per
      class (0 where a class has no neighbour); inverse_norm (A, Tt, C), the
      reciprocal norm of (1-a) W + a R (1 where the effective alpha is 0).
    """
    retrieved = jax.vmap(
        lambda tau: fusion.retrieval_embedding(
            class_nbrs, class_sims, tau, mask=class_mask, weighting="softmax"
        )
    )(taus_t2t)
    has_neighbours = jnp.any(class_mask, axis=-1)
    mix = alphas[:, None] * has_neighbours[None, :]

    ww = jnp.sum(jnp.square(class_emb), axis=-1)
    wr = jnp.einsum("cd,tcd->tc", class_emb, retrieved, precision=_HIGHEST)
    rr = jnp.sum(jnp.square(retrieved), axis=-1)
    a = mix[:, None, :]
    squared = (1 - a) ** 2 * ww + a**2 * rr + 2 * a * (1 - a) * wr
    norm = jnp.maximum(jnp.sqrt(jnp.maximum(squared, 0.0)), fusion.EPS)
    inverse_norm = jnp.where(a == 0, 1.0, 1.0 / norm)
    return retrieved, mix, inverse_norm


def _image_side(image_emb, image_nbrs, image_sims, image_mask, taus_i2t, weighting):
    """r (Ti, n, D) for every tau_i2t, and whether each row has a neighbour."""
    retrieved = jax.vmap(
        lambda tau: fusion.retrieval_embedding(
            image_nbrs, image_sims, tau, mask=image_mask, weighting=weighting
        )
    )(taus_i2t)
    return retrieved, jnp.any(image_mask, axis=-1)


def _hits(from_image, difference, row_mix, labels, valid, ks):
    """Hit counts at each k for scores `from_image + row_mix * difference`.

    Ranks are counted on margins to the true class, (s_c - s_true), expanded
    as (f_c - f_true) + b (d_c - d_true): classes identical to the true one
    have margins of exactly 0 and tie by index as in `metrics`, the true
    class has margin 0 and never counts itself, and at b = 0 the sign of the
    margin is exactly the order of `from_image`. The scores themselves are
    never materialised, so XLA fuses each beta's count into one pass.

    Args:
      from_image: scores at beta = 0, (n, C).
      difference: scores at beta = 1 minus those at beta = 0, (n, C), or
        None for the plain scores `from_image`.
      row_mix: effective beta per grid beta and row, (B, n).
      labels: (n,). valid: (n,) False for padding rows. ks: static ks.

    Returns:
      int32 hits, (B, len(ks)).
    """
    true_class = labels[:, None]
    margin = from_image - jnp.take_along_axis(from_image, true_class, axis=1)
    if difference is not None:
        slope = difference - jnp.take_along_axis(difference, true_class, axis=1)
        margin = margin[None] + row_mix[:, :, None] * slope[None]
    else:
        margin = jnp.broadcast_to(margin, (row_mix.shape[0], *margin.shape))
    num_classes = from_image.shape[1]
    before = jnp.arange(num_classes)[None, :] < true_class
    ahead = jnp.where(before, margin >= 0, margin > 0)
    # Comparisons with NaN are False, which would rank the true class first:
    # a row holding any non-finite score gets rank C or worse instead, a hit
    # at no k once k is capped at C. Adding C per non-finite margin keeps
    # this to one pass over the margins; past C = 46340 those sums could
    # overflow int32, so a separate check of the row is made instead.
    finite = jnp.isfinite(margin)
    if num_classes * num_classes < 2**31:
        ahead = jnp.where(finite, ahead.astype(jnp.int32), num_classes)
        rank = jnp.sum(ahead, axis=-1, dtype=jnp.int32)  # (B, n)
    else:
        rank = jnp.sum(ahead, axis=-1, dtype=jnp.int32)
        rank = jnp.where(jnp.all(finite, axis=-1), rank, num_classes)
    return jnp.stack(
        [
            jnp.sum(valid & (rank < min(k, num_classes)), axis=-1, dtype=jnp.int32)
            for k in ks
        ],
        axis=-1,
    )


def _chunk_hits(
    image_emb,
    image_nbrs,
    image_sims,
    image_mask,
    labels,
    valid,
    class_emb,
    class_retrieved,
    class_mix,
    class_inverse_norm,
    betas,
    taus_i2t,
    *,
    weighting,
    ks,
):
    """Hit counts for one chunk of images at every grid point.

    Returns:
      (grid hits (len(ks), A, B, Ti, Tt), zero-shot hits (len(ks),)), int32.
    """
    num_alphas, num_tau_t2t = class_inverse_norm.shape[:2]
    num_tau_i2t = taus_i2t.shape[0]

    image_retrieved, has_neighbours = _image_side(
        image_emb, image_nbrs, image_sims, image_mask, taus_i2t, weighting
    )
    z_w = jnp.matmul(image_emb, class_emb.T, precision=_HIGHEST)
    z_rc = jnp.einsum("nd,tcd->tnc", image_emb, class_retrieved, precision=_HIGHEST)
    r_w = jnp.einsum("snd,cd->snc", image_retrieved, class_emb, precision=_HIGHEST)
    zero_shot = _hits(z_w, None, jnp.zeros((1, z_w.shape[0])), labels, valid, ks)[0]

    def per_tau_pair(pair):
        s, t = pair // num_tau_t2t, pair % num_tau_t2t
        r_rc = jnp.matmul(image_retrieved[s], class_retrieved[t].T, precision=_HIGHEST)

        def per_alpha(a):
            mix, inverse_norm = class_mix[a], class_inverse_norm[a, t]
            # Column-normalised scores at beta = 0 (image z) and beta = 1 (r).
            from_image = ((1 - mix) * z_w + mix * z_rc[t]) * inverse_norm
            from_retrieval = ((1 - mix) * r_w[s] + mix * r_rc) * inverse_norm
            difference = from_retrieval - from_image
            row_mix = betas[:, None] * has_neighbours[None, :]
            return _hits(from_image, difference, row_mix, labels, valid, ks)

        return jax.lax.map(per_alpha, jnp.arange(num_alphas))

    pairs = jax.lax.map(per_tau_pair, jnp.arange(num_tau_i2t * num_tau_t2t))
    num_betas = betas.shape[0]
    pairs = pairs.reshape(num_tau_i2t, num_tau_t2t, num_alphas, num_betas, len(ks))
    return jnp.transpose(pairs, (4, 2, 3, 0, 1)), zero_shot


@functools.lru_cache(maxsize=16)
def _compiled_class_side(mesh: Mesh | None):
    if mesh is None:
        return jax.jit(_class_side)
    replicated = sharding.replicated(mesh)
    return jax.jit(_class_side, in_shardings=replicated, out_shardings=replicated)


@functools.lru_cache(maxsize=16)
def _compiled_chunk_hits(mesh: Mesh | None, weighting: str, ks: tuple[int, ...]):
    compute = functools.partial(_chunk_hits, weighting=weighting, ks=ks)
    if mesh is None:
        return jax.jit(compute)
    rows = [sharding.batch_sharding(mesh, ndim) for ndim in (2, 3, 2, 2, 1, 1)]
    replicated = sharding.replicated(mesh)
    return jax.jit(
        compute,
        in_shardings=(*rows, *([replicated] * 6)),
        out_shardings=replicated,
    )


def default_chunk_size(
    grid: Grid,
    num_classes: int,
    k: int,
    dim: int,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    devices: int = 1,
) -> int:
    """Images per compiled call: cache-sized blocks within `memory_budget`.

    Each (n, C) block is passed over a few dozen times per tau pair, which is
    fastest while a block stays in cache (about 2**16 floats); below ~256
    rows the products with the (C, D) class matrices stop paying for
    reading them. The memory bound is an estimate of the float32 arrays
    alive per image: the neighbours and their weighted sums (k + Ti + 1
    vectors of D), and the (C,) blocks zW, zR per tau_t2t, rW per tau_i2t,
    rR, three per alpha and two per beta.

    Args:
      grid: the grid to sweep.
      num_classes, k, dim: C, neighbours per image, D.
      memory_budget: bytes per device.
      devices: devices the images are split over.

    Returns:
      A chunk size (images per call), at least 1.
    """
    num_alphas, num_betas, num_tau_i2t, num_tau_t2t = grid.shape
    per_row_vectors = (k + num_tau_i2t + 1) * dim
    per_row_blocks = (num_tau_t2t + num_tau_i2t + 5 + 2 * num_betas) * num_classes
    per_row_bytes = 4 * (per_row_vectors + per_row_blocks)
    cache_rows = max(256, CACHE_BLOCK_ELEMENTS // num_classes)
    rows = min(cache_rows, memory_budget // per_row_bytes)
    return max(1, rows) * devices


def sweep(
    images: ImageSet,
    classes: ClassSet,
    *,
    grid: Grid | None = None,
    weighting: fusion.Weighting = "softmax",
    include_zero_shot: bool = True,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> SweepResult:
    """Acc@1 and Acc@5 at every point of `grid` for one split.

    Args:
      images: the split's images, neighbours and labels.
      classes: the class prototypes and their neighbours.
      grid: values of alpha, beta, tau_i2t, tau_t2t; the reference's grid
        (10 x 10 x 5 x 5) by default.
      weighting: the image side's weighting, "softmax" or "similarity".
      include_zero_shot: also count plain zero-shot (alpha = beta = 0) hits.
      mesh: shard the images over its "batch" axis; None runs on the
        default device.
      chunk_size: images per compiled call; by default cache-sized blocks
        within `memory_budget` (see `default_chunk_size`). Rounded up to a
        multiple of the mesh's "batch" axis.
      memory_budget: bytes the compiled call may use for its arrays, per
        device.

    Returns:
      A `SweepResult` with hit counts and accuracies shaped (A, B, Ti, Tt).
    """
    grid = Grid() if grid is None else grid
    fusion._check_weighting(weighting)
    _check_inputs(images, classes)
    num_images, k, dim = np.shape(images.nbrs)
    num_classes = np.shape(classes.emb)[0]

    multiple = 1 if mesh is None else sharding.batch_size_multiple(mesh)
    if chunk_size is None:
        chunk_size = default_chunk_size(
            grid,
            num_classes,
            k,
            dim,
            memory_budget=memory_budget,
            devices=multiple,
        )
    # Equal chunks, so the padding of the last one stays small.
    num_chunks = -(-max(num_images, 1) // max(chunk_size, 1))
    chunk_size = -(-max(num_images, 1) // num_chunks)
    chunk_size = -(-chunk_size // multiple) * multiple

    alphas = np.asarray(grid.alphas, np.float32)
    betas = np.asarray(grid.betas, np.float32)
    taus_i2t = np.asarray(grid.taus_i2t, np.float32)
    taus_t2t = np.asarray(grid.taus_t2t, np.float32)
    class_retrieved, class_mix, class_inverse_norm = _compiled_class_side(mesh)(
        _as_float32(classes.emb),
        _as_float32(classes.nbrs),
        _as_float32(classes.sims),
        _mask_or_all(classes.mask, classes.sims),
        alphas,
        taus_t2t,
    )
    compute = _compiled_chunk_hits(mesh, weighting, TOP_KS)

    image_mask = _mask_or_all(images.mask, images.sims)
    labels = np.asarray(images.labels, np.int32)
    starts = range(0, num_images, chunk_size)
    logging.info(
        "sweeping %d grid points over %d images and %d classes in %d chunk(s) "
        "of %d images",
        grid.size,
        num_images,
        num_classes,
        len(starts),
        chunk_size,
    )
    grid_hits = np.zeros((len(TOP_KS), *grid.shape), np.int64)
    zero_shot_hits = np.zeros(len(TOP_KS), np.int64)
    for start in tqdm(starts, desc="sweep", unit="chunk", disable=len(starts) < 2):
        rows = slice(start, start + chunk_size)
        valid = np.ones(min(chunk_size, num_images - start), bool)
        chunk = [
            _as_float32(images.emb[rows]),
            _as_float32(images.nbrs[rows]),
            _as_float32(images.sims[rows]),
            image_mask[rows],
            labels[rows],
            valid,
        ]
        # Every chunk has the same shape, so the call compiles once.
        chunk = [_pad_rows(x, chunk_size) for x in chunk]
        hits, zero = compute(
            *chunk,
            _as_float32(classes.emb),
            class_retrieved,
            class_mix,
            class_inverse_norm,
            betas,
            taus_i2t,
        )
        grid_hits += np.asarray(hits, np.int64)
        zero_shot_hits += np.asarray(zero, np.int64)

    return SweepResult(
        grid=grid,
        weighting=weighting,
        num_images=int(num_images),
        correct1=grid_hits[TOP_KS.index(1)],
        correct5=grid_hits[TOP_KS.index(5)],
        zero_shot_correct1=int(zero_shot_hits[0]) if include_zero_shot else None,
        zero_shot_correct5=int(zero_shot_hits[1]) if include_zero_shot else None,
    )


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    padding = np.zeros((rows - x.shape[0], *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, padding], axis=0)


def decomposed_logits(
    images: ImageSet,
    classes: ClassSet,
    *,
    grid: Grid,
    weighting: fusion.Weighting = "softmax",
) -> jax.Array:
    """Logits at every grid point from the bilinear decomposition.

    Materialises A * B * Ti * Tt * N * C floats: for small inputs, to check
    the decomposition against `fusion.core_logits` and to inspect scores.

    Returns:
      Logits, shape (A, B, Ti, Tt, N, C).
    """
    _check_inputs(images, classes)
    return _decomposed_logits(
        _as_float32(images.emb),
        _as_float32(images.nbrs),
        _as_float32(images.sims),
        _mask_or_all(images.mask, images.sims),
        _as_float32(classes.emb),
        _as_float32(classes.nbrs),
        _as_float32(classes.sims),
        _mask_or_all(classes.mask, classes.sims),
        np.asarray(grid.alphas, np.float32),
        np.asarray(grid.betas, np.float32),
        np.asarray(grid.taus_i2t, np.float32),
        np.asarray(grid.taus_t2t, np.float32),
        weighting=weighting,
    )


@functools.partial(jax.jit, static_argnames="weighting")
def _decomposed_logits(
    z,
    image_nbrs,
    image_sims,
    image_mask,
    w,
    class_nbrs,
    class_sims,
    class_mask,
    alphas,
    betas,
    taus_i2t,
    taus_t2t,
    *,
    weighting,
):
    class_retrieved, class_mix, class_inverse_norm = _class_side(
        w, class_nbrs, class_sims, class_mask, alphas, taus_t2t
    )
    image_retrieved, has_neighbours = _image_side(
        z, image_nbrs, image_sims, image_mask, taus_i2t, weighting
    )

    dot = functools.partial(jnp.einsum, precision=_HIGHEST)
    z_w = dot("nd,cd->nc", z, w)
    z_rc = dot("nd,tcd->tnc", z, class_retrieved)
    r_w = dot("snd,cd->snc", image_retrieved, w)
    r_rc = dot("snd,tcd->stnc", image_retrieved, class_retrieved)
    zz = jnp.sum(jnp.square(z), axis=-1)
    zr = dot("nd,snd->sn", z, image_retrieved)
    rr = jnp.sum(jnp.square(image_retrieved), axis=-1)

    a = class_mix[:, None, None, None, None, :]  # (A, 1, 1, 1, 1, C)
    b = betas[:, None] * has_neighbours  # (B, N)
    b = b[None, :, None, None, :, None]  # (1, B, 1, 1, N, 1)
    numerator = (
        (1 - b) * (1 - a) * z_w
        + (1 - b) * a * z_rc[None, :]
        + b * (1 - a) * r_w[:, None]
        + b * a * r_rc
    )
    row_squared = (
        (1 - b) ** 2 * zz[:, None]
        + b**2 * rr[:, None, :, None]
        + 2 * b * (1 - b) * zr[:, None, :, None]
    )
    row_norm = jnp.maximum(jnp.sqrt(jnp.maximum(row_squared, 0.0)), fusion.EPS)
    inverse_row = jnp.where(b == 0, 1.0, 1.0 / row_norm)
    inverse_column = class_inverse_norm[:, None, None, :, None, :]  # (A,1,1,Tt,1,C)
    logits = numerator * inverse_row * inverse_column
    chex.assert_rank(logits, 6)
    return logits


def tune_and_test(
    train: ImageSet,
    test: ImageSet,
    classes: ClassSet,
    *,
    grid: Grid | None = None,
    weighting: fusion.Weighting = "softmax",
    include_zero_shot: bool = False,
    mesh: Mesh | None = None,
    chunk_size: int | None = None,
) -> TuneResult:
    """Chooses the best grid point on `train` by Acc@1, then applies it to `test`.

    Args:
      train: the tuning split (the few-shot "train" split).
      test: the evaluation split, used once at the chosen point.
      classes: class prototypes and neighbours, shared by both splits.
      grid: the grid; the reference's by default.
      weighting: the image side's weighting.
      include_zero_shot: let alpha = beta = 0 compete on `train`.
      mesh: shard images over its "batch" axis; None for the default device.
      chunk_size: images per compiled call.

    Returns:
      The sweep on `train`, the chosen point, and metrics on `test`.
    """
    result = sweep(
        train,
        classes,
        grid=grid,
        weighting=weighting,
        include_zero_shot=True,
        mesh=mesh,
        chunk_size=chunk_size,
    )
    best = result.best(include_zero_shot=include_zero_shot)
    logging.info(
        "best on %d tuning images: %s (Acc@1 %.4f, Acc@5 %.4f)",
        result.num_images,
        best.point,
        best.acc1,
        best.acc5,
    )
    _check_inputs(test, classes)

    def logits_at(point: GridPoint) -> np.ndarray:
        run_mesh = mesh if mesh is not None else sharding.make_mesh(jax.devices()[:1])
        return sharding.core_logits_on_mesh(
            run_mesh,
            test.emb,
            test.nbrs,
            test.sims,
            test.mask,
            classes.emb,
            classes.nbrs,
            classes.sims,
            classes.mask,
            alpha=point.alpha,
            beta=point.beta,
            tau_i2t=point.tau_i2t,
            tau_t2t=point.tau_t2t,
            weighting=weighting,
            chunk_size=chunk_size,
        )

    test_logits = logits_at(best.point)
    zero_shot_logits = logits_at(dataclasses.replace(best.point, alpha=0.0, beta=0.0))
    return TuneResult(
        sweep=result,
        best=best,
        test_logits=test_logits,
        test_acc1=float(metrics.top_k_accuracy(test_logits, test.labels, 1)),
        test_acc5=float(metrics.top_k_accuracy(test_logits, test.labels, 5)),
        test_balanced_acc1=float(metrics.balanced_accuracy(test_logits, test.labels)),
        test_zero_shot_acc1=float(
            metrics.top_k_accuracy(zero_shot_logits, test.labels, 1)
        ),
        test_zero_shot_acc5=float(
            metrics.top_k_accuracy(zero_shot_logits, test.labels, 5)
        ),
    )
