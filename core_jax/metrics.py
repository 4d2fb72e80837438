"""Classification metrics: top-k, per-class and balanced accuracy, confusion.

Tie rule, shared with the grid search in `core_jax.sweep`: the rank of the
true class is

    rank = #{c : s_c > s_true} + #{c < label : s_c == s_true}

and a prediction is correct at k when rank < k. This is the position of the
true class after a stable descending sort in which the lower class index
wins a tie, the order `jax.lax.top_k`, `jnp.argmax` and
`np.argsort(-s, kind="stable")` produce. A tie is therefore never counted in
the true class's favour unless it comes first by index, and the result does
not depend on the order in which a sort happens to visit classes.

Labels outside [0, C) raise `LabelError` naming the value, its row and the
valid range, whenever the labels are concrete (not traced inside `jit`).

Non-finite scores (NaN, +inf or -inf) are never counted as correct. Every
comparison with NaN is False, so without care an all-NaN row would rank its
true class first. When the logits are concrete every public metric raises
`NonFiniteScoresError` instead; inside `jit` values cannot be inspected, so a
row holding any non-finite score gets the worst rank, C, and is wrong at
every k.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


class LabelError(ValueError):
    """A label is outside [0, number of classes)."""


class NonFiniteScoresError(ValueError):
    """Scores hold NaN or infinite values, so no accuracy can be computed."""


def check_finite_scores(logits, name: str = "logits") -> None:
    """Raises `NonFiniteScoresError` if any score is NaN or infinite.

    Traced logits (inside `jit`) cannot be inspected and are not checked;
    the metrics then count such rows as wrong instead.

    Args:
      logits: scores, shape (N, C).
      name: what the scores are, for the message.
    """
    if isinstance(logits, jax.core.Tracer):
        return
    values = np.asarray(logits)
    if not np.issubdtype(values.dtype, np.inexact):
        return
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    bad_rows = bad.reshape(values.shape[0], -1).any(axis=1) if values.ndim else bad
    rows = np.flatnonzero(bad_rows)
    kinds = [
        kind
        for kind, found in (
            ("NaN", np.isnan(values).any()),
            ("+inf", np.isposinf(values).any()),
            ("-inf", np.isneginf(values).any()),
        )
        if found
    ]
    raise NonFiniteScoresError(
        f"{name}: {rows.size} of {bad_rows.size} row(s) hold non-finite scores "
        f"({int(bad.sum())} of {values.size} entries; {', '.join(kinds)}), "
        f"first at row {int(rows[0])}. Usual causes: NaN weights in the "
        "checkpoint, a temperature of 0, or token ids beyond the model's "
        "vocabulary"
    )


def check_labels(labels, num_classes: int) -> None:
    """Raises `LabelError` for the first label outside [0, num_classes).

    Traced labels (inside `jit`) cannot be inspected and are not checked.

    Args:
      labels: integer class indices, shape (N,).
      num_classes: C.
    """
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    if values.ndim != 1:
        raise LabelError(f"labels must have shape (N,), got {values.shape}")
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise LabelError(f"labels must be integers, got dtype {values.dtype}")
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise LabelError(
            f"label {int(values[row])} at row {row} is outside the valid range "
            f"[0, {num_classes - 1}] for {num_classes} classes "
            f"({bad.size} label(s) out of range)"
        )


def true_class_rank(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Position of the true class in each row under the module's tie rule.

    Args:
      logits: scores, shape (N, C); concrete ones must be finite.
      labels: true classes, shape (N,), in [0, C) (not checked here).

    Returns:
      int32 ranks, shape (N,); 0 means the true class is the top prediction,
      C (worse than any real position) for a row with a non-finite score.

    Raises:
      NonFiniteScoresError: concrete logits hold NaN or inf.
    """
    check_finite_scores(logits)
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    chex.assert_rank([logits, labels], [2, 1])
    chex.assert_equal_shape_prefix([logits, labels], 1)
    labels = labels.astype(jnp.int32)
    true_score = jnp.take_along_axis(logits, labels[:, None], axis=1)
    before = jnp.arange(logits.shape[1], dtype=jnp.int32)[None, :] < labels[:, None]
    ahead = jnp.where(before, logits >= true_score, logits > true_score)
    rank = jnp.sum(ahead, axis=1, dtype=jnp.int32)
    # Reached only when traced: the concrete case raised above.
    finite = jnp.all(jnp.isfinite(logits), axis=1)
    return jnp.where(finite, rank, jnp.int32(logits.shape[1]))


def _prepare(logits, labels) -> tuple[jax.Array, jax.Array]:
    check_finite_scores(logits)
    logits = jnp.asarray(logits)
    chex.assert_rank(logits, 2)
    check_labels(labels, logits.shape[1])
    labels = jnp.asarray(labels, dtype=jnp.int32)
    chex.assert_equal_shape_prefix([logits, labels], 1)
    return logits, labels


def correct_at_k(logits, labels, k: int) -> jax.Array:
    """Whether each true class is among the top k, ties as in the module doc.

    Args:
      logits: scores, shape (N, C).
      labels: true classes, shape (N,).
      k: how many top classes count, >= 1.

    Returns:
      bool, shape (N,); False for rows with a non-finite score (traced).

    Raises:
      NonFiniteScoresError: concrete logits hold NaN or inf.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    logits, labels = _prepare(logits, labels)
    # k past C would let the worst rank, C, count as a hit.
    return true_class_rank(logits, labels) < min(k, logits.shape[1])


def top_k_accuracy(logits, labels, k: int = 1) -> jax.Array:
    """Fraction of rows whose true class is among the top k (Acc@k).

    Args:
      logits: scores, shape (N, C).
      labels: true classes, shape (N,).
      k: 1 for Acc@1, 5 for Acc@5.

    Returns:
      0-d float32 in [0, 1]; NaN when N = 0.

    Raises:
      NonFiniteScoresError: concrete logits hold NaN or inf.
    """
    return jnp.mean(correct_at_k(logits, labels, k).astype(jnp.float32))


def per_class_accuracy(logits, labels, k: int = 1) -> jax.Array:
    """Acc@k over the rows of each true class.

    Args:
      logits: scores, shape (N, C).
      labels: true classes, shape (N,).
      k: how many top classes count.

    Returns:
      float32, shape (C,); NaN for classes with no rows.

    Raises:
      NonFiniteScoresError: concrete logits hold NaN or inf.
    """
    correct = correct_at_k(logits, labels, k)
    labels = jnp.asarray(labels, dtype=jnp.int32)
    num_classes = jnp.shape(logits)[1]
    hits = jnp.zeros(num_classes, jnp.float32).at[labels].add(correct)
    counts = jnp.zeros(num_classes, jnp.float32).at[labels].add(1.0)
    return jnp.where(counts > 0, hits / jnp.where(counts > 0, counts, 1.0), jnp.nan)


def balanced_accuracy(logits, labels, k: int = 1) -> jax.Array:
    """Mean of the per-class Acc@k over the classes that have rows.

    Classes absent from `labels` are left out of the mean rather than
    counted as 0 (as scikit-learn's `balanced_accuracy_score` does).

    Args:
      logits: scores, shape (N, C).
      labels: true classes, shape (N,).
      k: how many top classes count.

    Returns:
      0-d float32 in [0, 1]; NaN when N = 0.

    Raises:
      NonFiniteScoresError: concrete logits hold NaN or inf.
    """
    return jnp.nanmean(per_class_accuracy(logits, labels, k))


def confusion_matrix(labels, predictions, num_classes: int) -> jax.Array:
    """Counts of (true class, predicted class) pairs.

    Args:
      labels: true classes, shape (N,).
      predictions: predicted classes, shape (N,), e.g. `argmax(logits, 1)`.
      num_classes: C.

    Returns:
      int32 matrix, shape (C, C): rows are true classes, columns predictions.
    """
    check_labels(labels, num_classes)
    if not isinstance(predictions, jax.core.Tracer):
        try:
            check_labels(predictions, num_classes)
        except LabelError as error:
            raise LabelError(f"predictions: {error}") from None
    labels = jnp.asarray(labels, dtype=jnp.int32)
    predictions = jnp.asarray(predictions, dtype=jnp.int32)
    chex.assert_equal_shape([labels, predictions])
    flat = labels * num_classes + predictions
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[flat].add(1)
    return counts.reshape(num_classes, num_classes)
