"""Global batches already on the mesh, the form the training loop consumes.

* Training, small splits (decoded pixels within ``config.input.decoded_cache_mb``): decoded once
  (``decoded.py``), the buffer placed on every device, each batch cut and augmented there by one
  jitted function (``augment.py``) from the step's stream positions. The host only computes the
  positions and rows (``pipeline.TrainOrder``), so the input costs the step almost nothing.
* Training, larger splits: ``pipeline.train_batches`` (``tf.data``), assembled into global arrays
  by a background thread ``prefetch`` batches ahead, so the host work overlaps the step.
* Evaluation at one scale (the per-epoch validation): ``eval_batches`` kept on the device after the
  first pass when they fit, so every later epoch re-reads nothing.

Either way a batch is a pure function of (seed, step), so resuming is bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from vgg_jax import sharding, xla_options
from vgg_jax.data import augment, decoded, pipeline, sources
from vgg_jax.data.prefetch import Prefetched

# Training steps whose augmentation draws are made by one program (``draw_steps``).
DRAW_STEPS = 64
# The per-epoch validation's last batches keep their real rows rounded up to this many per
# data device (``EvalBatchCache``).
TAIL_MULTIPLE = 8


def uses_decoded_cache(config: ml_collections.ConfigDict) -> bool:
    """Whether training reads the decoded in-memory copy (see the module docstring). With several
    processes, only if it fits on every one (``decoded.fits`` asks each host's memory): the
    decoded path's batches come from programs every process runs together."""
    builder = sources.prepared_builder(config.input)
    here = decoded.fits(
        config.input, pipeline._split_index(builder, config.input.train_split, config.input)
    )
    if jax.process_count() == 1:
        return here
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(here))))


def train_batches(
    config: ml_collections.ConfigDict,
    start_step: int,
    mesh: Mesh,
    *,
    input_convention: dict | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """Global training batches of steps start_step, start_step + 1, ... on ``mesh``:
    {"image": float32 [B, crop, crop, 3], "label": int32 [B]}, sharded over ``data``."""
    if uses_decoded_cache(config):
        return _decoded_train_batches(config, start_step, mesh, input_convention)
    host = pipeline.train_batches(config, start_step, input_convention=input_convention)
    return Prefetched((sharding.global_batch(b, mesh) for b in host), max(1, config.input.prefetch))


def _decoded_train_batches(config, start_step, mesh, input_convention) -> Iterator[dict]:
    input_config = config.input
    builder = sources.prepared_builder(input_config)
    split_index = pipeline._split_index(builder, input_config.train_split, input_config)
    chosen = pipeline._training_stats(input_config, builder)
    convention = pipeline._input_convention(input_convention, chosen["mean_rgb"], input_config)
    eigvals = np.asarray(chosen["eigvals"], np.float32)
    eigvecs = np.asarray(chosen["eigvecs"], np.float32)
    split = decoded.decode_split(builder, input_config.train_split, split_index)
    logging.info(
        "Training on %d examples of %s/%s, decoded in memory; input counts: %s",
        len(split.label),
        builder.name,
        input_config.train_split,
        split_index.counts(input_config.crop_size),
    )
    replicated = sharding.replicated(mesh)
    arrays = jax.device_put(
        (split.pixels, split.offset, split.height, split.width, split.label), replicated
    )
    crop = input_config.crop_size

    def draw_steps(arrays, rows, positions):
        """The random draws of ``DRAW_STEPS`` steps at once: (window, flip, alpha), each with a
        leading step axis. JAX's RNG is a rolled loop of small kernels on a CPU, as costly for
        one step's examples as for 64 steps'; a draw is a pure function of (seed, position), so
        drawing ahead changes no number."""
        _, _, height, width, _ = arrays
        steps, batch = rows.shape
        params = augment.draw_params(
            input_config.shuffle_seed,
            positions.reshape(steps * batch, 2),
            height[rows.reshape(-1)],
            width[rows.reshape(-1)],
            crop,
            input_config.train_scale_min,
            input_config.train_scale_max,
            input_config.color_shift_std,
            input_config.random_flip,
        )
        return tuple(
            params[k].reshape(steps, batch, *params[k].shape[1:])
            for k in ("window", "flip", "alpha")
        )

    def make_batch(arrays, rows, draws, index):
        pixels, offset, _, width, label = arrays
        window, flip, alpha = (
            jax.lax.dynamic_index_in_dim(d, index, keepdims=False) for d in draws
        )
        image = augment.crop_resize(pixels, offset[rows], width[rows], window, flip, crop)
        shift = augment.pca_colour_shift(alpha, eigvals, eigvecs)
        return {"image": augment.normalise(image, convention, shift), "label": label[rows]}

    batch_sharding = sharding.batch_sharding(mesh)
    options = xla_options.cpu_compiler_options()  # the draws compile in ~0.7 s instead of 1.3
    drawn = jax.jit(
        draw_steps,
        in_shardings=(replicated,) * 3,
        out_shardings=(replicated,) * 3,
        compiler_options=options,
    )
    jitted = jax.jit(
        make_batch,
        in_shardings=(replicated,) * 4,
        out_shardings={"image": batch_sharding, "label": batch_sharding},
        compiler_options=options,
    )
    order = pipeline.TrainOrder(len(split.label), input_config.shuffle_seed)
    batch_size = input_config.batch_size

    def batches():
        for first in range(start_step, 2**62, DRAW_STEPS):
            positions = np.stack(
                [pipeline.train_positions(first + k, batch_size, 0, 1) for k in range(DRAW_STEPS)]
            )
            rows = order.rows(positions.reshape(-1)).reshape(positions.shape).astype(np.int32)
            halves = np.stack([positions >> 32, positions & 0xFFFFFFFF], -1).astype(np.uint32)
            draws = drawn(arrays, rows, halves)
            for k in range(DRAW_STEPS):
                yield jitted(arrays, rows[k], draws, np.int32(k))

    return batches()


class EvalBatchCache:
    """The evaluation batches at one scale as global device arrays, read once and kept while
    they fit in ``max_bytes`` (the per-epoch validation re-reads the same images every epoch);
    ``examples`` > 0 takes that many of the split (``pipeline.eval_schedule``); ``bucket_step``
    > 0 rounds the buckets' long side to it instead of ``input.eval_bucket_step``;
    ``input_convention`` (a checkpoint's) replaces the one the config trains with.

    In one process, a batch's filler rows (the last batch of each orientation is filled up to
    the batch size with masked copies of nothing) are dropped but for a multiple of
    ``TAIL_MULTIPLE`` data devices: a validation computes no more than it must (a fifth of the
    demo's validation slots were filler). Its steps then compile once more per orientation."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        scale: int,
        mesh: Mesh,
        max_bytes: int,
        examples: int = 0,
        bucket_step: int = 0,
        input_convention: dict | None = None,
    ):
        self.config, self.scale, self.mesh, self.max_bytes = config, scale, mesh, max_bytes
        self.examples, self.bucket_step = examples, bucket_step
        self.input_convention = input_convention
        self._kept: list[dict[str, jax.Array]] | None = None

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        if self._kept is not None:
            yield from self._kept
            return
        kept, size = [], 0
        host = pipeline.eval_batches(
            self.config,
            self.scale,
            input_convention=self.input_convention,
            examples=self.examples,
            bucket_step=self.bucket_step,
            row_multiple=math.lcm(jax.process_count(), self.mesh.shape[sharding.DATA]),
        )
        if jax.process_count() == 1:  # several: every process must keep the same rows
            multiple = TAIL_MULTIPLE * self.mesh.shape[sharding.DATA]
            host = (_without_filler(b, multiple) for b in host)
        for batch in Prefetched((sharding.global_batch(b, self.mesh) for b in host), 2):
            size += sum(v.nbytes for v in batch.values())
            if kept is not None and size <= self.max_bytes:
                kept.append(batch)
            else:
                kept = None
            yield batch
        self._kept = kept


def _without_filler(batch: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """``batch`` without its trailing filler rows, but for a multiple of ``multiple`` rows (the
    pipeline puts an eval batch's real examples first)."""
    real = int(np.count_nonzero(batch["mask"]))
    keep = -(-real // multiple) * multiple
    if real == 0 or keep >= len(batch["mask"]) or not batch["mask"][:real].all():
        return batch
    return {key: value[:keep] for key, value in batch.items()}
