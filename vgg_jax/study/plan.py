"""The study's config expanded into an ordered list of runs, each a plain training config.

A study config (``experiments/study.py``) holds ``base`` (one run's full training config), the
nets, seeds and training-scale settings of Table 3, how each net is initialised from net A
(section 3.1), extra ``arms`` (other initialisations or optimisers for some nets) and the nets to
fuse (Table 6). ``make_plan`` turns it into runs in an order that respects every dependency and
gives a study stopped early the most findings:

1. every net at the scale settings trained from scratch (small S), seed by seed, A first (B-E
   start from it): Table 3's first column over every seed;
2. the fused nets' fine-tunes (large S from small S, jittered from large) and their fusions:
   Tables 5 and 6;
3. the arms (section 3.1's inits);
4. the other nets' fine-tunes: the rest of Tables 3 and 4.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import ml_collections

from vgg_jax import models

MAIN_ARM = "paper"
INIT_MODES = ("none", "shallow", "fc")

# The keys of ``base`` that the plan sets for every run (``run_config``, ``_main_run``), and where
# a study takes each from instead: a ``base`` value for them would be silently replaced.
SCALE_KEY = "scale_settings.<S>."
PLAN_SETS = {
    "model.name": "nets",
    "seed": "seeds",
    "input.shuffle_seed": "seeds",
    "input.train_scale_min": SCALE_KEY + "train_scale",
    "input.train_scale_max": SCALE_KEY + "train_scale",
    "evals.single_scale": SCALE_KEY + "single_scale",
    "evals.multi_scales": SCALE_KEY + "multi_scales",
    "evals.methods": SCALE_KEY + "methods",
    "schedule.num_epochs": SCALE_KEY + "num_epochs",
    "optim.learning_rate": SCALE_KEY + "learning_rate",
    "init_from.mode": f"init_from_a or {SCALE_KEY}fine_tune_from",
    "init_from.workdir": f"init_from_a or {SCALE_KEY}fine_tune_from",
}


@dataclasses.dataclass
class Run:
    """One training run (or, with ``fusion``, one fused evaluation) of the study."""

    name: str  # e.g. "paper/D/jitter/seed1"
    arm: str
    net: str
    scale: str
    seed: int
    workdir: str
    config: ml_collections.ConfigDict
    depends_on: tuple[str, ...] = ()
    fusion: tuple[str, ...] = ()  # workdirs of the runs whose nets are fused (Table 6)

    @property
    def is_fusion(self) -> bool:
        return bool(self.fusion)


def run_name(arm: str, net: str, scale: str, seed: int) -> str:
    return f"{arm}/{net}/{scale}/seed{seed}"


def _check_names(what: str, names: Any, valid: Any) -> None:
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; valid: {sorted(valid)}")


def _check_listed_once(what: str, values: Any, may_be_empty: bool = False) -> None:
    """A value listed twice would be one run (one workdir) counted twice: a seed given twice
    doubled its run's weight in every paired verdict. An empty list plans a study of nothing."""
    values = list(values)
    twice = sorted({v for v in values if values.count(v) > 1}, key=str)
    if twice:
        raise ValueError(f"{what} lists {twice} more than once: {values}")
    if not values and not may_be_empty:
        raise ValueError(f"{what} is empty: the study would run nothing")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Any) -> None:
    """Sets nested values (``{"model": {"init": "glorot"}}``) in place; unknown keys fail."""
    for key, value in dict(overrides).items():
        if key not in config:
            raise ValueError(
                f"Unknown config key {key!r} in a study override; valid: {sorted(config)}"
            )
        if isinstance(config[key], ml_collections.ConfigDict):
            apply_overrides(config[key], value)
        else:
            config[key] = value


def ignored_base_overrides(study: ml_collections.ConfigDict, keys: Any) -> list[str]:
    """One line for each overridden key (``"base.optim.learning_rate"``) that the plan replaces
    in every run, naming the study key that sets it. ``--config.base.optim.learning_rate=0.005``
    trained every run at the scale settings' rates without a word."""
    lines = []
    for key in keys:
        owner = PLAN_SETS.get(key.removeprefix("base.")) if key.startswith("base.") else None
        if owner:
            where = owner.replace("<S>", "{" + ",".join(study.scales) + "}")
            lines.append(
                f"--config.{key} is set by the study's plan for every run, so it would be "
                f"ignored; set --config.{where} instead (docs/study.md)"
            )
    return lines


def _scale_setting(study: ml_collections.ConfigDict, scale: str) -> ml_collections.ConfigDict:
    return study.scale_settings[scale]


def run_config(
    study: ml_collections.ConfigDict, net: str, scale: str, seed: int, overrides: Any = None
) -> ml_collections.ConfigDict:
    """The training config of one run: ``base`` with the net, the seed and the scale setting."""
    config = copy.deepcopy(study.base)
    setting = _scale_setting(study, scale)
    config.model.name = net
    config.seed = seed
    config.input.shuffle_seed = seed
    config.input.train_scale_min, config.input.train_scale_max = setting.train_scale
    config.evals.single_scale = setting.single_scale
    config.evals.multi_scales = tuple(setting.multi_scales)
    config.evals.methods = tuple(setting.methods)
    config.schedule.num_epochs = setting.num_epochs
    config.optim.learning_rate = setting.learning_rate
    if overrides:
        apply_overrides(config, overrides)
    return config


def make_plan(study: ml_collections.ConfigDict, workdir: str) -> list[Run]:
    """Every run of the study in dependency order (see the module docstring)."""
    nets, scales = tuple(study.nets), tuple(study.scales)
    _check_names("study.nets", nets, models.LAYOUTS)
    _check_names("study.scales", scales, study.scale_settings)
    _check_names("study.arms", study.arms, study.arm_settings)
    for what, values in (("study.nets", nets), ("study.scales", scales)):
        _check_listed_once(what, values)
    _check_listed_once("study.seeds", study.seeds)
    _check_listed_once("study.arms", study.arms, may_be_empty=True)
    for net in nets:
        mode = study.init_from_a.get(net, "none")
        if mode not in INIT_MODES:
            raise ValueError(f"study.init_from_a[{net!r}]={mode!r}; valid: {list(INIT_MODES)}")
        if mode != "none" and "A" not in nets:
            raise ValueError(
                f"Net {net} starts from net A (study.init_from_a) but A is not in study.nets."
            )
    for index, scale in enumerate(scales):
        source = _scale_setting(study, scale).fine_tune_from
        if source and source not in scales[:index]:
            raise ValueError(
                f"Scale {scale!r} is fine-tuned from {source!r}, which must come before it in "
                f"study.scales {list(scales)}."
            )
    if study.fusion and study.fusion_scale not in scales:
        # Its runs would wait for nets never planned: the study trained every other run, then
        # stopped at the first fusion with a KeyError.
        raise ValueError(
            f"study.fusion_scale={study.fusion_scale!r} is not in study.scales {list(scales)}: "
            "the fused nets are trained at it. Set --config.fusion_scale to one of them, or "
            "--config.fusion='()'."
        )
    for key in ("fixed_scale", "jitter_scale"):
        # A name no scale setting has (a typo) gave the jittering finding no pairs, unsaid.
        if (name := study.findings[key]) not in study.scale_settings:
            raise ValueError(
                f"study.findings.{key}={name!r} is not a scale setting; valid: "
                f"{sorted(study.scale_settings)}."
            )
    from_scratch = [s for s in scales if not _scale_setting(study, s).fine_tune_from]
    fine_tuned = [s for s in scales if _scale_setting(study, s).fine_tune_from]
    fused_nets = {net for fused in study.fusion for net in fused}
    runs: list[Run] = []
    for scale in from_scratch:
        for seed in study.seeds:
            runs += [_main_run(study, workdir, net, scale, seed) for net in nets]
    first = [net for net in nets if net in fused_nets]
    rest = [net for net in nets if net not in fused_nets]
    for scale in fine_tuned:
        for seed in study.seeds:
            runs += [_main_run(study, workdir, net, scale, seed) for net in first]
    for seed in study.seeds:
        runs += [_fusion_run(study, workdir, tuple(fused), seed) for fused in study.fusion]
    for seed in study.seeds:
        for arm in study.arms:
            runs += _arm_runs(study, workdir, arm, seed)
    for scale in fine_tuned:
        for seed in study.seeds:
            runs += [_main_run(study, workdir, net, scale, seed) for net in rest]
    return runs


def _run_workdir(workdir: str, arm: str, net: str, scale: str, seed: int) -> str:
    return os.path.join(workdir, "runs", arm, net, scale, f"seed{seed}")


def _make_run(
    workdir: str,
    arm: str,
    net: str,
    scale: str,
    seed: int,
    config: ml_collections.ConfigDict,
    depends_on: tuple[str, ...] = (),
    fusion: tuple[str, ...] = (),
) -> Run:
    """A run named and placed (``runs/<arm>/<net>/<scale>/seed<k>``) by what it is."""
    run_workdir = _run_workdir(workdir, arm, net, scale, seed)
    name = run_name(arm, net, scale, seed)
    return Run(name, arm, net, scale, seed, run_workdir, config, depends_on, fusion)


def _main_run(study, workdir: str, net: str, scale: str, seed: int) -> Run:
    config = run_config(study, net, scale, seed)
    source_scale = _scale_setting(study, scale).fine_tune_from
    depends: tuple[str, ...] = ()
    if source_scale:  # the paper's scale fine-tune: every layer of the same net at the smaller S
        config.init_from.mode = "full"
        config.init_from.workdir = _run_workdir(workdir, MAIN_ARM, net, source_scale, seed)
        depends = (run_name(MAIN_ARM, net, source_scale, seed),)
    elif (mode := study.init_from_a.get(net, "none")) != "none":  # section 3.1: start from A
        config.init_from.mode = mode
        config.init_from.workdir = _run_workdir(workdir, MAIN_ARM, "A", scale, seed)
        depends = (run_name(MAIN_ARM, "A", scale, seed),)
    else:
        config.init_from.mode = "none"
    return _make_run(workdir, MAIN_ARM, net, scale, seed, config, depends)


def _arm_runs(study, workdir: str, arm: str, seed: int) -> list[Run]:
    """An arm trains some nets from scratch at some scales with ``overrides`` (e.g. Glorot's init,
    or Adam), to compare with the main arm's runs of the same net, scale and seed."""
    setting = study.arm_settings[arm]
    _check_names(f"study.arm_settings[{arm!r}].nets", setting.nets, models.LAYOUTS)
    _check_names(f"study.arm_settings[{arm!r}].scales", setting.scales, study.scale_settings)
    # An arm's runs are compared with the main arm's run of the same net, scale and seed: one
    # the study does not plan left them trained for nothing (its finding "too few runs").
    for what, values, planned in (
        ("nets", setting.nets, study.nets),
        ("scales", setting.scales, study.scales),
    ):
        if missing := [v for v in values if v not in planned]:
            raise ValueError(
                f"Arm {arm!r} trains {what} {missing}, which study.{what} {list(planned)} does "
                f"not: nothing to compare them with. Add them to study.{what}, or leave the arm "
                "out of study.arms."
            )
    runs = []
    for scale in setting.scales:
        if _scale_setting(study, scale).fine_tune_from:
            raise ValueError(f"Arm {arm!r} trains from scratch; scale {scale!r} is a fine-tune.")
        for net in setting.nets:
            config = run_config(study, net, scale, seed, setting.overrides)
            config.init_from.mode = "none"
            runs.append(_make_run(workdir, arm, net, scale, seed, config))
    return runs


def _fusion_run(study, workdir: str, fused: tuple[str, ...], seed: int) -> Run:
    """Table 6: the nets' multi-scale softmax averaged, at the study's ``fusion_scale``."""
    scale = study.fusion_scale
    _check_names("study.fusion nets", fused, study.nets)
    names = tuple(run_name(MAIN_ARM, net, scale, seed) for net in fused)
    workdirs = tuple(_run_workdir(workdir, MAIN_ARM, net, scale, seed) for net in fused)
    first = run_config(study, fused[0], scale, seed)
    first.evals.fusion_workdirs = workdirs[1:]
    label = "+".join(fused)
    return _make_run(workdir, "fusion", label, scale, seed, first, names, workdirs)
