"""XLA compiler options chosen per platform from measurements (docs/performance.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

_XLA_DEFAULTS = False


def cpu_compiler_options() -> dict[str, str] | None:
    """On a CPU, turns off XLA's YNNPACK convolution fusion: its kernel-gradient convolutions run
    4-13x slower than the forward ones. Measured with and without it in one process, alternating:
    the VGG16 train step at batch 8 is 1.4x faster without it (Intel Xeon, AMD EPYC), the demo's
    1/8-width net's at batch 64 1.1x faster, and forward-only too: the demo's validation 1.1x
    (quiet AMD EPYC; docs/performance.md, "CPU step options"). Used by the train and validation
    steps and the evaluator's programs. Experimental option: re-measure on jaxlib upgrades."""
    if _XLA_DEFAULTS or jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}


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
