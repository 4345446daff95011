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
schedule from the cached index and takes its slice of every global batch. A run that would pad to
more than ``input.eval_max_batch_pixels`` (very elongated images) is cut shorter instead
(``eval_schedule``), so memory stays bounded; normal datasets' batches are all full.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator

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
    eval_index = index.load_index(builder, input_config.eval_split, files_dir)
    for copies in verify.copies_found(
        builder, input_config.train_split, input_config.eval_split, train_index, eval_index
    ):
        logging.warning("%s.", copies)
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


def _training_stats(input_config: ml_collections.ConfigDict, builder) -> dict:
    """``_stats`` for the training batches, with a warning when they make the colour shift move
    nothing (it was turned off without a word)."""
    chosen = _stats(input_config, builder)
    if note := stats.colour_shift_note(chosen, input_config.color_shift_std):
        logging.warning("Training on %s/%s: %s", builder.name, input_config.train_split, note)
    return chosen


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


def data_fingerprint(config: ml_collections.ConfigDict) -> dict[str, str]:
    """What decides the batches and the evaluation, of this process's copy of the prepared
    dataset: each split's decodable records (the training order permutes them, the evaluation
    schedule sorts them) with each one's label and image size in record order, the class names
    and the statistics (the input convention). Processes of a job whose copies differ here would
    each take its share of another batch.

    Every process reads its share of a batch by record number, so record i must be the same
    image on every host: copies of one image folder prepared at other paths held their records
    in other orders (``folder.py`` orders them by the path inside the folder now, but a copy
    prepared before keeps its order), and one image re-saved at another size on one host moved
    it in the evaluation schedule; either way the record numbers alone agreed, and the evaluation
    scored some images twice and others never."""
    import hashlib

    def digest(value: np.ndarray | bytes) -> str:
        raw = value if isinstance(value, bytes) else np.ascontiguousarray(value).tobytes()
        return hashlib.sha256(raw).hexdigest()[:16]

    input_config = config.input
    builder = sources.prepared_builder(input_config)
    found = {}
    for split in dict.fromkeys([input_config.train_split, input_config.eval_split]):
        split_index = _split_index(builder, split, input_config)
        valid = np.asarray(split_index.valid, np.int64)
        found[f"{split} examples"] = f"{len(valid)} (records {digest(valid)})"
        records = np.stack([split_index.label, split_index.height, split_index.width], 1)
        found[f"{split} labels and image sizes, in record order"] = digest(
            records[valid].astype(np.int64)
        )
    names = builder.info.features["label"].names or []
    found["classes"] = f"{len(names)} (names {digest(chr(0).join(names).encode())})"
    chosen = _stats(input_config, builder)
    found["mean RGB"] = " ".join(f"{float(m):.4f}" for m in chosen["mean_rgb"])
    found["PCA"] = digest(np.asarray([chosen["eigvals"], *chosen["eigvecs"]], np.float32))
    return found


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


def _examples(chunks, signature, preprocess, input_config) -> tf.data.Dataset:
    """Host chunks (numpy ids and raw records, planned in order) -> ``preprocess`` per example
    in a parallel, order-keeping map."""
    ds = generator_dataset.from_generator(chunks, output_signature=signature).unbatch()
    return ds.map(
        transforms.no_autograph(preprocess),
        num_parallel_calls=_parallel_calls(input_config),
        deterministic=True,
    )


def _batches(chunks, signature, preprocess, local: int, input_config) -> Iterator[dict]:
    """Host chunks of one local batch each -> the examples (``_examples``) -> the same local
    batches."""
    ds = _examples(chunks, signature, preprocess, input_config)
    ds = ds.batch(local, drop_remainder=True).prefetch(input_config.prefetch)
    return ds.as_numpy_iterator()


def _varying_batches(chunks, signature, preprocess, rows: list[int], input_config) -> Iterator:
    """``_batches`` for chunks of ``rows[k]`` examples each: ``batch`` takes one size, so the
    examples are numbered and each chunk's run of them is one window of its own size (the
    windows fill one after the other, so the order is kept)."""
    sizes = tf.constant(rows, tf.int64)
    ends = tf.constant(np.cumsum(rows), tf.int64)

    def chunk_of(position, example):
        return tf.searchsorted(ends, position[None], side="right", out_type=tf.int64)[0]

    ds = _examples(chunks, signature, preprocess, input_config).enumerate()
    ds = ds.group_by_window(
        key_func=chunk_of,
        reduce_func=lambda chunk, window: window.batch(sizes[chunk]),
        window_size_func=lambda chunk: sizes[chunk],
    )
    ds = ds.map(lambda position, batch: batch).prefetch(input_config.prefetch)
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
    chosen = _training_stats(input_config, builder)
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
    ids: np.ndarray  # int64 [rows] record indices; -1 for masked filler examples
    sizes: np.ndarray  # int32 [rows, 2] valid (h, w) after the rescale


# The automatic pixel budget of an evaluation batch (``eval_pixel_budget``): the full global batch
# of images this many times longer than wide (ImageNet's photos are about 1.33, the demo's at most
# 1.6), so only batches holding rarer, more elongated images lose rows.
BUDGET_ASPECT = 4


def _round_up(value, step: int):
    return -(-value // step) * step


def eval_pixel_budget(global_batch: int, scale: int, bucket_step: int, max_pixels: int = 0) -> int:
    """Padded pixels (rows x bucket height x bucket width) an evaluation batch at test scale
    ``scale`` may hold: ``max_pixels`` (``input.eval_max_batch_pixels``) when > 0, else the full
    batch of ``BUDGET_ASPECT``:1 images, so a normal split's batches are all full and one banner
    (100:1) cannot make a batch of hundreds of GB of activations."""
    if max_pixels > 0:
        return int(max_pixels)
    return global_batch * scale * _round_up(BUDGET_ASPECT * scale, bucket_step)


def eval_row_multiple(global_batch: int, process_count: int, devices: int) -> int:
    """The granularity of an evaluation batch's rows: lcm(processes, gcd(batch, devices)). The
    mesh's data axis divides the device count and (config checks) the batch, so the gcd; the
    process count divides the batch; so this divides ``global_batch``, and a batch of a multiple
    of it splits evenly over the processes and the data devices."""
    return math.lcm(process_count, math.gcd(global_batch, devices))


def _fitting_rows(pixels: np.ndarray, global_batch: int, budget: int, multiple: int) -> np.ndarray:
    """Rows of a batch of images ``pixels`` each: the most (a multiple of ``multiple``, at most
    ``global_batch``) within ``budget``; at least ``multiple``, so every image gets a batch."""
    fit = budget // pixels // multiple * multiple
    return np.minimum(global_batch, np.maximum(multiple, fit))


def _batch_take(
    long_side: np.ndarray, last: bool, scale: int, bucket_step: int, limits: tuple[int, int, int]
) -> tuple[int, int]:
    """(examples taken, batch rows) for the next batch from ``long_side``, the next (at most
    ``global_batch``) examples' long sides in schedule order; ``last``: they are all that is
    left of the orientation. The most examples whose batch stays within the budget, a multiple
    of ``multiple`` unless they are the last; only the last batch is filled up with filler."""
    global_batch, budget, multiple = limits
    count = np.arange(1, len(long_side) + 1)
    pixels = scale * _round_up(np.maximum.accumulate(long_side), bucket_step).astype(np.int64)
    fitting = _fitting_rows(pixels, global_batch, budget, multiple)
    whole = count % multiple == 0
    if last:
        whole[-1] = True
    taken = int(count[(count <= fitting) & whole].max())
    return taken, int(fitting[taken - 1]) if last and taken == len(long_side) else taken


def eval_schedule(
    split_index: index.SplitIndex,
    scale: int,
    global_batch: int,
    bucket_step: int,
    examples: int = 0,
    *,
    max_pixels: int = 0,
    row_multiple: int = 1,
) -> list[EvalBatch]:
    """The global evaluation batches at test scale ``scale`` (see the module docstring); with
    ``examples`` > 0, of that many decodable examples evenly spaced in record order (TFDS stores
    a split's records shuffled, so this is a fixed sample whose class shares follow the split's
    up to sampling noise, not class by class).

    A batch holds ``global_batch`` rows unless that many would pad to more pixels than
    ``eval_pixel_budget(..., max_pixels)``: then the most rows that fit, a multiple of
    ``row_multiple`` (at least one multiple), so memory stays bounded whatever the images'
    shapes and every example is still scored, in the same order at every scale."""
    if row_multiple < 1 or global_batch % row_multiple:
        raise ValueError(f"row_multiple {row_multiple} does not divide the batch {global_batch}.")
    budget = eval_pixel_budget(global_batch, scale, bucket_step, max_pixels)
    valid = split_index.valid
    if 0 < examples < len(valid):
        valid = valid[np.linspace(0, len(valid), examples, endpoint=False).astype(np.int64)]
    original_h, original_w = split_index.height[valid], split_index.width[valid]
    heights, widths = transforms.eval_size(original_h, original_w, scale)
    batches = []
    # Aspect ratio does not depend on Q, so the order is the same at every test scale, as
    # multi-scale evaluation needs (and every batch's examples too while all batches are full);
    # the long side at Q grows with it.
    aspect = np.maximum(original_h, original_w) / np.maximum(np.minimum(original_h, original_w), 1)
    for portrait in (False, True):
        chosen = (original_h > original_w) == portrait
        ids, h, w = valid[chosen], heights[chosen], widths[chosen]
        order = np.lexsort((ids, aspect[chosen]))
        ids, h, w = ids[order], h[order], w[order]
        long_side = np.maximum(h, w)
        start = 0
        while start < len(ids):
            window = long_side[start : start + global_batch]
            last = start + len(window) == len(ids)
            taken, rows = _batch_take(
                window, last, scale, bucket_step, (global_batch, budget, row_multiple)
            )
            part = slice(start, start + taken)
            longest = int(_round_up(long_side[part].max(), bucket_step))
            bucket = (longest, scale) if portrait else (scale, longest)
            filler = rows - taken
            batches.append(
                EvalBatch(
                    bucket=bucket,
                    ids=np.concatenate([ids[part], np.full(filler, -1)]).astype(np.int64),
                    sizes=np.concatenate(
                        [np.stack([h[part], w[part]], 1), np.tile(bucket, (filler, 1))]
                    ).astype(np.int32),
                )
            )
            start += taken
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
    row_multiple: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Every decodable example of the split (or ``examples`` of them, ``eval_schedule``) once,
    rescaled to smallest side ``scale``, uncropped, top-left in a zero-padded bucket: {"image":
    float32 [B_local, Hb, Wb, 3], "size": int32 [B_local, 2], "label": int32 [B_local], "mask":
    bool [B_local], "index": int32 [B_local] (the example's record index in the split, -1 for
    filler)}. Every process yields the same number of batches with the same shapes in the same
    order, and the examples come in the same order at every ``scale``. Buckets round the long
    side up to ``bucket_step`` (0: ``input.eval_bucket_step``).

    B_local is ``eval_batch_size / processes`` but in batches that would pad to more than
    ``input.eval_max_batch_pixels`` (``eval_pixel_budget``): those hold fewer rows, a multiple of
    ``row_multiple`` (0: ``eval_row_multiple`` of this run's devices)."""
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
    bucket_step = bucket_step or input_config.eval_bucket_step
    schedule = eval_schedule(
        split_index,
        scale,
        global_batch,
        bucket_step,
        examples,
        max_pixels=int(input_config.get("eval_max_batch_pixels") or 0),
        row_multiple=row_multiple or _default_row_multiple(global_batch, process_count),
    )
    local_rows = [len(batch.ids) // process_count for batch in schedule]
    _log_smaller_batches(schedule, global_batch, scale)
    reader = sources.RecordReader(builder, split)

    def chunks():
        for batch, rows in zip(schedule, local_rows, strict=True):
            ids = batch.ids[process_index * rows : (process_index + 1) * rows]
            real = ids >= 0
            serialized = [b""] * rows
            for i, record in zip(np.flatnonzero(real), reader.read(ids[real]), strict=True):
                serialized[i] = record
            fmt = np.where(real, split_index.fmt[np.maximum(ids, 0)], 0).astype(np.int32)
            bucket = np.tile(batch.bucket, (rows, 1))
            sizes = batch.sizes[process_index * rows : (process_index + 1) * rows]
            yield fmt, sizes, bucket, real, serialized, ids.astype(np.int32)

    def preprocess(fmt, size, bucket, mask, serialized, example_index):
        def real():
            encoded, label = sources.parse(serialized)
            return transforms.eval_image(encoded, fmt, size, bucket, convention), label

        def filler():
            return tf.zeros(tf.concat([bucket, [3]], 0), tf.float32), tf.constant(0, tf.int32)

        image, label = tf.cond(mask, real, filler)
        return {"image": image, "size": size, "label": label, "mask": mask, "index": example_index}

    uniform = all(rows == local for rows in local_rows)
    rows = local if uniform else None  # the chunks' length: fixed, or varying batch by batch
    signature = (
        tf.TensorSpec([rows], tf.int32),
        tf.TensorSpec([rows, 2], tf.int32),
        tf.TensorSpec([rows, 2], tf.int32),
        tf.TensorSpec([rows], tf.bool),
        tf.TensorSpec([rows], tf.string),
        tf.TensorSpec([rows], tf.int32),  # "index": the example's record id, -1 for filler
    )
    if uniform:  # every normal split: the fixed batching, as fast as ever
        make = functools.partial(_batches, chunks, signature, preprocess, local, input_config)
    else:
        make = functools.partial(
            _varying_batches, chunks, signature, preprocess, local_rows, input_config
        )
    yield from _planned_batches(make, len(schedule))


def _default_row_multiple(global_batch: int, process_count: int) -> int:
    import jax

    return eval_row_multiple(global_batch, process_count, jax.device_count())


def _log_smaller_batches(schedule: list[EvalBatch], global_batch: int, scale: int) -> None:
    """Says when elongated images made batches smaller (more batches, more programs)."""
    smaller = [batch for batch in schedule if len(batch.ids) < global_batch]
    if smaller:
        largest = max(smaller, key=lambda batch: batch.bucket[0] * batch.bucket[1])
        logging.info(
            "Q=%d: %d of %d evaluation batches hold fewer than %d rows (down to %d, bucket up to "
            "%s) to stay within input.eval_max_batch_pixels.",
            scale,
            len(smaller),
            len(schedule),
            global_batch,
            min(len(batch.ids) for batch in smaller),
            largest.bucket,
        )


def _planned_batches(make_batches: Callable[[], Iterator[dict]], count: int) -> Iterator[dict]:
    """The first ``count`` (all the planned) batches of ``make_batches()``, then done at once.

    Neither asks ``tf.data`` for its end nor waits for the pipeline's teardown: with JAX busy in
    another thread, ``from_generator``'s end-of-sequence took 7-8 s to arrive, and releasing the
    finished iterator 1.4-3.9 s (the evaluator waited that long after every test scale's last
    batch; the training's first validation too). A daemon thread releases it instead. The iterator
    is made here so that no caller can hold it: one held in the calling generator's frame was
    released when that frame ended, in the consumer's thread (input stalls of 1.5-7 s at the end
    of an evaluation scale)."""
    batches = make_batches()
    for _ in range(count):
        yield next(batches)
    holder = [batches]
    del batches
    threading.Thread(target=holder.clear, name="vgg_jax-release-input", daemon=True).start()
