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
resize it to smallest side S, take a random crop. The windowed path is timed with libjpeg's fast
and accurate DCTs (``transforms.TRAIN_DCT`` picks one for training); the paths alternate within
each round. Prints one line of figures with the CPU model and vector ISA, the command, and as its
last line ``train preprocessing: N images/s per core`` (with ``TRAIN_DCT``).
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine  # noqa: E402

_IMAGES = flags.DEFINE_integer("images", 200, "Distinct generated JPEGs.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Passes over them per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (paths alternate); the best counts.")
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


def _one_pass(ds, count: int) -> tuple[float, float]:
    """Images per CPU-second of this process (all its threads) and per wall-clock second. On a
    shared machine the wall clock measures the share of a core the pass got; CPU time measures
    the work, i.e. the rate of one core of its own."""
    cpu, wall = time.process_time(), time.perf_counter()
    seen = sum(1 for _ in ds)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert seen == count, (seen, count)
    return count / cpu, count / wall


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

    def windowed(dct_method):
        def preprocess(position, example):
            raw, size = example
            params = transforms.sample_train_params(
                transforms.example_seed(0, position), size[0], size[1], crop, smin, smax, 0.1, True
            )
            return transforms.train_image(
                raw,
                transforms.JPEG,
                params,
                crop,
                eigvals,
                eigvecs,
                convention,
                dct_method=dct_method,
            )

        return preprocess

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

    paths = {
        "decode_and_crop, fast DCT": windowed("INTEGER_FAST"),
        "decode_and_crop, accurate DCT": windowed(transforms.ACCURATE_DCT),
        "full decode + resize + crop": full_decode,
    }
    datasets = {name: _one_thread(base.map(fn)) for name, fn in paths.items()}
    for ds in datasets.values():  # warm-up: graph tracing, first allocations
        for _ in ds.take(16):
            pass
    best = dict.fromkeys(paths, (0.0, 0.0))
    for _ in range(_REPEATS.value):  # the paths alternate, so load hits each alike
        for name, ds in datasets.items():
            rate = _one_pass(ds, count)
            best[name] = (max(best[name][0], rate[0]), max(best[name][1], rate[1]))
    kb = np.mean([len(e) for e in encoded]) / 1000
    figures = ", ".join(f"{name} {cpu:.0f} ({wall:.0f})" for name, (cpu, wall) in best.items())
    fast, accurate = best["decode_and_crop, fast DCT"][0], best["decode_and_crop, accurate DCT"][0]
    print(
        f"{len(encoded)} JPEGs 500x375 mean {kb:.0f} KB, crop {crop}, S in [{smin}, {smax}], "
        f"1 thread, best of {_REPEATS.value}, images per CPU-second (per wall second): {figures}; "
        f"accurate/fast DCT {accurate / fast:.2f} | {machine.describe()} | "
        f"python {shlex.join(sys.argv)}"
    )
    chosen = accurate if transforms.TRAIN_DCT == transforms.ACCURATE_DCT else fast
    print(f"train preprocessing: {chosen:.0f} images/s per core ({transforms.TRAIN_DCT or 'fast'})")


if __name__ == "__main__":
    app.run(main)
