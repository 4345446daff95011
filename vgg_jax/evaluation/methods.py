"""The paper's test-time methods (section 3.2) as pure functions of a batch, run on the device.

Batches are images of different sizes zero-padded at the bottom and right into one bucket shape,
with their valid ``sizes`` ``(N, 2)``; every function here keeps the padding out of the result:

* ``dense_probabilities``: the fully-convolutional net on the whole image, its class score map
  averaged over the image's own cells, softmax; averaged with the horizontally flipped image's
  softmax (the flip mirrors each image inside its valid region, so the padding stays put);
* ``multi_crop_probabilities``: a ``grid x grid`` regular grid of crop-size crops per image (first
  at the top-left corner, last at the bottom-right) plus their flips, cut on the device, each
  classified, softmax averaged over the crops (50 per scale for the paper's 5x5 grid).

``CompiledFunctions`` jits them once per net and mesh and compiles once per bucket shape; the
multi-crop method runs as two programs (``CropMethod``): cutting one grid position's crops, cheap
to compile for every bucket shape, and classifying them, compiled once for all shapes, scales and
checkpoints, since every crop has the crop size. Softmax outputs, never logits, are what later
steps average (scales, methods, nets).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vgg_jax import models, sharding, xla_options

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


def dense_outputs(
    model: models.VGG,
    params: Any,
    images: jax.Array,
    sizes: jax.Array | None = None,
    flip: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Dense evaluation of a batch: the class score maps ``(N, h, w, classes)`` and the softmax
    ``(N, classes)`` of their average over each image's valid cells, averaged with the flipped
    image's softmax when ``flip`` (the paper averages the soft-max posteriors of an image and its
    flip). ``sizes=None``: every image fills the batch's shape."""
    if sizes is None:
        sizes = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32), (images.shape[0], 2))
    if not flip:
        score_map, scores = model.apply({"params": params}, images, sizes, method="dense")
        return score_map, jax.nn.softmax(scores)
    # Each image followed by its flip, one batch of 2N through one copy of the net: half the
    # program to compile (one per bucket shape), and the batch axis keeps its sharding.
    both = jnp.stack([images, flip_within_valid(images, sizes)], axis=1)
    both = both.reshape(-1, *images.shape[1:])
    score_maps, scores = model.apply(
        {"params": params}, both, jnp.repeat(sizes, 2, axis=0), method="dense"
    )
    probabilities = jax.nn.softmax(scores).reshape(images.shape[0], 2, -1).mean(axis=1)
    return score_maps.reshape(images.shape[0], 2, *score_maps.shape[1:])[:, 0], probabilities


def dense_probabilities(
    model: models.VGG, params: Any, images: jax.Array, sizes: jax.Array, flip: bool = True
) -> jax.Array:
    """Dense evaluation's softmax ``(N, classes)`` (``dense_outputs`` without the maps)."""
    return dense_outputs(model, params, images, sizes, flip)[1]


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


def position_crops(
    images: jax.Array,
    sizes: jax.Array,
    position: jax.Array,
    crop_size: int,
    grid: int = 5,
    flip: bool = True,
) -> jax.Array:
    """The crops at one grid ``position`` (row-major) of every image, each followed by its flip
    when ``flip``: ``(N * copies, crop, crop, C)``, the batch that ``multi_crop_probabilities``
    classifies at that position."""
    offsets = jnp.take(grid_offsets(sizes, crop_size, grid), position, axis=1)  # (N, 2)
    crops = crops_at(images, offsets, crop_size)
    if flip:  # (N, 2, ...) then merged, so the batch axis keeps its sharding
        crops = jnp.stack([crops, crops[:, :, ::-1]], axis=1)
    return crops.reshape(-1, *crops.shape[-3:])


def add_crop_softmax(
    model: models.VGG, params: Any, crops: jax.Array, total: jax.Array
) -> jax.Array:
    """``total`` ``(N, classes)`` plus the summed softmax of each image's ``crops`` (its
    ``len(crops) // N`` consecutive rows)."""
    probabilities = jax.nn.softmax(model.apply({"params": params}, crops))
    return total + probabilities.reshape(total.shape[0], -1, total.shape[1]).sum(axis=1)


@dataclasses.dataclass(frozen=True)
class CropMethod:
    """A method that classifies crop-size crops cut from the padded batch, as two programs:
    ``cut(images, sizes, position) -> crops`` (compiled per bucket shape, a gather: quick) and
    ``classify(params, crops, total) -> total`` (the net, compiled once per batch size). The
    result is ``total / divisor`` after ``positions`` cut-and-classify rounds, softmax
    ``(N, num_classes)``. ``multi_crop_probabilities`` in one program gives the same numbers
    but compiles the net once per bucket shape."""

    cut: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    classify: Callable[[Any, jax.Array, jax.Array], jax.Array]
    positions: int
    divisor: float
    num_classes: int


def multi_crop_method(model: models.VGG, grid: int = 5, flip: bool = True) -> CropMethod:
    """``multi_crop_probabilities`` as a ``CropMethod``."""
    return CropMethod(
        cut=functools.partial(position_crops, crop_size=model.crop_size, grid=grid, flip=flip),
        classify=functools.partial(add_crop_softmax, model),
        positions=grid * grid,
        divisor=float(grid * grid * (2 if flip else 1)),
        num_classes=model.num_classes,
    )


class _CropExecutable:
    """A ``CropMethod``'s compiled programs run over one batch (what ``compile`` returns)."""

    def __init__(self, method: CropMethod, cut, classify, total_sharding, position_sharding):
        self.method, self.cut, self.classify = method, cut, classify
        self.total_sharding = total_sharding
        self.positions = [
            jax.device_put(np.int32(p), position_sharding) for p in range(method.positions)
        ]

    def __call__(self, params: Any, images: jax.Array, sizes: jax.Array) -> jax.Array:
        total = jax.device_put(
            np.zeros((images.shape[0], self.method.num_classes), np.float32), self.total_sharding
        )
        for position in self.positions:
            total = self.classify(params, self.cut(images, sizes, position), total)
            # One round at a time: on XLA's CPU client, rounds queued ahead whose classifier
            # all-reduces over a model axis can wait on each other's rendezvous for ever.
            total.block_until_ready()
        return total / np.float32(self.method.divisor)


# A function the evaluator runs on padded batches: (params, images, sizes) -> per-example rows.
BatchFunction = Callable[[Any, jax.Array, jax.Array], jax.Array]


class CompiledFunctions:
    """Named functions of one net's parameters and a padded batch, jitted once with explicit
    shardings (parameters as ``param_shardings``, batch and outputs split over the mesh's
    ``data`` axis) and compiled ahead of time once per batch shape (the data pipeline's few
    bucket shapes), so compilation is bounded, countable and never inside a timed call.

    The evaluator's methods (``compiled_methods``) and the feature extractor's descriptors
    (``vgg_jax.features``) are instances; ``runner.evaluate_scale`` runs any of them.
    """

    def __init__(
        self,
        mesh: Mesh,
        param_shardings: Any,
        functions: Mapping[str, BatchFunction | CropMethod],
    ):
        self.param_shardings = param_shardings
        batch = sharding.batch_sharding(mesh)
        self._replicated = sharding.replicated(mesh)
        self._batch = batch
        self._methods = dict(functions)
        self._jitted: dict[Any, Any] = {}
        for name, function in functions.items():
            if isinstance(function, CropMethod):
                self._jitted[name, "cut"] = jax.jit(
                    function.cut,
                    in_shardings=(batch, batch, self._replicated),
                    out_shardings=batch,
                )
                self._jitted[name, "classify"] = jax.jit(
                    function.classify,
                    in_shardings=(param_shardings, batch, batch),
                    out_shardings=batch,
                )
            else:
                self._jitted[name] = jax.jit(
                    function, in_shardings=(param_shardings, batch, batch), out_shardings=batch
                )
        self._programs: dict[tuple, Any] = {}  # (jitted key, argument shapes) -> executable
        self._executables: dict[tuple, Any] = {}  # (name, batch shapes) -> what compile returns

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._methods)

    @property
    def compilations(self) -> int:
        """Programs compiled so far (a crop method's cut programs and its one classifier count)."""
        return len(self._programs)

    def _program(self, key: Any, params: Any, *batch_args) -> Any:
        """``key``'s executable for these batch arguments' shapes (the parameters' never change)."""
        shapes = tuple((a.shape, str(a.dtype)) for a in batch_args)
        if (key, shapes) not in self._programs:
            args = batch_args if params is None else (params, *batch_args)
            self._programs[key, shapes] = (
                self._jitted[key]
                .lower(*args)
                .compile(compiler_options=xla_options.cpu_compiler_options())
            )
        return self._programs[key, shapes]

    def compile(self, name: str, params: Any, images: jax.Array, sizes: jax.Array) -> Any:
        """The executable for this function and batch shape, compiled on first use: a callable
        ``(params, images, sizes) -> rows``."""
        if name not in self._methods:
            raise ValueError(f"Unknown function {name!r}; valid: {list(self._methods)}")
        key = (name, images.shape, str(images.dtype), sizes.shape)
        if key not in self._executables:
            method = self._methods[name]
            if isinstance(method, CropMethod):
                self._executables[key] = self._crop_executable(name, method, params, images, sizes)
            else:
                self._executables[key] = self._program(name, params, images, sizes)
        return self._executables[key]

    def _crop_executable(self, name, method: CropMethod, params, images, sizes):
        position = jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated)
        cut = self._program((name, "cut"), None, images, sizes, position)
        crops = jax.eval_shape(method.cut, images, sizes, position)
        crops = jax.ShapeDtypeStruct(crops.shape, crops.dtype, sharding=self._batch)
        total = jax.ShapeDtypeStruct(
            (images.shape[0], method.num_classes), jnp.float32, sharding=self._batch
        )
        classify = self._program((name, "classify"), params, crops, total)
        return _CropExecutable(method, cut, classify, self._batch, self._replicated)

    def __call__(self, name: str, params: Any, images: jax.Array, sizes: jax.Array) -> jax.Array:
        return self.compile(name, params, images, sizes)(params, images, sizes)


def net_param_shardings(model: models.VGG, mesh: Mesh) -> Any:
    """Where ``model``'s parameters live on ``mesh`` (``sharding.param_shardings``)."""
    return sharding.param_shardings(mesh, models.abstract_params(model))


@functools.lru_cache(maxsize=8)
def compiled_methods(
    model: models.VGG, mesh: Mesh, flip: bool = True, grid: int = 5
) -> CompiledFunctions:
    """The paper's two base methods of one net (softmax ``(N, classes)`` each), one instance per
    (net, mesh, flip, grid), shared by every checkpoint of a net (continuous evaluation reuses
    the executables)."""
    functions = {
        "dense": functools.partial(dense_probabilities, model, flip=flip),
        "multi_crop": multi_crop_method(model, grid=grid, flip=flip),
    }
    return CompiledFunctions(mesh, net_param_shardings(model, mesh), functions)
