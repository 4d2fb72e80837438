"""Specification of core_jax.metrics on small hand-worked examples."""

import jax
import numpy as np
import pytest

from core_jax import metrics

# Four images, three classes. Row by row, the true class ranks:
#   row 0 (label 0): first.
#   row 1 (label 2): third (0.5 and 0.3 above 0.2).
#   row 2 (label 1): second (0.6 above 0.4).
#   row 3 (label 1): tied with class 0 at 0.5; class 0 has the lower index and
#     takes the tie, so second.
LOGITS = np.array(
    [
        [0.9, 0.1, 0.0],
        [0.5, 0.3, 0.2],
        [0.6, 0.4, 0.0],
        [0.5, 0.5, 0.1],
    ],
    np.float32,
)
LABELS = np.array([0, 2, 1, 1])


def test_true_class_rank_follows_the_lower_index_tie_rule():
    np.testing.assert_array_equal(metrics.true_class_rank(LOGITS, LABELS), [0, 2, 1, 1])


def test_tie_goes_to_the_true_class_when_it_has_the_lower_index():
    logits = np.array([[0.5, 0.5, 0.1]], np.float32)
    np.testing.assert_array_equal(metrics.true_class_rank(logits, np.array([0])), [0])


def test_all_tied_row_ranks_by_index():
    logits = np.zeros((3, 4), np.float32)
    np.testing.assert_array_equal(
        metrics.true_class_rank(logits, np.array([0, 2, 3])), [0, 2, 3]
    )


def test_top_1_accuracy():
    assert float(metrics.top_k_accuracy(LOGITS, LABELS, 1)) == pytest.approx(0.25)


def test_top_2_accuracy():
    assert float(metrics.top_k_accuracy(LOGITS, LABELS, 2)) == pytest.approx(0.75)


def test_top_k_at_least_the_class_count_is_always_right():
    assert float(metrics.top_k_accuracy(LOGITS, LABELS, 5)) == 1.0


def test_top_1_agrees_with_argmax_on_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 3, size=(200, 6)).astype(np.float32)  # many ties
    labels = rng.integers(0, 6, size=200)
    expected = np.mean(np.argmax(logits, axis=1) == labels)
    assert float(metrics.top_k_accuracy(logits, labels, 1)) == pytest.approx(expected)


def test_top_k_agrees_with_a_stable_descending_sort():
    rng = np.random.default_rng(1)
    logits = rng.integers(0, 4, size=(300, 9)).astype(np.float32)
    labels = rng.integers(0, 9, size=300)
    order = np.argsort(-logits, axis=1, kind="stable")
    for k in (1, 3, 5):
        expected = np.mean([labels[i] in order[i, :k] for i in range(300)])
        got = float(metrics.top_k_accuracy(logits, labels, k))
        assert got == pytest.approx(expected), k


def test_per_class_accuracy():
    # class 0: row 0 right; class 1: rows 2, 3 wrong; class 2: row 1 wrong.
    np.testing.assert_allclose(
        metrics.per_class_accuracy(LOGITS, LABELS), [1.0, 0.0, 0.0]
    )
    # At k = 2: class 1 rows 2 and 3 right; class 2 row 1 (third) wrong.
    np.testing.assert_allclose(
        metrics.per_class_accuracy(LOGITS, LABELS, 2), [1.0, 1.0, 0.0]
    )


def test_per_class_accuracy_is_nan_for_classes_without_rows():
    logits = np.array([[0.2, 0.8, 0.0], [0.9, 0.1, 0.0]], np.float32)
    per_class = np.asarray(metrics.per_class_accuracy(logits, np.array([1, 1])))
    assert np.isnan(per_class[0]) and np.isnan(per_class[2])
    assert per_class[1] == 0.5


def test_balanced_accuracy_is_the_mean_over_present_classes():
    # Imbalanced: class 0 has 3 rows all right, class 1 has 1 row wrong.
    logits = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], np.float32)
    labels = np.array([0, 0, 0, 1])
    assert float(metrics.top_k_accuracy(logits, labels)) == pytest.approx(0.75)
    assert float(metrics.balanced_accuracy(logits, labels)) == pytest.approx(0.5)


def test_balanced_accuracy_skips_absent_classes():
    logits = np.array([[0.2, 0.8, 0.0], [0.9, 0.1, 0.0]], np.float32)
    assert float(metrics.balanced_accuracy(logits, np.array([1, 1]))) == 0.5


def test_confusion_matrix():
    predictions = np.argmax(LOGITS, axis=1)  # [0, 0, 0, 0]
    expected = np.array([[1, 0, 0], [2, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(
        metrics.confusion_matrix(LABELS, predictions, 3), expected
    )


def test_confusion_matrix_off_diagonal_entries():
    labels = np.array([0, 1, 1, 2, 2, 2])
    predictions = np.array([0, 2, 1, 2, 0, 2])
    expected = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 2]])
    np.testing.assert_array_equal(
        metrics.confusion_matrix(labels, predictions, 3), expected
    )


@pytest.mark.parametrize("bad", [-1, 3, 17])
def test_label_out_of_range_names_the_value_and_the_range(bad):
    labels = np.array([0, 1, bad, 2])
    with pytest.raises(ValueError, match=rf"label {bad} at row 2 .*\[0, 2\]"):
        metrics.top_k_accuracy(LOGITS, labels, 1)


def test_label_error_is_a_value_error_subclass():
    assert issubclass(metrics.LabelError, ValueError)
    with pytest.raises(metrics.LabelError):
        metrics.balanced_accuracy(LOGITS, np.array([0, 1, 2, 3]))


def test_prediction_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"predictions: label 5 at row 0"):
        metrics.confusion_matrix(np.array([0]), np.array([5]), 3)


def test_non_integer_labels_are_refused():
    with pytest.raises(ValueError, match="integers"):
        metrics.top_k_accuracy(LOGITS, np.array([0.0, 1.0, 2.0, 1.0]), 1)


def test_k_below_one_is_refused():
    with pytest.raises(ValueError, match="k=0"):
        metrics.top_k_accuracy(LOGITS, LABELS, 0)


def test_metrics_run_under_jit():
    accuracy = jax.jit(lambda x, y: metrics.top_k_accuracy(x, y, 2))(LOGITS, LABELS)
    balanced = jax.jit(metrics.balanced_accuracy)(LOGITS, LABELS)
    assert float(accuracy) == pytest.approx(0.75)
    assert float(balanced) == pytest.approx(1 / 3)


# Non-finite scores. Comparisons with NaN are False, so a naive rank would put
# the true class of an all-NaN row first and count it correct.
NAN_ROW = np.full((1, 3), np.nan, np.float32)


@pytest.mark.parametrize(
    "metric",
    [
        lambda x, y: metrics.true_class_rank(x, y),
        lambda x, y: metrics.correct_at_k(x, y, 1),
        lambda x, y: metrics.top_k_accuracy(x, y, 1),
        lambda x, y: metrics.top_k_accuracy(x, y, 5),
        lambda x, y: metrics.per_class_accuracy(x, y),
        lambda x, y: metrics.balanced_accuracy(x, y),
    ],
    ids=["rank", "correct", "acc1", "acc5", "per_class", "balanced"],
)
def test_every_metric_refuses_all_nan_logits(metric):
    logits = np.full((4, 3), np.nan, np.float32)
    assert issubclass(metrics.NonFiniteScoresError, ValueError)
    with pytest.raises(
        metrics.NonFiniteScoresError,
        match=r"4 of 4 row\(s\).*12 of 12 entries; NaN\).*first at row 0",
    ):
        metric(logits, LABELS)


def test_non_finite_message_counts_rows_and_names_the_first_and_the_causes():
    logits = LOGITS.copy()
    logits[2, 1] = np.inf
    logits[3, 0] = -np.inf
    logits[3, 2] = -np.inf
    with pytest.raises(metrics.NonFiniteScoresError) as raised:
        metrics.top_k_accuracy(logits, LABELS, 1)
    message = str(raised.value)
    assert "2 of 4 row(s)" in message
    assert "3 of 12 entries; +inf, -inf" in message
    assert "first at row 2" in message
    for cause in ("NaN weights", "temperature of 0", "vocabulary"):
        assert cause in message


def test_a_single_nan_entry_is_refused_even_off_the_true_class():
    logits = LOGITS.copy()
    logits[1, 0] = np.nan
    with pytest.raises(metrics.NonFiniteScoresError, match="first at row 1"):
        metrics.top_k_accuracy(logits, LABELS, 1)


def test_jax_array_logits_are_checked_too():
    with pytest.raises(metrics.NonFiniteScoresError):
        metrics.top_k_accuracy(jax.numpy.asarray(np.vstack([LOGITS, NAN_ROW])), [0] * 5)


def test_under_jit_a_non_finite_row_ranks_last_and_is_never_correct():
    # LOGITS rows rank [0, 2, 1, 1]; appended rows: all NaN with label 0, a NaN
    # off the true class with label 0 (else first), +inf on the true class
    # with label 1, and -inf off the true class with label 0 (else first).
    logits = np.vstack(
        [
            LOGITS,
            NAN_ROW,
            [[0.9, np.nan, 0.0]],
            [[0.1, np.inf, 0.0]],
            [[0.9, 0.1, -np.inf]],
        ]
    ).astype(np.float32)
    labels = np.array([0, 2, 1, 1, 0, 0, 1, 0])
    ranks = jax.jit(metrics.true_class_rank)(logits, labels)
    np.testing.assert_array_equal(ranks, [0, 2, 1, 1, 3, 3, 3, 3])
    # k = 5 exceeds C = 3, which must not let rank 3 count as a hit.
    correct5 = jax.jit(lambda x, y: metrics.correct_at_k(x, y, 5))(logits, labels)
    np.testing.assert_array_equal(correct5, [True] * 4 + [False] * 4)
    acc1 = jax.jit(lambda x, y: metrics.top_k_accuracy(x, y, 1))(logits, labels)
    assert float(acc1) == pytest.approx(1 / 8)
    # Class 0 rows: 0 (right), 4, 5, 7 (non-finite) -> 1/4; class 1 rows 2, 3
    # (ranked second) and 6 (non-finite) -> 0; class 2 row 1 (third) -> 0.
    per_class = jax.jit(metrics.per_class_accuracy)(logits, labels)
    np.testing.assert_allclose(per_class, [0.25, 0.0, 0.0])
