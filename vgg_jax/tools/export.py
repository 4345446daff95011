"""Command line of the exporter:

    python -m vgg_jax.tools.export --workdir=workdirs/demo --out=demo.safetensors

See ``vgg_jax.weights.export`` and docs/weights.md.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from vgg_jax.tools import cli
from vgg_jax.weights.export import FORMATS, export_checkpoint


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


if __name__ == "__main__":
    # Defined here, not at import, so importing this module adds no flags to launch.py's.
    flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to export.")
    flags.DEFINE_string("out", None, f"Output file; suffix one of {list(FORMATS)}.")
    flags.DEFINE_string("which", "latest", "Checkpoint: latest, best or a step number.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
