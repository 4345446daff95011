"""Input pipelines: ImageNet (TFDS, manual tars), any image folder, the built-in shapes dataset.

The public interface (see ``docs/data.md``)::

    data.prepare(config)                      # TFDS files, per-split index, mean RGB and PCA
    data.dataset_info(config) -> DatasetInfo
    data.steps_per_epoch(config) -> int
    data.train_batches(config, start_step, *, process_index=None, process_count=None)
    data.eval_batches(config, scale, *, split=None, normalization=None, process_index=None,
                      process_count=None)
    data.num_eval_examples(config, split=None) -> int
    data.demo_input_config() -> dict          # the built-in dataset's recommended demo values

The pipeline modules import TensorFlow; this package loads them on first use, so
``vgg_jax.data.settings`` (and configs that read it) work without TensorFlow.
"""

import importlib

_PIPELINE_NAMES = (
    "DatasetInfo",
    "dataset_info",
    "eval_batches",
    "num_eval_examples",
    "prepare",
    "steps_per_epoch",
    "train_batches",
)
__all__ = [*_PIPELINE_NAMES, "demo_input_config"]


def __getattr__(name: str):
    if name in _PIPELINE_NAMES:
        return getattr(importlib.import_module("vgg_jax.data.pipeline"), name)
    if name == "demo_input_config":
        return importlib.import_module("vgg_jax.data.settings").demo_input_config
    raise AttributeError(f"module 'vgg_jax.data' has no attribute {name!r}")
