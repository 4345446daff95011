"""Contracts of each preprocessing step (the paper, 3.1 and 3.2) and of the evaluation batches."""

import numpy as np
import tensorflow as tf
from absl.testing import absltest

from tests import fixtures, testdata
from vgg_jax import conventions, data
from vgg_jax.data import index, pipeline, sources, stats, transforms


def draw_params(count, height, width, crop=32, smin=32, smax=64, colour=0.1, flip=True):
    """Training-augmentation draws for stream positions 0..count-1, as numpy arrays."""

    def one(position):
        return transforms.sample_train_params(
            transforms.example_seed(7, position), height, width, crop, smin, smax, colour, flip
        )

    ds = tf.data.Dataset.range(count).map(one).batch(count)
    return next(ds.as_numpy_iterator())


class TrainTransformTest(absltest.TestCase):
    def test_jittered_scale_spreads_uniformly_over_range(self):
        params = draw_params(3300, 90, 140)
        scales = params["scale"]
        self.assertEqual(scales.min(), 32)
        self.assertEqual(scales.max(), 64)
        counts = np.bincount(scales - 32, minlength=33)
        self.assertLen(counts, 33)
        # 100 expected per value; a uniform draw stays well inside [50, 150].
        self.assertTrue(np.all((counts > 50) & (counts < 150)), counts)
        # The window is the crop's footprint: smallest side * crop / window == S (up to rounding).
        implied = 90 * 32 / params["window"][:, 2]
        np.testing.assert_allclose(implied, scales, rtol=0.5 / params["window"][:, 2].min() + 1e-6)

    def test_fixed_scale(self):
        params = draw_params(200, 90, 140, smin=48, smax=48)
        np.testing.assert_array_equal(params["scale"], 48)
        np.testing.assert_array_equal(params["window"][:, 2], round(32 * 90 / 48))

    def test_crop_windows_lie_inside_the_image(self):
        for height, width in [(90, 140), (140, 90), (33, 33), (20, 24), (500, 375)]:
            window = draw_params(1000, height, width)["window"]
            top, left, size_h, size_w = window.T
            self.assertTrue(np.all((top >= 0) & (left >= 0) & (size_h >= 1)))
            self.assertTrue(np.all((top + size_h <= height) & (left + size_w <= width)))
            np.testing.assert_array_equal(size_h, size_w)
            # Positions cover the whole range, not just one corner.
            self.assertEqual(left.min(), 0)
            self.assertGreaterEqual(left.max(), (width - size_w).min() * 0.9)

    def test_window_decode_equals_rescale_then_crop(self):
        ys, xs = np.mgrid[0:90, 0:140]
        image = np.stack([ys * 1.0, xs * 0.8, (ys + xs) * 0.5], -1).astype(np.uint8)
        encoded = testdata.png(image)
        convention = conventions.mean_subtracted((0.0, 0.0, 0.0))
        vals, vecs = np.ones(3, np.float32), np.eye(3, dtype=np.float32)
        for position in range(5):
            params = transforms.sample_train_params(
                transforms.example_seed(3, position), 90, 140, 32, 40, 80, 0.0, False
            )
            got = transforms.train_image(
                encoded, transforms.PNG, params, 32, vals, vecs, convention
            )
            scale = int(params["scale"])
            top, left, size, _ = params["window"].numpy()
            factor = 32 / size  # what the window resize applies
            rescaled = (round(90 * factor), round(140 * factor))
            full = tf.image.resize(image[None].astype(np.float32), rescaled)[0]
            y0, x0 = round(top * factor), round(left * factor)
            want = full[y0 : y0 + 32, x0 : x0 + 32].numpy()
            self.assertAlmostEqual(factor * 90, scale, delta=scale * 0.5 / size + 1e-6)
            self.assertLess(np.abs(got.numpy() - want).mean(), 1.0)

    def test_window_decode_gives_the_full_decodes_pixels(self):
        # Chroma-subsampled JPEGs (4:2:0, as most photos, and 4:2:2) cropped by libjpeg had an
        # edge column off by up to ~25 levels from the full decode evaluation and PIL see.
        photo = tf.io.decode_jpeg(testdata.photo_like_jpeg(0, 61, 83)).numpy()
        encoded = {
            "4:2:0": testdata.jpeg(photo),
            "4:2:0 progressive": tf.io.encode_jpeg(photo, quality=90, progressive=True).numpy(),
            "4:4:4": tf.io.encode_jpeg(photo, quality=90, chroma_downsampling=False).numpy(),
            "truncated": testdata.truncated(testdata.jpeg(photo), keep=0.8),
        }
        for kind, jpeg in encoded.items():
            full = transforms.decode_full(jpeg, transforms.JPEG).numpy()
            for top, left, size in [(0, 0, 61), (5, 16, 32), (3, 15, 17), (20, 51, 32), (1, 1, 1)]:
                with self.subTest(kind, window=(top, left, size)):
                    window = tf.constant([top, left, size, size])
                    got = transforms.decode_window(jpeg, transforms.JPEG, window).numpy()
                    want = full[top : top + size, left : left + size]
                    np.testing.assert_array_equal(got, want)

    def test_flip_about_half_the_time_and_mirrors(self):
        flips = draw_params(4000, 90, 140)["flip"]
        self.assertBetween(flips.mean(), 0.46, 0.54)
        self.assertFalse(draw_params(500, 90, 140, flip=False)["flip"].any())
        image, _ = testdata.builtin.draw_example(0, "train", 1)
        encoded = testdata.jpeg(image)
        params = transforms.sample_train_params(
            transforms.example_seed(1, 2), *image.shape[:2], 32, 32, 64, 0.0, False
        )
        convention = conventions.mean_subtracted((0.0, 0.0, 0.0))
        vals, vecs = np.ones(3, np.float32), np.eye(3, dtype=np.float32)
        plain = transforms.train_image(encoded, transforms.JPEG, params, 32, vals, vecs, convention)
        params["flip"] = tf.constant(True)
        flipped = transforms.train_image(
            encoded, transforms.JPEG, params, 32, vals, vecs, convention
        )
        np.testing.assert_allclose(flipped.numpy(), plain.numpy()[:, ::-1], atol=1e-3)

    def test_colour_shift_has_configured_strength(self):
        for strength in (0.1, 0.5):
            alpha = draw_params(4000, 90, 140, colour=strength)["alpha"]
            np.testing.assert_allclose(alpha.std(0), strength, rtol=0.06)
            np.testing.assert_allclose(alpha.mean(0), 0.0, atol=strength * 0.06)
        np.testing.assert_array_equal(draw_params(50, 90, 140, colour=0.0)["alpha"], 0.0)
        # On a flat image the shift is one RGB offset, 255 * V (alpha * lambda).
        eigvals = np.asarray(stats.IMAGENET_STATS["eigvals"], np.float32)
        eigvecs = np.asarray(stats.IMAGENET_STATS["eigvecs"], np.float32)
        encoded = testdata.png(np.full((50, 60, 3), 120, np.uint8))
        convention = conventions.mean_subtracted((120.0, 120.0, 120.0))
        params = transforms.sample_train_params(
            transforms.example_seed(0, 9), 50, 60, 32, 32, 64, 0.1, True
        )
        out = transforms.train_image(
            encoded, transforms.PNG, params, 32, eigvals, eigvecs, convention
        )
        shift = out.numpy().reshape(-1, 3)
        np.testing.assert_allclose(shift, shift[:1].repeat(len(shift), 0), atol=1e-3)
        recovered = eigvecs.T @ (shift[0] / 255.0) / eigvals
        np.testing.assert_allclose(recovered, params["alpha"].numpy(), rtol=1e-3, atol=1e-4)

    def test_input_convention_dict(self):
        image = tf.fill([4, 4, 3], 51.0) + tf.constant([0.0, 51.0, 102.0])  # RGB 51, 102, 153
        convention = conventions.checked(
            dict(channel_order="BGR", pixel_range=1.0, mean=(0.6, 0.4, 0.2), std=(0.5, 0.5, 0.5))
        )
        np.testing.assert_allclose(
            transforms.normalise(image, convention)[0, 0], [0.0, 0.0, 0.0], atol=1e-6
        )
        with self.assertRaisesRegex(ValueError, "should be exactly"):
            conventions.checked(dict(mean=(0, 0, 0), colour="RGB"))
        # The same rule as the NumPy/JAX one the evaluator and importers use.
        pixels = np.random.default_rng(0).uniform(0, 255, size=(5, 7, 3)).astype(np.float32)
        for convention in conventions.NAMED.values():
            convention = conventions.checked(convention)
            np.testing.assert_allclose(
                transforms.normalise(tf.constant(pixels), convention).numpy(),
                conventions.normalize(pixels, convention),
                rtol=1e-5,
                atol=1e-4,
            )

    def test_pca_from_moments(self):
        rng = np.random.default_rng(0)
        mixing = np.array([[1.0, 0.5, 0.2], [0.0, 0.8, 0.3], [0.0, 0.0, 0.4]])
        pixels = (rng.normal(size=(20000, 3)) @ mixing * 40 + 120).clip(0, 255).astype(np.uint8)
        result = stats.stats_from_moments(*stats.pixel_moments([pixels.reshape(100, 200, 3)]))
        np.testing.assert_allclose(result["mean_rgb"], pixels.mean(0), rtol=1e-6)
        eigvals, eigvecs = np.asarray(result["eigvals"]), np.asarray(result["eigvecs"])
        covariance = np.cov((pixels / 255.0).T, bias=True)
        np.testing.assert_allclose(eigvecs @ np.diag(eigvals) @ eigvecs.T, covariance, atol=1e-8)
        np.testing.assert_allclose(eigvecs.T @ eigvecs, np.eye(3), atol=1e-9)
        self.assertTrue(np.all(np.diff(eigvals) <= 0))

    def test_moments_are_exact_whatever_the_grouping(self):
        """The moments are whole-number sums scaled once: images passed one by one, in another
        order or as one chunk (as the statistics pass hands them over) give the same bits, and
        the sums equal Python's exact integer arithmetic (slices of 1 << 20 pixels included)."""
        rng = np.random.default_rng(1)
        images = [rng.integers(0, 256, (h, 37, 3), dtype=np.uint8) for h in (5, 300, 40, 29000)]
        one_by_one = stats.pixel_moments(images)
        chunk = np.concatenate([image.reshape(-1) for image in reversed(images)])
        for other in (stats.pixel_moments(images[::-1]), stats.pixel_moments([chunk])):
            for a, b in zip(one_by_one, other, strict=True):
                np.testing.assert_array_equal(a, b)
        pixels = np.concatenate([image.reshape(-1, 3) for image in images]).astype(object)
        exact_total = pixels.sum(0)
        exact_outer = pixels.T.dot(pixels)
        np.testing.assert_array_equal(one_by_one[0] * 255.0, exact_total.astype(np.float64))
        np.testing.assert_array_equal(
            np.round(one_by_one[1] * 255.0**2), exact_outer.astype(np.float64)
        )
        self.assertEqual(one_by_one[2], len(pixels))


class DatasetLevelTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.config = fixtures.tiny_config()
        cls.info = data.dataset_info(cls.config)

    def test_stored_mean_is_the_training_pixels_mean(self):
        builder = sources.prepared_builder(self.config.input)
        reader = sources.RecordReader(builder, "train")
        images = []
        for record in reader.read(np.arange(len(reader))):
            encoded, _ = sources.parse(tf.constant(record))
            images.append(
                tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE").numpy()
            )
        pixels = np.concatenate([i.reshape(-1, 3) for i in images]).astype(np.float64)
        np.testing.assert_allclose(self.info.mean_rgb, pixels.mean(0), rtol=1e-5)

    def test_mean_subtraction_centres_the_data(self):
        config = fixtures.tiny_config()
        config.input.color_shift_std = 0.0
        batches = data.train_batches(config, 0, process_index=0, process_count=1)
        steps = -(-self.info.num_train // config.input.batch_size) * 2
        images = np.concatenate([next(batches)["image"] for _ in range(steps)])
        centred = images.reshape(-1, 3).mean(0)
        self.assertLess(np.abs(centred).max(), 8.0, centred)  # raw means are ~127
        self.assertGreater(images.std(), 20.0)  # centred, not flattened

    def test_eval_batches_cover_every_example_once_in_few_shapes(self):
        scale = 40
        batches = list(data.eval_batches(self.config, scale, process_index=0, process_count=1))
        masks = np.concatenate([b["mask"] for b in batches])
        self.assertEqual(masks.sum(), self.info.num_eval)
        labels = np.concatenate([b["label"][b["mask"]] for b in batches])
        split_index = index.load_index(sources.prepared_builder(self.config.input), "validation")
        np.testing.assert_array_equal(np.sort(labels), np.sort(split_index.label))
        shapes = {b["image"].shape[1:3] for b in batches}
        self.assertLessEqual(len(shapes), 8)
        for b in batches:
            self.assertEqual(b["image"].dtype, np.float32)
            self.assertEqual(b["size"].dtype, np.int32)
            self.assertEqual(b["mask"].dtype, bool)
            self.assertEqual(b["index"].dtype, np.int32)
            hb, wb = b["image"].shape[1:3]
            self.assertIn(scale, (hb, wb))
            self.assertEqual(max(hb, wb) % 16, 0)
            for image, (h, w), mask in zip(b["image"], b["size"], b["mask"], strict=True):
                if not mask:
                    self.assertFalse(image.any())
                    continue
                self.assertEqual(min(h, w), scale)
                self.assertFalse(image[h:].any() or image[:, w:].any())
                self.assertGreater(np.abs(image[:h, :w]).mean(), 1.0)
        # Only the last batch of each orientation carries filler.
        partial = [b for b in batches if not b["mask"].all()]
        self.assertLessEqual(len(partial), 2)

    def test_same_example_order_at_every_scale(self):
        orders = []
        for scale in (32, 40, 48, 64):
            batches = data.eval_batches(self.config, scale, process_index=0, process_count=1)
            orders.append(np.concatenate([b["index"] for b in batches]))
        for order in orders[1:]:
            np.testing.assert_array_equal(order, orders[0])
        real = orders[0][orders[0] >= 0]
        np.testing.assert_array_equal(np.sort(real), np.arange(self.info.num_eval))

    def test_eval_schedule_is_the_same_on_every_process(self):
        one = list(data.eval_batches(self.config, 48, process_index=0, process_count=1))
        halves = [
            list(data.eval_batches(self.config, 48, process_index=i, process_count=2))
            for i in range(2)
        ]
        self.assertLen(halves[0], len(one))
        self.assertLen(halves[1], len(one))
        for whole, first, second in zip(one, *halves, strict=True):
            self.assertEqual(first["image"].shape, second["image"].shape)
            for key in whole:
                joined = np.concatenate([first[key], second[key]])
                np.testing.assert_array_equal(joined, whole[key])

    def test_eval_schedule_pads_to_the_global_batch(self):
        split_index = index.SplitIndex(
            fmt=np.zeros(5, np.uint8),
            height=np.array([100, 50, 80, 60, 60], np.int32),
            width=np.array([50, 100, 80, 90, 200], np.int32),
            channels=np.full(5, 3, np.uint8),
            truncated=np.zeros(5, bool),
            label=np.arange(5, dtype=np.int32),
        )
        schedule = pipeline.eval_schedule(split_index, 30, 4, 16)
        # Landscape (incl. square): 1, 2, 3 sorted by long side at Q=30: 30, 45, 60, 100 -> 112.
        self.assertEqual([b.bucket for b in schedule], [(30, 112), (64, 30)])
        np.testing.assert_array_equal(schedule[0].ids, [2, 3, 1, 4])
        np.testing.assert_array_equal(schedule[0].sizes[:, 0], 30)
        np.testing.assert_array_equal(schedule[1].ids, [0, -1, -1, -1])
        np.testing.assert_array_equal(schedule[1].sizes[0], [60, 30])

    def test_eval_schedule_takes_examples_evenly_spaced(self):
        """The per-epoch validation's subset: every 4th of 20 examples recorded class by class
        (as an image folder's are), so each class keeps its share."""
        n = 20
        split_index = index.SplitIndex(
            fmt=np.zeros(n, np.uint8),
            height=np.full(n, 40, np.int32),
            width=np.full(n, 60, np.int32),
            channels=np.full(n, 3, np.uint8),
            truncated=np.zeros(n, bool),
            label=np.repeat(np.arange(5, dtype=np.int32), 4),
        )
        subset = pipeline.eval_schedule(split_index, 30, 4, 16, examples=5)
        ids = np.concatenate([b.ids for b in subset])
        np.testing.assert_array_equal(np.sort(ids[ids >= 0]), [0, 4, 8, 12, 16])
        np.testing.assert_array_equal(np.sort(split_index.label[ids[ids >= 0]]), np.arange(5))
        whole = pipeline.eval_schedule(split_index, 30, 4, 16, examples=n + 1)
        self.assertLen(np.concatenate([b.ids for b in whole]), n)


if __name__ == "__main__":
    absltest.main()
