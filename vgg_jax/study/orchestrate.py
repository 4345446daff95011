"""``--mode=study``: every run of the plan in its own sub-workdir, then the report.

Each run trains with the library's ``train`` (which resumes from the run's newest checkpoint) and
is evaluated with ``run_evaluation`` (``results.json`` in the run's workdir); a fusion run
evaluates its nets together (Table 6). A run is finished when its ``study_run.json`` exists,
written last and atomically, so a finished run is skipped and a run stopped at any point (even
by SIGKILL) is taken up again: training from its checkpoint, evaluation from the start. The
report is rewritten after every run, so the tables always show what is done so far.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
from absl import logging
from flax import traverse_util

from vgg_jax.configs import paper
from vgg_jax.study import plan, report

DONE_FILE = "study_run.json"
PLOT_EVERY_RUNS = 5  # the tables are rewritten after every run, the plots after every 5th


class Interrupted(RuntimeError):
    """Training stopped before its last step (a SIGTERM): the run is left unfinished."""


class ChangedStudyError(ValueError):
    """Finished runs were made with another config than the study now plans for them."""


# Where things are, not what is computed: a study moved to another disk is the same study.
_PATH_KEYS = (
    "input.data_dir",
    "input.manual_dir",
    "input.index_dir",
    "init_from.workdir",
    "evals.fusion_workdirs",  # which nets are fused is in the run's name
)


def is_finished(run: plan.Run) -> bool:
    return os.path.exists(os.path.join(run.workdir, DONE_FILE))


def _mark_finished(run: plan.Run, seconds: float) -> None:
    path = os.path.join(run.workdir, DONE_FILE)
    record = dict(name=run.name, seconds=seconds, finished=time.time(), config=_flat_config(run))
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def _flat_config(run: plan.Run) -> dict[str, Any]:
    """The run's config as ``{"group.key": value}`` in JSON's types, paths left out."""
    flat = traverse_util.flatten_dict(json.loads(run.config.to_json_best_effort()), sep=".")
    return {key: value for key, value in flat.items() if key not in _PATH_KEYS}


def check_finished_runs(runs: list[plan.Run]) -> None:
    """Raises ``ChangedStudyError`` naming the finished runs whose recorded config differs from
    the one the study now plans (a changed epoch count, scale or recipe): their results would
    be reported under the new settings without having been made with them."""
    changed = []
    for run in runs:
        try:
            with open(os.path.join(run.workdir, DONE_FILE)) as f:
                recorded = json.load(f).get("config")
        except FileNotFoundError:
            continue
        if recorded is None:  # finished before runs recorded their config
            continue
        now = _flat_config(run)
        keys = sorted(
            k
            for k in recorded.keys() | now.keys()
            if paper.recorded_value(recorded, k) != paper.recorded_value(now, k)
        )
        if keys:
            shown = ", ".join(f"{k} {recorded.get(k)!r} -> {now.get(k)!r}" for k in keys[:3])
            changed.append(f"{run.name} ({shown}{', ...' if len(keys) > 3 else ''})")
    if changed:
        raise ChangedStudyError(
            f"{len(changed)} finished runs were made with another config than this one: "
            f"{'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}. Use a new --workdir "
            "for the new settings, or delete those runs' directories to redo them here."
        )


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
    from vgg_jax.training import loop

    state = loop.train(run.config, run.workdir)
    total_steps = int(run.config.schedule.num_epochs * data.steps_per_epoch(run.config))
    # A SIGTERM during the last step's save, or while a run with nothing left to train started
    # up, ends training at its last step: it still stops the study (before, the evaluation ran,
    # the run was marked finished and the next run trained as if no signal had come).
    if int(state.step) < total_steps or preemption.stopped():
        raise Interrupted(f"{run.name} stopped at step {int(state.step)} of {total_steps}.")
    runner.run_evaluation(run.config, run.workdir)


def _check_dependencies(run: plan.Run, by_name: dict[str, plan.Run]) -> None:
    missing = [name for name in run.depends_on if not is_finished(by_name[name])]
    if missing:
        raise RuntimeError(f"Run {run.name} needs {missing} finished first.")


def run_study(study: ml_collections.ConfigDict, workdir: str, executor=execute) -> dict[str, Any]:
    """Runs every unfinished run of ``study`` in plan order, writing the report after each;
    returns the report's data (``study.json``). ``executor`` is replaced by tests."""
    from vgg_jax import compile_cache

    with compile_cache.workdir_cache(workdir):
        return _run_study(study, workdir, executor)


def _run_study(study: ml_collections.ConfigDict, workdir: str, executor) -> dict[str, Any]:
    runs = plan.make_plan(study, workdir)
    by_name = {run.name: run for run in runs}
    check_finished_runs(runs)  # before study_config.json is overwritten
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "study_config.json"), "w") as f:
        f.write(study.to_json_best_effort(indent=2))
    todo = [run for run in runs if not is_finished(run)]
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
        run_start = time.time()
        try:
            executor(run)
        except Interrupted as stop:
            _progress(f"study: {stop} Rerun the same command to resume.")
            report.write_report(study, runs, workdir)
            raise
        seconds = time.time() - run_start
        _mark_finished(run, seconds)
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
