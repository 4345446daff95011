"""What ``launch.py`` does with its flags: clear start-up errors, then dispatch on ``--mode``."""

from __future__ import annotations

import errno
import json
import logging as std_logging
import os
import socket
import sys

import ml_collections
from absl import flags, logging

from vgg_jax import checkpoint, checks, writers

MODES = list(checks.MODES)

# Packages whose INFO lines are hidden from the console: Orbax writes about ten per checkpoint
# save and TFDS one per dataset open, which would bury the one-line-per-interval progress.
QUIET_PACKAGES = ("orbax", "tensorflow_datasets")
# Their warnings about what this project does on purpose (vgg_jax/checkpoint.py drops them from
# library use too).
# TFDS warns each time a builder with a config it has not registered is made (every image
# folder's, several times a run) and once while preparing a dataset for the first time.
EXPECTED_TFDS_WARNINGS = ("Using custom data configuration", "has no dataset_info.json")
EXPECTED_WARNINGS = (*checkpoint.EXPECTED_ORBAX_WARNINGS, *EXPECTED_TFDS_WARNINGS)
# JAX's INFO line on every start without a TPU ("Unable to initialize backend 'tpu': ... libtpu.so")
# is the normal case on CPU and GPU machines; absl's INFO verbosity would print it.
JAX_BACKEND_LOGGER = "jax._src.xla_bridge"


class BackendProbeFilter(std_logging.Filter):
    """Drops JAX's INFO lines about backends it probed and did not find."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not record.getMessage().startswith(
            "Unable to initialize backend"
        )


class LibraryInfoFilter(std_logging.Filter):
    """Drops records below WARNING, and the ``EXPECTED_WARNINGS``, logged from inside
    ``packages``."""

    def __init__(self, packages: tuple[str, ...] = QUIET_PACKAGES):
        super().__init__()
        self.markers = tuple(f"{os.sep}{package}{os.sep}" for package in packages)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if not any(marker in record.pathname for marker in self.markers):
            return True
        if record.levelno >= std_logging.ERROR:
            return True
        if record.levelno >= std_logging.WARNING:
            message = record.getMessage()
            return not any(expected in message for expected in EXPECTED_WARNINGS)
        return False


def quiet_library_logs() -> None:
    """Keeps the console to our progress lines, warnings and errors: hides Orbax's and TFDS's
    INFO lines and expected warnings, and JAX's "Unable to initialize backend" probes (all kept
    with ``--verbosity=1``)."""
    if logging.get_verbosity() >= logging.DEBUG:
        return
    # On the logger Orbax and TFDS log through (absl's), so it works under any handler: absl's
    # in launch.py, Jupyter's in a notebook.
    logger = logging.get_absl_logger()
    if not any(isinstance(f, LibraryInfoFilter) for f in logger.filters):
        logger.addFilter(LibraryInfoFilter())
    jax_logger = std_logging.getLogger(JAX_BACKEND_LOGGER)
    if not any(isinstance(f, BackendProbeFilter) for f in jax_logger.filters):
        jax_logger.addFilter(BackendProbeFilter())


def parse_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
    """Parses flags, turning an unknown ``--config.key`` override, or a study ``base`` key that
    the study's plan replaces, into a one-line error.

    ml_collections raises a bare ``AttributeError`` from deep inside flag parsing; a user who
    mistyped a key should instead read which key is unknown and which ones exist there.
    """
    argv = last_override_wins(argv)
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        message = str(e)
        if "Error whilst parsing config file" in message:  # the config's own error, last
            lines = [line for line in message.strip().splitlines() if line.strip()]
            sys.exit(f"FATAL Flags parsing error: {lines[-1].strip()}")
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help.")
    except (AttributeError, KeyError) as e:
        sys.exit(_unknown_key_message(argv) or f"Bad config override: {e}")
    if "config" in flag_values and checks.is_study(config := flag_values["config"].value):
        from ml_collections import config_flags

        from vgg_jax.study import plan

        overridden = config_flags.get_override_values(flag_values["config"])
        if lines := plan.ignored_base_overrides(config, overridden):
            sys.exit("Config error:\n  " + "\n  ".join(lines))
    return rest


def last_override_wins(argv: list[str]) -> list[str]:
    """``argv`` with only the last of several ``--config.key=value`` for one key, as absl does
    for any other flag given twice. ml_collections parses each: a number or string given again
    is replaced, but a tuple is extended, so ``--config.seeds=(0,1) --config.seeds=(5,)``
    (a base command with an override appended) planned seeds 0, 1 and 5."""
    overrides = {i: a.split("=", 1)[0] for i, a in enumerate(argv) if a.startswith("--config.")}
    overrides = {i: key for i, key in overrides.items() if key != argv[i]}  # "=value" form only
    last = {key: i for i, key in overrides.items()}
    return [a for i, a in enumerate(argv) if i not in overrides or last[overrides[i]] == i]


def _unknown_key_message(argv: list[str]) -> str | None:
    """Names the first ``--config.a.b=v`` override whose key is not in the config, and the valid
    keys beside it."""
    from ml_collections import config_flags

    config_args = [a for a in argv if a.startswith("--config=")]
    if not config_args:
        return None
    base_argv = [argv[0], config_args[-1]]
    base_flags = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=base_flags, sys_argv=base_argv)
    base_flags(base_argv)
    for override in (a for a in argv if a.startswith("--config.")):
        keys = override[len("--config.") :].split("=")[0].split(".")
        group = base_flags.config
        for depth, key in enumerate(keys):
            if not isinstance(group, ml_collections.ConfigDict) or key not in group:
                where = ".".join(keys[:depth]) or "the config"
                valid = sorted(group.keys()) if isinstance(group, ml_collections.ConfigDict) else []
                name = ".".join(keys)
                return f"Unknown config key {name!r} ({override}); valid keys in {where}: {valid}"
            group = group[key]
    return None


def coordinator_port_problem(coordinator_address: str | None, process_id: int | None) -> str | None:
    """Why process 0 cannot start the job's coordinator on ``coordinator_address``'s port, found
    with a plain bind of that port on every interface (where JAX's service binds it), or None.

    JAX's gRPC service binds its port with SO_REUSEPORT, so a second process 0 (a duplicated
    ``--process_id=0``, or a second job given the same address) started its service beside the
    first one's: the first aborted in a C++ check failure, the second waited without a word until
    JAX's 300 s initialisation timeout; a port held by another program failed with a traceback
    ending in ``Failed to start RPC server``. A plain bind fails in each of these cases."""
    if process_id != 0 or not coordinator_address or os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        return None
    _, _, port_text = coordinator_address.rpartition(":")
    if not port_text.isdigit():
        return None  # JAX reports a malformed address itself
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
                probe.bind((host, int(port_text)))
            return None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (
                    f"--coordinator_address={coordinator_address}: port {port_text} is in use "
                    "on this host (another job's coordinator, a second --process_id=0, or "
                    "another program); process 0 starts the job's coordinator there. Give a "
                    "free port to every process of the job."
                )
            # No IPv6 on this host, say: try IPv4.
    return None


COORDINATOR_WAIT_S = 300  # jax.distributed.initialize's default initialization_timeout


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Joins a multi-process JAX job (``jax.distributed``; JAX's own runtime, no custom launcher).

    With no arguments JAX detects TPU pods, SLURM and similar clusters itself. On CPU the
    collectives go through gloo, so the same command also runs several processes on one machine.
    A bad ``--process_id``, a coordinator port in use and a failure to start or reach the
    coordinator each end the process with one line.
    """
    import jax

    if problem := coordinator_port_problem(coordinator_address, process_id):
        sys.exit(problem)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = None not in (coordinator_address, num_processes, process_id)
    if explicit:  # a process whose coordinator never comes otherwise waits here in silence
        logging.info(
            "Process %d of %d: joining the job through its coordinator %s (JAX waits up to %d s "
            "for it and every other process).",
            process_id,
            num_processes,
            coordinator_address,
            COORDINATOR_WAIT_S,
        )
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=COORDINATOR_WAIT_S,
        )
    except ValueError as e:
        if explicit:  # JAX checks the ids it was given
            sys.exit(f"--num_processes={num_processes} --process_id={process_id}: {e}")
        # nothing to auto-detect: not a TPU pod, SLURM job, ...
        sys.exit(
            f"--distributed: {e} No cluster was detected; pass --coordinator_address=host:port "
            "--num_processes=N --process_id=i, or drop --distributed for one process."
        )
    except jax.errors.JaxRuntimeError as e:
        sys.exit(
            f"Could not join the job through its coordinator {coordinator_address or '(detected)'}"
            f" as process {process_id} of {num_processes}: {str(e).strip().splitlines()[0]}"
        )
    logging.info("Process %d of %d", jax.process_index(), jax.process_count())


# Where a process finds its input files: hosts may hold their own copies of the data under other
# paths (docs/data.md, "On several hosts"), so these may differ between the processes of a job.
HOST_PATH_KEYS = ("input.data_dir", "input.manual_dir", "input.index_dir", "input.folder")


def _flat_settings(mode: str, config: ml_collections.ConfigDict) -> dict[str, str]:
    """``{"mode": mode, "group.key": value}`` as JSON texts, without ``HOST_PATH_KEYS``."""
    from flax import traverse_util

    values = traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {"mode": json.dumps(mode)} | {
        key: json.dumps(value, sort_keys=True, default=repr)
        for key, value in values.items()
        if key not in HOST_PATH_KEYS
    }


def check_same_job_or_exit(mode: str, config: ml_collections.ConfigDict) -> None:
    """Every process of a multi-process job must run the same ``--mode`` with the same config.

    Nothing else compares them: each process computes its own learning rate, data order and
    augmentation from its own config and feeds them to the collective step, so two processes
    given another ``optim.learning_rate`` or ``input.shuffle_seed`` trained to the end, exit
    status 0, with "replicated" parameters that differed between the processes' devices and a
    checkpoint holding process 0's. Each process gathers every process's settings (one small
    collective at start-up) and all of them exit with the same line naming the differences.
    ``HOST_PATH_KEYS`` may differ. One process: nothing to compare."""
    import jax

    from vgg_jax import processes

    if problem := processes.device_count_problem(jax.devices()):
        sys.exit(problem)
    everyone = processes.gather_json(_flat_settings(mode, config))
    if lines := processes.differences(everyone):
        sys.exit(
            "Config error: the processes of this job were started with different settings "
            "(each is compared with process 0; start every process with the same command but "
            "--process_id):\n  " + "\n  ".join(lines)
        )


def check_or_exit(config: ml_collections.ConfigDict, mode: str, workdir: str | None) -> None:
    """``checks.check_config``, its problems printed one per line without a traceback.

    On several processes the check's outcome is agreed (``processes.agreed``): a problem only
    one process saw (its own --workdir not writable, its host's copy of the data) stopped that
    process alone while the others went on into the next collective and waited for it until
    JAX aborted them 5 minutes later (exit 134); now every process stops, the others naming it.
    """
    from vgg_jax import processes

    try:
        processes.agreed(
            "The config check",
            lambda: checks.check_config(config, mode, workdir),
            lambda text: checks.ConfigError([text]),
        )
    except checks.ConfigError as e:
        sys.exit("Config error:\n  " + "\n  ".join(e.problems))


def run_or_exit(mode: str, config: ml_collections.ConfigDict, workdir: str | None) -> None:
    """``run``, with the faults the library explains in one line printed as that line (no
    traceback): a bad tar or image folder, a busy workdir, a failed or unreadable checkpoint, a
    NaN or infinite state, a full disk or a read-only place met by a write."""
    from vgg_jax import data

    try:
        run(mode, config, workdir)
    except data.DatasetError as e:
        sys.exit(f"Data error: {e}")
    except _one_line_errors() as e:  # evaluated only when something is raised
        sys.exit(f"{type(e).__name__}: {e}")
    except OSError as e:
        if e.errno not in writers.STORAGE_ERRNOS:
            raise
        # A full disk, a quota or a read-only place met by a write the library does not name:
        # its traceback says nothing more.
        sys.exit(f"{type(e).__name__}: {e}")


def _one_line_errors() -> tuple[type[Exception], ...]:
    from vgg_jax.training import lock, loop

    # FileNotFoundError: the library's say where the files go (tars, a dataset to prepare, a
    # workdir's checkpoints).
    return (
        checkpoint.CheckpointError,
        lock.WorkdirBusyError,
        lock.WorkdirNotSharedError,
        loop.NonFiniteLossError,
        FileNotFoundError,
        writers.WriteError,  # a full disk or a read-only place, naming the file
    )


def run(mode: str, config: ml_collections.ConfigDict, workdir: str | None) -> None:
    """What ``launch.py`` does after parsing flags: checks the whole config, then runs ``mode``."""
    quiet_library_logs()
    # Once, here: "~/runs" after "=" is not expanded by the shell, and a relative path must mean
    # one place for every part of the run.
    # A URL is left as it is for the config check to name (checks.url_problem).
    if workdir and "://" not in workdir:
        workdir = os.path.abspath(os.path.expanduser(workdir))
    workdir = workdir or None
    check_same_job_or_exit(mode, config)
    check_or_exit(config, mode, workdir)
    if mode == "summary":
        from vgg_jax import models

        model = models.build_model(config.model, config.input.crop_size)
        print(models.format_summary(model, config.model.name))
        return
    if workdir is None:
        sys.exit(f"--mode={mode} needs --workdir (where checkpoints and results go).")
    logging.info("mode=%s workdir=%s", mode, workdir)
    from vgg_jax import preemption

    if mode in ("train", "train_and_evaluate"):
        from vgg_jax.training import loop

        loop.train(config, workdir)
        if preemption.stopped():
            # Saved after a SIGTERM: exit now. Evaluation would outlast the grace period, and a
            # partly trained net's results must not look final.
            if mode == "train_and_evaluate":
                logging.warning("Stopped early: evaluation skipped. Rerun to resume and evaluate.")
            return
    try:
        if mode in ("evaluate", "train_and_evaluate"):
            from vgg_jax.evaluation import runner

            runner.run_evaluation(config, workdir)
        if mode == "study":
            from vgg_jax.study import orchestrate, report

            try:
                orchestrate.run_study(config, workdir)
            except orchestrate.Interrupted as stop:
                sys.exit(f"Study stopped: {stop} Rerun the same command to resume.")
            except (orchestrate.ChangedStudyError, orchestrate.SourceGoneError) as e:
                sys.exit(f"Study refused: {e}")
            except report.ResultsError as e:
                sys.exit(f"Study results error: {e}")
            except preemption.Stopped:  # a run's evaluation, on several processes
                sys.exit(
                    "Study stopped: a run's evaluation stopped after a termination signal, no "
                    "results written. Rerun the same command to resume."
                )
        if mode == "evaluate_continuously":
            from vgg_jax.evaluation import continuous

            continuous.watch(config, workdir)
    except preemption.Stopped:
        logging.warning("Evaluation stopped after a termination signal; no results written.")
