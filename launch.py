"""Entry point: parses flags and hands the config to the library.

    python launch.py --config=experiments/vgg16.py:s256 --workdir=workdirs/vgg16 --mode=train
    python launch.py --config=experiments/vgg19.py --mode=summary

Kept short on purpose: everything else lives in ``vgg_jax`` where it can be tested and imported.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

# Only light imports here: a worker process spawned to draw the built-in dataset imports this
# module again (JAX, Orbax and TensorFlow come with vgg_jax.tools.cli, inside main).
from vgg_jax import modes
from vgg_jax.data import shapes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:argument].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", list(modes.MODES), "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host; auto-detects TPU/SLURM)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for jax.distributed without auto-detection.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv: list[str]) -> None:
    from vgg_jax.tools import cli

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _DISTRIBUTED.value or _COORDINATOR.value:
        cli.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None:
        raise app.UsageError(
            "--num_processes/--process_id join a job only with --coordinator_address (or "
            "--distributed); alone they would run one independent process."
        )
    cli.run_or_exit(_MODE.value, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    from vgg_jax.tools import cli

    shapes.allow_worker_processes()  # guarded: a spawned worker may import this module again
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=lambda argv: cli.parse_flags(flags.FLAGS, argv or sys.argv))
