"""The paper's findings as paired comparisons over seeds, and their verdicts.

Each finding compares two sets of runs that differ in one thing (the net, the init, the training
scale, the test method), paired by seed (and by net or scale where a finding pools several). For
pairs ``(x, y)`` the difference is ``d = error(x) - error(y)``; with ``n`` pairs, ``SE = std(d) /
sqrt(n)``. A finding of kind ``lower`` (the paper: y's error is lower) is *reproduced* when
``mean(d) > 2 SE``, *not reproduced* when ``mean(d) < -2 SE`` and *within noise* otherwise. A
finding of kind ``no_gain`` (the paper: y is no better than x, e.g. LRN) is *reproduced* unless y
is better beyond noise (``mean(d) > 2 SE``). A finding whose every run is still at chance
(``chance_threshold``) is *nets at chance*: two nets that learned nothing tie, and a no-gain
finding (LRN) read as reproduced. Verdicts are computed here, never typed by hand.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# A run's figures: {"dense@single": top-1 error %, ...}, keyed by run name in ``Results``.
Results = dict[str, dict[str, float]]
Z = 2.0  # the verdict's threshold in standard errors

REPRODUCED, NOT_REPRODUCED, WITHIN_NOISE, TOO_FEW, AT_CHANCE = (
    "reproduced",
    "not reproduced",
    "within noise",
    "too few runs",
    "nets at chance",
)


def chance_threshold(num_classes: int) -> float:
    """The top-1 error (%) below which a net has left chance: 1.5x chance's accuracy, error
    < 100 (1 - 1.5 / K) %, e.g. 85% for 10 classes."""
    return 100.0 * (1.0 - 1.5 / num_classes)


@dataclasses.dataclass(frozen=True)
class Finding:
    key: str
    claim: str  # what the paper found, in words
    paper: str  # the paper's own figures behind it
    kind: str  # "lower" or "no_gain"
    # (study, results) -> [(label, error of x, error of y)] for every complete pair
    pairs: Callable[[Any, Results], list[tuple[str, float, float]]]


def verdict(kind: str, differences: Sequence[float]) -> tuple[str, float, float]:
    """``(verdict, mean, standard error)`` of the paired differences ``error(x) - error(y)``."""
    d = np.asarray(differences, np.float64)
    if d.size < 2:
        return TOO_FEW, float(d.mean()) if d.size else math.nan, math.nan
    mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))
    beyond = abs(mean) > Z * se
    if kind == "lower":
        if beyond:
            return (REPRODUCED if mean > 0 else NOT_REPRODUCED), mean, se
        return WITHIN_NOISE, mean, se
    if kind == "no_gain":
        return (NOT_REPRODUCED if beyond and mean > 0 else REPRODUCED), mean, se
    raise ValueError(f"Unknown finding kind {kind!r}; valid: ['lower', 'no_gain']")


def _name(arm: str, net: str, scale: str, seed: int) -> str:
    return f"{arm}/{net}/{scale}/seed{seed}"


def compare(
    arm_x: str,
    arm_y: str,
    metric: str,
    triples: Callable[[Any], Sequence[tuple[str, str, str]]],
):
    """Pairs of runs: for every ``(net_x, net_y, scale)`` of ``triples(study)`` and every seed,
    run ``arm_x/net_x/scale`` against ``arm_y/net_y/scale``. Runs not yet finished are left out
    (a study still running gives verdicts on what it has)."""

    def pairs(study, results: Results):
        out = []
        for net_x, net_y, scale in triples(study):
            for seed in study.seeds:
                ex = results.get(_name(arm_x, net_x, scale, seed), {}).get(metric)
                ey = results.get(_name(arm_y, net_y, scale, seed), {}).get(metric)
                if ex is not None and ey is not None:
                    label = net_x if net_x == net_y else f"{net_x} vs {net_y}"
                    out.append((f"{label} {scale} seed{seed}", ex, ey))
        return out

    return pairs


def _present(study, *nets: str) -> bool:
    return all(n in study.nets for n in nets)


def _each_scale(a: str, b: str):
    return lambda study: [(a, b, s) for s in study.scales] if _present(study, a, b) else []


def _same_run(metric_x: str, metric_y: str, scales: Callable[[Any], Sequence[str]]):
    """Pairs of two figures of the same main-arm run (e.g. single- vs multi-scale testing)."""

    def pairs(study, results: Results):
        out = []
        for scale in scales(study):
            for net in study.nets:
                for seed in study.seeds:
                    r = results.get(_name("paper", net, scale, seed), {})
                    if metric_x in r and metric_y in r:
                        out.append((f"{net} {scale} seed{seed}", r[metric_x], r[metric_y]))
        return out

    return pairs


def _jitter_vs_fixed(study, results: Results):
    """Table 3: the jittered net (tested at its single Q) against the same net trained at the
    fixed large S (tested at its Q), for every net."""
    fixed, jitter = study.findings.fixed_scale, study.findings.jitter_scale
    if fixed not in study.scales or jitter not in study.scales:
        return []
    out = []
    for net in study.nets:
        for seed in study.seeds:
            rx = results.get(_name("paper", net, fixed, seed), {})
            ry = results.get(_name("paper", net, jitter, seed), {})
            if "dense@single" in rx and "dense@single" in ry:
                out.append((f"{net} seed{seed}", rx["dense@single"], ry["dense@single"]))
    return out


def _fusion_pairs(study, results: Results):
    """Table 6: the better of the fused nets alone against their fusion, same seed."""
    out = []
    for seed in study.seeds:
        for fused in study.fusion:
            label = "+".join(fused)
            r = results.get(_name("fusion", label, study.fusion_scale, seed), {})
            if "best_member@fusion" in r and "fused@fusion" in r:
                out.append((f"{label} seed{seed}", r["best_member@fusion"], r["fused@fusion"]))
    return out


def _arm_pairs(arm_x: str, arm_y: str):
    """The deep nets of arm ``arm_x`` against the same nets of arm ``arm_y``, where both ran."""

    def pairs(study, results: Results):
        if arm_x != "paper" and arm_x not in study.arms:
            return []
        if arm_y != "paper" and arm_y not in study.arms:
            return []
        arm = arm_x if arm_x != "paper" else arm_y
        setting = study.arm_settings[arm]
        nets = [(n, n, s) for s in setting.scales for n in setting.nets]
        return compare(arm_x, arm_y, "dense@single", lambda _: nets)(study, results)

    return pairs


FINDINGS: tuple[Finding, ...] = (
    Finding(
        "lrn",
        "LRN does not improve net A (A vs A-LRN)",
        "Table 3, S=256: A 29.6, A-LRN 29.7 top-1",
        "no_gain",
        compare("paper", "paper", "dense@single", _each_scale("A", "A-LRN")),
    ),
    Finding(
        "depth_a_b",
        "Error falls with depth: B (13 layers) below A (11)",
        "Table 3, S=256: A 29.6, B 28.7",
        "lower",
        compare("paper", "paper", "dense@single", _each_scale("A", "B")),
    ),
    Finding(
        "depth_b_d",
        "Error falls with depth: D (16 layers) below B (13)",
        "Table 3, S=256: B 28.7, D 27.0",
        "lower",
        compare("paper", "paper", "dense@single", _each_scale("B", "D")),
    ),
    Finding(
        "depth_a_e",
        "Error falls with depth: E (19 layers) below A (11)",
        "Table 3, S=256: A 29.6, E 27.3",
        "lower",
        compare("paper", "paper", "dense@single", _each_scale("A", "E")),
    ),
    Finding(
        "c_vs_d",
        "1x1 convs help less than 3x3: D below C",
        "Table 3: C 28.1 / 28.1 / 27.3, D 27.0 / 26.8 / 25.6",
        "lower",
        compare("paper", "paper", "dense@single", _each_scale("C", "D")),
    ),
    Finding(
        "small_filters",
        "A stack of small convs beats one large conv: B below B-5x5",
        "Section 4.1: B-5x5's top-1 7% higher than B's",
        "lower",
        compare("paper", "paper", "dense@single", _each_scale("B-5x5", "B")),
    ),
    Finding(
        "scale_jitter",
        "Scale jittering at training helps: jittered S below fixed large S",
        "Table 3: C/D/E 28.1/26.8/26.9 at S=384, 27.3/25.6/25.5 jittered",
        "lower",
        _jitter_vs_fixed,
    ),
    Finding(
        "multi_scale_test",
        "Multi-scale testing helps: dense over 3 Q below dense at one Q",
        "Tables 3-4: D 25.6 -> 24.8, E 25.5 -> 24.8 (jittered S)",
        "lower",
        _same_run("dense@single", "dense@multi", lambda study: study.scales),
    ),
    Finding(
        "dense_multicrop",
        "Multi-crop and dense are complementary: both below the better of the two",
        "Table 5: D 24.8 / 24.6 / 24.4, E 24.8 / 24.6 / 24.4",
        "lower",
        _same_run(
            "best_method@multi",
            "dense+multi_crop@multi",
            lambda study: [
                s for s in study.scales if "dense+multi_crop" in study.scale_settings[s].methods
            ],
        ),
    ),
    Finding(
        "fusion",
        "Fusing two nets helps (the paper: D and E): the fusion below the better of the two",
        "Table 6: D/E 24.4 alone, fused 23.7 (dense + multi-crop)",
        "lower",
        _fusion_pairs,
    ),
    Finding(
        "a_init",
        "Deep nets need a good start: A-initialised below random N(0, 0.01^2)",
        "Section 3.1: B-E initialised from net A",
        "lower",
        _arm_pairs("random", "paper"),
    ),
    Finding(
        "glorot",
        "Glorot's init trains the deep nets without A: A-init no better than Glorot",
        "Section 3.1: 'possible to initialise the weights without pre-training' (Glorot)",
        "no_gain",
        _arm_pairs("glorot", "paper"),
    ),
)


def judge(study, results: Results) -> list[dict[str, Any]]:
    """One record per finding: pairs, mean difference, SE, verdict."""
    records = []
    chance = chance_threshold(int(study.base.model.num_classes))
    for finding in FINDINGS:
        pairs = finding.pairs(study, results)
        differences = [x - y for _, x, y in pairs]
        outcome, mean, se = verdict(finding.kind, differences)
        if pairs and outcome != TOO_FEW and all(min(x, y) >= chance for _, x, y in pairs):
            outcome = AT_CHANCE
        records.append(
            dict(
                key=finding.key,
                claim=finding.claim,
                paper=finding.paper,
                kind=finding.kind,
                verdict=outcome,
                mean_difference=mean,
                standard_error=se,
                pairs=len(pairs),
                mean_x=float(np.mean([x for _, x, _ in pairs])) if pairs else math.nan,
                mean_y=float(np.mean([y for _, _, y in pairs])) if pairs else math.nan,
                details=[dict(pair=label, x=x, y=y) for label, x, y in pairs],
            )
        )
    return records
