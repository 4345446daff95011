"""How the net's convolutions reach XLA: as XLA's convolution or, on a CPU, for the shapes where
XLA:CPU's convolution is slow, as a matrix product with the kernel's taps shifted in or out.

A stride-1 convolution can be computed three ways, all the same sums up to float rounding order:

- ``"xla"``: XLA's convolution (on a CPU, Eigen's).
- ``"im2col"``: the ``kh * kw`` shifted windows of the padded input side by side on the channel
  axis, times the kernel reshaped to ``(kh * kw * in, out)`` (``shifted_matmul_conv``).
- ``"col2im"``: the input times the kernel reshaped to ``(in, kh * kw * out)`` first, then each
  tap's slice of the product shifted into place and summed (``shifted_sum_conv``).

A train step computes three things per conv: the output, the input gradient and the kernel
gradient. The input gradient is itself a convolution (``out -> in`` channels, the kernel flipped),
and the transpose of one matrix-product form is the other: the input gradient of the ``im2col``
forward is a ``col2im`` convolution and vice versa. So ``conv_forms`` picks a form for the forward
and for the input gradient by the same rule, and ``conv_in_forms`` runs each through a custom VJP.

XLA:CPU's convolution is slow at two kinds of shapes (measured shape by shape, quiet AMD EPYC,
jax 0.10.2, docs/performance.md, "Convolutions XLA:CPU is slow at"):

- an output map with fewer pixels than the kernel has taps (a 3x3 conv on 2x2, 2x3 or 1x4, as in
  a 32-pixel crop's last block): 4-5x slower than ``im2col`` at 64 channels, 30-60x at 512, and its
  gradients as well; all three computations use ``im2col`` and its transposes there;
- few channels: writing at most 8 (one AVX2 register of float32) or reading at most 3 (the image):
  a 3 -> 8 conv on 32x32 crops 1.9-4x slower than ``im2col``, a 16 -> 8 one 1.6-2.2x slower than
  ``col2im``. The form whose buffer holds ``taps x min(in, out)`` channels per pixel is used when
  its buffer for one output row is at most ``MAX_BUFFER_BYTES``.

A matrix form's buffer that outgrows the cache makes it fall far behind XLA (a 3 -> 8 conv at
batch 256, 28 MB of columns: 19 against 8.5 ms), so on one device the matrix forms run a batch
whose buffer exceeds ``MAX_BUFFER_BYTES`` in equal chunks of examples that fit (``batch_chunk``, a
``lax.map``), and an example whose own buffer exceeds it in equal bands of rows, each with the
kernel's halo: the per-epoch validation's and the evaluator's first conv (batch 128 at 48x48, 32
MB of columns) 4.4 against XLA's 9.4 ms, VGG16's first conv at batch 8 and 224 pixels 51 against
71 ms, a 3 -> 4 conv on 256x352 images (9.3 MiB an image) 11.9 against 22.5 ms. Across several
devices a chunk would span the batch's shards and GSPMD gathers the whole batch onto every device
for the loop (measured: slower than XLA's convolution), so there the rule counts the whole
batch's buffer, as if neither chunks nor bands existed.

The kernel gradient stays XLA's convolution except on maps with fewer pixels than taps (``im2col``
with a kernel gradient alone measured 2.1 against 1.0 ms on the 3 -> 8 layer). ``nn.Conv`` still
owns an ``(kh, kw, in, out)`` kernel, so checkpoints and imported weights do not change.

Below float32 (bfloat16, float16) the forms that add shifted pieces (the ``col2im`` forward, and
the transpose of ``im2col``, which is the input gradient in form ``col2im``) would add in that
narrow type, where XLA's convolution accumulates in float32: 2.5-4.5x XLA's rounding error in
bfloat16, 2x in a width-1/64 D's gradients. There those two stay XLA's; the ``im2col`` forward and
the input gradient in form ``im2col`` are single products (float32 accumulation) and are kept.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# (batch, height, width, channels) images and (height, width, in, out) kernels, as nn.Conv uses.
_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")

XLA, IM2COL, COL2IM = "xla", "im2col", "col2im"
# At most this many output channels (one AVX2 register of float32 lanes), or this many input
# channels (an RGB image), is a shape XLA:CPU's convolution is slow at.
FEW_OUTPUT_CHANNELS = 8
FEW_INPUT_CHANNELS = 3
# The largest shifted-copy buffer a matrix-product form may use for a few-channel conv.
MAX_BUFFER_BYTES = 8 << 20

Padding = tuple[tuple[int, int], tuple[int, int]]


def fewer_pixels_than_taps(output_hw: Sequence[int], kernel_hw: Sequence[int]) -> bool:
    """The shapes XLA:CPU's convolution is slow at: an output map with fewer pixels than the
    kernel has taps (a 3x3 kernel on 2x2, 2x3 or 1x4; not 3x3 or 2x8, where XLA's convolution
    measured as fast or faster)."""
    return output_hw[0] * output_hw[1] < kernel_hw[0] * kernel_hw[1]


def few_channel_form(
    input_pixels: int, output_pixels: int, taps: int, cin: int, cout: int, itemsize: int
) -> str:
    """The form for a conv reading ``cin`` and writing ``cout`` channels on maps of
    ``input_pixels`` and ``output_pixels`` (one example's, or the whole batch's where it cannot
    run in chunks; module docstring): ``"xla"`` unless it has few channels and the matrix form's
    buffer for them is small enough."""
    if cout > FEW_OUTPUT_CHANNELS and cin > FEW_INPUT_CHANNELS:
        return XLA
    if cin <= cout:
        form, buffer = IM2COL, output_pixels * taps * cin * itemsize
    else:
        form, buffer = COL2IM, input_pixels * taps * cout * itemsize
    return form if buffer <= MAX_BUFFER_BYTES else XLA


def chunks_allowed() -> bool:
    """Whether the matrix forms may run a batch in chunks: on one device only (module docstring)."""
    return jax.device_count() == 1


def conv_forms(
    lhs_shape: Sequence[int], rhs_shape: Sequence[int], padding: Padding, itemsize: int = 4
) -> tuple[str, str, str]:
    """``(forward, input gradient, kernel gradient)`` forms of a stride-1 NHWC/HWIO conv."""
    n, h, w, _ = lhs_shape
    kh, kw, cin, cout = rhs_shape
    output_hw = [h + sum(padding[0]) - kh + 1, w + sum(padding[1]) - kw + 1]
    if fewer_pixels_than_taps(output_hw, (kh, kw)):
        return IM2COL, _precise(COL2IM, itemsize), IM2COL
    if chunks_allowed():  # the smallest piece: one output row and the input rows it reads
        input_pixels, output_pixels = kh * w, output_hw[1]
    else:
        input_pixels, output_pixels = n * h * w, n * output_hw[0] * output_hw[1]
    forward = few_channel_form(input_pixels, output_pixels, kh * kw, cin, cout, itemsize)
    input_gradient = few_channel_form(output_pixels, input_pixels, kh * kw, cout, cin, itemsize)
    return _precise(forward, itemsize), _precise(input_gradient, itemsize), XLA


def _precise(form: str, itemsize: int) -> str:
    """``form``, unless it would add shifted pieces in a type narrower than float32."""
    return XLA if form == COL2IM and itemsize < 4 else form


def shifted_matmul_conv(
    lhs: jax.Array, rhs: jax.Array, padding: Sequence[tuple[int, int]], precision: Any = None
) -> jax.Array:
    """``"im2col"``: a stride-1 NHWC/HWIO convolution as one matrix product: the ``kh * kw``
    shifted windows of the padded input side by side on the channel axis, times the kernel
    reshaped to ``(kh * kw * in, out)``; the window order (row, column, channel) is the kernel's."""
    kh, kw, cin, cout = rhs.shape
    (top, bottom), (left, right) = padding
    padded = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = padded.shape[1] - kh + 1
    out_w = padded.shape[2] - kw + 1
    # The column shifts first, then the row shifts of their result: two concatenations of kw and
    # kh pieces, which XLA:CPU copies faster than one of kh * kw (0.5 against 1.6 ms for a
    # 3-channel 32x32 batch of 64). Channel order (row, column, channel) either way.
    row_windows = jnp.concatenate([padded[:, :, j : j + out_w] for j in range(kw)], axis=-1)
    columns = jnp.concatenate([row_windows[:, i : i + out_h] for i in range(kh)], axis=-1)
    return jnp.dot(columns, rhs.reshape(kh * kw * cin, cout), precision=precision)


def shifted_sum_conv(
    lhs: jax.Array, rhs: jax.Array, padding: Sequence[tuple[int, int]], precision: Any = None
) -> jax.Array:
    """``"col2im"``: the same convolution as the input times the kernel reshaped to
    ``(in, kh * kw * out)``, then each tap's ``out`` columns, padded like the input, shifted by
    the tap's offset and summed: output pixel ``p`` gets tap ``(i, j)`` of input pixel
    ``p + (i, j) - (top, left)``."""
    kh, kw, cin, cout = rhs.shape
    n, h, w, _ = lhs.shape
    (top, bottom), (left, right) = padding
    taps = jnp.dot(lhs, rhs.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout), precision=precision)
    taps = jnp.pad(
        taps.reshape(n, h, w, kh, kw, cout),
        ((0, 0), (top, bottom), (left, right), (0, 0), (0, 0), (0, 0)),
    )
    out_h = h + top + bottom - kh + 1
    out_w = w + left + right - kw + 1
    shifted = [taps[:, i : i + out_h, j : j + out_w, i, j, :] for i in range(kh) for j in range(kw)]
    return functools.reduce(jnp.add, shifted)


def batch_chunk(batch: int, bytes_per_example: int) -> int:
    """Examples per chunk for a matrix form whose buffer takes ``bytes_per_example``: the whole
    batch while its buffer fits ``MAX_BUFFER_BYTES`` or chunks are not allowed
    (``chunks_allowed``), else the fewest equal chunks that fit (one example per chunk at least;
    the last chunk is filled up with zero examples)."""
    fits = max(1, MAX_BUFFER_BYTES // max(bytes_per_example, 1))
    if batch <= fits or not chunks_allowed():
        return batch
    chunks = -(-batch // fits)
    return -(-batch // chunks)


def _in_batch_chunks(conv, lhs, rhs, padding, precision, bytes_per_example):
    """``conv`` over ``lhs`` in chunks of ``batch_chunk`` examples, one after another."""
    n = lhs.shape[0]
    chunk = batch_chunk(n, bytes_per_example)
    if chunk >= n:
        return conv(lhs, rhs, padding, precision)
    chunks = -(-n // chunk)
    filled = jnp.pad(lhs, ((0, chunks * chunk - n),) + ((0, 0),) * (lhs.ndim - 1))
    parts = filled.reshape(chunks, chunk, *lhs.shape[1:])
    out = lax.map(lambda part: conv(part, rhs, padding, precision), parts)
    return out.reshape(chunks * chunk, *out.shape[2:])[:n]


def _in_row_bands(conv, lhs, rhs, padding, precision, band_rows, bytes_per_band):
    """``conv`` over bands of ``band_rows`` output rows of every example (each band's input rows
    with the kernel's halo, the vertical padding applied first), the bands run in chunks."""
    kh = rhs.shape[0]
    (top, bottom), horizontal = padding
    n, h, w, c = lhs.shape
    out_h = h + top + bottom - kh + 1
    bands = -(-out_h // band_rows)
    rows = band_rows + kh - 1
    padded = jnp.pad(lhs, ((0, 0), (top, bands * band_rows + kh - 1 - h - top), (0, 0), (0, 0)))
    pieces = jnp.stack([padded[:, b * band_rows : b * band_rows + rows] for b in range(bands)], 1)
    out = _in_batch_chunks(
        conv, pieces.reshape(n * bands, rows, w, c), rhs, ((0, 0), horizontal), precision,
        bytes_per_band,
    )  # fmt: skip
    return out.reshape(n, bands * band_rows, *out.shape[2:])[:, :out_h]


def _matrix_form(conv, lhs, rhs, padding, precision, bytes_per_row, example_rows, band_halo):
    """``conv`` (a matrix form) whole, in chunks of examples, or, where one example's buffer is
    over ``MAX_BUFFER_BYTES``, in bands of rows. The buffer takes ``bytes_per_row`` for each of an
    example's ``example_rows`` rows, and for each of a band's output rows plus ``band_halo``."""
    kh = rhs.shape[0]
    out_h = lhs.shape[1] + sum(padding[0]) - kh + 1
    per_example = example_rows * bytes_per_row
    if per_example <= MAX_BUFFER_BYTES or not chunks_allowed() or out_h == 1:
        return _in_batch_chunks(conv, lhs, rhs, padding, precision, per_example)
    most_rows = max(1, MAX_BUFFER_BYTES // bytes_per_row - band_halo)
    band_rows = -(-out_h // -(-out_h // most_rows))  # the fewest equal bands that fit
    bytes_per_band = (band_rows + band_halo) * bytes_per_row
    return _in_row_bands(conv, lhs, rhs, padding, precision, band_rows, bytes_per_band)


def im2col_conv(
    lhs: jax.Array, rhs: jax.Array, padding: Sequence[tuple[int, int]], precision: Any = None
) -> jax.Array:
    """``"im2col"``: ``shifted_matmul_conv`` in pieces whose columns (output pixels x taps x in
    channels) fit ``MAX_BUFFER_BYTES``: chunks of examples, or bands of an example's rows."""
    kh, kw, cin, _ = rhs.shape
    out_h = lhs.shape[1] + sum(padding[0]) - kh + 1
    out_w = lhs.shape[2] + sum(padding[1]) - kw + 1
    per_row = out_w * kh * kw * cin * lhs.dtype.itemsize  # a row of output pixels' columns
    return _matrix_form(shifted_matmul_conv, lhs, rhs, padding, precision, per_row, out_h, 0)


def col2im_conv(
    lhs: jax.Array, rhs: jax.Array, padding: Sequence[tuple[int, int]], precision: Any = None
) -> jax.Array:
    """``"col2im"``: ``shifted_sum_conv`` in pieces whose products (input pixels x taps x out
    channels) fit ``MAX_BUFFER_BYTES``: chunks of examples, or bands of an example's rows."""
    kh, kw, _, cout = rhs.shape
    per_row = lhs.shape[2] * kh * kw * cout * lhs.dtype.itemsize  # a row of input pixels' taps
    # A band of r output rows reads r + kh - 1 (padded) input rows.
    return _matrix_form(
        shifted_sum_conv, lhs, rhs, padding, precision, per_row, lhs.shape[1], kh - 1
    )


def _xla_conv(lhs, rhs, padding, precision=None):
    return lax.conv_general_dilated(
        lhs, rhs, (1, 1), padding, dimension_numbers=_NHWC_HWIO, precision=precision
    )


# Each form's forward, by name (bench/conv_forms.py times them side by side).
FORWARD_FORMS = {XLA: _xla_conv, IM2COL: im2col_conv, COL2IM: col2im_conv}
# The input gradient in form F is the transpose (VJP) of this forward: each matrix form's
# transpose is the other form.
_TRANSPOSED_FOR_INPUT_GRADIENT = {XLA: _xla_conv, IM2COL: col2im_conv, COL2IM: im2col_conv}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_in_forms(
    lhs: jax.Array, rhs: jax.Array, padding: Padding, forms: tuple[str, str, str], precision: Any
) -> jax.Array:
    """A stride-1 NHWC/HWIO conv whose forward, input gradient and kernel gradient are computed
    in the given forms (``conv_forms``)."""
    return FORWARD_FORMS[forms[0]](lhs, rhs, padding, precision)


def _conv_in_forms_forward(lhs, rhs, padding, forms, precision):
    return conv_in_forms(lhs, rhs, padding, forms, precision), (lhs, rhs)


def _conv_in_forms_backward(padding, forms, precision, residuals, cotangent):
    lhs, rhs = residuals
    input_conv = _TRANSPOSED_FOR_INPUT_GRADIENT[forms[1]]
    kernel_conv = FORWARD_FORMS[forms[2]]
    # Linear in each argument: transposing computes the gradient without the forward again.
    (lhs_grad,) = jax.linear_transpose(lambda x: input_conv(x, rhs, padding, precision), lhs)(
        cotangent
    )
    (rhs_grad,) = jax.linear_transpose(lambda k: kernel_conv(lhs, k, padding, precision), rhs)(
        cotangent
    )
    return lhs_grad, rhs_grad


conv_in_forms.defvjp(_conv_in_forms_forward, _conv_in_forms_backward)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated``'s signature (what ``nn.Conv`` calls): on a CPU, stride-1,
    undilated, ungrouped NHWC convolutions with explicit non-negative padding and a non-empty
    output are computed in the forms ``conv_forms`` picks; XLA's convolution otherwise, and
    everywhere on GPU and TPU."""
    conv = lambda: lax.conv_general_dilated(  # noqa: E731
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if (
        jax.default_backend() != "cpu"
        or isinstance(padding, str)
        or lhs.ndim != 4
        or any(s != 1 for s in window_strides)
        or any(d != 1 for d in (lhs_dilation or ()))
        or any(d != 1 for d in (rhs_dilation or ()))
        or feature_group_count != 1
        or batch_group_count != 1
        or preferred_element_type is not None
        or any(p < 0 for pair in padding for p in pair)
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)
        or lhs.shape[1] + sum(padding[0]) < rhs.shape[0]  # an empty output map
        or lhs.shape[2] + sum(padding[1]) < rhs.shape[1]
    ):
        return conv()
    padding = tuple((int(low), int(high)) for low, high in padding)
    forms = conv_forms(lhs.shape, rhs.shape, padding, jnp.dtype(lhs.dtype).itemsize)
    if forms == (XLA, XLA, XLA):
        return conv()
    return conv_in_forms(lhs, rhs, padding, forms, precision)
