"""The six VGG configurations of Table 1 (A, A-LRN, B, C, D, E) as one Flax linen module.

One parameter tree serves two ways of applying the net, as in the paper (sections 3.1 and 3.2):

* ``VGG.__call__`` is the classifier on crops of the training crop size (224 in the paper);
* ``VGG.dense`` is the fully-convolutional form used for dense evaluation: FC1 is applied as a
  ``w x w`` VALID convolution (``w = crop_size / 32``, 7 for 224) and FC2/FC3 as 1x1 convolutions
  on a whole image of any size at least the crop size, giving a class score map and its spatial
  average.

FC1's kernel is stored once, as a dense ``(w * w * C, F)`` matrix whose rows are in (H, W, C) order,
the same layout as Keras' ``Flatten`` + ``Dense``; the convolutional form is a reshape of it, so no
second copy of the weights exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgg_jax import conv_lowering

LRN = "LRN"
NUM_POOLS = 5  # every configuration has five blocks, each ending in a 2x2/2 max-pool

# A block entry is an int (a 3x3 conv with that many output channels), a (features, kernel_size)
# pair (configuration C's 1x1 convs, B-5x5's 5x5 convs) or LRN (configuration A-LRN's local
# response normalisation).
LayerSpec = int | tuple[int, int] | str
Layout = tuple[tuple[LayerSpec, ...], ...]

LAYOUTS: dict[str, Layout] = {
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "A-LRN": ((64, LRN), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "C": (
        (64, 64),
        (128, 128),
        (256, 256, (256, 1)),
        (512, 512, (512, 1)),
        (512, 512, (512, 1)),
    ),
    # Section 4.1's shallow comparison net: B with each pair of 3x3 convs replaced by one 5x5 conv
    # (the same receptive field), 8 weight layers.
    "B-5x5": (((64, 5),), ((128, 5),), ((256, 5),), ((512, 5),), ((512, 5),)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INITIALIZERS = ("paper_normal", "glorot", "he")

# AlexNet's LRN constants (Krizhevsky et al. 2012), as the paper uses them for A-LRN.
LRN_SIZE, LRN_K, LRN_ALPHA, LRN_BETA = 5, 2.0, 1e-4, 0.75


def promote_keeping_bias(
    inputs: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Flax's ``promote_dtype`` for a layer's ``(inputs, kernel, bias)``, except that the bias
    stays in its float32 parameter dtype: ``y + bias`` is then float32, which the layer's caller
    casts back to the compute dtype.

    The bias's gradient is the sum of the output's gradient over every batch and spatial
    position. With the bias cast to bfloat16 that sum ran in bfloat16, and XLA:CPU accumulates a
    bfloat16 reduction in bfloat16: 65,536 gradients of about 0.5 (a batch of 64 32-pixel crops)
    summed to 512, not 32,768, as a running sum stops growing at 2**8 times its terms. Added in
    float32, the sum runs in float32 on every backend. Float32 compute is unchanged."""
    inputs, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=dtype)
    return inputs, kernel, bias


def kernel_initializer(name: str, std: float = 0.01) -> Callable[..., jax.Array]:
    """Returns the weight initialiser the config names.

    ``paper_normal``: the paper trains net A from "a normal distribution with zero mean and 10^-2
    variance". Read literally that is a standard deviation of 0.1, which grows the activations of
    a 512-channel 3x3 layer about fivefold per layer (He's std there is 0.02), so net A could not
    start training. We read "10^-2" as the standard deviation, as in Caffe's ``gaussian std: 0.01``
    fillers of the AlexNet setup the paper builds on; ``init_std`` in the config changes it.
    ``glorot``: Glorot & Bengio's uniform init, which the paper notes trains the deep nets without
    net-A pre-initialisation.
    ``he``: He et al.'s N(0, 2 / fan_in), not in the paper (it came a year later) but what keeps a
    plain ReLU stack's signal from shrinking 2x per layer; small nets trained briefly need it.
    """
    if name == "paper_normal":
        return nn.initializers.normal(stddev=std)
    if name == "glorot":
        return nn.initializers.glorot_uniform()
    if name == "he":
        return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    raise ValueError(f"Unknown model.init {name!r}; valid: {list(INITIALIZERS)}")


def local_response_norm(
    x: jax.Array,
    size: int = LRN_SIZE,
    k: float = LRN_K,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
) -> jax.Array:
    """AlexNet's cross-channel LRN on NHWC input, in Caffe's convention (alpha divided by size).

    b_c = a_c / (k + alpha / size * sum_{c' within size/2 of c} a_{c'}^2) ** beta
    """
    squares = jnp.square(x.astype(jnp.float32))
    half = size // 2
    window_sum = jax.lax.reduce_window(
        squares,
        0.0,
        jax.lax.add,
        window_dimensions=(1, 1, 1, size),
        window_strides=(1, 1, 1, 1),
        padding=((0, 0), (0, 0), (0, 0), (half, size - 1 - half)),
    )
    return (x / (k + alpha / size * window_sum) ** beta).astype(x.dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2/2 max-pool in Caffe's ceil mode: an odd last row or column is pooled on its own.

    Caffe, which the paper used, rounds the pooled size up, so a dense score map sees the whole
    image whatever its size; floor mode would drop up to 31 bottom and right pixels before the
    score map. The odd row/column is padded with zeros, which equals Caffe's -inf padding because
    every pool here follows a ReLU (or A-LRN's LRN of one): its inputs are >= 0. Training crops
    are multiples of 32, so nothing is padded there.

    A window's gradient is shared equally by its tied maxima (JAX's rule for ``max``), not given
    to the first of them as Caffe and ``nn.max_pool`` do. Ties are common on images with flat
    regions (equal conv outputs side by side), and there the first-maximum rule sends every
    window's gradient to its top-left pixel: on the built-in dataset it trained the study's net B
    15 points worse (docs/performance.md, "Few-channel convolutions and the pool's gradient").
    Written with its own VJP over the window's four strided slices: the same values as the
    reshape-and-max form it replaces, about 1.3x faster on a CPU, and about 5x faster than
    ``nn.max_pool``'s select-and-scatter.
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    return _max_pool_even(x)


def _window_corners(x: jax.Array) -> list[jax.Array]:
    """The four pixels of each 2x2/2 window, row-major: (0, 0), (0, 1), (1, 0), (1, 1)."""
    return [x[:, i::2, j::2, :] for i in (0, 1) for j in (0, 1)]


@jax.custom_vjp
def _max_pool_even(x: jax.Array) -> jax.Array:
    top_left, top_right, bottom_left, bottom_right = _window_corners(x)
    return jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))


def _max_pool_even_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    pooled = _max_pool_even(x)
    return pooled, (x, pooled)


def _max_pool_even_backward(
    residuals: tuple[jax.Array, jax.Array], cotangent: jax.Array
) -> tuple[jax.Array]:
    x, pooled = residuals
    maxima = [corner == pooled for corner in _window_corners(x)]
    share = cotangent / sum(m.astype(cotangent.dtype) for m in maxima)
    corners = [jnp.where(m, share, 0) for m in maxima]
    n, h, w, c = x.shape
    top = jnp.stack(corners[:2], axis=3)  # (n, h/2, w/2, 2 columns, c)
    bottom = jnp.stack(corners[2:], axis=3)
    return (jnp.stack([top, bottom], axis=2).reshape(n, h, w, c),)  # rows between


_max_pool_even.defvjp(_max_pool_even_forward, _max_pool_even_backward)


def pooled_size(sizes: jax.Array | int, pools: int = 1) -> jax.Array | int:
    """Valid height/width after ``pools`` ceil-mode 2x2/2 pools: ``ceil(size / 2**pools)``."""
    return -(-sizes // 2**pools)


def valid_mask(sizes: jax.Array, height: int, width: int) -> jax.Array:
    """``(N, height, width, 1)`` mask, 1 inside each image's valid ``(h, w)`` top-left region."""
    rows = jnp.arange(height)[None, :] < sizes[:, :1]
    cols = jnp.arange(width)[None, :] < sizes[:, 1:2]
    return (rows[:, :, None] & cols[:, None, :])[..., None]


def score_map_size(sizes: jax.Array, window: int) -> jax.Array:
    """Valid score-map size for images of ``sizes`` (h, w): five ceil-mode halvings, then FC1's
    window."""
    return pooled_size(sizes, NUM_POOLS) - window + 1


class WindowDense(nn.Module):
    """FC1: a dense layer over a ``window x window`` feature map that can also slide as a conv.

    The kernel is ``(window * window * C, features)`` with rows in (H, W, C) order. Applied to a
    ``window x window`` map it is the classifier's fully connected layer; with ``as_conv=True`` it
    is the same weights reshaped to a ``window x window`` VALID convolution over a map of any size.
    """

    features: int
    window: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.initializers.normal(0.01)

    @nn.compact
    def __call__(self, x: jax.Array, as_conv: bool = False) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (self.window * self.window * channels, self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = promote_keeping_bias(x, kernel, bias, dtype=self.dtype)
        if as_conv:
            conv_kernel = kernel.reshape(self.window, self.window, channels, self.features)
            y = jax.lax.conv_general_dilated(
                x, conv_kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        else:
            if x.shape[1:3] != (self.window, self.window):
                raise ValueError(
                    f"The classifier takes {self.window * 2**NUM_POOLS}-pixel crops "
                    f"(a {self.window}x{self.window} feature map), got a {x.shape[1]}x{x.shape[2]} "
                    "map; use VGG.dense for whole images."
                )
            y = x.reshape(x.shape[0], -1) @ kernel
        return (y + bias).astype(x.dtype)


class VGG(nn.Module):
    """A VGG net of Table 1, NHWC input, logits output (softmax is in the loss).

    ``width`` scales every conv's channel count and ``fc_width`` sets FC1/FC2 (4096 in the paper);
    the small variants used by the demo and tests change only these. ``dtype`` is the compute dtype;
    parameters stay in ``param_dtype`` (float32).
    """

    layout: Layout
    num_classes: int = 1000
    crop_size: int = 224
    width: float = 1.0
    fc_width: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    initializer: str = "paper_normal"
    init_std: float = 0.01

    def _conv_features(self, x: jax.Array, sizes: jax.Array | None) -> jax.Array:
        """The conv stack. With ``sizes`` (valid (h, w) of top-left-aligned, zero-padded images)
        every activation outside the valid region is zeroed, so the valid part equals what the
        unpadded image gives: the padding acts exactly like the convs' own zero padding."""

        def masked(x, sizes):
            if sizes is None:
                return x
            return x * valid_mask(sizes, x.shape[1], x.shape[2]).astype(x.dtype)

        kernel_init = kernel_initializer(self.initializer, self.init_std)
        x = masked(x, sizes)
        for block_index, block in enumerate(self.layout, start=1):
            conv_index = 0
            for spec in block:
                if spec == LRN:
                    x = local_response_norm(x)
                    self.sow("intermediates", f"block{block_index}_lrn", x)
                    continue
                features, size = spec if isinstance(spec, tuple) else (spec, 3)
                conv_index += 1
                x = nn.Conv(
                    max(1, round(features * self.width)),
                    (size, size),
                    padding=size // 2,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    kernel_init=kernel_init,
                    bias_init=nn.initializers.zeros,
                    conv_general_dilated=conv_lowering.conv_general_dilated,
                    promote_dtype=promote_keeping_bias,
                    name=f"block{block_index}_conv{conv_index}",
                )(x).astype(self.dtype)
                x = masked(nn.relu(x), sizes)
            x = max_pool_2x2(x)
            sizes = None if sizes is None else pooled_size(sizes)
            x = masked(x, sizes)
            self.sow("intermediates", f"block{block_index}_pool", x)
        return x

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool = False,
        fully_convolutional: bool = False,
        sizes: jax.Array | None = None,
    ) -> jax.Array:
        """Classifier logits ``(N, classes)``, or the score map ``(N, h, w, classes)``.

        ``fully_convolutional=True`` is the dense-evaluation form (no dropout); prefer ``dense``.
        ``sizes``: see ``_conv_features``.
        """
        kernel_init = kernel_initializer(self.initializer, self.init_std)
        dense = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=kernel_init,
            bias_init=nn.initializers.zeros,
            promote_dtype=promote_keeping_bias,
        )
        x = self._conv_features(jnp.asarray(x, self.dtype), sizes)
        window = self.crop_size // 2**NUM_POOLS
        x = WindowDense(
            self.fc_width,
            window,
            self.dtype,
            self.param_dtype,
            kernel_init,
            name="fc1",
        )(x, as_conv=fully_convolutional)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train or fully_convolutional)(x)
        x = nn.relu(nn.Dense(self.fc_width, name="fc2", **dense)(x).astype(self.dtype))
        x = nn.Dropout(self.dropout_rate, deterministic=not train or fully_convolutional)(x)
        x = nn.Dense(self.num_classes, name="fc3", **dense)(x)
        return x.astype(jnp.float32)

    def dense(
        self, images: jax.Array, sizes: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Dense evaluation: ``(score_map (N, h, w, classes), its spatial average (N, classes))``.

        Images may be any size at least the crop size. The average is of the class scores, as the
        paper's "spatially averaged (sum-pooled)" class score map; softmax comes after. Images of
        different sizes can share a batch: zero-pad each at its bottom and right into one shape and
        pass their valid ``sizes`` ``(N, 2)``; the average then covers only each image's own cells
        and equals that of the unpadded image.
        """
        score_map = self(images, train=False, fully_convolutional=True, sizes=sizes)
        if sizes is None:
            return score_map, score_map.mean(axis=(1, 2))
        return score_map, mean_over_valid_cells(score_map, sizes, self.crop_size)


def mean_over_valid_cells(maps: jax.Array, sizes: jax.Array, crop_size: int) -> jax.Array:
    """``(N, C)``: each dense map ``(N, h, w, C)`` averaged over the cells of its image's valid
    ``sizes`` only (a zero-padded image averages as the unpadded one)."""
    cells = score_map_size(sizes, crop_size // 2**NUM_POOLS)
    mask = valid_mask(cells, maps.shape[1], maps.shape[2])
    total = jnp.sum(maps * mask, axis=(1, 2))
    return total / jnp.maximum(jnp.prod(cells, axis=-1, keepdims=True), 1)


def transposed_params(model: VGG, params: Any) -> Any:
    """The parameters of the same net looking at transposed images (height and width swapped):
    the net with these on a transposed image gives the transposed score map of the original, so
    one compiled program serves an image shape and its transpose (the evaluator's portrait and
    landscape buckets). Every conv kernel's spatial axes are swapped, and FC1's rows, in
    (H, W, C) order, are reordered to (W, H, C); pooling, LRN and the rest are symmetric."""
    window = model.crop_size // 2**NUM_POOLS

    def layer(name: str, values: Any) -> Any:
        if name.startswith("block") and "kernel" in values:
            return {**values, "kernel": jnp.swapaxes(values["kernel"], 0, 1)}
        if name == "fc1":
            kernel = values["kernel"]
            grid = kernel.reshape(window, window, -1, kernel.shape[-1])
            return {**values, "kernel": jnp.swapaxes(grid, 0, 1).reshape(kernel.shape)}
        return values

    return {name: layer(name, values) for name, values in params.items()}


def build_model(model_config: ml_collections.ConfigDict, crop_size: int) -> VGG:
    """Builds the VGG a config's ``model`` group names; unknown names fail with the valid ones."""
    if model_config.name not in LAYOUTS:
        raise ValueError(f"Unknown model.name {model_config.name!r}; valid: {sorted(LAYOUTS)}")
    if model_config.dtype not in DTYPES:
        raise ValueError(f"Unknown model.dtype {model_config.dtype!r}; valid: {sorted(DTYPES)}")
    if crop_size % 2**NUM_POOLS:
        raise ValueError(f"crop_size must be a multiple of {2**NUM_POOLS}, got {crop_size}")
    kernel_initializer(model_config.init)  # fail at start-up on an unknown name
    return VGG(
        layout=LAYOUTS[model_config.name],
        num_classes=model_config.num_classes,
        crop_size=crop_size,
        width=model_config.width,
        fc_width=model_config.fc_width,
        dropout_rate=model_config.dropout_rate,
        dtype=DTYPES[model_config.dtype],
        initializer=model_config.init,
        init_std=model_config.init_std,
    )


def abstract_params(model: VGG, batch_size: int = 1) -> Any:
    """Parameter shapes without allocating them (``jax.eval_shape`` of ``init``)."""
    images = jax.ShapeDtypeStruct((batch_size, model.crop_size, model.crop_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(images.shape)))["params"]


def count_params(params: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


@dataclasses.dataclass(frozen=True)
class LayerRow:
    name: str
    output_shape: tuple[int, ...]
    params: int


def layer_table(model: VGG, image_size: int | None = None) -> list[LayerRow]:
    """One row per layer in forward order: name, output shape (batch 1), parameter count."""
    size = image_size or model.crop_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    params = abstract_params(model)

    def forward(variables, x):
        return model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])

    _, state = jax.eval_shape(forward, {"params": params}, images)
    outputs = state["intermediates"]
    rows = []
    for name in _layer_names(model.layout):
        output = outputs[name]
        output = output["__call__"] if isinstance(output, dict) else output
        params_here = count_params(params[name]) if name in params else 0
        rows.append(LayerRow(name, tuple(output[0].shape), params_here))
    return rows


def _layer_names(layout: Layout) -> list[str]:
    names = []
    for block_index, block in enumerate(layout, start=1):
        convs = 0
        for spec in block:
            if spec == LRN:
                names.append(f"block{block_index}_lrn")
            else:
                convs += 1
                names.append(f"block{block_index}_conv{convs}")
        names.append(f"block{block_index}_pool")
    return names + ["fc1", "fc2", "fc3"]


def conv_names(net: str) -> list[str]:
    """Net ``net``'s conv layers in order (``block1_conv1`` ...), as weight importers map them."""
    return [name for name in _layer_names(LAYOUTS[net]) if "_conv" in name]


def format_summary(model: VGG, name: str) -> str:
    """The ``--mode=summary`` text; its last line is ``total parameters: N``."""
    rows = layer_table(model)
    lines = [f"VGG configuration {name}: input (1, {model.crop_size}, {model.crop_size}, 3)"]
    lines.append(f"{'layer':<16}{'output shape':<24}{'parameters':>14}")
    for row in rows:
        lines.append(f"{row.name:<16}{str(row.output_shape):<24}{row.params:>14,}")
    lines.append(f"total parameters: {count_params(abstract_params(model))}")
    return "\n".join(lines)
