"""imagenet2012 through TFDS's own builder, from tiny generated ILSVRC-2012 tars that hold the odd
files ImageNet holds: a CMYK JPEG, a PNG named .JPEG, a grayscale JPEG, a truncated JPEG, an image
smaller than the crop, and one file that is no image at all."""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import absltest

from tests import testdata
from vgg_jax import data
from vgg_jax.configs import paper
from vgg_jax.data import transforms

SYNSETS = ["n01440764", "n01443537", "n01484850"]  # labels 0, 1, 2 in TFDS's labels.txt
# TFDS labels the sorted val files with the first lines of its validation_labels.txt.
FIRST_VAL_SYNSETS = ["n01751748", "n09193705", "n02105855", "n04263257", "n03125729"]
PER_CLASS, NUM_VAL = 4, 5
# What the tiny tars hold, in place of ImageNet's published counts.
TINY_COUNTS = f"train={PER_CLASS * len(SYNSETS)},validation={NUM_VAL},classes={len(SYNSETS)}"


def imagenet_config(data_dir: str, manual_dir: str | None):
    config = paper.paper_config("D", "s256")
    config.input.update(
        dict(
            data_dir=data_dir,
            manual_dir=manual_dir,
            crop_size=32,
            train_scale_min=32,
            train_scale_max=48,
            batch_size=4,
            eval_batch_size=4,
            eval_bucket_step=16,
            expected_counts=TINY_COUNTS,
        )
    )
    return config


class ImagenetTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.root = tempfile.mkdtemp()
        manual_dir = os.path.join(cls.root, "manual")
        cls.placed = testdata.write_ilsvrc_tars(
            manual_dir, SYNSETS, per_class=PER_CLASS, num_val=NUM_VAL
        )
        cls.config = imagenet_config(os.path.join(cls.root, "tfds"), manual_dir)
        data.prepare(cls.config)
        cls.info = data.dataset_info(cls.config)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)
        super().tearDownClass()

    def test_odd_files_are_decoded_or_skipped_and_counted(self):
        self.assertEqual(set(self.placed), set(testdata.odd_images()))
        counts = self.info.bad_input["train"]
        self.assertEqual(counts["examples"], 12)
        self.assertEqual(counts["skipped_undecodable"], 1)
        for kind in ("png", "cmyk_jpeg", "grayscale", "truncated_jpeg"):
            self.assertEqual(counts[kind], 1, kind)
        self.assertEqual(counts["smaller_than_crop_upscaled"], 1)
        self.assertEqual(self.info.num_train, 11)
        self.assertEqual(self.info.num_eval, 5)
        self.assertEqual(self.info.num_classes, 1000)
        self.assertEqual(self.info.class_names[:3], SYNSETS)
        np.testing.assert_allclose(self.info.mean_rgb, [123.68, 116.779, 103.939], rtol=1e-6)

    def test_training_batches_over_several_epochs(self):
        self.assertEqual(data.steps_per_epoch(self.config), 2)
        batches = data.train_batches(self.config, 0, process_index=0, process_count=1)
        labels = []
        for _ in range(3 * 11 // 4 + 1):  # every example, the odd ones included, 3 times
            batch = next(batches)
            self.assertEqual(batch["image"].shape, (4, 32, 32, 3))
            self.assertEqual(batch["image"].dtype, np.float32)
            self.assertEqual(batch["label"].dtype, np.int32)
            self.assertTrue(np.isfinite(batch["image"]).all())
            labels.append(batch["label"])
        np.testing.assert_array_equal(
            np.bincount(np.concatenate(labels)[:33]), [12, 9, 12]
        )  # corrupt file: class 1

    def test_evaluation_batches(self):
        batches = list(data.eval_batches(self.config, 40, process_index=0, process_count=1))
        labels = np.concatenate([b["label"][b["mask"]] for b in batches])
        names = [self.info.class_names[i] for i in labels]
        self.assertCountEqual(names, FIRST_VAL_SYNSETS)
        for batch in batches:
            self.assertEqual(batch["image"].shape[0], 4)
            self.assertIn(40, batch["image"].shape[1:3])
            self.assertEqual(batch["size"].shape, (4, 2))
            self.assertTrue(((batch["label"] >= 0) & (batch["label"] < 1000)).all())

    def test_cmyk_jpeg_decodes_to_rgb(self):
        encoded = testdata.cmyk_jpeg(16, 24, (255, 40, 0, 255))
        self.assertEqual(tf.image.extract_jpeg_shape(encoded).numpy().tolist(), [16, 24, 4])
        rgb = transforms.decode_full(encoded, transforms.JPEG).numpy()
        np.testing.assert_array_equal(rgb[5, 5], [255, 40, 0])

    def test_png_named_jpeg_is_recognised(self):
        odd = testdata.odd_images()
        self.assertEqual(int(transforms.image_format(odd["png_named_jpeg"])), transforms.PNG)
        self.assertEqual(int(transforms.image_format(odd["truncated"])), transforms.JPEG)
        self.assertEqual(int(transforms.image_format(b"GIF89a....")), transforms.UNDECODABLE)

    def test_missing_tars_say_which_files_to_put_where(self):
        empty = self.create_tempdir().full_path
        config = imagenet_config(self.create_tempdir().full_path, empty)
        with self.assertRaisesRegex(FileNotFoundError, "ILSVRC2012_img_train.tar") as raised:
            data.prepare(config)
        message = str(raised.exception)
        self.assertIn("ILSVRC2012_img_val.tar", message)
        self.assertIn(empty, message)
        self.assertIn("--config.input.manual_dir", message)
        config.input.manual_dir = None
        with self.assertRaisesRegex(FileNotFoundError, "manual_dir is not set"):
            data.prepare(config)

    def test_unprepared_data_dir_says_how_to_prepare(self):
        config = imagenet_config(self.create_tempdir().full_path, None)
        with self.assertRaisesRegex(FileNotFoundError, "python -m vgg_jax.tools.data"):
            data.dataset_info(config)


if __name__ == "__main__":
    absltest.main()
