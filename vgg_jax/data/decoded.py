"""Small training splits decoded once into memory, so no step decodes a JPEG again.

A 32x32-crop dataset (the demo's built-in shapes, CIFAR-sized image folders) costs more to decode
on every step than the net costs to train. When a split's decoded pixels fit in
``config.input.decoded_cache_mb``, every decodable example is decoded once at start-up (in
parallel, libjpeg's accurate DCT as PIL uses) and kept as uint8 RGB, all images back to back in
one flat buffer; ``augment.py`` cuts the training crops from it on the device. Larger splits
(ImageNet) keep the per-step ``tf.data`` path of ``pipeline.py``.
"""

from __future__ import annotations

import dataclasses
import time

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vgg_jax.data import generator_dataset, index, sources, transforms
from vgg_jax.data.progress import ProgressLog

# Offsets into the flat buffer are int32 on the device.
MAX_CACHE_MB = 2047


@dataclasses.dataclass(frozen=True)
class DecodedSplit:
    """Row r is decodable example ``index.valid[r]`` of the split."""

    pixels: np.ndarray  # uint8 [sum of h * w * 3]: each image's RGB rows, back to back
    offset: np.ndarray  # int32 [N]: where row r's pixels start
    height: np.ndarray  # int32 [N]
    width: np.ndarray  # int32 [N]
    label: np.ndarray  # int32 [N]

    def image(self, row: int) -> np.ndarray:
        h, w, start = int(self.height[row]), int(self.width[row]), int(self.offset[row])
        return self.pixels[start : start + h * w * 3].reshape(h, w, 3)


def check_cache_size(input_config: ml_collections.ConfigDict) -> None:
    megabytes = input_config.decoded_cache_mb
    if not 0 <= megabytes <= MAX_CACHE_MB:
        raise ValueError(
            f"config.input.decoded_cache_mb={megabytes} must be in [0, {MAX_CACHE_MB}] "
            "(0: decode on every step)."
        )


def decoded_bytes(split_index: index.SplitIndex) -> int:
    valid = split_index.valid
    return int(np.sum(split_index.height[valid].astype(np.int64) * split_index.width[valid] * 3))


def fits(input_config: ml_collections.ConfigDict, split_index: index.SplitIndex) -> bool:
    """Whether the split's decoded pixels fit in ``input.decoded_cache_mb``."""
    check_cache_size(input_config)
    return decoded_bytes(split_index) <= input_config.decoded_cache_mb * 2**20


def decode_split(
    builder: tfds.core.DatasetBuilder, split: str, split_index: index.SplitIndex
) -> DecodedSplit:
    """Every decodable example of ``split``, decoded once (``tf.data``, all cores)."""
    start_time = time.perf_counter()
    valid = split_index.valid
    height, width = split_index.height[valid], split_index.width[valid]
    sizes = height.astype(np.int64) * width * 3
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    if sizes.sum() >= 2**31:
        raise ValueError(f"{split}: {sizes.sum() / 2**20:.0f} MB decoded is over 2 GiB.")
    pixels = np.empty(int(sizes.sum()), np.uint8)
    label = np.empty(len(valid), np.int32)
    reader = sources.RecordReader(builder, split)
    chunk = 256

    def records():
        for first in range(0, len(valid), chunk):
            rows = np.arange(first, min(first + chunk, len(valid)))
            yield rows, split_index.fmt[valid[rows]].astype(np.int32), reader.read(valid[rows])

    def decode(row, fmt, serialized):
        encoded, example_label = sources.parse(serialized)
        return row, transforms.decode_full(encoded, fmt), example_label

    signature = (
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None], tf.string),
    )
    ds = generator_dataset.from_generator(records, output_signature=signature).unbatch()
    ds = ds.map(transforms.no_autograph(decode), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(64)
    report = ProgressLog(f"Decoding {builder.name}/{split}", len(valid))
    for done, (row, image, example_label) in enumerate(ds.as_numpy_iterator(), 1):
        if image.shape != (height[row], width[row], 3):
            raise ValueError(
                f"{split} example {valid[row]} decoded to {image.shape}, but the index says "
                f"{(height[row], width[row], 3)}: the index is stale; delete "
                f"vgg_jax_index_{split}.npz (next to the data, or in input.index_dir) and run "
                "again."
            )
        pixels[offset[row] : offset[row] + sizes[row]] = image.reshape(-1)
        label[row] = example_label
        report.update(done)
    logging.info(
        "Decoded %d %s/%s images once into memory (%.0f MB) in %.1f s.",
        len(valid),
        builder.name,
        split,
        pixels.nbytes / 2**20,
        time.perf_counter() - start_time,
    )
    return DecodedSplit(pixels, offset.astype(np.int32), height, width, label)
