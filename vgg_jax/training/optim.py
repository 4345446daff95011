"""The paper's optimiser and learning-rate rules (section 3.1).

Mini-batch SGD with momentum 0.9 and an L2 penalty of 5e-4 whose gradient (``wd * w``) is added to
the loss gradient before the momentum, as in Caffe, which the paper used. The penalty applies to
kernels, not biases. The paper does not say which (section 3.1: "weight decay (the L2 penalty
multiplier set to 5e-4)"), and its released Caffe models carry no training settings; a Caffe
solver's ``weight_decay`` is scaled per blob by the net definition's ``decay_mult``, which Caffe's
reference ImageNet nets (AlexNet, CaffeNet) set to 0 on biases. Those nets also give biases
``lr_mult: 2``; here biases learn at the kernels' rate.

The learning rate is a host-side number passed into the jitted step each call: the paper's rule
("divided by 10 when the validation set accuracy stopped improving", at most 3 times) depends on
validation results, which a traced schedule cannot see, and a scalar argument does not recompile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("plateau", "cosine", "constant")


def kernel_mask(params: Any) -> Any:
    """True for weight matrices and conv kernels, False for biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """L2 gradient on kernels, then the momentum trace (``sgd``, the paper's) or Adam's scaling
    (``adam``, an option for small nets); the step multiplies by ``-lr``."""
    name = optim_config.get("name", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optim.name {name!r}; valid: {list(OPTIMIZERS)}")
    direction = optax.trace(decay=optim_config.momentum) if name == "sgd" else optax.scale_by_adam()
    return optax.chain(
        optax.add_decayed_weights(optim_config.weight_decay, mask=kernel_mask), direction
    )


@dataclasses.dataclass
class PlateauState:
    """The plateau rule's memory; saved in each checkpoint's meta so a resumed run continues it."""

    best: float = -math.inf
    bad_epochs: int = 0
    decays: int = 0

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["best"] = self.best if math.isfinite(self.best) else None  # JSON has no -inf
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PlateauState:
        if not values:
            return cls()
        best = values.get("best")
        return cls(-math.inf if best is None else best, values["bad_epochs"], values["decays"])


def update_plateau(
    state: PlateauState, val_top1: float, schedule_config: ml_collections.ConfigDict
) -> PlateauState:
    """After a validation: a new best resets the patience; ``plateau_patience`` validations without
    one divide the rate (``decays += 1``), never more than ``plateau_max_decays`` times."""
    if val_top1 > state.best + schedule_config.plateau_min_delta:
        return PlateauState(val_top1, 0, state.decays)
    bad = state.bad_epochs + 1
    if (
        bad >= schedule_config.plateau_patience
        and state.decays < schedule_config.plateau_max_decays
    ):
        return PlateauState(state.best, 0, state.decays + 1)
    return PlateauState(state.best, bad, state.decays)


def check_schedule(schedule_config: ml_collections.ConfigDict) -> None:
    if schedule_config.kind not in SCHEDULES:
        raise ValueError(
            f"Unknown schedule.kind {schedule_config.kind!r}; valid: {list(SCHEDULES)}"
        )


def total_steps(num_epochs: float, steps_per_epoch: int) -> int:
    """The steps ``num_epochs`` epochs make, whole steps only. Rounded to 1e-6 of a step first:
    ``int(2.3 * 100)`` is 229 (2.3 * 100 is 229.99999999999997 in floats), a step short."""
    return int(round(num_epochs * steps_per_epoch, 6))


def learning_rate(
    step: int,
    plateau: PlateauState,
    base_lr: float,
    schedule_config: ml_collections.ConfigDict,
    steps_per_epoch: int,
) -> float:
    """The rate for ``step``: the schedule's value times an optional linear warmup (the
    schedule's kind is checked once at start-up, ``check_schedule``)."""
    total = schedule_config.num_epochs * steps_per_epoch
    warmup = schedule_config.warmup_epochs * steps_per_epoch
    if schedule_config.kind == "plateau":
        rate = base_lr * schedule_config.plateau_factor**plateau.decays
    elif schedule_config.kind == "cosine":
        progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        rate = base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        rate = base_lr
    if warmup > 0 and step < warmup:
        rate *= (step + 1) / warmup
    return rate
