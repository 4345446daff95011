"""predict on one image (top-k, ImageNet names, score map) and the score map as a PNG."""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from vgg_jax import models
from vgg_jax.configs import paper
from vgg_jax.evaluation import predict
from vgg_jax.evaluation import predict as predict_lib

CROP = 32


def imagenet_sized_tiny_model():
    config = paper.model_config("A")
    config.update(dict(num_classes=1000, width=1 / 16, fc_width=16))
    return models.build_model(config, CROP)


def numpy_params(model, seed=0):
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 0.1 if len(leaf.shape) == 1 else np.sqrt(1.0 / np.prod(leaf.shape[:-1]))
        return (rng.normal(size=leaf.shape) * scale).astype(np.float32)

    return jax.tree_util.tree_map(draw, models.abstract_params(model))


class PredictTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = imagenet_sized_tiny_model()
        cls.params = numpy_params(cls.model)
        rng = np.random.default_rng(1)
        cls.image = rng.integers(0, 256, size=(64, 96, 3)).astype(np.uint8)
        cls.normalization = dict(mean=(120.0, 110.0, 100.0))

    def test_top_k_and_score_map_match_dense_evaluation(self):
        top, score_map = predict.predict(
            self.model, self.params, self.image, normalization=self.normalization, flip=False
        )
        self.assertEqual(score_map.shape, (2, 3, 1000))  # 64x96 at stride 32, 32-pixel window
        # The paper's convention, written out: RGB, 0-255, the mean subtracted, std 1.
        normalized = self.image.astype(np.float32) - np.float32(self.normalization["mean"])
        _, scores = self.model.apply(
            {"params": self.params}, jnp.asarray(normalized)[None], method="dense"
        )
        probabilities = np.asarray(jax.nn.softmax(scores[0]))
        self.assertLen(top, 5)
        self.assertEqual([c.class_index for c in top], np.argsort(-probabilities)[:5].tolist())
        self.assertGreater(top[0].probability, top[4].probability)
        np.testing.assert_allclose(
            [c.probability for c in top], np.sort(probabilities)[::-1][:5], rtol=1e-5
        )
        np.testing.assert_allclose(score_map.mean(axis=(0, 1)), scores[0], rtol=1e-4, atol=1e-5)
        names = predict.imagenet_class_names()
        self.assertEqual(names[0], "tench, Tinca tinca")
        self.assertEqual(top[0].class_name, names[top[0].class_index])

        flipped_top, _ = predict.predict(
            self.model, self.params, self.image, normalization=self.normalization
        )
        _, mirrored = self.model.apply(
            {"params": self.params}, jnp.asarray(normalized)[None, :, ::-1], method="dense"
        )
        both = (probabilities + np.asarray(jax.nn.softmax(mirrored[0]))) / 2
        self.assertAlmostEqual(flipped_top[0].probability, float(both.max()), places=5)

    def test_scale_names_and_errors(self):
        small = self.image[:40, :60]
        top, score_map = predict.predict(
            self.model,
            self.params,
            small,
            top_k=3,
            normalization=self.normalization,
            scale=64,
            class_names=[f"c{i}" for i in range(1000)],
        )
        self.assertEqual(score_map.shape[:2], (2, 3))  # rescaled to 64 x 96
        self.assertEqual(top[0].class_name, f"c{top[0].class_index}")
        self.assertLen(top, 3)
        with self.assertRaisesRegex(ValueError, "scale="):
            predict.predict(self.model, self.params, small[:24], normalization=self.normalization)
        with self.assertRaisesRegex(ValueError, "normalization="):
            predict.predict(self.model, self.params, self.image)

    def test_score_map_png(self):
        import tensorflow as tf

        score_map = np.zeros((2, 3, 4), np.float32)
        score_map[0, 2, 3] = 8.0  # class 3 at the top-right cell
        with tempfile.TemporaryDirectory() as directory:
            path = predict.save_score_map_png(score_map, 3, os.path.join(directory, "a.png"))
            with open(path, "rb") as f:
                decoded = tf.io.decode_png(f.read()).numpy()
            self.assertEqual(decoded.shape, (64, 96, 3))  # one 32-pixel block per cell
            np.testing.assert_array_equal(decoded, predict_lib.score_map_image(score_map, 3))
            brightness = decoded.astype(int).sum(-1)
            self.assertEqual(brightness[:32, 64:].min(), brightness.max())  # the hot cell

            overlay = predict.save_score_map_png(
                score_map, 3, os.path.join(directory, "b.png"), image=self.image, crop_size=CROP
            )
            with open(overlay, "rb") as f:
                decoded = tf.io.decode_png(f.read()).numpy()
            self.assertEqual(decoded.shape, self.image.shape)
            heat = decoded.astype(int).sum(-1) - self.image.astype(int).sum(-1) // 2
            self.assertGreater(heat[:32, 64:].mean(), heat[32:, :32].mean() + 100)
        with self.assertRaisesRegex(ValueError, "class index below 4"):
            predict_lib.score_map_image(score_map, 4)


if __name__ == "__main__":
    absltest.main()
