"""The evaluator: dense and multi-crop on padded batches, exact counts on 1 and 4 devices,
softmax (not logit) averaging, results files, continuous mode.

Everything runs on a tiny net (configuration A at 1/16 width, 32-pixel crops) and fake batches of
the data pipeline's form, so no dataset or TensorFlow is needed (except for TensorBoard in the
continuous-mode test).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import time
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest
from jax.sharding import PartitionSpec as P

from tests import fixtures
from vgg_jax import checkpoint, compile_cache, metrics, models, sharding, writers
from vgg_jax.evaluation import continuous, methods, report, runner

NUM_CLASSES = 7  # more than 5, so top-5 error is a real measurement
CROP = 32
ASPECTS = (1.0, 1.5, 0.5, 1.25, 2.0)  # width / height; below 1: portrait


def tiny_config(**evals):
    config = fixtures.tiny_config(with_data=False, **{"model.num_classes": NUM_CLASSES})
    config.input.eval_batch_size = 8
    config.evals.update(evals)
    return config


def tiny_model(config=None):
    config = config or tiny_config()
    return models.build_model(config.model, config.input.crop_size)


def init_params(model, seed=0):
    """Random parameters drawn with NumPy (compiling ``model.init``'s RNG takes ~20 s here)."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) == 1:  # biases: small, non-zero, so padding mistakes would show
            return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map(draw, models.abstract_params(model))


def constant_params(model, logits):
    """Parameters whose net outputs ``logits`` for every input: zero kernels, fc3 bias."""
    params = jax.tree_util.tree_map(np.zeros_like, init_params(model))
    params["fc3"]["bias"] = np.asarray(logits, np.float32)
    return params


def example(index: int, scale: int) -> tuple[np.ndarray, int]:
    """Example ``index`` rescaled to smallest side ``scale``: ``(image, label)``."""
    aspect = ASPECTS[index % len(ASPECTS)]
    long_side = round(scale * max(aspect, 1 / aspect))
    height, width = (scale, long_side) if aspect >= 1 else (long_side, scale)
    rng = np.random.default_rng((index, scale))
    return rng.normal(size=(height, width, 3)).astype(np.float32), index % NUM_CLASSES


def fake_eval_batches(num_examples: int, shuffle: bool = False, bucket_step: int | None = None):
    """``BatchSource`` like ``data.eval_batches`` (one process): images zero-padded bottom/right
    into a bucket, the last batch filled with masked examples. Buckets: the batch's largest
    sides rounded up to ``bucket_step``, or one ``2Q x 2Q`` bucket for all (fewer compilations).
    ``shuffle`` gives each scale its own example order and an ``index`` field."""

    def batches(config, scale, input_convention=None):
        batch_size = config.input.eval_batch_size
        ids = np.arange(num_examples)
        if shuffle:
            ids = np.random.default_rng(scale).permutation(ids)
        for start in range(0, num_examples, batch_size):
            part = ids[start : start + batch_size]
            pairs = [example(i, scale) for i in part]
            bucket = (2 * scale, 2 * scale)
            if bucket_step:
                high = max(im.shape[0] for im, _ in pairs)
                wide = max(im.shape[1] for im, _ in pairs)
                bucket = (
                    -(-high // bucket_step) * bucket_step,
                    -(-wide // bucket_step) * bucket_step,
                )
            image = np.zeros((batch_size, *bucket, 3), np.float32)
            size = np.tile(np.asarray(bucket, np.int32), (batch_size, 1))
            label = np.zeros(batch_size, np.int32)
            for row, (im, lab) in enumerate(pairs):
                image[row, : im.shape[0], : im.shape[1]] = im
                size[row] = im.shape[:2]
                label[row] = lab
            batch = dict(
                image=image, size=size, label=label, mask=np.arange(batch_size) < len(part)
            )
            if shuffle:
                batch["index"] = np.concatenate([part, np.full(batch_size - len(part), -1)])
            yield batch

    return batches


# Jitted once per net (eager Flax compiles every primitive separately, which is slow).
dense_scores = jax.jit(methods.dense_scores, static_argnums=0)
dense_log_probabilities = jax.jit(methods.dense_log_probabilities, static_argnums=(0, 4))
multi_crop_log_probabilities = jax.jit(methods.multi_crop_log_probabilities, static_argnums=0)
grid_crops = jax.jit(methods.grid_crops, static_argnums=2)


def mesh_of(data: int, model: int = 1):
    return sharding.make_mesh(
        ml_collections.ConfigDict(dict(data=data, model=model)), jax.devices()[: data * model]
    )


def softmax(x):
    return np.asarray(jax.nn.softmax(jnp.asarray(x)))


def dense_probabilities(*args, **kwargs):
    return np.exp(dense_log_probabilities(*args, **kwargs))


def multi_crop_probabilities(*args):
    return np.exp(multi_crop_log_probabilities(*args))


def caffe_dense_scores(model, params, image):
    """Dense evaluation written independently of ``models.VGG``, as Caffe runs the converted
    net: a conv per layer, 2x2/2 max-pools in ceil mode (``reduce_window`` over -inf padding),
    FC1 as a VALID conv, FC2/FC3 as 1x1 convs, the score map averaged."""
    x = jnp.asarray(image[None])
    numbers = ("NHWC", "HWIO", "NHWC")
    for block_index, block in enumerate(model.layout, start=1):
        for conv_index in range(1, len(block) + 1):
            layer = params[f"block{block_index}_conv{conv_index}"]
            x = jax.lax.conv_general_dilated(
                x, layer["kernel"], (1, 1), "SAME", dimension_numbers=numbers
            )
            x = jax.nn.relu(x + layer["bias"])
        height, width = x.shape[1:3]
        padding = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), padding)
    window = model.crop_size // 32
    fc1 = params["fc1"]["kernel"].reshape(window, window, x.shape[-1], -1)
    x = jax.lax.conv_general_dilated(x, fc1, (1, 1), "VALID", dimension_numbers=numbers)
    x = jax.nn.relu(x + params["fc1"]["bias"])
    x = jax.nn.relu(x @ params["fc2"]["kernel"] + params["fc2"]["bias"])
    x = x @ params["fc3"]["kernel"] + params["fc3"]["bias"]
    return np.asarray(x.mean(axis=(1, 2)))


class DenseTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = tiny_model()
        cls.params = init_params(cls.model)

    def test_crop_size_image_equals_classifier_logits(self):
        images = np.random.default_rng(0).normal(size=(3, CROP, CROP, 3)).astype(np.float32)
        sizes = np.full((3, 2), CROP, np.int32)
        logits = self.model.apply({"params": self.params}, images)
        scores = dense_scores(self.model, self.params, images, sizes)
        np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-6)
        unflipped = dense_probabilities(self.model, self.params, images, sizes, flip=False)
        np.testing.assert_allclose(unflipped, softmax(logits), rtol=1e-5, atol=1e-7)

    def test_any_image_size_matches_caffe_ceil_mode_reference(self):
        rng = np.random.default_rng(3)
        for height, width in ((40, 56), (33, 70), (64, 45), (32, 32)):
            image = rng.normal(size=(height, width, 3)).astype(np.float32)
            want = caffe_dense_scores(self.model, self.params, image)
            got = dense_scores(self.model, self.params, image[None])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=(height, width))
            # ... and padded into a bucket with its valid size, as the pipeline batches it.
            bucket = np.zeros((1, 96, 96, 3), np.float32)
            bucket[0, :height, :width] = image
            size = np.array([[height, width]], np.int32)
            padded = dense_scores(self.model, self.params, bucket, size)
            np.testing.assert_allclose(padded, want, rtol=1e-5, atol=1e-5, err_msg=(height, width))

    def test_the_bottom_right_pixels_reach_the_scores(self):
        """At Q = 48 (the demo's validation scale) a 48 x 72 image's last 16 rows and 8 columns
        are past the last full 32-pixel cell: floor-mode pooling never looked at them."""
        image, _ = example(1, 48)  # 48 x 72
        changed = image.copy()
        changed[40:, :] += 5.0
        changed[:, 66:] += 5.0
        before = dense_scores(self.model, self.params, image[None])
        after = dense_scores(self.model, self.params, changed[None])
        self.assertGreater(np.abs(np.asarray(after) - np.asarray(before)).max(), 1e-3)
        score_map, _ = self.model.apply({"params": self.params}, image[None], method="dense")
        self.assertEqual(score_map.shape[1:3], (2, 3))  # ceil(48/32), ceil(72/32) cells

    def test_padded_into_bucket_equals_unpadded(self):
        image, _ = example(1, 48)  # 48 x 72
        bucket = np.zeros((1, 80, 112, 3), np.float32)
        bucket[0, :48, :72] = image
        size = np.array([[48, 72]], np.int32)
        flipped = np.asarray(methods.flip_within_valid(jnp.asarray(bucket), jnp.asarray(size)))
        np.testing.assert_array_equal(flipped[0, :48, :72], image[:, ::-1])
        self.assertEqual(np.abs(flipped[0, 48:]).max() + np.abs(flipped[0, :, 72:]).max(), 0.0)
        for flip in (False, True):
            padded = dense_probabilities(self.model, self.params, bucket, size, flip)
            alone = dense_probabilities(self.model, self.params, image[None], size, flip)
            np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-7)
        # The flip is the whole image's: dense on the mirrored image, softmax, averaged.
        mirrored = dense_scores(self.model, self.params, image[None, :, ::-1].copy())
        plain = dense_scores(self.model, self.params, image[None])
        expected = (softmax(plain) + softmax(mirrored)) / 2
        got = dense_probabilities(self.model, self.params, bucket, size, flip=True)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


class MultiCropTest(absltest.TestCase):
    def test_grid_covers_image_evenly_plus_flips(self):
        image, _ = example(1, 48)  # 48 x 72: offsets 0..16 down, 0..40 across
        bucket = np.zeros((1, 64, 96, 3), np.float32)
        bucket[0, :48, :72] = image
        size = np.array([[48, 72]], np.int32)
        offsets = np.asarray(methods.grid_offsets(jnp.asarray(size), CROP))[0]
        self.assertEqual(offsets.shape, (25, 2))
        np.testing.assert_array_equal(np.unique(offsets[:, 0]), [0, 4, 8, 12, 16])
        np.testing.assert_array_equal(np.unique(offsets[:, 1]), [0, 10, 20, 30, 40])
        np.testing.assert_array_equal(offsets[0], [0, 0])
        np.testing.assert_array_equal(offsets[-1], [48 - CROP, 72 - CROP])
        crops = np.asarray(grid_crops(jnp.asarray(bucket), jnp.asarray(size), CROP))[0]
        self.assertEqual(crops.shape, (50, CROP, CROP, 3))
        covered = np.zeros((48, 72), bool)
        for k, (y, x) in enumerate(offsets):
            np.testing.assert_array_equal(crops[k], image[y : y + CROP, x : x + CROP])
            np.testing.assert_array_equal(crops[25 + k], image[y : y + CROP, x : x + CROP][:, ::-1])
            covered[y : y + CROP, x : x + CROP] = True
        self.assertTrue(covered.all())

    def test_multi_crop_is_mean_softmax_of_the_50_crops(self):
        model = tiny_model()
        params = init_params(model)
        images = np.stack([example(0, 48)[0], example(0, 48)[0] * 0.5])  # two 48 x 48 images
        sizes = np.array([[48, 48], [40, 48]], np.int32)  # the second uses its top 40 rows only
        crops = grid_crops(jnp.asarray(images), jnp.asarray(sizes), CROP)
        got = multi_crop_probabilities(model, params, images, sizes)
        logits = jax.jit(model.apply)({"params": params}, crops.reshape(-1, CROP, CROP, 3))
        expected = softmax(logits).reshape(2, 50, NUM_CLASSES).mean(1)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
        # The second image's grid ends at its valid bottom-right corner, above the padding.
        np.testing.assert_array_equal(crops[1, 24], images[1, 40 - CROP : 40, 48 - CROP :])

    def test_distinct_crops_stand_for_the_whole_grid(self):
        sizes = np.array([[32, 48], [48, 32], [32, 32], [40, 75], [33, 34], [0, 0]], np.int32)
        for grid in (1, 2, 3, 5):
            offsets, weights, rounds = jax.jit(methods.distinct_crops_plan, static_argnums=(1, 2))(
                jnp.asarray(sizes), CROP, grid
            )
            offsets, weights = np.asarray(offsets), np.asarray(weights)
            grown = jnp.asarray(np.maximum(sizes, CROP))  # sizes below the crop: clamped to it
            every = np.asarray(methods.grid_offsets(grown, CROP, grid))
            for n in range(len(sizes)):
                kept = int((weights[n] > 0).sum())
                self.assertTrue((weights[n, :kept] > 0).all())  # distinct ones first
                pairs = zip(offsets[n, :kept], weights[n, :kept], strict=True)
                got = {tuple(o): int(w) for o, w in pairs}
                self.assertLen(got, kept)  # each distinct crop once
                want: dict = {}
                for o in every[n]:
                    want[tuple(o)] = want.get(tuple(o), 0) + 1
                self.assertEqual(got, want, (grid, sizes[n]))
            # 32 x 48 and 48 x 32: one row / one column of the grid; 40 x 75 at grid 5: 5 x 5.
            self.assertEqual(int(rounds), grid * grid)
        one_row = jnp.asarray([[32, 48], [48, 32], [32, 32]], jnp.int32)
        self.assertEqual(int(methods.distinct_crops_plan(one_row, CROP, 5)[2]), 5)

    def test_repeated_crops_are_classified_once_with_the_same_result(self):
        model = tiny_model()
        params = init_params(model, seed=1)
        mesh = mesh_of(1)
        functions = methods.compiled_methods.__wrapped__(model, mesh)
        rng = np.random.default_rng(0)
        images = rng.normal(size=(4, 48, 64, 3)).astype(np.float32)
        for sizes, rounds in (
            ([[32, 64], [48, 32], [32, 32], [32, 40]], 5),  # Q = crop size: one row or column
            ([[32, 32]] * 4, 1),  # square crop-size images: one crop (and its flip)
            ([[48, 64], [32, 32], [40, 40], [32, 48]], 25),
        ):
            sizes = np.asarray(sizes, np.int32)
            rows = np.arange(48)[None, :, None] < sizes[:, 0, None, None]
            cols = np.arange(64)[None, None, :] < sizes[:, 1, None, None]
            masked = images * (rows & cols)[..., None]  # zero outside each image, as padded
            executable = functions.compile("multi_crop", params, masked, sizes)
            crop_rounds = executable.inner  # the landscape shape's crop programs
            before = crop_rounds.rounds_run
            got = executable(params, jnp.asarray(masked), jnp.asarray(sizes))
            self.assertEqual(crop_rounds.rounds_run - before, rounds)
            want = multi_crop_probabilities(model, params, masked, sizes)
            np.testing.assert_allclose(np.exp(got), want, rtol=1e-5, atol=1e-6)

    def test_portrait_buckets_run_transposed_through_the_landscape_programs(self):
        model = tiny_model()
        params = init_params(model, seed=2)
        rng = np.random.default_rng(1)
        landscape = rng.normal(size=(4, 32, 48, 3)).astype(np.float32)
        portrait = rng.normal(size=(4, 48, 32, 3)).astype(np.float32)
        wide = np.array([[32, 48], [32, 40], [32, 32], [32, 48]], np.int32)
        tall = np.array([[48, 32], [40, 32], [32, 32], [45, 32]], np.int32)
        portrait[1, 40:] = portrait[3, 45:] = 0  # padded below their valid rows
        for mesh in (mesh_of(1), mesh_of(2, 2)):  # (2, 2): FC1 and FC2 split over devices
            functions = methods.compiled_methods.__wrapped__(model, mesh)
            for method in ("dense", "multi_crop"):
                functions(method, params, landscape, wide)
            before = functions.compilations
            got = {m: functions(m, params, portrait, tall) for m in ("dense", "multi_crop")}
            # Only the batch's transposing copy and the parameters' transpose are new.
            self.assertEqual(functions.compilations - before, 2)
            want_dense = dense_probabilities(model, params, portrait, tall, True)
            want_crops = multi_crop_probabilities(model, params, portrait, tall)
            np.testing.assert_allclose(np.exp(got["dense"]), want_dense, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(np.exp(got["multi_crop"]), want_crops, rtol=1e-5, atol=1e-6)


def reference_probabilities(model, params, num_examples, scale):
    """Every example in one batch, straight through the methods (no mesh, no runner): dense
    (with flip) and 50-crop softmax, and the labels."""
    config = tiny_config()
    config.input.eval_batch_size = num_examples
    (batch,) = fake_eval_batches(num_examples)(config, scale)
    images, sizes = jnp.asarray(batch["image"]), jnp.asarray(batch["size"])
    dense = dense_probabilities(model, params, images, sizes, True)
    crops = multi_crop_probabilities(model, params, images, sizes)
    return dense, crops, batch["label"]


def errors(probabilities, labels):
    counts = metrics.classification_counts(jnp.asarray(probabilities), jnp.asarray(labels))
    return metrics.errors_from_counts(counts), int(counts["count"])


def save_net(workdir, params, config, step=0):
    checkpoint.save_params(workdir, params, step=step, config=config)


class RunnerTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.config = tiny_config()
        cls.model = tiny_model(cls.config)
        cls.params = init_params(cls.model, seed=3)
        cls.workdir = cls.create_tempdir_once()
        save_net(cls.workdir, cls.params, cls.config, step=7)

    @classmethod
    def create_tempdir_once(cls):
        import tempfile

        return tempfile.mkdtemp(prefix="evaluate_test_")

    def test_every_example_counted_once_on_1_and_4_devices(self):
        """13 examples: not a multiple of any batch size here (8, 12, 6) nor of the devices."""
        num_examples = 13
        dense, crops, labels = {}, {}, None
        for scale in (32, 48):
            dense[scale], crops[scale], labels = reference_probabilities(
                self.model, self.params, num_examples, scale
            )
        expected = {
            ("dense", (48,)): dense[48],
            ("multi_crop", (48,)): crops[48],
            ("dense+multi_crop", (48,)): (dense[48] + crops[48]) / 2,
            ("dense", (32, 48)): (dense[32] + dense[48]) / 2,
            ("multi_crop", (32, 48)): (crops[32] + crops[48]) / 2,
            ("dense+multi_crop", (32, 48)): (dense[32] + dense[48] + crops[32] + crops[48]) / 4,
        }
        # (data, model) mesh axes; with model=2 FC1/FC2 are split across devices.
        for (data, model), batch_size, shuffle in (
            ((4, 1), 8, False),
            ((1, 1), 12, True),
            ((2, 2), 6, True),
        ):
            config = tiny_config()
            config.input.eval_batch_size = batch_size
            mesh = mesh_of(data, model)
            net = runner.load_net(self.workdir, "latest", mesh, config)
            self.assertEqual((net.step, net.name, net.train_scale), (7, "A", "[32;64]"))
            if model > 1:
                self.assertEqual(net.params["fc1"]["kernel"].sharding.spec, P(None, "model"))
            outputs = runner.evaluate_net(
                config, net, mesh, fake_eval_batches(num_examples, shuffle)
            )
            got = {(r["method"], tuple(r["test_scales"])): r for r in outputs.rows}
            self.assertEqual(set(got), set(expected))
            for key, probabilities in expected.items():
                want, count = errors(probabilities, labels)
                self.assertEqual(count, num_examples)
                self.assertEqual(got[key]["count"], num_examples, (data, model, batch_size, key))
                self.assertAlmostEqual(got[key]["top1_error"], want["top1_error"], places=4)
                self.assertIsNotNone(want["top5_error"])
                self.assertAlmostEqual(got[key]["top5_error"], want["top5_error"], places=4)
                self.assertGreater(got[key]["images_per_second"], 0)
            for method in ("dense", "multi_crop"):  # portrait buckets ran transposed
                np.testing.assert_allclose(  # kept as logarithms
                    np.exp(outputs.multi_scale[method]), expected[(method, (32, 48))], atol=1e-5
                )

    def test_the_evaluation_config_sets_the_compute_dtype(self):
        # The checkpoint was saved by a float32 run; bfloat16 was ignored, and a bfloat16-trained
        # net evaluated with a float32 config ran in bfloat16.
        trained_bf16 = self.create_tempdir_once()
        trained_config = tiny_config()
        trained_config.model.dtype = "bfloat16"
        save_net(trained_bf16, self.params, trained_config, step=7)
        mesh = mesh_of(1)
        for workdir in (self.workdir, trained_bf16):
            for dtype in ("float32", "bfloat16"):
                config = tiny_config()
                config.model.dtype = dtype
                net = runner.load_net(workdir, "latest", mesh, config)
                self.assertEqual(jnp.dtype(net.model.dtype), jnp.dtype(dtype), workdir)
                leaves = jax.tree_util.tree_leaves(net.params)
                self.assertEqual({leaf.dtype for leaf in leaves}, {jnp.dtype(jnp.float32)})

    def test_the_net_compiles_once_per_bucket_shape_and_once_for_all_crops(self):
        config = tiny_config()
        mesh = mesh_of(4)
        functions = methods.compiled_methods.__wrapped__(self.model, mesh)  # a fresh count
        net = runner.load_net(self.workdir, 7, mesh, config)
        shapes = set()
        for scale in (48, 64):
            batches = list(fake_eval_batches(24, bucket_step=16)(config, scale))
            shapes |= {b["image"].shape for b in batches}
            self.assertLess(len({b["image"].shape for b in batches}), len(batches))  # shared
            runs = ["dense", "multi_crop"]
            runner.evaluate_scale(net.params, functions, batches + batches, runs, mesh)
        # A portrait bucket runs transposed through its landscape twin's programs. Dense: the
        # net per shape up to transposition. Multi-crop: a crop-cutting gather per such shape,
        # and once for every shape and scale the plan of distinct crops and the net on crops.
        # Each portrait shape adds a transposing copy; the parameters are transposed once.
        landscape = {(b, min(h, w), max(h, w), c) for b, h, w, c in shapes}
        portrait = {s for s in shapes if s[1] > s[2]}
        self.assertEqual(
            functions.compilations, 2 * len(landscape) + 2 + len(portrait) + bool(portrait)
        )

    def use_cache_dir(self, path):
        """JAX's persistent cache directory set to ``path`` for this test (the suite sets its
        own in ``conftest.py``)."""
        self.addCleanup(
            jax.config.update, "jax_compilation_cache_dir", jax.config.jax_compilation_cache_dir
        )
        jax.config.update("jax_compilation_cache_dir", path)

    def test_the_cache_is_the_workdirs_unless_the_user_set_one(self):
        workdir, own = self.create_tempdir_once(), self.create_tempdir_once()
        self.use_cache_dir(None)
        with compile_cache.workdir_cache(workdir) as path:
            self.assertEqual(path, os.path.join(workdir, compile_cache.CACHE_DIR))
            self.assertEqual(jax.config.jax_persistent_cache_min_compile_time_secs, 0.0)
        self.assertIsNone(jax.config.jax_compilation_cache_dir)
        self.use_cache_dir(own)
        with compile_cache.workdir_cache(workdir) as path:
            self.assertEqual(path, own)
            self.assertEqual(jax.config.jax_persistent_cache_min_compile_time_secs, 0.0)
        self.assertEqual(jax.config.jax_compilation_cache_dir, own)

    def test_second_evaluation_compiles_no_program(self):
        workdir = self.create_tempdir_once()
        self.use_cache_dir(None)  # the workdir's cache
        save_net(workdir, self.params, self.config, step=5)
        batches = fake_eval_batches(9, bucket_step=16)
        counts = [compile_cache.program_counts()]
        for _ in range(2):
            # A fresh process's state: no in-memory executables, only the workdir's cache.
            methods.compiled_methods.cache_clear()
            jax.clear_caches()
            with contextlib.redirect_stdout(io.StringIO()):
                runner.run_evaluation(self.config, workdir, batches=batches)
            counts.append(compile_cache.program_counts())
        (compiled0, _), (compiled1, loaded1), (compiled2, loaded2) = counts
        self.assertGreaterEqual(compiled1 - compiled0, 4)  # 2 methods x 2 scales at least
        self.assertEqual(compiled2 - compiled1, 0)
        self.assertGreaterEqual(loaded2 - loaded1, compiled1 - compiled0)
        self.assertTrue(os.listdir(os.path.join(workdir, compile_cache.CACHE_DIR)))

    def test_run_evaluation_prints_and_writes_the_table(self):
        workdir = self.create_tempdir_once()
        save_net(workdir, self.params, self.config, step=3)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rows = runner.run_evaluation(self.config, workdir, batches=fake_eval_batches(9))
        self.assertLen(rows, 6)  # 3 methods x (Q=48, Q={32,48})
        printed = stdout.getvalue()
        self.assertIn("top-1 val. error (%)", printed)
        self.assertIn("| A ", printed)
        self.assertIn("dense + multi-crop", printed)
        self.assertIn("32,48", printed)
        with open(os.path.join(workdir, "results.json")) as f:
            saved = json.load(f)
        self.assertEqual(saved["rows"], rows)
        self.assertEqual(saved["checkpoints"][0]["step"], 3)
        with open(os.path.join(workdir, "results.md")) as f:
            self.assertIn(report.format_table(rows), f.read())

    def test_fusion_and_combination_average_softmax_not_logits(self):
        # Two nets that ignore their input. Net 1 leans to class 0, net 2 strongly to class 2.
        # Averaged logits pick class 1; averaged softmax picks class 0, the label of every example.
        logits_1 = np.pad([2.0, 0.0], (0, NUM_CLASSES - 2), constant_values=-30.0)
        logits_2 = np.pad([-30.0, 0.0, 1.0], (0, NUM_CLASSES - 3), constant_values=-30.0)
        self.assertEqual(np.argmax((logits_1 + logits_2) / 2), 1)
        self.assertEqual(np.argmax(softmax(logits_1) + softmax(logits_2)), 0)

        first, second = self.create_tempdir_once(), self.create_tempdir_once()
        save_net(first, constant_params(self.model, logits_1), self.config)
        save_net(second, constant_params(self.model, logits_2), self.config)
        config = tiny_config(fusion_workdirs=(f"{second}@latest",))
        every_label_0 = fake_eval_batches(2 * NUM_CLASSES)

        def label_0_batches(config, scale, input_convention=None):
            for batch in every_label_0(config, scale):
                yield {**batch, "label": np.zeros_like(batch["label"])}

        rows, about = runner.evaluate_checkpoints(config, first, "latest", batches=label_0_batches)
        self.assertEqual([c["workdir"] for c in about["checkpoints"]], [first, second])
        self.assertEqual([c["asked"] for c in about["checkpoints"]], ["latest", "latest"])
        fused = [r for r in rows if "&" in r["net"]]
        self.assertLen(fused, 3)  # dense, multi-crop, both
        for row in fused:
            self.assertEqual(row["top1_error"], 0.0, row)
            self.assertEqual(row["test_scales"], [32, 48])
            self.assertEqual(row["count"], 2 * NUM_CLASSES)
        by_net = {}
        for row in rows:
            by_net.setdefault(row["net"], set()).add(row["top1_error"])
        first_name, second_name = (f"A ({os.path.basename(w)})" for w in (first, second))
        self.assertEqual(by_net[first_name], {0.0})
        self.assertEqual(by_net[second_name], {100.0})

        # Combination of methods, from hand-made per-example outputs: dense says logits_1,
        # multi-crop says logits_2; the combined row must be right where a logit mean is wrong.
        labels = np.zeros(4, np.int32)
        outputs = {
            "dense": np.tile(np.log(softmax(logits_1)), (4, 1)),
            "multi_crop": np.tile(np.log(softmax(logits_2)), (4, 1)),
        }
        rows = runner.method_rows(
            "A",
            "256",
            [256],
            outputs,
            labels,
            {"dense": 1.0, "multi_crop": 1.0},
            runner.METHODS,
            0,
        )
        by_method = {r["method"]: r["top1_error"] for r in rows}
        self.assertEqual(by_method, {"dense": 0.0, "multi_crop": 100.0, "dense+multi_crop": 0.0})

    def test_fusion_names_tell_nets_apart_and_one_checkpoint_twice_is_refused(self):
        root = self.create_tempdir_once()
        logits = np.pad([2.0, 0.0], (0, NUM_CLASSES - 2), constant_values=-30.0)
        for parent in ("a", "b"):
            save_net(
                os.path.join(root, parent, "w"), constant_params(self.model, logits), self.config
            )
        first, second = os.path.join(root, "a", "w"), os.path.join(root, "b", "w")
        batches = fake_eval_batches(NUM_CLASSES)
        config = tiny_config(fusion_workdirs=(second,))
        rows, _ = runner.evaluate_checkpoints(config, first, "latest", batches=batches)
        names = {r["net"] for r in rows}  # today: both "A (w)"
        self.assertTrue({"A (a/w)", "A (b/w)"} <= names, names)
        config = tiny_config(fusion_workdirs=(first + "/",))  # the same checkpoint again
        with (
            self.assertRaisesRegex(ValueError, "same checkpoint more than once"),
            mock.patch.object(runner, "evaluate_net", side_effect=AssertionError("evaluated")),
        ):  # said before any net is evaluated
            runner.evaluate_checkpoints(config, first, "latest", batches=batches)

    def test_fusion_of_nets_with_other_classes_is_refused_even_when_accepted(self):
        """Fusion averages output i of each net: a partner with another class count failed in
        np.stack after both nets' evaluation; one with its classes in another order was fused
        silently under accept_checkpoint_net. It is said before any net is evaluated (it came
        after the first net's evaluation, hours of it wasted)."""
        root = self.create_tempdir_once()
        names = [f"c{i}" for i in range(NUM_CLASSES)]
        first = os.path.join(root, "first")
        checkpoint.save_params(first, self.params, config=self.config, class_names=names)
        wider = tiny_config()
        wider.model.num_classes = NUM_CLASSES + 1
        partners = {
            "8 classes": (wider, names + ["c7"]),
            "reordered": (self.config, names[::-1]),
        }
        batches = fake_eval_batches(NUM_CLASSES)
        for case, (partner_config, partner_names) in partners.items():
            with self.subTest(case):
                second = os.path.join(root, case.replace(" ", "_"))
                partner = init_params(tiny_model(partner_config), seed=4)
                checkpoint.save_params(
                    second, partner, config=partner_config, class_names=partner_names
                )
                config = tiny_config(fusion_workdirs=(second,), accept_checkpoint_net=True)
                with (
                    self.assertRaisesRegex(checkpoint.NetMismatchError, "Cannot fuse.*classes"),
                    mock.patch.object(runner, "evaluate_net", side_effect=AssertionError("ran")),
                ):
                    runner.evaluate_checkpoints(config, first, "latest", batches=batches)

    def test_watch_evaluates_each_new_checkpoint_once(self):
        workdir = self.create_tempdir_once()
        for step in (10, 20):
            save_net(workdir, self.params, self.config, step=step)
        config = tiny_config(methods=("dense",))
        batches = fake_eval_batches(5)
        results = continuous.watch(config, workdir, poll_seconds=0.1, timeout=0.3, batches=batches)
        self.assertEqual(sorted(results), [10, 20])
        eval_dir = os.path.join(workdir, continuous.EVAL_SUBDIR)
        self.assertEqual(continuous.evaluated_steps(eval_dir), {10, 20})
        self.assertTrue(os.listdir(os.path.join(eval_dir, "tensorboard")))
        with open(os.path.join(eval_dir, "metrics.jsonl")) as f:
            logged = [json.loads(line) for line in f]
        self.assertEqual([entry["step"] for entry in logged], [10, 20])
        self.assertIn("dense_Q32-48/top1_error", logged[0])
        save_net(workdir, self.params, self.config, step=30)
        again = continuous.watch(config, workdir, poll_seconds=0.1, timeout=0.3, batches=batches)
        self.assertEqual(sorted(again), [30])
        # Other settings: every step again (today: "no new checkpoint", the old tables kept).
        other = tiny_config(methods=("dense",), flip=False)
        redone = continuous.watch(other, workdir, poll_seconds=0.1, timeout=0.3, batches=batches)
        self.assertEqual(sorted(redone), [10, 20, 30])
        with open(os.path.join(eval_dir, "step_20.json")) as f:
            self.assertFalse(json.load(f)["settings"]["flip"])

    def test_a_step_whose_figures_were_not_written_is_evaluated_again(self):
        """A full disk after step_N.json was written (its .md, the TensorBoard scalars, the
        metrics.jsonl line) stopped the watcher with step N marked evaluated: restarted, it
        skipped it, and its figures were never logged."""
        workdir = self.create_tempdir_once()
        save_net(workdir, self.params, self.config, step=10)
        config = tiny_config(methods=("dense",))
        batches = fake_eval_batches(5)
        eval_dir = os.path.join(workdir, continuous.EVAL_SUBDIR)
        real_write = writers.write_together
        for fails in ("metrics.jsonl", "step_10.md"):

            def full_disk(texts, fails=fails):
                for path in texts:
                    if path.endswith(fails):
                        raise writers.WriteError(28, os.strerror(28), path)
                return real_write(texts)

            write_scalars = writers.MetricWriter.write_scalars
            if fails == "metrics.jsonl":
                write_scalars = mock.Mock(side_effect=writers.WriteError(28, "full", "x"))
            with (
                mock.patch.object(writers, "write_together", full_disk),
                mock.patch.object(writers.MetricWriter, "write_scalars", write_scalars),
                self.assertRaises(writers.WriteError),
            ):
                continuous.watch(config, workdir, poll_seconds=0.1, timeout=0.3, batches=batches)
            self.assertEqual(continuous.evaluated_steps(eval_dir), set())  # today: {10}
        again = continuous.watch(config, workdir, poll_seconds=0.1, timeout=0.3, batches=batches)
        self.assertEqual(sorted(again), [10])
        self.assertTrue(os.path.exists(os.path.join(eval_dir, "step_10.md")))
        with open(os.path.join(eval_dir, "metrics.jsonl")) as f:
            self.assertIn(10, [json.loads(line)["step"] for line in f])

    def test_watch_evaluates_another_trainings_steps_again(self):
        """Training started again in the same workdir (checkpoints deleted, another learning
        rate) saves the same step numbers: the watcher skipped them as evaluated, leaving the
        first training's tables as the second's."""
        workdir = self.create_tempdir_once()
        save_net(workdir, self.params, self.config, step=10)
        config = tiny_config(methods=("dense",))
        batches = fake_eval_batches(5)
        watch = functools.partial(
            continuous.watch, config, workdir, poll_seconds=0.1, timeout=0.3, batches=batches
        )
        self.assertEqual(sorted(watch()), [10])
        self.assertEqual(watch(), {})  # the same training: nothing again
        shutil.rmtree(os.path.join(workdir, "checkpoints"))
        retrained = tiny_config()
        retrained.optim.learning_rate *= 10
        save_net(workdir, init_params(self.model, seed=4), retrained, step=10)
        with self.assertLogs(level="WARNING") as logs:
            again = watch()
        self.assertEqual(sorted(again), [10])
        self.assertIn("Steps [10] of", "\n".join(logs.output))
        self.assertNotEqual(again[10], [])
        self.assertEqual(watch(), {})

    def test_watch_stops_once_the_trainings_last_checkpoint_is_evaluated(self):
        workdir = self.create_tempdir_once()
        checkpoints = checkpoint.Checkpointer(workdir, async_save=False)
        for step, final in ((10, False), (20, True)):  # as training saves them
            meta = {"config": self.config.to_dict(), "final": final}
            checkpoints.save(step, self.params, {"count": jnp.zeros((), jnp.int32)}, meta)
        checkpoints.close()
        config = tiny_config(methods=("dense",))
        batches = fake_eval_batches(5)
        start = time.monotonic()
        results = continuous.watch(config, workdir, poll_seconds=0.1, timeout=600, batches=batches)
        self.assertEqual(sorted(results), [10, 20])
        again = continuous.watch(config, workdir, poll_seconds=0.1, timeout=600, batches=batches)
        self.assertEqual(again, {})
        self.assertLess(time.monotonic() - start, 120)  # not the 600 s timeout

    def test_a_missing_checkpoint_fails_before_the_dataset_is_read(self):
        from vgg_jax import data

        empty, trained = self.create_tempdir_once(), self.create_tempdir_once()
        save_net(trained, self.params, self.config, step=10)
        reading = mock.patch.object(data, "num_eval_examples", side_effect=AssertionError("data"))
        with (
            reading,
            self.assertRaisesRegex(FileNotFoundError, f"No committed checkpoint in {empty}"),
        ):
            runner.evaluate_checkpoints(tiny_config(), empty, "latest")
        with reading, self.assertRaisesRegex(FileNotFoundError, "step 20 .* available: \\[10\\]"):
            runner.evaluate_checkpoints(tiny_config(), trained, 20)
        fused = tiny_config(fusion_workdirs=(empty,))
        with reading, self.assertRaisesRegex(FileNotFoundError, f"checkpoint in {empty}"):
            runner.evaluate_checkpoints(fused, trained, "latest")

    def test_bad_settings_fail_with_the_valid_choices(self):
        mesh = mesh_of(4)
        with self.assertRaisesRegex(ValueError, "dense\\+multi_crop"):
            runner.check_evals(tiny_config(methods=("dense", "multicrop")), mesh)
        with self.assertRaisesRegex(ValueError, 'several on the command line: .*"dense"'):
            runner.check_evals(tiny_config(methods=("dense,multi_crop",)), mesh)
        with self.assertRaisesRegex(ValueError, "'best'"):
            runner.check_evals(tiny_config(checkpoint="newest"), mesh)
        config = tiny_config()
        config.input.eval_batch_size = 6
        with self.assertRaisesRegex(ValueError, "multiple of the 4 devices"):
            runner.check_evals(config, mesh)
        config = tiny_config(multi_scales=(24, 48))
        net = runner.load_net(self.workdir, "latest", mesh, config)
        with self.assertRaisesRegex(ValueError, "crop size 32"):
            runner.evaluate_net(config, net, mesh, fake_eval_batches(4))


class FewClassesTest(absltest.TestCase):
    def test_top5_of_five_classes_or_fewer_is_not_applicable_in_every_output(self):
        # 3 classes: every label is in the top 5, so top-5 error printed 0.00 as a measurement.
        labels = np.array([0, 1, 2, 0])
        log_probabilities = np.log(np.full((4, 3), 1 / 3, np.float32))
        log_probabilities[:, 1] += 0.5
        rows = runner.method_rows(
            "A", "256", [256], {"dense": log_probabilities}, labels, {"dense": 1.0}, ["dense"], 7
        )
        (row,) = rows
        self.assertIsNone(row["top5_error"])
        self.assertEqual(row["top1_error"], 75.0)
        table = report.format_table(rows)
        cells = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
        self.assertEqual(cells[4:6], ["75.00", "n/a"])
        self.assertNotIn(f"{report.scalar_name(row, 'top5_error')}", continuous._scalars(rows))
        directory = self.create_tempdir().full_path
        json_path, markdown_path = report.write_results(directory, rows, {"checkpoints": []})

        def no_constants(name):
            raise ValueError(f"{name} is not JSON")

        with open(json_path) as f:  # strict JSON: no NaN
            self.assertIsNone(json.load(f, parse_constant=no_constants)["rows"][0]["top5_error"])
        with open(markdown_path) as f:
            self.assertIn("| n/a ", f.read())


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class InterruptedResultsTest(absltest.TestCase):
    def test_a_write_cut_short_leaves_no_result_and_the_watcher_redoes_its_step(self):
        """An evaluator killed while writing ``step_N.json`` left it cut short: the restarted
        watcher failed at once on it (``JSONDecodeError``), every time, until it was deleted."""
        eval_dir = self.create_tempdir().full_path
        rows = [{"method": "dense", "top1_error": 1.0, "bad": object()}]  # fails half-way
        with self.assertRaises(TypeError):
            report.write_results(eval_dir, rows, {"checkpoints": []}, name="step_10")
        self.assertEqual(os.listdir(eval_dir), [])
        settings = {"flip": True}
        report.write_results(eval_dir, [], {"settings": settings}, name="step_20")
        with open(os.path.join(eval_dir, "step_30.json"), "w") as f:  # written before the fix
            f.write('{"settings": {"fl')
        with self.assertLogs(level="WARNING") as logs:
            self.assertEqual(continuous.evaluated_steps(eval_dir, settings), {20})
        self.assertIn("step_30.json does not read", logs.output[0])

    def test_a_failed_write_leaves_the_earlier_pair_whole(self):
        """results.md was written, then results.json failed (a full disk) and the new .md was
        removed: the earlier evaluation's results.json stood alone, its table gone. Now either
        failing leaves the earlier pair as it was."""
        directory = self.create_tempdir().full_path
        earlier, later = ({"checkpoints": [{"workdir": "w", "step": s}]} for s in (1, 2))
        before = report.write_results(directory, [], earlier)
        texts = [_read(path) for path in before]
        for fails in ("results.md", "results.json"):

            def full_disk(path, *args, fails=fails, **kwargs):
                if fails in os.path.basename(path):
                    raise OSError(28, os.strerror(28), path)
                return open(path, *args, **kwargs)

            with (
                mock.patch.object(writers, "open", full_disk, create=True),
                self.assertRaisesRegex(writers.WriteError, rf"^Could not write \S+/{fails}: No"),
            ):
                report.write_results(directory, [], later)
            self.assertEqual([_read(path) for path in before], texts)
            self.assertCountEqual(os.listdir(directory), ["results.json", "results.md"])


class UnderflowTest(absltest.TestCase):
    def test_a_label_whose_softmax_underflows_keeps_its_rank(self):
        # Label 1 is ranked 2nd by both "methods". Its softmax (about e^-120) is below float32's
        # smallest, so averaged as probabilities it tied at 0 with every class but the first
        # and counted as a top-5 miss; averaged in log space it ranks 2nd.
        logits = np.array([[120.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]], np.float32)
        others = np.array([[119.0, 0.0, -3.0, -1.0, -2.0, -5.0, -4.0]], np.float32)
        probabilities = [softmax(logits), softmax(others)]
        self.assertEqual(np.mean(probabilities, axis=0)[0, 1], 0.0)  # what the mean loses
        log_probabilities = [np.asarray(jax.nn.log_softmax(x)) for x in (logits, others)]
        combined = runner.combine(log_probabilities)
        self.assertEqual(np.argsort(-combined[0])[:2].tolist(), [0, 1])
        np.testing.assert_allclose(
            np.exp(combined), np.mean(probabilities, axis=0), rtol=1e-6, atol=0
        )
        counted = runner.counts(combined, np.array([1]))
        self.assertEqual((counted["top1_correct"], counted["top5_correct"]), (0.0, 1.0))


if __name__ == "__main__":
    absltest.main()
