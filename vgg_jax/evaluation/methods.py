"""The paper's test-time methods (section 3.2) as pure functions of a batch, run on the device.

Batches are images of different sizes zero-padded at the bottom and right into one bucket shape,
with their valid ``sizes`` ``(N, 2)``; every function here keeps the padding out of the result:

* ``dense_probabilities``: the fully-convolutional net on the whole image, its class score map
  averaged over the image's own cells, softmax; averaged with the horizontally flipped image's
  softmax (the flip mirrors each image inside its valid region, so the padding stays put);
* ``multi_crop_probabilities``: a ``grid x grid`` regular grid of crop-size crops per image (first
  at the top-left corner, last at the bottom-right) plus their flips, cut on the device, each
  classified, softmax averaged over the crops (50 per scale for the paper's 5x5 grid).

``CompiledMethods`` jits them once per net and mesh and compiles once per bucket shape.
Softmax outputs, never logits, are what later steps average (scales, methods, nets).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from vgg_jax import models, sharding

BASE_METHODS = ("dense", "multi_crop")


def flip_within_valid(images: jax.Array, sizes: jax.Array) -> jax.Array:
    """Mirrors each image's valid ``(h, w)`` top-left region left-right; padding stays zero."""
    width = images.shape[2]
    source = sizes[:, 1:2] - 1 - jnp.arange(width)[None, :]  # (N, W) column read from
    inside = (source >= 0)[:, None, :, None]
    mirrored = jnp.take_along_axis(images, jnp.clip(source, 0, width - 1)[:, None, :, None], axis=2)
    return jnp.where(inside, mirrored, jnp.zeros((), images.dtype))


def dense_scores(
    model: models.VGG, params: Any, images: jax.Array, sizes: jax.Array | None = None
) -> jax.Array:
    """Class scores ``(N, classes)``: the score map averaged over each image's valid cells."""
    _, scores = model.apply({"params": params}, images, sizes, method="dense")
    return scores


def dense_probabilities(
    model: models.VGG, params: Any, images: jax.Array, sizes: jax.Array, flip: bool = True
) -> jax.Array:
    """Dense evaluation's softmax ``(N, classes)``, averaged with the flipped image's when
    ``flip`` (the paper averages the soft-max posteriors of an image and its flip)."""
    probabilities = jax.nn.softmax(dense_scores(model, params, images, sizes))
    if flip:
        flipped = dense_scores(model, params, flip_within_valid(images, sizes), sizes)
        probabilities = (probabilities + jax.nn.softmax(flipped)) / 2
    return probabilities


def grid_offsets(sizes: jax.Array, crop_size: int, grid: int = 5) -> jax.Array:
    """Top-left corners ``(N, grid * grid, 2)`` of a regular grid of crops covering each image.

    Along each axis the offsets run evenly (to the pixel) from 0 to ``size - crop_size``, so the
    first crop sits at the top-left corner and the last at the bottom-right; row-major order.
    One crop per image (``grid=1``) is the centre crop.
    """
    span = sizes - crop_size  # (N, 2)
    if grid == 1:
        along = (span // 2)[:, None, :]
    else:
        along = jnp.arange(grid)[None, :, None] * span[:, None, :] // (grid - 1)  # (N, grid, 2)
    rows = jnp.broadcast_to(along[:, :, None, 0], (sizes.shape[0], grid, grid))
    cols = jnp.broadcast_to(along[:, None, :, 1], (sizes.shape[0], grid, grid))
    return jnp.stack([rows, cols], axis=-1).reshape(sizes.shape[0], grid * grid, 2)


def crops_at(images: jax.Array, offsets: jax.Array, crop_size: int) -> jax.Array:
    """One ``crop_size`` crop per image ``(N, crop, crop, C)`` at its top-left ``offsets``."""

    def crop(image, offset):
        start = (offset[0], offset[1], 0)
        return jax.lax.dynamic_slice(image, start, (crop_size, crop_size, image.shape[-1]))

    return jax.vmap(crop)(images, offsets)


def grid_crops(
    images: jax.Array, sizes: jax.Array, crop_size: int, grid: int = 5, flip: bool = True
) -> jax.Array:
    """All crops at once ``(N, grid * grid * (2 if flip), crop, crop, C)``: the grid in row-major
    order, then the same crops flipped. For inspection and tests; evaluation goes position by
    position (``multi_crop_probabilities``) so only ``2N`` crops are in memory at a time."""
    offsets = grid_offsets(sizes, crop_size, grid)
    crops = jax.vmap(lambda o: crops_at(images, o, crop_size), in_axes=1, out_axes=1)(offsets)
    return jnp.concatenate([crops, crops[:, :, :, ::-1]], axis=1) if flip else crops


def multi_crop_probabilities(
    model: models.VGG,
    params: Any,
    images: jax.Array,
    sizes: jax.Array,
    grid: int = 5,
    flip: bool = True,
) -> jax.Array:
    """Multi-crop evaluation's softmax ``(N, classes)``: the mean over the ``grid x grid`` crops
    and (``flip``) their mirror images of each crop's classifier softmax.

    A scan over grid positions classifies one crop per image and its flip per iteration, so the
    memory is that of a ``2N`` batch whatever the grid. The flip of a crop is the crop of the
    flipped image at the mirrored grid position (the grid is symmetric), as the paper's 2 flips.
    """
    crop_size = model.crop_size
    offsets = jnp.swapaxes(grid_offsets(sizes, crop_size, grid), 0, 1)  # (positions, N, 2)
    copies = 2 if flip else 1
    batch = images.shape[0]

    def add_position(total, position_offsets):
        crops = crops_at(images, position_offsets, crop_size)
        if flip:  # (N, 2, ...) then merged, so the batch axis keeps its sharding
            crops = jnp.stack([crops, crops[:, :, ::-1]], axis=1)
        crops = crops.reshape(batch * copies, *crops.shape[-3:])
        logits = model.apply({"params": params}, crops)
        probabilities = jax.nn.softmax(logits).reshape(batch, copies, -1)
        return total + probabilities.sum(axis=1), None

    start = jnp.zeros((batch, model.num_classes), jnp.float32)
    total, _ = jax.lax.scan(add_position, start, offsets)
    return total / (grid * grid * copies)


class CompiledMethods:
    """The dense and multi-crop functions of one net on one mesh, jitted once and compiled ahead
    of time once per batch shape (the data pipeline's few bucket shapes), so compilation is
    bounded, countable, and never inside a timed call.

    Calls take ``(method, params, images, sizes)`` with global arrays (``sharding.global_batch``)
    and return softmax ``(N, classes)`` sharded over the mesh's ``data`` axis.
    """

    def __init__(self, model: models.VGG, mesh: Mesh, flip: bool = True, grid: int = 5):
        self.param_shardings = sharding.param_shardings(mesh, models.abstract_params(model))
        batch = sharding.batch_sharding(mesh)
        shardings = dict(in_shardings=(self.param_shardings, batch, batch), out_shardings=batch)
        self._jitted = {
            "dense": jax.jit(functools.partial(dense_probabilities, model, flip=flip), **shardings),
            "multi_crop": jax.jit(
                functools.partial(multi_crop_probabilities, model, grid=grid, flip=flip),
                **shardings,
            ),
        }
        self._compiled: dict[tuple, Any] = {}

    @property
    def compilations(self) -> int:
        return len(self._compiled)

    def compile(self, method: str, params: Any, images: jax.Array, sizes: jax.Array) -> Any:
        """The executable for this method and batch shape, compiled on first use."""
        if method not in self._jitted:
            raise ValueError(f"Unknown evaluation method {method!r}; valid: {list(self._jitted)}")
        key = (method, images.shape, str(images.dtype), sizes.shape)
        if key not in self._compiled:
            self._compiled[key] = self._jitted[method].lower(params, images, sizes).compile()
        return self._compiled[key]

    def __call__(self, method: str, params: Any, images: jax.Array, sizes: jax.Array) -> jax.Array:
        return self.compile(method, params, images, sizes)(params, images, sizes)


@functools.lru_cache(maxsize=8)
def compiled_methods(
    model: models.VGG, mesh: Mesh, flip: bool = True, grid: int = 5
) -> CompiledMethods:
    """One ``CompiledMethods`` per (net, mesh, flip, grid), shared by every checkpoint of a net
    (continuous evaluation reuses the executables)."""
    return CompiledMethods(model, mesh, flip, grid)
