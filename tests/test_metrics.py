"""Top-k counts: ties go against the label, and a score vector with a NaN counts as wrong."""

import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from vgg_jax import metrics


class TopKTest(absltest.TestCase):
    def test_ties_count_against_the_label(self):
        scores = jnp.asarray([[0.5, 0.5, 0.0], [0.1, 0.7, 0.2], [1.0, 1.0, 1.0]])
        labels = jnp.asarray([0, 1, 2])
        np.testing.assert_array_equal(metrics.topk_correct(scores, labels, 1), [0, 1, 0])
        np.testing.assert_array_equal(metrics.topk_correct(scores, labels, 2), [1, 1, 0])

    def test_a_nan_score_is_never_correct(self):
        # Today NaN scores counted as right: a broken net printed 0.00% top-1 and top-5 error.
        scores = jnp.asarray([[jnp.nan] * 10, [0.0] * 9 + [jnp.nan], [1.0] + [0.0] * 9])
        labels = jnp.asarray([0, 4, 0])
        counts = metrics.classification_counts(scores, labels)
        self.assertEqual((float(counts["top1_correct"]), float(counts["top5_correct"])), (1, 1))
        self.assertEqual(metrics.errors_from_counts(counts)["top1_error"], 100 * 2 / 3)

    def test_masked_examples_count_nowhere(self):
        scores = jnp.asarray([[1.0, 0.0], [1.0, 0.0]])
        counts = metrics.classification_counts(
            scores, jnp.asarray([0, 1]), jnp.asarray([True, False])
        )
        self.assertEqual({k: float(v) for k, v in counts.items()},
                         {"top1_correct": 1.0, "count": 1.0})  # fmt: skip

    def test_top5_is_not_counted_with_five_classes_or_fewer(self):
        # With 5 classes or fewer every label is among the five best: top-5 error was a 0.00%
        # that measured nothing, and a 3-class folder's user read it as a perfect net.
        labels = jnp.asarray([0, 1])
        for num_classes in (3, 5):
            scores = jnp.tile(jnp.arange(num_classes, dtype=jnp.float32), (2, 1))
            counts = metrics.classification_counts(scores, labels)
            self.assertNotIn("top5_correct", counts)
            errors = metrics.errors_from_counts(counts)
            self.assertIsNone(errors["top5_error"])
            self.assertEqual(errors["top1_error"], 100.0)
        scores = jnp.tile(jnp.arange(6, dtype=jnp.float32), (2, 1))  # label 0 ranks 6th of 6
        errors = metrics.errors_from_counts(metrics.classification_counts(scores, labels))
        self.assertEqual(errors["top5_error"], 50.0)


if __name__ == "__main__":
    absltest.main()
