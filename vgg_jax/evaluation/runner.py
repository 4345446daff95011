"""``--mode=evaluate``: restore nets, run every test-time method at every test scale, count.

For each net (the workdir's, then each of ``evals.fusion_workdirs``) and each test scale Q in
``{evals.single_scale} | evals.multi_scales``, one pass over the validation split runs dense and
multi-crop evaluation on the same batches and keeps, per example, each method's softmax on the host
(every example on every host: a few hundred MB for ImageNet; as its logarithm, see ``combine``),
lined up across scales and nets by the batches' example ``index``. From those:

* single-scale rows (Table 3): the methods at Q = ``single_scale``;
* multi-scale rows (Tables 4-5): softmax averaged over the Q set ``multi_scales``;
* ``dense+multi_crop`` (Table 5): the two methods' softmax averaged;
* fusion rows (Table 6): the nets' multi-scale softmax averaged.

Every average is of softmax outputs, never logits. Padded examples (``mask`` False) are dropped
before anything is kept and examples are counted, not averaged per batch, so each validation
example counts exactly once whatever the batch size, device or process count.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vgg_jax import (
    checkpoint,
    compile_cache,
    metrics,
    models,
    preemption,
    processes,
    sharding,
    writers,
)
from vgg_jax.data import prefetch
from vgg_jax.evaluation import methods, report

METHODS = ("dense", "multi_crop", "dense+multi_crop")
# Host batches each test scale's input pipeline runs ahead of the evaluator.
INPUT_AHEAD = 2
CHECKPOINT_CHOICES = ("latest", "best")
COUNT_CHUNK = 8192  # rows per top-k count on the device
PROGRESS_SECONDS = 30.0  # a pass over the split logs its progress and time left this often

# (config, test scale Q, input convention or None) -> this process's eval batches, as
# ``vgg_jax.data.eval_batches`` yields them. Tests pass their own.
BatchSource = Callable[[ml_collections.ConfigDict, int, Any], Iterable[dict[str, np.ndarray]]]


@dataclasses.dataclass
class Net:
    """A restored net ready for evaluation: parameters on the mesh, and what the table needs."""

    name: str
    workdir: str
    step: int
    model: models.VGG
    params: Any
    train_scale: str
    input_convention: dict | None  # the input convention it was trained with (None: not stored)
    train_input: dict  # the training config's input group (or the evaluation config's)
    class_names: list[str] | None = None  # what its outputs mean, where the checkpoint says
    trained_by: str | None = None  # checkpoint.training_digest of its meta


@dataclasses.dataclass
class NetOutputs:
    """One net's rows and, for fusion, its multi-scale softmax per base method."""

    rows: list[dict[str, Any]]
    multi_scale: dict[str, np.ndarray]
    examples: tuple[np.ndarray | None, np.ndarray]  # (index or None, labels)
    seconds: dict[str, float]


def base_methods(eval_methods: Sequence[str]) -> tuple[str, ...]:
    """The methods that are run (``dense``, ``multi_crop``) for the rows asked for."""
    needed = set()
    for method in eval_methods:
        needed.update(method.split("+"))
    return tuple(m for m in methods.BASE_METHODS if m in needed)


def scales_needed(evals: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Every Q a run needs: the single scale and the multi-scale set, ascending."""
    return tuple(sorted({int(evals.single_scale), *(int(q) for q in evals.multi_scales)}))


def parse_checkpoint_choice(which: Any) -> str | int:
    """``latest``, ``best`` or a step number (an int or a string of digits)."""
    if which in CHECKPOINT_CHOICES:
        return which
    return checkpoint.parse_step(which)


def evals_problems(config: ml_collections.ConfigDict, data_devices: int) -> list[str]:
    """One line per ``evals`` value (and eval batch size) that evaluation cannot run with:
    unknown method names, empty or too small test scales, a bad grid or checkpoint choice, a
    batch the mesh's ``data_devices`` cannot split. ``checks.check_config`` reports them at
    start-up; ``check_evals`` raises them for library callers."""
    evals, problems = config.evals, []
    unknown = [m for m in evals.methods if m not in METHODS]
    if unknown or not evals.methods:
        problems.append(
            f"config.evals.methods={tuple(evals.methods)!r}: unknown {unknown or 'empty'}; "
            f"valid: {list(METHODS)}"
            + (
                " (several on the command line: "
                """--config.evals.methods='("dense","multi_crop")')"""
                if any("," in str(m) for m in unknown)
                else ""
            )
        )
    if not evals.multi_scales:
        problems.append("config.evals.multi_scales=(): give at least one test scale Q")
    scales = [int(q) for q in evals.multi_scales]
    if repeated := sorted({q for q in scales if scales.count(q) > 1}):
        # Each scale is evaluated once: a repeat would be a label, not a weight.
        problems.append(
            f"config.evals.multi_scales={tuple(evals.multi_scales)!r}: {repeated} given more "
            "than once; each test scale counts once in the average"
        )
    crop = int(config.input.crop_size)
    small = [q for q in scales_needed(evals) if q < crop]
    if small:
        key = "single_scale" if int(evals.single_scale) in small else "multi_scales"
        problems.append(
            f"config.evals.{key}={evals[key]!r}: every test scale Q must be at least "
            f"input.crop_size ({crop}); {small} are not"
        )
    if int(evals.multi_crop_grid) < 1:
        problems.append(f"config.evals.multi_crop_grid={evals.multi_crop_grid}: must be >= 1")
    try:
        parse_checkpoint_choice(evals.checkpoint)
    except ValueError:
        problems.append(
            f"config.evals.checkpoint={evals.checkpoint!r}: valid: "
            f"{list(CHECKPOINT_CHOICES)} or a step number"
        )
    if config.input.eval_batch_size % data_devices:
        problems.append(
            f"config.input.eval_batch_size={config.input.eval_batch_size}: must be a multiple of "
            f"the {data_devices} devices of the mesh's data axis"
        )
    return problems


def check_evals(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Raises ``ValueError`` with every ``evals_problems`` line."""
    problems = evals_problems(config, mesh.shape[sharding.DATA])
    if problems:
        raise ValueError("\n".join(problems))


def split_fusion_entry(entry: str, default: str | int) -> tuple[str, str | int]:
    """``workdir`` or ``workdir@latest|best|<step>``."""
    workdir, _, which = entry.rpartition("@") if "@" in entry else (entry, "", "")
    return workdir, parse_checkpoint_choice(which) if which else default


def _place(host_params: Any, shardings: Any) -> Any:
    """Host arrays onto (possibly multi-process) shardings; every process holds the same values."""
    return jax.tree_util.tree_map(
        lambda value, where: jax.make_array_from_callback(
            np.shape(value), where, lambda index: np.asarray(value)[index]
        ),
        host_params,
        shardings,
    )


def load_net(
    workdir: str, which: str | int, mesh: Mesh, fallback: ml_collections.ConfigDict
) -> Net:
    """Restores a checkpoint's parameters onto the mesh and rebuilds its net from the training
    config saved with it (``fallback``'s model for checkpoints saved without one), computing in
    ``fallback``'s (the evaluation config's) ``model.dtype``: the compute dtype is a choice of
    how to run, like the mesh, not part of the net (parameters are float32 whatever dtype trained
    them). The saved one was used, so ``--config.model.dtype=float32`` was silently ignored for a
    net trained in bfloat16, and ``bfloat16`` for an imported (float32-recorded) one."""
    params, step, meta = checkpoint.restore_params(workdir, which)
    net = _described_net(workdir, step, meta, fallback)
    expected = models.abstract_params(net.model)
    got = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), params)
    want = jax.tree_util.tree_map(lambda x: tuple(x.shape), expected)
    if got != want:
        raise checkpoint.NetMismatchError(
            f"The parameters in {workdir} (step {step}) do not fit net {net.name} as its saved "
            "config describes it."
        )
    net.params = _place(jax.device_get(params), sharding.param_shardings(mesh, expected))
    return net


def describe_net(workdir: str, which: str | int, fallback: ml_collections.ConfigDict) -> Net | None:
    """``load_net``'s net without its parameters (none are read): enough to check it fits the
    config and its fusion partners before any net is evaluated. None when its checkpoint's
    record does not read (``load_net`` then falls back to an older step, checked there)."""
    try:
        step, meta = checkpoint.chosen_meta(workdir, which)
    except Exception as e:  # Orbax wraps TensorStore's errors in plain Exceptions
        logging.info("%s (%s): record unread (%s); checked once loaded.", workdir, which, e)
        return None
    return _described_net(workdir, step, meta, fallback)


def _described_net(
    workdir: str, step: int, meta: dict[str, Any], fallback: ml_collections.ConfigDict
) -> Net:
    train_config = meta.get("config") or fallback.to_dict()
    model_config = ml_collections.ConfigDict(train_config["model"])
    model_config.dtype = fallback.model.dtype
    model = models.build_model(model_config, train_config["input"]["crop_size"])
    scale = train_config.get("input", {})
    train_scale = (
        report.train_scale_text(scale["train_scale_min"], scale["train_scale_max"])
        if "train_scale_min" in scale
        else "-"
    )
    return Net(
        name=train_config["model"]["name"],
        workdir=workdir,
        step=step,
        model=model,
        params=None,
        train_scale=train_scale,
        input_convention=meta.get("input_convention"),
        train_input=dict(train_config.get("input") or fallback.input.to_dict()),
        class_names=meta.get("class_names"),
        trained_by=checkpoint.training_digest(meta),
    )


MODEL_KEYS = ("name", "num_classes", "width", "fc_width")


def check_net_fits(
    net: Net,
    config: ml_collections.ConfigDict,
    num_classes: int | None,
    own: bool = True,
    class_names: list[str] | None = None,
) -> None:
    """A net whose checkpoint describes another model than ``config`` does (``own``: the
    workdir's net, whose results the evaluation writes; fusion partners may differ), whose
    class count is not the dataset's, or whose recorded classes are not the dataset's
    ``class_names`` (another dataset, or another order: output i would be scored as class i of
    this one), would be scored silently wrong: an error unless ``evals.accept_checkpoint_net``."""
    if config.evals.get("accept_checkpoint_net"):
        return
    model = net.model
    differ = [
        f"{key} {getattr(model, key)!r} in the checkpoint vs {config.model[key]!r}"
        for key in MODEL_KEYS[1:]
        if own and getattr(model, key) != config.model[key]
    ]
    if own and net.name != config.model.name:
        differ.insert(0, f"net {net.name!r} in the checkpoint vs {config.model.name!r}")
    if differ:
        raise checkpoint.NetMismatchError(
            f"The checkpoint in {net.workdir} (step {net.step}) is another net than the config "
            f"describes ({'; '.join(differ)}). Evaluate it with its own config, or pass "
            "--config.evals.accept_checkpoint_net=True to score the checkpoint's net anyway."
        )
    if num_classes is not None and model.num_classes != num_classes:
        raise checkpoint.NetMismatchError(
            f"Net {net.name} in {net.workdir} has {model.num_classes} classes, the dataset "
            f"{config.input.dataset!r} has {num_classes}. Pass "
            "--config.evals.accept_checkpoint_net=True to score it anyway."
        )
    if difference := checkpoint.class_difference(net.class_names, class_names):
        raise checkpoint.NetMismatchError(
            f"Net {net.name} in {net.workdir} was trained on other classes than "
            f"{config.input.dataset!r} has ({difference}). "
            "Pass --config.evals.accept_checkpoint_net=True to score it anyway."
        )


def check_fusable(first: Net, net: Net) -> None:
    """Fusion (Table 6) averages output i of every net as one class's softmax: a partner with
    another class count, or whose recorded classes are another list (another dataset, another
    order), cannot be averaged with ``first``, whatever ``evals.accept_checkpoint_net`` says
    (it accepts a net that is not the config's, not outputs that mean different classes)."""
    if net.model.num_classes != first.model.num_classes:
        raise checkpoint.NetMismatchError(
            f"Cannot fuse net {net.name} in {net.workdir} ({net.model.num_classes} classes) with "
            f"net {first.name} in {first.workdir} ({first.model.num_classes} classes): fused nets "
            "must have the same classes. Drop it from evals.fusion_workdirs."
        )
    if difference := checkpoint.class_difference(first.class_names, net.class_names):
        raise checkpoint.NetMismatchError(
            f"Cannot fuse net {net.name} in {net.workdir} with net {first.name} in "
            f"{first.workdir}: they were trained on other class lists ({difference}), so their "
            "outputs mean different classes. Drop it from evals.fusion_workdirs."
        )


def fill_convention(net: Net, mean_rgb: Any) -> None:
    """A net saved before checkpoints carried their input convention gets it rebuilt from its
    saved training config (its ``pixel_std``) and ``mean_rgb`` (the dataset's), not from the
    command's config, whose ``pixel_std`` may be another net's."""
    if net.input_convention is None:
        from vgg_jax import data

        train_input = ml_collections.ConfigDict(net.train_input)
        net.input_convention = data.trained_convention(mean_rgb, train_input)


def check_convention(net: Net, config: ml_collections.ConfigDict, own: bool = True) -> None:
    """Each net is fed the input convention it was trained with; an explicit ``input.pixel_std``
    in the evaluation config that contradicts the workdir's own net (``own``) is a mistake, not
    an instruction. Fusion partners bring their own conventions: the config's value is not
    theirs to match."""
    wanted = config.input.get("pixel_std")
    if not own or wanted is None or net.input_convention is None:
        return
    stored = tuple(float(s) for s in net.input_convention["std"])
    if tuple(float(s) for s in wanted) != stored:
        raise checkpoint.NetMismatchError(
            f"Net {net.name} in {net.workdir} was trained with input std {stored}, the config "
            f"sets input.pixel_std={tuple(wanted)}. Evaluation always uses the net's own input "
            "convention: drop the override (or set it to the trained value)."
        )


def combine(log_probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The paper's combination of methods, scales and nets: the mean of their softmax outputs,
    taken on their logarithms (on the host, as ``methods.log_mean_exp`` does on the device), so
    no class's rank is lost to a probability below float32's smallest."""
    stacked = np.stack(log_probabilities)
    return np.logaddexp.reduce(stacked, axis=0) - np.log(stacked.shape[0]).astype(stacked.dtype)


_classification_counts = jax.jit(metrics.classification_counts)


def counts(log_probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1/top-5 hits and the example count (every process holds every example's outputs);
    no top-5 hits with 5 classes or fewer (``metrics.classification_counts``).

    One jitted program per power of two of rows (padded rows masked out), so every row of an
    evaluation's table shares one: run op by op, the counts compiled 14 small programs, a
    second of the demo's evaluation."""
    totals: dict[str, float] = {}
    for start in range(0, max(len(labels), 1), COUNT_CHUNK):
        scores = log_probabilities[start : start + COUNT_CHUNK]
        chunk_labels = labels[start : start + COUNT_CHUNK]
        rows = len(chunk_labels)
        padded = min(COUNT_CHUNK, 1 << max(rows - 1, 0).bit_length())
        chunk = _classification_counts(
            np.pad(scores, ((0, padded - rows), (0, 0))),
            np.pad(chunk_labels, (0, padded - rows)),
            np.arange(padded) < rows,
        )
        for key, value in chunk.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole global array on this host (from every process's devices)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


@dataclasses.dataclass
class ScaleOutputs:
    """Every real example of the split at one scale (all processes' examples, on every host),
    in ``index`` order when the batches name their examples, else in the order they came."""

    results: dict[str, np.ndarray]  # function name -> (examples, ...), e.g. log-softmax per method
    labels: np.ndarray
    index: np.ndarray | None
    seconds: dict[str, float]  # function name -> device seconds (compilation excluded)
    input_seconds: float = 0.0  # waiting for the input pipeline's batches
    compile_seconds: float = 0.0  # compiling programs this pass needed first


def evaluate_scale(
    params: Any,
    functions: methods.CompiledFunctions,
    batches: Iterable[dict[str, np.ndarray]],
    run: Sequence[str],
    mesh: Mesh,
    num_classes: int | None = None,
    total: int | None = None,
    scale: int | None = None,
) -> ScaleOutputs:
    """One pass over the split at one test scale; each function in ``run`` on every batch.

    Outputs, labels, masks and example ids travel as one global batch, so every host gathers
    the same global rows whatever the process count, and examples that a scale's bucketing
    hands to another process or batch still line up by ``index`` across scales and nets.
    ``num_classes``: labels must be below it (a net scored on another dataset fails here).
    With ``total`` (the split's example count), a progress line with the time left for this
    pass (at test scale ``scale``) is logged every ``PROGRESS_SECONDS``.
    """
    kept: dict[str, list[np.ndarray]] = {m: [] for m in run}
    labels, order = [], []
    seconds = dict.fromkeys(run, 0.0)
    started = last_report = time.perf_counter()
    done = 0
    input_seconds = compile_seconds = 0.0
    batch_iterator = iter(batches)
    while True:
        waited = time.perf_counter()
        local = next(batch_iterator, None)
        input_seconds += time.perf_counter() - waited
        if local is None:
            break
        if preemption.agreed_stop():  # several processes: all stop before the same batch
            raise preemption.Stopped("Evaluation stopped by a SIGTERM.")
        if num_classes is not None and local["label"].max(initial=0) >= num_classes:
            raise checkpoint.NetMismatchError(
                f"A label {int(local['label'].max())} is out of range for a net with "
                f"{num_classes} classes: evaluate it on its own dataset."
            )
        named = "index" in local
        extra = {"index": np.asarray(local["index"], np.int32)} if named else {}
        batch = sharding.global_batch(
            {k: local[k] for k in ("image", "size", "label", "mask")} | extra, mesh
        )
        keep = _to_host(batch["mask"]).astype(bool)
        for method in run:
            start = time.perf_counter()
            executable = functions.compile(method, params, batch["image"], batch["size"])
            compile_seconds += time.perf_counter() - start
            start = time.perf_counter()
            result = jax.block_until_ready(executable(params, batch["image"], batch["size"]))
            seconds[method] += time.perf_counter() - start
            kept[method].append(_to_host(result)[keep])
        labels.append(_to_host(batch["label"])[keep])
        if named:
            order.append(_to_host(batch["index"])[keep])
        done += int(keep.sum())
        now = time.perf_counter()
        if total and done < total and now - last_report >= PROGRESS_SECONDS:
            last_report = now
            left = (now - started) / done * (total - done)
            logging.info(
                "Q=%s: %d/%d images, %s left at this scale",
                scale,
                done,
                total,
                writers.format_duration(left),
            )
    stacked = {
        m: np.concatenate(v) if v else np.zeros((0, num_classes or 0), np.float32)
        for m, v in kept.items()
    }
    label_array = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
    index = None
    if order:
        index = np.concatenate(order)
        permutation = np.argsort(index, kind="stable")
        stacked = {m: v[permutation] for m, v in stacked.items()}
        label_array, index = label_array[permutation], index[permutation]
    return ScaleOutputs(stacked, label_array, index, seconds, input_seconds, compile_seconds)


def method_rows(
    net_name: str,
    train_scale: str,
    scales: Sequence[int],
    log_probabilities: dict[str, np.ndarray],
    labels: np.ndarray,
    seconds: dict[str, float],
    eval_methods: Sequence[str],
    step: Any,
) -> list[dict[str, Any]]:
    """One row per method from per-example log-softmax of the base methods."""
    rows = []
    for method in eval_methods:
        parts = method.split("+")
        combined = combine([log_probabilities[p] for p in parts])
        totals = counts(combined, labels)
        elapsed = sum(seconds[p] for p in parts)
        rows.append(
            dict(
                net=net_name,
                train_scale=train_scale,
                test_scales=[int(q) for q in scales],
                method=method,
                **metrics.errors_from_counts(totals),
                images_per_second=totals["count"] / elapsed if elapsed > 0 else 0.0,
                count=int(totals["count"]),
                step=step,
            )
        )
    return rows


def check_scale(
    examples: tuple[np.ndarray | None, np.ndarray] | None, outputs: ScaleOutputs, scale: int
) -> tuple[np.ndarray | None, np.ndarray]:
    """One scale's ``(index, labels)``, checked against the previous scale's ``examples`` (the
    scales are combined example by example) and for examples counted twice."""
    _same_examples(examples, (outputs.index, outputs.labels), f"Q={scale}")
    if outputs.index is not None and np.unique(outputs.index).size != outputs.index.size:
        raise RuntimeError(f"Some examples came twice at Q={scale}.")
    return outputs.index, outputs.labels


def _same_examples(
    expected: tuple[np.ndarray | None, np.ndarray] | None,
    got: tuple[np.ndarray | None, np.ndarray],
    what: str,
) -> None:
    """Outputs are combined example by example: the (index, label) lists must agree."""
    if expected is None:
        return
    (expected_index, expected_labels), (index, labels) = expected, got
    same = np.array_equal(expected_labels, labels)
    if expected_index is not None and index is not None:
        same = same and np.array_equal(expected_index, index)
    if not same:
        raise RuntimeError(
            f"The validation examples differ for {what}: the input pipeline must yield the same "
            "examples at every scale, each named by an 'index' (or all in the same order)."
        )


def evaluate_net(
    config: ml_collections.ConfigDict,
    net: Net,
    mesh: Mesh,
    batches: BatchSource,
    expected_count: int | None = None,
) -> NetOutputs:
    """All rows of one net: single-scale at ``evals.single_scale``, multi-scale over
    ``evals.multi_scales``; each Q is one pass over the data running every needed method."""
    evals = config.evals
    multi = tuple(int(q) for q in evals.multi_scales)
    too_small = [q for q in scales_needed(evals) if q < net.model.crop_size]
    if too_small:
        raise ValueError(
            f"Test scales {too_small} are below net {net.name}'s crop size {net.model.crop_size}: "
            "every Q must be at least the crop size (set evals.single_scale/multi_scales)."
        )
    run = base_methods(evals.methods)
    functions = methods.compiled_methods(
        net.model, mesh, bool(evals.flip), int(evals.multi_crop_grid)
    )
    rows: list[dict[str, Any]] = []
    sums: dict[str, np.ndarray] = {}
    seconds = dict.fromkeys(run, 0.0)
    examples = None
    scales = scales_needed(evals)
    started = time.perf_counter()

    # Each scale's input starts one scale ahead, in the background: building a pipeline and
    # decoding its first batches overlaps the previous scale's compute (prefetch.Prefetched).
    def scale_input(scale: int) -> prefetch.Prefetched:
        return prefetch.Prefetched(batches(config, scale, net.input_convention), INPUT_AHEAD)

    upcoming = scale_input(scales[0])
    for position, scale in enumerate(scales, start=1):
        current = upcoming
        if position < len(scales):
            upcoming = scale_input(scales[position])
        outputs = evaluate_scale(
            net.params,
            functions,
            current,
            run,
            mesh,
            net.model.num_classes,
            expected_count,
            scale,
        )
        examples = check_scale(examples, outputs, scale)
        labels = outputs.labels
        if expected_count is not None and len(labels) != expected_count:
            raise RuntimeError(
                f"Counted {len(labels)} examples at Q={scale}, the split has "
                f"{expected_count}: the input pipeline dropped or repeated examples."
            )
        if scale == int(evals.single_scale):
            rows += method_rows(
                net.name,
                net.train_scale,
                [scale],
                outputs.results,
                labels,
                outputs.seconds,
                evals.methods,
                net.step,
            )
        if scale in multi:
            for method in run:
                found = outputs.results[method]  # log-softmax: summed as probabilities
                sums[method] = np.logaddexp(sums[method], found) if method in sums else found
                seconds[method] += outputs.seconds[method]
        elapsed = time.perf_counter() - started
        logging.info(
            "%s step %d Q=%d (scale %d/%d): %s, input %.1fs, compiling %.1fs "
            "(%d compilations so far)%s",
            net.name,
            net.step,
            scale,
            position,
            len(scales),
            ", ".join(f"{m} {s:.1f}s" for m, s in outputs.seconds.items()),
            outputs.input_seconds,
            outputs.compile_seconds,
            functions.compilations,
            ""
            if position == len(scales)
            else f"; about {writers.format_duration(elapsed / position * (len(scales) - position))}"
            " left for this net",
        )
    multi_scale = {m: s - np.log(len(multi)).astype(s.dtype) for m, s in sums.items()}
    if list(multi) != [int(evals.single_scale)]:
        rows += method_rows(
            net.name,
            net.train_scale,
            multi,
            multi_scale,
            labels,
            seconds,
            evals.methods,
            net.step,
        )
    return NetOutputs(rows, multi_scale, examples, seconds)


def fusion_rows(
    config: ml_collections.ConfigDict, nets: Sequence[Net], outputs: Sequence[NetOutputs]
) -> list[dict[str, Any]]:
    """Table 6: the nets' multi-scale softmax averaged, for each method."""
    for net, out in zip(nets[1:], outputs[1:], strict=True):
        _same_examples(outputs[0].examples, out.examples, f"net {net.name} ({net.workdir})")
    run = list(outputs[0].multi_scale)
    fused = {m: combine([o.multi_scale[m] for o in outputs]) for m in run}
    seconds = {m: sum(o.seconds[m] for o in outputs) for m in run}
    train_scales = ", ".join(dict.fromkeys(net.train_scale for net in nets))
    return method_rows(
        " & ".join(net.name for net in nets),
        train_scales,
        [int(q) for q in config.evals.multi_scales],
        fused,
        outputs[0].examples[1],
        seconds,
        config.evals.methods,
        [net.step for net in nets],
    )


def _default_batches(
    config: ml_collections.ConfigDict, scale: int, input_convention: Any
) -> Iterable[dict[str, np.ndarray]]:
    from vgg_jax import data

    return data.eval_batches(config, scale, input_convention=input_convention)


def evaluation_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a table's figures depend on besides the checkpoint: recorded with the results, so a
    result made with other settings is never taken for this one's (``continuous.watch``)."""
    evals = config.evals
    return dict(
        methods=list(evals.methods),
        single_scale=int(evals.single_scale),
        multi_scales=[int(q) for q in evals.multi_scales],
        flip=bool(evals.flip),
        multi_crop_grid=int(evals.multi_crop_grid),
        eval_split=config.input.eval_split,
    )


def _check_distinct(nets: Sequence[Net]) -> None:
    """The same checkpoint twice is an error: its "fusion" would be the net alone."""
    places = [(os.path.realpath(net.workdir), net.step) for net in nets]
    if len(set(places)) < len(places):
        twice = sorted({f"{w} step {s}" for w, s in places if places.count((w, s)) > 1})
        raise ValueError(f"The fusion lists the same checkpoint more than once: {twice}.")


def _unique_names(nets: Sequence[Net]) -> None:
    """Names that tell the table's nets apart: the net, then its workdir's last folder, then as
    many folders as it takes, then the step (two steps of one run). The same checkpoint twice is
    an error: its "fusion" would be the net alone."""
    _check_distinct(nets)
    places = [(os.path.realpath(net.workdir), net.step) for net in nets]
    names = [net.name for net in nets]
    for net, (real, _) in zip(nets, places, strict=True):
        if names.count(net.name) == 1:
            continue
        parts = real.strip(os.sep).split(os.sep)
        others = [w for n, (w, _) in zip(names, places, strict=True) if n == net.name and w != real]
        depth = 1
        while depth < len(parts) and any(w.endswith(os.sep.join(parts[-depth:])) for w in others):
            depth += 1
        where = os.sep.join(parts[-depth:])
        same_run = any(w == real for w, _ in places if (w, _) != (real, net.step))
        net.name = f"{net.name} ({where}{f' step {net.step}' if same_run else ''})"


def evaluate_checkpoints(
    config: ml_collections.ConfigDict,
    workdir: str,
    which: str | int,
    *,
    batches: BatchSource | None = None,
    fusion: bool = True,
    mesh: Mesh | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows for the checkpoint ``which`` of ``workdir`` and (``fusion``) the fusion workdirs'
    checkpoints, and a description of what was evaluated. Nothing is printed or written."""
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    check_evals(config, mesh)
    default_choice = which if which in CHECKPOINT_CHOICES else "latest"
    entries = [(workdir, which)]
    if fusion:
        entries += [split_fusion_entry(e, default_choice) for e in config.evals.fusion_workdirs]
    # Each process told whether another has no checkpoints directory (a process given another
    # --workdir stopped alone, the others waited for it in the next collective until JAX
    # aborted them 5 minutes later); a FileNotFoundError on every process, as on that one.
    processes.agreed(
        "Finding the checkpoints to evaluate",
        lambda: [checkpoint.require_checkpoint_directory(w) for w, _ in entries],
        FileNotFoundError,
    )
    for entry_workdir, choice in entries:  # before the dataset is prepared
        checkpoint.require_checkpoint(entry_workdir, choice)
    expected_count, data_info = None, None
    if batches is None:
        from vgg_jax import data

        batches = _default_batches
        processes.check_same_data(config)
        expected_count = data.num_eval_examples(config)
        data_info = data.dataset_info(config)
        skipped = data_info.bad_input.get(config.input.eval_split, {}).get("skipped_undecodable")
        if skipped:
            logging.warning(
                "Evaluating on the %d images of %s/%s that decode; %d more of it do not and are "
                "left out of every error rate (counted by python -m vgg_jax.tools.data).",
                expected_count,
                data_info.name,
                config.input.eval_split,
                skipped,
            )
    num_classes = data_info.num_classes if data_info else None
    class_names = data_info.class_names if data_info else None

    def check(net: Net, position: int, first: Net | None) -> None:
        check_net_fits(net, config, num_classes, own=position == 0, class_names=class_names)
        check_convention(net, config, own=position == 0)
        if position and first is not None:
            check_fusable(first, net)

    # Every net is checked before any is evaluated: a partner that cannot be fused (or one
    # checkpoint twice) was named only after the nets before it were evaluated (hours each).
    described = [describe_net(w, choice, config) for w, choice in entries]
    for position, net in enumerate(described):
        if net is not None:
            check(net, position, described[0])
    if all(net is not None for net in described):
        _check_distinct(described)
    nets, outputs, asked = [], [], []
    for position, (entry_workdir, choice) in enumerate(entries):
        net = load_net(entry_workdir, choice, mesh, config)
        asked.append(choice)
        check(net, position, nets[0] if nets else None)  # again: its step may have fallen back
        if data_info is not None:
            fill_convention(net, data_info.mean_rgb)
        logging.info("Evaluating net %s, step %d, from %s", net.name, net.step, net.workdir)
        nets.append(net)
        outputs.append(evaluate_net(config, net, mesh, batches, expected_count))
        net.params = None  # one net's parameters on the devices at a time
    _unique_names(nets)
    rows = []
    for net, out in zip(nets, outputs, strict=True):
        rows += [{**row, "net": net.name} for row in out.rows]
    if len(nets) > 1:
        rows += fusion_rows(config, nets, outputs)
    about = dict(
        # asked: "latest", "best" or a step; step: what was read (an unreadable newest falls back)
        checkpoints=[
            dict(net=n.name, workdir=n.workdir, step=n.step, asked=a, trained_by=n.trained_by)
            for n, a in zip(nets, asked, strict=True)
        ],
        flip=bool(config.evals.flip),
        multi_crop_grid=int(config.evals.multi_crop_grid),
        devices=jax.device_count(),
        processes=jax.process_count(),
        platform=jax.devices()[0].platform,
        dtype=config.model.dtype,  # every net's compute dtype (load_net)
    )
    about["settings"] = evaluation_settings(config)
    if data_info is not None:
        split = config.input.eval_split
        counts = data_info.bad_input.get(split, {})
        about["data"] = dict(
            dataset=data_info.name,
            split=split,
            images=expected_count,
            skipped_undecodable=counts.get("skipped_undecodable", 0),
        )
    return rows, about


def run_evaluation(
    config: ml_collections.ConfigDict, workdir: str, *, batches: BatchSource | None = None
) -> list[dict[str, Any]]:
    """``--mode=evaluate``: evaluates ``evals.checkpoint`` of ``workdir`` (fused with
    ``evals.fusion_workdirs``), prints the table and writes ``results.json`` and ``results.md``
    into ``workdir`` (process 0). Returns the rows."""
    compiled, loaded = compile_cache.program_counts()
    with compile_cache.workdir_cache(workdir) as cache_dir:
        rows, about = evaluate_checkpoints(
            config, workdir, parse_checkpoint_choice(config.evals.checkpoint), batches=batches
        )
    compiled, loaded = np.subtract(compile_cache.program_counts(), (compiled, loaded))
    logging.info(
        "Evaluation compiled %d programs and loaded %d from %s.",
        compiled,
        loaded,
        cache_dir,
    )
    if jax.process_index() == 0:
        print(report.format_table(rows), flush=True)  # first: shown even if the write fails
        json_path, markdown_path = report.write_results(workdir, rows, about)
        logging.info("Wrote %s and %s", json_path, markdown_path)
    return rows
