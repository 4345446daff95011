"""Import of torchvision ``vgg11/13/16/19`` state dicts (``.pth``) without PyTorch.

A ``.pth`` written by ``torch.save`` is a pickle whose tensors point at raw storages. Two layouts
exist: the zip archive of PyTorch >= 1.6 (``<name>/data.pkl`` plus ``<name>/data/<key>``, one file
per storage) and the legacy stream that torchvision's own download files still use (magic number,
then the pickle, then every storage's bytes in key order). Both are read here by a restricted
unpickler that knows only the few names a state dict of tensors uses and rebuilds each tensor as a
NumPy array; anything else in the file (a pickled ``nn.Module``, code) is refused.

torchvision's VGG is NCHW: conv weights are ``(out, in, kh, kw)`` (OIHW), linear weights
``(out, in)``, and FC1's input is the last conv map flattened in (C, H, W) order. vgg_jax is
NHWC: kernels are HWIO and FC1's rows are in (H, W, C) order, so FC1 is permuted, not just
transposed. torchvision's ``vgg*_bn`` nets (batch norm after each conv) are not the paper's nets
and are refused. The weights expect ``TORCHVISION_INPUT``.
"""

from __future__ import annotations

import codecs
import collections
import io
import json
import os
import pickle
import re
import struct
import sys
import types
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np
from absl import logging

from vgg_jax import conventions, models

TORCHVISION_INPUT = conventions.TORCHVISION

# torchvision name per paper net: the number of convs tells them apart (no C in torchvision).
TORCHVISION_NETS = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}
CLASSIFIER_INDICES = (0, 3, 6)  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
# vgg_jax's meta in a .pth it exported: one more record in the zip, beside data.pkl, which
# torch.load does not read (it opens only the records the pickle names).
META_RECORD = "vgg_jax_meta.json"

_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",  # registered with NumPy by ml_dtypes, which JAX imports
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


# ---------------------------------------------------------------------------------------------
# Reading ``.pth`` files.


class _StorageType:
    """Stands for ``torch.FloatStorage`` and friends while unpickling."""

    def __init__(self, name: str):
        import ml_dtypes  # noqa: F401  (makes np.dtype("bfloat16") known)

        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _StorageRef:
    """A storage named in the pickle; its bytes are read once the pickle is done (the legacy
    format stores them after it)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *_) -> _TensorRef:
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_) -> _TensorRef:
    return data


try:
    from numpy._core import multiarray as _numpy_multiarray  # numpy >= 2
except ImportError:
    from numpy.core import multiarray as _numpy_multiarray

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    # timm's train.py saves its command line's arguments beside the state dict ("args" in
    # model_best.pth.tar); read as a plain record of values, no code of argparse's runs.
    ("argparse", "Namespace"): types.SimpleNamespace,
    # numpy values beside the weights (a best_acc1 of np.float64, an array of per-class counts)
    # as numpy pickles them, 1.x and 2.x: plain numbers and arrays, no code of the writer's runs.
    **{
        (module, name): getattr(_numpy_multiarray, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("scalar", "_reconstruct")
    },
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("_codecs", "encode"): codecs.encode,  # how protocol 2 pickles a numpy scalar's bytes
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RefusedPickle(pickle.UnpicklingError):
    """What ``_StateDictUnpickler`` refuses; its message names the file and what it holds (other
    ``UnpicklingError``s are pickle's own, about damaged data)."""


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict of tensors into ``_TensorRef`` leaves, refusing anything else."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _RefusedPickle(
            f"{self.source} pickles {module}.{name}, which is not part of a state dict of "
            "tensors. Save the weights with torch.save(model.state_dict(), path), not the model."
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        # zip: (tag, type, key, location, numel); legacy adds view_metadata.
        if not isinstance(pid, tuple) or pid[0] != "storage" or len(pid) not in (5, 6):
            raise _RefusedPickle(f"{self.source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _, numel, *view = pid
        if view and view[0] is not None:
            raise _RefusedPickle(f"{self.source}: storage views are not supported.")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _StorageRef(key, storage_type.dtype, int(numel))
        return self.storages[key]


ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local file header


def read_pth(path: str | os.PathLike) -> Any:
    """The object saved in a ``.pth`` file (typically a state dict), tensors as NumPy arrays.

    Every problem with the file is a ``ValueError`` whose one line says what is wrong: a pickled
    model instead of its state dict, a zip archive cut short (an interrupted download), a file
    that is not from ``torch.save``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No .pth file at {path}")
    with open(path, "rb") as f:
        starts_as_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        if starts_as_zip:
            raise ValueError(
                f"{path} is a zip archive cut short or damaged (no central directory): an "
                "interrupted download? Fetch the file again."
            )
        return _read_legacy(path)
    except _RefusedPickle as e:
        raise ValueError(str(e)) from None
    except pickle.UnpicklingError as e:  # pickle's own: "pickle data was truncated", ...
        raise ValueError(f"{path} is damaged or cut short ({e}): fetch the file again.") from None
    except (zipfile.BadZipFile, EOFError, struct.error) as e:
        raise ValueError(f"{path} is damaged or cut short ({e}): fetch the file again.") from None


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise ValueError(f"{path} is a zip file but not one written by torch.save.")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist():
            byteorder = archive.read(prefix + "byteorder").decode().strip()
            if byteorder != "little":
                raise ValueError(f"{path} stores {byteorder}-endian tensors; only little-endian.")
        with archive.open(pickles[0]) as f:
            unpickler = _StateDictUnpickler(f, path)
            obj = unpickler.load()
        data = {
            key: _storage_array(archive.read(f"{prefix}data/{key}"), ref, path)
            for key, ref in unpickler.storages.items()
        }
    return _materialize(obj, data)


def _read_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _plain_unpickle(f)
        except Exception as e:
            raise ValueError(f"{path} is not a file written by torch.save ({e}).") from e
        if magic != LEGACY_MAGIC_NUMBER:
            raise ValueError(f"{path} is not a file written by torch.save (bad magic number).")
        if _plain_unpickle(f) != LEGACY_PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported legacy torch.save protocol version.")
        sys_info = _plain_unpickle(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path} stores big-endian tensors; only little-endian.")
        unpickler = _StateDictUnpickler(f, path)
        obj = unpickler.load()
        data = {}
        for key in _plain_unpickle(f):
            ref = unpickler.storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            data[str(key)] = _storage_array(f.read(numel * ref.dtype.itemsize), ref, path)
    return _materialize(obj, data)


def _plain_unpickle(f: BinaryIO) -> Any:
    """Header records of the legacy format: ints, a dict, a list of keys; no classes allowed."""
    return _StateDictUnpickler(f, "header").load()


def _storage_array(buffer: bytes, ref: _StorageRef, path: str) -> np.ndarray:
    if len(buffer) < ref.numel * ref.dtype.itemsize:
        raise ValueError(f"{path} is truncated: storage {ref.key} is short.")
    return np.frombuffer(buffer, ref.dtype, count=ref.numel)


def _materialize(obj: Any, data: Mapping[str, np.ndarray]) -> Any:
    if isinstance(obj, _TensorRef):
        return _tensor_array(obj, data[obj.storage.key])
    if isinstance(obj, dict):
        rebuilt = type(obj)((k, _materialize(v, data)) for k, v in obj.items())
        return rebuilt
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, data) for v in obj)
    return obj


def _tensor_array(ref: _TensorRef, storage: np.ndarray) -> np.ndarray:
    if 0 in ref.size:
        return np.zeros(ref.size, storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= storage.size:
        raise ValueError(f"A tensor of shape {ref.size} reaches outside its storage.")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset :], ref.size, tuple(s * itemsize for s in ref.stride), writeable=False
    )
    return np.array(view)  # a contiguous, writable copy


# ---------------------------------------------------------------------------------------------
# Converting between torchvision's state dict and vgg_jax's parameters.


def params_from_state_dict(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Returns ``(net name, params)`` from a torchvision VGG state dict (arrays or tensors).

    Also accepts timm's ``vgg11/13/16/19`` state dicts (``timm_to_torchvision``), checkpoints
    that nest it under ``"state_dict"`` or ``"model"`` and keys with ``nn.DataParallel``'s
    ``module.`` prefix. Widths and class count are taken from the shapes.
    """
    state_dict = timm_to_torchvision(_unwrap(state_dict))
    if any(k.endswith(("running_mean", "running_var")) for k in state_dict):
        raise ValueError(
            "This is a batch-norm VGG (torchvision's vgg*_bn): not one of the paper's nets, which "
            "vgg_jax builds. Use torchvision's vgg11/vgg13/vgg16/vgg19 weights."
        )
    conv_indices = sorted(
        int(m.group(1)) for k in state_dict if (m := re.fullmatch(r"features\.(\d+)\.weight", k))
    )
    nets_by_depth = {len(models.conv_names(net)): net for net in TORCHVISION_NETS}
    if len(conv_indices) not in nets_by_depth:
        raise ValueError(
            f"Found {len(conv_indices)} conv layers (features.<i>.weight); torchvision's "
            + ", ".join(f"{TORCHVISION_NETS[n]} has {d}" for d, n in sorted(nets_by_depth.items()))
            + f". Its first keys: {sorted(map(str, state_dict))[:8]}."
        )
    net = nets_by_depth[len(conv_indices)]
    expected = {f"features.{i}.{p}" for i in conv_indices for p in ("weight", "bias")}
    expected |= {f"classifier.{i}.{p}" for i in CLASSIFIER_INDICES for p in ("weight", "bias")}
    if set(state_dict) != expected:
        raise ValueError(
            f"Not a torchvision {TORCHVISION_NETS[net]} state dict: missing "
            f"{sorted(expected - set(state_dict))}, "
            f"unexpected {sorted(set(state_dict) - expected)}."
        )
    arrays = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    params: dict[str, Any] = {}
    channels = 3
    for name, index in zip(models.conv_names(net), conv_indices, strict=True):
        weight = arrays[f"features.{index}.weight"]
        if weight.ndim != 4 or weight.shape[1:] != (channels, 3, 3):
            raise ValueError(
                f"features.{index}.weight has shape {weight.shape}; "
                f"expected (out, {channels}, 3, 3)."
            )
        params[name] = _layer(weight.transpose(2, 3, 1, 0), arrays[f"features.{index}.bias"])
        channels = weight.shape[0]
    fc1, fc2, fc3 = (arrays[f"classifier.{i}.weight"] for i in CLASSIFIER_INDICES)
    window = _fc1_window(fc1.shape, channels)
    # (out, C*H*W) -> (H*W*C, out): FC1 reads the last map in (H, W, C) order in vgg_jax.
    fc1_kernel = fc1.reshape(-1, channels, window, window).transpose(2, 3, 1, 0)
    params["fc1"] = _layer(fc1_kernel.reshape(-1, fc1.shape[0]), arrays["classifier.0.bias"])
    params["fc2"] = _layer(fc2.T, arrays["classifier.3.bias"])
    params["fc3"] = _layer(fc3.T, arrays["classifier.6.bias"])
    return net, params


def state_dict_from_params(net: str, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The torchvision state dict of a vgg_jax net A, B, D or E (the inverse conversion)."""
    if net not in TORCHVISION_NETS:
        raise ValueError(f"torchvision has no net {net!r}; it has {sorted(TORCHVISION_NETS)}.")
    state_dict: dict[str, np.ndarray] = collections.OrderedDict()
    for name, index in zip(models.conv_names(net), torchvision_conv_indices(net), strict=True):
        kernel = np.asarray(params[name]["kernel"])
        state_dict[f"features.{index}.weight"] = _contiguous(kernel.transpose(3, 2, 0, 1))
        state_dict[f"features.{index}.bias"] = _contiguous(params[name]["bias"])
    fc1 = np.asarray(params["fc1"]["kernel"])
    channels = np.shape(params[models.conv_names(net)[-1]]["kernel"])[-1]
    window = _fc1_window(fc1.T.shape, channels)
    fc1_weight = fc1.reshape(window, window, channels, -1).transpose(3, 2, 0, 1)
    for index, name, weight in (
        (0, "fc1", fc1_weight.reshape(fc1.shape[1], -1)),
        (3, "fc2", np.asarray(params["fc2"]["kernel"]).T),
        (6, "fc3", np.asarray(params["fc3"]["kernel"]).T),
    ):
        state_dict[f"classifier.{index}.weight"] = _contiguous(weight)
        state_dict[f"classifier.{index}.bias"] = _contiguous(params[name]["bias"])
    return state_dict


def load_torchvision_weights(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """Returns ``(net name, params)`` from a torchvision VGG ``.pth`` (no PyTorch needed).

    The weights expect ``TORCHVISION_INPUT``; apply it with ``conventions.normalize``.
    """
    return params_from_state_dict(read_pth(path))


# timm's VGG (timm/models/vgg.py) keeps torchvision's ``features`` and stores the classifier as
# convs: FC1 as a 7x7 conv ``pre_logits.fc1`` (out, C, 7, 7), FC2 as a 1x1 conv, FC3 as
# ``head.fc`` (a Linear after a global average pool, the identity on a 224 crop's 1x1 map).
TIMM_CLASSIFIER = {"pre_logits.fc1": 0, "pre_logits.fc2": 3, "head.fc": 6}


def timm_to_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A timm VGG state dict in torchvision's keys and shapes (others are returned unchanged).

    timm's own converter from torchvision only renames the six classifier keys and reshapes the
    two conv kernels; this is its inverse. A conv kernel ``(out, C, kh, kw)`` flattened is FC1's
    ``(out, C * kh * kw)`` in torchvision's (C, H, W) order, so the numbers are the same.
    """
    if not any(k.rpartition(".")[0] in TIMM_CLASSIFIER for k in state_dict):
        return dict(state_dict)
    converted = {}
    for key, value in state_dict.items():
        layer, _, kind = key.rpartition(".")
        if layer in TIMM_CLASSIFIER:
            key = f"classifier.{TIMM_CLASSIFIER[layer]}.{kind}"
            if kind == "weight":
                value = np.asarray(value).reshape(np.shape(value)[0], -1)
        converted[key] = value
    return converted


def torchvision_conv_indices(net: str) -> list[int]:
    """Conv positions in torchvision's ``features``: each conv is followed by a ReLU, each block
    by a max-pool, and all take an index (vgg16: 0, 2, 5, 7, 10, ...)."""
    indices, position = [], 0
    for block in models.LAYOUTS[net]:
        for _ in block:
            indices.append(position)
            position += 2
        position += 1
    return indices


class NotAStateDictError(ValueError, TypeError):
    """The file or object holds no mapping of names to tensors. A ``ValueError``, as every other
    problem with a file, so the import command prints it as one line (it was a ``TypeError``,
    which it still is)."""


def _describe(obj: Any) -> str:
    """A few words for what was found instead of a state dict (its ``repr`` would print every
    tensor's values)."""
    if isinstance(obj, np.ndarray):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (list, tuple)):
        kinds = sorted({type(item).__name__ for item in obj})
        return f"a {type(obj).__name__} of {len(obj)} items ({', '.join(kinds) or 'empty'})"
    return f"an object of type {type(obj).__name__}"


STATE_DICT_PREFIXES = ("module.", "model.", "_orig_mod.")


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(state_dict, Mapping):
        raise NotAStateDictError(
            f"Expected a state dict (a mapping of names to tensors), got {_describe(state_dict)}. "
            "Save the weights with torch.save(model.state_dict(), path)."
        )
    # Training scripts nest the weights: {"state_dict": ...} (Lightning, many repos),
    # {"model_state_dict": ..., "optimizer_state_dict": ...} (PyTorch's tutorial), {"model": ...}.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state_dict.get(key), Mapping):
            if isinstance(state_dict.get(f"{key}_ema"), Mapping):  # timm's train.py --model-ema
                logging.warning(
                    "The checkpoint also holds %r, an average of the weights over training; "
                    "importing %r. For the average, save it alone: "
                    "torch.save(checkpoint[%r], path).",
                    f"{key}_ema",
                    key,
                    f"{key}_ema",
                )
            state_dict = state_dict[key]
    # torch.optim.swa_utils.AveragedModel (SWA, EMA) keeps its count beside the "module."-prefixed
    # weights of the averaged model.
    if "n_averaged" in state_dict and all(
        str(k).startswith("module.") for k in state_dict if k != "n_averaged"
    ):
        state_dict = {k: v for k, v in state_dict.items() if k != "n_averaged"}
    # nn.DataParallel's "module.", a LightningModule attribute's "model." and torch.compile's
    # "_orig_mod." prefixes, in any order and combination ("module._orig_mod." when a compiled
    # model is wrapped for DistributedDataParallel).
    stripped = True
    while stripped:
        stripped = False
        for prefix in STATE_DICT_PREFIXES:
            if state_dict and all(str(k).startswith(prefix) for k in state_dict):
                state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
                stripped = True
    return dict(state_dict)


def _fc1_window(weight_shape: tuple[int, ...], channels: int) -> int:
    inputs = weight_shape[1]
    window = int(round((inputs / channels) ** 0.5))
    if window * window * channels != inputs:
        raise ValueError(
            f"FC1 takes {inputs} inputs, not a square map of the last conv's {channels} channels."
        )
    return window


def _layer(kernel: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    return {"kernel": _contiguous(kernel), "bias": _contiguous(bias)}


def _contiguous(array: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, np.float32))


# ---------------------------------------------------------------------------------------------
# Writing ``.pth`` files (so vgg_jax weights go back to PyTorch, and tests need no PyTorch).


class _Global:
    """A name the pickle refers to (``torch._utils._rebuild_tensor_v2``) without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:
        raise TypeError(f"{self.module}.{self.name} is only a name to pickle.")


class _TensorToSave:
    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self) -> tuple[Callable, tuple]:
        stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
        rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
        return rebuild, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _StateDictPickler(pickle._Pickler):
    """The pure-Python pickler, which lets ``save`` write a GLOBAL opcode for names that are not
    importable here (PyTorch's), as ``torch.save`` (pickle protocol 2) would write them."""

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, _StorageRef):
            storage_type = {v: k for k, v in _STORAGE_DTYPES.items()}[obj.dtype.name]
            return ("storage", _Global("torch", storage_type), obj.key, "cpu", obj.numel)
        return None


def pickle_state_dict(state_dict: Mapping[str, Any]) -> tuple[bytes, list[np.ndarray]]:
    """``torch.save``'s pickle of a state dict, and the storages it names ("0", "1", ...)."""
    storages, entries = [], collections.OrderedDict()
    for name, value in state_dict.items():
        array = np.ascontiguousarray(value)
        if array.dtype.name not in _STORAGE_DTYPES.values():
            raise ValueError(f"{name}: dtype {array.dtype} has no torch storage type.")
        ref = _StorageRef(str(len(storages)), array.dtype, array.size)
        storages.append(array.reshape(-1))
        entries[name] = _TensorToSave(ref, tuple(int(n) for n in array.shape))
    buffer = io.BytesIO()
    _StateDictPickler(buffer, protocol=2).dump(entries)
    return buffer.getvalue(), storages


def save_pth(
    path: str | os.PathLike | BinaryIO,
    state_dict: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Writes a state dict as ``torch.save`` does (zip format), readable by ``torch.load``, to a
    path or an open binary file. ``meta`` (JSON-able: what ``vgg_jax.weights.export`` records)
    goes into the archive as one more record, ``META_RECORD``, which ``torch.load`` does not read
    and ``read_pth_meta`` does."""
    if sys.byteorder != "little":
        raise RuntimeError("Writing .pth files is only supported on little-endian machines.")
    data_pkl, storages = pickle_state_dict(state_dict)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", "little")
        for key, array in enumerate(storages):
            archive.writestr(f"archive/data/{key}", array.tobytes())
        archive.writestr("archive/version", "3\n")
        if meta is not None:
            archive.writestr(f"archive/{META_RECORD}", json.dumps(dict(meta)))


def read_pth_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The meta ``save_pth`` stored in a ``.pth`` (vgg_jax's export of a checkpoint: net, input
    convention, config, class names); ``{}`` for any other file (torchvision's, timm's, one
    ``torch.save`` wrote again after loading ours)."""
    if not zipfile.is_zipfile(path):
        return {}
    with zipfile.ZipFile(path) as archive:
        records = [n for n in archive.namelist() if n.endswith("/" + META_RECORD)]
        if len(records) != 1:
            return {}
        try:
            meta = json.loads(archive.read(records[0]).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: its {META_RECORD} record is not JSON ({e}).") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its {META_RECORD} record is not a JSON object.")
    return meta
