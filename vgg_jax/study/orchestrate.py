"""``--mode=study``: every run of the plan in its own sub-workdir, then the report.

Each run trains with the library's ``train`` (which resumes from the run's newest checkpoint) and
is evaluated with ``run_evaluation`` (``results.json`` in the run's workdir); a fusion run
evaluates its nets together (Table 6). A run is finished when its ``study_run.json`` exists,
written last and atomically, and its ``results.json`` reads, so a finished run is skipped and a
run stopped at any point (even by SIGKILL) is taken up again: training from its checkpoint,
evaluation from the start. The report is rewritten after every run, so the tables always show
what is done so far. One study holds a workdir at a time (``train.lock``).

Each run records, when it starts (``study_run_started.json``) and when it finishes
(``study_run.json``), the config of every run its result rests on: its own and, transitively,
those of the runs it starts from (a large-S net's small-S source, B-E's net A, a fusion's nets).
A rerun whose plan differs from a run's record in any of them is refused before anything runs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
from absl import logging
from flax import traverse_util

from vgg_jax import writers
from vgg_jax.configs import paper
from vgg_jax.study import plan, report

DONE_FILE = "study_run.json"
STARTED_FILE = "study_run_started.json"  # written before a run executes: what it is made with
PLOT_EVERY_RUNS = 5  # the tables are rewritten after every run, the plots after every 5th


class Interrupted(RuntimeError):
    """Training stopped before its last step (a SIGTERM): the run is left unfinished."""


class ChangedStudyError(ValueError):
    """Finished runs were made with another config than the study now plans for them."""


class SourceGoneError(FileNotFoundError):
    """A finished run that others still start from (or fuse) has lost its checkpoints."""


# Where things are, not what is computed: a study moved to another disk is the same study.
_PATH_KEYS = (
    "input.data_dir",
    "input.manual_dir",
    "input.index_dir",
    "init_from.workdir",
    "evals.fusion_workdirs",  # which nets are fused is in the run's name
)


# Keys only a run's final evaluation reads (not its training, nor the per-epoch validation that
# drives the plateau rule): a finished run recorded with other values is evaluated again from its
# checkpoint, not refused (which asked for a retraining), and a run resting on it is unchanged.
EVALUATION_ONLY_KEYS = frozenset(
    {
        "evals.multi_scales",
        "evals.methods",
        "evals.multi_crop_grid",
        "evals.checkpoint",
        "evals.accept_checkpoint_net",
        "evals.poll_seconds",
        "evals.watch_timeout_seconds",
    }
)


def is_finished(run: plan.Run) -> bool:
    """Marked finished, with the results it finished with: a run whose ``results.json`` was
    deleted or damaged since is evaluated again (its training resumes at its last step)."""
    return os.path.exists(os.path.join(run.workdir, DONE_FILE)) and _results_readable(run)


def _results_readable(run: plan.Run) -> bool:
    try:
        with open(os.path.join(run.workdir, report.RESULTS_FILE)) as f:
            json.load(f)
    except (OSError, ValueError):  # missing, unreadable, or not JSON (cut short, edited)
        return False
    return True


def _write_record(run: plan.Run, name: str, record: dict[str, Any]) -> None:
    os.makedirs(run.workdir, exist_ok=True)
    with writers.atomic_open(os.path.join(run.workdir, name)) as f:
        json.dump(record, f)


def _mark_started(run: plan.Run, lineage: dict[str, dict[str, Any]]) -> None:
    _write_record(run, STARTED_FILE, dict(name=run.name, started=time.time(), lineage=lineage))


def _mark_finished(
    run: plan.Run, seconds: float, lineage: dict[str, dict[str, Any]] | None = None
) -> None:
    record = dict(name=run.name, seconds=seconds, finished=time.time(), config=_flat_config(run))
    if lineage is not None:
        record["lineage"] = lineage
    _write_record(run, DONE_FILE, record)


def lineage(run: plan.Run, by_name: dict[str, plan.Run]) -> dict[str, dict[str, Any]]:
    """``{run name: flat config}`` of ``run`` and of every run it starts from, transitively: a
    jittered net rests on its large-S net, which rests on its small-S net (and that on net A)."""
    out: dict[str, dict[str, Any]] = {}
    todo = [run]
    while todo:
        current = todo.pop()
        if current.name not in out:
            out[current.name] = _flat_config(current)
            todo += [by_name[name] for name in current.depends_on]
    return out


def _flat_config(run: plan.Run) -> dict[str, Any]:
    """The run's config as ``{"group.key": value}`` in JSON's types, paths left out."""
    flat = traverse_util.flatten_dict(json.loads(run.config.to_json_best_effort()), sep=".")
    return {key: value for key, value in flat.items() if key not in _PATH_KEYS}


def _recorded_lineage(run: plan.Run) -> tuple[dict[str, dict[str, Any]], bool] | None:
    """What a finished or started run recorded it rests on, and whether that includes its
    sources; None if it recorded nothing (not started, or finished before runs recorded their
    config)."""
    for name in (DONE_FILE, STARTED_FILE):
        try:
            with open(os.path.join(run.workdir, name)) as f:
                record = json.load(f)
        except FileNotFoundError:
            continue
        if "lineage" in record:
            return record["lineage"], True
        if record.get("config") is not None:  # finished before runs recorded their sources
            return {run.name: record["config"]}, False
        return None
    return None


def _differences(
    recorded: dict[str, Any], now: dict[str, Any], ignored: frozenset[str] = frozenset()
) -> list[str]:
    keys = sorted(
        k
        for k in recorded.keys() | now.keys()
        if k not in ignored and paper.recorded_value(recorded, k) != paper.recorded_value(now, k)
    )
    shown = [f"{k} {recorded.get(k)!r} -> {now.get(k)!r}" for k in keys[:3]]
    return shown + ["..."] if len(keys) > 3 else shown


def check_finished_runs(runs: list[plan.Run]) -> list[tuple[plan.Run, list[str]]]:
    """Raises ``ChangedStudyError`` naming the finished or started runs whose recorded config
    differs from the one the study now plans (a changed epoch count, scale or recipe), or that
    rest on a run that did (a large-S net fine-tuned from a small-S net of another learning rate,
    even once that net is deleted to be redone): their results would be reported under the new
    settings without having been made with them.

    Returns the finished runs whose config differs in ``EVALUATION_ONLY_KEYS`` alone, with the
    differences: their training stands, their evaluation is to be made again (``_run_study``)."""
    from vgg_jax import checkpoint

    by_name = {run.name: run for run in runs}
    changed, evaluate_again = [], []
    for run in runs:
        if (found := _recorded_lineage(run)) is None:
            continue
        recorded, with_sources = found
        now = lineage(run, by_name)
        if not with_sources:
            now = {run.name: now[run.name]}
        own = recorded.get(run.name, {})
        if shown := _differences(own, now[run.name], EVALUATION_ONLY_KEYS):
            changed.append(f"{run.name} ({', '.join(shown)})")
            continue
        # Its sources are checked whatever its own evaluation settings: a run evaluated again
        # keeps its training, so one resting on a changed source is refused as before.
        if set(recorded) != set(now):
            was, will = (sorted(set(names) - {run.name}) for names in (recorded, now))
            changed.append(f"{run.name} (started from {was}, now from {will})")
            continue
        source_changes = [
            f"{run.name} (its source {name}: {', '.join(shown)})"
            for name in sorted(set(now) - {run.name})
            if (shown := _differences(recorded[name], now[name], EVALUATION_ONLY_KEYS))
        ]
        if source_changes:
            changed.append(source_changes[0])
        elif (shown := _differences(own, now[run.name])) and os.path.exists(
            os.path.join(run.workdir, DONE_FILE)
        ):
            if run.is_fusion or checkpoint.available_steps(run.workdir):
                evaluate_again.append((run, shown))
            else:  # trained again from scratch, not evaluated again: said, not done
                changed.append(
                    f"{run.name} ({', '.join(shown)}; its checkpoints are gone, so it cannot "
                    "be evaluated again)"
                )
    if changed:
        raise ChangedStudyError(
            f"{len(changed)} finished or started runs were made with another config than this "
            f"one: {'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}. Use a new "
            "--workdir for the new settings, or delete those runs' directories to redo them "
            "here."
        )
    return evaluate_again


def run_seconds(run: plan.Run) -> float | None:
    try:
        with open(os.path.join(run.workdir, DONE_FILE)) as f:
            return float(json.load(f)["seconds"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def cost_units(run: plan.Run) -> float:
    """A rough relative cost, for the ETA: epochs times weight layers, plus evaluation."""
    if run.is_fusion:
        return 10.0 * len(run.fusion)
    from vgg_jax import models

    layers = sum(1 for block in models.LAYOUTS[run.net] for s in block if s != models.LRN) + 3
    evals = len(set(run.config.evals.multi_scales) | {run.config.evals.single_scale})
    evals *= len(run.config.evals.methods)
    return run.config.schedule.num_epochs * layers + 5.0 * evals


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def execute(run: plan.Run) -> None:
    """Trains and evaluates one run (or evaluates one fusion) into ``run.workdir``."""
    from vgg_jax.evaluation import report as eval_report
    from vgg_jax.evaluation import runner

    if run.is_fusion:
        rows, about = runner.evaluate_checkpoints(run.config, run.fusion[0], "latest")
        eval_report.write_results(run.workdir, rows, about)
        return
    from vgg_jax import data, preemption
    from vgg_jax.training import loop, optim

    try:
        state = loop.train(run.config, run.workdir)
    except loop.NonFiniteLossError as e:
        # Its hint, optim.learning_rate, is not a study's knob: each run's rate is its scale
        # setting's (base.optim.learning_rate is replaced by it), or an arm's override.
        knob = f"--config.scale_settings.{run.scale}.learning_rate"
        if run.arm != plan.MAIN_ARM:
            knob += f" (or --config.arm_settings.{run.arm}.overrides)"
        raise loop.NonFiniteLossError(
            f"Study run {run.name}: {e} In the study the rate is {knob}; then delete "
            f"{run.workdir} to start that run again."
        ) from None
    total_steps = optim.total_steps(
        run.config.schedule.num_epochs, data.steps_per_epoch(run.config)
    )
    # A SIGTERM during the last step's save, or while a run with nothing left to train started
    # up, ends training at its last step: it still stops the study (before, the evaluation ran,
    # the run was marked finished and the next run trained as if no signal had come).
    if int(state.step) < total_steps or preemption.stopped():
        why = " by a termination signal" if preemption.stopped() else ""
        raise Interrupted(
            f"{run.name} stopped{why} at step {int(state.step)} of {total_steps}, not evaluated."
        )
    runner.run_evaluation(run.config, run.workdir)


def check_sources_kept(todo: list[plan.Run], by_name: dict[str, plan.Run]) -> None:
    """Raises ``SourceGoneError`` naming each finished run whose checkpoints are gone while a run
    left to do still reads them: a fine-tune or B-E not yet started (``init_from``), or a fusion.
    Before, the study trained everything before it, then stopped with a training's hint ("train
    it first (--mode=train)") for a directory the study itself manages."""
    from vgg_jax import checkpoint

    gone: dict[str, list[str]] = {}
    for run in todo:
        if not run.is_fusion and checkpoint.available_steps(run.workdir):
            continue  # resumes from its own checkpoint: its source was read already
        for name in run.depends_on:
            source = by_name[name]
            if is_finished(source) and not checkpoint.available_steps(source.workdir):
                gone.setdefault(name, []).append(run.name)
    if gone:
        lines = [
            f"{name} (in {by_name[name].workdir}; needed by {', '.join(needers[:2])}"
            f"{', ...' if len(needers) > 2 else ''})"
            for name, needers in gone.items()
        ]
        raise SourceGoneError(
            f"{len(gone)} finished runs have no checkpoint left, and runs still to do start "
            f"from or fuse them: {'; '.join(lines[:3])}{'; ...' if len(lines) > 3 else ''}. "
            "Delete those runs' directories to train them again (same config and seed), or "
            "restore their checkpoints/."
        )


def _check_dependencies(run: plan.Run, by_name: dict[str, plan.Run]) -> None:
    missing = [name for name in run.depends_on if not is_finished(by_name[name])]
    if missing:
        raise RuntimeError(f"Run {run.name} needs {missing} finished first.")


def run_study(study: ml_collections.ConfigDict, workdir: str, executor=execute) -> dict[str, Any]:
    """Runs every unfinished run of ``study`` in plan order, writing the report after each;
    returns the report's data (``study.json``). ``executor`` is replaced by tests."""
    from vgg_jax import compile_cache
    from vgg_jax.training import lock

    # One study per workdir (``lock.WorkdirBusyError`` names the other): a second one evaluated
    # each run (and fusion) again while the first did, and raced it on the report's files.
    with lock.hold(workdir), compile_cache.workdir_cache(workdir):
        return _run_study(study, workdir, executor)


def _run_study(study: ml_collections.ConfigDict, workdir: str, executor) -> dict[str, Any]:
    runs = plan.make_plan(study, workdir)
    by_name = {run.name: run for run in runs}
    evaluate_again = check_finished_runs(runs)  # before study_config.json is overwritten
    for run, _ in evaluate_again:
        os.remove(os.path.join(run.workdir, DONE_FILE))  # results.json stays until replaced
    if evaluate_again:
        names = [run.name for run, _ in evaluate_again]
        _progress(
            f"study: {len(names)} finished runs were evaluated with other evaluation settings "
            f"({', '.join(evaluate_again[0][1])}): evaluating them again from their checkpoints, "
            f"their training kept ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        )
    report.collect(runs)  # a finished run's damaged results.json is named before a run trains
    os.makedirs(workdir, exist_ok=True)
    with writers.atomic_open(os.path.join(workdir, "study_config.json")) as f:
        f.write(study.to_json_best_effort(indent=2))
    todo = [run for run in runs if not is_finished(run)]
    check_sources_kept(todo, by_name)
    for run in todo:
        if os.path.exists(os.path.join(run.workdir, DONE_FILE)):
            _progress(
                f"study: {run.name} has no readable {report.RESULTS_FILE}: evaluating it again"
            )
    units_left = sum(cost_units(run) for run in todo)
    logging.info(
        "study: %d runs, %d finished already, %d to run, in %s",
        len(runs),
        len(runs) - len(todo),
        len(todo),
        workdir,
    )
    start = time.time()
    spent_units = 0.0
    for index, run in enumerate(runs, start=1):
        if is_finished(run):
            continue
        _check_dependencies(run, by_name)
        elapsed = time.time() - start
        eta = (
            f"about {_format_seconds(elapsed / spent_units * units_left)} left"
            if spent_units
            else "time left known after the first run"
        )
        _progress(f"study: run {index}/{len(runs)} {run.name} ({eta})")
        run_lineage = lineage(run, by_name)
        _mark_started(run, run_lineage)
        run_start = time.time()
        try:
            executor(run)
        except Interrupted as stop:
            _progress(f"study: {stop} Rerun the same command to resume.")
            report.write_report(study, runs, workdir)
            raise
        seconds = time.time() - run_start
        _mark_finished(run, seconds, run_lineage)
        units_left -= cost_units(run)
        spent_units += cost_units(run)
        _progress(f"study: run {index}/{len(runs)} {run.name} done in {_format_seconds(seconds)}")
        report.write_report(study, runs, workdir, plots=index % PLOT_EVERY_RUNS == 0)
    data = report.write_report(study, runs, workdir)
    _progress(
        f"study: all {len(runs)} runs finished; this invocation took "
        f"{_format_seconds(time.time() - start)}; report in {os.path.join(workdir, 'study.md')}"
    )
    return data


def _progress(line: str) -> None:
    """Progress goes to the console whatever the log level, and to the log."""
    print(line, flush=True)
    logging.info(line)
