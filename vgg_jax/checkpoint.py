"""Every Orbax call of the project, behind a few functions.

Layout: ``<workdir>/checkpoints/<step>/{params, opt_state, meta}``. ``params`` and ``opt_state`` are
array trees (saved sharded, restored onto any mesh); ``meta`` is JSON: the training config, the
plateau schedule's state, the input pipeline's state (the batches are a pure function of the seed
and the step, so the step *is* the pipeline's position), validation metrics and, for imported
weights, their input convention. The evaluator restores only ``params`` and ``meta``.

Orbax writes each checkpoint into a temporary directory and renames it only once every file is
committed, and ``CheckpointManager`` never lists an uncommitted one: a run killed mid-save resumes
from the previous checkpoint. Orbax's API changes between releases; requirements.txt pins it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

SUBDIR = "checkpoints"
ITEMS = ("params", "opt_state", "meta")
BEST_METRIC = "val_top1_accuracy"  # higher is better
READ_RETRIES = 5  # listings of a directory that a running trainer is pruning (_read_only_manager)


def _directory(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), SUBDIR)


class Checkpointer:
    """The training loop's checkpoints: save asynchronously, keep the last ``keep`` and the best.

    ``save(..., metrics={BEST_METRIC: x})`` marks a checkpoint as a candidate for "best"; with
    ``keep_best`` the best one survives the "last ``keep``" rule.
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
        )
        self._manager = ocp.CheckpointManager(
            _directory(workdir), item_names=ITEMS, options=options
        )

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
        """Starts saving (returns before the write finishes when asynchronous)."""
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
        return restored.params, restored.opt_state, dict(restored.meta)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


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
        except FileNotFoundError:
            # A running trainer's keep-last-K deleted a step between Orbax listing the directory
            # and reading that step's timestamp; the next listing no longer has it.
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


def restore_params(
    workdir: str, which: str | int = "latest", abstract_params: Any = None
) -> tuple[Any, int, dict[str, Any]]:
    """Parameters, step and meta of a checkpoint: ``which`` is "latest", "best" or a step.

    No optimiser state is read. ``abstract_params`` (``jax.ShapeDtypeStruct`` leaves with
    shardings) places the arrays; without it they come back as they were saved, on one device.
    """
    manager = _read_only_manager(workdir)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"No committed checkpoint in {_directory(workdir)}.")
        if which == "latest":
            step = steps[-1]
        elif which == "best":
            step = manager.best_step()
            if step is None or manager.metrics(step) is None:
                step = steps[-1]  # nothing was validated yet: the newest is the best we have
        else:
            step = parse_step(which)
            if step not in steps:
                raise ValueError(f"No checkpoint at step {step} in {workdir}; available: {steps}")
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                # Saved by another topology (more processes or devices): onto one local device.
                params=ocp.args.StandardRestore(
                    abstract_params,
                    fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.params, step, dict(restored.meta)
    finally:
        manager.close()


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
    normalization: dict | None = None,
) -> str:
    """Writes a params-only checkpoint (e.g. imported weights) that ``--mode=evaluate`` and
    ``init_from`` accept. Returns the checkpoint directory."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    meta = {"config": config, "normalization": normalization, "step": step}
    manager = ocp.CheckpointManager(
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
