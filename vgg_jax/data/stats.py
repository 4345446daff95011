"""The training set's mean RGB and the eigen-pairs of its RGB covariance (AlexNet's PCA lighting).

Computed by ``data.prepare`` (``python -m vgg_jax.tools.data --config=...``) over the decodable
training
images (at most ``max_images`` of them, a fixed random sample, at full resolution; every pixel
counts once) and stored as ``vgg_jax_stats.json`` next to the data. The mean is in 0-255 units;
the covariance is that of pixels scaled to [0, 1], the convention of the published ImageNet
eigen-pairs, which ``config.input.stats_source='published'`` uses instead.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vgg_jax import conventions, writers
from vgg_jax.data import choices, generator_dataset, index, sources, transforms
from vgg_jax.data.progress import ProgressLog

# ImageNet's published values: the Caffe VGG mean (BGR [103.939, 116.779, 123.68] as RGB) and the
# eigen-pairs used by fb.resnet.torch and many others (columns of EIGVECS are eigenvectors).
IMAGENET_STATS = {
    "mean_rgb": list(conventions.CAFFE["mean"][::-1]),
    "eigvals": [0.2175, 0.0188, 0.0045],
    "eigvecs": [
        [-0.5675, 0.7192, 0.4009],
        [-0.5808, -0.0045, -0.8140],
        [-0.5836, -0.6948, 0.4203],
    ],
    "num_images": None,
    "source": "published",
}
STATS_SOURCES = choices.STATS_SOURCES
CHUNK = 256  # images handed from tf.data to Python at a time
_PIXELS_AT_A_TIME = 1 << 20  # float64 copies of at most 24 MB, whatever the images' sizes


def stats_path(builder: tfds.core.DatasetBuilder, files_dir: str | None = None) -> str:
    """``files_dir``: where the project's files for this dataset live (``sources.files_dir``);
    next to the TFDS files when None."""
    return os.path.join(files_dir or os.fspath(builder.data_dir), "vgg_jax_stats.json")


def pixel_moments(images: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """Sum of pixels, sum of pixel outer products (float64, pixels in [0, 1]) and pixel count of
    ``images`` (uint8 arrays of RGB pixels, any shape ``(..., 3)``: one image or many).

    The sums are made over the 0-255 values as whole numbers: each product is at most 255**2 and
    each array's sums (BLAS, in float64) stay exact while under 2**53, so they are added to
    int64 totals exactly and scaled to [0, 1] once at the end. The result then depends neither
    on the order of the images nor on how they are grouped, and whole chunks of images cost one
    sum and one matrix product each (image by image, in Python, was 1.3 s of the demo's
    4.5 s)."""
    total, outer, count = np.zeros(3, np.int64), np.zeros((3, 3), np.int64), 0
    for image in images:
        flat = image.reshape(-1, 3)
        for start in range(0, len(flat), _PIXELS_AT_A_TIME):
            pixels = flat[start : start + _PIXELS_AT_A_TIME].astype(np.float64)
            total += (np.ones(len(pixels)) @ pixels).astype(np.int64)  # sum(0), 10x faster
            outer += (pixels.T @ pixels).astype(np.int64)
        count += len(flat)
    return total / 255.0, outer / 255.0**2, count


def stats_from_moments(total: np.ndarray, outer: np.ndarray, count: int) -> dict:
    mean = total / count
    covariance = outer / count - np.outer(mean, mean)
    eigvals, eigvecs = np.linalg.eigh(covariance)
    order = np.argsort(eigvals)[::-1]
    eigvecs = eigvecs[:, order] * np.sign(eigvecs[:, order].sum(0, keepdims=True) + 1e-12)
    return {
        "mean_rgb": (255.0 * mean).tolist(),
        "eigvals": np.maximum(eigvals[order], 0.0).tolist(),
        "eigvecs": eigvecs.tolist(),
    }


def compute_stats(
    builder: tfds.core.DatasetBuilder, split: str, valid: np.ndarray, max_images: int
) -> dict:
    reader = sources.RecordReader(builder, split)
    chosen = np.sort(np.random.default_rng(0).permutation(valid)[:max_images])

    def decoded(serialized):
        encoded, _ = sources.parse(serialized)
        return tf.reshape(transforms.decode_full(encoded, transforms.image_format(encoded)), [-1])

    ds = generator_dataset.from_generator(
        lambda: iter(reader.read(chosen)), output_signature=tf.TensorSpec([], tf.string)
    )
    ds = ds.map(transforms.no_autograph(decoded), num_parallel_calls=tf.data.AUTOTUNE)
    # Chunks of images to Python, not single images (tf.data's per-element cost in Python was
    # most of this pass's time on small images).
    ds = ds.ragged_batch(CHUNK).prefetch(2)
    report = ProgressLog(f"Mean RGB and PCA of {builder.name}/{split}", len(chosen))

    def images():
        done = 0
        for chunk in ds:
            yield chunk.flat_values.numpy()  # the chunk's images' pixels, one after another
            done += len(chunk.row_lengths().numpy())
            report.update(done)

    stats = stats_from_moments(*pixel_moments(images()))
    stats.update(num_images=int(len(chosen)), source="computed")
    return stats


def ensure_stats(
    builder: tfds.core.DatasetBuilder,
    split: str,
    valid: np.ndarray,
    max_images: int,
    files_dir: str | None = None,
) -> dict:
    path = stats_path(builder, files_dir)
    source = index.split_source(builder, split)
    if os.path.exists(path):
        stored = load_stats(builder, files_dir)
        wanted = min(max_images, len(valid))
        if stored.get("source_files", source) != source:
            # input.index_dir shared by two data_dirs of one dataset: not these images' values.
            logging.warning(
                "Statistics in %s were computed from other %s/%s files (%s; now %s): computing "
                "them again.",
                path,
                builder.name,
                split,
                stored["source_files"],
                source,
            )
        elif stored.get("num_images", wanted) == wanted:
            return stored
        else:
            # input.stats_max_images changed since: the statistics follow the config.
            logging.info(
                "Statistics of %s were computed over %d images; input.stats_max_images asks "
                "for %d.",
                builder.name,
                stored["num_images"],
                wanted,
            )
    logging.info("Computing mean RGB and PCA of %s/%s.", builder.name, split)
    stats = compute_stats(builder, split, valid, max_images)
    stats["source_files"] = source
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = writers.temporary_path(path)  # per process, as data/index.py's
    try:
        with open(temporary, "w") as f:
            json.dump(stats, f, indent=2)
        os.replace(temporary, path)
    except OSError as e:  # a full disk: one line naming the file, no partial file left
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise writers.write_error(e, path) from e
    logging.info("Stats of %s: %s", builder.name, stats)
    return stats


def load_stats(builder: tfds.core.DatasetBuilder, files_dir: str | None = None) -> dict:
    path = stats_path(builder, files_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No mean/PCA statistics at {path}. Run `python -m vgg_jax.tools.data --config=<your "
            "config>` (or data.prepare(config)) first."
        )
    with open(path) as f:
        return json.load(f)


def check_stats_source(stats_source: str) -> None:
    if stats_source not in STATS_SOURCES:
        raise ValueError(
            f"Unknown config.input.stats_source {stats_source!r}; valid: {list(STATS_SOURCES)}"
        )


def uses_published(dataset: str, stats_source: str) -> bool:
    """``published``, or ``auto`` on imagenet2012: the published ImageNet values are used."""
    return stats_source == "published" or (stats_source == "auto" and dataset == "imagenet2012")


# A shift of one standard deviation along the first eigenvector moving pixels by less than this
# (0-255 levels) is no colour shift at all.
NO_SHIFT_LEVELS = 0.5


def colour_shift_note(chosen: dict, color_shift_std: float) -> str | None:
    """What to say when the colour shift (paper, section 3.1: AlexNet's PCA lighting noise) is
    configured but the statistics make it move nothing: the training images all of one colour,
    or nearly, have a zero (or tiny) RGB covariance, so every shift is ``255 V (alpha lambda)``
    = 0 whatever ``color_shift_std``; None when it shifts (or is off by the config)."""
    largest = max(chosen["eigvals"])
    if color_shift_std <= 0 or 255.0 * color_shift_std * largest >= NO_SHIFT_LEVELS:
        return None
    return (
        f"the colour shift (input.color_shift_std={color_shift_std:g}) moves no pixel by even "
        f"{NO_SHIFT_LEVELS:g} level: the training images' RGB covariance has eigenvalues "
        f"{', '.join(f'{v:.2g}' for v in chosen['eigvals'])} (images of one colour, or nearly); "
        "set input.stats_source='published' for ImageNet's, or input.color_shift_std=0 to train "
        "without it."
    )


def choose(dataset: str, stats_source: str, computed: dict | None) -> dict:
    """The statistics the pipeline uses: ``auto`` = published for imagenet2012, else computed."""
    check_stats_source(stats_source)
    if uses_published(dataset, stats_source):
        return IMAGENET_STATS
    if computed is None:
        raise ValueError("Computed statistics are missing; run data.prepare(config).")
    return computed
