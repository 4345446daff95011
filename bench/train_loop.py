"""The training loop against its bare step, same config, one process: ``loop/step: R``.

    python bench/train_loop.py --config=experiments/demo.py
    python bench/train_loop.py --config=experiments/demo.py --cifar_like=/tmp/cifar_like
    python bench/train_loop.py --config=experiments/demo.py --config.model.width=0.0625 \
        --config.input.crop_size=224 --config.input.train_scale_min=256 \
        --config.input.train_scale_max=288 --config.input.builtin_size=small \
        --config.input.batch_size=16 --config.evals.single_scale=256 --image_sizes=imagenet

The loop is the project's ``training.loop.train`` (input pipeline, step, logging every
``log_every_steps``, per-epoch validation, checkpoints at the config's cadence) in a fresh workdir
for ``--epochs`` epochs, ``--rounds`` times. At the end of every epoch the bench runs the bare step
(the same jitted step fed one synthetic batch already on the device, waited for once at the end)
for one epoch's worth of steps, so loop and step alternate epoch by epoch. The epochs after the
first 1 + ``evals.every_epochs`` of a run (the first steps compile, and so does the first
validation, which runs at the start of the next epoch's interval: an epoch pays the validation and
checkpoint that end the epoch before it) give two ratios, bare-step time over loop time
summed over those epochs (a whole number of validation intervals, ``evals.every_epochs``): by the
wall clock, and by the CPU time of the process (all its threads). The headline ``loop/step`` is
the CPU-time median over the runs: on a shared machine the wall clock measures the share of the
cores the process got (a pipeline with more threads gets a larger share of a loaded machine), CPU
time the work per image, which is what a machine of one's own turns into speed. Each line names
the CPU model, vector ISA and load; both medians are printed with and without the validations'
time. ``--cifar_like=DIR`` trains on an image folder of 32x32 JPEGs generated into DIR (the
built-in shapes drawn small, ``--cifar_like_train`` per class); ``--image_sizes=imagenet``
draws the built-in images at ImageNet-like sizes instead.
"""

from __future__ import annotations

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
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Loop runs (fresh workdirs).")
_EPOCHS = flags.DEFINE_integer(
    "epochs",
    None,
    "Epochs per loop run; the first 1 + evals.every_epochs are not timed (default: then 2 "
    "validation intervals).",
)
_CIFAR_LIKE = flags.DEFINE_string(
    "cifar_like", None, "Train on a generated folder of 32x32 JPEGs in this directory."
)
_CIFAR_LIKE_TRAIN = flags.DEFINE_integer("cifar_like_train", 500, "Training JPEGs per class.")
_VS_PYTORCH = flags.DEFINE_bool(
    "vs_pytorch",
    False,
    "Also run a plain PyTorch loop (same net, optimiser and augmentation on the decoded images) "
    "for one epoch after each bare-step epoch; needs bench/requirements.txt.",
)
_IMAGE_SIZES = flags.DEFINE_enum(
    "image_sizes", "builtin", ["builtin", "imagenet"], "Built-in images as stored or ImageNet-like."
)


def write_cifar_like(root: str, per_class: int, val_per_class: int) -> None:
    """``root/{train,validation}/<class>/<n>.jpg``: the built-in shapes drawn at 32x32, about
    ``per_class`` training images per class (drawn in order: the counts per class vary a little)."""
    from bench import prepare_folder
    from vgg_jax.data import builtin

    classes = len(builtin.CLASS_NAMES)
    prepare_folder.write_folder(
        root, {"train": per_class * classes, "validation": val_per_class * classes}, 32
    )


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


def torch_loop(config):
    """A plain PyTorch training loop of the same net and optimiser (``train_step.build_torch_net``)
    and the same augmentation, per example on the decoded uint8 images (the project's in-memory
    copy, so no JPEG is decoded per step either): S uniform in [Smin, Smax], a square window of
    ``crop * min(h, w) / S`` pixels at a uniform position, a flip, bilinear resizing to the crop
    (``F.interpolate``, half-pixel centres, as ``tf.image.resize``), AlexNet's PCA shift and the
    normalisation. ``run(steps) -> None``."""
    import numpy as np
    import torch
    from torch.nn import functional

    from bench.torch_reference import build_torch_net
    from vgg_jax import data
    from vgg_jax.data import decoded, pipeline, sources

    input_config = config.input
    builder = sources.prepared_builder(input_config)
    split_index = pipeline._split_index(builder, input_config.train_split, input_config)
    split = decoded.decode_split(builder, input_config.train_split, split_index)
    images = [split.image(row) for row in range(len(split.label))]
    labels = torch.from_numpy(split.label.astype(np.int64))
    info = data.dataset_info(config)
    mean = torch.tensor(np.asarray(info.mean_rgb, np.float32)).view(1, 3, 1, 1)
    pixel_std = np.asarray(input_config.pixel_std or (1.0, 1.0, 1.0), np.float32)
    std = torch.tensor(pixel_std).view(1, 3, 1, 1)
    eigvals = np.asarray(info.pca_eigvals, np.float32)
    eigvecs = np.asarray(info.pca_eigvecs, np.float32)
    crop, batch = input_config.crop_size, input_config.batch_size
    net, opt = build_torch_net(config, crop)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    state = {"order": rng.permutation(len(images)), "at": 0}

    def next_rows():
        if state["at"] + batch > len(state["order"]):
            state["order"], state["at"] = rng.permutation(len(images)), 0
        rows = state["order"][state["at"] : state["at"] + batch]
        state["at"] += batch
        return rows

    def augmented(row):
        image = images[row]
        h, w = image.shape[:2]
        scale = rng.integers(input_config.train_scale_min, input_config.train_scale_max + 1)
        size = int(np.clip(round(crop * min(h, w) / scale), 1, min(h, w)))
        top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        window = torch.from_numpy(image[top : top + size, left : left + size])
        window = window.permute(2, 0, 1)[None].float()
        if input_config.random_flip and rng.random() < 0.5:
            window = window.flip(3)
        return functional.interpolate(window, (crop, crop), mode="bilinear", align_corners=False)

    def run(steps: int) -> None:
        for _ in range(steps):
            rows = next_rows()
            x = torch.cat([augmented(row) for row in rows])
            alpha = rng.normal(0.0, input_config.color_shift_std, (batch, 3)).astype(np.float32)
            shift = torch.from_numpy(255.0 * (alpha * eigvals) @ eigvecs.T).view(batch, 3, 1, 1)
            x = (x + shift - mean) / std
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), labels[rows])
            loss.backward()
            opt.step()
        loss.item()

    run(2)
    return run


def main(argv):
    del argv
    from vgg_jax import data, writers
    from vgg_jax.training import loop

    config = _CONFIG.value
    if _CIFAR_LIKE.value:
        write_cifar_like(_CIFAR_LIKE.value, _CIFAR_LIKE_TRAIN.value, _CIFAR_LIKE_TRAIN.value // 5)
        config.input.dataset = "image_folder"
        config.input.folder = _CIFAR_LIKE.value
        config.input.data_dir = os.path.join(_CIFAR_LIKE.value + "_tfds")
    if _IMAGE_SIZES.value == "imagenet":
        from vgg_jax.data import shapes

        shapes.SHORT_SIDE = (256, 400)  # stored sizes like ImageNet's (median about 500x375)
        config.input.data_dir = os.path.join(config.input.data_dir or ".", "imagenet_like")
    every = config.evals.every_epochs
    untimed = 1 + every
    epochs = _EPOCHS.value or untimed + 2 * every
    if epochs <= untimed or (epochs - untimed) % every:
        raise app.UsageError(f"--epochs={epochs}: not {untimed} + a multiple of {every}")
    config.schedule.num_epochs = epochs
    start = time.perf_counter()
    data.prepare(config)
    prepare_s = time.perf_counter() - start
    steps_per_epoch = data.steps_per_epoch(config)
    batch = config.input.batch_size
    run_bare = bare_step(config)
    cached = _uses_cache(config)
    run_torch = torch_loop(config) if _VS_PYTORCH.value else None
    torch_times: dict[int, tuple[float, float]] = {}  # len(ends) -> (wall, cpu) of one epoch

    # At each epoch's end the bare step runs one epoch's worth of steps: loop and step alternate
    # epoch by epoch, so a change of load on a shared machine hits both. Wall-clock and CPU time
    # (all threads of the process) are stamped around each bare segment and each validation.
    clock = lambda: (time.perf_counter(), time.process_time())  # noqa: E731
    ends: list[tuple[int, tuple, tuple, tuple]] = []  # (step, before bare, after bare, after all)
    validations: dict[int, tuple[float, float]] = {}
    write_scalars, run_validation = writers.MetricWriter.write_scalars, loop.run_validation

    def write_then_time_the_step(self, step, scalars):
        write_scalars(self, step, scalars)
        if "images_per_second" in scalars and step % steps_per_epoch == 0:
            before = clock()
            run_bare(steps_per_epoch)
            after = clock()
            if run_torch is not None:
                run_torch(steps_per_epoch)
                done = clock()
                torch_times[len(ends)] = (done[0] - after[0], done[1] - after[1])
            ends.append((step, before, after, clock()))

    def timed_validation(*args):
        before = clock()
        result = run_validation(*args)
        after = clock()
        validations[len(ends)] = (after[0] - before[0], after[1] - before[1])
        return result

    writers.MetricWriter.write_scalars = write_then_time_the_step
    loop.run_validation = timed_validation
    figures = []  # per measured epoch: loop (wall, cpu), validation (wall, cpu), bare (wall, cpu)
    root = tempfile.mkdtemp(prefix="bench_train_loop_")
    try:
        for r in range(_ROUNDS.value):
            workdir = os.path.join(root, f"round{r}")
            ends.clear()
            validations.clear()
            torch_times.clear()
            loop.train(config, workdir)
            shutil.rmtree(workdir)
            for k in range(untimed, len(ends)):
                (*_, previous), (_, before, after, _) = ends[k - 1], ends[k]
                loop_time = (before[0] - previous[0], before[1] - previous[1])
                bare_time = (after[0] - before[0], after[1] - before[1])
                validation = validations.get(k, (0.0, 0.0))
                figures.append((r, loop_time, validation, bare_time, torch_times.get(k)))
                print(
                    f"run {r + 1} epoch {k + 1}: "
                    + ", ".join(
                        f"{what} loop/step {bare_time[i] / loop_time[i]:.2f} "
                        f"({bare_time[i] / (loop_time[i] - validation[i]):.2f} without validation)"
                        for i, what in enumerate(("wall-clock", "CPU-time"))
                    )
                    + f", bare step {steps_per_epoch * batch / bare_time[0]:.0f} images/s"
                    + (
                        f", pytorch loop {steps_per_epoch * batch / torch_times[k][0]:.0f} images/s"
                        if k in torch_times
                        else ""
                    )
                    + f" | {machine.describe()}",
                    flush=True,
                )
    finally:
        writers.MetricWriter.write_scalars = write_scalars
        loop.run_validation = run_validation
        shutil.rmtree(root, ignore_errors=True)

    def median_ratio(i: int, without_validation: bool) -> float:
        """Over the runs, the median of (bare time summed) / (loop time summed), column ``i``
        (0 wall clock, 1 CPU time); the validations' time left out if asked."""
        ratios = []
        for r in range(_ROUNDS.value):
            rows = [f for f in figures if f[0] == r]
            bare = sum(f[3][i] for f in rows)
            spent = sum(f[1][i] - (f[2][i] if without_validation else 0.0) for f in rows)
            ratios.append(bare / spent)
        return statistics.median(ratios)

    images = steps_per_epoch * batch
    fields = [
        f"net={config.model.name} width={config.model.width:g} crop={config.input.crop_size}",
        f"batch={batch} dataset={config.input.dataset}",
        f"decoded_in_memory={cached}",
        f"steps/epoch={steps_per_epoch}, validation every {every} epochs,",
        f"epochs {untimed + 1}-{epochs} of {_ROUNDS.value} runs",
        f"loop_images/s median={statistics.median(images / f[1][0] for f in figures):.0f}",
        f"bare_step_images/s median={statistics.median(images / f[3][0] for f in figures):.0f}",
        "validation share of the loop's CPU time="
        f"{sum(f[2][1] for f in figures) / sum(f[1][1] for f in figures):.2f}",
        f"prepare_s={prepare_s:.0f}",
        f"machine={machine.describe()}",
    ]
    print(" ".join(fields))
    print("reproduce: python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(
        f"wall-clock loop/step: {median_ratio(0, False):.2f} "
        f"({median_ratio(0, True):.2f} without validation)"
    )
    print(
        f"CPU-time loop/step: {median_ratio(1, False):.2f} "
        f"({median_ratio(1, True):.2f} without validation)"
    )
    print(f"loop/step: {median_ratio(1, False):.2f}")
    if run_torch is not None:
        import torch

        for i, what in enumerate(("wall-clock", "CPU-time")):
            with_validation = statistics.median(t[i] / f[i] for _, f, _, _, t in figures)
            without = statistics.median(t[i] / (f[i] - v[i]) for _, f, v, _, t in figures)
            print(
                f"{what} loop/pytorch_loop: {with_validation:.2f} ({without:.2f} without "
                f"validation; torch {torch.__version__}, {torch.get_num_threads()} threads, "
                f"pytorch loop {statistics.median(images / t[0] for *_, t in figures):.0f} "
                "images/s)"
            )


def _uses_cache(config) -> bool:
    from vgg_jax.data import on_device

    return on_device.uses_decoded_cache(config)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
