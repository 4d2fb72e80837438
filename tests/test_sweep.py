"""Specification of core_jax.sweep against the direct formula in NumPy.

The NumPy reference computes every grid point the long way (enrich the
images, enrich the classes, multiply) in float64 and ranks classes with a
stable descending sort, lower class index first on ties. Logits from the
bilinear decomposition are compared with 1e-5 absolute tolerance (float32
rounding of a few chained products on unit-scale values is ~1e-7); hit
counts are compared exactly, on random data whose class scores are separated
by far more than that rounding.
"""

import itertools

import jax
import numpy as np
import pytest

from core_jax import fusion, metrics, sharding, sweep


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_retrieval(neighbours, sims, tau, mask, weighting):
    """r = normalize(sum_j w_j t_j), or zeros where a row has no neighbour."""
    out = np.zeros(neighbours.shape[:1] + neighbours.shape[2:])
    for i in range(len(neighbours)):
        kept = mask[i]
        if not kept.any():
            continue
        s = sims[i][kept].astype(np.float64)
        if weighting == "softmax":
            w = np.exp(s / tau - (s / tau).max())
        else:  # the reference release: similarity * temperature
            w = s * tau
        out[i] = unit(w @ neighbours[i][kept])
    return out


def numpy_enrich(base, retrieved, mix, mask):
    out = base.astype(np.float64).copy()
    has = mask.any(axis=1)
    if mix != 0:
        out[has] = unit((1 - mix) * base[has] + mix * retrieved[has])
    return out


def numpy_logits(images, classes, point, weighting):
    r = numpy_retrieval(images.nbrs, images.sims, point.tau_i2t, images.mask, weighting)
    big_r = numpy_retrieval(
        classes.nbrs, classes.sims, point.tau_t2t, classes.mask, "softmax"
    )
    z_plus = numpy_enrich(images.emb, r, point.beta, images.mask)
    w_plus = numpy_enrich(classes.emb, big_r, point.alpha, classes.mask)
    return z_plus @ w_plus.T


def numpy_hits(logits, labels, k):
    order = np.argsort(-logits, axis=1, kind="stable")
    return int(sum(labels[i] in order[i, :k] for i in range(len(labels))))


def make_sets(seed, n=40, c=6, k=5, k_class=4, d=12):
    rng = np.random.default_rng(seed)
    image_mask = rng.uniform(size=(n, k)) > 0.3
    image_mask[:2] = False
    class_mask = rng.uniform(size=(c, k_class)) > 0.3
    class_mask[0] = False
    # Images lean towards their class so accuracies are not all near chance.
    class_emb = unit(rng.normal(size=(c, d)))
    labels = rng.integers(0, c, size=n)
    image_emb = unit(class_emb[labels] + 1.5 * rng.normal(size=(n, d)))
    image_nbrs = unit(image_emb[:, None] + rng.normal(size=(n, k, d)))
    class_nbrs = unit(class_emb[:, None] + rng.normal(size=(c, k_class, d)))
    images = sweep.ImageSet(
        emb=image_emb.astype(np.float32),
        nbrs=image_nbrs.astype(np.float32),
        sims=rng.uniform(0.0, 0.4, size=(n, k)).astype(np.float32),
        mask=image_mask,
        labels=labels,
    )
    classes = sweep.ClassSet(
        emb=class_emb.astype(np.float32),
        nbrs=class_nbrs.astype(np.float32),
        sims=rng.uniform(0.3, 0.9, size=(c, k_class)).astype(np.float32),
        mask=class_mask,
    )
    return images, classes


GRID = sweep.Grid(
    alphas=(0.0, 0.3, 1.0),
    betas=(0.0, 0.5, 0.9, 1.0),
    taus_i2t=(0.01, 1.0),
    taus_t2t=(0.1, 100.0),
)


def points(grid):
    for index in itertools.product(*(range(n) for n in grid.shape)):
        yield index, grid.point(index)


@pytest.fixture(scope="module")
def sets():
    return make_sets(0)


def test_default_grid_is_the_reference_grid():
    grid = sweep.Grid()
    expected_mixes = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert grid.alphas == expected_mixes and grid.betas == expected_mixes
    assert grid.taus_i2t == (0.01, 0.1, 1.0, 10.0, 100.0)
    assert grid.taus_t2t == (0.01, 0.1, 1.0, 10.0, 100.0)
    assert grid.shape == (10, 10, 5, 5) and grid.size == 2500


@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
def test_decomposition_equals_the_direct_formula(sets, weighting):
    images, classes = sets
    logits = np.asarray(
        sweep.decomposed_logits(images, classes, grid=GRID, weighting=weighting)
    )
    assert logits.shape == (*GRID.shape, 40, 6)
    for index, point in points(GRID):
        expected = numpy_logits(images, classes, point, weighting)
        np.testing.assert_allclose(
            logits[index], expected, rtol=0, atol=1e-5, err_msg=str(point)
        )


def test_decomposition_at_alpha_beta_zero_is_exactly_zero_shot():
    images, classes = make_sets(1, n=10, c=5, d=16)
    rng = np.random.default_rng(1)
    images = images._replace(
        emb=rng.integers(-8, 9, size=(10, 16)).astype(np.float32) / 8
    )
    classes = classes._replace(
        emb=rng.integers(-8, 9, size=(5, 16)).astype(np.float32) / 8
    )
    grid = sweep.Grid(alphas=(0.0, 0.5), betas=(0.0,), taus_i2t=(1.0,), taus_t2t=(1.0,))
    logits = np.asarray(sweep.decomposed_logits(images, classes, grid=grid))
    np.testing.assert_array_equal(logits[0, 0, 0, 0], images.emb @ classes.emb.T)


@pytest.mark.parametrize("weighting", fusion.WEIGHTINGS)
def test_sweep_hits_equal_numpy_top_k_at_every_point(sets, weighting):
    images, classes = sets
    result = sweep.sweep(images, classes, grid=GRID, weighting=weighting)
    assert result.acc1.shape == GRID.shape and result.acc5.shape == GRID.shape
    for index, point in points(GRID):
        logits = numpy_logits(images, classes, point, weighting)
        assert result.correct1[index] == numpy_hits(logits, images.labels, 1), point
        assert result.correct5[index] == numpy_hits(logits, images.labels, 5), point
    np.testing.assert_allclose(result.acc1, result.correct1 / 40)


def test_sweep_hits_equal_metrics_on_core_logits(sets):
    images, classes = sets
    result = sweep.sweep(images, classes, grid=GRID)
    core_logits = jax.jit(fusion.core_logits)
    for index, point in points(GRID):
        logits = core_logits(
            images.emb,
            images.nbrs,
            images.sims,
            images.mask,
            classes.emb,
            classes.nbrs,
            classes.sims,
            classes.mask,
            alpha=point.alpha,
            beta=point.beta,
            tau_i2t=point.tau_i2t,
            tau_t2t=point.tau_t2t,
        )
        hits1 = int(np.sum(metrics.correct_at_k(logits, images.labels, 1)))
        hits5 = int(np.sum(metrics.correct_at_k(logits, images.labels, 5)))
        assert (result.correct1[index], result.correct5[index]) == (hits1, hits5)


def test_zero_shot_baseline_counts_plain_logits(sets):
    images, classes = sets
    result = sweep.sweep(images, classes, grid=GRID)
    plain = images.emb.astype(np.float64) @ classes.emb.T
    assert result.zero_shot_correct1 == numpy_hits(plain, images.labels, 1)
    assert result.zero_shot_correct5 == numpy_hits(plain, images.labels, 5)
    # The grid's alpha = beta = 0 points are the same zero-shot logits.
    assert (result.correct1[0, 0] == result.zero_shot_correct1).all()
    assert result.zero_shot_acc1 == result.zero_shot_correct1 / 40


def test_zero_shot_baseline_can_be_left_out(sets):
    images, classes = sets
    result = sweep.sweep(images, classes, grid=GRID, include_zero_shot=False)
    assert result.zero_shot_acc1 is None
    with pytest.raises(ValueError, match="include_zero_shot"):
        result.best(include_zero_shot=True)


def test_ties_go_to_the_lower_class_index_as_in_metrics():
    images, classes = make_sets(2, n=24, c=7)
    # Classes 0 and 1 identical: every score ties exactly; labels all 1.
    classes = sweep.ClassSet(*(np.concatenate([x[:1], x[:1], x[2:]]) for x in classes))
    images = images._replace(labels=np.ones(24, int))
    result = sweep.sweep(images, classes, grid=GRID)
    assert (result.correct1 == 0).all()
    assert result.zero_shot_correct1 == 0
    for index, point in points(GRID):
        logits = numpy_logits(images, classes, point, "softmax")
        assert result.correct5[index] == numpy_hits(logits, images.labels, 5)


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_sharded_sweep_equals_unsharded(chunk_size):
    images, classes = make_sets(3, n=37, c=9)
    single = sweep.sweep(images, classes, grid=GRID, chunk_size=chunk_size)
    mesh = sharding.make_mesh()
    sharded = sweep.sweep(images, classes, grid=GRID, mesh=mesh, chunk_size=chunk_size)
    np.testing.assert_array_equal(sharded.correct1, single.correct1)
    np.testing.assert_array_equal(sharded.correct5, single.correct5)
    assert sharded.zero_shot_correct1 == single.zero_shot_correct1
    assert sharded.num_images == 37


def test_chunks_equal_one_pass(sets):
    images, classes = sets
    whole = sweep.sweep(images, classes, grid=GRID)
    chunked = sweep.sweep(images, classes, grid=GRID, chunk_size=7)
    np.testing.assert_array_equal(chunked.correct1, whole.correct1)
    np.testing.assert_array_equal(chunked.correct5, whole.correct5)


def test_similarity_weighting_makes_the_image_temperature_irrelevant(sets):
    images, classes = sets
    result = sweep.sweep(images, classes, grid=GRID, weighting="similarity")
    np.testing.assert_array_equal(result.correct1[:, :, 0], result.correct1[:, :, 1])


def _result(correct1, zero_shot=None):
    correct1 = np.asarray(correct1)
    grid = sweep.Grid(
        alphas=tuple(0.1 * (i + 1) for i in range(correct1.shape[0])),
        betas=tuple(0.1 * (i + 1) for i in range(correct1.shape[1])),
        taus_i2t=(0.01,),
        taus_t2t=(0.01,),
    )
    counts = correct1[:, :, None, None]
    return sweep.SweepResult(
        grid=grid,
        weighting="softmax",
        num_images=10,
        correct1=counts,
        correct5=counts + 1,
        zero_shot_correct1=zero_shot,
        zero_shot_correct5=None if zero_shot is None else zero_shot + 1,
    )


def test_best_point_is_the_first_maximum_in_grid_order():
    result = _result([[3, 7, 7], [7, 2, 1]])
    best = result.best()
    assert best.index == (0, 1, 0, 0)
    assert (best.point.alpha, best.point.beta) == pytest.approx((0.1, 0.2))
    assert best.acc1 == 0.7 and best.acc5 == 0.8
    assert not best.is_zero_shot


def test_zero_shot_wins_ties_when_included():
    result = _result([[3, 7], [7, 2]], zero_shot=7)
    assert result.best().index == (0, 1, 0, 0)
    best = result.best(include_zero_shot=True)
    assert best.is_zero_shot and best.index is None
    assert (best.point.alpha, best.point.beta) == (0.0, 0.0)
    assert best.acc1 == 0.7
    assert not _result([[3, 8]], zero_shot=7).best(include_zero_shot=True).is_zero_shot


def test_rows_list_every_point():
    rows = _result([[3, 7], [7, 2]]).rows()
    assert len(rows) == 4
    assert rows[1] == dict(
        alpha=pytest.approx(0.1),
        beta=pytest.approx(0.2),
        tau_i2t=0.01,
        tau_t2t=0.01,
        acc1=0.7,
        acc5=0.8,
    )


def test_tune_on_train_then_apply_once_to_test():
    train, classes = make_sets(4, n=30, c=6)
    test, _ = make_sets(5, n=25, c=6)
    grid = sweep.Grid(
        alphas=(0.2, 0.8), betas=(0.1, 0.6), taus_i2t=(0.1,), taus_t2t=(0.01, 1.0)
    )
    tuned = sweep.tune_and_test(train, test, classes, grid=grid)

    train_hits = {
        index: numpy_hits(numpy_logits(train, classes, p, "softmax"), train.labels, 1)
        for index, p in points(grid)
    }
    best_index = max(train_hits, key=lambda i: (train_hits[i], [-x for x in i]))
    assert tuned.best.index == best_index
    expected = numpy_logits(test, classes, grid.point(best_index), "softmax")
    np.testing.assert_allclose(tuned.test_logits, expected, rtol=0, atol=1e-5)
    assert tuned.test_acc1 == pytest.approx(numpy_hits(expected, test.labels, 1) / 25)
    assert tuned.test_acc5 == pytest.approx(numpy_hits(expected, test.labels, 5) / 25)
    plain = test.emb.astype(np.float64) @ classes.emb.T
    assert tuned.test_zero_shot_acc1 == pytest.approx(
        numpy_hits(plain, test.labels, 1) / 25
    )


def test_out_of_range_label_is_refused(sets):
    images, classes = sets
    labels = images.labels.copy()
    labels[3] = 6
    with pytest.raises(ValueError, match=r"label 6 at row 3 .*\[0, 5\]"):
        sweep.sweep(images._replace(labels=labels), classes, grid=GRID)


def test_mismatched_shapes_are_refused(sets):
    images, classes = sets
    with pytest.raises(ValueError, match=r"images.sims has shape \(40, 4\)"):
        sweep.sweep(images._replace(sims=images.sims[:, :4]), classes, grid=GRID)


@pytest.mark.parametrize(
    "field, values, message",
    [
        ("taus_i2t", (0.0,), "taus_i2t holds 0.0; taus must be finite and > 0"),
        ("taus_t2t", (1.0, -0.5), "taus_t2t holds -0.5; taus must be finite"),
        ("taus_t2t", (np.inf,), "taus_t2t holds inf; taus must be finite"),
        ("taus_i2t", (np.nan,), "taus_i2t holds nan; taus must be finite"),
        ("alphas", (1.5,), r"alphas holds 1.5; mixes must lie in \[0, 1\]"),
        ("betas", (-0.1,), r"betas holds -0.1; mixes must lie in \[0, 1\]"),
        ("alphas", (np.nan,), r"alphas holds nan; mixes must lie in \[0, 1\]"),
        ("betas", (), "empty"),
    ],
)
def test_bad_grid_values_are_refused(field, values, message):
    with pytest.raises(ValueError, match=message):
        sweep.Grid(**{field: values})


def test_default_chunk_size_bounds_memory():
    rows = sweep.default_chunk_size(
        sweep.Grid(), num_classes=10_000, k=10, dim=1152, memory_budget=2**29
    )
    assert 1 <= rows < 1000
    per_row = 4 * ((10 + 5 + 1) * 1152 + (5 + 5 + 5 + 20) * 10_000)
    assert rows * per_row <= 2**29


def test_tuning_on_a_mesh_equals_tuning_on_one_device():
    train, classes = make_sets(6, n=19, c=5)
    test, _ = make_sets(7, n=11, c=5)
    grid = sweep.Grid(
        alphas=(0.3, 0.7), betas=(0.2, 0.8), taus_i2t=(0.1,), taus_t2t=(1.0,)
    )
    single = sweep.tune_and_test(train, test, classes, grid=grid)
    sharded = sweep.tune_and_test(
        train, test, classes, grid=grid, mesh=sharding.make_mesh()
    )
    assert sharded.best == single.best
    np.testing.assert_array_equal(sharded.test_logits, single.test_logits)
    assert sharded.test_acc1 == single.test_acc1


@pytest.mark.parametrize(
    "side, field, name",
    [
        ("images", "emb", "image embeddings"),
        ("images", "nbrs", "image neighbour embeddings"),
        ("images", "sims", "image neighbour similarities"),
        ("classes", "emb", "class embeddings"),
        ("classes", "nbrs", "class neighbour embeddings"),
        ("classes", "sims", "class neighbour similarities"),
    ],
)
def test_non_finite_inputs_are_refused_naming_the_array(sets, side, field, name):
    images, classes = sets
    sets_by_side = {"images": images, "classes": classes}
    values = np.array(getattr(sets_by_side[side], field), np.float32)
    rows = [3, 4, 5] if side == "classes" else [17, 20, 33]
    for row in rows:
        # Put the NaN on a neighbour in use, so the masked-entry rule below
        # does not hide it.
        index = (
            (row,)
            if field == "emb"
            else (row, int(np.argmax(mask(sets_by_side[side], row))))
        )
        values[index] = np.nan
    sets_by_side[side] = sets_by_side[side]._replace(**{field: values})
    with pytest.raises(
        sweep.NonFiniteInputError,
        match=rf"{name}: 3 of {len(values)} row\(s\) contain NaN, first row {rows[0]}",
    ):
        sweep.sweep(sets_by_side["images"], sets_by_side["classes"], grid=GRID)
    with pytest.raises(sweep.NonFiniteInputError, match=name):
        sweep.decomposed_logits(
            sets_by_side["images"], sets_by_side["classes"], grid=GRID
        )


def mask(item, row):
    return np.ones(item.sims.shape[1], bool) if item.mask is None else item.mask[row]


def test_infinite_embedding_is_refused(sets):
    images, classes = sets
    emb = np.array(classes.emb, np.float32)
    emb[2, 0] = -np.inf
    with pytest.raises(ValueError, match="class embeddings: 1 of 6 row.* inf"):
        sweep.sweep(images, classes._replace(emb=emb), grid=GRID)


def test_masked_out_similarities_may_be_non_finite(sets):
    # Search pads missing neighbours with -inf similarities; they are never
    # weighted, so they must not change any count.
    images, classes = sets
    sims = np.array(images.sims, np.float32)
    sims[~images.mask] = -np.inf
    sims[np.flatnonzero(~images.mask.any(axis=1))[0], 0] = np.nan
    padded = sweep.sweep(images._replace(sims=sims), classes, grid=GRID)
    plain = sweep.sweep(images, classes, grid=GRID)
    np.testing.assert_array_equal(padded.correct1, plain.correct1)
    np.testing.assert_array_equal(padded.correct5, plain.correct5)


def test_hit_counting_never_counts_a_non_finite_score():
    # Five rows, three classes, hand-ranked: row 0 true class first (a hit at
    # k = 1 and 5); rows 1-3 hold NaN or inf somewhere (never hits, though
    # NaN comparisons are False and row 3's +inf is on the true class);
    # row 4 true class second (a hit at k = 5 only, as C = 3 < 5).
    from_image = np.array(
        [
            [1.0, 0.0, 0.0],
            [np.nan, np.nan, np.nan],
            [0.0, np.inf, 0.0],
            [np.inf, 0.0, 0.0],
            [0.0, 2.0, 1.0],
        ],
        np.float32,
    )
    labels = np.array([0, 0, 0, 0, 2], np.int32)
    valid = np.ones(5, bool)
    hits = sweep._hits(
        from_image, None, np.zeros((1, 5), np.float32), labels, valid, (1, 5)
    )
    np.testing.assert_array_equal(hits, [[1, 2]])

    # With a beta: a NaN in row 0's beta = 1 scores makes it a miss at both
    # betas (0 * NaN is NaN, as in the scores themselves); row 4 gains at
    # beta = 1 (scores [0, 2, 3]), its true class first.
    finite = np.nan_to_num(from_image, nan=0.0, posinf=0.0)
    difference = np.zeros_like(finite)
    difference[0, 1] = np.nan
    difference[4, 2] = 2.0
    row_mix = np.array([[0.0] * 5, [1.0] * 5], np.float32)
    hits = sweep._hits(finite, difference, row_mix, labels, valid, (1, 5))
    # beta = 0: rows 1-3 are all-equal finite rows with label 0 -> first by
    # index, hits; row 0 lost to NaN; row 4 second. beta = 1: row 4 first.
    np.testing.assert_array_equal(hits, [[3, 4], [4, 4]])


def test_hit_counting_with_many_classes_never_counts_a_non_finite_score():
    # Past C = 46340 the non-finite rows are found by a separate check (a
    # per-margin penalty of C could overflow int32). Rows: 0 true class first
    # (score 1, rest 0); 1 all NaN; 2 one +inf off the true class; 3 true
    # class second (class 0 scores 2): a hit at k = 5 only.
    c = 46_341
    from_image = np.zeros((4, c), np.float32)
    from_image[0, 7] = 1.0
    from_image[1] = np.nan
    from_image[2, 9] = np.inf
    from_image[3, [0, 7]] = [2.0, 1.0]
    labels = np.array([7, 7, 7, 7], np.int32)
    hits = sweep._hits(
        from_image, None, np.zeros((1, 4), np.float32), labels, np.ones(4, bool), (1, 5)
    )
    np.testing.assert_array_equal(hits, [[1, 2]])
