"""Evaluation batches within a pixel budget: one very elongated image (a 100:1 banner in an image
folder) no longer pads its whole batch of ``eval_batch_size`` images to its length, which ran the
evaluation out of memory; its batch holds fewer rows instead, every image is still scored, and
the scores are those of the unchanged batches. Normal splits keep their schedule."""

import os
import shutil
import tempfile

import numpy as np
from absl.testing import absltest

from tests import fixtures, testdata
from tests.test_evaluate import init_params, mesh_of
from vgg_jax import data, models
from vgg_jax.data import index, pipeline, transforms
from vgg_jax.evaluation import methods, runner


def split_of(heights, widths) -> index.SplitIndex:
    count = len(heights)
    return index.SplitIndex(
        fmt=np.zeros(count, np.uint8),
        height=np.asarray(heights, np.int32),
        width=np.asarray(widths, np.int32),
        channels=np.full(count, 3, np.uint8),
        truncated=np.zeros(count, bool),
        label=np.arange(count, dtype=np.int32) % 10,
    )


def fixed_size_schedule(split_index, scale, global_batch, bucket_step):
    """The schedule before the budget: runs of ``global_batch`` in each orientation's aspect
    order, each padded to its longest image, only the last one filled up."""
    batches = []
    h, w = split_index.height, split_index.width
    heights, widths = transforms.eval_size(h, w, scale)
    aspect = np.maximum(h, w) / np.maximum(np.minimum(h, w), 1)
    for portrait in (False, True):
        ids = np.flatnonzero((h > w) == portrait)
        ids = ids[np.lexsort((ids, aspect[ids]))]
        for start in range(0, len(ids), global_batch):
            part = ids[start : start + global_batch]
            long_side = np.maximum(heights[part], widths[part]).max()
            longest = -(-long_side // bucket_step) * bucket_step
            filler = global_batch - len(part)
            batches.append(((longest, scale) if portrait else (scale, longest), part, filler))
    return batches


def padded_pixels(batch: pipeline.EvalBatch) -> int:
    return len(batch.ids) * batch.bucket[0] * batch.bucket[1]


class EvalScheduleBudgetTest(absltest.TestCase):
    def banner_split(self) -> index.SplitIndex:
        """30 photos of 40-80 px a side, a 100:1 banner and a 30:1 tower."""
        rng = np.random.default_rng(0)
        heights, widths = rng.integers(40, 81, (2, 30))
        return split_of([*heights, 20, 900], [*widths, 2000, 30])

    def test_batches_with_a_banner_stay_within_the_budget(self):
        split_index = self.banner_split()
        orders = []
        for scale in (32, 48):
            budget = 8 * scale * 96  # 8 rows of 2:1 images at step 16
            schedule = pipeline.eval_schedule(
                split_index, scale, 8, 16, max_pixels=budget, row_multiple=2
            )
            for batch in schedule:
                self.assertEqual(len(batch.ids) % 2, 0)
                self.assertTrue(padded_pixels(batch) <= budget or len(batch.ids) == 2, batch)
            # The banner and the tower: in the fewest rows, not in rows of 8.
            for extreme in (30, 31):
                (batch,) = [b for b in schedule if extreme in b.ids]
                self.assertLen(batch.ids, 2)
            ids = np.concatenate([b.ids for b in schedule])
            np.testing.assert_array_equal(np.sort(ids[ids >= 0]), np.arange(32))
            orders.append(ids[ids >= 0])
            # Filler only where an orientation ends, after the batch's real examples.
            tall = split_index.height > split_index.width
            sides = [bool(tall[b.ids[0]]) for b in schedule] + [None]
            for k, batch in enumerate(schedule):
                if (batch.ids < 0).any():
                    self.assertNotEqual(sides[k + 1], sides[k])
                    self.assertTrue((batch.ids[: (batch.ids >= 0).sum()] >= 0).all())
        np.testing.assert_array_equal(orders[0], orders[1])

    def test_default_budget_splits_off_a_banner(self):
        split_index = self.banner_split()
        schedule = pipeline.eval_schedule(split_index, 32, 8, 16)
        (batch,) = [b for b in schedule if 30 in b.ids]
        self.assertLess(len(batch.ids), 8)  # before: 8 rows of 32 x 3200 pixels
        ids = np.concatenate([b.ids for b in schedule])
        np.testing.assert_array_equal(np.sort(ids[ids >= 0]), np.arange(32))

    def test_default_budget_keeps_the_demos_and_imagenets_schedules(self):
        """The demo's images (short side 48-128, aspect up to 1.6, batches of 128 at Q up to 64)
        and ImageNet-like photos (4:3, 3:4, a few up to aspect 3.9, batches of 64 at Q up to
        512) are batched exactly as before the budget."""
        rng = np.random.default_rng(1)
        short = rng.integers(48, 129, 700)
        long = np.round(short * rng.uniform(1.0, 1.6, 700)).astype(int)
        portrait = rng.random(700) < 0.3
        demo = split_of(np.where(portrait, long, short), np.where(portrait, short, long))
        photos = split_of(
            [375] * 300 + [500] * 100 + [128] * 7, [500] * 300 + [375] * 100 + [500] * 7
        )
        for split_index, global_batch, scales, steps in (
            (demo, 128, (32, 48, 64), (16, 32)),
            (photos, 64, (256, 384, 512), (32,)),
        ):
            for scale in scales:
                for step in steps:
                    got = pipeline.eval_schedule(split_index, scale, global_batch, step)
                    want = fixed_size_schedule(split_index, scale, global_batch, step)
                    self.assertLen(got, len(want))
                    for batch, (bucket, ids, filler) in zip(got, want, strict=True):
                        self.assertEqual(batch.bucket, bucket)
                        np.testing.assert_array_equal(batch.ids[batch.ids >= 0], ids)
                        self.assertEqual((batch.ids < 0).sum(), filler)

    def test_row_multiple_splits_over_processes_and_data_devices(self):
        self.assertEqual(pipeline.eval_row_multiple(128, 1, 1), 1)
        self.assertEqual(pipeline.eval_row_multiple(128, 2, 8), 8)  # two hosts of 4 devices
        self.assertEqual(pipeline.eval_row_multiple(12, 1, 8), 4)  # data axis 4 or less
        self.assertEqual(pipeline.eval_row_multiple(16, 2, 1), 2)  # process slices in tests
        with self.assertRaisesRegex(ValueError, "does not divide"):
            pipeline.eval_schedule(split_of([40], [60]), 32, 8, 16, row_multiple=3)


class ElongatedImageEvaluationTest(absltest.TestCase):
    """An image folder of 10 photos and a 20:1 banner, evaluated at Q = 32 in batches of 8 on 4
    devices (rows a multiple of 4)."""

    SCALE = 32
    BUDGET = 4 * 32 * 640  # four rows of the banner's bucket (32 x 640)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix="vgg_jax_banner_")
        root = os.path.join(cls.tmp, "photos")
        testdata.write_image_folder(root, {"train": 1, "validation": 5}, ["cat", "dog"])
        banner = np.zeros((16, 320, 3), np.uint8)
        banner[:, ::7] = (200, 40, 90)
        with open(os.path.join(root, "validation", "cat", "banner.jpg"), "wb") as f:
            f.write(testdata.jpeg(banner))
        cls.config = fixtures.tiny_config(
            **{
                "input.dataset": "image_folder",
                "input.folder": root,
                "input.data_dir": os.path.join(cls.tmp, "tfds"),
                "input.eval_batch_size": 8,
                "model.num_classes": 2,
            }
        )
        data.prepare(cls.config)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def batches(self, max_pixels: int, **kwargs) -> list[dict[str, np.ndarray]]:
        config = self.config.copy_and_resolve_references()
        config.input.eval_max_batch_pixels = max_pixels
        kwargs = dict(process_index=0, process_count=1) | kwargs
        return list(data.eval_batches(config, self.SCALE, **kwargs))

    def test_banner_batch_within_budget_same_images_and_scores(self):
        whole = self.batches(10**9)  # every batch of 8 rows, as before the budget
        small = self.batches(self.BUDGET)
        self.assertTrue(any(b["image"].shape[2] >= 640 for b in small))
        for batch in small:
            self.assertLessEqual(np.prod(batch["image"].shape[:3]), self.BUDGET)
            self.assertEqual(len(batch["mask"]) % 4, 0)
        self.assertGreater(len({len(b["mask"]) for b in small}), 1)  # rows vary batch to batch
        found = self.examples(small)
        self.assertEqual(sorted(found), sorted(self.examples(whole)))
        self.assertLen(found, 11)
        for key, (image, size, label) in self.examples(whole).items():
            np.testing.assert_array_equal(found[key][1], size)
            self.assertEqual(found[key][2], label)
            np.testing.assert_array_equal(found[key][0], image)

        model = models.build_model(self.config.model, self.config.input.crop_size)
        params = init_params(model, seed=4)
        mesh = mesh_of(4)
        functions = methods.compiled_methods.__wrapped__(model, mesh, True, 2)
        outputs = [
            runner.evaluate_scale(params, functions, batches, ("dense", "multi_crop"), mesh, 2)
            for batches in (whole, small)
        ]
        np.testing.assert_array_equal(outputs[0].index, outputs[1].index)
        for method in ("dense", "multi_crop"):
            np.testing.assert_allclose(
                outputs[1].results[method], outputs[0].results[method], rtol=1e-5, atol=1e-6
            )

    def test_processes_take_equal_slices_of_the_smaller_batches(self):
        one = self.batches(self.BUDGET, row_multiple=4)
        halves = [
            self.batches(self.BUDGET, row_multiple=4, process_index=i, process_count=2)
            for i in range(2)
        ]
        self.assertLen(halves[0], len(one))
        for whole, first, second in zip(one, *halves, strict=True):
            self.assertEqual(first["image"].shape, second["image"].shape)
            for key in whole:
                np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])

    @staticmethod
    def examples(batches) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
        """Record index -> (the image's valid pixels, its size, its label)."""
        found = {}
        for batch in batches:
            for image, size, label, mask, key in zip(
                batch["image"],
                batch["size"],
                batch["label"],
                batch["mask"],
                batch["index"],
                strict=True,
            ):
                if mask:
                    found[int(key)] = (image[: size[0], : size[1]], size, int(label))
        return found


if __name__ == "__main__":
    absltest.main()
