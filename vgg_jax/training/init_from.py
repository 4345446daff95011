"""Initialising a net from another run's checkpoint, as the paper does (section 3.1).

``shallow``: the paper trains net A from random init, then starts the deeper nets with "the first
four convolutional layers and the last three fully-connected layers" of net A, the rest random.
A's first four convs (64, 128, 256, 256 channels) only fit the deeper nets' layers of the same
names (``block1_conv1``, ``block2_conv1``, ``block3_conv1``, ``block3_conv2``: the first conv of
blocks 1-2 and the first two of block 3), so that is where they go; FC1-FC3 copy across unchanged.

``fc``: only net A's three FC layers, for a net whose convs have other shapes than A's (the study's
B-5x5, section 4.1, whose 5x5 kernels cannot take A's 3x3 ones); its convs start random.

``full``: every layer from a run of the same net, for the paper's scale fine-tuning (the S=384 net
from the S=256 net, the jittered net from the S=384 net), with the config's lower learning rate.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vgg_jax import checkpoint

MODES = ("none", "shallow", "fc", "full")
FC_LAYERS = ("fc1", "fc2", "fc3")
SHALLOW_LAYERS = ("block1_conv1", "block2_conv1", "block3_conv1", "block3_conv2", *FC_LAYERS)


# The nets each mode copies from (section 3.1): the deeper nets start from the trained net A.
SOURCE_NETS = {"shallow": ("A", "A-LRN"), "fc": ("A", "A-LRN")}


# The modes that copy the first conv, whose weights were trained on inputs in the source's input
# convention (channel order, pixel range, mean, std): the run must feed its net that convention.
FIRST_CONV = "block1_conv1"


def recorded_net(meta: dict[str, Any]) -> str | None:
    """The net a checkpoint's record names (None for imported weights that name none)."""
    return ((meta.get("config") or {}).get("model") or {}).get("name")


def source_net_problem(mode: str, net: str | None, meta: dict[str, Any]) -> str | None:
    """What is wrong with copying ``mode``'s layers into net ``net`` from a checkpoint of
    ``meta``'s net (``copies from net A or A-LRN``), None when nothing is or the net is not
    recorded. Also run at start-up (``checks``), before the data is prepared."""
    source_net = recorded_net(meta)
    wanted = SOURCE_NETS.get(mode, (net,) if net else ())
    if source_net is not None and wanted and source_net not in wanted:
        return f"copies from net {' or '.join(wanted)}"
    return None


def initialise(
    init_config: ml_collections.ConfigDict,
    fresh: dict[str, Any],
    net: str | None = None,
    class_names: list[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``fresh`` (a new net's params, of net ``net``) with the layers ``init_from`` names replaced.

    Shardings and dtypes of ``fresh`` are kept; a layer whose shape differs fails loudly, naming
    the layer. The source must be the net the mode copies from, as its checkpoint's config names
    it (``shallow``, ``fc``: net A; ``full``: ``net`` itself): other nets share layer names and
    shapes (E's are a superset of D's) and would be copied without a word. Every mode copies FC3,
    whose output i is class i of the source's dataset: the source's recorded class names must be
    ``class_names`` (this run's), when both are known. A log line names the source, its step and
    the layers copied.

    Returns the parameters and, when the first conv is copied (``shallow``, ``full``), the input
    convention the source was trained with (None when it copies no conv or the source records
    none): a run that copies A's first conv from an imported torchvision net (RGB in 0-1 divided
    by the std) and fed it the paper's 0-255 mean-subtracted pixels saw inputs about 58 times too
    large, and one from a Keras (Caffe, BGR) net saw its colours swapped.
    """
    if init_config.mode not in MODES:
        raise ValueError(f"Unknown init_from.mode {init_config.mode!r}; valid: {list(MODES)}")
    if init_config.mode == "none":
        return fresh, None
    if not init_config.workdir:
        raise ValueError(f"init_from.mode={init_config.mode!r} needs init_from.workdir.")
    which = "latest" if init_config.step is None else init_config.step
    source, step, meta = checkpoint.restore_params(init_config.workdir, which)
    if init_config.step is None and meta.get("final") is False:
        # A trainer's checkpoints say whether they end its schedule; imported weights say nothing.
        logging.warning(
            "init_from %s: its newest checkpoint, step %d, is not the end of its training (the "
            "run is still training or was stopped): this run starts from a net not trained to "
            "the end (section 3.1 starts the deeper nets from the trained net A), and a restart "
            "before this run's first checkpoint would copy a later step. Let it finish, or name "
            "a step with init_from.step.",
            init_config.workdir,
            step,
        )
    source_net = recorded_net(meta)
    if problem := source_net_problem(init_config.mode, net, meta):
        raise checkpoint.NetMismatchError(
            f"init_from.mode={init_config.mode!r} {problem}; {init_config.workdir} step {step} "
            f"holds net {source_net}."
        )
    if difference := checkpoint.class_difference(meta.get("class_names"), class_names):
        raise checkpoint.NetMismatchError(
            f"init_from {init_config.workdir} step {step} was trained on other classes than "
            f"this run's dataset ({difference}): its FC3 would score each class as another."
        )
    names = {"shallow": SHALLOW_LAYERS, "fc": FC_LAYERS}.get(init_config.mode, tuple(fresh))
    missing = [n for n in names if n not in source or n not in fresh]
    if missing:
        raise checkpoint.NetMismatchError(
            f"init_from {init_config.workdir}: layers {missing} not in both nets."
        )
    params = dict(fresh)
    for name in names:
        try:
            params[name] = jax.tree_util.tree_map(_copy_into, fresh[name], source[name])
        except ValueError as e:
            raise checkpoint.NetMismatchError(
                f"init_from {init_config.workdir} step {step}: {name}: {e}"
            ) from None
    logging.info(
        "Initialised %d layers from %s step %d (net %s): %s.",
        len(names),
        init_config.workdir,
        step,
        source_net or "not recorded",
        ", ".join(names),
    )
    convention = meta.get("input_convention") if FIRST_CONV in names else None
    return params, convention


def _copy_into(target: jax.Array, value: Any) -> jax.Array:
    value = np.asarray(value)
    if value.shape != target.shape:
        raise ValueError(
            f"shape {value.shape} does not fit {target.shape} (widths, class count and crop "
            "size must match)."
        )
    return jax.device_put(value.astype(target.dtype), target.sharding)
