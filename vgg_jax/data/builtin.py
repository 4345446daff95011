"""The built-in dataset: ten shapes on cluttered backgrounds, generated with no download.

Each image holds one object whose *shape* is its class (disk, ring, square, frame, diamond,
triangle, plus, cross, star, crescent). Colour carries no information: the object's colour, the
background's colour field and the clutter (line segments, small blobs, noise) are drawn
independently of the class. The object's radius is log-uniform over 15-45% of the image's short
side and its centre is anywhere it fits, so scales vary 3x and positions widely and a net trained at
one scale sees the others rarely: the setting where the paper's scale jittering and multi-scale
testing pay off. Image sides: short side 48-128 px, aspect ratio 1-1.6 in either orientation.

Every image is a pure function of (seed, split, index), drawn by ``shapes.py`` (one worker
process per core for the larger splits), so the dataset is the same on every machine and in any
generation order. Stored through TFDS (``array_record``, features ``image`` (JPEG) and
``label``) like ImageNet.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from vgg_jax.data import choices, shapes
from vgg_jax.data.progress import ProgressLog

# The dataset's classes and images (drawn by shapes.py), under the dataset's name.
CLASS_NAMES, MAX_ASPECT, draw_example = shapes.CLASS_NAMES, shapes.MAX_ASPECT, shapes.draw_example

# Sizes by name: ``config.input.builtin_size``.
SIZES = choices.BUILTIN_SIZES


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    num_train: int = 5000
    num_validation: int = 1000
    seed: int = 0


def shapes_config(size: str, seed: int) -> ShapesConfig:
    if size not in SIZES:
        raise ValueError(f"Unknown built-in dataset size {size!r}; valid: {sorted(SIZES)}")
    num_train, num_validation = SIZES[size]
    return ShapesConfig(
        name=f"{size}_seed{seed}",
        description=f"{num_train} training and {num_validation} validation images, seed {seed}.",
        num_train=num_train,
        num_validation=num_validation,
        seed=seed,
    )


class VggJaxShapes(tfds.core.GeneratorBasedBuilder):
    """Ten shapes at widely varying scales and positions over cluttered backgrounds."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [shapes_config(size, 0) for size in SIZES]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {
            "train": self._generate_examples("train", self.builder_config.num_train),
            "validation": self._generate_examples("validation", self.builder_config.num_validation),
        }

    def _generate_examples(self, split: str, count: int):
        report = ProgressLog(f"Generating the built-in {split} split", count)
        drawn = shapes.draw_split(self.builder_config.seed, split, count, as_jpeg=True)
        for index, (jpeg, label) in enumerate(drawn):
            report.update(index)
            yield index, {"image": jpeg, "label": label}


def make_builder(size: str, seed: int, data_dir: str | None) -> VggJaxShapes:
    """The builder for ``size`` and ``seed`` (the seed-0 presets are registered by name)."""
    config = shapes_config(size, seed)
    registered = config.name in VggJaxShapes.builder_configs
    return VggJaxShapes(
        config=config.name if registered else config,
        data_dir=data_dir,
        file_format="array_record",
    )
