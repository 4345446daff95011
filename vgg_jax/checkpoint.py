"""Every Orbax call of the project, behind a few functions.

Layout: ``<workdir>/checkpoints/<step>/{params, opt_state, meta}``. ``params`` and ``opt_state`` are
array trees (saved sharded, restored onto any mesh); ``meta`` is JSON: the training config, the
plateau schedule's state, the input pipeline's state (the batches are a pure function of the seed
and the step, so the step *is* the pipeline's position), validation metrics and, for imported
weights, their input convention. The evaluator restores only ``params`` and ``meta``.

Orbax writes each checkpoint into a temporary directory and renames it only once every file is
committed, and ``CheckpointManager`` never lists an uncommitted one: a run killed mid-save resumes
from the previous checkpoint. Orbax's API changes between releases; requirements.txt pins it.

Faults (docs/training.md): a committed step whose files were damaged later (truncated or missing)
is reported in one line and readers fall back to the newest step that reads; a save whose write
fails raises ``SaveError`` with the OS's reason as soon as the write fails, and its partial
temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging as std_logging
import os
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from vgg_jax import conventions

SUBDIR = "checkpoints"
ITEMS = ("params", "opt_state", "meta")
BEST_METRIC = "val_top1_accuracy"  # higher is better
READ_RETRIES = 5  # listings of a directory that a running trainer is pruning (_read_only_manager)
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's suffix for a step (or item) still being written
CORRUPT_SUBDIR = "corrupt_checkpoints"  # where training moves steps that no longer read


class CheckpointError(RuntimeError):
    """A checkpoint fault, explained in one line (its message)."""


class SaveError(CheckpointError):
    """Writing a checkpoint failed; the message names the step and the OS's reason."""


class UnreadableCheckpointError(CheckpointError):
    """No checkpoint that was asked for (or none at all) can be read back."""


class IncompatibleCheckpointError(CheckpointError):
    """A checkpoint made with another net or optimiser than the config that would resume it."""


class NetMismatchError(CheckpointError, ValueError):
    """A checkpoint put to a use it does not fit: evaluated as another net, on other classes or
    with another input convention, or copied into a net whose layers differ. One line at the
    command line, as every ``CheckpointError``; still a ``ValueError`` for library callers."""


def class_difference(recorded: list[str] | None, now: list[str] | None) -> str | None:
    """Where a checkpoint's class names (its ``class_names`` meta) and a dataset's first differ,
    as ``class 3: 'ant' there, 'bee' here``; None when they agree or either is unknown. Output i
    of a net is class i of the list it was trained on: another list (a renamed, added or removed
    class folder shifts every later label) makes every output another class. Names are compared
    in Unicode's composed form (NFC), as image folders match them: a folder copied from a Mac
    writes "é" decomposed, the same class."""
    if not recorded or not now:
        return None
    recorded_forms = [unicodedata.normalize("NFC", name) for name in recorded]
    now_forms = [unicodedata.normalize("NFC", name) for name in now]
    if recorded_forms == now_forms:
        return None
    pairs = list(zip(recorded_forms, now_forms, strict=False))
    first = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
    there = recorded[first] if first < len(recorded) else None
    here = now[first] if first < len(now) else None
    return f"class {first}: {there!r} there, {here!r} here"


# Orbax's warnings about what this module does on purpose: periodic saves carry no validation
# metrics (only the per-validation ones rank "best"), and readers open checkpoints read-only.
EXPECTED_ORBAX_WARNINGS = (
    "Requested `tracked_metric`; did not provide metrics",
    "Given directory is read only",
    "CheckpointManagerOptions.read_only=True, setting",
)


class ExpectedOrbaxWarnings(std_logging.Filter):
    """Drops ``EXPECTED_ORBAX_WARNINGS`` (logged by Orbax through absl's logger); installed when
    this module is imported, so a script or notebook using the library sees them no more than
    the command line does. Real Orbax warnings and errors pass; an Orbax error caused by the
    operating system (a full disk, a permission) passes as its one-line message, without the
    traceback: a failed save logged five of them, 40-50 lines each, before ``SaveError`` said
    the same in one line, and a traceback through Orbax's threads says nothing about a disk."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" not in record.pathname:
            return True
        if record.levelno >= std_logging.ERROR and _caused_by_the_os(record.exc_info):
            record.exc_info, record.exc_text = None, None
            return True
        if record.levelno != std_logging.WARNING:
            return True
        return not any(expected in record.getMessage() for expected in EXPECTED_ORBAX_WARNINGS)


def _caused_by_the_os(exc_info: Any) -> bool:
    """Whether a log record's exception is, or was raised from, an ``OSError`` or a TensorStore
    error carrying the OS's error code (``_os_error``)."""
    error = exc_info[1] if isinstance(exc_info, tuple) else None
    return any(isinstance(cause, OSError) or _os_error(str(cause)) for cause in _causes(error))


# TensorStore (which writes and reads the arrays) reports an OS error as a status whose text ends
# in the error's code: 'RESOURCE_EXHAUSTED: Error writing "..." in OCDBT database at local file
# "...": Failed writing: "<file>": Failed to write 435174 bytes to file 8: No space left on device
# [os_error_code='28']', raised by Orbax as a plain ValueError.
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='?(\d+)'?\]")
_TENSORSTORE_FILE = re.compile(r'(?:Failed writing|Failed reading|local file): "([^"]+)"')


def _os_error(text: str) -> str | None:
    """A TensorStore status caused by the OS as Python words an ``OSError``, ``[Errno 28] No
    space left on device: '<file>'``; None for any other text."""
    code = _TENSORSTORE_OS_ERROR.search(text)
    if code is None:
        return None
    number = int(code.group(1))
    files = _TENSORSTORE_FILE.findall(text)
    where = f": {files[-1]!r}" if files else ""
    return f"[Errno {number}] {os.strerror(number)}{where}"


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """An asyncio callback that arrived after its event loop was closed: after a failed save
    Orbax 0.12.8 closes the loops of its worker threads while TensorStore's futures still call
    back into them, and Python printed each (up to 44 tracebacks of "RuntimeError: Event loop is
    closed", after the save's own error had been said)."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (
        unraisable.object is None
        and unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"
        and tb is not None
        and tb.tb_frame.f_code.co_name == "_check_closed"
        and tb.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py"))
    )


def _install_closed_loop_filter() -> None:
    """Wraps ``sys.unraisablehook`` to drop ``_is_closed_loop_callback``'s reports (once per
    process; every other unraisable error goes to the hook that was there)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


if not any(isinstance(f, ExpectedOrbaxWarnings) for f in logging.get_absl_logger().filters):
    logging.get_absl_logger().addFilter(ExpectedOrbaxWarnings())
_install_closed_loop_filter()


def _directory(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), SUBDIR)


def _causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error``, then what it was raised from or while handling, innermost last (20 at most)."""
    for _ in range(20):
        if error is None:
            return
        yield error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _reason(error: BaseException) -> str:
    """The cause of a failed read or write in one line: the OS's message (also when TensorStore
    reports it, ``_os_error``) or TensorStore's status (the innermost error: Orbax wraps them in
    generic ones), without the multi-kilobyte spec TensorStore appends."""
    error = list(_causes(error))[-1]
    text = str(error).strip() or type(error).__name__
    if os_error := _os_error(text):
        # A full disk said first: TensorStore's status puts it after two long paths, and cut at
        # 300 characters the line named neither the disk nor the OS's reason.
        text = os_error
    text = re.split(r"\s*\[tensorstore_spec", text.splitlines()[0])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _unreadable_line(directory: str, step: int, error: BaseException) -> str:
    return f"Checkpoint step {step} in {directory} is unreadable ({_reason(error)})"


def _restore_newest_readable(restore, steps: list[int], directory: str) -> tuple[int, Any]:
    """``restore(step)`` for the first of ``steps`` that reads, warning in one line for each
    that does not (a truncated or missing data file: disk fault, copy cut short)."""
    for index, step in enumerate(steps):
        try:
            return step, restore(step)
        except Exception as e:  # Orbax wraps TensorStore's errors in plain Exceptions
            line = _unreadable_line(directory, step, e)
            if index + 1 == len(steps):
                tried = f"; no older step reads either (tried {steps})" if index else ""
                raise UnreadableCheckpointError(f"{line}{tried}.") from e
            logging.warning("%s; falling back to step %d.", line, steps[index + 1])
    raise UnreadableCheckpointError(f"No committed checkpoint in {directory}.")


class _Manager(ocp.CheckpointManager):
    """Orbax's manager without its preemption queries. Orbax calls JAX's
    ``reached_preemption_sync_point(step)`` on each save, from the saving thread and again from
    its finalising thread; each call resets the counter the sync protocol reads, so a stale one
    could set the sync point behind ``vgg_jax.preemption``'s checks and no process would stop. The
    training loop decides preemption saves itself (``force=True`` saves)."""

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpointer:
    """The training loop's checkpoints: save asynchronously, keep the last ``keep`` and the best.

    ``save(..., metrics={BEST_METRIC: x})`` marks a checkpoint as a candidate for "best"; with
    ``keep_best`` the best one survives the "last ``keep``" rule. A failed write raises
    ``SaveError`` from ``check`` (polled every step: it never blocks on a write in progress),
    ``save``, ``wait`` or ``close``, whichever comes first after the write fails.
    """

    def __init__(
        self, workdir: str, keep: int = 3, keep_best: bool = True, async_save: bool = True
    ):
        policies = [checkpoint_managers.LatestN(n=keep)]
        if keep_best:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=(lambda metrics: metrics[BEST_METRIC]) if keep_best else None,
            best_mode="max",
            keep_checkpoints_without_metrics=True,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,  # left by a run killed while saving
        )
        self._workdir = workdir
        self._directory = _directory(workdir)
        self._manager = _Manager(self._directory, item_names=ITEMS, options=options)
        self._writing: int | None = None  # the step whose asynchronous save may still fail
        self._failed = False  # a SaveError was raised

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def save(
        self,
        step: int,
        params: Any,
        opt_state: Any,
        meta: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Starts saving (returns before the write finishes when asynchronous); first raises
        ``SaveError`` if the previous save failed."""
        self.wait()
        self._writing = step
        with self._save_errors():
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                metrics=metrics,
                force=True,
            )
            self._manager.check_for_errors()

    def check(self) -> None:
        """Raises ``SaveError`` if the last save has failed; returns at once while it is still
        writing, so the loop can call it every step."""
        if self._writing is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def restore(
        self, step: int, abstract_params: Any, abstract_opt_state: Any
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Restores a training checkpoint onto the shardings of the abstract trees given."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.params, restored.opt_state, conventions.with_current_key(restored.meta)

    def latest_meta(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, meta)`` of the newest checkpoint, its small JSON item only; None when there
        is no checkpoint or its meta does not read (``restore_latest`` then reports it)."""
        steps = self._manager.all_steps()
        if not steps:
            return None
        step = max(steps)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
        except Exception:  # a damaged step: restore_latest names it and falls back
            return None
        return step, conventions.with_current_key(restored.meta)

    def restore_latest(
        self, abstract_params: Any, abstract_opt_state: Any
    ) -> tuple[int, Any, Any, dict[str, Any]] | None:
        """The newest checkpoint that reads, as ``(step, params, opt_state, meta)``; None when
        there is none. Newer steps that do not read are reported in one line each and moved to
        ``<workdir>/corrupt_checkpoints/`` (process 0), so that training can write those steps
        again."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        step, (params, opt_state, meta) = _restore_newest_readable(
            lambda s: self.restore(s, abstract_params, abstract_opt_state),
            steps,
            self._directory,
        )
        unreadable = [s for s in steps if s > step]
        if unreadable and jax.process_index() == 0:
            for bad in unreadable:
                target = os.path.join(os.path.abspath(self._workdir), CORRUPT_SUBDIR, str(bad))
                if os.path.exists(target):
                    target += f".{int(time.time())}"
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.move(os.path.join(self._directory, str(bad)), target)
                logging.warning("Moved step %d aside to %s; training writes it anew.", bad, target)
        if unreadable:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("vgg_jax: unreadable checkpoints moved")
            self._manager.reload()
        return step, params, opt_state, meta

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed; raises ``SaveError`` if one
        failed (once: Orbax raises the same error again at each wait)."""
        if self._failed:
            return
        with self._save_errors():
            self._manager.wait_until_finished()
        self._writing = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._failed:  # Orbax raises a failed save's error again on close
                    raise
                with contextlib.suppress(Exception):
                    self._manager.close()  # the first stopped at that error: close the rest
            if self._failed:
                self._wait_for_abandoned_writes()
                self._remove_partial_saves()

    @contextlib.contextmanager
    def _save_errors(self) -> Iterator[None]:
        """Turns any error of the save of step ``self._writing`` into one ``SaveError`` line
        with the cause (``close`` then removes the save's partial temporary directory)."""
        try:
            yield
        except Exception as e:
            step, self._writing, self._failed = self._writing, None, True
            raise SaveError(
                f"Saving checkpoint step {step} to {self._directory} failed: {_reason(e)}"
            ) from e

    def _wait_for_abandoned_writes(self) -> None:
        """Orbax's background commit stops at the first item that fails, leaving the others'
        writes running (they would recreate the temporary directory after it is removed). Its
        manager keeps their futures in a private attribute (Orbax 0.12.8; nothing to wait for
        if a later release moves it)."""
        checkpointer = getattr(self._manager, "_checkpointer", None)
        async_manager = getattr(checkpointer, "_async_manager", None)
        for write in getattr(async_manager, "_commit_futures", None) or []:
            with contextlib.suppress(Exception):
                write.result()

    def _remove_partial_saves(self, settle_s: float = 0.5, limit_s: float = 10.0) -> None:
        """Removes the failed save's temporary directories, again if a write Orbax abandoned
        recreates one, until none has appeared for ``settle_s`` (at most ``limit_s``)."""
        if jax.process_index() != 0:
            return
        pattern = os.path.join(glob.escape(self._directory), f"*{TMP_MARKER}*")
        deadline = time.monotonic() + limit_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if leftovers := glob.glob(pattern):
                for path in leftovers:
                    shutil.rmtree(path, ignore_errors=True)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle_s:
                return
            time.sleep(0.05)


def _read_only_manager(workdir: str) -> ocp.CheckpointManager:
    directory = _directory(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints in {workdir}: expected {directory}/<step>/ written by --mode=train "
            "or by python -m vgg_jax.tools.import_weights."
        )
    options = ocp.CheckpointManagerOptions(
        read_only=True,
        best_fn=lambda metrics: metrics[BEST_METRIC],
        best_mode="max",
        keep_checkpoints_without_metrics=True,
    )
    for attempt in range(READ_RETRIES - 1):
        try:
            return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)
        except (FileNotFoundError, NotADirectoryError):
            # A running trainer's keep-last-K deleted a step between Orbax listing the directory
            # and reading that step's timestamp (NotADirectoryError: gone between Orbax's
            # ``exists`` and ``is_dir``); the next listing no longer has it.
            time.sleep(0.05 * (attempt + 1))
    return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)


def available_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps in ``workdir`` (ascending); empty if there are none."""
    if not os.path.isdir(_directory(workdir)):
        return []
    manager = _read_only_manager(workdir)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _no_checkpoint(workdir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"No committed checkpoint in {workdir} ({_directory(workdir)}/<step>/): train it "
        "first (--mode=train) or import weights (python -m vgg_jax.tools.import_weights)."
    )


def checkpoints_directory(workdir: str) -> str:
    """Where ``workdir``'s checkpoints are (``<workdir>/checkpoints``)."""
    return _directory(workdir)


def require_checkpoint_directory(workdir: str) -> None:
    """``require_checkpoint``'s first test, without Orbax: ``workdir`` has a checkpoints
    directory. On several processes Orbax's manager synchronises the processes that open one,
    so a process whose workdir has none must be found out first, by every process
    (``processes.agreed``): the others' next collective was Orbax's while its was the next."""
    if not os.path.isdir(_directory(workdir)):
        raise _no_checkpoint(workdir)


def require_checkpoint(workdir: str, which: str | int = "latest") -> None:
    """Fails at once, naming ``workdir``, when it holds no checkpoint that ``which`` ("latest",
    "best" or a step) could read: before an evaluation prepares its dataset (hours for
    ImageNet)."""
    steps = available_steps(workdir)
    if not steps:
        raise _no_checkpoint(workdir)
    if which not in ("latest", "best") and (step := parse_step(which)) not in steps:
        raise FileNotFoundError(f"No checkpoint at step {step} in {workdir}; available: {steps}")


def read_meta(workdir: str, step: int) -> dict[str, Any]:
    """The JSON item of one committed checkpoint (no arrays are read)."""
    manager = _read_only_manager(workdir)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return conventions.with_current_key(restored.meta)
    finally:
        manager.close()


def training_digest(meta: dict[str, Any]) -> str | None:
    """A short digest of what trained a checkpoint (its run's config, classes and input
    convention, not the step's own figures), to tell one training's step N from another's in
    the same workdir; None for a checkpoint saved without its config (an imported net)."""
    if not meta.get("config"):
        return None
    made_by = {k: meta.get(k) for k in ("config", "class_names", "input_convention")}
    text = json.dumps(jsonable(made_by), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _chosen_step(
    manager: ocp.CheckpointManager, workdir: str, which: str | int, warn: bool = True
) -> tuple[list[int], int]:
    """The committed steps and the one ``which`` ("latest", "best" or a step) names."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"No committed checkpoint in {_directory(workdir)}.")
    if which == "latest":
        return steps, steps[-1]
    if which == "best":
        step = manager.best_step()
        if step is None or manager.metrics(step) is None:
            step = steps[-1]  # nothing was validated yet: the newest is the best we have
            if warn:
                logging.warning(
                    "%s has no validated checkpoint: 'best' is the newest, step %d.", workdir, step
                )
        return steps, step
    step = parse_step(which)
    if step not in steps:
        raise ValueError(f"No checkpoint at step {step} in {workdir}; available: {steps}")
    return steps, step


def chosen_meta(workdir: str, which: str | int = "latest") -> tuple[int, dict[str, Any]]:
    """The step ``which`` names and its meta, no arrays read: what an evaluation checks of every
    net before it evaluates any. A ``latest`` or ``best`` whose files do not read is left to
    ``restore_params``, which falls back to an older step (and is checked again there)."""
    manager = _read_only_manager(workdir)
    try:
        _, step = _chosen_step(manager, workdir, which, warn=False)
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return step, conventions.with_current_key(restored.meta)
    finally:
        manager.close()


def restore_params(
    workdir: str, which: str | int = "latest", abstract_params: Any = None
) -> tuple[Any, int, dict[str, Any]]:
    """Parameters, step and meta of a checkpoint: ``which`` is "latest", "best" or a step.

    No optimiser state is read. ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves with
    shardings) places the arrays; without it each comes back whole on this process's first
    device, whatever topology saved it (``_on_a_local_device``).
    """
    manager = _read_only_manager(workdir)
    try:
        steps, step = _chosen_step(manager, workdir, which)

        def restore(step: int):
            wanted = abstract_params
            if wanted is None:
                wanted = _on_a_local_device(os.path.join(_directory(workdir), str(step), "params"))
            return manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(wanted), meta=ocp.args.JsonRestore()
                ),
            )

        # An explicit step is read or fails; "latest" and "best" fall back to the newest step
        # that reads.
        candidates = [step]
        if which in ("latest", "best"):
            candidates += [s for s in reversed(steps) if s != step]
        step, restored = _restore_newest_readable(restore, candidates, _directory(workdir))
        return restored.params, step, conventions.with_current_key(restored.meta)
    finally:
        manager.close()


def _on_a_local_device(params_directory: str) -> Any:
    """The saved parameters' shapes and dtypes (Orbax's metadata), each placed on this process's
    first device: the whole array on every process, whatever topology saved it.

    Restored as saved instead, a checkpoint of a one-process run read by the second process of a
    job came back on device 0, another process's device (an array with no shard here): every
    step was "unreadable" on process 1, so ``--mode=evaluate`` and ``init_from`` on several
    processes failed there and process 0 waited for it until JAX's shutdown barrier aborted."""
    # The handler, not a Checkpointer, which logged "Metadata file does not exist" for the item
    # directory on every evaluation and prediction.
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(epath.Path(params_directory))
    finally:
        handler.close()
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=local),
        metadata,
        is_leaf=lambda leaf: hasattr(leaf, "shape") and hasattr(leaf, "dtype"),
    )


def parse_step(which: str | int) -> int:
    """A checkpoint step given as an int or a string of digits; anything else fails naming the
    valid choices (``latest``, ``best`` or a step number)."""
    if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
        return int(which)
    raise ValueError(f"Unknown checkpoint {which!r}; valid: 'latest', 'best' or a step number.")


def save_params(
    workdir: str,
    params: Any,
    step: int = 0,
    config: ml_collections.ConfigDict | dict | None = None,
    input_convention: dict | None = None,
    class_names: list[str] | None = None,
) -> str:
    """Writes a params-only checkpoint (e.g. imported weights) that ``--mode=evaluate`` and
    ``init_from`` accept. Returns the checkpoint directory."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    meta = {"config": config, "input_convention": input_convention, "step": step}
    if class_names is not None:
        meta["class_names"] = list(class_names)
    manager = _Manager(
        _directory(workdir),
        item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
    )
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(jax.tree_util.tree_map(jax.numpy.asarray, params)),
                meta=ocp.args.JsonSave(jsonable(meta)),
            ),
            force=True,
        )
        manager.wait_until_finished()
    finally:
        manager.close()
    return os.path.join(_directory(workdir), str(step))


def jsonable(value: Any) -> Any:
    """Tuples to lists and numpy scalars to Python numbers, recursively, for JsonSave."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value
