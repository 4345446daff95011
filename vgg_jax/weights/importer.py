"""Turns imported weights into a vgg_jax checkpoint that ``--mode=evaluate`` and ``init_from`` take.

    python -m vgg_jax.tools.import_weights --source=vgg16-397923af.pth --format=torchvision \\
        --workdir=workdirs/torchvision_vgg16
    python launch.py --config=experiments/vgg16.py --mode=evaluate \\
        --workdir=workdirs/torchvision_vgg16

Formats: ``torchvision`` (a ``vgg11/13/16/19`` state dict, read without PyTorch), ``keras`` (a
Keras VGG16/VGG19 ``.h5``), ``npz`` and ``safetensors`` (vgg_jax's own export). The net, its widths,
class count and crop size come from the weights' shapes and are checked against the model before
anything is written. The checkpoint's meta records the training config of that net (the paper's
defaults with those model values) and the input convention the weights expect, which the
evaluator applies.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from vgg_jax import checkpoint, conventions, models
from vgg_jax.configs import paper
from vgg_jax.weights import classes, export

NUM_IMAGENET_CLASSES = classes.NUM_IMAGENET_CLASSES

# The experiment config of each paper net, for the evaluation command printed at the end.
EXPERIMENTS = {
    "A": "vgg11.py",
    "A-LRN": "vgg11_lrn.py",
    "B": "vgg13.py",
    "C": "vgg16_1x1.py",
    "D": "vgg16.py",
    "E": "vgg19.py",
}


@dataclasses.dataclass
class ImportedNet:
    """What every importer gives: the net (a Table 1 name), its params and input convention."""

    net: str | None
    params: dict[str, Any]
    input_convention: conventions.InputConvention | None
    config: dict[str, Any] | None = None  # the config an export of this project was trained with
    class_names: list[str] | None = None


def _from_torchvision(path: str) -> ImportedNet:
    from vgg_jax.weights import torchvision as torch_weights

    net, params = torch_weights.load_torchvision_weights(path)
    meta = conventions.with_current_key(torch_weights.read_pth_meta(path))
    if meta:
        # vgg_jax's own .pth export: the net was trained on inputs prepared as its meta says (the
        # paper's mean subtraction, Caffe's BGR), not as torchvision's nets were, and its outputs
        # are its run's classes. Read as torchvision's, every score changed without a word.
        return ImportedNet(
            net,
            params,
            meta.get("input_convention"),
            meta.get("config") or None,
            meta.get("class_names"),
        )
    return ImportedNet(net, params, torch_weights.TORCHVISION_INPUT)


def _from_keras(path: str) -> ImportedNet:
    from vgg_jax.weights import keras as keras_weights  # TensorFlow is imported only here

    net, params = keras_weights.load_keras_weights(path)
    return ImportedNet(net, params, keras_weights.KERAS_INPUT)


def _from_export(
    reader: Callable[[str], tuple[dict, dict]],
) -> Callable[[str], ImportedNet]:
    def read(path: str) -> ImportedNet:
        params, meta = reader(path)
        if not meta and params and not any(isinstance(v, Mapping) for v in params.values()):
            # Flat names and no vgg_jax meta: a state dict saved as safetensors (timm's VGGs on the
            # Hugging Face hub, torchvision's, one with nn.DataParallel's "module." prefix), the
            # same names as a .pth, so the same conversion, which names a file of another net's
            # first keys. (vgg_jax's own names, "fc1/kernel", unflatten to nested layers.)
            from vgg_jax.weights import torchvision as torch_weights

            net, converted = torch_weights.params_from_state_dict(params)
            return ImportedNet(net, converted, torch_weights.TORCHVISION_INPUT)
        return ImportedNet(
            meta.get("net"),
            params,
            meta.get("input_convention"),
            meta.get("config") or None,
            meta.get("class_names"),
        )

    return read


def _load_npz_or_arrays(path: str) -> tuple[dict, dict]:
    """``export.load_npz``, or for an ``.npz`` vgg_jax did not write (a state dict saved with
    ``np.savez(path, **state_dict)``) its arrays by name and no meta, as ``load_safetensors``
    reads a safetensors file from elsewhere."""
    if zipfile.is_zipfile(path):
        with np.load(path, allow_pickle=False) as npz:
            if export.NPZ_HEADER_KEY not in npz.files:
                return export.unflatten({name: npz[name] for name in npz.files}), {}
    return export.load_npz(path)


IMPORTERS: dict[str, Callable[[str], ImportedNet]] = {
    "torchvision": _from_torchvision,
    "keras": _from_keras,
    "npz": _from_export(_load_npz_or_arrays),
    "safetensors": _from_export(export.load_safetensors),
}


def load(source: str, fmt: str) -> ImportedNet:
    """Reads ``source`` with the importer of format ``fmt`` (one of ``IMPORTERS``)."""
    if fmt not in IMPORTERS:
        raise ValueError(f"Unknown --format {fmt!r}; valid: {sorted(IMPORTERS)}")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"No weight file at {source}")
    return IMPORTERS[fmt](source)


def fit_model_config(net: str, params: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, int]:
    """The ``model`` config group and crop size of ``net`` that have exactly ``params``' shapes.

    Width, FC width and class count are read off the shapes; the crop size off FC1's window. The
    result is checked against the model's own parameter shapes (``jax.eval_shape``, nothing
    allocated), so a file that does not fit ``net`` fails here, naming the first layer that
    differs.
    """
    if net not in models.LAYOUTS:
        raise ValueError(f"Unknown net {net!r}; valid: {sorted(models.LAYOUTS)}")
    missing = sorted({"block1_conv1", "fc1", "fc3"} - set(params))
    if missing:
        raise ValueError(f"These weights have no layers {missing}; they are not a VGG.")
    last_conv = models.conv_names(net)[-1]
    if last_conv not in params:
        raise ValueError(f"These weights have no layer {last_conv}: not net {net}.")
    last_channels = np.shape(params[last_conv]["kernel"])[-1]
    window = round((np.shape(params["fc1"]["kernel"])[0] / last_channels) ** 0.5)
    config = paper.model_config(net)
    config.fc_width = int(np.shape(params["fc1"]["kernel"])[-1])
    config.num_classes = int(np.shape(params["fc3"]["kernel"])[-1])
    crop_size = int(window * 2**models.NUM_POOLS)
    actual = _shapes(params)
    config.width = _width_of(config, crop_size, actual)
    expected = _shapes(models.abstract_params(models.build_model(config, crop_size)))
    for name in sorted(set(expected) | set(actual)):
        if expected.get(name) != actual.get(name):
            raise ValueError(
                f"These weights do not fit net {net} (width {config.width:g}, FC width "
                f"{config.fc_width}, {config.num_classes} classes, crop {crop_size}): {name} is "
                f"{actual.get(name, 'missing')} in the file, {expected.get(name, 'absent')} in the "
                "model. Pass the right --net."
            )
    return config, crop_size


def _width_of(
    config: ml_collections.ConfigDict, crop_size: int, shapes: Mapping[str, tuple[int, ...]]
) -> float:
    """The ``model.width`` that gives every conv of ``shapes`` its channel count: a conv of
    ``base`` channels in Table 1 has ``max(1, round(width * base))``, so each count bounds the
    width to an interval; the middle of their intersection (the first conv's count alone, over
    64, misses most widths that are not multiples of 1/64). Falls back to that first estimate
    when no width fits all (the shape check then names the layer)."""
    full = config.copy_and_resolve_references()
    full.width = 1.0
    bases = _shapes(models.abstract_params(models.build_model(full, crop_size)))
    low, high = 0.0, float("inf")
    for name, shape in shapes.items():
        if "_conv" in name and name.endswith("/bias") and name in bases:
            channels, base = shape[0], bases[name][0]
            low = max(low, (channels - 0.5) / base if channels > 1 else 0.0)
            high = min(high, (channels + 0.5) / base)
    if low < high < float("inf"):
        return (low + high) / 2
    return shapes["block1_conv1/bias"][0] / 64


def training_config(
    net: str, params: Mapping[str, Any], exported: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """What the checkpoint's meta records as the config it belongs to: the config an export of
    this project carries (its dataset, input statistics and widths: a net trained on an image
    folder predicts with that folder's settings) when its model fits ``params``, else the
    paper's config of ``net`` (scale variant s256) with the model group fitted to ``params``."""
    if exported and exported.get("model", {}).get("name") == net:
        config = ml_collections.ConfigDict(dict(exported))
        crop_size = int(config.input.crop_size)
        expected = _shapes(models.abstract_params(models.build_model(config.model, crop_size)))
        if expected == _shapes(params):
            return config
    model_config, crop_size = fit_model_config(net, params)
    config = paper.paper_config(net, None)
    config.model = model_config
    config.input.crop_size = crop_size
    return config


def import_to_checkpoint(
    source: str,
    fmt: str,
    workdir: str,
    net: str | None = None,
    input_convention: str | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Imports ``source`` and writes it to ``workdir`` as a params-only checkpoint at step 0.

    ``net`` names the net when the file does not (a net A-LRN export with no meta; nets with
    equal parameter shapes cannot be told apart), and must agree with the file when it does.
    ``input_convention`` (a text ``conventions.from_text`` reads, or a dict) overrides or
    supplies the input convention. Returns a summary: net, params count, input_convention,
    checkpoint directory and the config written.
    """
    if checkpoint.available_steps(workdir):
        raise FileExistsError(
            f"{workdir} already holds checkpoints {checkpoint.available_steps(workdir)}; "
            "import into a new --workdir so 'latest' is the imported net."
        )
    imported = load(source, fmt)
    if net and imported.net and net != imported.net:
        raise ValueError(
            f"{source} holds net {imported.net}, not --net={net}; drop --net (it is for files "
            "that do not say which net they hold)."
        )
    chosen_net = net or imported.net
    if chosen_net is None:
        raise ValueError(
            f"{source} does not say which net it holds; pass --net (one of "
            f"{sorted(models.LAYOUTS)})."
        )
    if isinstance(input_convention, str):
        input_convention = conventions.from_text(input_convention)
    input_convention = input_convention or imported.input_convention
    if input_convention is None:
        raise ValueError(
            f"{source} does not state the input convention its weights expect; pass "
            f"--input_convention (one of {sorted(conventions.NAMED)}, or a JSON object: "
            "docs/weights.md)."
        )
    input_convention = conventions.checked(input_convention)
    config = training_config(chosen_net, imported.params, imported.config)
    # Parameters stay float32 (models.py): a bfloat16 or float16 file is widened exactly.
    params = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(np.float32), imported.params)
    export.check_finite(source, params)
    names = imported.class_names
    outputs = int(np.shape(params["fc3"]["bias"])[0]) if "fc3" in params else None
    if names is not None and outputs is not None and len(names) != outputs:
        raise ValueError(
            f"{source} names {len(imported.class_names)} classes for a net with {outputs} "
            "outputs: its class names are not its net's (an edited or mixed-up file)."
        )
    if names is None and outputs == NUM_IMAGENET_CLASSES and config.input.dataset == "imagenet2012":
        # An ImageNet net (torchvision's, Keras's, a timm state dict): its outputs are the
        # ILSVRC-2012 classes in label order. Recorded, so a dataset of other classes or another
        # order (an image folder of class folders "0".."999", which sort "0", "1", "10", ...)
        # is refused by the evaluator and init_from; it was scored output i as its class i.
        names = classes.imagenet_wnids()
    directory = checkpoint.save_params(
        workdir,
        params,
        step=0,
        config=config,
        input_convention=dict(input_convention),
        class_names=names,
    )
    return dict(
        net=chosen_net,
        num_params=models.count_params(params),
        input_convention=input_convention,
        checkpoint=directory,
        config=config,
    )


def evaluate_command(net: str, config: ml_collections.ConfigDict, workdir: str) -> str:
    """The ``launch.py`` line that evaluates the imported net (with overrides for small nets);
    for a net this project trained on other data, with the config it was trained with."""
    if config.input.dataset != "imagenet2012":
        return (
            f"python launch.py --config=<the config it was trained with> --mode=evaluate "
            f"--workdir={workdir}  (it was trained on {config.input.dataset}"
            f"{' ' + config.input.folder if config.input.get('folder') else ''})"
        )
    defaults = paper.model_config(net)
    overrides = [
        f"--config.model.{key}={config.model[key]}"
        for key in ("width", "fc_width", "num_classes")
        if config.model[key] != defaults[key]
    ]
    if config.input.crop_size != 224:
        overrides.append(f"--config.input.crop_size={config.input.crop_size}")
    return " ".join(
        ["python launch.py", f"--config=experiments/{EXPERIMENTS[net]}", "--mode=evaluate"]
        + overrides
        + [f"--workdir={workdir}"]
    )


def _shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{"fc1/kernel": shape, ...}`` of a parameter tree (arrays or ``ShapeDtypeStruct``)."""
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {name: tuple(np.shape(leaf)) for name, leaf in flat.items()}
