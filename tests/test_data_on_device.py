"""Batches on the device: the decoded in-memory copy, the jitted augmentation (same pixels as the
``tf.data`` path's resize), exact resume, the kept validation batches and the prefetch thread."""

import dataclasses
import gc
import itertools
import threading
import time
from unittest import mock

import jax
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from tests import fixtures
from vgg_jax import host, sharding
from vgg_jax.data import (
    augment,
    decoded,
    index,
    on_device,
    pipeline,
    prefetch,
    progress,
    sources,
    transforms,
)


def take(iterator, count):
    return [jax.device_get(b) for b in itertools.islice(iterator, count)]


class CropResizeTest(absltest.TestCase):
    def test_matches_tf_resize_of_the_cut_out_window(self):
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(50, 70), (64, 40)]]
        images.append(rng.integers(0, 256, (90, 90, 3), np.uint8))
        flat = np.concatenate([i.reshape(-1) for i in images])
        offset = np.cumsum([0] + [i.size for i in images[:-1]]).astype(np.int32)
        width = np.array([i.shape[1] for i in images], np.int32)
        # Up- and downscaling, a window on the image's edge, flips.
        windows = np.array([[3, 5, 24], [10, 2, 37], [0, 0, 90]], np.int32)
        flips = np.array([True, False, True])
        got = np.asarray(augment.crop_resize(flat, offset, width, windows, flips, 32))
        for image, (top, left, size), flip, result in zip(images, windows, flips, got, strict=True):
            window = image[top : top + size, left : left + size]
            window = window[:, ::-1] if flip else window
            expected = tf.image.resize(window, [32, 32], "bilinear", antialias=False).numpy()
            np.testing.assert_allclose(result, expected, atol=1e-3)

    def test_normalise_matches_the_tf_path(self):
        norm = dict(
            channel_order="RGB",
            pixel_range=255.0,
            mean=(120.0, 110.0, 100.0),
            std=(60.0, 50.0, 40.0),
        )
        norm_bgr = dict(
            channel_order="BGR", pixel_range=1.0, mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0)
        )
        image = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
        shift = np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]], np.float32)
        for n in (norm, norm_bgr):
            got = np.asarray(augment.normalise(image, n, shift))
            for i in range(2):
                expected = transforms.normalise(tf.constant(image[i]), n, tf.constant(shift[i]))
                np.testing.assert_allclose(got[i], expected.numpy(), rtol=1e-5, atol=1e-4)


class DecodedTrainBatchesTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.config = fixtures.tiny_config(**{"input.shuffle_seed": 3})
        cls.mesh = sharding.make_mesh(cls.config.mesh)
        builder = sources.prepared_builder(cls.config.input)
        cls.split_index = index.load_index(builder, "train")
        cls.split = decoded.decode_split(builder, "train", cls.split_index)

    def test_decoded_pixels_are_the_accurate_dct_decode(self):
        builder = sources.prepared_builder(self.config.input)
        reader = sources.RecordReader(builder, "train")
        row = 7
        encoded, label = sources.parse(reader.read([self.split_index.valid[row]])[0])
        expected = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
        np.testing.assert_array_equal(self.split.image(row), expected.numpy())
        self.assertEqual(self.split.label[row], int(label))

    def test_every_chunk_lands_at_its_rows(self):
        """Chunks of 7 images (the split's 100 end in a short one): every row holds its own
        image and label, as decoded one by one."""
        builder = sources.prepared_builder(self.config.input)
        with mock.patch.object(decoded, "CHUNK", 7):
            split = decoded.decode_split(builder, "train", self.split_index)
        reader = sources.RecordReader(builder, "train")
        records = reader.read(self.split_index.valid)
        self.assertLen(records, 100)
        for row, record in enumerate(records):
            encoded, label = sources.parse(record)
            expected = tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
            np.testing.assert_array_equal(split.image(row), expected.numpy())
            self.assertEqual(split.label[row], int(label))

    def test_a_stale_index_is_named(self):
        builder = sources.prepared_builder(self.config.input)
        stale = dataclasses.replace(self.split_index, height=self.split_index.height.copy())
        example = self.split_index.valid[40]
        stale.height[example] += 1
        with self.assertRaisesRegex(ValueError, f"example {example} decoded to .* index is stale"):
            decoded.decode_split(builder, "train", stale)

    def test_small_splits_use_it_and_zero_turns_it_off(self):
        self.assertTrue(on_device.uses_decoded_cache(self.config))
        config = fixtures.tiny_config(**{"input.decoded_cache_mb": 0})
        self.assertFalse(on_device.uses_decoded_cache(config))
        with self.assertRaisesRegex(ValueError, "decoded_cache_mb"):
            on_device.uses_decoded_cache(fixtures.tiny_config(**{"input.decoded_cache_mb": -1}))

    def test_a_split_too_big_for_the_memory_left_is_read_through_tf_data(self):
        """In a container whose memory limit leaves less than 4x the decoded copy's size, the
        copy (there twice while placed) was made anyway and the kernel killed the process."""
        size = decoded.decoded_bytes(self.split_index)
        room = mock.patch.object(host, "memory_room_bytes", return_value=4 * size - 1)
        with room, self.assertLogs(level="WARNING") as logs:
            self.assertFalse(on_device.uses_decoded_cache(self.config))
        self.assertIn("more than 25% of the", logs.output[0])
        self.assertIn("decoded_cache_mb=0", logs.output[0])
        for room in (4 * size, None):  # None: nothing to read it from (macOS)
            with mock.patch.object(host, "memory_room_bytes", return_value=room):
                self.assertTrue(on_device.uses_decoded_cache(self.config))

    def test_resume_at_any_step_is_bitwise(self):
        # 100 examples in batches of 16: the stream crosses epoch ends at steps 6 and 12.
        straight = take(on_device.train_batches(self.config, 0, self.mesh), 14)
        resumed = take(on_device.train_batches(self.config, 5, self.mesh), 9)
        for a, b in zip(straight[5:], resumed, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
        first = straight[0]
        self.assertEqual(first["image"].shape, (16, 32, 32, 3))
        self.assertEqual(first["image"].dtype, np.float32)
        self.assertFalse(np.array_equal(first["image"], straight[1]["image"]))

    def test_drawing_ahead_changes_no_number(self):
        """The augmentation's random draws are made ``DRAW_STEPS`` steps at a time; how many
        (here 3, so steps cross draw chunks and epochs) changes no pixel."""
        default = take(on_device.train_batches(self.config, 2, self.mesh), 8)
        with mock.patch.object(on_device, "DRAW_STEPS", 3):
            chunked = take(on_device.train_batches(self.config, 2, self.mesh), 8)
        for a, b in zip(default, chunked, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])

    def test_the_same_pixels_on_any_number_of_devices(self):
        """A batch does not depend on how the mesh splits it (two processes train what one does;
        tests/test_train_loop.py runs the two-process case end to end)."""
        one = sharding.make_mesh(self.config.mesh, jax.devices()[:1])
        on_one = take(on_device.train_batches(self.config, 3, one), 2)
        on_all = take(on_device.train_batches(self.config, 3, self.mesh), 2)
        self.assertGreater(len(self.mesh.devices.flat), 1)
        for a, b in zip(on_one, on_all, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])

    def test_batches_hold_the_ordered_examples_with_their_labels(self):
        batches = take(on_device.train_batches(self.config, 0, self.mesh), 6)
        order = pipeline.TrainOrder(len(self.split.label), self.config.input.shuffle_seed)
        rows = order.rows(np.arange(96))
        labels = np.concatenate([b["label"] for b in batches])
        np.testing.assert_array_equal(labels, self.split_index.label[self.split_index.valid][rows])
        # The demo's normalisation (mean subtracted): batch means near zero, not near 120.
        self.assertLess(abs(float(np.mean(batches[0]["image"]))), 40.0)


class EvalBatchCacheTest(absltest.TestCase):
    def test_second_pass_gives_the_same_batches_from_memory(self):
        config = fixtures.tiny_config()
        mesh = sharding.make_mesh(config.mesh)
        cache = on_device.EvalBatchCache(config, 48, mesh, max_bytes=1 << 30)
        first = [jax.device_get(b) for b in cache]
        self.assertIsNotNone(cache._kept)
        second = [jax.device_get(b) for b in cache]
        self.assertLen(second, len(first))
        for a, b in zip(first, second, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        too_small = on_device.EvalBatchCache(config, 48, mesh, max_bytes=1)
        self.assertLen(list(too_small), len(first))
        self.assertIsNone(too_small._kept)

    def test_filler_rows_are_dropped_but_for_a_multiple_of_the_devices(self):
        config = fixtures.tiny_config(**{"input.eval_batch_size": 64})
        mesh = sharding.make_mesh(config.mesh)
        devices = mesh.shape[sharding.DATA]
        planned = list(pipeline.eval_batches(config, 48))
        kept = [jax.device_get(b) for b in on_device.EvalBatchCache(config, 48, mesh, 1 << 30)]
        self.assertLen(kept, len(planned))
        self.assertLess(sum(len(b["mask"]) for b in kept), sum(len(b["mask"]) for b in planned))
        for plan, got in zip(planned, kept, strict=True):
            real = int(plan["mask"].sum())
            self.assertEqual(len(got["mask"]) % (on_device.TAIL_MULTIPLE * devices), 0)
            self.assertLess(len(got["mask"]) - real, on_device.TAIL_MULTIPLE * devices)
            for key in ("label", "image", "mask"):  # the same rows, first the real ones
                np.testing.assert_array_equal(got[key], plan[key][: len(got["mask"])])

    def test_validation_buckets_can_be_finer_than_the_evaluations(self):
        config = fixtures.tiny_config(**{"input.eval_bucket_step": 64})
        mesh = sharding.make_mesh(config.mesh)

        def long_sides(cache):
            return {max(b["image"].shape[1:3]) for b in cache}

        coarse = long_sides(on_device.EvalBatchCache(config, 48, mesh, 1 << 30))
        fine = long_sides(on_device.EvalBatchCache(config, 48, mesh, 1 << 30, bucket_step=16))
        self.assertTrue(all(side % 64 == 0 for side in coarse), coarse)
        self.assertTrue(all(side % 16 == 0 for side in fine), fine)
        self.assertNotEqual(fine, coarse)


class ProgressLogTest(absltest.TestCase):
    def test_logs_done_rate_and_time_left_but_not_the_end(self):
        report = progress.ProgressLog("Indexing x/train", 100, every_s=0.0)
        with self.assertLogs("absl", "INFO") as logs:
            report.update(40)
            report.update(100)  # the caller's own final line says it is done
        self.assertLen(logs.output, 1)
        self.assertRegex(
            logs.output[0], r"Indexing x/train: 40/100 images, \d+ images/s, \d+ s left"
        )


class PrefetchTest(absltest.TestCase):
    def test_keeps_order_and_raises_the_producers_error(self):
        self.assertEqual(list(prefetch.Prefetched(iter(range(10)), 2)), list(range(10)))

        def failing():
            yield 1
            raise ValueError("bad record")

        with self.assertRaisesRegex(ValueError, "bad record"):
            list(prefetch.Prefetched(failing(), 2))

    def test_starts_at_once_and_stops_when_dropped(self):
        started = threading.Event()

        def endless():
            started.set()
            yield from itertools.count()

        def producers():
            return [t for t in threading.enumerate() if t.name == "vgg_jax-prefetch"]

        before = len(producers())
        items = prefetch.Prefetched(endless(), 2)
        self.assertTrue(started.wait(5))  # running before anyone asked for an item
        self.assertEqual(next(items), 0)
        self.assertLen(producers(), before + 1)
        del items
        gc.collect()
        deadline = time.monotonic() + 5
        while len(producers()) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        # The producer, blocked on a full queue, has exited, not merely stopped producing.
        self.assertLen(producers(), before)


if __name__ == "__main__":
    absltest.main()
