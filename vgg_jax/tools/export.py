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
    if os.path.isdir(out):
        sys.exit(f"export: --out={out} is a folder; name the file to write.")
    if os.path.exists(out) and not flags.FLAGS.overwrite:
        # An earlier export (another step, another run) was replaced without a word.
        sys.exit(f"export: {out} exists; give another --out, or --overwrite to replace it.")
    from vgg_jax import checkpoint

    try:
        meta = export_checkpoint(workdir, out, flags.FLAGS.which)
    except (OSError, ValueError, checkpoint.CheckpointError) as e:
        sys.exit(f"export: {e}")
    print(f"wrote {out}: net {meta['net']}, step {meta['step']}, from {workdir}")
    if meta["input_convention"] is None:
        # A checkpoint older than recorded conventions, whose dataset is not here to rebuild it.
        print(
            "input convention: not recorded, and the training set is not at hand to rebuild it: "
            "the net expects 0-255 RGB less its training set's mean RGB, divided by the config's "
            "input.pixel_std (1 if unset); run the export where the dataset is to record it"
        )
    elif out.endswith(".pth"):
        from vgg_jax import conventions

        # PyTorch reads the weights alone: whoever feeds the net there must apply it. The file
        # records it for import_weights, but a copy re-saved by torch.save loses the record.
        convention = meta["input_convention"]
        print(
            f"input convention: {conventions.describe(convention)} (import_weights of a copy "
            f"re-saved by torch.save: --input_convention='{conventions.as_text(convention)}')"
        )


if __name__ == "__main__":
    # Defined here, not at import, so importing this module adds no flags to launch.py's.
    flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to export.")
    flags.DEFINE_string(
        "out", None, f"Output file; suffix one of {list(EXPORT_FORMATS)} (.pth: torchvision's)."
    )
    flags.DEFINE_string("which", "latest", "Checkpoint: latest, best or a step number.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
