"""The built-in shapes dataset, the image-folder source, and start-up errors on bad config."""

import errno
import hashlib
import os
import shutil
import tempfile
import threading
import time
from unittest import mock

import numpy as np
from absl.testing import absltest

from tests import testdata
from vgg_jax import data, host
from vgg_jax.configs import demo as demo_defaults
from vgg_jax.configs import paper
from vgg_jax.data import builtin, folder, pipeline, shapes


class BuiltinTest(absltest.TestCase):
    def test_pure_function_of_seed_split_and_index(self):
        a, label_a = builtin.draw_example(0, "train", 17)
        b, label_b = builtin.draw_example(0, "train", 17)
        np.testing.assert_array_equal(a, b)
        self.assertEqual(label_a, label_b)
        other, _ = builtin.draw_example(1, "train", 17)
        self.assertFalse(other.shape == a.shape and np.array_equal(other, a))
        val, _ = builtin.draw_example(0, "validation", 17)
        self.assertFalse(val.shape == a.shape and np.array_equal(val, a))

    def test_images_are_pinned_bit_for_bit(self):
        """The dataset's JPEGs, and so the published accuracies, depend on every pixel: a faster
        or refactored drawing must give the very same images (all ten classes, both splits, the
        bench's 32-pixel size)."""
        digest = hashlib.sha256()
        cases = [(0, "train", i, None) for i in range(24)]
        cases += [(0, "validation", i, (32, 32)) for i in range(4)]
        for args in cases:
            image, label = shapes.draw_example(*args)
            digest.update(f"{label} {image.shape} ".encode())
            digest.update(image.tobytes())
        self.assertEqual(
            digest.hexdigest(), "2b656a10317e61f201655d27a91cc644a6b0912b025c75c5ba62ff116b5ebf27"
        )

    def test_worker_processes_draw_the_same_images(self):
        """The larger splits are drawn by spawned workers where the program allows it: same
        images, same order, and the short-side range read at the call (the bench sets
        ImageNet-like sizes) reaches them."""
        with (
            mock.patch.object(shapes, "PARALLEL_FROM", 4),
            mock.patch.object(shapes, "_workers_allowed", True),
            mock.patch.object(shapes, "SHORT_SIDE", (20, 24)),
            mock.patch.object(host, "usable_cpus", return_value=2),
        ):
            drawn = list(shapes.draw_split(3, "validation", 6))
        self.assertLen(drawn, 6)
        # Not allowed (a script or notebook: its main module may be unguarded), nothing spawns.
        with (
            mock.patch.object(shapes, "PARALLEL_FROM", 4),
            mock.patch.object(shapes.multiprocessing, "get_context", side_effect=AssertionError),
        ):
            self.assertLen(list(shapes.draw_split(3, "validation", 6)), 6)
        for index, (image, label) in enumerate(drawn):
            expected, expected_label = shapes.draw_example(3, "validation", index, (20, 24))
            np.testing.assert_array_equal(image, expected)
            self.assertEqual(label, expected_label)
            self.assertBetween(min(image.shape[:2]), 20, 24)

    def test_no_usable_dev_shm_draws_in_this_process(self):
        """The pool's locks need /dev/shm: where it was read-only (a sandbox) preparation failed
        with "Read-only file system; free space there", blamed on data_dir."""
        erofs = OSError(errno.EROFS, os.strerror(errno.EROFS))
        with (
            mock.patch.object(shapes, "PARALLEL_FROM", 4),
            mock.patch.object(shapes, "_workers_allowed", True),
            mock.patch.object(host, "usable_cpus", return_value=2),
            mock.patch.object(shapes.multiprocessing, "get_context") as context,
            self.assertLogs(level="WARNING") as logs,
        ):
            context.return_value.Pool.side_effect = erofs
            drawn = list(shapes.draw_split(3, "validation", 5))
        self.assertIn("in this process: no worker processes (Read-only file system", logs.output[0])
        for index, (image, label) in enumerate(drawn):
            expected, expected_label = shapes.draw_example(3, "validation", index)
            np.testing.assert_array_equal(image, expected)
            self.assertEqual(label, expected_label)

    def test_a_cpu_quota_of_one_core_draws_in_this_process(self):
        """A container of 1 CPU on a host of many: os.cpu_count and the affinity count the host's
        cores, and a worker per host core was spawned to share the one."""
        with (
            mock.patch.object(shapes, "PARALLEL_FROM", 4),
            mock.patch.object(shapes, "_workers_allowed", True),
            mock.patch.object(host, "usable_cpus", return_value=1),
            mock.patch.object(shapes.multiprocessing, "get_context", side_effect=AssertionError),
        ):
            self.assertLen(list(shapes.draw_split(3, "validation", 6)), 6)

    def test_jpegs_are_the_bytes_tensorflow_wrote(self):
        """The stored JPEGs are encoded with PIL in the drawing workers; the dataset's bytes (and
        so every published table) were TensorFlow's encoder's: they must stay the same."""
        import tensorflow as tf

        for index in range(8):
            image, _ = shapes.draw_example(0, "train", index)
            ours = shapes.encode_jpeg(image)
            tensorflow = tf.io.encode_jpeg(
                image, quality=shapes.JPEG_QUALITY, chroma_downsampling=False
            ).numpy()
            self.assertEqual(ours, tensorflow)
        with (
            mock.patch.object(shapes, "PARALLEL_FROM", 2),
            mock.patch.object(shapes, "_workers_allowed", True),
            mock.patch.object(host, "usable_cpus", return_value=2),
        ):
            drawn = list(shapes.draw_split(0, "train", 3, as_jpeg=True))
        for index, (jpeg, label) in enumerate(drawn):
            image, expected_label = shapes.draw_example(0, "train", index)
            self.assertEqual(jpeg, shapes.encode_jpeg(image))
            self.assertEqual(label, expected_label)

    def test_sizes_classes_and_colour_carry_no_label(self):
        sizes, labels, colours = [], [], []
        for i in range(200):
            image, label = builtin.draw_example(0, "train", i)
            sizes.append(image.shape)
            labels.append(label)
            colours.append(image.reshape(-1, 3).mean(0))
        short = np.array([min(s[:2]) for s in sizes])
        aspect = np.array([max(s[:2]) / min(s[:2]) for s in sizes])
        self.assertTrue(np.all((short >= 48) & (short <= 128)))
        self.assertTrue(np.all(aspect <= builtin.MAX_ASPECT + 0.02))
        self.assertGreater(aspect.std(), 0.1)  # varied aspect ratios, both orientations
        self.assertTrue(any(s[0] > s[1] for s in sizes) and any(s[0] < s[1] for s in sizes))
        self.assertEqual(sorted(set(labels)), list(range(len(builtin.CLASS_NAMES))))
        # Nearest-class-mean on mean colour is no better than chance (10%) by a wide margin.
        colours, labels = np.array(colours), np.array(labels)
        train, test = slice(0, 150), slice(150, 200)
        means = np.stack([colours[train][labels[train] == c].mean(0) for c in range(10)])
        guess = np.argmin(((colours[test][:, None] - means[None]) ** 2).sum(-1), 1)
        self.assertLess((guess == labels[test]).mean(), 0.3)

    def test_full_size_meets_the_spec(self):
        num_train, num_validation = builtin.SIZES["full"]
        self.assertGreaterEqual(num_train, 5000)
        self.assertGreaterEqual(num_validation, 1000)
        self.assertGreaterEqual(len(builtin.CLASS_NAMES), 10)
        with self.assertRaisesRegex(ValueError, "valid: \\['full', 'small', 'tiny'\\]"):
            builtin.shapes_config("huge", 0)

    def test_demo_values_fit_the_config(self):
        values = demo_defaults.demo_input_config()
        config = paper.paper_config("A", "jitter")
        config.input.update(values["input"])  # unknown keys would raise
        config.evals.update(values["evals"])
        pipeline.check_input_config(config.input)
        self.assertLessEqual(config.input.train_scale_max, shapes.SHORT_SIDE[0] + 16)


class ImageFolderTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp()
        cls.folder = os.path.join(cls.root, "pets")
        testdata.write_image_folder(cls.folder, {"train": 4, "validation": 2}, ["cat", "dog"])
        # An undecodable file and a PNG with a .jpg name, as a real folder may hold.
        with open(os.path.join(cls.folder, "train", "cat", "broken.jpg"), "wb") as f:
            f.write(b"not an image")
        image, _ = builtin.draw_example(5, "train", 5)
        with open(os.path.join(cls.folder, "train", "dog", "really_png.jpg"), "wb") as f:
            f.write(testdata.png(image))
        cls.config = paper.paper_config("A", "s256")
        cls.config.input.update(
            dict(
                dataset="image_folder",
                folder=cls.folder,
                data_dir=os.path.join(cls.root, "tfds"),
                crop_size=32,
                train_scale_min=32,
                train_scale_max=40,
                batch_size=3,
                eval_batch_size=2,
            )
        )
        data.prepare(cls.config)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_folder_info_and_batches(self):
        info = data.dataset_info(self.config)
        self.assertEqual(info.class_names, ["cat", "dog"])
        self.assertEqual((info.num_train, info.num_eval), (9, 4))
        self.assertEqual(info.bad_input["train"]["skipped_undecodable"], 1)
        self.assertEqual(info.bad_input["train"]["png"], 1)
        batches = data.train_batches(self.config, 0, process_index=0, process_count=1)
        labels = np.concatenate([next(batches)["label"] for _ in range(3)])
        np.testing.assert_array_equal(np.bincount(labels), [4, 5])
        evaluation = list(data.eval_batches(self.config, 32, process_index=0, process_count=1))
        self.assertEqual(sum(int(b["mask"].sum()) for b in evaluation), 4)
        self.assertEqual(data.num_eval_examples(self.config), 4)

    def test_an_evaluation_pass_ends_without_waiting_for_the_teardown(self):
        """``eval_batches`` must not hold the ``tf.data`` iterator itself: released when its
        frame ended, in the consumer's thread, it stalled evaluation scales 1.5-7 s."""
        released = threading.Event()
        where: list[str] = []
        real_batches = pipeline._batches

        class SlowToRelease:
            def __init__(self, batches):
                self.batches = batches

            def __iter__(self):
                return self

            def __next__(self):
                return next(self.batches)

            def __del__(self):
                time.sleep(1.0)
                where.append(threading.current_thread().name)
                released.set()

        with mock.patch.object(
            pipeline, "_batches", lambda *args: SlowToRelease(real_batches(*args))
        ):
            batches = data.eval_batches(self.config, 32, process_index=0, process_count=1)
            scored = 0
            while scored < 4:  # the split's 4 images, the last batch's filler after them
                scored += int(next(batches)["mask"].sum())
            started = time.perf_counter()
            self.assertIsNone(next(batches, None))
            self.assertLess(time.perf_counter() - started, 0.5)
        self.assertTrue(released.wait(10))
        self.assertNotEqual(where, [threading.current_thread().name])

    def test_missing_folder_explains_the_layout(self):
        with self.assertRaisesRegex(FileNotFoundError, "<split>/<class>/<image>"):
            folder.list_splits(os.path.join(self.root, "nowhere"))
        config = self.config.copy_and_resolve_references()
        config.input.folder = None
        with self.assertRaisesRegex(ValueError, "--config.input.folder=ROOT"):
            data.prepare(config)


class PlannedBatchesTest(absltest.TestCase):
    def test_the_last_batch_ends_the_stream_without_waiting_for_the_teardown(self):
        """A finished ``tf.data`` iterator took seconds to release: the consumer must not wait
        for it (it did after every test scale), and no batch beyond the plan is asked for."""
        released = threading.Event()
        where: list[str] = []

        class SlowToRelease:
            def __init__(self):
                self.asked = 0

            def __iter__(self):
                return self

            def __next__(self):
                self.asked += 1
                return {"batch": self.asked}

            def __del__(self):
                time.sleep(1.0)
                where.append(threading.current_thread().name)
                released.set()

        made: list[SlowToRelease] = []
        planned = pipeline._planned_batches(lambda: made.append(SlowToRelease()) or made[0], 3)
        got = [next(planned)["batch"] for _ in range(3)]
        asked = made.pop().asked
        started = time.perf_counter()
        self.assertIsNone(next(planned, None))  # the end, at once
        self.assertLess(time.perf_counter() - started, 0.5)
        self.assertEqual((got, asked), ([1, 2, 3], 3))
        self.assertTrue(released.wait(10))
        self.assertNotEqual(where, [threading.current_thread().name])


class ConfigErrorTest(absltest.TestCase):
    def test_unknown_names_list_the_valid_ones(self):
        config = paper.paper_config("A", "s256")
        config.input.dataset = "cifar"
        with self.assertRaisesRegex(ValueError, "imagenet2012.*image_folder.*builtin"):
            data.prepare(config)
        config.input.dataset = "builtin"
        config.input.stats_source = "guess"
        with self.assertRaisesRegex(ValueError, "auto.*computed.*published"):
            data.prepare(config)

    def test_crop_larger_than_scale_fails_at_start(self):
        config = paper.paper_config("A", "s256")
        config.input.crop_size = 300
        with self.assertRaisesRegex(ValueError, "crop_size <= train_scale_min"):
            data.train_batches(config, 0, process_index=0, process_count=1).__next__()

    def test_batch_must_split_over_processes(self):
        with self.assertRaisesRegex(ValueError, "multiple of 3"):
            pipeline._local_size(256, 3, "batch_size")


if __name__ == "__main__":
    absltest.main()
