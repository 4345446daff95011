"""Training: the loop around the jitted steps (section 3.1 of the paper).

The loop resumes from the newest checkpoint in the workdir. Everything that decides the next step
is in the checkpoint: parameters, momentum, the step (which also fixes the input pipeline's position
and the dropout RNG, ``fold_in(seed, step)``) and the plateau rule's state. So a run killed at any
point and restarted continues bitwise as if never stopped.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from vgg_jax import (
    checkpoint,
    compile_cache,
    conventions,
    models,
    preemption,
    processes,
    sharding,
    writers,
)
from vgg_jax.configs import paper
from vgg_jax.evaluation import report
from vgg_jax.training import init_from, lock, optim
from vgg_jax.training.steps import (
    TrainState,
    abstract_train_state,
    compile_ahead,
    create_train_state,
    make_train_step,
    make_validation_step,
    shardings_of,
)

# The per-epoch validation batches stay on the device across epochs up to this size.
VALIDATION_CACHE_BYTES = 1 << 30


class NonFiniteLossError(RuntimeError):
    """The state after a step (loss, parameters or optimiser state) holds a NaN or inf."""


def _sum(sums: list[dict[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(sums)
    return {k: float(np.sum([s[k] for s in host])) for k in host[0]}


def _summarise(totals: dict[str, float], prefix: str) -> dict[str, float]:
    """Loss and accuracies; no top-5 accuracy for 5 classes or fewer (always 1: no figure)."""
    count = max(totals["count"], 1.0)
    scalars = {
        f"{prefix}loss": totals["loss_sum"] / count,
        f"{prefix}top1_accuracy": totals["top1_correct"] / count,
    }
    if "top5_correct" in totals:
        scalars[f"{prefix}top5_accuracy"] = totals["top5_correct"] / count
    return scalars


def _error_text(scalars: dict[str, float], accuracy: str) -> str:
    """``12.34%`` from the accuracy named ``accuracy``, ``n/a`` where it was not measured."""
    value = scalars.get(accuracy)
    return report.error_text(None if value is None else 100 * (1 - value), "%")


def run_validation(validation_step, params, batches) -> dict:
    """Dense evaluation at the single test scale over ``batches`` (global, on the mesh)."""
    totals = _sum([validation_step(params, batch) for batch in batches])
    return {**_summarise(totals, "val_"), "val_images": totals["count"]}


def _prepare_data_once(config: ml_collections.ConfigDict) -> None:
    """Process 0 prepares the dataset first, so processes sharing a filesystem do not race;
    then the processes check that they read the same data (``processes.check_same_data``)."""
    from vgg_jax import data

    if jax.process_count() == 1:
        data.prepare(config)
        return
    # Each step ends in a collective that every process reaches, a failed one too
    # (processes.agreed): a process that failed alone left the others waiting in the next one.
    first = jax.process_index() == 0
    processes.agreed("Preparing the dataset", lambda: data.prepare(config) if first else None)
    processes.agreed("Preparing the dataset", lambda: None if first else data.prepare(config))
    processes.check_same_data(config)


def _check_config(config: ml_collections.ConfigDict, num_classes: int) -> None:
    optim.check_schedule(config.schedule)
    if config.model.num_classes != num_classes:
        raise ValueError(
            f"model.num_classes={config.model.num_classes} but dataset {config.input.dataset!r} "
            f"has {num_classes} classes; set --config.model.num_classes={num_classes}."
        )


# Config values that shape the parameters or the optimiser's state: a checkpoint made with other
# values cannot be resumed (its arrays have other shapes or another structure).
STATE_SHAPING_KEYS = (
    "input.crop_size",  # FC1 reads the last map of a crop: its kernel's shape
    "model.name",
    "model.num_classes",
    "model.width",
    "model.fc_width",
    "optim.name",
)


def check_resumable(saved_config: dict, config: ml_collections.ConfigDict, where: str) -> None:
    """Compares the config a checkpoint was trained with to the one resuming it: every value
    changed is named in one warning (a changed shuffle seed changes the data order from here on;
    a changed learning rate or epoch count is a choice), and a change of the net or the optimiser
    fails at once in one line, before Orbax would report every step as unreadable, as does a
    change of the batch size (a step is a number of batches: the epoch, the data position and the
    schedule it stands for would all move)."""
    saved = traverse_util.flatten_dict(saved_config, sep=".")
    now = traverse_util.flatten_dict(checkpoint.jsonable(config.to_dict()), sep=".")
    changed = sorted(
        k
        for k in saved.keys() | now.keys()
        if paper.recorded_value(saved, k) != paper.recorded_value(now, k)
    )
    if not changed:
        return
    described = {k: f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed}
    if "input.batch_size" in changed:
        raise checkpoint.IncompatibleCheckpointError(
            f"{where} counts its steps in batches of {saved.get('input.batch_size')}; with "
            f"batches of {now.get('input.batch_size')} its step would be another epoch and "
            "another place in the data, the schedule and the validations. Resume with "
            f"input.batch_size={saved.get('input.batch_size')}, or start another --workdir from "
            "this one's weights (init_from.mode=full)."
        )
    if shaping := [described[k] for k in changed if k in STATE_SHAPING_KEYS]:
        raise checkpoint.IncompatibleCheckpointError(
            f"{where} was trained with another net or optimiser ({'; '.join(shaping)}): "
            "its checkpoints cannot be resumed with this config. Use another --workdir "
            "(config.init_from starts a net from a trained one's weights)."
        )
    logging.warning(
        "Resuming %s with a config that differs from the one it was trained with: %s.",
        where,
        "; ".join(described.values()),
    )


def check_same_data(
    saved_meta: dict, class_names: list[str] | None, input_convention: dict, where: str
) -> None:
    """A checkpoint resumed on a dataset whose class list changed (a class folder renamed, added
    or removed: every later label moves) would go on training each output on another class: an
    error naming the first class that differs. A changed mean (images added or removed) only
    warns: the run keeps the checkpoint's input convention."""
    if difference := checkpoint.class_difference(saved_meta.get("class_names"), class_names):
        raise checkpoint.IncompatibleCheckpointError(
            f"{where} was trained on other classes than the dataset now has ({difference}): "
            "resuming would train each output on another class. Restore the dataset, or start "
            "another --workdir (init_from.mode=full copies the weights, then the classes must "
            "match too)."
        )
    # A run started from init_from's source feeds the source's convention (``_source_convention``):
    # its dataset's own is recorded beside it, and that is what a changed dataset changes.
    saved = saved_meta.get("data_convention") or saved_meta.get("input_convention")
    if saved and saved != checkpoint.jsonable(input_convention):
        logging.warning(
            "The training data's mean RGB has changed since %s was saved (%s then, %s now): "
            "the run goes on with the input convention it was trained with.",
            where,
            saved.get("mean"),
            input_convention.get("mean"),
        )


def warn_if_the_plateau_rule_cannot_act(config: ml_collections.ConfigDict) -> None:
    """One warning when the run has too few validations for the plateau rule to divide the
    rate (the first sets the best; ``plateau_patience`` more without a better one divide it)."""
    if config.schedule.kind != "plateau":
        return
    validations = int(config.schedule.num_epochs) // int(config.evals.every_epochs)
    needed = int(config.schedule.plateau_patience) + 1
    if validations < needed:
        logging.warning(
            "%g epochs with a validation every %d: %d validations, and the plateau rule needs %d "
            "to divide the learning rate, so it stays %g throughout.",
            config.schedule.num_epochs,
            config.evals.every_epochs,
            validations,
            needed,
            config.optim.learning_rate,
        )


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config`` into ``workdir`` (resuming from its newest checkpoint that reads) and
    returns the final state. Validation runs every ``evals.every_epochs`` epochs and drives the
    plateau rule. Fails at once if another trainer holds the workdir (``lock.WorkdirBusyError``)."""
    with lock.hold(workdir), compile_cache.workdir_cache(workdir) as cache_dir:
        return _train(config, workdir, cache_dir)


def _train(config: ml_collections.ConfigDict, workdir: str, cache_dir: str) -> TrainState:
    from vgg_jax import data

    started = time.perf_counter()
    mesh = sharding.make_mesh(config.mesh)
    model = models.build_model(config.model, config.input.crop_size)
    tx = optim.make_optimizer(config.optim)
    _, abstract_state = abstract_train_state(model, tx, mesh)
    train_step = make_train_step(model, tx, mesh, shardings_of(abstract_state), config.seed)
    step_compiled = compile_ahead(
        train_step, abstract_state, mesh, config.input.batch_size, config.input.crop_size
    )
    # TensorFlow loads from here on (7-9 s of one core on a 2-core CPU), beside the compilation.
    from vgg_jax.data import on_device

    _prepare_data_once(config)
    info = data.dataset_info(config)
    _check_config(config, info.num_classes)
    # What the net sees, saved with every checkpoint: evaluation applies this, not its own config.
    input_convention = data.trained_convention(info.mean_rgb, config.input)
    data_convention = input_convention  # the dataset's own, compared on resuming
    steps_per_epoch = data.steps_per_epoch(config)
    total_steps = optim.total_steps(config.schedule.num_epochs, steps_per_epoch)
    warn_if_the_plateau_rule_cannot_act(config)
    phase = time.perf_counter()
    state, shardings = create_train_state(model, tx, mesh, config.seed)
    logging.info("Initialised the net's state in %.1f s.", time.perf_counter() - phase)
    checkpoints = checkpoint.Checkpointer(workdir, config.ckpt.keep, config.ckpt.keep_best)
    plateau = optim.PlateauState()
    best_top1 = -math.inf  # the best validation top-1 saved so far (ckpt.keep_best)

    if (saved := checkpoints.latest_meta()) is not None:
        where = f"step {saved[0]} in {workdir}"
        if "config" in saved[1]:
            check_resumable(saved[1]["config"], config, where)
        check_same_data(saved[1], info.class_names, input_convention, where)
        # The net goes on seeing its inputs as it did: the mean of a folder that gained images
        # since has moved, but the net's first layer was trained on the old one.
        input_convention = saved[1].get("input_convention") or input_convention
    if (restored := checkpoints.restore_latest(state.params, state.opt_state)) is not None:
        latest, params, opt_state, meta = restored
        state = TrainState(jax.device_put(jnp.int32(latest), shardings.step), params, opt_state)
        plateau = optim.PlateauState.from_dict(meta.get("plateau"))
        if meta.get("best_val_top1") is not None:
            best_top1 = meta["best_val_top1"]
        logging.info("Resumed from step %d in %s.", latest, workdir)
    else:
        params, source_convention = init_from.initialise(
            config.init_from, state.params, config.model.name, info.class_names
        )
        state = state.replace(params=params)
        input_convention = _source_convention(source_convention, input_convention, config)

    validation_step = make_validation_step(model, mesh, shardings.params)
    stop = preemption.StopSignal()
    start_step = int(state.step)
    writer = writers.MetricWriter(workdir, resume_step=start_step)
    if start_step >= total_steps:
        (logging.warning if start_step > total_steps else logging.info)(
            "%s is at step %d of this config's %d (%g epochs): nothing to train.",
            workdir,
            start_step,
            total_steps,
            config.schedule.num_epochs,
        )
    batches = on_device.train_batches(config, start_step, mesh, input_convention=input_convention)
    validation_batches = on_device.EvalBatchCache(
        config,
        config.evals.single_scale,
        mesh,
        VALIDATION_CACHE_BYTES,
        config.evals.validation_examples,
        config.evals.validation_bucket_step,
        input_convention,
    )
    phase = time.perf_counter()
    step_compiled()
    if (waited := time.perf_counter() - phase) > 1:
        logging.info("Waited %.1f s for the train step's compilation.", waited)
    pending: list[dict[str, jax.Array]] = []
    last_log = rate_from = time.perf_counter()
    untimed_images = 0  # the first step's: its time is start-up's (compiling, decoding the data)

    def log_interval(done: int, lr: float) -> None:
        """The train metrics of the steps since the last line: metrics.jsonl, TensorBoard, and
        the console's line."""
        nonlocal pending, last_log, rate_from, untimed_images
        _ensure_finite(pending, done, checkpoints, workdir)
        totals = _sum(pending)
        now = time.perf_counter()
        scalars = _summarise(totals, "train_")
        scalars["learning_rate"] = lr
        if timed := totals["count"] - untimed_images:
            scalars["images_per_second"] = timed / (now - rate_from)
        else:  # an interval of the first step alone: start-up is all there is to time
            scalars["images_per_second"] = totals["count"] / (now - last_log)
        pending, last_log, rate_from, untimed_images = [], now, now, 0
        writer.write_scalars(done, scalars)
        _log_progress(done, total_steps, steps_per_epoch, scalars, config.input.batch_size)

    def save(step: int, validation: dict[str, float] | None = None) -> None:
        _ensure_finite(pending, step, checkpoints, workdir)  # steps since the last log line
        meta = {
            "config": config.to_dict(),
            "plateau": plateau.to_dict(),
            "data": {"next_step": step, "shuffle_seed": config.input.shuffle_seed},
            "validation": validation,
            "best_val_top1": None if math.isinf(best_top1) else best_top1,
            "input_convention": input_convention,
            "data_convention": data_convention,
            "class_names": info.class_names,  # predict names classes without the dataset
            "final": step >= total_steps,  # the schedule's end: a continuous evaluator stops
        }
        best = (
            None
            if validation is None
            else {checkpoint.BEST_METRIC: validation["val_top1_accuracy"]}
        )
        checkpoints.save(step, state.params, state.opt_state, checkpoint.jsonable(meta), best)

    try:
        for step in range(start_step, total_steps):
            lr = optim.learning_rate(
                step, plateau, config.optim.learning_rate, config.schedule, steps_per_epoch
            )
            batch = next(batches)
            state, sums = train_step(state, batch, np.float32(lr))
            if step == start_step:
                jax.block_until_ready(sums)
                logging.info(
                    "First step done %.1f s after start-up began (compiled or loaded from %s).",
                    time.perf_counter() - started,
                    cache_dir,
                )
                # The rate and time left count from here: with the start-up in it, the first
                # line of a resumed demo said 11.6 img/s and 3m29s left, with 2 s left.
                rate_from, untimed_images = time.perf_counter(), config.input.batch_size
            pending.append(sums)
            checkpoints.check()  # a failed asynchronous save stops the run now
            done = step + 1
            epoch_end = done % steps_per_epoch == 0
            if done % config.log_every_steps == 0 or epoch_end or done == total_steps:
                log_interval(done, lr)
            validation = None
            epoch = done // steps_per_epoch
            if epoch_end and epoch % config.evals.every_epochs == 0:
                phase = time.perf_counter()
                validation = run_validation(validation_step, state.params, validation_batches)
                validation_seconds = time.perf_counter() - phase
                plateau = optim.update_plateau(
                    plateau, validation["val_top1_accuracy"], config.schedule
                )
                writer.write_scalars(done, {**validation, "val_seconds": validation_seconds})
                logging.info(
                    "epoch %d validation on %d images: loss %.4f top-1 error %s top-5 error %s "
                    "(%.1f s)",
                    epoch,
                    validation["val_images"],
                    validation["val_loss"],
                    _error_text(validation, "val_top1_accuracy"),
                    _error_text(validation, "val_top5_accuracy"),
                    validation_seconds,
                )
            # A validation saves only a new best (the one ``ckpt.keep_best`` keeps): with Orbax's
            # fixed cost (about 0.2 s of CPU per save) a save after every validation of the demo
            # cost 6% of its training. Validations after the last save are replayed identically
            # on resuming, so the plateau rule's state needs no save of its own.
            new_best = (
                validation is not None
                and config.ckpt.keep_best
                and validation["val_top1_accuracy"] > best_top1
            )
            if new_best:
                best_top1 = validation["val_top1_accuracy"]
            stopping = stop.requested()
            if new_best or stopping or done % config.ckpt.every_steps == 0 or done == total_steps:
                save(done, validation)
            if stopping:
                if pending:  # the steps since the last line: logged, not lost with the process
                    log_interval(done, lr)
                logging.warning("Stopped at step %d after a termination signal.", done)
                break
        else:
            # A SIGTERM after the last step's check (during its save, or with nothing to
            # train) still stops what would follow: the evaluation of train_and_evaluate.
            stop.requested()
    finally:
        checkpoints.close()
        writer.close()
        if jax.process_count() == 1:
            stop.requested()  # one that came while the last save was written
        stop.restore()
    return state


def _source_convention(source: dict | None, own: dict, config: ml_collections.ConfigDict) -> dict:
    """The input convention of a run whose first conv comes from ``init_from``'s source: the
    source's (``source``), as a resumed run keeps its checkpoint's, since those weights were
    trained on inputs prepared that way (an imported torchvision or Keras net's differ from the
    paper's mean subtraction in range, std or channel order); a difference is named in a warning.
    ``own`` (this config's) when the source records none or no conv is copied."""
    if source is None:
        return own
    source = dict(conventions.checked(source))
    wanted = config.input.get("pixel_std")
    if wanted is not None and tuple(float(s) for s in wanted) != tuple(source["std"]):
        # As the evaluator refuses it (runner.check_convention), at start-up, not after training.
        raise checkpoint.NetMismatchError(
            f"init_from {config.init_from.workdir} was trained with input std {source['std']}, "
            f"the config sets input.pixel_std={tuple(wanted)}; the copied first conv is fed its "
            "source's input convention: drop the override (or set it to the source's value)."
        )
    if source != dict(conventions.checked(own)):
        logging.warning(
            "init_from %s copies the first conv of a net trained on inputs prepared as %s; this "
            "run feeds its net that convention, not its own dataset's (%s).",
            config.init_from.workdir,
            conventions.describe(source),
            conventions.describe(own),
        )
    return source


def _ensure_finite(
    sums: list[dict[str, jax.Array]],
    step: int,
    checkpoints: checkpoint.Checkpointer,
    workdir: str,
) -> None:
    """Stops before a NaN/inf state could be logged as progress or saved: ``sums`` are the steps
    up to ``step`` not yet checked, each with the step's own flag over its *new* state (so every
    saved checkpoint is finite, and the newest one is the last good state)."""
    flags = jax.device_get([s["nonfinite_steps"] for s in sums])
    bad = [i for i, flag in enumerate(flags) if flag]
    if not bad:
        return
    first_bad = step - len(sums) + 1 + bad[0]
    checkpoints.wait()
    last_good = checkpoints.latest_step()
    where = (
        f"the last good checkpoint is step {last_good} in {workdir}"
        if last_good is not None
        else f"no checkpoint was saved in {workdir}"
    )
    raise NonFiniteLossError(
        f"The training state (loss, parameters or optimiser state) is NaN or infinite after "
        f"step {first_bad}; stopped without saving it, and {where}. Lower "
        "optim.learning_rate or check the input."
    )


def _log_progress(
    step: int, total: int, steps_per_epoch: int, scalars: dict[str, float], batch_size: int
) -> None:
    """The console's line per interval, in the same terms as the validation line and the
    evaluation tables (top-k error, not accuracy), with the time left at the interval's rate."""
    steps_per_second = scalars["images_per_second"] / batch_size
    eta = writers.format_duration((total - step) / steps_per_second) if steps_per_second else "?"
    logging.info(
        "step %d/%d epoch %.2f | loss %.4f top-1 error %s top-5 error %s | lr %.2e | "
        "%.1f img/s | %s left",
        step,
        total,
        step / steps_per_epoch,
        scalars["train_loss"],
        _error_text(scalars, "train_top1_accuracy"),
        _error_text(scalars, "train_top5_accuracy"),
        scalars["learning_rate"],
        scalars["images_per_second"],
        eta,
    )
