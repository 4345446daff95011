"""One image through the net: top-k classes and the class score map, and the map as a PNG.

Dense evaluation gives a coarse localisation for free (section 3.2 of the paper): each cell of
the class score map is the classifier applied to one crop-size window of the image (stride 32), so
the map of a class shows where in the image the net sees it. No PIL or matplotlib: the PNG is
written with ``zlib`` and ``struct``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgg_jax import checkpoint, conventions, models
from vgg_jax.evaluation import methods

STRIDE = 2**models.NUM_POOLS  # pixels between neighbouring score-map cells
NUM_IMAGENET_CLASSES = 1000


class ClassScore(NamedTuple):
    class_index: int
    class_name: str
    probability: float


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...] | None:
    """The 1000 ILSVRC-2012 class names in label order ("tench, Tinca tinca", ...), from the list
    TFDS ships (read as a file, so TensorFlow is not imported); None if TFDS is not installed."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = spec.submodule_search_locations[0]
    path = os.path.join(root, "datasets", "siscore", "labels.py")
    if not os.path.exists(path):
        return None
    module_spec = importlib.util.spec_from_file_location("_tfds_imagenet_labels", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    names = tuple(getattr(module, "IMAGENET_LABELS_LIST", ()))
    return names if len(names) == NUM_IMAGENET_CLASSES else None


def _full_convention(normalization: Mapping[str, Any]) -> conventions.InputConvention:
    """A caller's convention dict may omit std, channel order and range (the paper's defaults:
    std 1, RGB, 0-255); checkpoints and ``load_for_prediction`` give all four."""
    defaults = dict(channel_order="RGB", pixel_range=255.0, std=(1.0, 1.0, 1.0))
    return conventions.checked({**defaults, **normalization})


def resize_smaller_side(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Isotropic rescale so the smaller side is ``scale`` (bilinear, antialiased)."""
    height, width = pixels.shape[:2]
    ratio = scale / min(height, width)
    shape = (max(scale, round(height * ratio)), max(scale, round(width * ratio)), 3)
    return np.asarray(jax.image.resize(pixels, shape, "bilinear", antialias=True))


@functools.lru_cache(maxsize=8)
def _dense_one_image(model: models.VGG, flip: bool):
    """The evaluator's dense method on one image, jitted once per (net, flip)."""
    return jax.jit(lambda params, images: methods.dense_outputs(model, params, images, None, flip))


def predict(
    model: models.VGG,
    params: Any,
    image: Any,
    top_k: int = 5,
    class_names: Sequence[str] | None = None,
    normalization: Mapping[str, Any] | None = None,
    scale: int | None = None,
    flip: bool = True,
) -> tuple[list[ClassScore], np.ndarray]:
    """Dense evaluation of one image: the ``top_k`` classes by softmax, best first, and the class
    score map ``(h, w, classes)`` (raw class scores, one cell per crop-size window).

    ``image``: ``(H, W, 3)`` RGB pixels in [0, 255] (uint8 or float), prepared with
    ``normalization`` (an input convention, e.g. ``load_for_prediction``'s or
    ``conventions.CAFFE``); ``None`` means the image is already normalised as the net expects.
    ``scale``: rescale first so the smaller side is this test scale Q (the image must end up at
    least the crop size). ``flip``: average the softmax with the flipped image's, as the evaluator.
    Class names: ``class_names``, else ImageNet's for a 1000-class net, else the index.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"predict takes one (H, W, 3) RGB image, got shape {pixels.shape}.")
    if normalization is None and pixels.dtype == np.uint8:
        raise ValueError(
            "uint8 pixels need normalization= (the net's input convention; "
            "load_for_prediction returns it)."
        )
    pixels = pixels.astype(np.float32)
    if scale is not None:
        pixels = resize_smaller_side(pixels, scale)
    if min(pixels.shape[:2]) < model.crop_size:
        raise ValueError(
            f"The image is {pixels.shape[0]}x{pixels.shape[1]}, smaller than the net's "
            f"{model.crop_size}-pixel crop; pass scale= (a test scale Q >= {model.crop_size})."
        )
    if normalization is not None:
        pixels = conventions.normalize(pixels, _full_convention(normalization))
    score_maps, probabilities = jax.device_get(
        _dense_one_image(model, flip)(params, jnp.asarray(pixels)[None])
    )
    score_map, probabilities = score_maps[0], probabilities[0]
    if class_names is None and model.num_classes == NUM_IMAGENET_CLASSES:
        class_names = imagenet_class_names()
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a net with {model.num_classes} classes."
        )
    best = np.argsort(-probabilities, kind="stable")[:top_k]
    top = [
        ClassScore(int(i), class_names[i] if class_names else str(int(i)), float(probabilities[i]))
        for i in best
    ]
    return top, np.asarray(score_map)


def load_for_prediction(
    workdir: str, which: str | int = "latest"
) -> tuple[models.VGG, Any, dict[str, Any], list[str] | None]:
    """``(model, params, normalization, class_names)`` of a checkpoint, for ``predict``.

    The input convention is the checkpoint's own (imported weights) or, for a net trained here,
    the training set's mean RGB, read from the dataset the saved config names, and the config's
    ``input.pixel_std``.
    """
    params, _, meta = checkpoint.restore_params(workdir, which)
    if not meta.get("config"):
        raise ValueError(f"The checkpoint in {workdir} has no config; build the model yourself.")
    config = ml_collections.ConfigDict(meta["config"])
    model = models.build_model(config.model, config.input.crop_size)
    normalization, class_names = meta.get("normalization"), None
    if normalization is None or model.num_classes != NUM_IMAGENET_CLASSES:
        from vgg_jax import data
        from vgg_jax.data import pipeline

        info = data.dataset_info(config)
        normalization = normalization or pipeline.trained_convention(info.mean_rgb, config.input)
        if model.num_classes != NUM_IMAGENET_CLASSES:
            class_names = info.class_names
    return model, params, dict(normalization), class_names


def _heat_colours(values: np.ndarray) -> np.ndarray:
    """Black -> red -> yellow -> white for values in [0, 1] ("hot"), as float RGB in [0, 255]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return 255.0 * np.clip(3.0 * v - np.array([0.0, 1.0, 2.0]), 0.0, 1.0)


def _cell_coordinates(pixels: int, cells: int, crop_size: int) -> np.ndarray:
    """For each pixel row (or column) of an image of ``pixels``, its fractional score-map cell:
    cell ``i`` is the window starting at ``STRIDE * i`` of a net input ``STRIDE * (cells - 1) +
    crop_size`` pixels long, so its centre is at that fraction of any rendering of the image."""
    extent = STRIDE * (cells - 1) + crop_size
    centres = (STRIDE * np.arange(cells) + crop_size / 2) / extent
    return np.interp((np.arange(pixels) + 0.5) / pixels, centres, np.arange(cells, dtype=float))


def _upsample(values: np.ndarray, height: int, width: int, crop_size: int) -> np.ndarray:
    """Bilinear interpolation of a cell map onto an image, cells placed at their window centres."""
    rows = _cell_coordinates(height, values.shape[0], crop_size)
    cols = _cell_coordinates(width, values.shape[1], crop_size)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, values.shape[0] - 1), np.minimum(c0 + 1, values.shape[1] - 1)
    wr, wc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = values[r0][:, c0] * (1 - wc) + values[r0][:, c1] * wc
    bottom = values[r1][:, c0] * (1 - wc) + values[r1][:, c1] * wc
    return top * (1 - wr) + bottom * wr


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of a ``(H, W, 3)`` uint8 array."""
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + row.tobytes() for row in np.ascontiguousarray(rgb, np.uint8))

    def chunk(tag: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(tag + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def score_map_image(
    score_map: np.ndarray, class_index: int, image: Any = None, crop_size: int = 224
) -> np.ndarray:
    """The PNG's pixels: the class's softmax probability per cell as a heat map, blended half and
    half over ``image`` (RGB 0-255, any size: the map is placed by window centres, so the original
    image works as well as the rescaled one the net saw), else one ``STRIDE``-pixel block per
    cell. ``crop_size``: the net's (``model.crop_size``)."""
    score_map = np.asarray(score_map, np.float32)
    if score_map.ndim != 3 or not 0 <= class_index < score_map.shape[-1]:
        raise ValueError(
            f"Need an (h, w, classes) score map and a class index below {score_map.shape[-1]}; "
            f"got shape {score_map.shape} and class {class_index}."
        )
    values = np.asarray(jax.nn.softmax(score_map, axis=-1))[..., class_index]
    if image is None:
        return _heat_colours(np.kron(values, np.ones((STRIDE, STRIDE)))).astype(np.uint8)
    pixels = np.asarray(image, np.float32)
    heat = _heat_colours(_upsample(values, pixels.shape[0], pixels.shape[1], crop_size))
    return np.clip(0.5 * pixels + 0.5 * heat, 0, 255).round().astype(np.uint8)


def save_score_map_png(
    score_map: np.ndarray,
    class_index: int,
    path: str,
    image: Any = None,
    crop_size: int = 224,
) -> str:
    """Saves ``score_map_image`` as a PNG at ``path`` (a coarse localisation map of the class);
    returns ``path``."""
    rgb = score_map_image(score_map, class_index, image, crop_size)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(encode_png(rgb))
    return path
