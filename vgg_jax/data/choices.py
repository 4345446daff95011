"""What the config's input keys may name, importable without TensorFlow.

``checks.check_config`` reads these before anything runs. Importing TensorFlow takes 7-9 s of one
core on a 2-core CPU (it loads Keras and matplotlib too); kept out of the checks, a config error
is said in a few seconds, and a training run starts compiling its step
(``steps.compile_ahead``) while TensorFlow loads instead of after. The pipeline modules
(``sources``, ``stats``, ``builtin``, ``folder``, ``verify``) use these same objects.
"""

from __future__ import annotations

import glob
import os
import re

DATASETS = ("imagenet2012", "image_folder", "builtin")
STATS_SOURCES = ("auto", "computed", "published")
# The built-in dataset's sizes by name (``input.builtin_size``): (training, validation) images.
BUILTIN_SIZES = {"full": (5000, 1000), "small": (1000, 200), "tiny": (100, 40)}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what an image folder's files may end with

# A TFDS version directory's name (``5.1.0``).
_VERSION = re.compile(r"\d+\.\d+\.\d+")

# ImageNet's manual download (image-net.org), which TFDS's imagenet2012 builder prepares from.
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")

# Published sizes (ILSVRC-2012: Russakovsky et al., 2015; TFDS's imagenet2012 builder).
PUBLISHED_COUNTS = {"imagenet2012": {"train": 1_281_167, "validation": 50_000, "classes": 1000}}
EXPECTED_COUNTS_FORMS = (
    "'published' (ImageNet's published counts for imagenet2012; every labelled class present "
    "otherwise), 'none', or 'SPLIT=N,...[,classes=N]' such as 'train=12,validation=5,classes=3'"
)


def parse_expected_counts(spec: str, dataset: str) -> dict[str, int] | None:
    """``{split or "classes": count}`` from ``input.expected_counts``; None for ``none``.
    Raises ``ValueError`` on any other form."""
    if spec == "none":
        return None
    if spec == "published":
        return dict(PUBLISHED_COUNTS.get(dataset, {}))
    counts = {}
    for item in str(spec).split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not key or not equals or not value.isdigit():
            raise ValueError(f"{item!r} is not SPLIT=N; valid forms: {EXPECTED_COUNTS_FORMS}")
        counts[key] = int(value)
    return counts


def expected_counts_problem(spec: str) -> str | None:
    """Why ``spec`` is not a valid ``input.expected_counts``, for ``checks.check_config``."""
    try:
        parse_expected_counts(spec, "")
    except (ValueError, TypeError):
        return f"must be {EXPECTED_COUNTS_FORMS}"
    return None


def imagenet_tars_missing(manual_dir: str | None) -> str | None:
    """What to do when ImageNet's tars are not in ``manual_dir`` (the sentence users read both at
    start-up and at preparation); None when both are there."""
    where = os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else None
    missing = [n for n in IMAGENET_TARS if where is None or not os.path.exists(f"{where}/{n}")]
    if not missing:
        return None
    extracted = where and _extracted_split(where)
    return (
        "imagenet2012 is not prepared yet and its manual download is missing. Put "
        + " and ".join(IMAGENET_TARS)
        + " (from https://image-net.org/download-images) in one directory and pass it as "
        f"--config.input.manual_dir=DIR. Missing: {', '.join(missing)}"
        + (f" in {where}." if where else " (config.input.manual_dir is not set).")
        + (
            f" {where} holds ImageNet extracted into class folders ({extracted}/n...): to "
            "train on those as they are, use --config.input.dataset=image_folder "
            f"--config.input.folder={where} (splits are its subfolders: "
            f"--config.input.train_split={extracted}, a validation folder sorted into class "
            "folders as input.eval_split)."
            if extracted
            else ""
        )
    )


def _extracted_split(where: str) -> str | None:
    """The name of a subfolder of ``where`` holding ImageNet synset folders (``n01440764/``), as
    the tars extract, or None."""
    for split in ("train", "val", "validation"):
        if glob.glob(os.path.join(where, split, "n[0-9]*", "")):
            return split
    return None


def imagenet_is_prepared_or_remote(data_dir: str | None) -> bool:
    """Whether TFDS may find imagenet2012 prepared in ``data_dir`` (its default when None) without
    its tars: a ``dataset_info.json`` of any version there, or a remote path (``gs://``) that
    only TFDS can look into. A guess that errs towards yes: the preparation still checks. Only a
    version directory counts: what a failed check moved aside (``5.1.0.bad``) and what an
    interrupted preparation left (``incomplete.<random>_5.1.0``) hold one too, and hid the
    missing tars until after the step's compile."""
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    if "://" in root:
        return True
    pattern = os.path.join(os.path.expanduser(root), "imagenet2012", "*", "dataset_info.json")
    return any(_VERSION.fullmatch(os.path.basename(os.path.dirname(p))) for p in glob.glob(pattern))
