"""How the net's convolutions reach XLA: as XLA's convolution, or, on a CPU, for the shapes where
XLA:CPU's convolution is slow, as one matrix product over shifted copies of the input (im2col).

XLA:CPU's convolution is many times slower than its matrix product when the image has fewer pixels
than the kernel has taps: a 3x3 conv on a 2x2 map (a 32-pixel crop's last block) ran 4-5x slower
at 64 channels and 30-60x slower at 512 (fifth block of a full-width net on 32-pixel images), and
so does its gradient. Measured shape by shape in one process (quiet AMD EPYC, jax 0.10.2,
docs/performance.md, "Convolutions XLA:CPU is slow at"). The matrix-product form computes the same
sums (up to float rounding order) and keeps the parameters as they are: ``nn.Conv`` still owns an
``(kh, kw, in, out)`` kernel, so checkpoints and imported weights do not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# (batch, height, width, channels) images and (height, width, in, out) kernels, as nn.Conv uses.
_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def fewer_pixels_than_taps(output_hw: Sequence[int], kernel_hw: Sequence[int]) -> bool:
    """The shapes XLA:CPU's convolution is slow at: an output map with fewer pixels than the
    kernel has taps (a 3x3 kernel on 2x2, 2x3 or 1x4; not 3x3 or 2x8, where XLA's convolution
    measured as fast or faster)."""
    return output_hw[0] * output_hw[1] < kernel_hw[0] * kernel_hw[1]


def shifted_matmul_conv(
    lhs: jax.Array, rhs: jax.Array, padding: Sequence[tuple[int, int]], precision: Any = None
) -> jax.Array:
    """A stride-1 NHWC/HWIO convolution as one matrix product: the ``kh * kw`` shifted windows
    of the padded input side by side on the channel axis (im2col), times the kernel reshaped to
    ``(kh * kw * in, out)``; the window order (row, column, channel) is the kernel's own."""
    kh, kw, cin, cout = rhs.shape
    (top, bottom), (left, right) = padding
    padded = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = padded.shape[1] - kh + 1
    out_w = padded.shape[2] - kw + 1
    windows = [padded[:, i : i + out_h, j : j + out_w, :] for i in range(kh) for j in range(kw)]
    columns = jnp.concatenate(windows, axis=-1)
    return jnp.dot(columns, rhs.reshape(kh * kw * cin, cout), precision=precision)


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
    """``lax.conv_general_dilated``'s signature (what ``nn.Conv`` calls): the matrix-product form
    on a CPU for stride-1, undilated, ungrouped NHWC convolutions with explicit non-negative
    padding whose output has fewer pixels than the kernel taps; XLA's convolution otherwise."""
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
    ):
        return conv()
    kernel_hw = rhs.shape[:2]
    output_hw = [lhs.shape[1 + a] + sum(padding[a]) - kernel_hw[a] + 1 for a in range(2)]
    if not fewer_pixels_than_taps(output_hw, kernel_hw):
        return conv()
    return shifted_matmul_conv(lhs, rhs, padding, precision)
