"""vgg_jax's own weight files: ``.npz`` and ``.safetensors``, both bit-exact round trips.

A file holds the parameter tree, flattened to ``"block1_conv1/kernel"``-style names, and a JSON
``meta`` dict. ``meta`` says what the weights are: ``net`` (a Table 1 name) and ``input_convention``
(the ``conventions.InputConvention`` they expect) are what
``python -m vgg_jax.tools.import_weights`` reads back; ``export_checkpoint`` also stores the run's
training ``config``.

Dtypes survive exactly, including ``bfloat16``, which NumPy's own ``.npy`` format cannot name: such
arrays are stored as unsigned integers of the same width and viewed back on load. The safetensors
files follow that format's specification (an 8-byte header length, a JSON header, one flat byte
buffer) and are written and read with NumPy alone; other safetensors readers open them too.

    python -m vgg_jax.tools.export --workdir=workdirs/vgg16 --out=vgg16.safetensors
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy; JAX depends on it)
import numpy as np
from flax import traverse_util

from vgg_jax import conventions, writers

SEPARATOR = "/"
NPZ_HEADER_KEY = "__vgg_jax_header__"
SAFETENSORS_META_KEY = "vgg_jax"
SAFETENSORS_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
FORMATS = (".npz", ".safetensors")
# What ``export_checkpoint`` writes: vgg_jax's own files, and torchvision's state dict layout
# (``features.0.weight``, ...) for PyTorch, which holds the weights alone.
EXPORT_FORMATS = (*FORMATS, ".pth")


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """``{"fc1": {"kernel": a}}`` -> ``{"fc1/kernel": a}`` (host NumPy arrays, dtypes kept)."""
    flat = {}
    for key, value in params.items():
        if SEPARATOR in key:
            raise ValueError(f"Parameter name {key!r} contains {SEPARATOR!r}.")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + SEPARATOR))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{"fc1/kernel": a}`` -> ``{"fc1": {"kernel": a}}``."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEPARATOR)


def save_npz(
    path: str | os.PathLike, params: Mapping[str, Any], meta: Mapping | None = None
) -> None:
    """Writes ``params`` and ``meta`` to ``path`` (written whole, then renamed into place)."""
    flat = flatten(params)
    stored, dtypes = {}, {}
    for name, array in flat.items():
        dtypes[name] = array.dtype.name
        stored[name] = array if _numpy_native(array.dtype) else array.view(_same_width_uint(array))
    header = json.dumps({"meta": dict(meta or {}), "dtypes": dtypes})
    stored[NPZ_HEADER_KEY] = np.frombuffer(header.encode("utf-8"), np.uint8)
    with writers.atomic_open(path, "wb") as f:
        np.savez(f, **stored)


def load_npz(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, meta)`` from a file written by ``save_npz``."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file.")
    with np.load(os.fspath(path), allow_pickle=False) as npz:
        if NPZ_HEADER_KEY not in npz.files:
            raise ValueError(
                f"{path} was not written by vgg_jax.weights.export.save_npz (no {NPZ_HEADER_KEY})."
            )
        header = json.loads(npz[NPZ_HEADER_KEY].tobytes().decode("utf-8"))
        flat = {}
        for name, dtype in header["dtypes"].items():
            array = npz[name]
            flat[name] = array if array.dtype.name == dtype else array.view(np.dtype(dtype))
    return unflatten(flat), conventions.with_current_key(header["meta"])


def save_safetensors(
    path: str | os.PathLike, params: Mapping[str, Any], meta: Mapping | None = None
) -> None:
    """Writes ``params`` as a safetensors file; ``meta`` goes, as JSON, into its metadata."""
    _require_little_endian()
    flat = flatten(params)
    header: dict[str, Any] = {"__metadata__": {SAFETENSORS_META_KEY: json.dumps(dict(meta or {}))}}
    offset = 0
    for name, array in flat.items():
        if array.dtype.name not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {array.dtype} has no safetensors name.")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the reference writer pads the header to 8 bytes
    with writers.atomic_open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in flat.values():
            f.write(np.ascontiguousarray(array).tobytes())


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, meta)`` from a safetensors file (``meta`` is empty if vgg_jax did not write
    it; names with dots, the usual convention elsewhere, stay flat keys)."""
    _require_little_endian()
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path} is too short to be a safetensors file.")
    (header_size,) = struct.unpack("<Q", blob[:8])
    if 8 + header_size > len(blob):
        raise ValueError(f"{path} is not a safetensors file (header runs past the end).")
    header = json.loads(blob[8 : 8 + header_size].decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    buffer = memoryview(blob)[8 + header_size :]
    names_by_code = {code: name for name, code in SAFETENSORS_DTYPES.items()}
    flat, covered = {}, 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in names_by_code:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
        dtype = np.dtype(names_by_code[entry["dtype"]])
        if begin != covered or end > len(buffer) or end - begin != _nbytes(entry["shape"], dtype):
            raise ValueError(f"{path}: tensor {name}'s data_offsets do not fit the file.")
        flat[name] = np.frombuffer(buffer[begin:end], dtype).reshape(entry["shape"]).copy()
        covered = end
    meta = json.loads(metadata[SAFETENSORS_META_KEY]) if SAFETENSORS_META_KEY in metadata else {}
    return unflatten(flat), conventions.with_current_key(meta)


def save(path: str | os.PathLike, params: Mapping[str, Any], meta: Mapping | None = None) -> None:
    """``save_npz`` or ``save_safetensors``, by the file's suffix."""
    {".npz": save_npz, ".safetensors": save_safetensors}[_suffix(path)](path, params, meta)


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``load_npz`` or ``load_safetensors``, by the file's suffix."""
    return {".npz": load_npz, ".safetensors": load_safetensors}[_suffix(path)](path)


def export_checkpoint(workdir: str, path: str | os.PathLike, which: str | int = "latest") -> dict:
    """Writes a checkpoint's params to ``path`` (.npz or .safetensors); returns the meta written:
    ``net``, ``input_convention`` (what the net's inputs are normalised by; for a checkpoint saved
    before training recorded it, rebuilt from its dataset, None when that is not at hand),
    ``config``, ``class_names`` (None when not recorded) and ``step``. A ``.pth`` is
    torchvision's state dict of nets A, B, D or E, which ``torch.load`` reads and a torchvision
    ``VGG`` of the same widths takes; the meta is a record of the archive that PyTorch does not
    read (``import_weights`` does), so in PyTorch the net's input convention (returned) must be
    applied by whoever feeds it."""
    from vgg_jax import checkpoint

    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix not in EXPORT_FORMATS:  # before restoring a large checkpoint
        raise ValueError(
            f"{path}: unknown weight file suffix {suffix!r}; valid: {list(EXPORT_FORMATS)}"
        )
    params, step, checkpoint_meta = checkpoint.restore_params(workdir, which)
    try:
        check_finite(f"{workdir}'s checkpoint at step {step}", params)
    except ValueError as e:
        raise ValueError(
            f"{e} Not exported: choose another step (--which=<step>; saved: "
            f"{checkpoint.available_steps(workdir)})."
        ) from None
    config = checkpoint_meta.get("config") or {}
    meta = {
        "net": (config.get("model") or {}).get("name"),
        "input_convention": checkpoint_meta.get("input_convention") or _trained_convention(config),
        "config": config,
        "class_names": checkpoint_meta.get("class_names"),
        "step": step,
    }
    if suffix == ".pth":
        from vgg_jax.weights import torchvision

        state_dict = torchvision.state_dict_from_params(meta["net"], params)
        with writers.atomic_open(path, "wb") as f:
            # The meta rides along as a record torch.load skips, so that importing the file back
            # restores the net's input convention, config and class names, not torchvision's.
            torchvision.save_pth(f, state_dict, meta)
    else:
        save(path, params, meta)
    return meta


def _trained_convention(config: Mapping[str, Any]) -> dict | None:
    """The input convention of a checkpoint saved before checkpoints recorded it: its training
    set's mean RGB subtracted (section 2.1) and its config's ``input.pixel_std``, as the evaluator
    and ``predict`` rebuild it; None when there is no config or the dataset is not at hand. (The
    file said None, and ``import_weights`` then asked for torchvision's or Caffe's convention,
    neither of which such a net was trained with.)"""
    if not config.get("input"):
        return None
    import ml_collections

    from vgg_jax import data

    config = ml_collections.ConfigDict(dict(config))
    try:
        info = data.dataset_info(config)
    except (FileNotFoundError, data.DatasetError):
        return None
    return dict(data.trained_convention(info.mean_rgb, config.input))


def check_finite(source: str, params: Mapping[str, Any]) -> None:
    """Refuses NaN or infinite parameters (a float16 fine-tune that overflowed, a damaged file or
    checkpoint), naming the layers: one NaN in a conv kernel makes every later activation NaN, and
    the net would print "nan%" for every class of every image. Imports check what they read,
    exports what they would write (a .pth goes to PyTorch, where nothing checks it)."""
    bad = {
        name: int(np.size(leaf) - np.count_nonzero(np.isfinite(leaf)))
        for name, leaf in sorted(flatten(params).items())
        if not np.all(np.isfinite(leaf))
    }
    if bad:
        listed = ", ".join(f"{name} ({count:,})" for name, count in bad.items())
        raise ValueError(f"{source} holds NaN or infinite parameters: {listed}.")


def _suffix(path: str | os.PathLike) -> str:
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown weight file suffix {suffix!r}; valid: {list(FORMATS)}")
    return suffix


def _numpy_native(dtype: np.dtype) -> bool:
    return dtype.kind in "biufc"  # bfloat16 and other ml_dtypes are kind "V" to NumPy


def _same_width_uint(array: np.ndarray) -> np.dtype:
    return np.dtype(f"uint{8 * array.dtype.itemsize}")


def _nbytes(shape: list[int], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not.")
