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
