"""Input pipelines: ImageNet (TFDS, manual tars), any image folder, the built-in shapes dataset.

The public interface (see ``docs/data.md``)::

    data.prepare(config)                      # TFDS files, per-split index, mean RGB and PCA
    data.dataset_info(config) -> DatasetInfo
    data.steps_per_epoch(config) -> int
    data.train_batches(config, start_step, *, process_index=None, process_count=None)
    data.eval_batches(config, scale, *, split=None, input_convention=None, process_index=None,
                      process_count=None)
    data.num_eval_examples(config, split=None) -> int
    data.data_fingerprint(config) -> dict     # what every process's copy must agree on
    data.trained_convention(mean_rgb, input_config) -> dict  # what a net trained here sees
    data.DatasetError                         # bad data on disk, said in one line

The pipeline modules import TensorFlow; this package loads them on first use, so importing
``vgg_jax.data`` alone costs nothing.
"""

import importlib


class DatasetError(ValueError):
    """The data on disk cannot be used as it is: a damaged tar, a prepared dataset that does not
    hold what it should, an empty class folder, an index location that cannot be written. The
    message is one line naming what to fix; the command-line tools print it without a traceback
    (a traceback through TFDS would hide which file is bad)."""


_PIPELINE_NAMES = (
    "DatasetInfo",
    "data_fingerprint",
    "dataset_info",
    "eval_batches",
    "num_eval_examples",
    "prepare",
    "steps_per_epoch",
    "train_batches",
    "trained_convention",
)
__all__ = ["DatasetError", *_PIPELINE_NAMES]


def __getattr__(name: str):
    if name in _PIPELINE_NAMES:
        return getattr(importlib.import_module("vgg_jax.data.pipeline"), name)
    raise AttributeError(f"module 'vgg_jax.data' has no attribute {name!r}")
