"""Forward time of one stride-1 3x3 conv in each of its three forms (XLA's convolution, im2col,
col2im: ``vgg_jax/conv_lowering.py``), shape by shape, against the form the library's rule picks.

    python bench/conv_forms.py
    python bench/conv_forms.py --shapes=64x32x3x8,64x16x16x8,8x224x3x64

Each shape is batch x map side x in x out channels; each form is compiled with the project's CPU
options and timed as the median of ``--calls`` calls, the three forms in turn. The matrix forms
run a batch whose buffer exceeds ``conv_lowering.MAX_BUFFER_BYTES`` in chunks of examples, as in
training and evaluation on one device. Prints one line
per shape and a last line counting the shapes where the rule's form is within 10% of the fastest,
then the command. Re-run on a new CPU family before trusting ``conv_lowering``'s thresholds there
(docs/performance.md, "Few-channel convolutions and the pool's gradient"). Imports nothing from
``vgg_jax.data``: no TensorFlow needed.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine  # noqa: E402

DEMO_AND_EDGES = (
    "64x32x3x8,64x16x16x8,64x16x8x16,64x8x16x32,64x4x64x64,64x2x64x64,"
    "64x32x3x64,128x32x3x8,128x48x3x8,64x32x8x8,8x224x3x64"
)
_SHAPES = flags.DEFINE_string("shapes", DEMO_AND_EDGES, "Comma-separated NxSIDExINxOUT shapes.")
_CALLS = flags.DEFINE_integer("calls", 15, "Timed calls per form (the median is reported).")


def time_forms(batch: int, side: int, cin: int, cout: int, calls: int) -> dict[str, float]:
    """Median milliseconds per call of each form's forward on random inputs."""
    import jax
    import numpy as np

    from vgg_jax import conv_lowering, xla_options

    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.standard_normal((batch, side, side, cin)), jax.numpy.float32)
    k = jax.numpy.asarray(rng.standard_normal((3, 3, cin, cout)), jax.numpy.float32)
    padding = ((1, 1), (1, 1))
    times = {}
    for form, fn in conv_lowering.FORWARD_FORMS.items():
        compiled = (
            jax.jit(lambda x, k, fn=fn: fn(x, k, padding))
            .lower(x, k)
            .compile(compiler_options=xla_options.cpu_compiler_options())
        )
        for _ in range(3):
            compiled(x, k).block_until_ready()
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            compiled(x, k).block_until_ready()
            samples.append(time.perf_counter() - start)
        times[form] = statistics.median(samples) * 1e3
    return times


def main(argv: list[str]) -> None:
    del argv
    from vgg_jax import conv_lowering

    good = 0
    shapes = [tuple(int(v) for v in s.split("x")) for s in _SHAPES.value.split(",") if s]
    for batch, side, cin, cout in shapes:
        times = time_forms(batch, side, cin, cout, _CALLS.value)
        chosen = conv_lowering.conv_forms(
            (batch, side, side, cin), (3, 3, cin, cout), ((1, 1),) * 2
        )[0]
        fastest = min(times, key=times.get)
        good += times[chosen] <= 1.1 * times[fastest]
        print(
            f"{batch}x{side}x{side} {cin}->{cout}: "
            + " ".join(f"{form}={ms:.3f}ms" for form, ms in times.items())
            + f" rule={chosen} fastest={fastest}",
            flush=True,
        )
    print(
        f"rule within 10% of the fastest form on {good}/{len(shapes)} shapes "
        f"machine={machine.describe()}"
    )
    print("reproduce: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    app.run(main)
