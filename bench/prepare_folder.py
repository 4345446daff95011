"""Preparing an image folder of small JPEGs (CIFAR-sized), phase by phase: ``prepare: T s``.

    python bench/prepare_folder.py --folder=/tmp/folder60k

Generates ``--train`` + ``--validation`` 32x32 JPEGs into ``--folder`` once (the built-in shapes
drawn small, ``<split>/<class>/<n>.jpg``), then prepares it with the project's ``data.prepare`` in
a fresh TFDS data_dir, as ``launch.py`` does before training: the copy into TFDS's files, the index
of every split (sizes, decodability) and the mean RGB / PCA statistics; then the decoded in-memory
copy that training reads (``data/decoded.py``). One line: the time of each phase and the total,
with the machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine  # noqa: E402

_FOLDER = flags.DEFINE_string("folder", None, "Where the generated JPEG folder lives.")
_TRAIN = flags.DEFINE_integer("train", 50_000, "Training JPEGs.")
_VALIDATION = flags.DEFINE_integer("validation", 10_000, "Validation JPEGs.")
_SIZE = flags.DEFINE_integer("size", 32, "Side of the square JPEGs.")


def write_folder(root: str, counts: dict[str, int], size: int) -> None:
    """``root/<split>/<class>/<n>.jpg``: the built-in shapes, drawn in order, resized to size."""
    import numpy as np
    from PIL import Image

    from vgg_jax.data import builtin

    for split, count in counts.items():
        done_marker = os.path.join(root, f".{split}_{count}_{size}")
        if os.path.exists(done_marker):
            continue
        for name in builtin.CLASS_NAMES:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for n in range(count):
            image, label = builtin.draw_example(0, split, n)
            small = Image.fromarray(np.asarray(image)).resize((size, size), Image.BILINEAR)
            path = os.path.join(root, split, builtin.CLASS_NAMES[label], f"{n}.jpg")
            small.save(path, quality=90)
        open(done_marker, "w").close()


def main(argv):
    del argv
    from vgg_jax.configs import demo as demo_defaults
    from vgg_jax.configs import paper
    from vgg_jax.data import decoded, index, pipeline, sources, stats, verify

    root = os.path.abspath(_FOLDER.value or os.path.join(tempfile.gettempdir(), "vgg_jax_folder"))
    start = time.perf_counter()
    write_folder(root, {"train": _TRAIN.value, "validation": _VALIDATION.value}, _SIZE.value)
    generate_s = time.perf_counter() - start

    config = paper.paper_config("A", "jitter")
    config.input.update(demo_defaults.demo_input_config()["input"])
    data_dir = tempfile.mkdtemp(prefix="vgg_jax_prepare_bench_")
    config.input.update(dict(dataset="image_folder", folder=root, data_dir=data_dir))
    input_config = config.input
    seconds = {}
    try:
        start = time.perf_counter()
        builder = sources.prepare_builder(input_config)
        seconds["copy"] = time.perf_counter() - start
        files_dir = sources.files_dir(builder, input_config)
        start = time.perf_counter()
        verify.check_examples(builder, input_config, files_dir)
        for split in ("train", "validation"):
            index.ensure_index(builder, split, files_dir)
        seconds["index"] = time.perf_counter() - start
        train_index = index.load_index(builder, "train", files_dir)
        start = time.perf_counter()
        stats.ensure_stats(
            builder, "train", train_index.valid, input_config.stats_max_images, files_dir
        )
        seconds["stats"] = time.perf_counter() - start
        prepare_total = sum(seconds.values())
        start = time.perf_counter()
        pipeline.prepare(config)  # everything is done: only the checks run
        seconds["checks"] = time.perf_counter() - start
        start = time.perf_counter()
        decoded.decode_split(builder, "train", train_index)
        seconds["decode_in_memory"] = time.perf_counter() - start
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    images = _TRAIN.value + _VALIDATION.value
    ready = prepare_total + seconds["checks"] + seconds["decode_in_memory"]
    fields = [
        f"images={images} ({_SIZE.value}x{_SIZE.value} JPEG)",
        *(f"{name}_s={value:.1f}" for name, value in seconds.items()),
        f"ready_to_train_s={ready:.1f}",
        f"images/s={images / ready:.0f}",
        f"(generating the folder: {generate_s:.0f} s, not counted)",
        machine.describe(),
    ]
    print(" ".join(fields))
    print("reproduce: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
