"""Any image folder laid out ``root/<split>/<class>/<image>``, copied once into TFDS.

The image bytes are stored unchanged (JPEG, PNG, whatever the files hold); the index pass
(``index.py``) later decides which ones decode. Classes are the sub-directories of the ``train``
split (or of the first split, if there is no ``train``), sorted by name; another split may use a
subset of them but no new ones. The TFDS config is named after the folder's base name and a hash
of its absolute path, so two folders never share prepared files.

What is not an image is skipped, counted and named (``scan``): dangling symbolic links, files
without a ``.jpg``/``.jpeg``/``.png`` name (``.txt``, ``.DS_Store``, ``.webp``, ``.gif``: the
pipeline decodes only JPEG and PNG), hidden files and nested directories. An empty class folder is
an error naming it: as a class it would silently get no examples.

EXIF orientation (photos from phones and cameras store pixels sideways plus an Orientation tag
that viewers apply): a JPEG whose tag says anything but "upright" is turned upright once, at
preparation, the way ``PIL.ImageOps.exif_transpose`` does, and stored re-encoded (JPEG quality
95, without the tag). Doing it here costs one decode and encode of those files only, and keeps
training's window decode and the index's sizes right without any per-step work.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import struct

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax.data import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SKIPPED_FILES_NAME = "vgg_jax_skipped_files.txt"
UPRIGHT_JPEG_QUALITY = 95
_EXIF_ORIENTATION_TAG = 0x0112


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    root: str = ""


@dataclasses.dataclass(frozen=True)
class FolderScan:
    splits: dict[str, dict[str, list[str]]]  # {split: {class: [image paths]}}
    skipped: list[tuple[str, str]]  # (path, why), in listing order

    def skipped_summary(self) -> str:
        """``3 files (1 dangling link, 2 not .jpg/.jpeg/.png)``."""
        reasons = collections.Counter(why for _, why in self.skipped)
        parts = ", ".join(f"{count} {why}" for why, count in sorted(reasons.items()))
        return f"{len(self.skipped)} files ({parts})"


def _why_skipped(path: str, name: str) -> str | None:
    if os.path.islink(path) and not os.path.exists(path):
        return "dangling link"
    if os.path.isdir(path):
        return "nested directory"
    if name.startswith("."):
        return "hidden file"
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        return "not .jpg/.jpeg/.png"
    if not os.path.isfile(path):
        return "not a regular file"
    return None


def scan(root: str) -> FolderScan:
    """The images of ``root/<split>/<class>/<image>`` and every entry skipped, with why."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder {root} does not exist. Lay it out as {root}/<split>/<class>/<image>, "
            f"e.g. {root}/train/cat/001.jpg and {root}/validation/cat/101.jpg."
        )
    splits, skipped, empty = {}, [], []
    for split in sorted(os.listdir(root)):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            skipped.append((split_dir, "not a split directory"))
            continue
        classes = {}
        for name in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, name)
            if not os.path.isdir(class_dir):
                skipped.append((class_dir, "not a class directory"))
                continue
            images = []
            for file_name in sorted(os.listdir(class_dir)):
                path = os.path.join(class_dir, file_name)
                why = _why_skipped(path, file_name)
                if why:
                    skipped.append((path, why))
                else:
                    images.append(path)
            if not images:
                empty.append(class_dir)
            classes[name] = images
        if classes:
            splits[split] = classes
    if empty:
        raise DatasetError(
            f"Empty class folder{'s' if len(empty) > 1 else ''} (no .jpg/.jpeg/.png image): "
            f"{', '.join(empty)}. Add images or remove the folder; a class without images "
            "cannot be learnt or scored."
        )
    if not splits:
        raise FileNotFoundError(
            f"No images found under {root}. Expected {root}/<split>/<class>/<image> with "
            f"extensions {IMAGE_EXTENSIONS}, e.g. {root}/train/cat/001.jpg."
        )
    return FolderScan(splits, skipped)


def list_splits(root: str) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [image paths]}}`` for ``root/<split>/<class>/<image>``."""
    return scan(root).splits


def class_names(splits: dict[str, dict[str, list[str]]]) -> list[str]:
    return list(splits.get("train", next(iter(splits.values()))))


def write_skipped_list(folder_scan: FolderScan, directory: str) -> str:
    """Writes every skipped entry (``why<TAB>path`` per line) to ``directory``; returns the path."""
    path = os.path.join(directory, SKIPPED_FILES_NAME)
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{why}\t{skipped}\n" for skipped, why in folder_scan.skipped)
    return path


def exif_orientation(encoded: bytes) -> int:
    """The EXIF Orientation tag (1-8) of a JPEG, 1 (upright) when there is none.

    Reads the APP1 "Exif" segment's first IFD (TIFF layout, either byte order) before the image
    data; a malformed segment counts as upright."""
    if encoded[:2] != b"\xff\xd8":
        return 1
    position = 2
    while position + 4 <= len(encoded) and encoded[position] == 0xFF:
        marker = encoded[position + 1]
        if marker == 0xDA:  # start of scan: no more metadata
            break
        (length,) = struct.unpack(">H", encoded[position + 2 : position + 4])
        segment = encoded[position + 4 : position + 2 + length]
        position += 2 + length
        if marker != 0xE1 or not segment.startswith(b"Exif\x00\x00"):
            continue
        tiff = segment[6:]
        order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
        if order is None or len(tiff) < 8:
            return 1
        (first_ifd,) = struct.unpack(order + "I", tiff[4:8])
        if first_ifd + 2 > len(tiff):
            return 1
        (entries,) = struct.unpack(order + "H", tiff[first_ifd : first_ifd + 2])
        for k in range(entries):
            entry = tiff[first_ifd + 2 + 12 * k : first_ifd + 14 + 12 * k]
            if len(entry) < 12:
                return 1
            tag, kind = struct.unpack(order + "HH", entry[:4])
            if tag == _EXIF_ORIENTATION_TAG and kind == 3:  # SHORT
                (value,) = struct.unpack(order + "H", entry[8:10])
                return value if 1 <= value <= 8 else 1
        return 1
    return 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` [H, W, C] as a viewer shows it under EXIF ``orientation`` (PIL's
    ``ImageOps.exif_transpose``: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
    clockwise, 7 transverse, 8 rotate 90 counter-clockwise)."""
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return image.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(image, k=-1)
    if orientation == 7:
        return image[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return np.rot90(image, k=1)
    return image


def upright(encoded: bytes) -> bytes:
    """``encoded`` unchanged unless it is a JPEG with an EXIF orientation other than upright;
    then re-encoded upright (an undecodable file is left as it is for the index to skip)."""
    orientation = exif_orientation(encoded)
    if orientation == 1:
        return encoded
    try:
        image = tf.io.decode_jpeg(encoded, channels=3).numpy()
    except tf.errors.OpError:
        return encoded
    turned = np.ascontiguousarray(apply_orientation(image, orientation))
    return tf.io.encode_jpeg(turned, quality=UPRIGHT_JPEG_QUALITY).numpy()


class VggJaxImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images from ``root/<split>/<class>/<image>``, bytes stored as they are (turned upright
    per EXIF)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        names = class_names(list_splits(self.builder_config.root))
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=names),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = list_splits(self.builder_config.root)
        names = class_names(splits)
        for split, classes in splits.items():
            unknown = sorted(set(classes) - set(names))
            if unknown:
                raise ValueError(
                    f"Split {split!r} of {self.builder_config.root} has classes {unknown} that "
                    f"the training split lacks; classes: {names}"
                )
        return {split: self._generate_examples(classes) for split, classes in splits.items()}

    def _generate_examples(self, classes: dict[str, list[str]]):
        for name, paths in classes.items():
            for path in paths:
                with open(path, "rb") as f:
                    yield path, {"image": upright(f.read()), "label": name}


def make_builder(root: str, data_dir: str | None) -> VggJaxImageFolder:
    root = os.path.abspath(root)
    base = re.sub(r"[^a-z0-9_]", "_", os.path.basename(root.rstrip("/")).lower()) or "root"
    digest = hashlib.sha1(root.encode()).hexdigest()[:8]
    config = FolderConfig(name=f"{base}_{digest}", root=root)
    return VggJaxImageFolder(config=config, data_dir=data_dir, file_format="array_record")
