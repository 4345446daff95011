"""``check_config(config, mode)``: the whole config against the dataset and devices, at start-up.

Every mode of ``launch.py`` (and each ``python -m vgg_jax.tools`` program) runs it before any
data preparation or compilation, so a typo or an impossible value costs a second, not a training
run: a method name misspelled in ``evals.methods`` used to fail only after all of training. Each
problem is one line naming the key, the bad value and what is valid; all of them are reported at
once (``ConfigError``), and the command line prints them without a traceback.

The rules live here, in one place, but the names they check against live with the code that
uses them (``models.LAYOUTS``, ``optim.OPTIMIZERS``, ``methods``' method names, ...), so a new
name is valid as soon as the code supports it.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from vgg_jax import models, modes, sharding
from vgg_jax.evaluation import runner
from vgg_jax.training import init_from, optim

MODES = modes.MODES
# What the python -m vgg_jax.tools programs check as: features reads another dataset's images
# through a trained net, so the net's class count need not be the dataset's.
TOOL_MODES = ("features",)
TRAINING_MODES = ("train", "train_and_evaluate")
# Above this the SGD update is certain to overflow float32 within a step or two.
MAX_LEARNING_RATE = 10.0
# Seeds (``seed``, ``input.shuffle_seed``) are below this: ``jax.random.key`` keeps a seed's low
# 32 bits (2**32 + 5 initialised and augmented as 5 did), and numpy's generator of the data order
# refuses a negative one (a traceback at the first batch, after preparation and compilation).
SEED_LIMIT = 2**32


class ConfigError(ValueError):
    """One or more config values that cannot work; ``problems`` holds one line per value."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Problems:
    """Collects one line per bad value: ``config.<key>=<value>: <what is valid>``."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.lines: list[str] = []

    def value(self, key: str) -> Any:
        node: Any = self.config
        for part in key.split("."):
            node = node[part]
        return node

    def add(self, key: str, why: str) -> None:
        self.lines.append(f"config.{key}={self.value(key)!r}: {why}")

    def one_of(self, key: str, valid: Iterable[str]) -> None:
        valid = list(valid)
        if self.value(key) not in valid:
            self.add(key, f"unknown name; valid: {valid}")

    def number(self, key: str, ok: Callable[[float], bool], why: str) -> None:
        value = self.value(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            self.add(key, why)


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def dataset_facts(input_config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """``(classes, training examples)`` of the configured dataset when known without preparing
    it (built-in sizes, ImageNet's published counts, an image folder's directory listing); None
    when it cannot be known cheaply."""
    if input_config.dataset == "imagenet2012":
        return 1000, 1_281_167
    if input_config.dataset == "builtin":
        from vgg_jax.data import choices, shapes

        if input_config.builtin_size not in choices.BUILTIN_SIZES:
            return None
        return len(shapes.CLASS_NAMES), choices.BUILTIN_SIZES[input_config.builtin_size][0]
    if input_config.dataset == "image_folder" and input_config.folder:
        root = os.path.join(os.path.expanduser(input_config.folder), input_config.train_split)
        if not os.path.isdir(root):
            return None
        from vgg_jax.data import choices

        def is_image(entry: os.DirEntry) -> bool:
            name = entry.name.lower()
            return (
                entry.is_file()
                and not name.startswith(".")
                and name.endswith(choices.IMAGE_EXTENSIONS)
            )

        classes = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
        files = sum(1 for c in classes for f in os.scandir(c.path) if is_image(f))
        return len(classes), files
    return None


def _check_model(p: _Problems) -> None:
    p.one_of("model.name", sorted(models.LAYOUTS))
    p.one_of("model.dtype", sorted(models.DTYPES))
    p.one_of("model.init", models.INITIALIZERS)
    p.number(
        "model.num_classes",
        lambda x: int(x) == x and x >= 2,
        "must be a whole number >= 2: a softmax over one class has zero loss and zero error "
        "whatever the weights, so nothing is learnt or measured",
    )
    p.number("model.width", _positive, "must be > 0 (1.0 is the paper's width)")
    p.number("model.fc_width", lambda x: int(x) == x and x >= 1, "must be a whole number >= 1")
    p.number("model.dropout_rate", lambda x: 0 <= x < 1, "must be in [0, 1)")
    p.number("model.init_std", _positive, "must be > 0")


def _check_input(p: _Problems, mode: str, data_devices: int) -> tuple[int, int] | None:
    from vgg_jax.data import choices

    p.one_of("input.dataset", choices.DATASETS)
    if p.value("input.dataset") == "builtin":
        p.one_of("input.builtin_size", sorted(choices.BUILTIN_SIZES))
    p.one_of("input.stats_source", choices.STATS_SOURCES)
    cell = 2**models.NUM_POOLS
    crop = p.value("input.crop_size")
    p.number(
        "input.crop_size", lambda x: x >= cell and x % cell == 0, f"must be a multiple of {cell}"
    )
    if p.value("input.dataset") == "image_folder" and not p.value("input.folder"):
        p.add("input.folder", "input.dataset='image_folder' needs the folder ROOT/<split>/<class>/")
    batch_keys = ("input.batch_size",) if mode in TRAINING_MODES else ()  # evaluate: no training
    for key in (*batch_keys, "input.eval_batch_size"):
        p.number(
            key,
            lambda x: int(x) == x and x >= 1 and x % data_devices == 0,
            f"must be a positive multiple of the {data_devices} devices of the mesh's data axis",
        )
    smin, smax = p.value("input.train_scale_min"), p.value("input.train_scale_max")
    if mode in TRAINING_MODES and not crop <= smin <= smax:
        p.add(
            "input.train_scale_min",
            f"training needs crop_size ({crop}) <= train_scale_min <= train_scale_max ({smax})",
        )
    std = p.value("input.pixel_std")
    if std is not None and not (
        isinstance(std, (tuple, list))
        and len(std) == 3
        and all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in std)
    ):
        p.add("input.pixel_std", "must be None or three positive numbers, one per RGB channel")
    p.number(
        "input.stats_max_images",
        lambda x: int(x) == x and x >= 1,
        "must be a whole number >= 1 (training images the mean RGB and PCA are computed from): "
        "0 failed in numpy's eigensolver, and a negative count left that many images out",
    )
    p.number("input.eval_bucket_step", lambda x: int(x) == x and x >= 1, "must be >= 1")
    p.number(
        "input.eval_max_batch_pixels",
        lambda x: int(x) == x and x >= 0,
        "must be a whole number >= 0 (0: eval_batch_size images of aspect 4)",
    )
    p.number(
        "evals.validation_bucket_step",
        lambda x: int(x) == x and x >= 0,
        "must be >= 1 (or 0: input.eval_bucket_step)",
    )
    _check_data_files(p)
    split = p.value("input.eval_split")
    if mode in TRAINING_MODES and split == p.value("input.train_split"):
        logging.warning(
            "input.eval_split is the training split %r: the per-epoch validation that drives the "
            "learning-rate rule and the final table score images the net is trained on, not "
            "held-out ones.",
            split,
        )
    if mode == "features" and split == p.value("input.train_split"):
        logging.warning(
            "input.eval_split is the training split %r: the linear classifiers are scored on the "
            "images they are fitted on, not held-out ones.",
            split,
        )
    facts = dataset_facts(p.config.input)
    if facts is None:
        return None
    classes, num_train = facts
    if classes < 2:
        split = os.path.join(p.value("input.folder"), p.value("input.train_split"))
        p.add(
            "input.folder",
            f"{split} holds {classes} class folder{'' if classes == 1 else 's'}: a classifier "
            "needs at least 2 (ROOT/<split>/<class>/<image>, one folder per class)",
        )
    elif mode not in TOOL_MODES and classes != p.value("model.num_classes"):
        p.add(
            "model.num_classes",
            f"dataset {p.value('input.dataset')!r} has {classes} classes; "
            f"set --config.model.num_classes={classes}",
        )
    if mode in TRAINING_MODES and num_train < p.value("input.batch_size"):
        p.add(
            "input.batch_size",
            f"larger than the {num_train} training examples: an epoch would have no step",
        )
    return facts


def _check_data_files(p: _Problems) -> None:
    """``input.expected_counts``' form, ImageNet's tars when it is not prepared, and
    ``input.index_dir`` (writability is tried at preparation, where the directory is known in
    full)."""
    from vgg_jax.data import choices

    why = choices.expected_counts_problem(p.value("input.expected_counts"))
    if why:
        p.add("input.expected_counts", why)
    unprepared = p.value("input.dataset") == "imagenet2012" and not (
        choices.imagenet_is_prepared_or_remote(p.value("input.data_dir"))
    )
    if unprepared and (missing := choices.imagenet_tars_missing(p.value("input.manual_dir"))):
        p.add("input.manual_dir", missing)  # said in seconds, not after the step's compile
    index_dir = p.value("input.index_dir")
    if index_dir and os.path.isfile(os.path.expanduser(index_dir)):
        p.add("input.index_dir", "is a file; needs a directory (created if missing)")


def _check_training(p: _Problems) -> None:
    p.one_of("optim.name", optim.OPTIMIZERS)
    p.one_of("schedule.kind", optim.SCHEDULES)
    p.one_of("init_from.mode", init_from.MODES)
    p.number(
        "optim.learning_rate",
        lambda x: _positive(x) and x <= MAX_LEARNING_RATE,
        f"must be in (0, {MAX_LEARNING_RATE:g}] (the paper: 1e-2)",
    )
    p.number("optim.weight_decay", lambda x: math.isfinite(x) and x >= 0, "must be >= 0")
    p.number("optim.momentum", lambda x: 0 <= x < 1, "must be in [0, 1)")
    p.number("schedule.num_epochs", _positive, "must be > 0")
    p.number("schedule.plateau_patience", lambda x: x >= 1, "must be >= 1")
    p.number("schedule.plateau_factor", lambda x: 0 < x <= 1, "must be in (0, 1]")
    p.number(
        "schedule.plateau_max_decays",
        lambda x: int(x) == x and x >= 0,
        "must be a whole number >= 0 (the paper: 3)",
    )
    # A negative margin counted a worse validation as a new best (the best drifted down and the
    # rate was never divided); 1 or more, none after the first (the rate divided every
    # plateau_patience validations, whatever the net did).
    p.number(
        "schedule.plateau_min_delta",
        lambda x: 0 <= x < 1,
        "must be in [0, 1): a top-1 accuracy fraction (0.002 is 0.2 points)",
    )
    p.number("schedule.warmup_epochs", lambda x: x >= 0, "must be >= 0")
    p.number("evals.every_epochs", lambda x: int(x) == x and x >= 1, "must be a whole number >= 1")
    p.number(
        "evals.validation_examples", lambda x: int(x) == x and x >= 0, "must be a whole number >= 0"
    )
    p.number("ckpt.every_steps", lambda x: int(x) == x and x >= 1, "must be a whole number >= 1")
    p.number("ckpt.keep", lambda x: int(x) == x and x >= 1, "must be a whole number >= 1")
    p.number("log_every_steps", lambda x: int(x) == x and x >= 1, "must be a whole number >= 1")
    for key in ("seed", "input.shuffle_seed"):
        p.number(
            key,
            lambda x: int(x) == x and 0 <= x < SEED_LIMIT,
            "must be a whole number in [0, 2**32): JAX's random keys keep 32 bits, so a larger "
            "seed draws what seed mod 2**32 draws, and the data order refuses a negative one",
        )


def _check_evals(p: _Problems, data_devices: int) -> None:
    p.lines += [
        line
        for line in runner.evals_problems(p.config, data_devices)
        if not line.startswith("config.input.eval_batch_size")  # _check_input's rule
    ]


def check_config(
    config: ml_collections.ConfigDict, mode: str, workdir: str | None = None
) -> tuple[int, int] | None:
    """Raises ``ConfigError`` listing every value of ``config`` that ``mode`` cannot run with.

    Checks names against the valid ones, numbers against their ranges, batch sizes against the
    devices, test scales against the crop size, the class count and batch size against the
    dataset (when its facts are known without preparing it) and the workdir. Returns the dataset's
    ``(classes, training examples)`` when known. Touches no data and compiles nothing.
    """
    if mode not in MODES + TOOL_MODES:
        raise ConfigError([f"--mode={mode!r}: unknown; valid: {list(MODES)}"])
    if is_study(config) != (mode == "study"):
        kind = "a study config" if is_study(config) else "a training config"
        raise ConfigError(
            [
                f"--mode={mode}: got {kind}; a study config (experiments/study.py) runs with "
                "--mode=study and only there"
            ]
        )
    if mode == "study":
        if workdir is not None and (problem := workdir_problem(workdir)):
            raise ConfigError([problem])
        return _check_study(config, workdir)
    p = _Problems(config)
    _check_model(p)
    _check_local_paths(p)
    if mode == "summary":
        cell = 2**models.NUM_POOLS
        p.number("input.crop_size", lambda x: x >= cell and x % cell == 0, f"a multiple of {cell}")
        if p.lines:
            raise ConfigError(p.lines)
        return None
    mesh = config.mesh
    devices = jax.device_count()
    data, model = int(mesh.data), int(mesh.model)
    fits = (data == -1 and model >= 1 and devices % model == 0) or (
        model == -1 and data >= 1 and devices % data == 0
    )
    if not (fits or (data >= 1 and model >= 1 and data * model == devices)):
        p.lines.append(
            f"config.mesh.data={data} x config.mesh.model={model}: does not fit the {devices} "
            "devices (use -1 for one axis to take the rest)"
        )
        data_devices = 1
    else:
        data_devices = data if data != -1 else devices // model
        model_devices = devices // data_devices
        if jax.process_count() > 1 and jax.local_device_count() % model_devices:
            p.lines.append(
                sharding.model_axis_problem(data, model, model_devices, jax.local_device_count())
            )
        fc_width = p.value("model.fc_width")
        if mode in TRAINING_MODES and not sharding.fc_splits(fc_width, model_devices):
            logging.warning(
                "config.mesh.model=%d: %d devices do not divide model.fc_width=%s, so FC1 and "
                "FC2 are not split: every device holds them whole, as with mesh.model=1 (the "
                "same numbers, no memory saved); use a mesh.model that divides %s.",
                model,
                model_devices,
                fc_width,
                fc_width,
            )
    facts = _check_input(p, mode, data_devices)
    if mode in TRAINING_MODES:
        _check_training(p)
        if _checkpoints_seen_alike(p, workdir):  # before Orbax reads them, a collective
            _check_init_source(p, workdir)
            if facts is not None:
                _check_some_step(p, facts[1], workdir)
    _check_evals(p, data_devices)
    if workdir is not None and (problem := workdir_problem(workdir, mode)):
        p.lines.append(problem)
    if p.lines:
        raise ConfigError(p.lines)
    return facts


def url_problem(what: str, path: str | None) -> str | None:
    """Why ``path`` (``gs://bucket/run``) cannot be one of the directories the project reads and
    writes itself: its lock, checkpoints' metadata, metrics, results and data index use local
    file calls, which took the URL for a relative path and made a directory ``gs:`` in the
    current one. On a TPU VM the checkpoints of a "gs://" workdir were on the VM's own disk,
    gone with it."""
    if not path or "://" not in path:
        return None
    return (
        f"{what}={path} is a URL, but vgg_jax reads and writes it with local file calls (it "
        f"would have been a local directory {os.path.abspath(path)!r}); mount the bucket "
        "(e.g. with gcsfuse) and give the mounted path"
    )


def _check_local_paths(p: _Problems) -> None:
    """The config's directories that the project itself reads or writes are local paths; a
    ``gs://`` ``input.data_dir`` is TFDS's to read, but then the index and statistics the
    project writes beside the TFDS files need a local ``input.index_dir``."""

    def given(key: str) -> Any:
        try:
            return p.value(key)
        except (KeyError, AttributeError):  # a config without that part
            return None

    paths = [(key, given(key)) for key in ("init_from.workdir", "input.index_dir")]
    paths += [("evals.fusion_workdirs", w) for w in given("evals.fusion_workdirs") or ()]
    for key, path in paths:
        if problem := url_problem(f"config.{key}", path):
            p.lines.append(problem)
    data_dir = given("input.data_dir") or os.environ.get("TFDS_DATA_DIR")
    if data_dir and "://" in data_dir and not given("input.index_dir"):
        p.lines.append(
            f"config.input.data_dir={data_dir} is a URL, which TFDS reads, but the project's "
            "index and statistics of the dataset are written with local file calls beside it "
            f"(a local directory {os.path.abspath(data_dir)!r}, one per host); set "
            "--config.input.index_dir to a local or mounted directory"
        )


def workdir_problem(workdir: str, mode: str | None = None) -> str | None:
    """Why nothing could be written into ``workdir`` (a file there or above it, a read-only
    mount or directory, a URL), found at start-up: an evaluation of hours otherwise ends in a
    traceback when it writes results.json, its table unprinted. For an evaluation of a read-only
    trained workdir (one shared, say), the way to evaluate it: another --workdir would hold no
    checkpoint."""
    if problem := url_problem("--workdir", workdir):
        return problem
    target = existing = os.path.abspath(workdir)
    while not os.path.exists(existing):  # the directory the run would create its workdir in
        existing = os.path.dirname(existing)
    where = "it" if existing == target else f"{existing} above it"
    if not os.path.isdir(existing):
        return f"--workdir={workdir}: {where} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        line = (
            f"--workdir={workdir}: {where} is not writable (checkpoints, results and logs are "
            "written there); give a writable --workdir"
        )
        checkpoints = os.path.join(target, "checkpoints")
        if mode in ("evaluate", "evaluate_continuously") and os.path.isdir(checkpoints):
            line += (
                f" holding a link to its checkpoints, read from there (mkdir W && ln -s "
                f"{shlex.quote(checkpoints)} W/checkpoints; then --workdir=W)"
            )
        return line
    return None


def _check_some_step(p: _Problems, num_train: int, workdir: str | None) -> None:
    """A new run whose ``schedule.num_epochs`` rounds down to no step (``optim.total_steps``,
    as the loop counts) would train nothing, save nothing, and end in its
    evaluation's "no committed checkpoint ... train it first"."""
    from vgg_jax import checkpoint

    epochs, batch = p.value("schedule.num_epochs"), p.value("input.batch_size")
    numbers = all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in (epochs, batch)
    )
    if not numbers or num_train < batch or not math.isfinite(epochs):
        return  # their own rules say what is wrong
    steps_per_epoch = int(num_train // batch)
    if optim.total_steps(epochs, steps_per_epoch) >= 1:
        return
    if workdir is not None and checkpoint.available_steps(workdir):
        return  # a trained run, evaluated again: nothing to train is what was asked
    p.add(
        "schedule.num_epochs",
        f"an epoch is {steps_per_epoch} steps of batch {batch} ({num_train} training examples), "
        f"so {epochs:g} epochs is no step and training would save nothing; give at least "
        f"{math.ceil(1000 / steps_per_epoch) / 1000:g}",  # rounded up: it gives one step
    )


def _checkpoints_seen_alike(p: _Problems, workdir: str | None) -> bool:
    """On several processes: whether every process sees (or none does) the checkpoints of the
    run's --workdir and of ``init_from.workdir``, which the training checks then list with
    Orbax; if not, a problem naming each process that differs from process 0.

    Orbax lists checkpoints in a collective, opened only where the directory exists: a host
    without the source run (init_from.workdir on process 0's disk only) or given another
    --workdir stopped with its one line while process 0's listing met its next collective, and
    every process aborted (exit 134, a gloo "collective mismatch")."""
    if jax.process_count() == 1:
        return True
    from vgg_jax import checkpoint, processes

    source = p.value("init_from.workdir")
    places = {
        "--workdir": workdir,
        "init_from.workdir": source if isinstance(source, str) else None,
    }
    seen = {
        key: "sees its checkpoints/"
        if os.path.isdir(checkpoint.checkpoints_directory(os.path.expanduser(path)))
        else "does not see its checkpoints/"
        for key, path in places.items()
        if path
    }
    if lines := processes.differences(processes.gather_json(seen)):
        p.lines.append(
            "The processes of this job do not see the same checkpoints (each compared with "
            "process 0; every host needs --workdir and init_from.workdir on storage all of them "
            "see): " + "; ".join(lines)
        )
        return False
    return True


def _check_init_source(p: _Problems, workdir: str | None) -> None:
    """A new run's ``init_from.workdir`` is given and holds a checkpoint (and ``init_from.step``),
    found now rather than after the data is prepared (hours for ImageNet). A run that resumes
    from its own checkpoint does not read it."""
    from vgg_jax import checkpoint

    source, mode = p.value("init_from.workdir"), p.value("init_from.mode")
    if (
        mode != "none"
        and source
        and workdir is not None
        and os.path.realpath(os.path.expanduser(source)) == os.path.realpath(workdir)
    ):
        # The run would resume the source's own checkpoints as its own and, keeping the last
        # ckpt.keep, delete them: the source run lost, and nothing copied.
        p.add(
            "init_from.workdir",
            "is this run's own --workdir: the run would resume the source's checkpoints instead "
            "of copying them, and replace them with its own; give this run another --workdir",
        )
        return
    if mode == "none" or (workdir is not None and checkpoint.available_steps(workdir)):
        return
    if not source:
        p.add(
            "init_from.workdir",
            f"init_from.mode={mode!r} needs it: "
            + (
                "the run this one fine-tunes (section 3.1: S=384 from S=256, jittered S from 384)"
                if mode == "full"
                else f"a trained net A's workdir (section 3.1: net {p.value('model.name')} "
                "starts from net A's layers; train experiments/vgg11.py first), or "
                "init_from.mode=none with model.init=glorot to start from scratch"
            ),
        )
    if not source or workdir is None:  # no workdir: a study's plan, whose sources it trains
        return
    steps = checkpoint.available_steps(os.path.expanduser(source))
    step = p.value("init_from.step")
    if not steps:
        p.add(
            "init_from.workdir",
            "holds no checkpoint (<workdir>/checkpoints/<step>/): train it first",
        )
    elif step is not None and int(step) not in steps:
        p.add("init_from.step", f"not a checkpoint of {source}; it has {steps}")
    else:
        chosen = max(steps) if step is None else int(step)
        try:
            meta = checkpoint.read_meta(os.path.expanduser(source), chosen)
        except Exception:  # noqa: BLE001 - a damaged record is the training's to report, in full
            return
        # Another net than the mode copies from (C fine-tuned from D's workdir) was found only
        # after the data was prepared and the state initialised.
        if problem := init_from.source_net_problem(mode, p.value("model.name"), meta):
            p.add(
                "init_from.workdir",
                f"holds net {init_from.recorded_net(meta)} (step {chosen}); init_from.mode="
                f"{mode!r} {problem}",
            )


def is_study(config: ml_collections.ConfigDict) -> bool:
    """A study config (``experiments/study.py``), which only ``--mode=study`` runs."""
    return "scale_settings" in config


def _check_study(config: ml_collections.ConfigDict, workdir: str | None) -> None:
    """A study: its plan (names of nets, scales, arms) and every run's training config."""
    from vgg_jax.study import plan

    try:
        runs = plan.make_plan(config, workdir or "workdir")
    except (ValueError, KeyError, AttributeError) as e:
        raise ConfigError([f"study config: {e}"]) from None
    problems: dict[str, None] = {}
    for run in runs:
        try:
            check_config(run.config, "evaluate" if run.is_fusion else "train_and_evaluate")
        except ConfigError as e:
            problems.update({f"{run.name}: {line}": None for line in e.problems})
    if problems:
        raise ConfigError(list(problems))
