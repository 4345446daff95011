"""A trained VGG as a feature extractor for other datasets, and a linear classifier on top.

The paper's appendix reuses its ILSVRC nets on VOC and Caltech: the net is applied densely to the
whole image at each test scale Q, the penultimate layer's (FC2, after ReLU) map is spatially
averaged into one descriptor, averaged with the horizontally flipped image's, averaged over the
scales, L2-normalised, and a linear classifier is trained on the descriptors.

    python -m vgg_jax.tools.features --config=experiments/demo.py --workdir=workdirs/demo
    python -m vgg_jax.tools.features --config=experiments/demo.py --workdir=workdirs/demo \\
        --config.input.dataset=image_folder --config.input.folder=ROOT

The command extracts train and eval descriptors (``input.train_split`` / ``input.eval_split`` at
``evals.multi_scales``, flips by ``evals.flip``), fits a multinomial logistic regression on train
and prints its eval accuracy; then fits the same classifier on raw pixels (each image shrunk to
``--pixel_side`` squared, flattened) as the baseline. Its last two lines are the two accuracies.

Passes over the data go through the evaluator's ``runner.evaluate_scale``: global batches, padded
examples dropped by ``mask``, and examples lined up across scales by their ``index`` (bucketing
orders them differently at each Q).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from vgg_jax import checkpoint, models, sharding
from vgg_jax.evaluation import methods, runner

FEATURES, PIXELS = "features", "pixels"

# Test scale Q -> this process's batches of one split at Q, as ``vgg_jax.data.eval_batches``
# yields them (with "index", so examples line up across scales).
ScaleBatches = Callable[[int], Iterable[dict[str, np.ndarray]]]


def penultimate_descriptors(
    model: models.VGG, params: Any, images: jax.Array, sizes: jax.Array
) -> jax.Array:
    """``(N, fc_width)``: FC2's output after ReLU in the dense form, averaged over each image's
    valid score-map cells (padding excluded, as ``VGG.dense`` does for class scores)."""
    _, state = model.apply(
        {"params": params},
        images,
        sizes,
        method="dense",
        capture_intermediates=lambda module, name: module.name == "fc2" and name == "__call__",
        mutable=["intermediates"],
    )
    fc2_map = jax.nn.relu(state["intermediates"]["fc2"]["__call__"][0].astype(jnp.float32))
    return models.mean_over_valid_cells(fc2_map, sizes, model.crop_size)


def flip_averaged_descriptors(
    model: models.VGG, params: Any, images: jax.Array, sizes: jax.Array, flip: bool = True
) -> jax.Array:
    """Descriptors averaged with the horizontally flipped image's (flipped within its valid
    region, so the padding stays put) when ``flip``; not normalised."""
    descriptors = penultimate_descriptors(model, params, images, sizes)
    if flip:
        flipped = methods.flip_within_valid(images, sizes)
        descriptors = (descriptors + penultimate_descriptors(model, params, flipped, sizes)) / 2
    return descriptors


def _area_weights(length: jax.Array, extent: int, side: int) -> jax.Array:
    """``(side, extent)``: output bin j's share of input pixel i when ``length`` pixels (the rest
    is padding) are shrunk or stretched to ``side``; each row sums to 1."""
    pixel = jnp.arange(extent, dtype=jnp.float32)
    bins = jnp.arange(side, dtype=jnp.float32)[:, None] * length / side
    overlap = jnp.minimum(pixel + 1, bins + length / side) - jnp.maximum(pixel, bins)
    weights = jnp.where(pixel[None] < length, jnp.maximum(overlap, 0.0), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def raw_pixels(images: jax.Array, sizes: jax.Array, side: int = 16) -> jax.Array:
    """``(N, side * side * 3)``: each image's valid region area-resampled to ``side x side``
    (aspect ratio not kept) and flattened: the raw-pixel baseline's input."""

    def one(image, size):
        size = size.astype(jnp.float32)
        rows = _area_weights(size[0], image.shape[0], side)
        cols = _area_weights(size[1], image.shape[1], side)
        return jnp.einsum("ih,hwc,jw->ijc", rows, image.astype(jnp.float32), cols).reshape(-1)

    return jax.vmap(one)(images, sizes)


def feature_functions(
    model: models.VGG, mesh: Mesh, flip: bool = True, pixel_side: int = 16
) -> methods.CompiledFunctions:
    """``features`` (flip-averaged descriptors) and ``pixels`` (the raw-pixel baseline) as the
    evaluator's ``CompiledFunctions``, so ``runner.evaluate_scale`` runs them like its methods:
    one compilation per bucket shape, sharded over the mesh's data axis."""
    return methods.CompiledFunctions(
        mesh,
        methods.net_param_shardings(model, mesh),
        {
            FEATURES: functools.partial(flip_averaged_descriptors, model, flip=flip),
            PIXELS: lambda params, images, sizes: raw_pixels(images, sizes, pixel_side),
        },
    )


class Descriptors(NamedTuple):
    """One split's examples in ``index`` order (or the order they came, without an index)."""

    features: np.ndarray  # float32 (N, fc_width), L2-normalised
    labels: np.ndarray  # int32 (N,)
    pixels: np.ndarray | None  # float32 (N, side * side * 3) at the first scale, if asked for


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def extract_features(
    model: models.VGG,
    params: Any,
    batches: ScaleBatches,
    scales: Sequence[int],
    *,
    flip: bool = True,
    mesh: Mesh | None = None,
    num_classes: int | None = None,
    pixel_side: int = 0,
) -> Descriptors:
    """The appendix's descriptors of every example ``batches`` yields: dense FC2 (post-ReLU)
    maps averaged over valid cells, over the image and its flip (``flip``), over ``scales``,
    then L2-normalised.

    ``batches(Q)`` yields the split at test scale Q (``vgg_jax.data.eval_batches``' format);
    examples are lined up across scales by their ``index``, and the same examples must come at
    every Q. ``num_classes``: labels must be below it (the dataset's class count; default the
    net's). ``pixel_side`` > 0 also returns the raw-pixel baseline's input at ``scales[0]``.
    """
    if not scales:
        raise ValueError("No test scales: give at least one Q (config evals.multi_scales).")
    too_small = [q for q in scales if q < model.crop_size]
    if too_small:
        raise ValueError(
            f"Test scales {too_small} are below the net's crop size {model.crop_size}; every Q "
            "must be at least the crop size."
        )
    mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, model=1)))
    functions = feature_functions(model, mesh, flip, pixel_side or 16)
    params = jax.device_put(params, functions.param_shardings)
    num_classes = num_classes or model.num_classes
    total, pixels, examples = None, None, None
    for position, scale in enumerate(scales):
        run = (FEATURES, PIXELS) if pixel_side and position == 0 else (FEATURES,)
        outputs = runner.evaluate_scale(
            params, functions, batches(int(scale)), run, mesh, num_classes
        )
        examples = runner.check_scale(examples, outputs, scale)
        features = outputs.results[FEATURES]
        total = features if total is None else total + features
        pixels = outputs.results.get(PIXELS, pixels)
        logging.info("Descriptors of %d examples at Q=%d", len(outputs.labels), scale)
    features = l2_normalize(np.asarray(total, np.float32) / len(scales))
    if zero := int(np.count_nonzero(~features.any(axis=1))):
        # No NaN (``l2_normalize`` keeps a zero vector zero), but a printed error rate of such
        # descriptors measures the classifier's bias alone.
        logging.warning(
            "%d of %d descriptors are all zero (every FC2 unit is off after ReLU for those "
            "images, e.g. dead ReLUs): they carry nothing; the classifier can only guess them.",
            zero,
            len(features),
        )
    return Descriptors(features, examples[1].astype(np.int32), pixels)


@dataclasses.dataclass(frozen=True)
class LinearClassifier:
    """Multinomial logistic regression on standardised inputs: ``(x - mean) / std @ W + b``."""

    weights: np.ndarray  # (D, classes)
    bias: np.ndarray  # (classes,)
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.weights + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(x), axis=-1)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_lbfgs(
    x: jax.Array, labels: jax.Array, l2: jax.Array, num_classes: int, steps: int
) -> dict[str, jax.Array]:
    def loss(params):
        logits = x @ params["w"] + params["b"]
        cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return cross_entropy + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))

    optimizer = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry, _):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = optimizer.update(
            grad, state, params, value=value, grad=grad, value_fn=loss
        )
        return (optax.apply_updates(params, updates), state), None

    params = dict(
        w=jnp.zeros((x.shape[1], num_classes), jnp.float32),
        b=jnp.zeros((num_classes,), jnp.float32),
    )
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), length=steps)
    return params


def check_classifier_options(l2: float, steps: int) -> None:
    """Raises ``ValueError`` for an ``l2`` or ``steps`` the classifier cannot be fitted with: no
    step leaves it at its zero start (always class 0), and a negative or NaN ``l2`` makes the
    loss unbounded or NaN; either way the error printed would be a number that means nothing."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps={steps!r}: the linear classifier needs at least 1 L-BFGS step.")
    if not np.isfinite(l2) or l2 < 0:
        raise ValueError(f"l2={l2!r}: the classifier's L2 weight must be a finite number >= 0.")


def fit_linear_classifier(
    x: np.ndarray, labels: np.ndarray, num_classes: int, *, l2: float = 1e-3, steps: int = 300
) -> LinearClassifier:
    """Full-batch L-BFGS on mean cross-entropy + ``l2 / 2 * |W|^2``, inputs standardised with the
    training set's per-dimension mean and std (so raw pixels and descriptors get the same
    treatment and one ``l2`` suits both)."""
    check_classifier_options(l2, steps)
    x = np.asarray(x, np.float32)
    labels = np.asarray(labels, np.int32)
    if x.ndim != 2 or len(x) != len(labels) or not len(x):
        raise ValueError(f"Need (N, D) inputs and N labels, N > 0; got {x.shape}, {labels.shape}.")
    if bad := int(np.count_nonzero(~np.isfinite(x).all(axis=1))):
        # A NaN input makes every weight NaN, and argmax of NaN logits is class 0 for every
        # example: a plausible-looking error rate.
        raise ValueError(
            f"{bad} of {len(x)} training inputs have NaN or infinite values (the net's "
            "parameters or activations are not finite?); no classifier fitted."
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"Labels must be in [0, {num_classes}); got {labels.min()}-{labels.max()}."
        )
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    params = _fit_lbfgs(
        jnp.asarray((x - mean) / std), jnp.asarray(labels), jnp.float32(l2), num_classes, steps
    )
    return LinearClassifier(np.asarray(params["w"]), np.asarray(params["b"]), mean, std)


def accuracy(classifier: LinearClassifier, x: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy: the fraction of ``labels`` the classifier predicts."""
    return float(np.mean(classifier.predict(x) == np.asarray(labels)))


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """What the command reports."""

    feature_accuracy: float
    pixel_accuracy: float
    num_train: int
    num_eval: int
    feature_dim: int
    pixel_dim: int


def linear_probe(
    config: ml_collections.ConfigDict,
    workdir: str,
    which: str | int = "latest",
    *,
    pixel_side: int = 16,
    l2: float = 1e-3,
    steps: int = 300,
) -> LinearProbe:
    """The command's work: descriptors of ``input.train_split`` and ``input.eval_split`` from
    checkpoint ``which`` of ``workdir``, a linear classifier on each of descriptors and raw
    pixels, and their eval accuracies. The dataset is prepared first (work done is skipped)."""
    from vgg_jax import data

    check_classifier_options(l2, steps)  # before minutes of descriptors
    mesh = sharding.make_mesh(config.mesh)
    runner.check_evals(config, mesh)
    choice = runner.parse_checkpoint_choice(which)
    checkpoint.require_checkpoint(workdir, choice)  # before preparing the dataset (hours)
    data.prepare(config)
    info = data.dataset_info(config)
    net = runner.load_net(workdir, choice, mesh, config)
    runner.fill_convention(net, info.mean_rgb)
    scales = tuple(int(q) for q in config.evals.multi_scales)

    def split_descriptors(split: str) -> Descriptors:
        def batches(scale: int) -> Iterable[dict[str, np.ndarray]]:
            return data.eval_batches(
                config, scale, split=split, input_convention=net.input_convention
            )

        found = extract_features(
            net.model,
            net.params,
            batches,
            scales,
            flip=bool(config.evals.flip),
            mesh=mesh,
            num_classes=info.num_classes,
            pixel_side=pixel_side,
        )
        expected = data.num_eval_examples(config, split)
        if len(found.labels) != expected:
            raise RuntimeError(f"Got {len(found.labels)} examples of {split}, it has {expected}.")
        return found

    train = split_descriptors(config.input.train_split)
    evaluation = split_descriptors(config.input.eval_split)
    fit = functools.partial(fit_linear_classifier, num_classes=info.num_classes, l2=l2, steps=steps)
    on_features = fit(train.features, train.labels)
    on_pixels = fit(train.pixels, train.labels)
    return LinearProbe(
        feature_accuracy=accuracy(on_features, evaluation.features, evaluation.labels),
        pixel_accuracy=accuracy(on_pixels, evaluation.pixels, evaluation.labels),
        num_train=len(train.labels),
        num_eval=len(evaluation.labels),
        feature_dim=train.features.shape[1],
        pixel_dim=train.pixels.shape[1],
    )
