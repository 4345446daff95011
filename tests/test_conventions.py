"""Input conventions: normalize matches each home framework's preprocessing, NumPy and JAX alike."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from vgg_jax import conventions


class NormalizeTest(absltest.TestCase):
    def setUp(self):
        self.pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)

    def test_torchvision_is_totensor_then_normalize(self):
        # torchvision: img.float().div(255), then (x - mean) / std, all float32, per channel.
        x = self.pixels.astype(np.float32) / np.float32(255)
        mean = np.array([0.485, 0.456, 0.406], np.float32)
        std = np.array([0.229, 0.224, 0.225], np.float32)
        expected = (x - mean) / std
        actual = conventions.normalize(self.pixels, conventions.TORCHVISION)
        self.assertEqual(actual.dtype, np.float32)
        np.testing.assert_array_equal(actual, expected)

    def test_caffe_flips_to_bgr_and_subtracts_the_mean(self):
        # Keras' preprocess_input(mode="caffe"): x[..., ::-1] - [103.939, 116.779, 123.68].
        expected = self.pixels[..., ::-1].astype(np.float32) - np.array(
            [103.939, 116.779, 123.68], np.float32
        )
        actual = conventions.normalize(self.pixels.astype(np.float64), conventions.CAFFE)
        np.testing.assert_array_equal(actual, expected)
        # Channel 0 of the output is the input's blue channel.
        np.testing.assert_array_equal(actual[..., 0] + np.float32(103.939), self.pixels[..., 2])

    def test_jax_inside_jit_equals_numpy(self):
        for convention in conventions.NAMED.values():
            traced = jax.jit(lambda x, c=convention: conventions.normalize(x, c))
            actual = traced(jnp.asarray(self.pixels))
            self.assertIsInstance(actual, jax.Array)
            np.testing.assert_allclose(
                actual, conventions.normalize(self.pixels, convention), rtol=1e-6, atol=1e-5
            )

    def test_validate_reads_json_and_names_what_is_wrong(self):
        from_json = dict(channel_order="BGR", pixel_range=255, mean=[1, 2, 3], std=[1, 1, 1])
        self.assertEqual(conventions.checked(from_json)["mean"], (1.0, 2.0, 3.0))
        with self.assertRaisesRegex(ValueError, "channel_order 'GBR'; valid"):
            conventions.checked(dict(from_json, channel_order="GBR"))
        with self.assertRaisesRegex(ValueError, "pixel_range 2.0; valid"):
            conventions.checked(dict(from_json, pixel_range=2))
        with self.assertRaisesRegex(ValueError, "should be exactly"):
            conventions.checked(dict(mean=(1, 2, 3)))
        with self.assertRaisesRegex(ValueError, "std needs 3 values"):
            conventions.checked(dict(from_json, std=[1, 1]))
        with self.assertRaisesRegex(ValueError, "RGB images on the last axis"):
            conventions.normalize(np.zeros((4, 4, 1)), conventions.CAFFE)
        self.assertEqual(
            conventions.describe(conventions.CAFFE),
            "BGR, 0-255, mean (103.939, 116.779, 123.68), std (1.0, 1.0, 1.0)",
        )


if __name__ == "__main__":
    absltest.main()
