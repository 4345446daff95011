"""``study.md``, ``study.json`` and the PNG plots: the paper's tables in miniature beside its own.

Every figure is read back from the runs' own files (``results.json`` from the evaluator,
``metrics.jsonl`` from training), so the report can be rebuilt at any time from the workdir.
Means and standard deviations are over seeds; verdicts come from ``findings.judge``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vgg_jax import models, writers
from vgg_jax.evaluation import report as eval_report
from vgg_jax.study import findings, plan

# The paper's top-1 / top-5 error (%) for the columns our scale settings stand for (Tables 3-6).
PAPER_TABLE3 = {
    "256": {
        "A": (29.6, 10.4),
        "A-LRN": (29.7, 10.5),
        "B": (28.7, 9.9),
        "C": (28.1, 9.4),
        "D": (27.0, 8.8),
        "E": (27.3, 9.0),
    },
    "384": {"C": (28.1, 9.3), "D": (26.8, 8.7), "E": (26.9, 8.7)},
    "jitter": {"C": (27.3, 8.8), "D": (25.6, 8.1), "E": (25.5, 8.0)},
}
PAPER_TABLE4 = {
    "256": {"B": (28.2, 9.6), "C": (27.7, 9.2), "D": (26.6, 8.6), "E": (26.9, 8.7)},
    "384": {"C": (27.8, 9.2), "D": (26.5, 8.6), "E": (26.7, 8.6)},
    "jitter": {"C": (26.3, 8.2), "D": (24.8, 7.5), "E": (24.8, 7.5)},
}
PAPER_TABLE5 = {
    "D": {"dense": (24.8, 7.5), "multi_crop": (24.6, 7.5), "dense+multi_crop": (24.4, 7.2)},
    "E": {"dense": (24.8, 7.5), "multi_crop": (24.6, 7.4), "dense+multi_crop": (24.4, 7.1)},
}
PAPER_TABLE6 = {"dense": (24.0, 7.1), "multi_crop": (23.9, 7.2), "dense+multi_crop": (23.7, 6.8)}
# Tables 5 and 6 are of the jittered nets (S in [256; 512]) tested at Q = {256, 384, 512}, and
# Table 6 fuses D and E only: the paper has no figure for other nets, S or fusions.
PAPER_TABLE56_SCALE = "jitter"
PAPER_FUSED = ("D", "E")
METHOD_TITLES = {"dense": "dense", "multi_crop": "multi-crop", "dense+multi_crop": "both"}
ARM_TITLES = {
    "paper": "B-E from trained A (paper)",
    "random": "random N(0, 0.01^2)",
    "glorot": "Glorot",
    "adam": "Adam (not the paper's)",
}


RESULTS_FILE = f"{eval_report.RESULTS}.json"  # the evaluator's, in each run's workdir


class ResultsError(ValueError):
    """A finished run's ``results.json`` lacks the rows the study reads (edited by hand)."""


# ---------------------------------------------------------------------------------------- reading
def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def validation_curve(workdir: str) -> list[tuple[int, float]]:
    """``[(step, top-1 error %)]`` of the per-epoch validation; files from before resumed runs
    dropped their replayed steps' lines hold some steps twice: the last line of a step wins."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "val_top1_accuracy" in record:
                by_step[int(record["step"])] = 100.0 * (1.0 - record["val_top1_accuracy"])
    return sorted(by_step.items())


def steps_to_leave_chance(curve: list[tuple[int, float]], num_classes: int) -> int | None:
    """The first validation step whose top-1 error is below 1.5x chance's accuracy margin: error
    < 100 (1 - 1.5 / K) %, e.g. 85% for 10 classes. None if it never did."""
    threshold = findings.chance_threshold(num_classes)
    return next((step for step, error in curve if error < threshold), None)


def _rows_by(rows: list[dict], scales: Sequence[int]) -> dict[str, dict]:
    wanted = sorted(int(q) for q in scales)
    return {r["method"]: r for r in rows if sorted(r["test_scales"]) == wanted}


def run_figures(run: plan.Run) -> dict[str, float | None]:
    """A finished run's figures: ``{method}@single`` / ``{method}@multi`` top-1 error (and
    ``.../top5``), ``best_method@multi``, and for fusions ``fused@fusion`` and
    ``best_member@fusion``."""
    results = _read_json(os.path.join(run.workdir, RESULTS_FILE))
    evals = run.config.evals
    figures: dict[str, float] = {}
    if run.is_fusion:
        method = list(evals.methods)[-1]
        fused_rows = [r for r in results["rows"] if " & " in r["net"] and r["method"] == method]
        member_rows = [
            r
            for r in results["rows"]
            if " & " not in r["net"]
            and r["method"] == method
            and sorted(r["test_scales"]) == sorted(evals.multi_scales)
        ]
        figures["fused@fusion"] = fused_rows[-1]["top1_error"]
        figures["fused@fusion/top5"] = fused_rows[-1]["top5_error"]
        figures["best_member@fusion"] = min(r["top1_error"] for r in member_rows)
        for row in results["rows"]:
            if " & " in row["net"]:
                figures[f"{row['method']}@fusion"] = row["top1_error"]
                figures[f"{row['method']}@fusion/top5"] = row["top5_error"]
        return figures
    for where, scales in (("single", [evals.single_scale]), ("multi", evals.multi_scales)):
        for method, row in _rows_by(results["rows"], scales).items():
            figures[f"{method}@{where}"] = row["top1_error"]
            figures[f"{method}@{where}/top5"] = row["top5_error"]
    # The evaluator writes every method at both; a row missing (an edited file) left the run
    # out of its pairs and its table cells without a word, the means then over fewer seeds.
    wanted = [f"{method}@{where}" for method in evals.methods for where in ("single", "multi")]
    if missing := [key for key in wanted if not isinstance(figures.get(key), (int, float))]:
        raise KeyError(f"no rows (or no top-1 error) for {missing}")
    if "dense@multi" in figures and "multi_crop@multi" in figures:
        figures["best_method@multi"] = min(figures["dense@multi"], figures["multi_crop@multi"])
    curve = validation_curve(run.workdir)
    left = steps_to_leave_chance(curve, run.config.model.num_classes)
    figures["steps_to_leave_chance"] = left  # None: it never did
    figures["final_step"] = curve[-1][0] if curve else None
    return figures


def collect(runs: Sequence[plan.Run]) -> findings.Results:
    from vgg_jax.study import orchestrate

    collected = {}
    for run in runs:
        if orchestrate.is_finished(run):
            try:
                collected[run.name] = run_figures(run)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                path = os.path.join(run.workdir, RESULTS_FILE)
                raise ResultsError(
                    f"{path} lacks what the study reads from it ({type(e).__name__}: {e}); "
                    "delete it and rerun to evaluate the run again."
                ) from None
    return collected


# ---------------------------------------------------------------------------------------- tables
def _stats(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), std, len(values)


def _cell(values: list[float]) -> str:
    mean, std, n = _stats(values)
    if n == 0:
        return ""
    return f"{mean:.1f}" if n == 1 else f"{mean:.1f} ± {std:.1f}"


def _top1_top5(top1: str, top5: str) -> str:
    """A "top-1 / top-5" cell; top-5 is "n/a" where the runs had no top-5 figure (5 classes or
    fewer: every label is among the five best)."""
    return f"{top1} / {top5 or 'n/a'}" if top1 else ""


def _paper(pair: tuple[float, float] | None) -> str:
    return f"{pair[0]} / {pair[1]}" if pair else ""


def _seed_values(study, results, arm: str, net: str, scale: str, key: str) -> list[float]:
    names = [plan.run_name(arm, net, scale, seed) for seed in study.seeds]
    return [results[n][key] for n in names if n in results and key in results[n]]


def scale_title(study, scale: str) -> str:
    setting = study.scale_settings[scale]
    smin, smax = setting.train_scale
    s = str(smin) if smin == smax else f"[{smin};{smax}]"
    return f"{scale}: S={s}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table3(study, results, key: str, paper_figures: dict, section_4_1: bool = False) -> str:
    """Table 3 (``key`` a single-Q figure) or Table 4 (a multi-scale one). ``section_4_1``:
    B-5x5's paper cell is section 4.1's "B's + 7", a single-scale figure (none in Table 4)."""
    header = ["net", "weight layers"]
    for scale in study.scales:
        setting = study.scale_settings[scale]
        header += [f"{scale_title(study, scale)} top-1 / top-5", f"paper ({setting.paper})"]
    rows = []
    for net in study.nets:
        row = [net, str(weight_layers(net))]
        for scale in study.scales:
            top1 = _cell(_seed_values(study, results, "paper", net, scale, key))
            top5 = _cell(_seed_values(study, results, "paper", net, scale, key + "/top5"))
            paper = paper_figures.get(study.scale_settings[scale].paper, {}).get(net)
            if section_4_1 and net == "B-5x5" and study.scale_settings[scale].paper == "256":
                row += [_top1_top5(top1, top5), "B's + 7 (section 4.1)"]
            else:
                row += [_top1_top5(top1, top5), _paper(paper)]
        rows.append(row)
    return _table(header, rows)


def table5(study, results) -> str:
    scales = [s for s in study.scales if "dense+multi_crop" in study.scale_settings[s].methods]
    if not scales:
        return "(no scale setting evaluates multi-crop)"
    scale = scales[-1]
    methods = list(study.scale_settings[scale].methods)
    header = ["net"] + [f"{METHOD_TITLES.get(m, m)} top-1 / top-5" for m in methods]
    header += [f"paper ({' / '.join(METHOD_TITLES.get(m, m) for m in methods)}, top-1)"]
    jittered = study.scale_settings[scale].paper == PAPER_TABLE56_SCALE
    rows = []
    for net in study.nets:
        row = [net]
        for m in methods:
            top1 = _cell(_seed_values(study, results, "paper", net, scale, f"{m}@multi"))
            top5 = _cell(_seed_values(study, results, "paper", net, scale, f"{m}@multi/top5"))
            row.append(_top1_top5(top1, top5))
        paper = PAPER_TABLE5.get(net) if jittered else None
        row.append(" / ".join(str(paper[m][0]) for m in methods if m in paper) if paper else "")
        rows.append(row)
    return f"Training {scale_title(study, scale)}, multi-scale test.\n\n" + _table(header, rows)


def table6(study, results) -> str:
    rows = []
    for fused in study.fusion:
        label = "+".join(fused)
        names = [plan.run_name("fusion", label, study.fusion_scale, s) for s in study.seeds]
        done = [results[n] for n in names if n in results]
        methods = list(study.scale_settings[study.fusion_scale].methods)
        # The paper's figures only beside its own fusion: D and E, jittered (a fusion of A and
        # B showed Table 6's D & E figures as if the paper had fused A and B).
        as_paper = (
            sorted(fused) == sorted(PAPER_FUSED)
            and study.scale_settings[study.fusion_scale].paper == PAPER_TABLE56_SCALE
        )
        for m in methods:
            top1 = _cell([r[f"{m}@fusion"] for r in done if f"{m}@fusion" in r])
            top5 = _cell([r[f"{m}@fusion/top5"] for r in done if f"{m}@fusion/top5" in r])
            rows.append(
                [
                    " & ".join(fused),
                    METHOD_TITLES.get(m, m),
                    _top1_top5(top1, top5),
                    _paper(PAPER_TABLE6.get(m) if as_paper else None),
                ]
            )
        best = _cell([r["best_member@fusion"] for r in done if "best_member@fusion" in r])
        alone = [PAPER_TABLE5[net].get(methods[-1]) for net in PAPER_FUSED] if as_paper else []
        best_paper = None
        if alone and all(alone):  # the better of D and E alone (Table 5)
            best_paper = (min(p[0] for p in alone), min(p[1] for p in alone))
        rows.append(
            [
                f"better of {' or '.join(fused)} alone",
                METHOD_TITLES.get(methods[-1]),
                best,
                _paper(best_paper),
            ]
        )
    return _table(["nets", "method", "top-1 / top-5", "paper"], rows)


def init_table(study, results) -> str:
    """Section 3.1: the deep nets from random init, from A, from Glorot (and any other arm)."""
    arms = ["paper"] + [a for a in study.arms]
    nets = sorted({n for a in study.arms for n in study.arm_settings[a].nets}, key=weight_layers)
    scales = sorted({s for a in study.arms for s in study.arm_settings[a].scales})
    rows = []
    for scale in scales:
        for net in nets:
            for arm in arms:
                names = [plan.run_name(arm, net, scale, s) for s in study.seeds]
                done = [results[n] for n in names if n in results]
                if not done:
                    continue
                left_ok = [r["steps_to_leave_chance"] for r in done]
                left_ok = [v for v in left_ok if v is not None]
                steps = f"{np.mean(left_ok):.0f}" if left_ok else "never"
                rows.append(
                    [
                        net,
                        scale,
                        ARM_TITLES.get(arm, arm),
                        f"{steps} ({len(left_ok)}/{len(done)} left chance)",
                        _cell([r["dense@single"] for r in done]),
                    ]
                )
    header = [
        "net",
        "S",
        "initialisation / optimiser",
        "steps to leave chance",
        "final top-1 (dense, one Q)",
    ]
    return _table(header, rows)


def findings_table(records: list[dict], complete: bool = False) -> str:
    """``complete``: every run finished, so a finding without pairs has none in this study (its
    nets, scales or arms left out), not none finished yet."""
    rows = []
    for r in records:
        if r["pairs"]:
            ours = (
                f"{r['mean_x']:.1f} vs {r['mean_y']:.1f}: d = {r['mean_difference']:+.2f}"
                + (
                    f" ± {r['standard_error']:.2f} SE"
                    if not math.isnan(r["standard_error"])
                    else ""
                )
                + f" ({r['pairs']} pair{'s' if r['pairs'] != 1 else ''})"
            )
        else:
            ours = (
                "not in this study (no such runs planned)" if complete else "no finished pairs yet"
            )
        rows.append([r["claim"], r["paper"], ours, f"**{r['verdict']}**"])
    return _table(["finding", "paper", "miniature (top-1 %, x vs y; d = x - y)", "verdict"], rows)


def weight_layers(net: str) -> int:
    return sum(1 for block in models.LAYOUTS[net] for s in block if s != models.LRN) + 3


# ---------------------------------------------------------------------------------------- plots
DEPTH_SERIES = ("A", "B", "D", "E")  # 11, 13, 16, 19 weight layers: the line; others are marks


def plot_depth(study, results, path: str) -> None:
    """Top-1 error against weight layers, one line per S setting through A, B, D, E; A-LRN, B-5x5
    and C as unconnected marks beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, scale in enumerate(study.scales):
        colour = f"C{index}"
        points = []
        for net in study.nets:
            mean, std, n = _stats(_seed_values(study, results, "paper", net, scale, "dense@single"))
            if n:
                std = 0.0 if math.isnan(std) else std
                points.append((weight_layers(net) + 0.15 * index, mean, std, net))
        line = sorted(p for p in points if p[3] in DEPTH_SERIES)
        marks = [p for p in points if p[3] not in DEPTH_SERIES]
        if line:
            xs, ys, es, _ = zip(*line, strict=True)
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                marker="o",
                capsize=3,
                color=colour,
                label=scale_title(study, scale),
            )
        for x, y, e, name in marks:
            ax.errorbar([x], [y], yerr=[e], marker="s", capsize=3, color=colour, alpha=0.6)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("weight layers")
    ax.set_ylabel("top-1 error (%), dense, one test scale")
    ax.set_title("Error against depth (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(study, runs: Sequence[plan.Run], path: str) -> None:
    """Validation top-1 error against step: one panel per S setting and per arm, one colour per
    net; thin lines are seeds, the thick line their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("paper", s) for s in study.scales] + [(a, None) for a in study.arms]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    colours = {net: f"C{i}" for i, net in enumerate(study.nets)}
    for ax, (arm, scale) in zip(axes.flat, panels, strict=False):
        by_net: dict[str, list] = {}
        for run in runs:
            if run.arm != arm or run.is_fusion or (scale and run.scale != scale):
                continue
            curve = validation_curve(run.workdir)
            if curve:
                by_net.setdefault(run.net, []).append(dict(curve))
                steps, errors = zip(*curve, strict=True)
                ax.plot(steps, errors, color=colours.get(run.net, "k"), alpha=0.25, lw=0.8)
        for net, curves in by_net.items():
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [np.mean([c[step] for c in curves]) for step in steps]
            ax.plot(steps, mean, color=colours.get(net, "k"), lw=2, label=net)
        title = scale_title(study, scale) if scale else f"arm: {ARM_TITLES.get(arm, arm)}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("validation top-1 error (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- report
def write_report(
    study, runs: Sequence[plan.Run], workdir: str, plots: bool = True
) -> dict[str, Any]:
    """Writes ``study.md``, ``study.json`` and (``plots``) ``error_vs_depth.png`` and
    ``curves.png``."""
    from vgg_jax.study import orchestrate

    results = collect(runs)
    records = findings.judge(study, results)
    finished = [run for run in runs if run.name in results]
    seconds = [orchestrate.run_seconds(run) or 0.0 for run in finished]
    if plots:
        plot_depth(study, results, os.path.join(workdir, "error_vs_depth.png"))
        plot_curves(study, runs, os.path.join(workdir, "curves.png"))
    data = dict(
        runs_finished=len(finished),
        runs_total=len(runs),
        run_seconds_total=float(sum(seconds)),
        results=results,
        findings=records,
        seeds=list(study.seeds),
    )
    with writers.atomic_open(os.path.join(workdir, "study.json")) as f:
        json.dump(data, f, indent=1, default=float)
    md = render_markdown(study, results, records, len(finished), len(runs), sum(seconds))
    with writers.atomic_open(os.path.join(workdir, "study.md")) as f:
        f.write(md)
    return data


def render_markdown(study, results, records, finished: int, total: int, seconds: float) -> str:
    status = "complete" if finished == total else f"partial: {finished} of {total} runs finished"
    parts = [
        "# The paper's experiments in miniature",
        f"Runs: {status}; their training and evaluation took {seconds / 60:.1f} minutes. Top-1 / "
        f"top-5 validation error (%), mean ± std over seeds {list(study.seeds)}; the paper's "
        "figures (ImageNet, full size) beside them.",
        "## Findings",
        "Paired differences over seeds (d = error(x) - error(y)); reproduced when the paper's "
        f"direction holds beyond {findings.Z:g} standard errors.",
        findings_table(records, complete=finished == total),
        "## Table 3: single test scale (dense)",
        table3(study, results, "dense@single", PAPER_TABLE3, section_4_1=True),
        "![error against depth](error_vs_depth.png)",
        "## Table 4: multi-scale test (dense)",
        table3(study, results, "dense@multi", PAPER_TABLE4),
        "## Table 5: dense, multi-crop and both",
        table5(study, results),
        "## Table 6: fusion",
        f"Nets trained at {scale_title(study, study.fusion_scale)}, multi-scale test.\n\n"
        + table6(study, results),
        "## Section 3.1: how the deep nets start",
        init_table(study, results),
        "## Training curves",
        "![training curves](curves.png)",
    ]
    return "\n\n".join(parts) + "\n"
