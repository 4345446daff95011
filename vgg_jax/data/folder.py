"""Any image folder laid out ``root/<split>/<class>/<image>``, copied once into TFDS.

The image bytes are stored unchanged (JPEG, PNG, whatever the files hold); the index pass
(``index.py``) later decides which ones decode. Classes are the sub-directories of the training
split (``input.train_split``; the first split if the folder has none), sorted by name; another
split may use a subset of them but no new ones.

The TFDS config is named after the folder's base name, a hash of its absolute path and a hash of
what it holds (the training split's name and every image's path, size and modification time), so
two folders never share prepared files, and a folder whose images were added, removed, renamed or
rewritten since it was prepared is prepared again (with a warning naming the old copy) rather
than read with its old labels and class names. A process lists a folder once and reads that copy
until it prepares the folder again (``make_builder``).

What is not an image is skipped, counted and named (``scan``): dangling symbolic links, files
without a ``.jpg``/``.jpeg``/``.png`` name (``.txt``, ``.DS_Store``, ``.webp``, ``.gif``: the
pipeline decodes only JPEG and PNG), hidden files and directories (``.thumbs``,
``.ipynb_checkpoints``: never a split or a class), macOS's zip metadata (``__MACOSX``) and nested
directories. An empty class folder is
an error naming it: as a class it would silently get no examples.

EXIF orientation (photos from phones and cameras store pixels sideways plus an Orientation tag
that viewers apply): a JPEG whose tag says anything but "upright" is turned upright once, at
preparation, the way ``PIL.ImageOps.exif_transpose`` does, and stored re-encoded (JPEG quality
95, without the tag; decoded as the pipeline decodes, truncated files included). Doing it here
costs one decode and encode of those files only, and keeps training's window decode and the
index's sizes right without any per-step work.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import struct
import unicodedata

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import writers
from vgg_jax.data import DatasetError, choices, image_bytes, transforms

IMAGE_EXTENSIONS = choices.IMAGE_EXTENSIONS
SKIPPED_FILES_NAME = "vgg_jax_skipped_files.txt"
UPRIGHT_JPEG_QUALITY = 95
_EXIF_ORIENTATION_TAG = 0x0112


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    train_split: str = "train"


@dataclasses.dataclass(frozen=True)
class FolderScan:
    splits: dict[str, dict[str, list[str]]]  # {split: {class: [image paths]}}
    skipped: list[tuple[str, str]]  # (path, why), in listing order
    fingerprint: str = ""  # a hash of every image's path (from the root), size and mtime
    # (path, the path it is a second way to, where: one of ``_SAME_FILE``), in listing order
    same_file: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def skipped_summary(self) -> str:
        """``3 files (1 dangling link, 2 not .jpg/.jpeg/.png)``."""
        reasons = collections.Counter(why for _, why in self.skipped)
        parts = ", ".join(f"{count} {why}" for why, count in sorted(reasons.items()))
        return f"{len(self.skipped)} files ({parts})"

    def same_file_summary(self) -> str | None:
        """What the images reached by more than one path are, most harmful first, with an
        example; None when every image is its own file."""
        if not self.same_file:
            return None
        where = collections.Counter(kind for _, _, kind in self.same_file)
        parts = ", ".join(f"{where[kind]} {kind}" for kind in _SAME_FILE if where[kind])
        path, first, _ = min(self.same_file, key=lambda item: _SAME_FILE.index(item[2]))
        return (
            f"{len(self.same_file)} images are one file reached by more than one path (symbolic "
            f"links): {parts}; e.g. {_printable(path)} is {_printable(first)}"
        )


# Where the second path to a file lies, from the most harmful: a validation image that is a
# training image inflates the scores; one in two classes is trained towards two labels.
_SAME_FILE = (
    "in two splits (evaluated on what it trains on)",
    "in two classes (two labels)",
    "twice in one class",
)


# What macOS's zip adds beside what was zipped: AppleDouble ``._<name>`` files, never images.
MACOS_ZIP_METADATA = "__MACOSX"


def _why_skipped(entry: os.DirEntry) -> str | None:
    if entry.is_symlink() and not os.path.exists(entry.path):
        return "dangling link"
    if entry.name == MACOS_ZIP_METADATA and entry.is_dir():
        return "macOS zip metadata"
    if entry.is_dir():
        return "nested directory"
    if entry.name.startswith("."):
        return "hidden file"
    if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
        return "not .jpg/.jpeg/.png"
    if not entry.is_file():
        return "not a regular file"
    return None


def _listed(directory: str) -> list[os.DirEntry]:
    with os.scandir(directory) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _directories(directory: str, skipped: list[tuple[str, str]], what: str) -> list[os.DirEntry]:
    """The sub-directories of ``directory`` by name; other entries and hidden directories go to
    ``skipped``. A split or class name must be text: it names the split, or is the label."""
    kept = []
    for entry in _listed(directory):
        if not entry.is_dir():
            skipped.append((entry.path, f"not a {what} directory"))
        elif entry.name.startswith("."):
            skipped.append((entry.path, "hidden directory"))
        elif entry.name == MACOS_ZIP_METADATA:
            skipped.append((entry.path, "macOS zip metadata"))
        elif not _is_text(entry.name):
            raise DatasetError(
                f"The {what} folder {_printable(entry.path)} has a name that is not UTF-8 text "
                f"(written in another encoding); rename it: its name is the {what}'s name."
            )
        else:
            kept.append(entry)
    return kept


def _is_text(name: str) -> bool:
    """Whether a file name from the OS is valid UTF-8 (Python keeps other bytes as surrogates:
    ``caf\\udce9.jpg`` for a Latin-1 ``café.jpg``, which cannot be encoded back to UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str) -> str:
    """``path`` as UTF-8 text, a byte that is not UTF-8 shown as ``\\xe9``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def scan(root: str) -> FolderScan:
    """The images of ``root/<split>/<class>/<image>`` and every entry skipped, with why."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder {root} does not exist. Lay it out as {root}/<split>/<class>/<image>, "
            f"e.g. {root}/train/cat/001.jpg and {root}/validation/cat/101.jpg."
        )
    splits, skipped, empty = {}, [], []
    digest = hashlib.sha1()
    # Each image's file as (split, class, path) where first reached: the listing reads a linked
    # file's real path only (``entry.is_symlink`` costs no system call).
    reached: dict[str, tuple[str, str, str]] = {}
    same_file = []
    for split in _directories(root, skipped, "split"):
        classes, by_form = {}, {}
        for class_dir in _directories(split.path, skipped, "class"):
            if (alike := by_form.setdefault(name_form(class_dir.name), class_dir)) != class_dir:
                raise DatasetError(
                    f"Class folders {alike.path} and {class_dir.path} are one name written two "
                    "ways (Unicode's composed and decomposed forms, as Linux and macOS write "
                    "accents): as two classes they would split one class's images; merge them."
                )
            images = []
            real_class_dir = os.path.realpath(class_dir.path)
            for entry in _listed(class_dir.path):
                why = _why_skipped(entry)
                if why:
                    skipped.append((entry.path, why))
                    continue
                images.append(entry.path)
                real = (
                    os.path.realpath(entry.path)
                    if entry.is_symlink()
                    else os.path.join(real_class_dir, entry.name)
                )
                here = (split.name, class_dir.name, entry.path)
                first = reached.setdefault(real, here)
                if first is not here:
                    kind = 0 if first[0] != split.name else 1 if first[1] != class_dir.name else 2
                    same_file.append((entry.path, first[2], _SAME_FILE[kind]))
                stat = entry.stat()
                where = f"{split.name}/{class_dir.name}/{entry.name}"
                # fsencode: a file name need not be UTF-8 (its bytes are hashed as they are).
                digest.update(os.fsencode(f"{where}\0{stat.st_size}\0{stat.st_mtime_ns}\n"))
            if not images:
                empty.append(class_dir.path)
            classes[class_dir.name] = images
        if classes:
            splits[split.name] = classes
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
    return FolderScan(splits, skipped, digest.hexdigest(), same_file)


def name_form(name: str) -> str:
    """The form class names are matched by: Unicode's composed form (NFC). macOS writes names
    decomposed (NFD: "e" then a combining accent), so one class folder copied from a Mac and
    from Linux has two names that print alike."""
    return unicodedata.normalize("NFC", name)


def list_splits(root: str) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [image paths]}}`` for ``root/<split>/<class>/<image>``."""
    return scan(root).splits


def class_names(splits: dict[str, dict[str, list[str]]], train_split: str = "train") -> list[str]:
    """The training split's classes (the first split's if the folder has no such split)."""
    return list(splits.get(train_split, next(iter(splits.values()))))


def write_skipped_list(
    folder_scan: FolderScan, directory: str, not_jpeg_or_png: list[str] = ()
) -> str:
    """Writes every skipped entry (``why<TAB>path`` per line) to ``directory``, then the images
    that are neither JPEG nor PNG inside (``NOT_JPEG_OR_PNG``); returns the path."""
    path = os.path.join(directory, SKIPPED_FILES_NAME)
    os.makedirs(directory, exist_ok=True)
    entries = [*folder_scan.skipped, *((image, NOT_JPEG_OR_PNG) for image in not_jpeg_or_png)]
    # Atomically, as the index and statistics beside it: a full disk is one line naming the file
    # and leaves no list cut short.
    with writers.atomic_open(path) as f:
        f.writelines(f"{why}\t{_printable(skipped)}\n" for skipped, why in entries)
    return path


# Why an image of the skipped list was stored but can never be decoded.
NOT_JPEG_OR_PNG = "not JPEG or PNG inside, whatever its name (counted as undecodable)"


# The TIFF field types PIL reads the Orientation tag from (SHORT, LONG, and the signed BYTE,
# SHORT and LONG) -> struct formats; PIL reads an unsigned BYTE as bytes and turns nothing.
_TIFF_INTEGER_FORMATS = {3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}


def exif_orientation(encoded: bytes) -> int:
    """The EXIF Orientation tag (1-8) of a JPEG, 1 (upright) when there is none.

    Reads the APP1 "Exif" segment's first IFD (TIFF layout, either byte order) before the image
    data; a malformed segment counts as upright."""
    if not encoded.startswith(image_bytes.JPEG_SIGNATURE):
        return 1
    for marker, segment in image_bytes.jpeg_header_segments(encoded)[0]:
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
            if tag == _EXIF_ORIENTATION_TAG and kind in _TIFF_INTEGER_FORMATS:
                # SHORT as the standard says; PIL also reads the other integer types, so
                # some writers' LONG orientations turn the photo in viewers.
                value_format = order + _TIFF_INTEGER_FORMATS[kind]
                (value,) = struct.unpack_from(value_format, entry, 8)
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
    then re-encoded upright (an undecodable file is left as it is for the index to skip).

    Decoded as the pipeline decodes every JPEG (``transforms.decode_full``: the accurate DCT,
    a truncated file kept with its missing rows grey when enough of it is there), so the pixels
    stored are those training would have seen, turned; a truncated photo is turned upright too,
    as ``evaluation.predict.read_image`` shows it (it was stored sideways before)."""
    orientation = exif_orientation(encoded)
    if orientation == 1:
        return encoded
    try:
        image = transforms.decode_full(tf.constant(encoded), transforms.JPEG).numpy()
    except tf.errors.OpError:
        return encoded
    turned = np.ascontiguousarray(apply_orientation(image, orientation))
    return tf.io.encode_jpeg(turned, quality=UPRIGHT_JPEG_QUALITY).numpy()


class VggJaxImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images from ``root/<split>/<class>/<image>``, bytes stored as they are (turned upright
    per EXIF)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def folder_scan(self) -> FolderScan:
        """The listing this builder's name was made from (``make_builder``): the class names and
        the examples written come from the listing that the name says the folder held."""
        config = self.builder_config
        pinned = _PINNED.get((config.root, config.train_split))
        if pinned is not None and pinned[0] == config.name:
            return pinned[1]
        folder_scan = scan(config.root)
        if config_name(config.root, config.train_split, folder_scan) != config.name:
            raise DatasetError(
                f"Image folder {config.root} no longer holds what {config.name} was named after; "
                "run `python -m vgg_jax.tools.data --config=<your config>` to prepare it again."
            )
        return folder_scan

    def _info(self) -> tfds.core.DatasetInfo:
        names = class_names(self.folder_scan().splits, self.builder_config.train_split)
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
        splits = self.folder_scan().splits
        names = class_names(splits, self.builder_config.train_split)
        # Another split's class folder is the training class of the same name in either form.
        by_form = {name_form(name): name for name in names}
        for split, classes in splits.items():
            unknown = sorted(c for c in classes if name_form(c) not in by_form)
            if unknown:
                raise DatasetError(
                    f"Split {split!r} of {self.builder_config.root} has classes {unknown} that "
                    f"the training split {self.builder_config.train_split!r} lacks; classes: "
                    f"{names}"
                )
        return {
            split: self._generate_examples(
                {by_form[name_form(c)]: paths for c, paths in classes.items()}
            )
            for split, classes in splits.items()
        }

    def _generate_examples(self, classes: dict[str, list[str]]):
        root = self.builder_config.root
        for name, paths in classes.items():
            for path in paths:
                with open(path, "rb") as f:
                    encoded = f.read()
                if not image_bytes.is_jpeg_or_png(encoded):
                    self.not_jpeg_or_png.append(path)
                # TFDS orders the records by a hash of the key: the path inside the folder, so
                # every copy of a folder, wherever it lies, has the same record order. Hosts may
                # hold their copies at other paths (input.folder); keyed by the absolute path,
                # record i was another image on each, and the processes' shares of every batch
                # (read by record number) repeated some images and left out others, silently.
                key = _printable(os.path.relpath(path, root))
                yield key, {"image": upright(encoded), "label": name}

    @property
    def not_jpeg_or_png(self) -> list[str]:
        """The images this builder's preparation found neither JPEG nor PNG inside (a WebP, GIF
        or HEIC file named .jpg): stored as they are, so the index counts them undecodable, as
        it counts a damaged photo; these are named (the records hold no file names)."""
        if not hasattr(self, "_not_jpeg_or_png"):
            self._not_jpeg_or_png: list[str] = []
        return self._not_jpeg_or_png


def _name_prefix(root: str) -> str:
    """``<base name>_<hash of the path>_``: what every prepared copy of ``root`` is named by."""
    base = re.sub(r"[^a-z0-9_]", "_", os.path.basename(root.rstrip("/")).lower()) or "root"
    return f"{base}_{hashlib.sha1(root.encode()).hexdigest()[:8]}_"


def config_name(root: str, train_split: str, folder_scan: FolderScan) -> str:
    held = hashlib.sha1(f"{train_split}\0{folder_scan.fingerprint}".encode()).hexdigest()[:8]
    return _name_prefix(root) + held


# (root, train_split) -> (config name, scan): the copy of a folder this process reads. A run
# keeps reading the copy it started with when images are added to the folder meanwhile (its
# evaluation then scores the data it trained on); preparing (``fresh``) lists the folder again.
_PINNED: dict[tuple[str, str], tuple[str, FolderScan]] = {}


def make_builder(
    root: str, data_dir: str | None, train_split: str = "train", fresh: bool = False
) -> VggJaxImageFolder:
    """The builder of ``root`` as this process first listed it, or (``fresh``) as it is now."""
    root = os.path.abspath(root)
    key = (root, train_split)
    if fresh or key not in _PINNED:
        folder_scan = scan(root)
        _PINNED[key] = (config_name(root, train_split, folder_scan), folder_scan)
    config = FolderConfig(name=_PINNED[key][0], root=root, train_split=train_split)
    return VggJaxImageFolder(config=config, data_dir=data_dir, file_format="array_record")


def earlier_copies(builder: VggJaxImageFolder) -> list[str]:
    """The prepared copies of the builder's folder as it was before (other contents or training
    split), beside the builder's own directory."""
    own = os.path.dirname(os.fspath(builder.data_dir))  # <data_dir>/<builder>/<config>
    parent = os.path.dirname(own)
    prefix = _name_prefix(builder.builder_config.root)
    if not os.path.isdir(parent):
        return []
    return sorted(
        os.path.join(parent, name)
        for name in os.listdir(parent)
        if name.startswith(prefix) and os.path.join(parent, name) != own
    )
