"""Import of Keras ``VGG16``/``VGG19`` weights (a Keras model or its ``.h5`` weight file).

Keras' VGG is NHWC with ``Flatten`` in (H, W, C) order, the layout of ``vgg_jax.models.VGG``, so the
kernels copy across unchanged. The released Keras ImageNet weights expect Caffe's input convention:
BGR channel order, 0-255 pixels, mean [103.939, 116.779, 123.68] subtracted (``KERAS_INPUT``).
TensorFlow/Keras is imported only when a Keras model has to be built.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from vgg_jax import conventions, models

# Keras builds only configurations D and E; the number of conv layers tells them apart.
KERAS_NETS = {13: ("D", "VGG16"), 16: ("E", "VGG19")}

# Caffe's convention: BGR, 0-255, mean [103.939, 116.779, 123.68] subtracted, std 1.
KERAS_INPUT = conventions.CAFFE


def params_from_keras_model(keras_model: Any) -> tuple[str, dict[str, Any]]:
    """Returns ``(net name, params)`` from a built Keras VGG16/VGG19 model (any class count)."""
    weighted = []
    leaves = _leaf_layers(keras_model)
    _check_layers(leaves)
    for layer in leaves:
        weights = layer.get_weights()
        if not weights:
            continue
        if len(weights) != 2 or np.ndim(weights[0]) not in (2, 4):
            # A BatchNormalization in a fine-tuned head, say: dropping it would change every
            # output without a word.
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}, {len(weights)} weight arrays) is "
                "neither a conv nor a dense layer with its bias; vgg_jax's VGG has no place for it."
            )
        weighted.append(weights)
    convs = [w for w in weighted if np.ndim(w[0]) == 4]
    denses = [w for w in weighted if np.ndim(w[0]) == 2]
    if len(convs) not in KERAS_NETS or len(denses) != 3:
        raise ValueError(
            "Expected a Keras VGG16 or VGG19 with its top (13 or 16 convs and 3 dense layers), got "
            f"{len(convs)} convs and {len(denses)} dense layers; build it with include_top=True."
        )
    net, _ = KERAS_NETS[len(convs)]
    params = {}
    for name, (kernel, bias) in zip(
        models.conv_names(net) + ["fc1", "fc2", "fc3"], convs + denses, strict=True
    ):
        params[name] = {
            "kernel": np.asarray(kernel, np.float32),
            "bias": np.asarray(bias, np.float32),
        }
    if _flattens_channels_first(leaves):
        params["fc1"]["kernel"] = _fc1_rows_channels_last(
            params["fc1"]["kernel"], convs[-1][1].size
        )
    return net, params


def _flattens_channels_first(layers: list[Any]) -> bool:
    """Whether the model's Flatten lays pool5's map out channel by channel, ``(C, H, W)``: convs
    and pools in ``channels_first`` before a Flatten in ``channels_last`` (Keras' default, and
    what a Keras 2.0 Flatten, which had no ``data_format``, loads as). FC1's rows then follow
    that order, not vgg_jax's ``(H, W, C)``: imported as they were, every output changed without
    a word. (A ``channels_first`` Flatten moves the channels last first: its rows are
    vgg_jax's.)"""
    spatial = [layer for layer in layers if type(layer).__name__ in ("Conv2D", "MaxPooling2D")]
    formats = sorted({getattr(layer, "data_format", "channels_last") for layer in spatial})
    if len(formats) > 1:
        raise ValueError(
            f"The model's convs and pools mix data formats ({', '.join(formats)}); vgg_jax's VGG "
            "reads one image layout throughout."
        )
    flatten = [layer for layer in layers if type(layer).__name__ == "Flatten"]
    return (
        formats == ["channels_first"]
        and bool(flatten)
        and getattr(flatten[-1], "data_format", "channels_last") == "channels_last"
    )


def _fc1_rows_channels_last(kernel: np.ndarray, channels: int) -> np.ndarray:
    """FC1's kernel with its rows moved from ``(C, H, W)`` order to ``(H, W, C)``."""
    window = round((kernel.shape[0] / channels) ** 0.5)
    if channels * window * window != kernel.shape[0]:
        raise ValueError(
            f"FC1 has {kernel.shape[0]} inputs, not a square map of {channels} channels."
        )
    rows = kernel.reshape(channels, window, window, kernel.shape[1])
    return np.ascontiguousarray(rows.transpose(1, 2, 0, 3).reshape(kernel.shape))


# Layers without weights that VGG has: anything else (GlobalAveragePooling2D before the dense
# layers, a Rescaling or Lambda of the input) computes something vgg_jax's VGG does not.
VGG_LAYERS_WITHOUT_WEIGHTS = ("InputLayer", "MaxPooling2D", "Flatten", "Dropout")


def _check_layers(layers: list[Any]) -> None:
    """Refuses a model that computes something else than VGG with the same weights: a layer VGG
    does not have, a conv that is not 3x3 stride 1 "same", a hidden layer whose activation is not
    ReLU, a last layer with one other than none or softmax. A fine-tuned head with average
    pooling or tanh imported as VGG would score every image differently than Keras does."""
    weighted = [layer for layer in layers if layer.get_weights()]
    for layer in layers:
        kind = type(layer).__name__
        if not layer.get_weights() and kind not in VGG_LAYERS_WITHOUT_WEIGHTS:
            raise ValueError(f"Layer {layer.name!r} ({kind}) is not part of VGG; vgg_jax's VGG "
                             f"has only {', '.join(VGG_LAYERS_WITHOUT_WEIGHTS)} between its "
                             "conv and dense layers.")  # fmt: skip
        if kind == "Conv2D" and (
            tuple(layer.strides) != (1, 1)
            or layer.padding != "same"
            or tuple(layer.dilation_rate) != (1, 1)
        ):
            raise ValueError(f"Conv layer {layer.name!r} has strides {layer.strides}, padding "
                             f"{layer.padding!r}; VGG's are stride 1, 'same'.")  # fmt: skip
        activation = getattr(getattr(layer, "activation", None), "__name__", None)
        if layer in weighted and activation is not None:
            allowed = ("linear", "softmax") if layer is weighted[-1] else ("relu",)
            if activation not in allowed:
                raise ValueError(
                    f"Layer {layer.name!r} ({kind}) has activation {activation!r}; VGG's is "
                    f"{' or '.join(repr(a) for a in allowed)} there."
                )


def _leaf_layers(keras_model: Any) -> list[Any]:
    """The layers of ``keras_model`` in order, those of a model nested in it (the usual
    fine-tuning layout, ``Sequential([VGG16(include_top=False), Flatten(), Dense(...), ...])``)
    in its place: the nested model's ``get_weights`` would be all its convs' arrays at once."""
    layers = []
    for layer in keras_model.layers:
        layers += _leaf_layers(layer) if hasattr(layer, "layers") else [layer]
    return layers


def load_keras_weights(source: Any) -> tuple[str, dict[str, Any]]:
    """Returns ``(net name, params)`` from a Keras model or a Keras ``.h5`` weight file.

    A weights-only file, Keras 3's ``.weights.h5`` or the legacy Keras 2 format of the released
    ``vgg16_weights_tf_dim_ordering_tf_kernels.h5``, is read by Keras itself into a freshly built
    ``keras.applications`` net, whose class count is taken from the file. A whole saved model,
    Keras 3's ``.keras`` archive or Keras 2's ``model.save("x.h5")``, is loaded as the model it
    holds (``keras.saving.load_model``, which also reads one that nests VGG16 in another).
    """
    if not isinstance(source, (str, os.PathLike)):
        return params_from_keras_model(source)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No Keras weight file at {path}")
    if _is_whole_model(path):
        import keras

        try:
            keras_model = keras.saving.load_model(path, compile=False)
        except (TypeError, ValueError) as e:  # a custom layer Keras cannot locate: a TypeError
            said = str(e).strip().splitlines()[0]
            raise ValueError(f"Keras could not load the model saved in {path}: {said}") from None
        return params_from_keras_model(keras_model)
    num_convs, num_classes = _inspect_h5(path)
    if num_convs not in KERAS_NETS:
        raise ValueError(f"{path} holds {num_convs} conv kernels; VGG16 has 13 and VGG19 16.")
    import keras

    builder = getattr(keras.applications, KERAS_NETS[num_convs][1])
    keras_model = builder(weights=None, classes=num_classes)
    try:
        keras_model.load_weights(path)
    except ValueError as e:  # Keras' message lists every layer it could not fill
        said = str(e).strip().splitlines()[0]
        raise ValueError(
            f"Keras could not read {path} into keras.applications.{builder.__name__}(classes="
            f"{num_classes}) ({said}). A weights-only file is read in that net's layout only, not "
            "in one that nests VGG16 in another model: save the whole model (model.save('x.keras'))"
            " or pass the built model to load_keras_weights."
        ) from None
    return params_from_keras_model(keras_model)


# Top-level groups of an optimizer's state: Keras 3's ``.weights.h5`` of a compiled model
# (``optimizer/vars/<i>``) and Keras 2's ``model.save("x.h5")`` (``optimizer_weights/...``). An
# Adam state holds two slots shaped like every kernel; Keras' ``load_weights`` skips them.
OPTIMIZER_GROUPS = ("optimizer", "optimizer_weights")


def _inspect_h5(path: str) -> tuple[int, int]:
    """Counts 4-D (conv) kernels and reads the class count from the last 2-D (dense) kernel,
    among the model's weights (an optimizer's state, saved beside them after training, is not
    counted)."""
    import h5py

    kernels: list[tuple[int, ...]] = []

    def visit(name: str, item: Any) -> None:
        if name.split("/")[0] in OPTIMIZER_GROUPS:
            return
        if isinstance(item, h5py.Dataset) and item.ndim in (2, 4):
            kernels.append(item.shape)

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    dense = [shape for shape in kernels if len(shape) == 2]
    fc1 = [shape for shape in dense if shape[0] == 7 * 7 * 512]
    if not dense and sum(len(shape) == 4 for shape in kernels) in KERAS_NETS:
        # keras.applications' "..._notop.h5": the convs alone, a feature extractor.
        raise ValueError(
            f"{path} holds a VGG's convs but no fully connected layers: saved with "
            "include_top=False (a 'notop' file). vgg_jax's nets end in FC1-FC3; import the file "
            "with them (include_top=True)."
        )
    if len(dense) != 3 or len(fc1) != 1:
        raise ValueError(f"{path} does not hold a VGG with its 3 fully connected layers.")
    # FC2 and FC3 both take FC1's width as input; FC3's output is the class count.
    outputs = [shape[1] for shape in dense if shape is not fc1[0]]
    outputs.remove(fc1[0][1])
    return sum(len(shape) == 4 for shape in kernels), outputs[0]


def _is_whole_model(path: str) -> bool:
    """A ``.keras`` archive (a zip) or a legacy ``.h5`` that holds the model's config too. A file
    that is neither HDF5 nor a Keras archive is a ``ValueError`` saying so (h5py's own error is an
    ``OSError``, "file signature not found")."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "config.json" not in archive.namelist():
                raise ValueError(f"{path} is a zip file but not a Keras .keras archive.")
        if not path.endswith(".keras"):
            raise ValueError(f"{path} is a Keras model archive: Keras reads it only under a name "
                             "ending in '.keras'. Rename it.")  # fmt: skip
        return True
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "model_config" in f.attrs
    except OSError as e:
        raise ValueError(
            f"{path} is not an HDF5 file, which Keras .h5 and .weights.h5 files are ({e})."
        ) from None
