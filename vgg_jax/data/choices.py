"""What the config's input keys may name, importable without TensorFlow.

``checks.check_config`` reads these before anything runs. Importing TensorFlow takes 7-9 s of one
core on a 2-core CPU (it loads Keras and matplotlib too); kept out of the checks, a config error
is said in a few seconds, and a training run starts compiling its step
(``steps.compile_ahead``) while TensorFlow loads instead of after. The pipeline modules
(``sources``, ``stats``, ``builtin``, ``folder``, ``verify``) use these same objects.
"""

from __future__ import annotations

DATASETS = ("imagenet2012", "image_folder", "builtin")
STATS_SOURCES = ("auto", "computed", "published")
# The built-in dataset's sizes by name (``input.builtin_size``): (training, validation) images.
BUILTIN_SIZES = {"full": (5000, 1000), "small": (1000, 200), "tiny": (100, 40)}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # what an image folder's files may end with

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
