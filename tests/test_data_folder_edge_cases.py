"""Image folders as users lay them out by mistake: a split whose images all fail to decode (WebP
or GIF files named .jpg), images put straight into a split folder, macOS's zip metadata, and class
names that differ only in their Unicode form."""

import glob
import io
import os
import shutil

import numpy as np
from absl.testing import absltest

from tests import fixtures, testdata
from vgg_jax import data
from vgg_jax.data import builtin, folder, index, pipeline, sources, verify


def _jpeg(k: int) -> bytes:
    image, _ = builtin.draw_example(0, "train", k)
    return testdata.jpeg(image)


def _resized(k: int) -> bytes:
    """Example ``k``'s image re-saved 8 pixels shorter."""
    image, _ = builtin.draw_example(0, "train", k)
    return testdata.jpeg(image[8:])


def _webp(k: int) -> bytes:
    from PIL import Image

    image, _ = builtin.draw_example(0, "train", k)
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, "WEBP")
    return encoded.getvalue()


def _write(path: str, encoded: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encoded)


class FolderEdgeCasesTest(absltest.TestCase):
    def make_folder(self, validation: bool = True) -> str:
        """``photos/train/{cat,dog}/`` with 3 JPEGs each, and (``validation``) one each in
        ``photos/validation/``."""
        root = os.path.join(self.create_tempdir().full_path, "photos")
        for c, name in enumerate(("cat", "dog")):
            for i in range(3):
                _write(os.path.join(root, "train", name, f"{i}.jpg"), _jpeg(10 * c + i))
            if validation:
                _write(os.path.join(root, "validation", name, "v.jpg"), _jpeg(50 + c))
        return root

    def folder_config(self, root: str):
        return fixtures.tiny_config(
            **{
                "input.dataset": "image_folder",
                "input.folder": root,
                "input.data_dir": self.create_tempdir().full_path,
                "model.num_classes": 2,
            }
        )

    def test_copies_of_a_folder_at_other_paths_hold_the_records_in_one_order(self):
        """Hosts may hold their copies of a folder at other paths (``input.folder`` may differ
        between the processes of a job), and every process reads its share of each batch by
        record number. TFDS orders records by a hash of their key, which was the image's
        absolute path: the two copies held the same images in other orders, and a two-process
        evaluation scored some images twice and others never (13 counted, exit 0, other
        errors than one process's)."""
        root = self.make_folder()
        other = os.path.join(self.create_tempdir().full_path, "elsewhere", "photos")
        shutil.copytree(root, other)
        orders = []
        for path in (root, other):
            config = self.folder_config(path)
            data.prepare(config)
            builder = sources.prepared_builder(config.input)
            orders.append(
                [
                    np.stack([s.label, s.height, s.width]).tolist()
                    for s in (
                        pipeline._split_index(builder, split, config.input)
                        for split in ("train", "validation")
                    )
                ]
            )
        self.assertEqual(orders[0], orders[1])

    def test_a_host_copy_with_an_image_of_another_size_has_another_fingerprint(self):
        """The processes of a job compare ``data.data_fingerprint`` of their copies. It held
        each split's record numbers only: a host whose copy held one image re-saved at another
        size (or the records in another order: a folder copy prepared at another path before
        records were keyed by their path inside the folder) passed, and each process planned
        the evaluation batches from its own sizes and read its share by record number."""
        root = self.make_folder()
        other = os.path.join(self.create_tempdir().full_path, "photos")
        shutil.copytree(root, other)
        _write(os.path.join(other, "validation", "dog", "v.jpg"), _resized(51))
        found = []
        for path in (root, other):
            config = self.folder_config(path)
            data.prepare(config)
            found.append(data.data_fingerprint(config))
        differ = sorted(k for k in found[0] if found[0][k] != found[1][k])
        self.assertEqual(differ, ["validation labels and image sizes, in record order"])

    def test_images_that_are_not_jpeg_or_png_inside_are_named(self):
        # A GIF and a WebP named .jpg: the index counts them undecodable, and the records hold no
        # file names, so nothing said which files they were.
        from PIL import Image

        root = self.make_folder()
        gif = io.BytesIO()
        Image.fromarray(builtin.draw_example(0, "train", 7)[0]).save(gif, "GIF")
        not_images = {
            os.path.join(root, "train", "cat", "animated.jpg"): gif.getvalue(),
            os.path.join(root, "validation", "dog", "download.JPG"): _webp(8),
        }
        for path, encoded in not_images.items():
            _write(path, encoded)
        config = self.folder_config(root)
        data.prepare(config)
        info = data.dataset_info(config)
        self.assertEqual(info.bad_input["train"]["skipped_undecodable"], 1)
        self.assertEqual(info.bad_input["validation"]["skipped_undecodable"], 1)
        listed = glob.glob(
            os.path.join(config.input.data_dir, "**", folder.SKIPPED_FILES_NAME), recursive=True
        )
        self.assertLen(listed, 1)
        with open(listed[0]) as f:
            lines = f.read().splitlines()
        self.assertCountEqual(lines, [f"{folder.NOT_JPEG_OR_PNG}\t{p}" for p in not_images])

    def test_an_evaluation_split_without_a_decodable_image_is_an_error(self):
        root = self.make_folder(validation=False)
        for name in ("cat", "dog"):  # web downloads: WebP named .jpg
            _write(os.path.join(root, "validation", name, "v.jpg"), _webp(3))
        config = self.folder_config(root)
        # Was accepted: num_eval 0, and the evaluator's table said 100% top-1 and top-5 error.
        with self.assertRaisesRegex(
            data.DatasetError,
            r"validation has no image that decodes \(2 skipped as undecodable.*cannot be scored",
        ):
            data.prepare(config)

    def test_images_straight_in_a_split_folder_are_not_called_a_missing_folder(self):
        root = self.make_folder(validation=False)
        for i in range(3):  # ImageNet's own validation layout: no class folders
            _write(os.path.join(root, "validation", f"{i}.jpg"), _jpeg(60 + i))
        config = self.folder_config(root)
        # Was: "has no split folder 'validation' ...; it holds ['train']".
        with self.assertRaisesRegex(
            data.DatasetError,
            r"split folder .*photos/validation holds no class folder \(3 files straight in it, "
            r"e\.g\. 0\.jpg\); put each image in validation/<class>/",
        ):
            data.prepare(config)
        for i in range(3):
            os.remove(os.path.join(root, "validation", f"{i}.jpg"))
        with self.assertRaisesRegex(data.DatasetError, "photos/validation holds no class folder"):
            data.prepare(config)

    def test_class_names_in_another_unicode_form_are_the_same_class(self):
        """macOS writes names decomposed (NFD: 'e' + a combining accent), Linux keyboards
        composed (NFC): the same class folder, copied from each, had two names that print
        alike."""
        composed, decomposed = "caf\u00e9", "cafe\u0301"
        root = self.make_folder(validation=False)
        os.rename(os.path.join(root, "train", "cat"), os.path.join(root, "train", composed))
        _write(os.path.join(root, "validation", decomposed, "v.jpg"), _jpeg(50))
        _write(os.path.join(root, "validation", "dog", "v.jpg"), _jpeg(51))
        config = self.folder_config(root)
        # Was: "Split 'validation' ... has classes ['café'] that the training split 'train'
        # lacks; classes: ['café', 'dog']".
        data.prepare(config)
        info = data.dataset_info(config)
        self.assertEqual(info.class_names, [composed, "dog"])
        batches = data.eval_batches(config, 48, process_index=0, process_count=1)
        labels = np.concatenate([b["label"][b["mask"]] for b in batches])
        self.assertEqual(sorted(labels.tolist()), [0, 1])

        _write(os.path.join(root, "train", decomposed, "0.jpg"), _jpeg(70))
        # Was: two classes, 'café' and 'café', each with some of the class's images.
        with self.assertRaisesRegex(
            data.DatasetError, r"train/caf.* and .*train/caf.* are one name written two ways"
        ):
            data.prepare(config)

    def test_pngs_with_alpha_are_counted_and_grey_with_alpha_is_grayscale(self):
        """Grey + alpha, RGBA and a palette with a transparent entry decode to RGB without their
        alpha, as PIL's convert("RGB"): counted, like every other unusual input. A grey + alpha
        PNG was not counted as grayscale, and none of them was counted at all."""
        from PIL import Image

        root = self.make_folder()
        image = builtin.draw_example(0, "train", 20)[0]
        kinds = {
            "grey.png": (Image.fromarray(image).convert("L"), {}),
            "grey_alpha.png": (Image.fromarray(image).convert("LA"), {}),
            "rgba.png": (Image.fromarray(image).convert("RGBA"), {}),
            "palette_transparent.png": (Image.fromarray(image).convert("P"), {"transparency": 0}),
            "palette.png": (Image.fromarray(image).convert("P"), {}),
        }
        expected = {}
        for name, (picture, options) in kinds.items():
            encoded = io.BytesIO()
            picture.save(encoded, "PNG", **options)
            _write(os.path.join(root, "train", "cat", name), encoded.getvalue())
            expected[picture.convert("RGB").tobytes()] = name
        config = self.folder_config(root)
        data.prepare(config)
        counts = data.dataset_info(config).bad_input["train"]
        self.assertEqual((counts["grayscale"], counts["png_alpha_dropped"]), (2, 3))
        # Each decodes to PIL's RGB pixels.
        from vgg_jax.data import decoded, pipeline, sources

        builder = sources.prepared_builder(config.input)
        split_index = pipeline._split_index(builder, "train", config.input)
        split = decoded.decode_split(builder, "train", split_index)
        found = {split.image(r).tobytes() for r in range(len(split.label))}
        self.assertContainsSubset(set(expected), found)

    def test_macos_zip_metadata_is_neither_a_split_nor_a_class(self):
        """A zip made on a Mac unpacks with ``__MACOSX/`` beside the splits, holding an
        AppleDouble ``._<name>`` file per image."""
        root = self.make_folder()
        for where in ("__MACOSX/train/cat/._0.jpg", "train/dog/__MACOSX/._0.jpg"):
            _write(os.path.join(root, where), b"\x00\x05\x16\x07 AppleDouble")
        config = self.folder_config(root)
        # Was: "Empty class folders (no .jpg/.jpeg/.png image): .../__MACOSX/train. Add images
        # or remove the folder".
        with self.assertLogs(level="WARNING") as logs:
            data.prepare(config)
        self.assertTrue(any("2 macOS zip metadata" in m for m in logs.output), logs.output)
        info = data.dataset_info(config)
        self.assertEqual((info.class_names, info.num_train), (["cat", "dog"], 6))

    def test_one_file_reached_by_two_links_is_named(self):
        """Folders built with symbolic links into a pool of photos: a validation link to a
        training photo is scored on what the net trained on, and a photo linked into two classes
        carries two labels. Both were silent."""
        root = self.make_folder()
        train = os.path.join(root, "train")
        os.symlink(
            os.path.join(train, "cat", "0.jpg"), os.path.join(root, "validation", "cat", "l.jpg")
        )
        os.symlink(os.path.join(train, "cat", "1.jpg"), os.path.join(train, "dog", "l.jpg"))
        os.symlink(os.path.join(train, "dog", "0.jpg"), os.path.join(train, "dog", "again.jpg"))
        config = self.folder_config(root)
        with self.assertLogs(level="WARNING") as logs:
            data.prepare(config)
        warned = [m for m in logs.output if "more than one path" in m]
        self.assertLen(warned, 1, logs.output)
        self.assertRegex(
            warned[0],
            r"3 images are one file reached by more than one path \(symbolic links\): 1 in two "
            r"splits \(evaluated on what it trains on\), 1 in two classes \(two labels\), 1 twice "
            r"in one class; e\.g\. .*validation/cat/l\.jpg is .*train/cat/0\.jpg",
        )

    def test_copies_of_one_image_in_two_splits_or_two_classes_are_named(self):
        """Copied files, not links: a validation photo that is a training photo, a training
        photo in two classes. The folder scan sees distinct files; the index's byte
        fingerprints find them. Both were silent (scores inflated, two labels)."""
        root = self.make_folder()
        train = os.path.join(root, "train")
        _write(os.path.join(root, "validation", "dog", "copy.jpg"), _jpeg(1))  # train/cat/1.jpg
        _write(os.path.join(train, "dog", "copy.jpg"), _jpeg(2))  # train/cat/2.jpg
        config = self.folder_config(root)
        with self.assertLogs(level="WARNING") as logs:
            data.prepare(config)
        copies = [m for m in logs.output if "byte-identical" in m or "two or more classes" in m]
        self.assertLen(copies, 2, logs.output)
        self.assertRegex(
            copies[0],
            r"1 of 3 vgg_jax_image_folder/validation images are byte-identical to train images "
            r"\(e\.g\. validation record \d+ \(class 'dog'\) is train record \d+ \(class 'cat'\)\)",
        )
        self.assertRegex(
            copies[1],
            r"1 vgg_jax_image_folder/train image is stored in two or more classes \(e\.g\. "
            r"train record \d+ \(class '(cat|dog)'\) is train record \d+ \(class '(cat|dog)'\)\)",
        )

    def test_a_folder_without_copies_has_none_found(self):
        config = self.folder_config(self.make_folder())
        data.prepare(config)
        builder = sources.prepared_builder(config.input)
        train, validation = (index.load_index(builder, s) for s in ("train", "validation"))
        self.assertLen(np.unique(train.digest), 6)  # one fingerprint per distinct image
        self.assertEqual(verify.copies_found(builder, "train", "validation", train, validation), [])

    def test_an_index_made_before_fingerprints_still_loads(self):
        """Indexes saved by earlier versions have no ``digest``: they are used as they are (an
        ImageNet index takes most of an hour to build again); only the copy check is skipped."""
        root = self.make_folder()
        _write(os.path.join(root, "validation", "dog", "copy.jpg"), _jpeg(1))
        config = self.folder_config(root)
        data.prepare(config)
        builder = sources.prepared_builder(config.input)
        for split in ("train", "validation"):
            path = index.index_path(builder, split)
            with np.load(path) as stored:
                kept = {k: stored[k] for k in stored.files if k != "digest"}
            np.savez(path, **kept)
        train, validation = (index.load_index(builder, s) for s in ("train", "validation"))
        self.assertIsNone(train.digest)
        self.assertEqual(len(train.valid), 6)
        self.assertEqual(verify.copies_found(builder, "train", "validation", train, validation), [])
        data.prepare(config)  # no error, and the index is not rebuilt
        self.assertIsNone(index.load_index(builder, "train").digest)


if __name__ == "__main__":
    absltest.main()
