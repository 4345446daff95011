"""The training loop against its bare step, same config, one process: ``loop/step: R``.

    python bench/train_loop.py --config=experiments/demo.py
    python bench/train_loop.py --config=experiments/demo.py --cifar_like=/tmp/cifar_like
    python bench/train_loop.py --config=experiments/demo.py --config.model.width=0.0625 \
        --config.input.crop_size=224 --config.input.train_scale_min=256 \
        --config.input.train_scale_max=288 --config.input.builtin_size=small \
        --config.input.batch_size=16 --config.evals.single_scale=256 --image_sizes=imagenet

The loop is the project's ``training.loop.train`` (input pipeline, step, logging every
``log_every_steps``, per-epoch validation, checkpoints at the config's cadence) in a fresh workdir
for ``--epochs`` epochs. Its rate is read from its own ``metrics.jsonl`` over the epochs after the
first two of the run (the first steps and validations compile; from epoch 3 on every epoch also
pays the previous epoch's validation and checkpoint). The bare step is the same jitted step fed one
synthetic batch already on the device, as many steps as the loop's measured part, waited for once
at the end. The two alternate ``--rounds`` times; each round's ratio and the median are printed,
with the CPU model, vector ISA and load. ``--cifar_like=DIR`` trains on an image folder of 32x32
JPEGs generated into DIR (the built-in shapes drawn small, ``--cifar_like_train`` per class);
``--image_sizes=imagenet`` draws the built-in images at ImageNet-like sizes instead.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. demo.py.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternations of loop and bare step.")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs per loop run; the first two are not timed.")
_CIFAR_LIKE = flags.DEFINE_string(
    "cifar_like", None, "Train on a generated folder of 32x32 JPEGs in this directory."
)
_CIFAR_LIKE_TRAIN = flags.DEFINE_integer("cifar_like_train", 500, "Training JPEGs per class.")
_IMAGE_SIZES = flags.DEFINE_enum(
    "image_sizes", "builtin", ["builtin", "imagenet"], "Built-in images as stored or ImageNet-like."
)


def write_cifar_like(root: str, per_class: int, val_per_class: int) -> None:
    """``root/{train,validation}/<class>/<n>.jpg``: the built-in shapes drawn at 32x32."""
    import numpy as np
    from PIL import Image

    from vgg_jax.data import builtin

    if os.path.isdir(os.path.join(root, "validation")):
        return
    for split, count in (("train", per_class), ("validation", val_per_class)):
        for c, name in enumerate(builtin.CLASS_NAMES):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            drawn = 0
            index = 0
            while drawn < count:
                image, label = builtin.draw_example(0, split, index)
                index += 1
                if label != c:
                    continue
                small = Image.fromarray(np.asarray(image)).resize((32, 32), Image.BILINEAR)
                small.save(os.path.join(root, split, name, f"{drawn}.jpg"), quality=90)
                drawn += 1


def loop_rate(workdir: str, steps_per_epoch: int, batch: int) -> tuple[float, float, int]:
    """Images/s of the loop over the epochs after the first two, from its metrics.jsonl, with and
    without the time its per-epoch validations took; and the number of steps measured."""
    images, seconds, validation_seconds, steps, previous = 0.0, 0.0, 0.0, 0, 0
    validations = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "val_seconds" in record:
                validations[record["step"]] = record["val_seconds"]
            if "images_per_second" not in record:
                continue
            step = record["step"]
            if previous >= 2 * steps_per_epoch:
                count = (step - previous) * batch
                images += count
                seconds += count / record["images_per_second"]
                steps += step - previous
                # A validation right after the previous log falls inside this interval.
                validation_seconds += validations.get(previous, 0.0)
            previous = step
    return images / seconds, images / (seconds - validation_seconds), steps


def bare_step(config):
    """The project's step on a synthetic batch on the device: ``run(n) -> seconds``."""
    import jax
    import numpy as np

    from vgg_jax import models, sharding
    from vgg_jax.training import optim, steps

    mesh = sharding.make_mesh(config.mesh)
    size, batch = config.input.crop_size, config.input.batch_size
    model = models.build_model(config.model, size)
    tx = optim.make_optimizer(config.optim)
    state, shardings = steps.create_train_state(model, tx, mesh, config.seed)
    step = steps.make_train_step(model, tx, mesh, shardings, config.seed)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3), np.float32)
    labels = rng.integers(0, config.model.num_classes, batch).astype(np.int32)
    batch_on_device = sharding.global_batch({"image": images, "label": labels}, mesh)
    lr = np.float32(config.optim.learning_rate)
    holder = {"state": state}

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            holder["state"], sums = step(holder["state"], batch_on_device, lr)
        jax.block_until_ready((holder["state"], sums))
        return time.perf_counter() - start

    run(3)
    return run


def main(argv):
    del argv
    from vgg_jax import data
    from vgg_jax.training import loop

    config = _CONFIG.value
    if _CIFAR_LIKE.value:
        write_cifar_like(_CIFAR_LIKE.value, _CIFAR_LIKE_TRAIN.value, _CIFAR_LIKE_TRAIN.value // 5)
        config.input.dataset = "image_folder"
        config.input.folder = _CIFAR_LIKE.value
        config.input.data_dir = os.path.join(_CIFAR_LIKE.value + "_tfds")
    if _IMAGE_SIZES.value == "imagenet":
        from vgg_jax.data import builtin

        builtin.SHORT_SIDE = (256, 400)  # stored sizes like ImageNet's (median about 500x375)
        config.input.data_dir = os.path.join(config.input.data_dir or ".", "imagenet_like")
    config.schedule.num_epochs = _EPOCHS.value
    start = time.perf_counter()
    data.prepare(config)
    prepare_s = time.perf_counter() - start
    steps_per_epoch = data.steps_per_epoch(config)
    batch = config.input.batch_size
    run_bare = bare_step(config)
    cached = _uses_cache(config)

    rounds = []
    root = tempfile.mkdtemp(prefix="bench_train_loop_")
    try:
        for r in range(_ROUNDS.value):
            workdir = os.path.join(root, f"round{r}")
            loop.train(config, workdir)
            rate, training_rate, steps = loop_rate(workdir, steps_per_epoch, batch)
            shutil.rmtree(workdir)
            bare = steps * batch / run_bare(steps)
            rounds.append((rate, bare, training_rate))
            print(
                f"round {r + 1}: loop {rate:.0f} images/s ({training_rate:.0f} without its "
                f"validations), bare step {bare:.0f} images/s, loop/step {rate / bare:.2f} "
                f"({training_rate / bare:.2f}) ({machine.describe()})",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratios = [rate / bare for rate, bare, _ in rounds]
    training_ratios = [training / bare for _, bare, training in rounds]
    fields = [
        f"net={config.model.name} width={config.model.width:g} crop={config.input.crop_size}",
        f"batch={batch} dataset={config.input.dataset}",
        f"decoded_in_memory={cached}",
        f"steps/epoch={steps_per_epoch} measured epochs {3}-{_EPOCHS.value} x {_ROUNDS.value}",
        f"loop_images/s median={statistics.median(r for r, _, _ in rounds):.0f}",
        f"bare_step_images/s median={statistics.median(b for _, b, _ in rounds):.0f}",
        f"ratios={', '.join(f'{x:.2f}' for x in ratios)}",
        f"without validation={', '.join(f'{x:.2f}' for x in training_ratios)}",
        f"prepare_s={prepare_s:.0f}",
        f"machine={machine.describe()}",
    ]
    print(" ".join(fields))
    print("reproduce: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"loop/step without validation: {statistics.median(training_ratios):.2f}")
    print(f"loop/step: {statistics.median(ratios):.2f}")


def _uses_cache(config) -> bool:
    from vgg_jax.data import on_device

    return on_device.uses_decoded_cache(config)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
