"""One image through the net: top-k classes and the class score map.

Dense evaluation (section 3.2 of the paper) gives a class score map: each cell of it is the
classifier applied to one crop-size window of the image (stride 32), so the map of a class shows
where in the image the net sees it, a coarse localisation for free (our reading of the map; the
paper only averages it); ``score_map.py`` draws it.
``read_image`` decodes files as the input pipeline does, and ``imagenet_class_names`` reads the
ILSVRC-2012 class list shipped with the package (``weights/imagenet_classes.txt``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgg_jax import checkpoint, conventions, models
from vgg_jax.evaluation import methods
from vgg_jax.weights import classes

STRIDE = 2**models.NUM_POOLS  # pixels between neighbouring score-map cells
NUM_IMAGENET_CLASSES = classes.NUM_IMAGENET_CLASSES
# ``(WordNet ID, words)`` of the 1000 ILSVRC-2012 classes in label order.
imagenet_classes = classes.imagenet_classes


class ClassScore(NamedTuple):
    class_index: int
    class_name: str
    probability: float


class UnreadableImageError(ValueError):
    """A file the input pipeline would skip: not a JPEG or PNG, or one that does not decode."""


class TooElongatedError(ValueError):
    """An image whose rescale to the test scale would be more than ``MAX_ASPECT`` crops long."""


# Rescaled to its smaller side Q, an image this many times longer than wide is still computed
# (a 1:16 banner at Q = 256 is 4,096 pixels long); a 10x2000 strip would become 256x51,200,
# tens of GB of VGG16 activations, and end the process instead of failing.
MAX_ASPECT = 16


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 class names in label order ("tench, Tinca tinca", ...)."""
    return tuple(words for _, words in imagenet_classes())


def read_image(path: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a JPEG or PNG file, decoded as the input pipeline decodes
    (``data/transforms.py``): the format from the bytes, not the name; grayscale and CMYK JPEGs
    as RGB; a truncated JPEG kept if enough of it decodes; a JPEG's EXIF orientation applied, as
    an image folder's photos are turned upright (``data/folder.py``) and as viewers show them.
    Anything else raises ``UnreadableImageError`` with the reason, as the pipeline skips and
    counts it."""
    import tensorflow as tf

    from vgg_jax.data import folder, transforms

    with open(path, "rb") as f:
        raw = f.read()
    encoded = tf.constant(raw)
    fmt = transforms.image_format(encoded)
    if int(fmt) == transforms.UNDECODABLE:
        raise UnreadableImageError(f"{path}: not a JPEG or PNG")
    try:
        image = transforms.decode_full(encoded, fmt).numpy()
        return np.ascontiguousarray(folder.apply_orientation(image, folder.exif_orientation(raw)))
    except tf.errors.OpError as e:
        # "{{function_node ...}} jpeg::Uncompress failed. Invalid JPEG data... [Op:DecodeJpeg]"
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", e.message or "").strip().splitlines()
        raise UnreadableImageError(
            f"{path}: does not decode ({reason[0] if reason else type(e).__name__})"
        ) from None


def _full_convention(input_convention: Mapping[str, Any]) -> conventions.InputConvention:
    """A caller's convention dict may omit std, channel order and range (the paper's defaults:
    std 1, RGB, 0-255); checkpoints and ``load_for_prediction`` give all four."""
    defaults = dict(channel_order="RGB", pixel_range=255.0, std=(1.0, 1.0, 1.0))
    return conventions.checked({**defaults, **input_convention})


def rescaled_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """The size of a ``height`` x ``width`` image rescaled so its smaller side is ``scale``: the
    evaluation pipeline's (``data.transforms.eval_size``, repeated here without TensorFlow), so
    an image is tested at the size evaluation tests it. ``side * scale / min_side`` rounds half to
    even; multiplying by a rounded ratio instead would turn an exact 234.5 (201x192 at Q=224) into
    234.50000000000003 and one pixel more."""
    min_side = min(height, width)
    return tuple(
        scale if side == min_side else max(scale, round(side * scale / min_side))
        for side in (height, width)
    )


def resize_smaller_side(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Isotropic rescale so the smaller side is ``scale`` (bilinear, antialiased)."""
    shape = (*rescaled_size(*pixels.shape[:2], scale), 3)
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
    input_convention: Mapping[str, Any] | None = None,
    scale: int | None = None,
    flip: bool = True,
) -> tuple[list[ClassScore], np.ndarray]:
    """Dense evaluation of one image: the ``top_k`` classes by softmax, best first, and the class
    score map ``(h, w, classes)`` (raw class scores, one cell per crop-size window).

    ``image``: ``(H, W, 3)`` RGB pixels in [0, 255] (uint8 or float), prepared with
    ``input_convention`` (an input convention, e.g. ``load_for_prediction``'s or
    ``conventions.CAFFE``); ``None`` means the image is already normalised as the net expects.
    ``scale``: rescale first so the smaller side is this test scale Q (the image must end up at
    least the crop size). ``flip``: average the softmax with the flipped image's, as the evaluator.
    Class names: ``class_names``, else ImageNet's for a 1000-class net, else the index.
    """
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"predict takes one (H, W, 3) RGB image, got shape {pixels.shape}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}.")
    if not np.all(np.isfinite(pixels)):
        # NaN or inf pixels would come back as ordinary-looking probabilities.
        bad = int(np.size(pixels) - np.count_nonzero(np.isfinite(pixels)))
        raise ValueError(f"The image has {bad} NaN or infinite pixel values; give finite pixels.")
    if input_convention is None and pixels.dtype == np.uint8:
        raise ValueError(
            "uint8 pixels need input_convention= (the net's input convention; "
            "load_for_prediction returns it)."
        )
    if scale is not None and max(pixels.shape[:2]) > MAX_ASPECT * min(pixels.shape[:2]):
        height, width = rescaled_size(*pixels.shape[:2], scale)
        raise TooElongatedError(
            f"{pixels.shape[0]}x{pixels.shape[1]} pixels, more than {MAX_ASPECT} times longer "
            f"than wide: rescaled to Q={scale} it would be {height}x{width}; crop it first"
        )
    pixels = pixels.astype(np.float32)
    if scale is not None:
        pixels = resize_smaller_side(pixels, scale)
    if min(pixels.shape[:2]) < model.crop_size:
        raise ValueError(
            f"The image is {pixels.shape[0]}x{pixels.shape[1]}, smaller than the net's "
            f"{model.crop_size}-pixel crop; pass scale= (a test scale Q >= {model.crop_size})."
        )
    if input_convention is not None:
        pixels = conventions.normalize(pixels, _full_convention(input_convention))
    score_maps, log_probabilities = jax.device_get(
        _dense_one_image(model, flip)(params, jnp.asarray(pixels)[None])
    )
    score_map, log_probabilities = score_maps[0], log_probabilities[0]
    if np.isnan(log_probabilities).any():
        # Would print "nan%" for every class, ranked by nothing (classes 0, 1, 2, ...).
        raise ValueError(
            "The net's class scores are NaN: its parameters are not finite (a damaged "
            "checkpoint?); training and imports never save such parameters."
        )
    if class_names is None and model.num_classes == NUM_IMAGENET_CLASSES:
        class_names = imagenet_class_names()
    if class_names is not None and len(class_names) != model.num_classes:
        raise ValueError(
            f"{len(class_names)} class names for a net with {model.num_classes} classes."
        )
    best = np.argsort(-log_probabilities, kind="stable")[:top_k]  # ranks even underflowed ones
    top = [
        ClassScore(
            int(i),
            class_names[i] if class_names else str(int(i)),
            float(np.exp(log_probabilities[i])),
        )
        for i in best
    ]
    return top, np.asarray(score_map)


@dataclasses.dataclass
class Predictor:
    """A checkpoint ready for ``predict``: the net, its params, its input convention, its class
    names (None: ImageNet's, for a 1000-class net) and its config (whose ``evals.single_scale``
    is the net's own test scale Q)."""

    model: models.VGG
    params: Any
    input_convention: dict[str, Any]
    class_names: list[str] | None
    config: ml_collections.ConfigDict

    @property
    def test_scale(self) -> int:
        """Q of the config's single-scale evaluation (the paper's Table 3), at least the crop."""
        scale = self.config.get("evals", {}).get("single_scale") or 0
        return max(int(scale), self.model.crop_size)


def load_predictor(workdir: str, which: str | int = "latest", dtype: str = "float32") -> Predictor:
    """The checkpoint in ``workdir`` (any: trained here or imported) as a ``Predictor``
    computing in ``dtype``, as evaluation computes in its config's ``model.dtype`` (float32 by
    default) whatever dtype trained the net (``runner.load_net``). The checkpoint's was used, so
    a net trained in bfloat16 predicted in bfloat16 and its probabilities differed from the
    evaluation's of the same images.

    The input convention is the checkpoint's own (recorded by training and by imports) or, for a
    checkpoint saved before training recorded it, the training set's mean RGB, read from the
    dataset the saved config names, and the config's ``input.pixel_std``. Class names are the
    checkpoint's own; else, for other than ImageNet's 1,000 classes, the dataset's if it is at
    hand (indices otherwise: an imported net need not come with its dataset).
    """
    params, _, meta = checkpoint.restore_params(workdir, which)
    if not meta.get("config"):
        raise ValueError(f"The checkpoint in {workdir} has no config; build the model yourself.")
    config = ml_collections.ConfigDict(meta["config"])
    config.model.dtype = dtype
    model = models.build_model(config.model, config.input.crop_size)
    input_convention, class_names = meta.get("input_convention"), meta.get("class_names")
    if input_convention is None or (
        class_names is None and model.num_classes != NUM_IMAGENET_CLASSES
    ):
        from vgg_jax import data
        from vgg_jax.data import pipeline

        try:
            info = data.dataset_info(config)
        except (FileNotFoundError, data.DatasetError):
            if input_convention is None:
                raise
            info = None  # names are a nicety; the convention is what the numbers need
        if input_convention is None:
            input_convention = pipeline.trained_convention(info.mean_rgb, config.input)
        if info is not None and model.num_classes != NUM_IMAGENET_CLASSES:
            class_names = info.class_names
    if class_names is not None and list(class_names) == classes.imagenet_wnids():
        class_names = None  # ImageNet's: shown by their words ("tench, Tinca tinca")
    return Predictor(model, params, dict(input_convention), class_names, config)


def load_for_prediction(
    workdir: str, which: str | int = "latest", dtype: str = "float32"
) -> tuple[models.VGG, Any, dict[str, Any], list[str] | None]:
    """``(model, params, input_convention, class_names)`` of a checkpoint, for ``predict``
    (``load_predictor``'s fields)."""
    loaded = load_predictor(workdir, which, dtype)
    return loaded.model, loaded.params, loaded.input_convention, loaded.class_names
