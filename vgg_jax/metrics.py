"""Top-k correctness counts with an example mask, shared by training and evaluation.

Counts (not means) are returned so that batches, devices and processes can be summed exactly:
padded examples carry ``mask=False`` and count nowhere, so every real example counts once.
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


def classification_counts(
    scores: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Sums of top-1 and top-5 correct over the real (masked-in) examples, and their count."""
    weight = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return {
        "top1_correct": jnp.sum(topk_correct(scores, labels, 1) * weight),
        "top5_correct": jnp.sum(topk_correct(scores, labels, min(5, scores.shape[-1])) * weight),
        "count": jnp.sum(weight),
    }


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy (multinomial logistic regression, the paper's loss)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def errors_from_counts(counts: dict[str, float]) -> dict[str, float]:
    """Top-1 and top-5 error in percent from summed counts."""
    total = max(float(counts["count"]), 1.0)
    return {
        "top1_error": 100.0 * (1.0 - float(counts["top1_correct"]) / total),
        "top5_error": 100.0 * (1.0 - float(counts["top5_correct"]) / total),
    }
