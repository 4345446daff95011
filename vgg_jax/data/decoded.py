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

from vgg_jax import host
from vgg_jax.data import generator_dataset, index, sources, transforms
from vgg_jax.data.progress import ProgressLog

# Offsets into the flat buffer are int32 on the device.
MAX_CACHE_MB = 2047
# Images read, and handed from tf.data to Python, at a time.
CHUNK = 256
# The most of the memory this process has left (``host.memory_room_bytes``: the host's, or its
# container's limit) the decoded copy may take. While it is placed on the devices it is there twice
# (the host's buffer and the devices' copy, host memory on a CPU), and the rest of the run (the
# kept validation batches, checkpoint saves) needs room too; over a container's limit the kernel
# kills the process without a word.
MEMORY_SHARE = 0.25


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
    """Whether the split's decoded pixels fit in ``input.decoded_cache_mb`` and in
    ``MEMORY_SHARE`` of the memory this process has left (a warning says when only the second
    keeps a split out)."""
    check_cache_size(input_config)
    size = decoded_bytes(split_index)
    if size > input_config.decoded_cache_mb * 2**20:
        return False
    room = host.memory_room_bytes()
    if room is None or size <= MEMORY_SHARE * room:
        return True
    logging.warning(
        "The training split decodes to %s, more than %d%% of the %s this process may still "
        "allocate (what the host, a container's memory limit and ulimit -v leave, the least): it "
        "is read through tf.data on every step instead of decoded once into memory "
        "(config.input.decoded_cache_mb=0 chooses that without this warning).",
        host.megabytes(size),
        round(100 * MEMORY_SHARE),
        host.megabytes(room),
    )
    return False


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

    def records():
        for first in range(0, len(valid), CHUNK):
            rows = np.arange(first, min(first + CHUNK, len(valid)))
            yield rows, split_index.fmt[valid[rows]].astype(np.int32), reader.read(valid[rows])

    def decode(row, fmt, serialized):
        encoded, example_label = sources.parse(serialized)
        image = transforms.decode_full(encoded, fmt)
        return row, tf.shape(image), tf.reshape(image, [-1]), example_label

    signature = (
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None], tf.string),
    )
    ds = generator_dataset.from_generator(records, output_signature=signature).unbatch()
    ds = ds.map(transforms.no_autograph(decode), num_parallel_calls=tf.data.AUTOTUNE)
    # Whole chunks to Python, not images: tf.data's per-element cost in Python (about 0.8 ms)
    # was a third of this pass's CPU time on the demo's 5,000 small images. The map keeps the
    # order, so a chunk's images are consecutive rows, whose pixels are consecutive in the buffer.
    ds = ds.ragged_batch(CHUNK).prefetch(2)
    report = ProgressLog(f"Decoding {builder.name}/{split}", len(valid))
    done = 0
    for rows, shapes, images, labels in ds:
        rows, shapes, labels = rows.numpy(), shapes.numpy(), labels.numpy()
        expected = np.stack([height[rows], width[rows], np.full(len(rows), 3)], -1)
        if (stale := np.flatnonzero((shapes != expected).any(-1))).size:
            row = rows[stale[0]]
            raise ValueError(
                f"{split} example {valid[row]} decoded to {tuple(shapes[stale[0]])}, but the "
                f"index says {tuple(expected[stale[0]])}: the index is stale; delete "
                f"vgg_jax_index_{split}.npz (next to the data, or in input.index_dir) and run "
                "again."
            )
        start = offset[rows[0]]
        flat = images.flat_values.numpy()
        pixels[start : start + flat.size] = flat
        label[rows] = labels
        done += len(rows)
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
