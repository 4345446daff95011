"""Training: the jitted, sharded SGD step and the loop around it (section 3.1 of the paper).

The loop resumes from the newest checkpoint in the workdir. Everything that decides the next step
is in the checkpoint: parameters, momentum, the step (which also fixes the input pipeline's position
and the dropout RNG, ``fold_in(seed, step)``) and the plateau rule's state. So a run killed at any
point and restarted continues bitwise as if never stopped.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from vgg_jax import checkpoint, init_from, metrics, models, optim, sharding, writers
from vgg_jax.evaluation import methods


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


class NonFiniteLossError(RuntimeError):
    pass


def create_train_state(
    model: models.VGG, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, TrainState]:
    """A fresh state created directly in its shardings; returns ``(state, shardings)``."""
    size = model.crop_size

    def init(rng):
        params = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    rng = jax.random.key(seed)
    abstract = jax.eval_shape(init, rng)
    shardings = TrainState(
        sharding.replicated(mesh),
        sharding.param_shardings(mesh, abstract.params),
        sharding.param_shardings(mesh, abstract.opt_state),
    )
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def make_train_step(
    model: models.VGG,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    seed: int,
):
    """``step(state, batch, lr) -> (state, sums)``: one SGD step over the global batch.

    ``sums`` holds the batch's summed loss and top-1/top-5 hits (summed, so logging can average
    over any number of steps exactly). The state's buffers are donated.
    """

    def train_step(state: TrainState, batch: dict[str, jax.Array], lr: jax.Array):
        dropout_rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_fn(params):
            logits = model.apply(
                {"params": params}, batch["image"], train=True, rngs={"dropout": dropout_rng}
            )
            losses = metrics.cross_entropy(logits, batch["label"])
            return losses.mean(), (logits, losses)

        grads, (logits, losses) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(
            lambda p, u: p - lr * u.astype(p.dtype), state.params, updates
        )
        sums = {"loss_sum": losses.sum(), **metrics.classification_counts(logits, batch["label"])}
        return TrainState(state.step + 1, params, opt_state), sums

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=cpu_compiler_options(),
    )


def cpu_compiler_options() -> dict[str, str] | None:
    """On CPU, turns off XLA's YNNPACK convolution fusion for the train step: its kernel-gradient
    convolutions run 4-13x slower than the forward ones, and without it the VGG16 step is 1.4-1.5x
    faster (bench/train_step.py, docs/performance.md). Experimental option: re-measure on jaxlib
    upgrades."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


def make_validation_step(model: models.VGG, mesh: Mesh, param_shardings: Any):
    """``step(params, batch) -> sums``: dense evaluation at one test scale (no flip), the cheap
    per-epoch validation that drives the plateau rule: the evaluator's dense method at one scale.
    Padded examples (``mask``) count nowhere."""

    def validation_step(params, batch):
        scores = methods.dense_scores(model, params, batch["image"], batch["size"])
        mask = batch["mask"]
        losses = metrics.cross_entropy(scores, batch["label"]) * mask
        return {
            "loss_sum": losses.sum(),
            **metrics.classification_counts(scores, batch["label"], mask),
        }

    return jax.jit(
        validation_step,
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def _sum(sums: list[dict[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(sums)
    return {k: float(np.sum([s[k] for s in host])) for k in host[0]}


def _summarise(totals: dict[str, float], prefix: str) -> dict[str, float]:
    count = max(totals["count"], 1.0)
    return {
        f"{prefix}loss": totals["loss_sum"] / count,
        f"{prefix}top1_accuracy": totals["top1_correct"] / count,
        f"{prefix}top5_accuracy": totals["top5_correct"] / count,
    }


def validate(config: ml_collections.ConfigDict, validation_step, params, mesh: Mesh) -> dict:
    from vgg_jax import data

    sums = [
        validation_step(params, sharding.global_batch(batch, mesh))
        for batch in data.eval_batches(config, config.evals.single_scale)
    ]
    return _summarise(_sum(sums), "val_")


class _StopSignal:
    """Remembers a SIGTERM (preemption) so the loop can checkpoint and exit between steps."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.received = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _prepare_data_once(config: ml_collections.ConfigDict) -> None:
    """Process 0 prepares the dataset first, so processes sharing a filesystem do not race."""
    from vgg_jax import data

    if jax.process_index() == 0:
        data.prepare(config)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("vgg_jax: data prepared")
        if jax.process_index() != 0:
            data.prepare(config)


def _check_config(config: ml_collections.ConfigDict, num_classes: int) -> None:
    optim.validate_schedule(config.schedule)
    if config.model.num_classes != num_classes:
        raise ValueError(
            f"model.num_classes={config.model.num_classes} but dataset {config.input.dataset!r} "
            f"has {num_classes} classes; set --config.model.num_classes={num_classes}."
        )


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config`` into ``workdir`` (resuming from its newest checkpoint) and returns the
    final state. Validation runs every ``evals.every_epochs`` epochs and drives the plateau rule."""
    from vgg_jax import data

    _prepare_data_once(config)
    info = data.dataset_info(config)
    _check_config(config, info.num_classes)
    steps_per_epoch = data.steps_per_epoch(config)
    total_steps = int(config.schedule.num_epochs * steps_per_epoch)
    mesh = sharding.make_mesh(config.mesh)
    model = models.build_model(config.model, config.input.crop_size)
    tx = optim.make_optimizer(config.optim)
    state, shardings = create_train_state(model, tx, mesh, config.seed)
    checkpoints = checkpoint.Checkpointer(workdir, config.ckpt.keep, config.ckpt.keep_best)
    plateau = optim.PlateauState()

    if (latest := checkpoints.latest_step()) is not None:
        params, opt_state, meta = checkpoints.restore(latest, state.params, state.opt_state)
        state = TrainState(jax.device_put(jnp.int32(latest), shardings.step), params, opt_state)
        plateau = optim.PlateauState.from_dict(meta.get("plateau"))
        logging.info("Resumed from step %d in %s.", latest, workdir)
    else:
        state = state.replace(params=init_from.initial_params(config.init_from, state.params))

    train_step = make_train_step(model, tx, mesh, shardings, config.seed)
    validation_step = make_validation_step(model, mesh, shardings.params)
    writer = writers.MetricWriter(workdir)
    stop = _StopSignal()
    start_step = int(state.step)
    batches = data.train_batches(config, start_step)
    pending: list[dict[str, jax.Array]] = []
    last_log = time.perf_counter()

    def save(step: int, validation: dict[str, float] | None = None) -> None:
        meta = {
            "config": config.to_dict(),
            "plateau": plateau.to_dict(),
            "data": {"next_step": step, "shuffle_seed": config.input.shuffle_seed},
            "validation": validation,
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
            batch = sharding.global_batch(next(batches), mesh)
            state, sums = train_step(state, batch, np.float32(lr))
            pending.append(sums)
            done = step + 1
            epoch_end = done % steps_per_epoch == 0
            if done % config.log_every_steps == 0 or epoch_end or done == total_steps:
                totals = _sum(pending)
                now = time.perf_counter()
                scalars = _summarise(totals, "train_")
                scalars["learning_rate"] = lr
                scalars["images_per_second"] = totals["count"] / (now - last_log)
                pending, last_log = [], now
                _ensure_finite(scalars["train_loss"], done, checkpoints, workdir)
                writer.write_scalars(done, scalars)
                _log_progress(done, total_steps, steps_per_epoch, scalars, config.input.batch_size)
            validation = None
            epoch = done // steps_per_epoch
            if epoch_end and epoch % config.evals.every_epochs == 0:
                validation = validate(config, validation_step, state.params, mesh)
                plateau = optim.update_plateau(
                    plateau, validation["val_top1_accuracy"], config.schedule
                )
                writer.write_scalars(done, validation)
                logging.info(
                    "epoch %d validation: loss %.4f top-1 error %.2f%% top-5 error %.2f%%",
                    epoch,
                    validation["val_loss"],
                    100 * (1 - validation["val_top1_accuracy"]),
                    100 * (1 - validation["val_top5_accuracy"]),
                )
            stopping = stop.received or _preempted(done)
            if validation or stopping or done % config.ckpt.every_steps == 0 or done == total_steps:
                _ensure_finite(float(sums["loss_sum"]), done, checkpoints, workdir)
                save(done, validation)
            if stopping:
                logging.warning("Stopped at step %d after a termination signal.", done)
                break
    finally:
        checkpoints.close()
        writer.close()
        stop.restore()
    return state


def _ensure_finite(
    loss: float, step: int, checkpoints: checkpoint.Checkpointer, workdir: str
) -> None:
    """Stops before a NaN/inf state could be logged as progress or saved over a good checkpoint."""
    if not math.isfinite(loss):
        checkpoints.wait()
        raise NonFiniteLossError(
            f"Training loss is {loss} at step {step}; stopped without saving. The last good "
            f"checkpoint is step {checkpoints.latest_step()} in {workdir}; lower "
            "optim.learning_rate or check the input."
        )


def _preempted(step: int) -> bool:
    """Across processes, a SIGTERM must stop every process at the same step; the JAX preemption
    sync point (set up by ``jax.distributed``) agrees on one. On one process the signal suffices."""
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils

    return multihost_utils.reached_preemption_sync_point(step)


def _log_progress(
    step: int, total: int, steps_per_epoch: int, scalars: dict[str, float], batch_size: int
) -> None:
    """The console's line per interval, in the same terms as the validation line and the
    evaluation tables (top-k error, not accuracy), with the time left at the interval's rate."""
    steps_per_second = scalars["images_per_second"] / batch_size
    eta = writers.format_duration((total - step) / steps_per_second) if steps_per_second else "?"
    logging.info(
        "step %d/%d epoch %.2f | loss %.4f top-1 error %.2f%% top-5 error %.2f%% | lr %.2e | "
        "%.1f img/s | %s left",
        step,
        total,
        step / steps_per_epoch,
        scalars["train_loss"],
        100 * (1 - scalars["train_top1_accuracy"]),
        100 * (1 - scalars["train_top5_accuracy"]),
        scalars["learning_rate"],
        scalars["images_per_second"],
        eta,
    )
