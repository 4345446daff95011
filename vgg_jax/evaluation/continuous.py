"""Continuous evaluation: watch a training workdir and evaluate each new checkpoint once.

Runs beside training as its own process (no optimiser state is read). Each evaluated step leaves
``<workdir>/eval/step_<N>.json`` and ``.md``; those files are also the record of what is done, so
a restarted watcher does not evaluate a step twice. The figures go to TensorBoard under
``<workdir>/eval/tensorboard`` (tags like ``dense_Q256-384-512/top1_error``) and to
``<workdir>/eval/metrics.jsonl``. Fusion workdirs are not used here: one net is being trained.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vgg_jax import checkpoint, preemption, processes, sharding, writers
from vgg_jax.evaluation import report, runner

EVAL_SUBDIR = "eval"
STEP_FILE = re.compile(r"^step_(\d+)\.json$")


def evaluated_steps(
    eval_dir: str, settings: dict[str, Any] | None = None, workdir: str | None = None
) -> set[int]:
    """Steps with a result file in ``eval_dir`` (with ``settings``: made with those evaluation
    settings, or recorded before results carried them; with ``workdir``: of the checkpoint now
    at that step, see ``_made_by_another_training``)."""
    if not os.path.isdir(eval_dir):
        return set()
    steps = set()
    for name in os.listdir(eval_dir):
        if not (m := STEP_FILE.match(name)):
            continue
        step = int(m.group(1))
        if settings is not None or workdir is not None:
            try:
                with open(os.path.join(eval_dir, name)) as f:
                    recorded = json.load(f)
            except (OSError, ValueError) as e:  # cut short by a kill before writes were atomic
                logging.warning("%s does not read (%s): evaluating its step again.", name, e)
                continue
            if settings is not None and recorded.get("settings") not in (None, settings):
                continue
            if workdir is not None and _made_by_another_training(workdir, step, recorded):
                continue
        steps.add(step)
    return steps


def _made_by_another_training(workdir: str, step: int, recorded: dict[str, Any]) -> bool:
    """Whether the checkpoint now at ``step`` is not the one ``recorded`` was evaluated on: a
    training started again in the same workdir (its checkpoints deleted, another config) saved
    the same step numbers, and the watcher skipped them all as evaluated, leaving the first
    training's tables as the second's. Results recorded before they carried ``trained_by``, and
    steps since deleted, count as the same."""
    checkpoints = recorded.get("checkpoints") or [{}]
    then = checkpoints[0].get("trained_by")
    if then is None or step not in checkpoint.available_steps(workdir):
        return False
    try:
        now = checkpoint.training_digest(checkpoint.read_meta(workdir, step))
    except (FileNotFoundError, ValueError):  # deleted by keep-last-K meanwhile
        return False
    return now != then


def _next_step(workdir: str, done: set[int], idle: bool) -> tuple[int | None, bool]:
    """The oldest committed, not yet evaluated step, and whether to stop waiting: the timeout
    passed (``idle``), or every step is evaluated and the newest is the training's last
    (``final`` in its meta: the schedule ended). Every process gets process 0's answers, so all
    of them enter the same collective computations and none waits for one that stopped."""
    steps = _listed_steps(workdir)
    pending = [s for s in steps if s not in done]
    finished = not pending and bool(steps) and _is_final(workdir, steps[-1])
    answer = np.array([pending[0] if pending else -1, idle or finished], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        answer = np.asarray(multihost_utils.broadcast_one_to_all(answer))
    step = int(answer[0])
    if step < 0 and finished and answer[1]:
        logging.info("Step %d is the training's last (schedule.num_epochs): stopping.", steps[-1])
    return (None if step < 0 else step), bool(answer[1])


def _listed_steps(workdir: str) -> list[int]:
    """``checkpoint.available_steps`` on every process or on none: Orbax's listing is a
    collective, and a process that does not see ``checkpoints/`` yet (the watcher started
    before training's first save, a file system that shows it a moment later) lists nothing
    without one, so the others' listing met its next collective and every process aborted.
    Until every process sees the directory, there is no step (logged)."""
    if jax.process_count() == 1:
        return checkpoint.available_steps(workdir)
    seen = processes.gather_json(os.path.isdir(checkpoint.checkpoints_directory(workdir)))
    if all(seen):
        return checkpoint.available_steps(workdir)
    if any(seen):
        logging.warning(
            "Processes %s do not see %s yet: waiting for every process to see it.",
            [index for index, found in enumerate(seen) if not found],
            checkpoint.checkpoints_directory(workdir),
        )
    return []


def _is_final(workdir: str, step: int) -> bool:
    try:
        return bool(checkpoint.read_meta(workdir, step).get("final", False))
    except (FileNotFoundError, ValueError):  # deleted by keep-last-K meanwhile
        return False


def _sleep(seconds: float) -> None:
    """Sleeps, checking for an agreed SIGTERM stop about every second: the same number of checks
    on every process, so all of them see the sync point at the same check."""
    slices = max(1, math.ceil(seconds))
    for _ in range(slices):
        if preemption.agreed_stop():
            raise preemption.Stopped
        time.sleep(seconds / slices)


def _scalars(rows: list[dict[str, Any]]) -> dict[str, float]:
    scalars = {}
    for row in rows:
        for metric in ("top1_error", "top5_error", "images_per_second"):
            if row[metric] is not None:  # top-5 of 5 classes or fewer: no figure
                scalars[report.scalar_name(row, metric)] = row[metric]
    return scalars


def watch(
    config: ml_collections.ConfigDict,
    workdir: str,
    poll_seconds: float | None = None,
    timeout: float | None = None,
    *,
    stop_after_step: int | None = None,
    batches: runner.BatchSource | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Evaluates every checkpoint of ``workdir`` not evaluated before, then each new one as it
    appears, checking every ``poll_seconds`` (default ``evals.poll_seconds``). Stops once
    ``timeout`` seconds (default ``evals.watch_timeout_seconds``) pass with no new checkpoint, once
    the training's last checkpoint (its schedule's end) is evaluated and no newer one exists, or
    after evaluating a step >= ``stop_after_step``. Returns the rows of each step evaluated here.

    A checkpoint that training deletes (keep-last-K) before it is read is skipped with a warning.
    On several processes a SIGTERM to any of them stops all of them (``vgg_jax.preemption``).
    """
    poll = config.evals.poll_seconds if poll_seconds is None else poll_seconds
    timeout = config.evals.watch_timeout_seconds if timeout is None else timeout
    eval_dir = os.path.join(workdir, EVAL_SUBDIR)
    same_training = evaluated_steps(eval_dir, workdir=workdir)
    if retrained := sorted(evaluated_steps(eval_dir) - same_training):
        logging.warning(
            "Steps %s of %s were evaluated on another training's checkpoints (their config, "
            "classes or input differ from the checkpoints there now): evaluating them again.",
            retrained,
            workdir,
        )
    done = evaluated_steps(eval_dir, runner.evaluation_settings(config), workdir)
    if other := sorted(same_training - done):
        logging.warning(
            "Steps %s of %s were evaluated with other settings (methods, scales, flip, grid or "
            "split): evaluating them again with these, replacing their results.",
            other,
            workdir,
        )
    if done:
        logging.info("Steps %s were evaluated with these settings already: skipped.", sorted(done))
    mesh = sharding.make_mesh(config.mesh)
    writer = writers.MetricWriter(eval_dir)
    results: dict[int, list[dict[str, Any]]] = {}
    last_new = time.monotonic()
    try:
        while True:
            if preemption.agreed_stop():
                raise preemption.Stopped
            step, idle = _next_step(workdir, done, time.monotonic() - last_new >= timeout)
            if step is None:
                if idle:
                    if time.monotonic() - last_new >= timeout:
                        logging.info(
                            "No new checkpoint in %s for %.0f s; stopping.", workdir, timeout
                        )
                    break
                _sleep(poll)
                continue
            try:
                rows, about = runner.evaluate_checkpoints(
                    config, workdir, step, batches=batches, fusion=False, mesh=mesh
                )
            except (FileNotFoundError, ValueError):
                if step in checkpoint.available_steps(workdir):
                    raise
                logging.warning("Checkpoint %d was deleted before it could be evaluated.", step)
                done.add(step)
                continue
            done.add(step)
            results[step] = rows
            last_new = time.monotonic()
            if jax.process_index() == 0:
                logging.info("Step %d:\n%s", step, report.format_table(rows))
                # step_N.json last: it marks the step evaluated, so a write that fails before it
                # (a full disk) leaves the step to evaluate again, its scalars not lost for good.
                writer.write_scalars(step, _scalars(rows))
                report.write_results(eval_dir, rows, about, name=f"step_{step}")
            if stop_after_step is not None and step >= stop_after_step:
                break
    except preemption.Stopped:
        logging.warning("Continuous evaluation stopped by a SIGTERM (all processes).")
    finally:
        writer.close()
    return results
