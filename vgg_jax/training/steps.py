"""The jitted, sharded steps of training (section 3.1 of the paper): the train state, the SGD
step, and the per-epoch validation step that drives the plateau rule.

Pure functions of their inputs with explicit shardings: the step count lives in the state and is
folded into the dropout RNG (``fold_in(seed, step)``), so a resumed run draws the same masks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vgg_jax import metrics, models, sharding, xla_options
from vgg_jax.evaluation import methods


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def abstract_train_state(
    model: models.VGG, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[Callable[[jax.Array], TrainState], TrainState]:
    """``(init, abstract)``: the state's initialiser (of an RNG key), and the state as
    ``jax.ShapeDtypeStruct`` leaves, each with its sharding on ``mesh``, found by tracing alone
    (``jax.eval_shape``: nothing is computed)."""
    size = model.crop_size

    def init(rng):
        params = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    shapes = jax.eval_shape(init, jax.random.key(0))
    shardings = TrainState(
        sharding.replicated(mesh),
        sharding.param_shardings(mesh, shapes.params),
        sharding.param_shardings(mesh, shapes.opt_state),
    )
    abstract = jax.tree_util.tree_map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
        shapes,
        shardings,
    )
    return init, abstract


def shardings_of(abstract: TrainState) -> TrainState:
    """The shardings of ``abstract_train_state``'s state, in its structure."""
    return jax.tree_util.tree_map(lambda leaf: leaf.sharding, abstract)


def create_train_state(
    model: models.VGG, tx: optax.GradientTransformation, mesh: Mesh, seed: int
) -> tuple[TrainState, TrainState]:
    """A fresh state created directly in its shardings; returns ``(state, shardings)``."""
    init, abstract = abstract_train_state(model, tx, mesh)
    shardings = shardings_of(abstract)
    rng = jax.random.key(seed)
    init = jax.jit(init, out_shardings=shardings).lower(rng)
    return init.compile(compiler_options=_init_compiler_options())(rng), shardings


def _init_compiler_options() -> dict[str, int] | None:
    """The initialiser runs once: on a CPU, compiling it without LLVM's optimisations takes about
    1.5 s instead of 15-18 s for the demo net (every parameter's RNG draws are one large program).
    The parameters match the optimised program's up to one ulp in ~5% of kernel values (another
    evaluation order of the truncated normal; docs/performance.md, "Start-up")."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_backend_optimization_level": 0}


def make_train_step(
    model: models.VGG,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    seed: int,
):
    """``step(state, batch, lr) -> (state, sums)``: one SGD step over the global batch.

    ``sums`` holds the batch's summed loss and top-1/top-5 hits (summed, so logging can average
    over any number of steps exactly), and ``nonfinite_steps``: 1 when the loss or any value of
    the *new* parameters or optimiser state is NaN or infinite, else 0. The loop reads it before
    every save: an update can overflow while the loss it was computed from is finite. The
    state's buffers are donated.
    """

    def train_step(state: TrainState, batch: dict[str, jax.Array], lr: jax.Array):
        dropout_rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_fn(params):
            logits = model.apply(
                {"params": params}, batch["image"], train=True, rngs={"dropout": dropout_rng}
            )
            losses = metrics.cross_entropy(logits, batch["label"])
            return losses.mean(), (logits, losses)

        grads, (logits, losses) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(
            lambda p, u: p - lr * u.astype(p.dtype), state.params, updates
        )
        sums = {"loss_sum": losses.sum(), **metrics.classification_counts(logits, batch["label"])}
        sums["nonfinite_steps"] = 1.0 - all_finite((sums["loss_sum"], params, opt_state))
        return TrainState(state.step + 1, params, opt_state), sums

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=xla_options.cpu_compiler_options(),
    )


def all_finite(tree: Any) -> jax.Array:
    """1.0 if no value of ``tree`` is NaN or infinite, else 0.0 (integer leaves always are)."""
    flags = [
        jnp.isfinite(leaf).all()
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)).astype(jnp.float32) if flags else jnp.float32(1.0)


def make_validation_step(model: models.VGG, mesh: Mesh, param_shardings: Any):
    """``step(params, batch) -> sums``: dense evaluation at one test scale (no flip), the cheap
    per-epoch validation that drives the plateau rule: the evaluator's dense method at one scale.
    Padded examples (``mask``) count nowhere."""

    def validation_step(params, batch):
        scores = methods.dense_scores(model, params, batch["image"], batch["size"])
        mask = batch["mask"]
        # where, not a product: a padded example's loss may be inf, and inf * 0 is NaN.
        losses = jnp.where(mask, metrics.cross_entropy(scores, batch["label"]), 0.0)
        return {
            "loss_sum": losses.sum(),
            **metrics.classification_counts(scores, batch["label"], mask),
        }

    return jax.jit(
        validation_step,
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
        compiler_options=xla_options.cpu_compiler_options(),
    )


def compile_ahead(
    train_step: Any, state: TrainState, mesh: Mesh, batch_size: int, crop_size: int
) -> Callable[[], None]:
    """Starts compiling ``train_step`` (``make_train_step``'s) for ``state``
    (``abstract_train_state``'s) and global batches of ``batch_size`` in a background thread,
    and returns ``wait()``, which blocks until it is done and raises what the compilation raised.

    Training compiles its step while the data is prepared, the state initialised and the images
    decoded, instead of after them: the demo's step takes 8-11 s to compile on a 2-core CPU, as
    long as all of those together (docs/performance.md, "Start-up"). The step's first call then
    finds the program in JAX's caches (in memory, and the persistent cache of
    ``compile_cache.workdir_cache``); a call whose arguments differ from these shapes simply
    compiles, so this only ever saves time. Call ``wait()`` before the first step, so the two
    never compile the same program at once."""
    size = crop_size
    where = sharding.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32, sharding=where),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=where),
    }
    learning_rate = jax.ShapeDtypeStruct((), jnp.float32)
    failure: list[BaseException] = []

    def compile_step() -> None:
        try:
            train_step.lower(state, batch, learning_rate).compile()
        except BaseException as error:  # noqa: BLE001 - raised again by wait()
            failure.append(error)

    # A daemon: a run that fails before its first step does not wait for the compilation.
    thread = threading.Thread(target=compile_step, name="compile train step", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failure:
            raise failure[0]

    return wait
