"""Training-step speed: images/s, step time and MFU of the project's own step, optionally against a
plain PyTorch reference of the same net and batch trained in the same run.

    python bench/train_step.py --config=experiments/vgg16.py --vs-pytorch
    python bench/train_step.py --config=experiments/demo.py --batch=64 --image_size=32 --vs_default
    python bench/train_step.py --config=experiments/vgg16.py --batch=64 \
        --config.model.dtype=bfloat16

The step is the project's: ``steps.create_train_state`` and ``steps.make_train_step`` (SGD with
momentum 0.9, L2 5e-4 on kernels, dropout, jitted over the mesh of ``config.mesh``), fed synthetic
batches already on the device, so only the step is timed. Times are the median over ``--steps``
timed steps after ``--warmup`` untimed ones, each waited for with ``block_until_ready``. With
``--vs-pytorch`` the two frameworks' steps alternate (JAX, PyTorch, JAX, ...), so a burst of load
on a shared machine hits both and the ratio stays fair. For steps of a few milliseconds alternate
in blocks (``--block=10``): after a PyTorch step its OpenMP workers spin for a while, taking cores
from the JAX step that follows (the demo's net: 18 ms a JAX step one by one, 14 ms alone or with
``OMP_WAIT_POLICY=PASSIVE``, which in turn slows PyTorch's own step 14 -> 21 ms); each block
starts with one untimed step. ``--xla_option key=value`` compiles the
timed step with XLA compiler options added to the library's (``xla_options.py``; per executable,
so the rest of the process is untouched); ``--vs_default`` also times the step compiled with XLA's
own defaults (neither the library's options nor ``--xla_option``), alternating, for a
one-process A/B of the options (``speedup_vs_default``).

MFU = analytic FLOPs per step / median step time / the device's peak. FLOPs per step are
3 x 2 x the forward multiply-accumulates of the convolutions and FC layers (the backward pass costs
about twice the forward), computed from ``models.layer_table``; the peak comes from a table of
accelerators, or for a CPU from an estimate (cores x clock x FLOPs per cycle from its vector flags).

Imports nothing from ``vgg_jax.data``, so TensorFlow need not be installed. PyTorch comes from
``bench/requirements.txt``, never from the project's requirements.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# Run from anywhere: the repository root holds ``vgg_jax`` and ``experiments``.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. vgg16.py.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Training crop size (a multiple of 32); default: config input.crop_size."
)
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_BLOCK = flags.DEFINE_integer(
    "block",
    1,
    "Steps each side runs in a row before the other's turn; above 1, each turn starts with one "
    "more, untimed step. Use 10 or more for steps of a few ms (module docstring).",
    lower_bound=1,
)
_VS_PYTORCH = flags.DEFINE_boolean(
    "vs_pytorch", False, "Also train the same net and batch in plain PyTorch (--vs-pytorch works)."
)
_PEAK_FLOPS = flags.DEFINE_float(
    "peak_flops", None, "The device's peak FLOP/s for MFU; default: table or CPU estimate."
)
_XLA_OPTIONS = flags.DEFINE_multi_string(
    "xla_option",
    [],
    "key=value XLA compiler option for the timed step only, e.g. "
    "xla_cpu_experimental_ynn_fusion_type= (empty: YNNPACK off). Repeatable.",
)
_VS_DEFAULT = flags.DEFINE_boolean(
    "vs_default",
    False,
    "Also time the step compiled with XLA's defaults (without the library's CPU options and "
    "--xla_option), alternating, and print the speed-up (one process, so load hits both).",
)

# Peak dense FLOP/s per chip by (jax device_kind substring, compute dtype). GPU fp32 is the
# non-tensor-core figure; XLA may run float32 convolutions as TF32 on tensor cores, which can
# exceed it. TPUs multiply float32 through bfloat16 passes, so both dtypes use the bfloat16 peak.
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989e12,
    ("H200", "float32"): 67e12,
    ("H100", "bfloat16"): 989e12,
    ("H100", "float32"): 67e12,
    ("A100", "bfloat16"): 312e12,
    ("A100", "float32"): 19.5e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v4", "float32"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5 lite", "float32"): 197e12,
    ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5e", "float32"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v5p", "float32"): 459e12,
    ("TPU v5", "bfloat16"): 459e12,
    ("TPU v5", "float32"): 459e12,
}


def normalise_argv(argv: list[str]) -> list[str]:
    """Accepts dashes in this script's own flag names (``--vs-pytorch``, ``--image-size``)."""
    own = {"vs-pytorch", "novs-pytorch", "no-vs-pytorch", "image-size", "peak-flops"}
    own |= {"xla-option", "vs-default", "novs-default", "no-vs-default"}
    out = []
    for arg in argv:
        name, sep, value = arg[2:].partition("=")
        if arg.startswith("--") and name in own:
            name = name.replace("no-vs-", "novs-").replace("-", "_")
            arg = f"--{name}{sep}{value}"
        out.append(arg)
    return out


def forward_macs(model) -> int:
    """Multiply-accumulates of one image's forward pass: convs and FC layers, from the layer
    table (output positions x kernel size; pools and LRN are not counted)."""
    from vgg_jax import models

    total = 0
    for row in models.layer_table(model):
        if row.params:
            out_features = row.output_shape[-1]
            positions = (
                row.output_shape[1] * row.output_shape[2] if len(row.output_shape) == 4 else 1
            )
            total += positions * (row.params - out_features)  # params less the biases
    return total


def cpu_peak_estimate() -> tuple[float, str]:
    """Estimated float32 peak of the CPUs this process may use: cores x clock x FLOPs per cycle
    (two FMA units of the widest vector ISA in /proc/cpuinfo). An estimate, not a measurement."""
    cores = len(os.sched_getaffinity(0))
    mhz, cpu_flags = None, set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz" and mhz is None:
                mhz = float(value)
            elif key.strip() == "flags" and not cpu_flags:
                cpu_flags = set(value.split())
    if "avx512f" in cpu_flags:
        isa, per_cycle = "AVX-512", 2 * 16 * 2  # 2 FMA units x 16 fp32 lanes x (mul + add)
    elif "avx2" in cpu_flags and "fma" in cpu_flags:
        isa, per_cycle = "AVX2+FMA", 2 * 8 * 2
    else:
        isa, per_cycle = "SSE", 2 * 4 * 2
    ghz = (mhz or 2000.0) / 1000
    peak = cores * ghz * 1e9 * per_cycle
    return peak, f"estimate: {cores} cores x {ghz:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"


def device_peak(device, dtype: str) -> tuple[float | None, str]:
    if _PEAK_FLOPS.value:
        return _PEAK_FLOPS.value, "--peak_flops"
    if device.platform == "cpu":
        return cpu_peak_estimate()
    for (kind, table_dtype), peak in PEAK_FLOPS.items():
        if kind in device.device_kind and table_dtype == dtype:
            return peak, f"table: {kind} {dtype}"
    return None, f"unknown device {device.device_kind!r}: pass --peak_flops"


def parse_options(options: list[str]) -> dict[str, str]:
    parsed = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise app.UsageError(f"--xla_option wants key=value, got {option!r}")
        parsed[key.removeprefix("--")] = value
    return parsed


def build_jax_step(config, image_size: int, batch_size: int, options: dict[str, str]):
    """The project's state and step (compiled with ``options``), and a synthetic batch already on
    the mesh. Returns ``(model, mesh, run_step)``; the first call of ``run_step`` is the first step
    after compilation."""
    import jax
    import numpy as np

    from vgg_jax import models, sharding
    from vgg_jax.training import optim, steps

    mesh = sharding.make_mesh(config.mesh)
    model = models.build_model(config.model, image_size)
    tx = optim.make_optimizer(config.optim)
    state, shardings = steps.create_train_state(model, tx, mesh, config.seed)
    step = steps.make_train_step(model, tx, mesh, shardings, config.seed)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch(
        {
            "image": rng.standard_normal((batch_size, image_size, image_size, 3), np.float32),
            "label": rng.integers(0, config.model.num_classes, batch_size).astype(np.int32),
        },
        mesh,
    )
    lr = np.float32(config.optim.learning_rate)
    compiled = step.lower(state, batch, lr).compile(compiler_options=options or None)
    holder = {"state": state}

    def run_step():
        holder["state"], sums = compiled(holder["state"], batch, lr)
        jax.block_until_ready((holder["state"], sums))

    return model, mesh, run_step


def build_torch_step(config, image_size: int, batch_size: int):
    """``build_torch_net``'s net trained one step per call on one synthetic batch."""
    try:
        import torch
    except ImportError:
        sys.exit("--vs-pytorch needs PyTorch: pip install -r bench/requirements.txt")
    from torch import nn

    from bench.torch_reference import build_torch_net

    net, opt = build_torch_net(config, image_size)
    images = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, config.model.num_classes, (batch_size,))
    loss_fn = nn.CrossEntropyLoss()

    def run_step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(images), labels)
        loss.backward()
        opt.step()
        loss.item()

    return run_step, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(times: list[float]) -> str:
    return f"{1000 * statistics.median(times):.0f}"


def main(argv):
    del argv
    import jax

    from vgg_jax import xla_options

    config = _CONFIG.value
    image_size = _IMAGE_SIZE.value or config.input.crop_size
    batch = _BATCH.value
    options = parse_options(_XLA_OPTIONS.value)

    start = time.perf_counter()
    model, mesh, jax_step = build_jax_step(config, image_size, batch, options)
    jax_step()  # the first step after compilation
    compile_s = time.perf_counter() - start
    # Contenders after the project's step, timed in turn within each round.
    others = []
    if _VS_DEFAULT.value:
        with xla_options.xla_defaults():  # neither the library's CPU options nor --xla_option
            others.append(("default", build_jax_step(config, image_size, batch, {})[2], ""))
    if _VS_PYTORCH.value:
        others.append(("pytorch", *build_torch_step(config, image_size, batch)))
    for _ in range(_WARMUP.value):
        for run in [jax_step] + [other[1] for other in others]:
            run()
    times = {name: [] for name in ["jax"] + [other[0] for other in others]}
    block = _BLOCK.value
    for _ in range(-(-_STEPS.value // block)):
        for name, run in [("jax", jax_step)] + [(other[0], other[1]) for other in others]:
            if block > 1:
                run()  # untimed: the other side's worker threads may still be spinning
            times[name] += [timed(run) for _ in range(block)]

    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        device_text = f"cpu ({machine.cpu_name()}, {len(os.sched_getaffinity(0))} cores)"
    else:
        device_text = f"{mesh.devices.size} x {device.device_kind}"
    step_s = statistics.median(times["jax"])
    flop = 3 * 2 * forward_macs(model) * batch
    peak, peak_source = device_peak(device, config.model.dtype)
    fields = [
        f"net={config.model.name}",
        f"batch={batch}",
        f"size={image_size}",
        f"dtype={config.model.dtype}",
        f"device={device_text}",
        f"images/s={batch / step_s:.3g}",
        f"step_ms_median={median_ms(times['jax'])}",
        f"TFLOP/step={flop / 1e12:.3g}",
        f"achieved_GFLOP/s={flop / step_s / 1e9:.3g}",
        f"MFU={100 * flop / step_s / peak:.1f}%" if peak else "MFU=n/a",
        f"peak={peak / 1e9:.4g} GFLOP/s ({peak_source})" if peak else f"peak=({peak_source})",
        f"xla_options={options}",
    ]
    for name, _, info in others:
        other_s = statistics.median(times[name])
        label = name
        fields += [
            f"{label}_images/s={batch / other_s:.3g}",
            f"{label}_step_ms_median={median_ms(times[name])}",
            f"{'speedup_vs_default' if name == 'default' else 'jax/pytorch'}"
            f"={other_s / step_s:.2f}",
        ]
        if info:
            fields.append(f"({info})")
    rounds = "; ".join(
        f"{name} {', '.join(f'{1000 * t:.0f}' for t in ts)}" for name, ts in times.items()
    )
    fields += [
        f"step_ms_each=({rounds})",
        f"compile+first_step_s={compile_s:.0f}",
        f"jax={jax.__version__}",
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        f"load={os.getloadavg()[0]:.1f}",
    ]
    print(" ".join(fields))
    print("reproduce: python " + " ".join(shlex.quote(a) for a in _ORIGINAL_ARGV))


_ORIGINAL_ARGV = list(sys.argv)

if __name__ == "__main__":
    sys.argv = normalise_argv(sys.argv)
    app.run(main)
