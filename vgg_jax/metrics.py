"""Top-k correctness counts with an example mask, shared by training and evaluation.

Counts (not means) are returned so that batches, devices and processes can be summed exactly:
padded examples carry ``mask=False`` and count nowhere, so every real example counts once.

Top-k says something only for k below the number of classes: with 5 classes or fewer every label
is among the five best scores, and top-5 error is 0% by construction, not by measurement. Such a
count is left out (``"top5_correct"`` is absent) and its error is ``None``, shown as "n/a".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per example: 1.0 if the label is among the ``k`` highest scores, else 0.0.

    Ties are broken against the label (a label tied with the k-th score counts as wrong only if
    more than k scores are >= it), so a constant score vector is never "correct" by accident. A
    score vector holding a NaN ranks nothing and counts as wrong (every comparison with NaN is
    false: it counted as right, so a broken net scored 0% error).
    """
    label_scores = jnp.take_along_axis(scores, labels[:, None], axis=-1)
    higher = jnp.sum(scores > label_scores, axis=-1)
    ties = jnp.sum(scores == label_scores, axis=-1) - 1
    ranked = ~jnp.any(jnp.isnan(scores), axis=-1)
    return (((higher + ties) < k) & ranked).astype(jnp.float32)


def top_k_measures(k: int, num_classes: int) -> bool:
    """Whether top-``k`` correctness can be wrong at all: a label can only fall outside the ``k``
    best scores when there are more than ``k`` classes."""
    return k < num_classes


def classification_counts(
    scores: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Sums of top-1 and top-5 correct over the real (masked-in) examples, and their count;
    no ``"top5_correct"`` with 5 classes or fewer (every example would count)."""
    weight = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    counts = {"top1_correct": jnp.sum(topk_correct(scores, labels, 1) * weight)}
    if top_k_measures(5, scores.shape[-1]):
        counts["top5_correct"] = jnp.sum(topk_correct(scores, labels, 5) * weight)
    counts["count"] = jnp.sum(weight)
    return counts


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy (multinomial logistic regression, the paper's loss)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def errors_from_counts(counts: dict[str, float]) -> dict[str, float | None]:
    """Top-1 and top-5 error in percent from summed counts; top-5 is ``None`` where it was not
    counted (5 classes or fewer)."""
    total = max(float(counts["count"]), 1.0)
    top5 = counts.get("top5_correct")
    return {
        "top1_error": 100.0 * (1.0 - float(counts["top1_correct"]) / total),
        "top5_error": None if top5 is None else 100.0 * (1.0 - float(top5) / total),
    }
