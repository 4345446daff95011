"""Faults in the data a user provides (issue 13, points 3, 11 and 14): damaged ILSVRC tars are
named in one line and never reused, image folders skip and name what is not an image, reject empty
class folders and turn EXIF-rotated photos upright, and a read-only prepared data_dir takes its
index elsewhere, refused at once when it cannot."""

import contextlib
import glob
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import absltest

from tests import fixtures, testdata
from tests.test_data_imagenet import NUM_VAL, PER_CLASS, SYNSETS, TINY_COUNTS, imagenet_config
from vgg_jax import checks, data, host, writers
from vgg_jax.configs import paper
from vgg_jax.data import builtin, folder, index, pipeline, sources, transforms, verify
from vgg_jax.tools import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TAR = "ILSVRC2012_img_train.tar"


class DamagedImagenetTarTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.manual_dir = self.create_tempdir().full_path
        self.config = imagenet_config(self.create_tempdir().full_path, self.manual_dir)

    def write_tars(self):
        testdata.write_ilsvrc_tars(self.manual_dir, SYNSETS, per_class=PER_CLASS, num_val=NUM_VAL)

    def test_corrupt_train_tar_is_named_before_anything_is_prepared(self):
        self.write_tars()
        offset = testdata.damage_tar_middle(os.path.join(self.manual_dir, TRAIN_TAR))
        with self.assertRaises(data.DatasetError) as raised:
            # first: 4 of 12 images, 1 of 3 classes, no error; then: the count check, after the
            # whole preparation (hours for ImageNet)
            data.prepare(self.config)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"{TRAIN_TAR} has a bad tar header at byte {offset:,}", message)
        self.assertIn("Download", message)
        builder = sources.get_builder(self.config.input)
        self.assertFalse(builder.is_prepared())
        self.assertFalse(os.path.exists(os.path.dirname(builder.data_dir)))  # nothing prepared

    def test_a_truncated_tar_is_named_before_anything_is_prepared(self):
        self.write_tars()
        testdata.truncate_file(os.path.join(self.manual_dir, TRAIN_TAR), keep=0.8)
        builder_class = type(sources.get_builder(self.config.input))
        with (
            mock.patch.object(builder_class, "_fix_image", autospec=True) as read_an_image,
            self.assertRaisesRegex(data.DatasetError, f"{TRAIN_TAR} is truncated"),
        ):
            data.prepare(self.config)
        # today: every image before the cut was prepared first (hours for a partial download)
        self.assertFalse(read_an_image.called)

    def test_damage_the_header_walk_cannot_see_is_counted_moved_aside_and_rebuilt(self):
        self.write_tars()
        testdata.damage_synset_tar_middle(
            os.path.join(self.manual_dir, TRAIN_TAR), f"{SYNSETS[1]}.tar"
        )
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(self.config)  # 11 of 12 images: counted
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(TRAIN_TAR, message)
        self.assertIn("split 'train' has 11 examples, expected 12", message)
        builder = sources.get_builder(self.config.input)
        self.assertFalse(builder.is_prepared())  # not reused by the next run
        self.assertTrue(os.path.isdir(f"{builder.data_dir}.bad"))
        self.assertIn(f"{builder.data_dir}.bad", message)
        self.write_tars()  # the good tar is back
        self.config.input.expected_counts = "train=12,val=5"  # a typo moves nothing aside
        with self.assertRaisesRegex(data.DatasetError, "'val', not a split of imagenet2012"):
            data.prepare(self.config)
        self.assertTrue(builder.is_prepared())
        self.config.input.expected_counts = TINY_COUNTS
        data.prepare(self.config)
        info = data.dataset_info(self.config)
        self.assertEqual(info.bad_input["train"]["examples"], PER_CLASS * len(SYNSETS))
        self.assertEqual(info.num_train, 11)  # the one corrupt image is skipped, as always

    def test_a_subset_whose_class_count_is_not_given_is_kept_and_the_count_asked_for(self):
        self.write_tars()
        builder = sources.get_builder(self.config.input)
        # 3 synsets; no classes=, or a wrong one (a typo was "likely damaged", moved aside too)
        for counts, expected in (("", "1,000"), (",classes=4", "4")):
            self.config.input.expected_counts = "train=12,validation=5" + counts
            with self.assertRaises(data.DatasetError) as raised:
                data.prepare(self.config)  # today: "likely damaged", moved aside, prepared again
            message = str(raised.exception)
            self.assertIn(f"3 classes, expected {expected}", message)
            self.assertIn("make it classes=3", message)
            self.assertNotIn("damaged", message)
            self.assertTrue(builder.is_prepared())
            self.assertFalse(os.path.exists(f"{builder.data_dir}.bad"))
        info_file = os.path.join(builder.data_dir, "dataset_info.json")
        written = os.stat(info_file).st_mtime_ns
        self.config.input.expected_counts = TINY_COUNTS
        data.prepare(self.config)
        self.assertEqual(os.stat(info_file).st_mtime_ns, written)  # not prepared again
        self.assertEqual(data.dataset_info(self.config).num_train, 11)

    def test_an_interrupted_preparation_is_redone_and_what_it_left_named(self):
        self.write_tars()
        builder = sources.get_builder(self.config.input)
        left = os.path.join(os.path.dirname(builder.data_dir), "incomplete.K1LLED_5.1.0")
        os.makedirs(left)  # what a preparation killed halfway leaves (TFDS's temporary copy)
        with open(os.path.join(left, "imagenet2012-train.array_record-00000-of-00001"), "wb") as f:
            f.write(b"\0" * 1000)
        with self.assertLogs(level="WARNING") as logs:
            data.prepare(self.config)  # today: left there, unnamed, at every interruption
        self.assertTrue(any("interrupted preparation(s) of imagenet2012" in x for x in logs.output))
        self.assertTrue(any(left in x for x in logs.output))
        self.assertEqual(data.dataset_info(self.config).bad_input["train"]["examples"], 12)

    def test_truncated_tar_is_one_line_naming_it(self):
        self.write_tars()
        testdata.truncate_file(os.path.join(self.manual_dir, TRAIN_TAR), keep=0.6)
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(self.config)  # today: tarfile.ReadError deep in a TFDS traceback
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"{TRAIN_TAR} is truncated", message)
        self.assertIn(self.manual_dir, message)
        self.assertNotIn("ILSVRC2012_img_val.tar", message)  # that one is fine
        self.assertFalse(sources.get_builder(self.config.input).is_prepared())

    def test_a_truncated_test_tar_is_named_not_the_train_or_validation_tar(self):
        self.write_tars()
        test_tar = os.path.join(self.manual_dir, "ILSVRC2012_img_test.tar")
        with tarfile.open(test_tar, "w") as tar:
            for i in range(3):  # TFDS prepares it as a third split
                payload = _jpeg_bytes(i)
                info = tarfile.TarInfo(f"ILSVRC2012_test_{i + 1:08d}.JPEG")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        testdata.truncate_file(test_tar, keep=0.6)
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(self.config)
        message = str(raised.exception)  # today: "img_train.tar or img_val.tar ... damaged"
        self.assertNotIn("\n", message)
        self.assertIn("ILSVRC2012_img_test.tar is truncated", message)
        self.assertNotIn(TRAIN_TAR, message)
        self.assertNotIn("ILSVRC2012_img_val.tar", message)
        self.assertFalse(sources.get_builder(self.config.input).is_prepared())

    def test_a_truncated_synset_tar_inside_the_train_tar_is_one_line_naming_both(self):
        # The train tar is whole; one synset tar packed in it was cut short, in a member's data
        # or where a member's header starts. Today TFDS fails reading it (tarfile's ReadError,
        # after every synset before it) and the line says "ILSVRC2012_img_train.tar or
        # ILSVRC2012_img_val.tar ... is likely damaged": neither the synset tar nor which tar.
        self.write_tars()
        train_tar = os.path.join(self.manual_dir, TRAIN_TAR)
        synset_tar = f"{SYNSETS[1]}.tar"
        with tarfile.open(train_tar) as outer:
            inner = outer.extractfile(synset_tar)
            with tarfile.open(fileobj=inner) as tar:
                third = tar.getmembers()[2]
        self.config.input.expected_counts = "none"  # a subset: no count to catch a short class
        half = third.offset_data + third.size // 2
        cuts = {
            half: f"member {third.name} ends at byte {third.offset_data + third.size:,}",
            third.offset: "without the end-of-archive blocks",
        }
        shutil.copy(train_tar, f"{train_tar}.good")
        for keep, what in cuts.items():
            testdata.cut_synset_tar(train_tar, synset_tar, keep)
            with self.assertRaises(data.DatasetError) as raised:
                data.prepare(self.config)
            message = str(raised.exception)
            self.assertNotIn("\n", message)
            self.assertIn(f"{TRAIN_TAR} holds a truncated {synset_tar}", message)
            self.assertIn(what, message)
            self.assertIn(self.manual_dir, message)
            self.assertIn("Download", message)
            self.assertFalse(sources.get_builder(self.config.input).is_prepared())
            shutil.copy(f"{train_tar}.good", train_tar)
        self.assertIsNone(sources.tar_damage(train_tar))

    def test_expected_counts_default_to_imagenets_published_ones(self):
        config = paper.paper_config("D", "s256")
        self.assertEqual(config.input.expected_counts, "published")
        self.assertEqual(
            verify.parse_expected_counts("published", "imagenet2012"),
            {"train": 1_281_167, "validation": 50_000, "classes": 1000},
        )
        self.assertEqual(verify.parse_expected_counts("published", "builtin"), {})
        self.assertEqual(
            verify.parse_expected_counts(TINY_COUNTS, "imagenet2012"),
            {"train": 12, "validation": 5, "classes": 3},
        )
        self.assertIsNone(verify.parse_expected_counts("none", "imagenet2012"))
        a_file = self.create_tempfile().full_path
        config = fixtures.tiny_config(
            with_data=False,
            **{"input.expected_counts": "train=lots", "input.index_dir": a_file},
        )
        with self.assertRaises(checks.ConfigError) as raised:
            checks.check_config(config, "train")
        problems = raised.exception.problems
        self.assertLen(problems, 2)
        self.assertStartsWith(problems[0], "config.input.expected_counts='train=lots': must be")
        self.assertStartsWith(problems[1], f"config.input.index_dir={a_file!r}: is a file")


class ImagenetTarLayoutTest(absltest.TestCase):
    """TFDS labels the validation images by their position in the tar's sorted names, and reads
    the train tar as one tar per synset: tars laid out otherwise are refused before anything is
    prepared, naming what is wrong, instead of being labelled with other images' labels or
    reported as damaged."""

    def write_validation_tar(self, names: list[str]) -> None:
        with tarfile.open(os.path.join(self.manual_dir, sources.IMAGENET_TARS[1]), "w") as tar:
            for i, name in enumerate(names):
                payload = _jpeg_bytes(i)
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    def setUp(self):
        super().setUp()
        self.manual_dir = self.create_tempdir().full_path
        testdata.write_ilsvrc_tars(self.manual_dir, SYNSETS, per_class=PER_CLASS, num_val=NUM_VAL)
        self.config = imagenet_config(self.create_tempdir().full_path, self.manual_dir)

    def test_names_tfds_would_label_wrong_are_refused_before_preparing(self):
        val = [f"ILSVRC2012_val_{k:08d}.JPEG" for k in range(1, 6)]
        cases = {
            # a subset with a gap: today every image after it got another image's label
            "not the first 5 (ILSVRC2012_val_00000002.JPEG is missing)": [
                val[0],
                *val[2:],
                "ILSVRC2012_val_00000009.JPEG",
            ],
            # valprep.sh's class folders, re-tarred: today all 50,000 labelled, wrong
            "holds 'n01751748/ILSVRC2012_val_00000001.JPEG'": [f"n01751748/{val[0]}", *val[1:]],
            "holds 'LOC_val_solution.csv'": [*val, "LOC_val_solution.csv"],  # shifts nothing here
            "holds './ILSVRC2012_val_00000001.JPEG'": [f"./{n}" for n in val],  # a KeyError today
            "more than once": [*val, val[2]],
        }
        for expected, names in cases.items():
            with self.subTest(expected):
                self.write_validation_tar(names)
                self.assertIn(
                    expected,
                    sources.validation_tar_problem(
                        os.path.join(self.manual_dir, sources.IMAGENET_TARS[1])
                    ),
                )
        self.write_validation_tar([f"n01751748/{val[0]}", *val[1:]])
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(self.config)
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(sources.IMAGENET_TARS[1], message)
        self.assertIn("n01751748/ILSVRC2012_val_00000001.JPEG", message)
        self.assertFalse(sources.get_builder(self.config.input).is_prepared())

    def test_a_train_tar_of_folders_or_extra_files_is_named_not_called_damaged(self):
        path = os.path.join(self.manual_dir, sources.IMAGENET_TARS[0])
        self.assertIsNone(sources.train_tar_problem(path))  # one tar per synset
        cases = {
            "holds 'n01440764/n01440764_0.JPEG', not a <synset>.tar": "n01440764/n01440764_0.JPEG",
            "holds 'README.txt'": "README.txt",
            "holds 'n00004475.tar', not one of ILSVRC-2012's 1,000 synsets": "n00004475.tar",
        }
        for expected, name in cases.items():
            with self.subTest(name), tarfile.open(path, "w") as tar:
                payload = _jpeg_bytes(0)
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            self.assertIn(expected, sources.train_tar_problem(path))
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(self.config)  # today: "invalid header ... likely damaged; replace it"
        message = str(raised.exception)
        self.assertIn(f"{sources.IMAGENET_TARS[0]} is not laid out as ILSVRC-2012's", message)
        self.assertNotIn("likely damaged", message)
        self.assertFalse(sources.get_builder(self.config.input).is_prepared())

    def test_a_synset_tar_held_twice_is_named_before_preparing(self):
        path = os.path.join(self.manual_dir, sources.IMAGENET_TARS[0])
        with tarfile.open(path) as tar:
            first = tar.getmembers()[0]
            payload = tar.extractfile(first).read()
        with tarfile.open(path, "a") as tar:  # appended again, as `tar -rf` does
            tar.addfile(first, io.BytesIO(payload))
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(self.config)  # today: "Two examples share the same hashed key", at the end
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"holds '{first.name}' more than once", message)
        self.assertFalse(sources.get_builder(self.config.input).is_prepared())

    def test_the_original_names_or_their_first_n_are_accepted(self):
        path = os.path.join(self.manual_dir, sources.IMAGENET_TARS[1])
        self.assertIsNone(sources.validation_tar_problem(path))  # written by write_ilsvrc_tars
        self.write_validation_tar([f"ILSVRC2012_val_{k:08d}.JPEG" for k in (3, 1, 2)])
        self.assertIsNone(sources.validation_tar_problem(path))  # order in the tar is free
        testdata.truncate_file(path, keep=0.5)  # a damaged tar is tar_damage's to explain
        self.assertIsNone(sources.validation_tar_problem(path))

    def test_a_copy_prepared_as_tfrecord_files_is_one_line_saying_what_to_do(self):
        # TFDS's default format: what `tfds build imagenet2012` and most shared copies hold.
        where = self.config.input.data_dir
        builder = tfds.builder("imagenet2012", data_dir=where)
        download_config = tfds.download.DownloadConfig(manual_dir=self.manual_dir)
        builder.download_and_prepare(download_config=download_config)
        for step in (data.prepare, data.dataset_info):
            with self.subTest(step.__name__), self.assertRaises(data.DatasetError) as raised:
                step(self.config)  # today: TFDS's "File format is already set" traceback
            message = str(raised.exception)
            self.assertNotIn("\n", message)
            self.assertIn(f"{builder.data_dir} holds imagenet2012 prepared as tfrecord", message)
            self.assertIn("needs array_record", message)
            self.assertIn("--config.input.data_dir=NEW", message)
        self.assertTrue(builder.is_prepared())  # someone else's copy: left as it is


class UnlabelledSplitTest(absltest.TestCase):
    def test_imagenets_unlabelled_test_split_is_neither_scored_nor_trained_on(self):
        manual_dir = self.create_tempdir().full_path
        testdata.write_ilsvrc_tars(manual_dir, SYNSETS, per_class=PER_CLASS, num_val=NUM_VAL)
        with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_test.tar"), "w") as tar:
            for i in range(3):  # TFDS prepares it as a third split, every label -1
                payload = _jpeg_bytes(i)
                info = tarfile.TarInfo(f"ILSVRC2012_test_{i + 1:08d}.JPEG")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        config = imagenet_config(self.create_tempdir().full_path, manual_dir)
        config.input.eval_split = "test"
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(config)  # today: every test image scored wrong, a 100% error table
        message = str(raised.exception)
        self.assertIn("imagenet2012/test has 3 examples without a label", message)
        self.assertIn("config.input.eval_split", message)
        self.assertTrue(sources.get_builder(config.input).is_prepared())  # nothing moved aside
        config.input.eval_split = "validation"
        data.prepare(config)
        self.assertEqual(data.dataset_info(config).num_eval, NUM_VAL)
        # An evaluation reads the split's index (made above) without preparing: refused too.
        config.input.eval_split = "test"
        with self.assertRaisesRegex(data.DatasetError, "imagenet2012/test has 3 examples"):
            data.dataset_info(config)
        config.input.eval_split, config.input.train_split = "validation", "test"
        with self.assertRaisesRegex(data.DatasetError, "config.input.train_split"):
            data.dataset_info(config)  # today: trained every image as the last class


def _jpeg_bytes(seed: int) -> bytes:
    image, _ = testdata.builtin.draw_example(seed, "train", seed)
    return testdata.jpeg(image)


class ImageFolderFaultsTest(absltest.TestCase):
    def make_folder(self) -> str:
        root = os.path.join(self.create_tempdir().full_path, "photos")
        testdata.write_image_folder(root, {"train": 3, "validation": 1}, ["cat", "dog"])
        return root

    def folder_config(self, root: str):
        config = fixtures.tiny_config(
            **{
                "input.dataset": "image_folder",
                "input.folder": root,
                "input.data_dir": self.create_tempdir().full_path,
                "model.num_classes": 3,
            }
        )
        return config

    def test_images_of_one_colour_say_the_colour_shift_moves_nothing(self):
        """Their RGB covariance is zero, so every PCA colour shift is 0: training ran without
        the paper's colour shift (section 3.1) and nothing said so."""
        root = os.path.join(self.create_tempdir().full_path, "photos")
        for split, name in (("train", "a"), ("train", "b"), ("validation", "a")):
            for i, grey in enumerate((60, 61)):  # one pixel level apart: covariance ~6e-6
                os.makedirs(os.path.join(root, split, f"cls{i}"), exist_ok=True)
                path = os.path.join(root, split, f"cls{i}", f"{name}.png")
                with open(path, "wb") as f:
                    f.write(testdata.png(np.full((40, 40, 3), (grey, 90, 120), np.uint8)))
        config = self.folder_config(root)
        config.model.num_classes = 2
        data.prepare(config)
        with self.assertLogs(level="WARNING") as logs:
            next(iter(pipeline.train_batches(config, 0)))
        (said,) = [line for line in logs.output if "colour shift" in line]
        self.assertIn("input.color_shift_std=0.1) moves no pixel by even 0.5 level", said)
        config.input.color_shift_std = 0.0  # off, and said so: nothing to warn of
        with self.assertLogs(level="INFO") as logs:
            next(iter(pipeline.train_batches(config, 0)))
        self.assertNotIn("colour shift", "".join(logs.output))

    def test_links_and_non_images_are_skipped_counted_and_named(self):
        root = self.make_folder()
        cat = os.path.join(root, "train", "cat")
        os.symlink(os.path.join(root, "gone.jpg"), os.path.join(cat, "dangling.jpg"))
        for name, payload in {
            "notes.txt": b"a note",
            ".DS_Store": b"\x00\x00\x00\x01Bud1",
            "photo.webp": b"RIFF\x1a\x00\x00\x00WEBPVP8 ",
        }.items():
            with open(os.path.join(cat, name), "wb") as f:
                f.write(payload)
        os.makedirs(os.path.join(cat, "thumbnails"))
        # An upright photo 48 wide and 80 tall, stored sideways (80 x 48) with orientation 6.
        sideways = np.zeros((48, 80, 3), np.uint8)
        os.makedirs(os.path.join(root, "train", "tall"))
        os.makedirs(os.path.join(root, "validation", "tall"))
        for split in ("train", "validation"):
            with open(os.path.join(root, split, "tall", "rotated.jpg"), "wb") as f:
                f.write(testdata.exif_jpeg(sideways, 6))
        config = self.folder_config(root)
        with self.assertLogs(level="WARNING") as logs:
            data.prepare(config)  # today: the dangling link aborts the whole import
        builder = sources.prepared_builder(config.input)
        listed = os.path.join(os.fspath(builder.data_dir), folder.SKIPPED_FILES_NAME)
        summary = [line for line in logs.output if ":absl:Image folder" in line]
        self.assertLen(summary, 1)
        self.assertIn("5 files", summary[0])
        self.assertIn("1 dangling link", summary[0])
        self.assertIn(listed, summary[0])
        with open(listed) as f:
            rows = dict(reversed(line.rstrip("\n").split("\t")) for line in f)
        self.assertEqual(
            rows,
            {
                os.path.join(cat, "dangling.jpg"): "dangling link",
                os.path.join(cat, ".DS_Store"): "hidden file",
                os.path.join(cat, "notes.txt"): "not .jpg/.jpeg/.png",
                os.path.join(cat, "photo.webp"): "not .jpg/.jpeg/.png",
                os.path.join(cat, "thumbnails"): "nested directory",
            },
        )
        info = data.dataset_info(config)
        self.assertEqual(info.class_names, ["cat", "dog", "tall"])
        self.assertEqual(info.num_train, 7)
        split_index = index.load_index(builder, "train")
        tall = split_index.label == info.class_names.index("tall")
        self.assertEqual((split_index.height[tall][0], split_index.width[tall][0]), (80, 48))

    def test_empty_class_folder_is_an_error_naming_it(self):
        root = self.make_folder()
        empty = os.path.join(root, "train", "bird")
        os.makedirs(empty)
        with open(os.path.join(empty, "readme.txt"), "w") as f:
            f.write("images to come")
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(self.folder_config(root))  # today: a class with no examples
        self.assertIn(empty, str(raised.exception))
        self.assertNotIn("\n", str(raised.exception))

    def test_class_without_a_decodable_image_is_an_error_naming_it(self):
        root = os.path.join(self.create_tempdir().full_path, "photos")
        testdata.write_image_folder(root, {"train": 2}, ["cat"])
        broken = os.path.join(root, "train", "dog")
        os.makedirs(broken)
        for name in ("0.jpg", "1.png"):
            with open(os.path.join(broken, name), "wb") as f:
                f.write(b"not an image")
        config = self.folder_config(root)
        config.input.eval_split = "train"
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(config)  # today: a class the net is asked to learn with no example
        message = str(raised.exception)
        self.assertIn(
            "decodable examples of 1 classes, expected 2 (none decodable in: dog)", message
        )
        self.assertIn(os.path.join(root, "train"), message)
        self.assertFalse(sources.get_builder(config.input).is_prepared())

    def test_a_changed_folder_is_prepared_again_with_its_new_labels(self):
        root = self.make_folder()
        config = self.folder_config(root)
        config.model.num_classes = 2
        data.prepare(config)
        first = sources.prepared_builder(config.input)
        self.assertEqual(data.dataset_info(config).class_names, ["cat", "dog"])
        # "cat" renamed "zebra" (now after "dog"), one image added: the old copy's labels and
        # class names would put dog's images under "zebra".
        for split in ("train", "validation"):
            os.rename(os.path.join(root, split, "cat"), os.path.join(root, split, "zebra"))
        shutil.copy(
            os.path.join(root, "train", "dog", "0.jpg"), os.path.join(root, "train", "dog", "9.jpg")
        )
        # This process keeps reading the copy it prepared (a run's evaluation scores the data
        # it trained on); another process is told to prepare the folder again.
        self.assertEqual(data.dataset_info(config).class_names, ["cat", "dog"])
        another_process = mock.patch.dict(folder._PINNED, clear=True)
        with another_process, self.assertRaisesRegex(FileNotFoundError, "differs from when"):
            sources.prepared_builder(config.input)
        with self.assertLogs(level="WARNING") as logs:
            data.prepare(config)
        old_copy = os.path.dirname(os.fspath(first.data_dir))
        self.assertTrue(any(old_copy in line and root in line for line in logs.output))
        info = data.dataset_info(config)
        self.assertEqual(info.class_names, ["dog", "zebra"])
        self.assertEqual(info.num_train, 7)
        split_index = index.load_index(sources.prepared_builder(config.input), "train")
        np.testing.assert_array_equal(np.bincount(split_index.label), [4, 3])  # dog, zebra

    def test_hidden_directories_are_neither_splits_nor_classes(self):
        root = self.make_folder()
        thumbs = os.path.join(root, "train", ".thumbs")
        shutil.copytree(os.path.join(root, "train", "cat"), thumbs)
        os.makedirs(os.path.join(root, ".cache", "cat"))
        shutil.copy(
            os.path.join(root, "train", "cat", "0.jpg"), os.path.join(root, ".cache", "cat")
        )
        config = self.folder_config(root)
        config.model.num_classes = 2
        config.input.batch_size = 4
        checks.check_config(config, "train")  # the listing and the check count alike
        with self.assertLogs(level="WARNING") as logs:
            data.prepare(config)
        self.assertTrue(any("2 hidden directory" in line for line in logs.output))
        info = data.dataset_info(config)
        self.assertEqual((info.class_names, info.num_train), (["cat", "dog"], 6))
        self.assertEqual(
            sorted(sources.prepared_builder(config.input).info.splits), ["train", "validation"]
        )

    def test_classes_come_from_the_configured_training_split(self):
        root = os.path.join(self.create_tempdir().full_path, "photos")
        testdata.write_image_folder(root, {"training": 2, "validation": 1}, ["cat", "dog"])
        testdata.write_image_folder(root, {"extra": 1}, ["cat"])  # sorts first, one class
        config = self.folder_config(root)
        config.model.num_classes = 2
        config.input.train_split = "training"
        data.prepare(config)
        self.assertEqual(data.dataset_info(config).class_names, ["cat", "dog"])

    def test_a_missing_split_is_one_line_before_anything_is_copied(self):
        root = os.path.join(self.create_tempdir().full_path, "photos")
        testdata.write_image_folder(root, {"training": 2, "val": 1}, ["cat", "dog"])
        config = self.folder_config(root)
        with self.assertRaises(data.DatasetError) as raised:
            data.prepare(config)  # was: the whole folder copied, then a ValueError traceback
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn("no split folder 'train' or 'validation'", message)
        self.assertIn("it holds ['training', 'val']", message)
        self.assertEmpty(os.listdir(config.input.data_dir))  # nothing copied

    def test_a_split_name_tfds_cannot_read_is_one_line_before_anything_is_copied(self):
        root = os.path.join(self.create_tempdir().full_path, "photos")
        testdata.write_image_folder(root, {"train": 2, "val set": 1}, ["cat", "dog"])
        config = self.folder_config(root)
        config.input.eval_split = "val set"
        with self.assertRaisesRegex(data.DatasetError, "val set'.*rename it .*'val_set'"):
            data.prepare(config)  # was: copied, then "Error parsing split 'val set'" when read
        self.assertEmpty(os.listdir(config.input.data_dir))

    def test_fewer_decodable_images_than_a_batch_is_an_error_not_an_empty_run(self):
        root = self.make_folder()  # 6 training images
        for name in ("cat", "dog"):
            for k in range(2):
                with open(os.path.join(root, "train", name, f"broken{k}.jpg"), "wb") as f:
                    f.write(b"not an image")
        config = self.folder_config(root)
        config.model.num_classes = 2
        config.input.batch_size = 8
        checks.check_config(config, "train")  # counts 10 image files: cannot know
        data.prepare(config)
        with self.assertRaisesRegex(
            data.DatasetError, "batch_size=8 is larger than the 6 decodable .*4 skipped"
        ):
            data.steps_per_epoch(config)  # today: 0 steps, a run that trains nothing

    def evaluation_of_a_saved_net(self, root: str, class_names=None):
        """A prepared 2-class folder config (dense at one scale) and a workdir holding a net of
        constant weights for it."""
        from vgg_jax import checkpoint, models

        config = self.folder_config(root)
        config.model.num_classes = 2
        config.evals.update(dict(methods=("dense",), multi_scales=(48,), flip=False))
        data.prepare(config)
        model = models.build_model(config.model, config.input.crop_size)
        params = jax.tree_util.tree_map(
            lambda leaf: np.full(leaf.shape, 0.01, np.float32), models.abstract_params(model)
        )
        workdir = self.create_tempdir().full_path
        checkpoint.save_params(workdir, params, 1, config, class_names=class_names)
        return config, workdir

    def test_evaluation_names_the_images_that_do_not_decode(self):
        from vgg_jax.evaluation import runner

        root = self.make_folder()  # 2 validation images a class
        with open(os.path.join(root, "validation", "dog", "broken.jpg"), "wb") as f:
            f.write(b"not an image")
        config, workdir = self.evaluation_of_a_saved_net(root)
        with self.assertLogs(level="WARNING") as logs:
            rows, about = runner.evaluate_checkpoints(config, workdir, "latest")
        self.assertTrue(any("2 images" in m and "1 more of it do not" in m for m in logs.output))
        self.assertEqual(about["data"]["images"], 2)
        self.assertEqual(about["data"]["skipped_undecodable"], 1)  # today: nowhere in the results
        self.assertEqual({row["count"] for row in rows}, {2})

    def test_a_net_of_other_classes_is_not_scored_as_this_datasets(self):
        from vgg_jax.evaluation import runner

        # The same two classes in the other order: output 0 meant "dog" to this net.
        config, workdir = self.evaluation_of_a_saved_net(self.make_folder(), ["dog", "cat"])
        with self.assertRaisesRegex(ValueError, "class 0: 'dog' there, 'cat' here"):
            runner.evaluate_checkpoints(config, workdir, "latest")  # today: scored silently
        # launch.py's evaluate says it in one line (it was a traceback ending in the ValueError).
        with self.assertRaises(SystemExit) as stopped:
            cli.run_or_exit("evaluate", config, workdir)
        said = str(stopped.exception.code)
        self.assertRegex(said, r"^NetMismatchError: Net A in .*\(class 0: 'dog' there, 'cat' here")
        self.assertNotIn("\n", said)
        config.evals.accept_checkpoint_net = True
        rows, _ = runner.evaluate_checkpoints(config, workdir, "latest")
        self.assertLen(rows, 1)

    def test_statistics_follow_a_changed_stats_max_images(self):
        from vgg_jax.data import stats

        config = self.folder_config(self.make_folder())  # 6 training images
        config.model.num_classes = 2
        data.prepare(config)
        builder = sources.prepared_builder(config.input)
        self.assertEqual(stats.load_stats(builder)["num_images"], 6)
        config.input.stats_max_images = 3
        data.prepare(config)
        self.assertEqual(stats.load_stats(builder)["num_images"], 3)  # today: still 6

    def test_file_names_that_are_not_utf8_are_images_and_class_names_an_error(self):
        root = self.make_folder()
        latin1 = os.path.join(os.fsencode(root), b"train", b"cat", b"caf\xe9.jpg")  # from a zip
        with open(latin1, "wb") as f:
            f.write(_jpeg_bytes(7))
        config = self.folder_config(root)
        data.prepare(config)  # was: UnicodeEncodeError from the folder's hash, then from TFDS
        self.assertEqual(data.dataset_info(config).num_train, 7)
        os.makedirs(os.path.join(os.fsencode(root), b"validation", b"\xe9t\xe9"))
        with self.assertRaisesRegex(data.DatasetError, r"validation/\\xe9t\\xe9 has a name"):
            folder.scan(root)

    def test_exif_orientation_is_applied_as_pil_does(self):
        image = np.zeros((24, 40, 3), np.uint8)
        image[:6, :10] = (255, 0, 0)  # a red top-left corner shows every turn and mirror
        image[-6:, :] = (0, 0, 255)
        try:
            from PIL import Image, ImageOps
        except ImportError:
            Image = None
        stored = tf.io.decode_jpeg(testdata.jpeg(image)).numpy().astype(int)
        transposed = np.swapaxes(stored, 0, 1)
        shown = {  # what a viewer shows for each EXIF orientation (the EXIF 2.32 spec, Table 6)
            1: stored,
            2: np.flip(stored, 1),
            3: np.flip(stored, (0, 1)),
            4: np.flip(stored, 0),
            5: transposed,
            6: np.flip(transposed, 1),  # 90 degrees clockwise
            7: np.flip(transposed, (0, 1)),
            8: np.flip(transposed, 0),  # 90 degrees counter-clockwise
        }
        for orientation, expected in shown.items():
            encoded = testdata.exif_jpeg(image, orientation)
            self.assertEqual(folder.exif_orientation(encoded), orientation)
            turned = tf.io.decode_jpeg(folder.upright(encoded)).numpy().astype(int)
            self.assertEqual(turned.shape, expected.shape, orientation)
            # One JPEG re-encode of sharp colour edges costs ~2; any wrong turn costs > 10.
            self.assertLess(np.abs(turned - expected).mean(), 5, orientation)
            if Image is not None:  # an independent reader of the same tag
                reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))))
                self.assertLess(np.abs(turned - reference).mean(), 5, orientation)
        # Written by another writer, read by ours.
        if Image is not None:
            buffer, exif = io.BytesIO(), Image.Exif()
            exif[0x0112] = 8
            Image.fromarray(image).save(buffer, "JPEG", exif=exif)
            self.assertEqual(folder.exif_orientation(buffer.getvalue()), 8)
        upright_bytes = testdata.jpeg(image)
        self.assertIs(folder.upright(upright_bytes), upright_bytes)  # stored unchanged
        # Some writers store the tag as another integer type (LONG, ...): PIL turns all of them
        # but an unsigned BYTE (read as bytes); so must we.
        for kind in testdata.TIFF_INTEGER_TYPES:
            encoded = testdata.exif_jpeg(image, 6, kind)
            self.assertEqual(folder.exif_orientation(encoded), 1 if kind == 1 else 6, kind)
            if Image is not None:
                reference = ImageOps.exif_transpose(Image.open(io.BytesIO(encoded)))
                turned = tf.io.decode_jpeg(folder.upright(encoded))
                self.assertEqual(turned.shape[:2], reference.size[::-1], kind)

    def test_only_jpegs_cut_short_count_as_truncated_not_those_with_data_after_their_end(self):
        # Cameras and editors append data after a JPEG's end-of-image marker, and some files
        # are padded; those counted as truncated (the check was: the last two bytes are not
        # FF D9). A JPEG cut in its scan after an EXIF thumbnail (whose own FF D9 comes first)
        # is truncated all the same.
        root = os.path.join(self.create_tempdir().full_path, "photos")
        testdata.write_image_folder(root, {"train": 2}, ["cat", "dog"])
        photo = tf.io.decode_jpeg(testdata.photo_like_jpeg(0, 120, 160)).numpy()
        whole = testdata.jpeg(photo)
        files = {
            "complete.jpg": whole,
            "trailing.jpg": whole + b"\x00\x01 camera maker's trailer \xff\xd8\xff",
            "padded.jpg": whole + bytes(4096),
            "thumbnail.jpg": testdata.jpeg_with_thumbnail(photo),
            "cut.jpg": testdata.truncated(whole, keep=0.6),
            "cut_after_thumbnail.jpg": testdata.truncated(testdata.jpeg_with_thumbnail(photo)),
        }
        for name, payload in files.items():
            with open(os.path.join(root, "train", "cat", name), "wb") as f:
                f.write(payload)
        config = self.folder_config(root)
        config.model.num_classes = 2
        config.input.eval_split = "train"
        data.prepare(config)
        counts = data.dataset_info(config).bad_input["train"]
        self.assertEqual(counts["examples"], 4 + len(files))
        self.assertEqual(counts["skipped_undecodable"], 0)
        self.assertEqual(counts["truncated_jpeg"], 2)  # today: 4, trailing and padded

    def test_truncated_rotated_photo_is_turned_and_decoded_as_the_pipeline_decodes(self):
        from vgg_jax.evaluation import predict

        photo = tf.io.decode_jpeg(testdata.photo_like_jpeg(0, 120, 160)).numpy()
        whole = testdata.exif_jpeg(photo, 6)  # shown 120 wide and 160 tall
        cut = testdata.truncated(whole, keep=0.6)  # an interrupted upload: 60% of the rows
        path = os.path.join(self.create_tempdir().full_path, "cut.jpg")
        with open(path, "wb") as f:
            f.write(cut)
        stored = folder.upright(cut)
        # Was stored sideways (160 x 120), unlike what predict (and a viewer) shows.
        self.assertEqual(tuple(tf.image.extract_jpeg_shape(stored).numpy()), (160, 120, 3))
        self.assertEqual(predict.read_image(path).shape, (160, 120, 3))
        # The accurate DCT, as every other decode (TensorFlow's default differs by up to ~20).
        pixels = tf.io.decode_jpeg(whole, channels=3, dct_method=transforms.ACCURATE_DCT)
        turned = np.ascontiguousarray(np.rot90(pixels.numpy(), k=-1))
        expected = tf.io.encode_jpeg(turned, quality=folder.UPRIGHT_JPEG_QUALITY).numpy()
        self.assertEqual(folder.upright(whole), expected)


class IndexReadErrorTest(absltest.TestCase):
    def test_a_record_that_cannot_be_read_stops_the_index_instead_of_dropping_the_rest(self):
        config = fixtures.tiny_config()
        builder = sources.prepared_builder(config.input)
        read = sources.RecordReader.read
        calls = []

        def flaky(reader, positions):
            calls.append(len(positions))
            if len(calls) == 3:  # records 32-47 of 100: a damaged chunk, an NFS hiccup
                raise RuntimeError("Corrupted Riegeli/records file: chunk data hash mismatch")
            return read(reader, positions)

        with (
            mock.patch.object(index, "_READ_CHUNK", 16),
            mock.patch.object(sources.RecordReader, "read", flaky),
            self.assertRaises(data.DatasetError) as raised,
        ):
            index.build_index(builder, "train")  # was: 68 of 100 marked undecodable, no error
        message = str(raised.exception)
        self.assertNotIn("\n", message)
        self.assertIn("vgg_jax_shapes/train from record 32 of 100", message)
        self.assertIn("chunk data hash mismatch", message)
        # Undamaged records still index in full, every example decodable.
        with mock.patch.object(index, "_READ_CHUNK", 16):
            self.assertEqual(len(index.build_index(builder, "train").valid), 100)


def project_files(data_dir: str) -> list[str]:
    return [
        path
        for pattern in ("vgg_jax_index_*.npz", "vgg_jax_stats.json")
        for path in glob.glob(os.path.join(data_dir, "**", pattern), recursive=True)
    ]


@contextlib.contextmanager
def read_only(path: str):
    """``path``'s tree made read-only for this process: write bits dropped and, as root (whom
    permission bits do not stop), the effective user switched to nobody for the block."""
    for directory, _, files in os.walk(path):
        os.chmod(directory, 0o555)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)
    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)
    try:
        yield
    finally:
        if as_root:
            os.seteuid(0)
        for directory, _, _ in os.walk(path):
            os.chmod(directory, 0o755)


class ReadOnlyDataDirTest(absltest.TestCase):
    def test_a_cloud_data_dir_is_not_tested_as_a_local_directory(self):
        """``os.path.abspath("gs://b/x")`` is ``<cwd>/gs:/b/x``: the write test tried the current
        directory, and from a read-only one said it could not prepare into ``<cwd>/gs:/b/x``."""
        unwritable = OSError(30, "Read-only file system")
        with mock.patch.object(sources.tempfile, "NamedTemporaryFile", side_effect=unwritable):
            self.assertIs(sources._write_error(self.create_tempdir().full_path), unwritable)
            self.assertIsNone(sources._write_error("gs://bucket/tensorflow_datasets"))

    def test_index_goes_to_index_dir_and_an_unwritable_one_fails_before_indexing(self):
        # A copy of the shared prepared dataset without the project's files, as a cluster's
        # shared TFDS copy would be.
        shared = self.create_tempdir().full_path
        os.chmod(shared, 0o755)
        data_dir = os.path.join(shared, "tfds")
        shutil.copytree(fixtures.builtin_data_dir(), data_dir)
        for path in project_files(data_dir):
            os.remove(path)
        index_dir = os.path.join(shared, "index")
        os.makedirs(index_dir, mode=0o777)
        os.chmod(index_dir, 0o777)
        config = fixtures.tiny_config(**{"input.data_dir": data_dir})
        with (
            read_only(data_dir),
            mock.patch.object(index, "build_index", wraps=index.build_index) as build,
        ):
            with self.assertRaises(data.DatasetError) as raised:
                data.prepare(config)  # today: indexes every split, then fails writing
            self.assertEqual(build.call_count, 0)
            self.assertIn("--config.input.index_dir=", str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))
            config.input.index_dir = index_dir
            data.prepare(config)
            info = data.dataset_info(config)
        self.assertEqual(info.num_train, 100)
        builder = sources.prepared_builder(config.input)
        where = os.path.join(index_dir, builder.info.full_name)
        self.assertEqual(sources.files_dir(builder, config.input), where)
        self.assertCountEqual(
            os.listdir(where),
            ["vgg_jax_index_train.npz", "vgg_jax_index_validation.npz", "vgg_jax_stats.json"],
        )
        self.assertEmpty(project_files(data_dir))

    def test_an_unprepared_read_only_data_dir_is_told_to_change_data_dir(self):
        """A read-only checkout run from its directory (the demo's data_dir is the relative
        workdirs/data) was told to set input.index_dir, and then preparing failed anyway."""
        data_dir = os.path.join(self.create_tempdir().full_path, "data")
        os.makedirs(data_dir)
        config = fixtures.tiny_config(**{"input.data_dir": data_dir})
        with read_only(data_dir), self.assertRaises(data.DatasetError) as raised:
            sources.prepare_builder(config.input)
        message = str(raised.exception)
        self.assertRegex(message, rf"^Cannot prepare vgg_jax_shapes into {data_dir}/\S+ \(")
        self.assertIn("set --config.input.data_dir=DIR to a writable directory", message)
        self.assertNotIn("index_dir", message)
        self.assertEqual(os.listdir(data_dir), [])


class FullDiskPreparationTest(absltest.TestCase):
    """A full data_dir (or index_dir) while preparing: one line naming it, nothing half-written
    kept. TFDS's own failure was a 40-line traceback ending in ``RuntimeError: Failed to finalize
    writing of split "train": write() failed: No space left on device; ...``; the index's, an
    ``OSError`` naming no file, with its partial temporary file left behind."""

    def test_tfds_files_not_written_are_one_data_error(self):
        data_dir = self.create_tempdir().full_path
        config = fixtures.tiny_config(**{"input.data_dir": data_dir})
        tfds_error = RuntimeError(
            'Failed to finalize writing of split "train": write() failed: No space left on '
            f"device; writing {data_dir}/x/incomplete.AB_1.0.0/x-train.array_record-00000-of-"
            "00001; at byte 610304; Failed to close chunk_writer"
        )
        with (
            mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare") as prepare,
            self.assertRaisesRegex(
                data.DatasetError,
                rf"^Preparing vgg_jax_shapes into {data_dir}/\S+ failed: Failed to finalize "
                r"writing of split \"train\": write\(\) failed: No space left on device; .*"
                "free space there",
            ),
        ):
            prepare.side_effect = tfds_error
            sources.prepare_builder(config.input)
        other = RuntimeError("TFDS's own bug")
        with (
            mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare", side_effect=other),
            self.assertRaisesRegex(RuntimeError, "^TFDS's own bug$"),  # its traceback helps
        ):
            sources.prepare_builder(config.input)

    def test_an_index_not_written_names_its_file_and_leaves_nothing(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "vgg_jax_index_train.npz")
        split_index = index.SplitIndex(*[np.zeros(2, np.int32) for _ in range(6)])

        def no_space(file, **arrays):
            with open(file, "wb") as f:
                f.write(b"PK")  # what fitted
            raise OSError(28, os.strerror(28))

        with (
            mock.patch.object(np, "savez", no_space),
            self.assertRaisesRegex(
                writers.WriteError, f"^Could not write {path}: No space left on device"
            ),
        ):
            index._save(path, split_index, "2 examples, 10 bytes")
        self.assertEqual(os.listdir(directory), [])

    def test_a_skipped_list_not_written_names_its_file_and_leaves_nothing(self):
        """It was written with a plain open(): a full disk was OSError's traceback naming no
        file, and left the list cut short under its real name."""
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, folder.SKIPPED_FILES_NAME)
        scan = folder.FolderScan(
            {}, [(f"/images/{i}.txt", "not .jpg/.jpeg/.png") for i in range(9)]
        )
        real_open = open

        class FillsTheDisk(io.StringIO):
            def __init__(self, file):
                super().__init__()
                self.file = file

            def writelines(self, lines):
                self.file.write(next(iter(lines)))  # what fitted
                raise OSError(28, os.strerror(28))

            def __exit__(self, *args):
                self.file.close()

        def full_disk(file, *args, **kwargs):
            opened = real_open(file, *args, **kwargs)
            return FillsTheDisk(opened) if folder.SKIPPED_FILES_NAME in file else opened

        with (
            mock.patch("builtins.open", full_disk),
            self.assertRaisesRegex(
                writers.WriteError, f"^Could not write {path}: No space left on device"
            ),
        ):
            folder.write_skipped_list(scan, directory)
        self.assertEqual(os.listdir(directory), [])


class SharedIndexDirTest(absltest.TestCase):
    def test_two_data_dirs_sharing_an_index_dir_each_get_their_own_index(self):
        root = self.create_tempdir().full_path
        index_dir = os.path.join(root, "index")  # keyed by imagenet2012/5.1.0 only
        configs, counts = [], ((4, 5), (8, 9))
        for name, (per_class, num_val) in zip(("small", "bigger"), counts, strict=True):
            manual = os.path.join(root, name, "manual")
            testdata.write_ilsvrc_tars(manual, SYNSETS, per_class=per_class, num_val=num_val)
            config = imagenet_config(os.path.join(root, name, "tfds"), manual)
            config.input.update(
                dict(
                    index_dir=index_dir,
                    stats_source="computed",
                    expected_counts=f"train={3 * per_class},validation={num_val},classes=3",
                )
            )
            data.prepare(config)
            info = data.dataset_info(config)
            # today, for "bigger": the small set's index, 11 of 23 training images, 5 of 9 scored
            self.assertEqual(info.bad_input["train"]["examples"], 3 * per_class)
            self.assertEqual(info.num_train, 3 * per_class - 1)  # its one corrupt image
            self.assertEqual(info.num_eval, num_val)
            configs.append((config, info.mean_rgb))
        (small, small_mean), (_, bigger_mean) = configs
        self.assertFalse(np.allclose(small_mean, bigger_mean))  # statistics made again too
        with self.assertRaisesRegex(index.StaleIndexError, "made from other imagenet2012/train"):
            data.dataset_info(small)  # an evaluation does not prepare: told to, not misled
        data.prepare(small)
        np.testing.assert_allclose(data.dataset_info(small).mean_rgb, small_mean, rtol=1e-6)


@pytest.mark.slow
class DataToolTest(absltest.TestCase):
    def test_mistyped_key_is_one_line(self):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "vgg_jax.tools.data",
                "--config=experiments/demo.py",
                "--config.input.data_dri=/tmp/x",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        self.assertIn("Unknown config key 'input.data_dri'", last)
        self.assertIn("'data_dir'", last)


if __name__ == "__main__":
    absltest.main()


class OpenFileLimitTest(absltest.TestCase):
    """A reader keeps every file it read from open; ImageNet (1,024 training files, more in its
    other splits) under a batch system's soft limit of 1,024 open files failed mid-pass with "Too
    many open files"."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        # The tiny built-in dataset in 20 files a split (ImageNet's train split is 1,024).
        cls.data_dir = tempfile.mkdtemp()
        cls.builder = builtin.make_builder("tiny", 0, cls.data_dir)
        cls.builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=20),
            file_format="array_record",
        )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        super().tearDownClass()

    def test_a_low_soft_limit_is_raised_so_every_file_can_be_read(self):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (host.open_files() + 5, hard))
            reader = sources.RecordReader(self.builder, "train")
            records = reader.read(np.arange(len(reader)))  # today: Too many open files
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.assertLen(records, 100)

    def test_a_hard_limit_too_low_is_one_line_saying_what_to_raise(self):
        with (
            mock.patch.object(host, "open_files", return_value=30),
            mock.patch.object(host, "open_file_limit", return_value=(64, 64)),
            self.assertRaisesRegex(
                data.DatasetError,
                r"vgg_jax_shapes is 40 files .* has 30 open already, but it may open only 64 "
                r"\(ulimit -n; its hard limit is 64\): raise the limit to at least 326 ",
            ),
        ):
            sources.RecordReader(self.builder, "train")
