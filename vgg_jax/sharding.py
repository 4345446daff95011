"""The device mesh and where parameters and batches live on it.

A ``data`` axis spans every device of every process (batches are split along it); an optional
``model`` axis shards the two large FC matrices, which hold about 120M of D's 138M parameters:
FC1's output columns and FC2's input rows (Megatron-style: column-parallel then row-parallel, so
the activation between them stays sharded). Everything else is replicated. Works unchanged for one
CPU, one GPU host or many hosts under ``jax.distributed``.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """A ``(data, model)`` mesh over all devices; ``-1`` for one axis means "the rest"."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = given = int(mesh_config.data), int(mesh_config.model)
    if bad := [
        f"mesh.{k}={v}" for k, v in zip((DATA, MODEL), given, strict=True) if v == 0 or v < -1
    ]:
        # model=0 divided by zero, data=-2 made a negative axis; launch.py's config check names
        # them first, but a notebook calling this directly got numpy's or Python's error.
        raise ValueError(f"{', '.join(bad)}: each axis is a device count >= 1, or -1 for the rest.")
    if data == -1 and model == -1:
        raise ValueError("Only one of mesh.data and mesh.model may be -1.")
    if data == -1:
        data = len(devices) // model
    if model == -1:
        model = len(devices) // data
    if data * model != len(devices):
        raise ValueError(
            f"mesh.data={data} x mesh.model={model} does not match the {len(devices)} devices."
        )
    grid = np.asarray(devices).reshape(data, model)
    if any(len({d.process_index for d in row}) > 1 for row in grid):
        per_process = sum(d.process_index == devices[0].process_index for d in devices)
        raise ValueError(model_axis_problem(*given, model, per_process))
    return Mesh(grid, (DATA, MODEL))


def model_axis_problem(data: int, model: int, model_devices: int, local_devices: int) -> str:
    """Why ``config.mesh`` (``data`` x ``model``, as given), whose model axis holds
    ``model_devices`` devices, cannot run on processes of ``local_devices`` devices each.

    Each process feeds its own rows of every batch (``global_batch``: the input pipeline's
    share), so the devices holding one data row, a row of the grid, must be one process's. Two
    processes of two devices with a 1 x 4 mesh each made a "global" batch of their own 8 rows of
    16, the copies of one array differing between devices; an evaluation counted 24 of the 40
    examples and failed after all its work."""
    return (
        f"config.mesh.data={data} x config.mesh.model={model}: a model axis of {model_devices} "
        f"devices would span processes of {local_devices} devices each, which feed different "
        f"rows of every batch; use a mesh.model that divides {local_devices}"
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; replicated over ``model``."""
    return NamedSharding(mesh, P(DATA))


def fc_splits(fc_width: Any, model_size: int) -> bool:
    """Whether FC1's output columns and FC2's input rows, ``fc_width`` of each, split over a
    ``model`` axis of ``model_size`` devices; when not, they are replicated (the same numbers)."""
    return model_size == 1 or (isinstance(fc_width, int) and fc_width % model_size == 0)


def _param_spec(path: tuple[str, ...], shape: tuple[int, ...], model_size: int) -> P:
    layer, leaf = path[0], path[-1]
    if model_size > 1 and layer in ("fc1", "fc2"):
        if layer == "fc1" and fc_splits(shape[-1], model_size):
            return P(None, MODEL) if leaf == "kernel" else P(MODEL)
        if layer == "fc2" and leaf == "kernel" and fc_splits(shape[0], model_size):
            return P(MODEL, None)
    return P()


def param_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """Shardings for a params-shaped tree (or any tree with params-shaped subtrees, like
    optimiser momenta): FC1/FC2 split over ``model``, the rest replicated."""
    model_size = mesh.shape[MODEL]

    def spec(path, leaf):
        names = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        # Find the layer name inside optimiser-state paths like ("trace", "fc1", "kernel").
        layer_at = next((i for i, n in enumerate(names) if n in ("fc1", "fc2")), None)
        if layer_at is None or not hasattr(leaf, "shape"):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _param_spec(names[layer_at:], tuple(leaf.shape), model_size))

    return jax.tree_util.tree_map_with_path(spec, abstract_tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of a batch into one global array sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }
