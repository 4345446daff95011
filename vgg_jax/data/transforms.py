"""Per-image preprocessing as TensorFlow ops (the paper, sections 3.1 and 3.2).

Training, for an image of size (h, w) and a scale S drawn uniformly from [Smin, Smax]: rescaling
isotropically to smallest side S and cutting a crop x crop window is the same as cutting a square
window of ``crop * min(h, w) / S`` original pixels and resizing it to crop x crop. Only that window
is decoded (``decode_and_crop_jpeg``), which is what makes the pipeline fast. Then a random
horizontal flip, AlexNet's PCA colour shift and the mean RGB subtraction.

Evaluation: the whole image rescaled isotropically to smallest side Q, normalised, and placed
top-left in a zero-padded (bucket_h, bucket_w) canvas.

All randomness is stateless, keyed by (seed, position of the example in the training stream), so
a parallel ``map`` stays deterministic and a restarted pipeline draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from vgg_jax import conventions
from vgg_jax.data import image_bytes

JPEG, PNG, UNDECODABLE = 0, 1, 2
# A truncated JPEG whose first ACCEPTABLE_FRACTION of rows decode is kept (the rest is grey).
ACCEPTABLE_FRACTION = 0.25
# libjpeg's accurate integer DCT, as PIL, torchvision and Caffe decode: TensorFlow's default (the
# fast DCT) differs by up to ~20 grey levels per pixel, so imported nets would see other pixels
# than their authors evaluated on. Used for every full decode (evaluation, statistics, the decoded
# in-memory training copy); cost: bench/input_pipeline.py, docs/performance.md.
ACCURATE_DCT = "INTEGER_ACCURATE"
# The per-step training decode of large datasets (small ones are decoded once): the accurate DCT
# too. On a quiet AMD EPYC the window decode ran at 610 images/s per core with either DCT
# (bench/input_pipeline.py, docs/performance.md, "JPEG decoding"), so training sees the pixels
# that evaluation and PIL see at no measurable cost.
TRAIN_DCT = ACCURATE_DCT


def image_format(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG or PNG from the file's first bytes (names lie: ImageNet has a PNG named .JPEG)."""
    is_png = tf.equal(
        tf.strings.substr(encoded, 0, len(image_bytes.PNG_SIGNATURE)), image_bytes.PNG_SIGNATURE
    )
    return tf.where(tf.io.is_jpeg(encoded), JPEG, tf.where(is_png, PNG, UNDECODABLE))


def decode_full(encoded: tf.Tensor, fmt: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, 3] from a JPEG (any colour space, truncated tolerated) or a PNG."""
    return tf.cond(
        tf.equal(fmt, PNG),
        lambda: tf.io.decode_png(encoded, channels=3),
        lambda: tf.io.decode_jpeg(
            encoded,
            channels=3,
            dct_method=ACCURATE_DCT,
            try_recover_truncated=True,
            acceptable_fraction=ACCEPTABLE_FRACTION,
        ),
    )


def decode_window(
    encoded: tf.Tensor,
    fmt: tf.Tensor,
    window: tf.Tensor,
    dct_method: str = TRAIN_DCT,
    image_width: tf.Tensor | None = None,
) -> tf.Tensor:
    """uint8 [h, w, 3] of the window ``[top, left, h, w]``, the pixels of the full decode; a
    JPEG decodes only that window, with ``dct_method`` (``TRAIN_DCT``; bench/input_pipeline.py
    times the other).

    libjpeg upsamples a cropped decode's chroma (4:2:0, 4:2:2: most photos) at its left and
    right edge columns from the crop's own samples, not their neighbours outside it: about half
    of ImageNet-size windows had an edge column off by up to ~25 levels from the full decode that
    evaluation, the decoded in-memory copy and PIL see. So one column more on each side (where
    the image has one) is decoded and cut off; rows need none. ``image_width``: the image's,
    where the caller knows it (else read from the JPEG's header)."""
    window = tf.cast(window, tf.int32)

    def from_png():
        image = tf.io.decode_png(encoded, channels=3)
        return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

    def from_jpeg():
        width = image_width
        if width is None:
            width = tf.image.extract_jpeg_shape(encoded)[1]  # header only
        left = tf.maximum(window[1] - 1, 0)
        right = tf.minimum(window[1] + window[3] + 1, width)
        image = tf.io.decode_and_crop_jpeg(
            encoded,
            tf.stack([window[0], left, window[2], right - left]),
            channels=3,
            dct_method=dct_method,
            try_recover_truncated=True,
            acceptable_fraction=ACCEPTABLE_FRACTION,
        )
        return image[:, window[1] - left : window[1] - left + window[3]]

    return tf.cond(tf.equal(fmt, PNG), from_png, from_jpeg)


def example_seed(seed: int | tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """The stateless RNG seed of the example at ``position`` of the training stream."""
    return tf.stack([tf.cast(seed, tf.int64), tf.cast(position, tf.int64)])


def sample_train_params(
    rng_seed: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    crop_size: int,
    scale_min: int,
    scale_max: int,
    color_shift_std: float,
    random_flip: bool,
) -> dict[str, tf.Tensor]:
    """One draw of the training augmentation for an image of (height, width).

    ``scale``: S, an integer uniform in [scale_min, scale_max]; ``window``: [top, left, size,
    size] in original pixels, the crop's footprint, always inside the image; ``flip``: bool;
    ``alpha``: the PCA colour-shift weights, N(0, color_shift_std^2) each."""
    uniforms = tf.random.stateless_uniform([4], rng_seed, dtype=tf.float32)
    alpha = color_shift_std * tf.random.stateless_normal(
        [3], tf.random.experimental.stateless_fold_in(rng_seed, 1)
    )
    span = scale_max - scale_min + 1
    scale = scale_min + tf.minimum(tf.cast(uniforms[0] * span, tf.int32), span - 1)
    min_side = tf.minimum(height, width)
    size = tf.cast(
        tf.round(crop_size * tf.cast(min_side, tf.float32) / tf.cast(scale, tf.float32)), tf.int32
    )
    size = tf.clip_by_value(size, 1, min_side)
    top = tf.cast(uniforms[1] * tf.cast(height - size + 1, tf.float32), tf.int32)
    left = tf.cast(uniforms[2] * tf.cast(width - size + 1, tf.float32), tf.int32)
    top, left = tf.minimum(top, height - size), tf.minimum(left, width - size)
    flip = tf.logical_and(tf.constant(random_flip), uniforms[3] < 0.5)
    return {
        "scale": scale,
        "window": tf.stack([top, left, size, size]),
        "image_width": tf.cast(width, tf.int32),
        "flip": flip,
        "alpha": alpha,
    }


def pca_colour_shift(alpha: tf.Tensor, eigvals: np.ndarray, eigvecs: np.ndarray) -> tf.Tensor:
    """AlexNet's lighting noise, in 0-255 RGB units: ``255 * eigvecs @ (alpha * eigvals)``.

    The eigen-pairs are those of the covariance of RGB pixel values scaled to [0, 1] (the usual
    convention, e.g. fb.resnet.torch's ImageNet values), hence the factor 255."""
    eigvals = tf.constant(eigvals, tf.float32)
    eigvecs = tf.constant(eigvecs, tf.float32)
    return 255.0 * tf.linalg.matvec(eigvecs, alpha * eigvals)


def normalise(
    image: tf.Tensor, convention: Mapping[str, Any], shift: tf.Tensor | None = None
) -> tf.Tensor:
    """float32 RGB 0-255 (plus an optional RGB ``shift``) -> what the network expects, by its
    input convention (``conventions.InputConvention``; ``conventions.normalize`` is the NumPy
    twin of this TensorFlow one).

    ``((image + shift) * pixel_range / 255 - mean) / std``, in ``channel_order``, computed as one
    multiply (skipped when it is 1) and one add: each full-image op costs as much as the resize."""
    convention = conventions.checked(convention)
    std = np.asarray(convention["std"], np.float32)
    scale = np.float32(convention["pixel_range"] / 255.0) / std
    offset = tf.constant(-np.asarray(convention["mean"], np.float32) / std)
    bgr = convention["channel_order"] == "BGR"
    if shift is not None:
        offset += (shift[::-1] if bgr else shift) * scale
    if bgr:
        image = tf.reverse(image, [-1])
    if not np.all(scale == 1.0):
        image = image * scale
    return image + offset


def resize(image: tf.Tensor, height, width, antialias: bool) -> tf.Tensor:
    """Bilinear, to float32 (uint8 input is converted inside the kernel, with no extra pass)."""
    return tf.image.resize(image, tf.stack([height, width]), "bilinear", antialias=antialias)


def train_image(
    encoded: tf.Tensor,
    fmt: tf.Tensor,
    params: dict[str, tf.Tensor],
    crop_size: int,
    eigvals: np.ndarray,
    eigvecs: np.ndarray,
    convention: Mapping[str, Any],
    antialias: bool = False,
    dct_method: str = TRAIN_DCT,
) -> tf.Tensor:
    """float32 [crop, crop, 3]: window decoded, flipped, resized, colour-shifted, normalised.

    The flip is done on the small uint8 window and the shift is folded into the normalisation's
    single add: full-size float passes cost as much as the resize (see bench/input_pipeline.py)."""
    window = decode_window(encoded, fmt, params["window"], dct_method, params.get("image_width"))
    window = tf.cond(params["flip"], lambda: tf.reverse(window, [1]), lambda: window)
    image = resize(window, crop_size, crop_size, antialias)
    return normalise(image, convention, pca_colour_shift(params["alpha"], eigvals, eigvecs))


def eval_size(height: np.ndarray, width: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Size after an isotropic rescale to smallest side ``scale`` (numpy, for the schedule)."""
    height, width = np.asarray(height, np.int64), np.asarray(width, np.int64)
    min_side = np.minimum(height, width)
    out_h = np.where(height == min_side, scale, np.rint(height * scale / min_side))
    out_w = np.where(width == min_side, scale, np.rint(width * scale / min_side))
    return np.maximum(out_h, 1).astype(np.int32), np.maximum(out_w, 1).astype(np.int32)


def eval_image(
    encoded: tf.Tensor,
    fmt: tf.Tensor,
    size: tf.Tensor,
    bucket: tf.Tensor,
    convention: Mapping[str, Any],
) -> tf.Tensor:
    """float32 [bucket_h, bucket_w, 3]: the image resized to ``size``, normalised, top-left,
    zeros elsewhere (zero = the mean colour, as the paper's padding)."""
    image = normalise(
        resize(decode_full(encoded, fmt), size[0], size[1], antialias=True), convention
    )
    return tf.pad(image, [[0, bucket[0] - size[0]], [0, bucket[1] - size[1]], [0, 0]])


def no_autograph(fn):
    """For ``Dataset.map``: these functions branch with explicit ``tf.cond`` already, and
    AutoGraph, which cannot parse their multi-line lambdas, would only warn and run them as-is."""
    return tf.autograph.experimental.do_not_convert(fn)
