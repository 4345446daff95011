"""Command line of the feature extractor and linear probe:

    python -m vgg_jax.tools.features --config=experiments/demo.py --workdir=workdirs/demo

See ``vgg_jax.features`` and docs/features.md.
"""

from __future__ import annotations

import sys

from absl import app, flags

from vgg_jax.features import linear_probe
from vgg_jax.tools import cli


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    values = flags.FLAGS
    if values.pixel_side < 1:
        sys.exit(f"--pixel_side must be at least 1, got {values.pixel_side}.")
    config = values.config
    cli.check_or_exit(config, "features", values.workdir)
    try:
        probe = linear_probe(
            config,
            values.workdir,
            values.checkpoint,
            pixel_side=values.pixel_side,
            l2=values.l2,
            steps=values.steps,
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"features: {e}")
    scales = ", ".join(str(q) for q in config.evals.multi_scales)
    print(
        f"{probe.num_train} train / {probe.num_eval} eval examples of "
        f"{config.input.dataset} ({config.input.train_split} / {config.input.eval_split}); "
        f"descriptors: FC2 ({probe.feature_dim}-D), Q = {{{scales}}}, "
        f"flip {bool(config.evals.flip)}; raw pixels: {values.pixel_side}x{values.pixel_side}x3 "
        f"({probe.pixel_dim}-D); multinomial logistic regression, l2 {values.l2:g}"
    )
    # Error, as every other line the project prints (training, evaluation tables).
    print(f"linear on VGG features: top-1 error {100 * (1 - probe.feature_accuracy):.2f}%")
    print(f"linear on raw pixels: top-1 error {100 * (1 - probe.pixel_accuracy):.2f}%", flush=True)


if __name__ == "__main__":
    from ml_collections import config_flags

    # Defined here, not at import, so importing this module adds no flags to launch.py's.
    config_flags.DEFINE_config_file("config", None, "Experiment config file[:argument].")
    flags.DEFINE_string("workdir", None, "A training run's (or imported net's) directory.")
    flags.DEFINE_string("checkpoint", "latest", "latest, best or a step number.")
    flags.DEFINE_integer("pixel_side", 16, "Raw-pixel baseline: images shrunk to this squared.")
    flags.DEFINE_float("l2", 1e-3, "L2 weight of both linear classifiers.")
    flags.DEFINE_integer("steps", 300, "L-BFGS iterations of each linear classifier.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=lambda argv: cli.parse_flags(flags.FLAGS, argv or sys.argv))
