"""XLA compiler options chosen per platform from measurements (docs/performance.md)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import jax

_XLA_DEFAULTS = False


def cpu_compiler_options() -> dict[str, str | int] | None:
    """On a CPU, XLA's options for the train and validation steps and the evaluator's programs.

    * YNNPACK's convolution fusion off: its kernel-gradient convolutions run 4-13x slower than
      the forward ones. Measured with and without it in one process, alternating: the VGG16
      train step at batch 8 is 1.4x faster without it (Intel Xeon, AMD EPYC; 3.4x on an
      AVX2-only EPYC), the demo's 1/8-width net's at batch 64 1.1-1.5x, and forward-only too:
      the demo's validation 1.1x (docs/performance.md, "CPU step options"). Experimental
      option: re-measure on jaxlib upgrades.
    * LLVM at ``-O2`` instead of XLA's default ``-O3`` (``xla_backend_optimization_level``),
      unless the user's ``XLA_FLAGS`` set a level (the test suite sets 0): a dense evaluation
      program of the demo net compiles in 0.8-1.0 s instead of 1.3-1.7 s and its train step in
      about 4.7 s instead of 5.3-6.3 s, while the programs compute the very same bits (30 train
      steps and a dense evaluation compared) at the same speed within the measurements' noise
      (AVX2-only AMD EPYC; docs/performance.md). Compiling is a large part of a small net's
      evaluation and of every run's start."""
    if _XLA_DEFAULTS or jax.default_backend() != "cpu":
        return None
    options: dict[str, str | int] = {"xla_cpu_experimental_ynn_fusion_type": ""}
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        options["xla_backend_optimization_level"] = 2
    return options


@contextlib.contextmanager
def xla_defaults() -> Iterator[None]:
    """Programs jitted inside compile with XLA's own defaults, none of the options above: the
    other side of an A/B of them (``bench/train_step.py --vs_default``). A step jitted with
    options keeps them when compiled again (``.lower().compile()`` adds to them, it cannot
    remove them), so the A/B must build its step inside this."""
    global _XLA_DEFAULTS
    previous, _XLA_DEFAULTS = _XLA_DEFAULTS, True
    try:
        yield
    finally:
        _XLA_DEFAULTS = previous
