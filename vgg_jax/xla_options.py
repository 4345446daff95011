"""XLA compiler options chosen per platform from measurements (docs/performance.md)."""

from __future__ import annotations

import jax


def cpu_compiler_options() -> dict[str, str] | None:
    """On a CPU, turns off XLA's YNNPACK convolution fusion: its kernel-gradient convolutions run
    4-13x slower than the forward ones. Measured with and without it in one process, alternating:
    the VGG16 train step at batch 8 is 1.4x faster without it (Intel Xeon, AMD EPYC), the demo's
    1/8-width net's at batch 64 1.1x faster, and forward-only too: the demo's validation 1.1x
    (quiet AMD EPYC; docs/performance.md, "CPU step options"). Used by the train and validation
    steps and the evaluator's programs. Experimental option: re-measure on jaxlib upgrades."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ""}
