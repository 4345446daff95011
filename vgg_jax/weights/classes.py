"""The ILSVRC-2012 classes in label order: what output i of an ImageNet net is.

Torchvision's and Keras's VGGs, TFDS's ``imagenet2012`` and this project's ImageNet training all
number the 1000 classes by their sorted WordNet IDs (``n01440764`` "tench" is 0), shipped as
``imagenet_classes.txt`` (``wnid<TAB>words`` per line). An imported ImageNet net records the IDs
as its class names, so the evaluator and ``init_from`` refuse a dataset of other classes or
another order instead of scoring output i as its class i.
"""

from __future__ import annotations

import functools
import os

NUM_IMAGENET_CLASSES = 1000
CLASS_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """``(WordNet ID, words)`` of the 1000 ILSVRC-2012 classes in label order (IDs sorted, the
    order of TFDS imagenet2012, torchvision and Keras), from the list shipped with the package."""
    with open(CLASS_LIST, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    if len(rows) != NUM_IMAGENET_CLASSES or any(len(row) != 2 for row in rows):
        raise ValueError(f"{CLASS_LIST} should hold {NUM_IMAGENET_CLASSES} 'wnid<TAB>words' lines.")
    return tuple((wnid, words) for wnid, words in rows)


def imagenet_wnids() -> list[str]:
    """The 1000 WordNet IDs in label order: the class names of TFDS's ``imagenet2012``."""
    return [wnid for wnid, _ in imagenet_classes()]
