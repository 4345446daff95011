"""Training-preprocessing speed on real-size JPEGs, one core.

    python bench/input_pipeline.py
    python bench/input_pipeline.py --images=400 --crop=224 --scale_min=256 --scale_max=512

Generates ``--images`` photo-like JPEGs of 500x375 (about 110 KB each, quality 95,
``tests.testdata.photo_like_jpeg``), then times the project's training preprocessing
(``transforms.sample_train_params`` + ``transforms.train_image``: decode only the crop window,
resize, flip, PCA colour shift, mean subtraction) in a ``tf.data`` map confined to one thread
(private thread pool of 1, intra-op parallelism 1), over ``--epochs`` passes of the images held in
memory, best of ``--repeats``. The headline is images per CPU-second of the process, which is the
rate of one core of its own even on a shared, loaded machine; the wall-clock rate is printed
beside it. For comparison it times the textbook path on the same thread: decode the whole JPEG,
resize it to smallest side S, take a random crop. Prints one line of figures, the command, and as
its last line ``train preprocessing: N images/s per core``.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_IMAGES = flags.DEFINE_integer("images", 200, "Distinct generated JPEGs.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Passes over them per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the best counts.")
_CROP = flags.DEFINE_integer("crop", 224, "Crop size.")
_SCALE_MIN = flags.DEFINE_integer("scale_min", 256, "Smin.")
_SCALE_MAX = flags.DEFINE_integer("scale_max", 512, "Smax.")


def _one_thread(ds):
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return ds.with_options(options)


def _images_per_second(ds, count: int, repeats: int) -> tuple[float, float]:
    """Best of ``repeats`` passes: images per CPU-second of this process (all its threads) and
    images per wall-clock second. On a shared machine the wall clock measures the share of a core
    the pass got; CPU time measures the work, i.e. the rate of one core of its own."""
    for _ in ds.take(16):  # warm-up: graph tracing, first allocations
        pass
    per_cpu_second, per_second = 0.0, 0.0
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        seen = sum(1 for _ in ds)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert seen == count, (seen, count)
        per_cpu_second, per_second = max(per_cpu_second, count / cpu), max(per_second, count / wall)
    return per_cpu_second, per_second


def main(argv: list[str]) -> None:
    del argv
    import numpy as np
    import tensorflow as tf

    from tests import testdata
    from vgg_jax import conventions
    from vgg_jax.data import stats, transforms

    crop, smin, smax = _CROP.value, _SCALE_MIN.value, _SCALE_MAX.value
    encoded = [testdata.photo_like_jpeg(seed) for seed in range(_IMAGES.value)]
    sizes = [tuple(tf.image.extract_jpeg_shape(e).numpy()[:2]) for e in encoded]
    count = len(encoded) * _EPOCHS.value
    base = tf.data.Dataset.from_tensor_slices((encoded, np.asarray(sizes, np.int32))).repeat(
        _EPOCHS.value
    )
    base = base.enumerate()
    convention = conventions.mean_subtracted(tuple(stats.IMAGENET_STATS["mean_rgb"]))
    eigvals = np.asarray(stats.IMAGENET_STATS["eigvals"], np.float32)
    eigvecs = np.asarray(stats.IMAGENET_STATS["eigvecs"], np.float32)

    def windowed(position, example):
        raw, size = example
        params = transforms.sample_train_params(
            transforms.example_seed(0, position), size[0], size[1], crop, smin, smax, 0.1, True
        )
        return transforms.train_image(
            raw, transforms.JPEG, params, crop, eigvals, eigvecs, convention
        )

    def full_decode(position, example):
        raw, size = example
        params = transforms.sample_train_params(
            transforms.example_seed(0, position), size[0], size[1], crop, smin, smax, 0.1, True
        )
        image = tf.cast(tf.io.decode_jpeg(raw, channels=3), tf.float32)
        scale = tf.cast(params["scale"], tf.float32) / tf.cast(tf.reduce_min(size), tf.float32)
        new = tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32)
        image = transforms.resize(image, new[0], new[1], antialias=False)
        image = tf.image.stateless_random_crop(image, [crop, crop, 3], seed=[0, position])
        image = tf.cond(params["flip"], lambda: image[:, ::-1], lambda: image)
        return transforms.normalise(image, convention)

    fast, fast_wall = _images_per_second(_one_thread(base.map(windowed)), count, _REPEATS.value)
    full, full_wall = _images_per_second(_one_thread(base.map(full_decode)), count, _REPEATS.value)
    kb = np.mean([len(e) for e in encoded]) / 1000
    load = os.getloadavg()[0]
    print(
        f"{len(encoded)} JPEGs 500x375 mean {kb:.0f} KB, crop {crop}, S in [{smin}, {smax}], "
        f"1 thread, images per CPU-second (per wall second, load {load:.1f} on "
        f"{os.cpu_count()} cores): decode_and_crop path {fast:.0f} ({fast_wall:.0f}), "
        f"full decode + resize + crop {full:.0f} ({full_wall:.0f}) | "
        f"python {shlex.join(sys.argv)}"
    )
    print(f"train preprocessing: {fast:.0f} images/s per core")


if __name__ == "__main__":
    app.run(main)
