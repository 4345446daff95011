"""Command line of the exporter:

    python -m vgg_jax.tools.export --workdir=workdirs/demo --out=demo.safetensors
    python -m vgg_jax.tools.export --workdir=workdirs/vgg16 --out=vgg16.pth   # torchvision's layout

See ``vgg_jax.weights.export`` and docs/weights.md.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from vgg_jax.tools import cli
from vgg_jax.weights.export import EXPORT_FORMATS, export_checkpoint


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    workdir, out = flags.FLAGS.workdir, flags.FLAGS.out
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        sys.exit(f"export: no folder {folder} for --out={out}")
    from vgg_jax import checkpoint

    try:
        meta = export_checkpoint(workdir, out, flags.FLAGS.which)
    except (OSError, ValueError, checkpoint.CheckpointError) as e:
        sys.exit(f"export: {e}")
    print(f"wrote {out}: net {meta['net']}, step {meta['step']}, from {workdir}")
    if out.endswith(".pth") and meta["input_convention"]:
        from vgg_jax import conventions

        # A state dict carries no convention: whoever feeds the net in PyTorch must apply it.
        print(f"input convention: {conventions.describe(meta['input_convention'])}")


if __name__ == "__main__":
    # Defined here, not at import, so importing this module adds no flags to launch.py's.
    flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to export.")
    flags.DEFINE_string(
        "out", None, f"Output file; suffix one of {list(EXPORT_FORMATS)} (.pth: torchvision's)."
    )
    flags.DEFINE_string("which", "latest", "Checkpoint: latest, best or a step number.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
