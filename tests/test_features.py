"""Penultimate-layer descriptors (dense FC2 averaged over cells, flips and scales, L2-normalised),
the linear classifier, and ``python -m vgg_jax.tools.features`` on a tiny trained demo net."""

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest

from vgg_jax import features, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROP = 32


def tiny_net(num_classes: int = 5):
    model = models.VGG(
        models.LAYOUTS["A"],
        num_classes=num_classes,
        crop_size=CROP,
        width=1 / 16,
        fc_width=16,
        initializer="glorot",
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, CROP, CROP, 3)))["params"]
    return model, params


def reference_descriptor(model, params, image: np.ndarray) -> np.ndarray:
    """FC2 after ReLU of one unpadded image through the dense form, mean over all its cells."""
    return np.asarray(_mean_fc2(model, params, jnp.asarray(image)[None]))[0]


@functools.partial(jax.jit, static_argnums=0)  # eager Flax compiles every primitive: slow
def _mean_fc2(model, params, images):
    _, state = model.apply(
        {"params": params},
        images,
        method="dense",
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    return jnp.maximum(state["intermediates"]["fc2"]["__call__"][0], 0).mean((1, 2))


class SyntheticSplit:
    """Images per (scale, example) of different sizes, served in padded buckets whose example
    order differs at each scale (as the data pipeline's bucketing does), with masked filler."""

    def __init__(self, scales, count=5, seed=0):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 5, size=count).astype(np.int32)
        self.images = {}
        for q in scales:
            for i in range(count):
                long_side = q + int(rng.integers(0, 40))
                shape = (q, long_side) if i % 2 else (long_side, q)
                self.images[q, i] = rng.normal(size=(*shape, 3)).astype(np.float32)

    def batches(self, scale):
        order = np.random.default_rng(scale).permutation(len(self.labels))
        for part in (order[:3], order[3:]):
            bucket = np.max([self.images[scale, i].shape[:2] for i in part], axis=0)
            batch = dict(
                image=np.zeros((4, *bucket, 3), np.float32),
                size=np.tile(bucket, (4, 1)).astype(np.int32),
                label=np.zeros(4, np.int32),
                mask=np.zeros(4, bool),
                index=np.full(4, -1, np.int64),
            )
            for row, i in enumerate(part):
                image = self.images[scale, i]
                batch["image"][row, : image.shape[0], : image.shape[1]] = image
                batch["size"][row] = image.shape[:2]
                batch["label"][row], batch["mask"][row], batch["index"][row] = (
                    self.labels[i],
                    True,
                    i,
                )
            yield batch


class DescriptorTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.model, cls.params = tiny_net()
        cls.scales = (32, 48)
        cls.split = SyntheticSplit(cls.scales)

    def test_descriptors_average_cells_flips_and_scales_then_normalise(self):
        found = features.extract_features(
            self.model, self.params, self.split.batches, self.scales, pixel_side=4
        )
        count = len(self.split.labels)
        self.assertEqual(found.features.shape, (count, self.model.fc_width))
        self.assertEqual(found.features.dtype, np.float32)
        np.testing.assert_allclose(np.linalg.norm(found.features, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(found.labels, self.split.labels)  # filler dropped, in order
        for i in range(count):
            per_scale = [
                (
                    reference_descriptor(self.model, self.params, self.split.images[q, i])
                    + reference_descriptor(
                        self.model, self.params, self.split.images[q, i][:, ::-1]
                    )
                )
                / 2
                for q in self.scales
            ]
            expected = np.mean(per_scale, axis=0)
            np.testing.assert_allclose(
                found.features[i], expected / np.linalg.norm(expected), atol=2e-5
            )
        self.assertEqual(found.pixels.shape, (count, 4 * 4 * 3))

    def test_all_zero_descriptors_stay_zero_and_are_reported(self):
        """Dead ReLUs (FC2 off everywhere): no NaN from the normalisation, and a warning that
        the descriptors carry nothing, before an error rate of them is printed."""
        params = dict(self.params)
        params["fc2"] = jax.tree_util.tree_map(jnp.zeros_like, self.params["fc2"])
        with self.assertLogs(level="WARNING") as logs:
            found = features.extract_features(
                self.model, params, self.split.batches, (32,), flip=False
            )
        np.testing.assert_array_equal(found.features, 0.0)
        self.assertIn("5 of 5 descriptors are all zero", "\n".join(logs.output))

    def test_flip_off_uses_the_image_alone(self):
        found = features.extract_features(
            self.model, self.params, self.split.batches, (48,), flip=False
        )
        expected = reference_descriptor(self.model, self.params, self.split.images[48, 1])
        np.testing.assert_allclose(
            found.features[1], expected / np.linalg.norm(expected), atol=2e-5
        )
        self.assertIsNone(found.pixels)

    def test_scales_below_the_crop_fail(self):
        with self.assertRaisesRegex(ValueError, "below the net's crop size 32"):
            features.extract_features(self.model, self.params, self.split.batches, (16,))

    def test_raw_pixels_are_area_averages_of_the_valid_region(self):
        image = np.random.default_rng(1).normal(size=(8, 12, 3)).astype(np.float32)
        padded = np.zeros((2, 10, 16, 3), np.float32)
        padded[0, :8, :12] = image
        padded[1, :8, :12] = image
        sizes = np.array([[8, 12], [8, 6]], np.int32)
        pixels = np.asarray(features.raw_pixels(jnp.asarray(padded), jnp.asarray(sizes), 2))
        blocks = image.reshape(2, 4, 2, 6, 3).mean(axis=(1, 3)).reshape(-1)
        np.testing.assert_allclose(pixels[0], blocks, atol=1e-5)
        left = image[:, :6].reshape(2, 4, 2, 3, 3).mean(axis=(1, 3)).reshape(-1)
        np.testing.assert_allclose(pixels[1], left, atol=1e-5)


class LinearClassifierTest(absltest.TestCase):
    def test_fits_separable_classes_and_generalises(self):
        rng = np.random.default_rng(0)
        centres = rng.normal(scale=3.0, size=(4, 20))
        labels = rng.integers(0, 4, size=400)
        x = (centres[labels] + rng.normal(size=(400, 20))).astype(np.float32)
        classifier = features.fit_linear_classifier(x[:300], labels[:300], 4)
        self.assertGreater(features.accuracy(classifier, x[300:], labels[300:]), 0.95)
        shuffled = features.fit_linear_classifier(x[:300], rng.permutation(labels[:300]), 4)
        self.assertLess(features.accuracy(shuffled, x[300:], labels[300:]), 0.5)

    def test_strong_l2_shrinks_the_weights(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(100, 5)).astype(np.float32)
        labels = (x[:, 0] > 0).astype(np.int32)
        weak = features.fit_linear_classifier(x, labels, 2, l2=1e-4)
        strong = features.fit_linear_classifier(x, labels, 2, l2=10.0)
        self.assertLess(np.abs(strong.weights).max(), 0.1 * np.abs(weak.weights).max())

    def test_labels_out_of_range_fail(self):
        with self.assertRaisesRegex(ValueError, r"Labels must be in \[0, 2\)"):
            features.fit_linear_classifier(np.zeros((3, 2)), np.array([0, 1, 2]), 2)

    def test_non_finite_inputs_fail_instead_of_predicting_class_0(self):
        """A damaged checkpoint's NaN descriptors used to give NaN weights, every prediction
        class 0, and a printed error rate."""
        x = np.random.default_rng(2).normal(size=(6, 3)).astype(np.float32)
        x[4, 1] = np.nan
        with self.assertRaisesRegex(ValueError, r"1 of 6 training inputs have NaN or infinite"):
            features.fit_linear_classifier(x, np.array([0, 1, 0, 1, 0, 1]), 2)

    def test_options_that_leave_the_classifier_unfitted_fail(self):
        x, labels = np.eye(4, dtype=np.float32), np.array([0, 1, 0, 1])
        for l2, steps in ((1e-3, 0), (1e-3, -3), (-1.0, 10), (float("nan"), 10)):
            with self.assertRaises(ValueError, msg=f"l2={l2} steps={steps}"):
                features.fit_linear_classifier(x, labels, 2, l2=l2, steps=steps)
        # The command's library call refuses them before preparing data or loading the net.
        with self.assertRaisesRegex(ValueError, "at least 1 L-BFGS step"):
            features.linear_probe(None, "/nonexistent", steps=0)


ERROR_LINE = r"linear on {}: top-1 error (\d+\.\d\d)%"


def write_shapes_folder(root: str, classes: int, per_split: dict[str, int]) -> None:
    """An image folder of built-in-dataset images filed by their true class (a real task)."""
    from tests import testdata
    from vgg_jax.data import builtin

    for split, count in per_split.items():
        found = dict.fromkeys(range(classes), 0)
        index = 0
        while min(found.values()) < count:
            image, label = builtin.draw_example(7, "validation", index)
            index += 1
            if label >= classes or found[label] >= count:
                continue
            directory = os.path.join(root, split, builtin.CLASS_NAMES[label])
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"{index}.png"), "wb") as f:
                f.write(testdata.png(image))
            found[label] += 1


@pytest.mark.slow
class CommandTest(absltest.TestCase):
    """``python -m vgg_jax.tools.features`` on an image folder, with a tiny demo-config net's
    checkpoint (random weights: the mechanics are tested here, the margin of a trained demo net
    is measured in docs/features.md)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        from experiments import demo
        from vgg_jax import checkpoint

        cls.tmp = tempfile.mkdtemp()
        cls.workdir = os.path.join(cls.tmp, "run")
        cls.folder = os.path.join(cls.tmp, "folder")
        cls.overrides = {
            "input.data_dir": os.path.join(cls.tmp, "data"),
            "input.dataset": "image_folder",
            "input.folder": cls.folder,
            "input.eval_batch_size": 16,
            "input.eval_bucket_step": 64,
            "evals.multi_scales": "(32,48)",
        }
        config = demo.get_config()
        config.model.width, config.model.fc_width = 1 / 16, 16
        model = models.build_model(config.model, config.input.crop_size)
        params = model.init(jax.random.key(0), jnp.zeros((1, CROP, CROP, 3)))["params"]
        checkpoint.save_params(cls.workdir, params, step=0, config=config)
        write_shapes_folder(cls.folder, 3, {"train": 6, "validation": 3})

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_command_on_an_image_folder_prints_both_errors_last(self):
        args = [sys.executable, "-m", "vgg_jax.tools.features", "--config=experiments/demo.py"]
        args += [f"--workdir={self.workdir}", "--steps=50"]
        args += [f"--config.{k}={v}" for k, v in self.overrides.items()]
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        lines = result.stdout.strip().splitlines()
        self.assertIn("18 train / 9 eval examples of image_folder", lines[-3])
        self.assertIn("FC2 (16-D), Q = {32, 48}", lines[-3])
        self.assertIn("16x16x3 (768-D)", lines[-3])
        feature_error = float(re.fullmatch(ERROR_LINE.format("VGG features"), lines[-2])[1])
        pixel_error = float(re.fullmatch(ERROR_LINE.format("raw pixels"), lines[-1])[1])
        for value in (feature_error / 100, pixel_error / 100):  # 9 examples: multiples of 1/9
            self.assertAlmostEqual(value * 9, round(value * 9), places=3)
            self.assertBetween(value, 0.0, 1.0)

    def test_a_workdir_without_the_checkpoint_fails_before_the_dataset_is_prepared(self):
        """Preparing the dataset takes hours for ImageNet; a typo in --workdir or --checkpoint
        used to be found only after it."""
        from experiments import demo
        from vgg_jax import data

        config = demo.get_config()
        config.update_from_flattened_dict({**self.overrides, "evals.multi_scales": (32, 48)})
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty, exist_ok=True)
        with mock.patch.object(data, "prepare", side_effect=AssertionError("prepared")):
            with self.assertRaisesRegex(FileNotFoundError, "No committed checkpoint"):
                features.linear_probe(config, empty)
            with self.assertRaisesRegex(FileNotFoundError, "No checkpoint at step 7"):
                features.linear_probe(config, self.workdir, "7")

    def test_a_checkpoint_without_its_convention_is_fed_its_training_configs_std(self):
        """The checkpoint was saved before checkpoints carried their input convention: it is
        rebuilt from the checkpoint's training config (the demo's ``pixel_std`` 60), not from
        the command's config (here 1, as the paper's nets)."""
        from experiments import demo
        from vgg_jax import data

        config = demo.get_config()
        overrides = {**self.overrides, "evals.multi_scales": (32, 48)}
        config.update_from_flattened_dict(overrides)
        config.input.pixel_std = (1.0, 1.0, 1.0)
        seen = []

        class Seen(Exception):
            pass

        def eval_batches(config, scale, *, input_convention=None, **_):
            seen.append(input_convention)
            raise Seen

        with mock.patch.object(data, "eval_batches", eval_batches), self.assertRaises(Seen):
            features.linear_probe(config, self.workdir)
        self.assertEqual(tuple(seen[0]["std"]), (60.0, 60.0, 60.0))


if __name__ == "__main__":
    absltest.main()
