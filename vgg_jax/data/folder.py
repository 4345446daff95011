"""Any image folder laid out ``root/<split>/<class>/<image>``, copied once into TFDS.

The image bytes are stored unchanged (JPEG, PNG, whatever the files hold); the index pass
(``index.py``) later decides which ones decode. Classes are the sub-directories of the ``train``
split (or of the first split, if there is no ``train``), sorted by name; another split may use a
subset of them but no new ones. The TFDS config is named after the folder's base name and a hash
of its absolute path, so two folders never share prepared files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    root: str = ""


def list_splits(root: str) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [image paths]}}`` for ``root/<split>/<class>/<image>``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder {root} does not exist. Lay it out as {root}/<split>/<class>/<image>, "
            f"e.g. {root}/train/cat/001.jpg and {root}/validation/cat/101.jpg."
        )
    splits = {}
    for split in sorted(os.listdir(root)):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            continue
        classes = {}
        for name in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, name)
            if os.path.isdir(class_dir):
                classes[name] = sorted(
                    os.path.join(class_dir, f)
                    for f in os.listdir(class_dir)
                    if f.lower().endswith(IMAGE_EXTENSIONS)
                )
        if any(classes.values()):
            splits[split] = classes
    if not splits:
        raise FileNotFoundError(
            f"No images found under {root}. Expected {root}/<split>/<class>/<image> with "
            f"extensions {IMAGE_EXTENSIONS}, e.g. {root}/train/cat/001.jpg."
        )
    return splits


def class_names(splits: dict[str, dict[str, list[str]]]) -> list[str]:
    return list(splits.get("train", next(iter(splits.values()))))


class VggJaxImageFolder(tfds.core.GeneratorBasedBuilder):
    """Images from ``root/<split>/<class>/<image>``, bytes stored as they are."""

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
                    yield path, {"image": f.read(), "label": name}


def make_builder(root: str, data_dir: str | None) -> VggJaxImageFolder:
    root = os.path.abspath(root)
    base = re.sub(r"[^a-z0-9_]", "_", os.path.basename(root.rstrip("/")).lower()) or "root"
    digest = hashlib.sha1(root.encode()).hexdigest()[:8]
    config = FolderConfig(name=f"{base}_{digest}", root=root)
    return VggJaxImageFolder(config=config, data_dir=data_dir, file_format="array_record")
