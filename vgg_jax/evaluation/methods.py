"""The paper's test-time methods (section 3.2) as pure functions of a batch, run on the device.

Batches are images of different sizes zero-padded at the bottom and right into one bucket shape,
with their valid ``sizes`` ``(N, 2)``; every function here keeps the padding out of the result:

* ``dense_log_probabilities``: the fully-convolutional net on the whole image, its class score
  map averaged over the image's own cells, softmax; averaged with the horizontally flipped
  image's softmax (the flip mirrors each image inside its valid region, so the padding stays put);
* ``multi_crop_log_probabilities``: a ``grid x grid`` regular grid of crop-size crops per image
  (first at the top-left corner, last at the bottom-right) plus their flips, cut on the device,
  each classified, softmax averaged over the crops (50 per scale for the paper's 5x5 grid).

``CompiledFunctions`` jits them once per net and mesh and compiles once per bucket shape up to
transposition (a portrait batch runs transposed, with ``models.transposed_params``, through its
landscape twin's programs). The multi-crop method runs as separate programs (``CropMethod``):
cutting one round's crops, cheap to compile for every bucket shape, and classifying them,
compiled once for all shapes, scales and checkpoints, since every crop has the crop size. It
classifies each distinct crop once, weighted by how many grid positions share it (at Q = crop
size a grid row or column repeats one crop: ``distinct_grid_positions``). Softmax outputs, never
logits, are what later steps average (scales, methods, nets), as the paper does; they are kept
as logarithms (``log_softmax``, averaged by ``log_mean_exp``) so that a class whose probability
is below float32's smallest (a logit some 90 or more below the top one) keeps its rank instead
of tying with every other such class at 0.
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


def flip_within_valid(images: jax.Array, sizes: jax.Array, axis: int = 2) -> jax.Array:
    """Mirrors each image's valid ``(h, w)`` top-left region left-right (``axis=2``; top-bottom
    with ``axis=1``); padding stays zero."""
    length = images.shape[axis]
    source = sizes[:, axis - 1 : axis] - 1 - jnp.arange(length)[None, :]  # (N, L) line read from
    shape = [images.shape[0], 1, 1, 1]
    shape[axis] = length
    inside = (source >= 0).reshape(shape)
    index = jnp.clip(source, 0, length - 1).reshape(shape)
    mirrored = jnp.take_along_axis(images, index, axis=axis)
    return jnp.where(inside, mirrored, jnp.zeros((), images.dtype))


def mirror_within_valid(images: jax.Array, sizes: jax.Array, transposed: Any = False) -> jax.Array:
    """The paper's flip of each image inside its valid region: left-right, or top-bottom where
    the batch holds transposed images (``transposed``, a bool or a traced bool scalar), which is
    the transpose of the original image's left-right mirror."""
    if transposed is False:
        return flip_within_valid(images, sizes)
    return jnp.where(
        transposed, flip_within_valid(images, sizes, axis=1), flip_within_valid(images, sizes)
    )


def log_mean_exp(log_values: jax.Array, axis: int) -> jax.Array:
    """``log(mean(exp(log_values)))`` along ``axis``, without leaving log space."""
    return jax.nn.logsumexp(log_values, axis=axis) - np.log(log_values.shape[axis]).astype(
        log_values.dtype
    )


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
    transposed: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """Dense evaluation of a batch: the class score maps ``(N, h, w, classes)`` and the log of
    the softmax ``(N, classes)`` of their average over each image's valid cells, averaged with
    the flipped image's softmax when ``flip`` (the paper averages the soft-max posteriors of an
    image and its flip). ``sizes=None``: every image fills the batch's shape. ``transposed``: the
    images are transposed and ``params`` are ``models.transposed_params`` (the flip is then
    top-bottom)."""
    if sizes is None:
        sizes = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32), (images.shape[0], 2))
    if not flip:
        score_map, scores = model.apply({"params": params}, images, sizes, method="dense")
        return score_map, jax.nn.log_softmax(scores)
    # Each image followed by its flip, one batch of 2N through one copy of the net: half the
    # program to compile (one per bucket shape), and the batch axis keeps its sharding.
    both = jnp.stack([images, mirror_within_valid(images, sizes, transposed)], axis=1)
    both = both.reshape(-1, *images.shape[1:])
    score_maps, scores = model.apply(
        {"params": params}, both, jnp.repeat(sizes, 2, axis=0), method="dense"
    )
    log_probabilities = log_mean_exp(
        jax.nn.log_softmax(scores).reshape(images.shape[0], 2, -1), axis=1
    )
    return score_maps.reshape(images.shape[0], 2, *score_maps.shape[1:])[:, 0], log_probabilities


def dense_log_probabilities(
    model: models.VGG,
    params: Any,
    images: jax.Array,
    sizes: jax.Array,
    flip: bool = True,
    transposed: Any = False,
) -> jax.Array:
    """Dense evaluation's log-softmax ``(N, classes)`` (``dense_outputs`` without the maps)."""
    return dense_outputs(model, params, images, sizes, flip, transposed)[1]


def grid_lines(span: jax.Array, grid: int) -> jax.Array:
    """``(N, grid, 2)``: the grid's offsets along each axis, evenly (to the pixel) from 0 to each
    image's ``span`` ``(N, 2)`` (its size minus the crop size), ascending; the centre for one."""
    if grid == 1:
        return (span // 2)[:, None, :]
    return jnp.arange(grid)[None, :, None] * span[:, None, :] // (grid - 1)


def grid_offsets(sizes: jax.Array, crop_size: int, grid: int = 5) -> jax.Array:
    """Top-left corners ``(N, grid * grid, 2)`` of a regular grid of crops covering each image.

    Along each axis the offsets run evenly (to the pixel) from 0 to ``size - crop_size``, so the
    first crop sits at the top-left corner and the last at the bottom-right; row-major order.
    One crop per image (``grid=1``) is the centre crop.
    """
    along = grid_lines(sizes - crop_size, grid)
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
    position (``multi_crop_log_probabilities``) so only ``2N`` crops are in memory at a time."""
    offsets = grid_offsets(sizes, crop_size, grid)
    crops = jax.vmap(lambda o: crops_at(images, o, crop_size), in_axes=1, out_axes=1)(offsets)
    return jnp.concatenate([crops, crops[:, :, :, ::-1]], axis=1) if flip else crops


def multi_crop_log_probabilities(
    model: models.VGG,
    params: Any,
    images: jax.Array,
    sizes: jax.Array,
    grid: int = 5,
    flip: bool = True,
) -> jax.Array:
    """Multi-crop evaluation's log-softmax ``(N, classes)``: the log of the mean over the
    ``grid x grid`` crops and (``flip``) their mirror images of each crop's classifier softmax.

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
        log_probabilities = jax.nn.log_softmax(logits).reshape(batch, copies, -1)
        return jnp.logaddexp(total, jax.nn.logsumexp(log_probabilities, axis=1)), None

    start = jnp.full((batch, model.num_classes), -jnp.inf, jnp.float32)
    total, _ = jax.lax.scan(add_position, start, offsets)
    return total - np.log(np.float32(grid * grid * copies))


def distinct_grid_positions(
    sizes: jax.Array, crop_size: int, grid: int = 5
) -> tuple[jax.Array, jax.Array]:
    """Each image's distinct grid crops: top-left corners ``(N, grid * grid, 2)`` and how many of
    the grid's positions each stands for ``(N, grid * grid)``, distinct positions first (row-major)
    and weight 0 after them.

    Where an image side equals the crop size (the paper's Q = 224 with 224 crops) every grid row
    (or column) along it is the same crop: a 5x5 grid of a 224 x 298 image is 5 distinct crops,
    and a square one a single crop. Classifying each distinct crop once, weighted by its count,
    gives the same mean as classifying all ``grid * grid``."""
    # Filler rows of a batch may have sizes below the crop: one crop at the corner.
    along = grid_lines(jnp.maximum(sizes - crop_size, 0), grid)
    lines = jnp.arange(grid)
    starts = jnp.concatenate(
        [jnp.ones_like(along[:, :1], bool), along[:, 1:] != along[:, :-1]], axis=1
    )
    slot = jnp.cumsum(starts, axis=1) - 1  # (N, grid, 2): each grid line's distinct value
    in_slot = slot[..., None] == lines  # (N, grid line, 2, slot)
    counts = in_slot.sum(axis=1)  # (N, 2, slot)
    values = jnp.max(jnp.where(in_slot, along[..., None], 0), axis=1)  # (N, 2, slot)
    distinct = starts.sum(axis=1)  # (N, 2): distinct rows, distinct columns
    k = jnp.arange(grid * grid)[None, :]
    valid = k < distinct[:, :1] * distinct[:, 1:]
    row = jnp.where(valid, k // distinct[:, 1:], 0)
    col = jnp.where(valid, k % distinct[:, 1:], 0)
    offsets = jnp.stack(
        [
            jnp.take_along_axis(values[:, 0], row, axis=1),
            jnp.take_along_axis(values[:, 1], col, axis=1),
        ],
        axis=-1,
    )
    weights = jnp.take_along_axis(counts[:, 0], row, axis=1) * jnp.take_along_axis(
        counts[:, 1], col, axis=1
    )
    return offsets, jnp.where(valid, weights, 0)


def distinct_crops_plan(
    sizes: jax.Array, crop_size: int, grid: int = 5
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``distinct_grid_positions`` and the batch's most distinct crops of one image (the rounds
    worth running). A function of the sizes only: one program per batch size."""
    offsets, weights = distinct_grid_positions(sizes, crop_size, grid)
    return offsets, weights, jnp.max(jnp.sum(weights > 0, axis=1))


def planned_crops(
    images: jax.Array,
    offsets: jax.Array,
    position: jax.Array,
    transposed: jax.Array,
    crop_size: int,
    flip: bool = True,
) -> jax.Array:
    """Every image's crop at its ``offsets[:, position]``, each followed by its flip when
    ``flip`` (top-bottom where the images are ``transposed``): ``(N * copies, crop, crop, C)``."""
    crops = crops_at(images, jnp.take(offsets, position, axis=1), crop_size)
    if flip:  # (N, 2, ...) then merged, so the batch axis keeps its sharding
        mirrored = jnp.where(transposed, crops[:, ::-1], crops[:, :, ::-1])
        crops = jnp.stack([crops, mirrored], axis=1)
    return crops.reshape(-1, *crops.shape[-3:])


def add_crop_log_softmax(
    model: models.VGG,
    params: Any,
    crops: jax.Array,
    weights: jax.Array,
    position: jax.Array,
    total: jax.Array,
) -> jax.Array:
    """In log space, ``total`` ``(N, classes)`` plus, per image, its ``weights[:, position]``
    times the summed softmax of its ``crops`` (its ``len(crops) // N`` consecutive rows); a
    weight of 0 (no such crop) leaves ``total`` as it is."""
    log_probabilities = jax.nn.log_softmax(model.apply({"params": params}, crops))
    summed = jax.nn.logsumexp(log_probabilities.reshape(total.shape[0], -1, total.shape[1]), axis=1)
    log_weight = jnp.log(jnp.take(weights, position, axis=1).astype(total.dtype))
    return jnp.logaddexp(total, log_weight[:, None] + summed)


@dataclasses.dataclass(frozen=True)
class CropMethod:
    """A method that classifies crop-size crops cut from the padded batch, as three programs:
    ``plan(sizes) -> (offsets, weights, rounds)`` (once per batch size), ``cut(images, offsets,
    position, transposed) -> crops`` (per bucket shape, a gather: quick to compile) and
    ``classify(params, crops, weights, position, total) -> total`` (the net, once per batch
    size). ``total`` is a log-sum of softmax outputs, and the result
    ``total - log(divisor)`` after ``rounds`` cut-and-classify rounds (at most ``positions``), a
    log-softmax ``(N, num_classes)``. ``multi_crop_log_probabilities`` in one program gives the
    same numbers but compiles the net once per bucket shape and classifies every grid position,
    repeats included."""

    plan: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
    cut: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
    classify: Callable[..., jax.Array]
    positions: int
    divisor: float
    num_classes: int


def multi_crop_method(model: models.VGG, grid: int = 5, flip: bool = True) -> CropMethod:
    """``multi_crop_log_probabilities`` as a ``CropMethod``, each distinct crop classified once."""
    return CropMethod(
        plan=functools.partial(distinct_crops_plan, crop_size=model.crop_size, grid=grid),
        cut=functools.partial(planned_crops, crop_size=model.crop_size, flip=flip),
        classify=functools.partial(add_crop_log_softmax, model),
        positions=grid * grid,
        divisor=float(grid * grid * (2 if flip else 1)),
        num_classes=model.num_classes,
    )


class _CropExecutable:
    """A ``CropMethod``'s compiled programs run over one batch (what ``compile`` returns)."""

    def __init__(self, method: CropMethod, plan, cut, classify, total_sharding, upright):
        self.method, self.plan, self.cut, self.classify = method, plan, cut, classify
        self.total_sharding, self.upright = total_sharding, upright
        self.positions = [
            jax.device_put(np.int32(p), upright.sharding) for p in range(method.positions)
        ]
        self.rounds_run = 0  # cut-and-classify rounds so far (tests count them)

    def __call__(
        self,
        params: Any,
        images: jax.Array,
        sizes: jax.Array,
        transposed: jax.Array | None = None,
    ) -> jax.Array:
        transposed = self.upright if transposed is None else transposed
        total = jax.device_put(  # log 0: no crop yet
            np.full((images.shape[0], self.method.num_classes), -np.inf, np.float32),
            self.total_sharding,
        )
        offsets, weights, rounds = self.plan(sizes)
        rounds = int(np.asarray(rounds.addressable_data(0)))  # replicated: same on every process
        for position in self.positions[:rounds]:
            crops = self.cut(images, offsets, position, transposed)
            total = self.classify(params, crops, weights, position, total)
            # One round at a time: on XLA's CPU client, rounds queued ahead whose classifier
            # all-reduces over a model axis can wait on each other's rendezvous for ever.
            total.block_until_ready()
            self.rounds_run += 1
        return total - np.log(np.float32(self.method.divisor))


class _Oriented:
    """An orientation-free function's executable for one bucket shape (what ``compile``
    returns): a portrait batch (taller than wide) is transposed, with the net's transposed
    parameters, into the landscape shape's programs."""

    def __init__(self, functions: CompiledFunctions, inner: Any, transpose: Any | None):
        self.functions, self.inner, self.transpose = functions, inner, transpose

    def __call__(self, params: Any, images: jax.Array, sizes: jax.Array) -> jax.Array:
        functions, portrait = self.functions, self.transpose is not None
        if portrait:
            images, sizes = self.transpose(images, sizes)
            params = functions._transposed_params(params)
        return self.inner(params, images, sizes, functions._orientation[portrait])


# A function the evaluator runs on padded batches: (params, images, sizes) -> per-example rows.
BatchFunction = Callable[[Any, jax.Array, jax.Array], jax.Array]


def _transpose_batch(images: jax.Array, sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.swapaxes(images, 1, 2), sizes[:, ::-1]


class CompiledFunctions:
    """Named functions of one net's parameters and a padded batch, jitted once with explicit
    shardings (parameters as ``param_shardings``, batch and outputs split over the mesh's
    ``data`` axis) and compiled ahead of time once per batch shape (the data pipeline's few
    bucket shapes), so compilation is bounded, countable and never inside a timed call.

    With ``transpose_params`` the functions are orientation-free: each takes a fourth argument,
    ``transposed`` (a bool scalar), and gives the same rows for transposed images (height and
    width swapped) run with ``transpose_params(params)``. A portrait bucket then runs through
    the programs of its transpose, so the two orientations of a shape compile the net once.

    The evaluator's methods (``compiled_methods``) and the feature extractor's descriptors
    (``vgg_jax.features``) are instances; ``runner.evaluate_scale`` runs any of them.
    """

    def __init__(
        self,
        mesh: Mesh,
        param_shardings: Any,
        functions: Mapping[str, BatchFunction | CropMethod],
        transpose_params: Callable[[Any], Any] | None = None,
    ):
        self.param_shardings = param_shardings
        batch = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)
        self._replicated = replicated
        self._batch = batch
        self._methods = dict(functions)
        self._oriented = transpose_params is not None
        orientation = (replicated,) if self._oriented else ()
        self._orientation = {
            flag: jax.device_put(np.bool_(flag), replicated) for flag in (False, True)
        }
        self._jitted: dict[Any, Any] = {}
        for name, function in functions.items():
            if isinstance(function, CropMethod):
                self._jitted[name, "plan"] = jax.jit(
                    function.plan,
                    in_shardings=(batch,),
                    out_shardings=(batch, batch, replicated),
                )
                self._jitted[name, "cut"] = jax.jit(
                    function.cut,
                    in_shardings=(batch, batch, replicated, replicated),
                    out_shardings=batch,
                )
                self._jitted[name, "classify"] = jax.jit(
                    function.classify,
                    in_shardings=(param_shardings, batch, batch, replicated, batch),
                    out_shardings=batch,
                )
            else:
                self._jitted[name] = jax.jit(
                    function,
                    in_shardings=(param_shardings, batch, batch, *orientation),
                    out_shardings=batch,
                )
        if self._oriented:
            self._jitted["transpose_batch"] = jax.jit(
                _transpose_batch, in_shardings=(batch, batch), out_shardings=(batch, batch)
            )
            self._jitted["transpose_params"] = jax.jit(
                transpose_params, in_shardings=(param_shardings,), out_shardings=param_shardings
            )
        self._transposed: tuple[Any, Any] | None = None  # (params, their transpose)
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

    def _transposed_params(self, params: Any) -> Any:
        """``transpose_params(params)``, kept for the last ``params`` passed (one net at a time)."""
        if self._transposed is None or self._transposed[0] is not params:
            self._transposed = (params, self._program("transpose_params", params)(params))
        return self._transposed[1]

    def compile(self, name: str, params: Any, images: jax.Array, sizes: jax.Array) -> Any:
        """The executable for this function and batch shape, compiled on first use: a callable
        ``(params, images, sizes) -> rows``."""
        if name not in self._methods:
            raise ValueError(f"Unknown function {name!r}; valid: {list(self._methods)}")
        key = (name, images.shape, str(images.dtype), sizes.shape)
        if key not in self._executables:
            method = self._methods[name]
            transpose = None
            if self._oriented and images.shape[1] > images.shape[2]:  # portrait
                transpose = self._program("transpose_batch", None, images, sizes)
                self._program("transpose_params", params)
                images, sizes = jax.eval_shape(_transpose_batch, images, sizes)
                images, sizes = (
                    jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._batch)
                    for a in (images, sizes)
                )
            orientation = (self._orientation[False],) if self._oriented else ()
            if isinstance(method, CropMethod):
                executable = self._crop_executable(name, method, params, images, sizes)
            else:
                executable = self._program(name, params, images, sizes, *orientation)
            self._executables[key] = (
                _Oriented(self, executable, transpose) if self._oriented else executable
            )
        return self._executables[key]

    def _crop_executable(self, name, method: CropMethod, params, images, sizes):
        position = jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated)
        upright = self._orientation[False]
        plan = self._program((name, "plan"), None, sizes)
        offsets, weights = (
            jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self._batch)
            for s in jax.eval_shape(method.plan, sizes)[:2]
        )
        cut = self._program((name, "cut"), None, images, offsets, position, upright)
        crops = jax.eval_shape(method.cut, images, offsets, position, upright)
        crops = jax.ShapeDtypeStruct(crops.shape, crops.dtype, sharding=self._batch)
        total = jax.ShapeDtypeStruct(
            (images.shape[0], method.num_classes), jnp.float32, sharding=self._batch
        )
        classify = self._program((name, "classify"), params, crops, weights, position, total)
        return _CropExecutable(method, plan, cut, classify, self._batch, upright)

    def __call__(self, name: str, params: Any, images: jax.Array, sizes: jax.Array) -> jax.Array:
        return self.compile(name, params, images, sizes)(params, images, sizes)


def net_param_shardings(model: models.VGG, mesh: Mesh) -> Any:
    """Where ``model``'s parameters live on ``mesh`` (``sharding.param_shardings``)."""
    return sharding.param_shardings(mesh, models.abstract_params(model))


@functools.lru_cache(maxsize=8)
def compiled_methods(
    model: models.VGG, mesh: Mesh, flip: bool = True, grid: int = 5
) -> CompiledFunctions:
    """The paper's two base methods of one net (log-softmax ``(N, classes)`` each), one instance per
    (net, mesh, flip, grid), shared by every checkpoint of a net (continuous evaluation reuses
    the executables)."""
    functions = {
        "dense": functools.partial(_oriented_dense, model, flip),
        "multi_crop": multi_crop_method(model, grid=grid, flip=flip),
    }
    return CompiledFunctions(
        mesh,
        net_param_shardings(model, mesh),
        functions,
        transpose_params=functools.partial(models.transposed_params, model),
    )


def _oriented_dense(
    model: models.VGG,
    flip: bool,
    params: Any,
    images: jax.Array,
    sizes: jax.Array,
    transposed: jax.Array,
) -> jax.Array:
    return dense_log_probabilities(model, params, images, sizes, flip, transposed)
