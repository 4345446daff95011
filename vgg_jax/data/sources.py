"""Where examples come from: one TFDS builder per ``config.input.dataset``, prepared into
``config.input.data_dir`` as ``array_record`` files and read back by index.

* ``imagenet2012``: TFDS's own builder, from ``ILSVRC2012_img_train.tar`` and
  ``ILSVRC2012_img_val.tar`` in ``config.input.manual_dir``.
* ``image_folder``: ``config.input.folder`` laid out ``root/<split>/<class>/<image>``, copied once
  into TFDS (``folder.py``) so that it is read exactly like the others.
* ``builtin``: the generated shapes dataset (``builtin.py``), no download.

Every source has the features ``image`` (encoded bytes) and ``label``. Records are read as raw
serialized examples by index (``as_data_source``), which is what makes the training order a pure
function of (seed, step).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vgg_jax.data import builtin, folder

DATASETS = ("imagenet2012", "image_folder", "builtin")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
FILE_FORMAT = "array_record"


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown config.input.dataset {name!r}; valid: {list(DATASETS)}")


def data_dir(input_config: ml_collections.ConfigDict) -> str | None:
    return os.path.expanduser(input_config.data_dir) if input_config.data_dir else None


def get_builder(input_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The (possibly not yet prepared) TFDS builder that ``input_config`` names."""
    check_dataset_name(input_config.dataset)
    if input_config.dataset == "builtin":
        return builtin.make_builder(
            input_config.builtin_size, input_config.builtin_seed, data_dir(input_config)
        )
    if input_config.dataset == "image_folder":
        if not input_config.folder:
            raise ValueError(
                "config.input.dataset='image_folder' needs --config.input.folder=ROOT, a directory "
                "laid out ROOT/<split>/<class>/<image> (e.g. ROOT/train/cat/001.jpg)."
            )
        return folder.make_builder(os.path.expanduser(input_config.folder), data_dir(input_config))
    return tfds.builder("imagenet2012", data_dir=data_dir(input_config), file_format=FILE_FORMAT)


def _imagenet_download_config(manual_dir: str | None) -> tfds.download.DownloadConfig:
    where = os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else None
    missing = [n for n in IMAGENET_TARS if where is None or not os.path.exists(f"{where}/{n}")]
    if missing:
        raise FileNotFoundError(
            "imagenet2012 is not prepared yet and its manual download is missing. Put "
            + " and ".join(IMAGENET_TARS)
            + " (from https://image-net.org/download-images) in one directory and pass it as "
            f"--config.input.manual_dir=DIR. Missing: {', '.join(missing)}"
            + (f" in {where}." if where else " (config.input.manual_dir is not set).")
        )
    return tfds.download.DownloadConfig(manual_dir=where)


def prepare_builder(input_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Runs the builder's generation unless its files already exist; returns the builder."""
    builder = get_builder(input_config)
    if builder.is_prepared():
        return builder
    logging.info("Preparing %s into %s.", builder.name, builder.data_dir)
    download_config = None
    if input_config.dataset == "imagenet2012":
        download_config = _imagenet_download_config(input_config.manual_dir)
    builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
    return builder


def prepared_builder(input_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    builder = get_builder(input_config)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"Dataset {input_config.dataset!r} is not prepared in {builder.data_dir}. Run "
            "`python -m vgg_jax.tools.data --config=<your config>` (or data.prepare(config)) first."
        )
    return builder


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    if split not in builder.info.splits:
        raise ValueError(
            f"Split {split!r} is not in {builder.name}; valid: {sorted(builder.info.splits)}"
        )


class RecordReader:
    """Random access to one split's serialized examples (``tf.train.Example`` bytes)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        check_split(builder, split)
        self._source = builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )

    def __len__(self) -> int:
        return len(self._source)

    def read(self, indices: np.ndarray) -> list[bytes]:
        return [self._source[int(i)] for i in indices]


# The two features every source shares, as stored by TFDS.
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded image bytes and int32 label of one serialized example."""
    example = tf.io.parse_single_example(serialized, _FEATURES)
    return example["image"], tf.cast(example["label"], tf.int32)
