"""Command line of the weight importer:

    python -m vgg_jax.tools.import_weights --source=vgg16-397923af.pth --format=torchvision \\
        --workdir=workdirs/torchvision_vgg16

See ``vgg_jax.weights.importer`` and docs/weights.md.
"""

from __future__ import annotations

import sys

from absl import app, flags

from vgg_jax import conventions, models
from vgg_jax.tools import cli
from vgg_jax.weights.importer import IMPORTERS, evaluate_command, import_to_checkpoint


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    values = flags.FLAGS
    try:
        summary = import_to_checkpoint(
            values.source, values.format, values.workdir, values.net, values.input_convention
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"import_weights: {e}")
    print(f"net {summary['net']}: {summary['num_params']:,} parameters")
    print(f"input convention: {conventions.describe(summary['input_convention'])}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"evaluate: {evaluate_command(summary['net'], summary['config'], values.workdir)}")


if __name__ == "__main__":
    # Defined here, not at import, so importing this module adds no flags to launch.py's.
    flags.DEFINE_string("source", None, "The weight file to import.")
    flags.DEFINE_enum("format", None, sorted(IMPORTERS), "What the file is.")
    flags.DEFINE_string("workdir", None, "New directory for the checkpoint.")
    flags.DEFINE_enum(
        "net", None, sorted(models.LAYOUTS), "The net, for a file that does not say which."
    )
    flags.DEFINE_string(
        "input_convention",
        None,
        f"Input convention: one of {sorted(conventions.NAMED)}, or a JSON object with keys "
        f"{sorted(conventions.InputConvention.__annotations__)} (default: the one the format or "
        "file states).",
    )
    flags.mark_flags_as_required(["source", "format", "workdir"])
    app.run(main)
