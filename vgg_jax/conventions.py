"""The input convention a set of weights expects, and the one function that applies it.

Weights only score as they did in their home framework when the images are prepared the way they
were there: torchvision's VGGs take RGB in [0, 1] standardised by ImageNet's mean and std, the
original Caffe release (and Keras, which copied it) takes BGR in [0, 255] with the mean subtracted.
Every importer states its convention as an ``InputConvention`` dict (JSON-able, stored in the
checkpoint's meta) and the data pipeline and evaluator call ``normalize`` with it, so the rule lives
in one place. No TensorFlow here; ``normalize`` works on NumPy and JAX arrays, inside ``jit`` too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np

CHANNEL_ORDERS = ("RGB", "BGR")
PIXEL_RANGES = (255.0, 1.0)


class InputConvention(TypedDict):
    """``channel_order``: "RGB" or "BGR"; ``pixel_range``: 255.0 or 1.0, the value of a white
    pixel; ``mean`` and ``std``: per channel, in ``channel_order`` and ``pixel_range`` units.
    The net sees ``(pixels_in_order_and_range - mean) / std``."""

    channel_order: str
    pixel_range: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


TORCHVISION: InputConvention = dict(
    channel_order="RGB",
    pixel_range=1.0,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
CAFFE: InputConvention = dict(
    channel_order="BGR",
    pixel_range=255.0,
    mean=(103.939, 116.779, 123.68),
    std=(1.0, 1.0, 1.0),
)
NAMED: dict[str, InputConvention] = {"torchvision": TORCHVISION, "caffe": CAFFE}


def mean_subtracted(mean: Any, std: Any = (1.0, 1.0, 1.0)) -> InputConvention:
    """The paper's convention, as nets trained here use it: RGB in 0-255 with the training set's
    mean RGB subtracted (section 2.1), then divided by ``std`` (1 in the paper)."""
    return checked(dict(channel_order="RGB", pixel_range=255.0, mean=mean, std=std))


def from_text(text: str) -> InputConvention:
    """What ``import_weights --input_convention`` takes: a ``NAMED`` convention's name, or any
    convention as a JSON object of its four keys, e.g. a net trained here (``mean_subtracted``:
    ``{"channel_order": "RGB", "pixel_range": 255, "mean": [123.7, 116.8, 103.9], "std": [1, 1,
    1]}``), whose ``.pth`` re-saved by ``torch.save`` has lost the record of it."""
    if text in NAMED:
        return NAMED[text]
    if not text.lstrip().startswith("{"):
        raise ValueError(
            f"Unknown --input_convention {text!r}; valid: {sorted(NAMED)}, or a JSON object "
            f"with keys {sorted(InputConvention.__annotations__)}."
        )
    try:
        return checked(json.loads(text))
    except json.JSONDecodeError as e:
        raise ValueError(f"--input_convention is not JSON ({e.msg}, character {e.pos})") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"--input_convention: {e}") from e


def as_text(convention: Mapping[str, Any]) -> str:
    """``convention`` as ``from_text`` reads it back: its name if it has one, else JSON."""
    convention = checked(convention)
    name = next((name for name, named in NAMED.items() if checked(named) == convention), None)
    return name or json.dumps(dict(convention))


def checked(convention: Mapping[str, Any]) -> InputConvention:
    """A checked copy of ``convention`` (e.g. read back from JSON, where tuples became lists)."""
    if not isinstance(convention, Mapping):
        raise TypeError(
            f"An input convention is a dict with keys {sorted(InputConvention.__annotations__)}, "
            f"got {convention!r}; or use one of conventions.NAMED: {sorted(NAMED)}."
        )
    keys = set(InputConvention.__annotations__)
    if set(convention) != keys:
        raise ValueError(
            f"Input convention keys {sorted(convention)} should be exactly {sorted(keys)}."
        )
    if convention["channel_order"] not in CHANNEL_ORDERS:
        raise ValueError(
            f"channel_order {convention['channel_order']!r}; valid: {list(CHANNEL_ORDERS)}"
        )
    pixel_range = float(convention["pixel_range"])
    if pixel_range not in PIXEL_RANGES:
        raise ValueError(f"pixel_range {pixel_range}; valid: {list(PIXEL_RANGES)}")
    checked: dict[str, Any] = dict(
        channel_order=convention["channel_order"], pixel_range=pixel_range
    )
    for key in ("mean", "std"):
        values = tuple(float(v) for v in np.ravel(convention[key]))
        if len(values) != 3:
            raise ValueError(f"{key} needs 3 values (one per channel), got {convention[key]!r}")
        checked[key] = values
    if 0.0 in checked["std"]:
        raise ValueError(f"std must be non-zero, got {checked['std']}")
    return InputConvention(**checked)


def normalize(images: Any, convention: Mapping[str, Any]) -> Any:
    """Images as the weights expect them, from RGB pixels in [0, 255] (uint8 or float).

    ``images``: a NumPy or JAX array whose last axis is RGB. Returns float32 of the same kind.
    The order of operations is torchvision's (divide to [0, 1], subtract mean, divide by std) and
    Keras' Caffe mode (flip to BGR, subtract mean), so each imported net sees bit-for-bit the
    input of its home framework.
    """
    convention = checked(convention)
    if images.shape[-1] != 3:
        raise ValueError(f"normalize expects RGB images on the last axis, got shape {images.shape}")
    x = images.astype(np.float32)
    if convention["channel_order"] == "BGR":
        x = x[..., ::-1]
    if convention["pixel_range"] != 255.0:
        x = x / np.float32(255.0 / convention["pixel_range"])
    mean = np.asarray(convention["mean"], np.float32)
    std = np.asarray(convention["std"], np.float32)
    return (x - mean) / std


LEGACY_META_KEY = "normalization"  # what checkpoint and file meta called it before


def with_current_key(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` (a checkpoint's or an exported file's) with an input convention stored under its
    old key (``normalization``) moved to ``input_convention``, so older files read as new ones."""
    meta = dict(meta)
    if LEGACY_META_KEY in meta:
        legacy = meta.pop(LEGACY_META_KEY)
        if meta.get("input_convention") is None:
            meta["input_convention"] = legacy
    return meta


def describe(convention: Mapping[str, Any]) -> str:
    """One line for logs and docs, e.g. ``BGR, 0-255, mean (103.939, ...), std (1.0, ...)``."""
    convention = checked(convention)
    top = "255" if convention["pixel_range"] == 255.0 else "1"
    return (
        f"{convention['channel_order']}, 0-{top}, mean {convention['mean']}, "
        f"std {convention['std']}"
    )
