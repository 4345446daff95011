"""Training and evaluation batches: index orders planned in numpy, pixels made by ``tf.data``.

Training order. Example ``position`` p = 0, 1, 2, ... of the training stream is decodable example
``perm_e[p mod N]`` of epoch ``e = p // N``, where ``perm_e`` is a permutation drawn from
(shuffle_seed, e) and N the number of decodable training examples. Global step k takes positions
[kB, (k+1)B); process i of P takes the i-th of P equal slices. Every per-example random draw is
keyed by (shuffle_seed, p). So a batch is a pure function of (seed, step): a pipeline restarted at
step k yields exactly what an uninterrupted one yields from k on, its state is the step number,
and the P process slices put together are the one-process batch. The stream runs on across epoch
boundaries, so no example is ever dropped: each one is seen exactly once in every N positions.

Evaluation order. Every decodable example of the split once. The examples are split by
orientation (landscape incl. square, then portrait) and sorted by aspect ratio (so by their long
side at any scale Q, and in the same order at every Q);
consecutive runs of the global eval batch size G form the batches, each padded to
(Q, long side rounded up to ``eval_bucket_step``) or its transpose. So the shapes are few, only the
last batch of each orientation holds masked filler examples, and every process computes the same
schedule from the cached index and takes its slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vgg_jax import conventions
from vgg_jax.data import DatasetError, generator_dataset, index, sources, stats, transforms, verify


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    num_train: int  # decodable training examples (those the training order visits)
    num_eval: int  # decodable examples of config.input.eval_split
    class_names: list[str] | None
    mean_rgb: np.ndarray  # (3,), 0-255
    pca_eigvals: np.ndarray  # (3,), covariance of [0, 1] pixels, descending
    pca_eigvecs: np.ndarray  # (3, 3), columns are eigenvectors
    bad_input: dict[str, dict[str, int]]  # per split: skipped / unusual example counts
    data_dir: str


def check_input_config(input_config: ml_collections.ConfigDict) -> None:
    """Fails at start-up, saying what to change, on values the pipeline cannot honour."""
    sources.check_dataset_name(input_config.dataset)
    stats.check_stats_source(input_config.stats_source)
    smin, smax, crop = (
        input_config.train_scale_min,
        input_config.train_scale_max,
        input_config.crop_size,
    )
    if not crop <= smin <= smax:
        raise ValueError(
            f"Need crop_size <= train_scale_min <= train_scale_max; got {crop}, {smin}, {smax}."
        )


def _split_index(
    builder: tfds.core.DatasetBuilder, split: str, input_config: ml_collections.ConfigDict
) -> index.SplitIndex:
    sources.check_split(builder, split)
    return index.load_index(builder, split, sources.files_dir(builder, input_config))


def prepare(config: ml_collections.ConfigDict) -> None:
    """Makes ``config.input.dataset`` ready: TFDS files, per-split index, mean/PCA statistics.
    Work already done is skipped; missing inputs raise an error naming the files to provide.
    What was built is checked on every call (``verify``: example and class counts): a bad
    dataset raises ``DatasetError`` naming the likely bad input and is moved aside, never reused.
    An unwritable index location fails before any indexing."""
    input_config = config.input
    check_input_config(input_config)
    builder = sources.prepare_builder(input_config)
    files_dir = sources.files_dir(builder, input_config)
    splits = list(dict.fromkeys([input_config.train_split, input_config.eval_split]))
    for split in splits:
        sources.check_split(builder, split)
    computed_stats = not stats.uses_published(input_config.dataset, input_config.stats_source)
    if not all(os.path.exists(index.index_path(builder, s, files_dir)) for s in splits) or (
        computed_stats and not os.path.exists(stats.stats_path(builder, files_dir))
    ):
        sources.check_writable(files_dir)  # at once, not after indexing (45 min on ImageNet)
    verify.check_examples(builder, input_config, files_dir)
    for split in splits:
        verify.check_labelled(
            builder, input_config, split, index.ensure_index(builder, split, files_dir)
        )
    train_index = index.load_index(builder, input_config.train_split, files_dir)
    verify.check_classes(builder, input_config, train_index, files_dir)
    if computed_stats:
        stats.ensure_stats(
            builder,
            input_config.train_split,
            train_index.valid,
            input_config.stats_max_images,
            files_dir,
        )


def _stats(input_config: ml_collections.ConfigDict, builder) -> dict:
    dataset, source = input_config.dataset, input_config.stats_source
    files_dir = sources.files_dir(builder, input_config)
    computed = (
        None if stats.uses_published(dataset, source) else stats.load_stats(builder, files_dir)
    )
    return stats.choose(dataset, source, computed)


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    input_config = config.input
    builder = sources.prepared_builder(input_config)
    train = _split_index(builder, input_config.train_split, input_config)
    evaluation = _split_index(builder, input_config.eval_split, input_config)
    for split, split_index in (
        (input_config.train_split, train),
        (input_config.eval_split, evaluation),
    ):
        verify.check_labelled(builder, input_config, split, split_index)
    chosen = _stats(input_config, builder)
    label = builder.info.features["label"]
    return DatasetInfo(
        name=builder.name,
        num_classes=int(label.num_classes),
        num_train=int(len(train.valid)),
        num_eval=int(len(evaluation.valid)),
        class_names=list(label.names) if label.names else None,
        mean_rgb=np.asarray(chosen["mean_rgb"], np.float32),
        pca_eigvals=np.asarray(chosen["eigvals"], np.float32),
        pca_eigvecs=np.asarray(chosen["eigvecs"], np.float32),
        bad_input={
            input_config.train_split: train.counts(input_config.crop_size),
            input_config.eval_split: evaluation.counts(),
        },
        data_dir=str(builder.data_dir),
    )


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
    """Whole batches of decodable training examples; ``DatasetError`` when there is none (the
    start-up check counts image files, some of which may not decode)."""
    info = dataset_info(config)
    steps = info.num_train // config.input.batch_size
    if steps == 0:
        skipped = info.bad_input[config.input.train_split].get("skipped_undecodable", 0)
        raise DatasetError(
            f"config.input.batch_size={config.input.batch_size} is larger than the "
            f"{info.num_train} decodable examples of {info.name}/{config.input.train_split} "
            f"({skipped} skipped as undecodable): an epoch would have no step. Use a smaller "
            "batch or add images."
        )
    return steps


def num_eval_examples(config: ml_collections.ConfigDict, split: str | None = None) -> int:
    builder = sources.prepared_builder(config.input)
    return int(len(_split_index(builder, split or config.input.eval_split, config.input).valid))


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
    return process_index, process_count


def _local_size(global_size: int, process_count: int, name: str) -> int:
    if global_size % process_count:
        raise ValueError(
            f"config.input.{name}={global_size} does not split over {process_count} processes; "
            f"use a multiple of {process_count}."
        )
    return global_size // process_count


def trained_convention(mean_rgb, input_config: ml_collections.ConfigDict) -> dict:
    """The input convention of a net trained here: the training set's mean RGB subtracted and,
    with ``input.pixel_std``, a division (the paper divides by nothing: std 1). Saved in every
    checkpoint the loop writes, so evaluation and prediction see what training saw."""
    std = input_config.get("pixel_std") or (1.0, 1.0, 1.0)
    return dict(conventions.mean_subtracted(tuple(float(m) for m in mean_rgb), std))


def _input_convention(
    input_convention: dict | None, mean_rgb, input_config: ml_collections.ConfigDict
) -> conventions.InputConvention:
    """The given convention (a checkpoint's), else the one this config trains with."""
    return conventions.checked(input_convention or trained_convention(mean_rgb, input_config))


def _parallel_calls(input_config: ml_collections.ConfigDict) -> int:
    calls = int(input_config.num_parallel_calls)
    return tf.data.AUTOTUNE if calls < 0 else calls


def _batches(chunks, signature, preprocess, local: int, input_config) -> Iterator[dict]:
    """Host chunks of one local batch each (numpy ids and raw records, planned in order) ->
    ``preprocess`` per example in a parallel, order-keeping map -> the same local batches."""
    ds = generator_dataset.from_generator(chunks, output_signature=signature).unbatch()
    ds = ds.map(
        transforms.no_autograph(preprocess),
        num_parallel_calls=_parallel_calls(input_config),
        deterministic=True,
    )
    ds = ds.batch(local, drop_remainder=True).prefetch(input_config.prefetch)
    return ds.as_numpy_iterator()


class TrainOrder:
    """Maps stream positions to example rows: a fresh permutation of N rows per epoch."""

    def __init__(self, num_examples: int, seed: int):
        if num_examples == 0:
            raise ValueError("The training split has no decodable examples.")
        self.num_examples, self.seed = num_examples, seed
        self._permutations: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_examples)
        return self._permutations[epoch]

    def rows(self, positions: np.ndarray) -> np.ndarray:
        epochs, within = np.divmod(positions, self.num_examples)
        rows = np.empty_like(positions)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            rows[here] = self.permutation(int(epoch))[within[here]]
        return rows


def train_positions(step: int, batch_size: int, process_index: int, process_count: int):
    """Stream positions of this process's slice of global step ``step``."""
    local = batch_size // process_count
    return step * batch_size + process_index * local + np.arange(local, dtype=np.int64)


def train_batches(
    config: ml_collections.ConfigDict,
    start_step: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    input_convention: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's slice of the training batches of global steps start_step, start_step+1, ...
    (forever): {"image": float32 [B_local, crop, crop, 3], "label": int32 [B_local]}."""
    input_config = config.input
    check_input_config(input_config)
    process_index, process_count = _processes(process_index, process_count)
    batch_size = input_config.batch_size
    local = _local_size(batch_size, process_count, "batch_size")
    builder = sources.prepared_builder(input_config)
    split_index = _split_index(builder, input_config.train_split, input_config)
    chosen = _stats(input_config, builder)
    convention = _input_convention(input_convention, chosen["mean_rgb"], input_config)
    eigvals = np.asarray(chosen["eigvals"], np.float32)
    eigvecs = np.asarray(chosen["eigvecs"], np.float32)
    valid = split_index.valid
    logging.info(
        "Training on %d examples of %s/%s; input counts: %s",
        len(valid),
        builder.name,
        input_config.train_split,
        split_index.counts(input_config.crop_size),
    )
    order = TrainOrder(len(valid), input_config.shuffle_seed)
    reader = sources.RecordReader(builder, input_config.train_split)

    def chunks():
        for step in itertools.count(start_step):
            positions = train_positions(step, batch_size, process_index, process_count)
            ids = valid[order.rows(positions)]
            yield (
                positions,
                split_index.fmt[ids].astype(np.int32),
                split_index.height[ids],
                split_index.width[ids],
                reader.read(ids),
            )

    def preprocess(position, fmt, height, width, serialized):
        encoded, label = sources.parse(serialized)
        params = transforms.sample_train_params(
            transforms.example_seed(input_config.shuffle_seed, position),
            height,
            width,
            input_config.crop_size,
            input_config.train_scale_min,
            input_config.train_scale_max,
            input_config.color_shift_std,
            input_config.random_flip,
        )
        image = transforms.train_image(
            encoded, fmt, params, input_config.crop_size, eigvals, eigvecs, convention
        )
        return {"image": image, "label": label}

    vector = lambda dtype: tf.TensorSpec([local], dtype)
    signature = (vector(tf.int64), vector(tf.int32), vector(tf.int32), vector(tf.int32))
    signature += (vector(tf.string),)
    yield from _batches(chunks, signature, preprocess, local, input_config)


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    bucket: tuple[int, int]  # padded (height, width) of every image of the batch
    ids: np.ndarray  # int64 [G] record indices; -1 for masked filler examples
    sizes: np.ndarray  # int32 [G, 2] valid (h, w) after the rescale


def eval_schedule(
    split_index: index.SplitIndex,
    scale: int,
    global_batch: int,
    bucket_step: int,
    examples: int = 0,
) -> list[EvalBatch]:
    """The global evaluation batches at test scale ``scale`` (see the module docstring); with
    ``examples`` > 0, of that many decodable examples evenly spaced in record order (TFDS stores
    a split's records shuffled, so this is a fixed sample whose class shares follow the split's
    up to sampling noise, not class by class)."""
    valid = split_index.valid
    if 0 < examples < len(valid):
        valid = valid[np.linspace(0, len(valid), examples, endpoint=False).astype(np.int64)]
    original_h, original_w = split_index.height[valid], split_index.width[valid]
    heights, widths = transforms.eval_size(original_h, original_w, scale)
    batches = []
    # Aspect ratio does not depend on Q, so the order (and every batch's examples) is the same at
    # every test scale, as multi-scale evaluation needs; the long side at Q grows with it.
    aspect = np.maximum(original_h, original_w) / np.maximum(np.minimum(original_h, original_w), 1)
    for portrait in (False, True):
        chosen = (original_h > original_w) == portrait
        ids, h, w = valid[chosen], heights[chosen], widths[chosen]
        order = np.lexsort((ids, aspect[chosen]))
        ids, h, w = ids[order], h[order], w[order]
        long_side = np.maximum(h, w)
        for start in range(0, len(ids), global_batch):
            part = slice(start, start + global_batch)
            longest = int(-(-long_side[part].max() // bucket_step) * bucket_step)
            bucket = (longest, scale) if portrait else (scale, longest)
            filler = global_batch - len(ids[part])
            batches.append(
                EvalBatch(
                    bucket=bucket,
                    ids=np.concatenate([ids[part], np.full(filler, -1)]).astype(np.int64),
                    sizes=np.concatenate(
                        [np.stack([h[part], w[part]], 1), np.tile(bucket, (filler, 1))]
                    ).astype(np.int32),
                )
            )
    return batches


def eval_batches(
    config: ml_collections.ConfigDict,
    scale: int,
    *,
    split: str | None = None,
    input_convention: dict | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    examples: int = 0,
    bucket_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Every decodable example of the split (or ``examples`` of them, ``eval_schedule``) once,
    rescaled to smallest side ``scale``, uncropped, top-left in a zero-padded bucket: {"image":
    float32 [B_local, Hb, Wb, 3], "size": int32 [B_local, 2], "label": int32 [B_local], "mask":
    bool [B_local], "index": int32 [B_local] (the example's record index in the split, -1 for
    filler)}. Every process yields the same number of batches with the same shapes in the same
    order, and the examples come in the same order at every ``scale``. Buckets round the long
    side up to ``bucket_step`` (0: ``input.eval_bucket_step``)."""
    input_config = config.input
    split = split or input_config.eval_split
    process_index, process_count = _processes(process_index, process_count)
    global_batch = input_config.eval_batch_size
    local = _local_size(global_batch, process_count, "eval_batch_size")
    builder = sources.prepared_builder(input_config)
    split_index = _split_index(builder, split, input_config)
    convention = _input_convention(
        input_convention, _stats(input_config, builder)["mean_rgb"], input_config
    )
    schedule = eval_schedule(
        split_index, scale, global_batch, bucket_step or input_config.eval_bucket_step, examples
    )
    reader = sources.RecordReader(builder, split)
    mine = slice(process_index * local, (process_index + 1) * local)

    def chunks():
        for batch in schedule:
            ids = batch.ids[mine]
            real = ids >= 0
            serialized = [b""] * local
            for i, record in zip(np.flatnonzero(real), reader.read(ids[real]), strict=True):
                serialized[i] = record
            fmt = np.where(real, split_index.fmt[np.maximum(ids, 0)], 0).astype(np.int32)
            bucket = np.tile(batch.bucket, (local, 1))
            yield fmt, batch.sizes[mine], bucket, real, serialized, ids.astype(np.int32)

    def preprocess(fmt, size, bucket, mask, serialized, example_index):
        def real():
            encoded, label = sources.parse(serialized)
            return transforms.eval_image(encoded, fmt, size, bucket, convention), label

        def filler():
            return tf.zeros(tf.concat([bucket, [3]], 0), tf.float32), tf.constant(0, tf.int32)

        image, label = tf.cond(mask, real, filler)
        return {"image": image, "size": size, "label": label, "mask": mask, "index": example_index}

    signature = (
        tf.TensorSpec([local], tf.int32),
        tf.TensorSpec([local, 2], tf.int32),
        tf.TensorSpec([local, 2], tf.int32),
        tf.TensorSpec([local], tf.bool),
        tf.TensorSpec([local], tf.string),
        tf.TensorSpec([local], tf.int32),  # "index": the example's record id, -1 for filler
    )
    yield from _planned_batches(
        _batches(chunks, signature, preprocess, local, input_config), len(schedule)
    )


def _planned_batches(batches: Iterator[dict], count: int) -> Iterator[dict]:
    """The first ``count`` (all the planned) ``batches``, then done at once.

    Neither asks ``tf.data`` for its end nor waits for the pipeline's teardown: with JAX busy in
    another thread, ``from_generator``'s end-of-sequence took 7-8 s to arrive, and releasing the
    finished iterator 1.4-3.9 s (the evaluator waited that long after every test scale's last
    batch; the training's first validation too). A daemon thread releases it instead."""
    for _ in range(count):
        yield next(batches)
    holder = [batches]
    del batches
    threading.Thread(target=holder.clear, name="vgg_jax-release-input", daemon=True).start()
