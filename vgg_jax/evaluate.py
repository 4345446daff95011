"""Entry points of the evaluator (``vgg_jax/evaluation/``), for ``launch.py`` and notebooks.

    python launch.py --config=experiments/vgg16.py:jitter --workdir=workdirs/vgg16 --mode=evaluate

``run_evaluation(config, workdir)``: dense, multi-crop, multi-scale, combined and fused evaluation
of a checkpoint; prints the table and writes ``results.json`` / ``results.md``.
``watch(config, workdir)``: the same for each new checkpoint of a training run, to TensorBoard.
``predict(model, params, image)``: one image's classes and score map (drawn by
``vgg_jax.evaluation.score_map``).
"""

from vgg_jax.evaluation.continuous import watch
from vgg_jax.evaluation.predict import (
    ClassScore,
    imagenet_class_names,
    load_for_prediction,
    load_predictor,
    predict,
    read_image,
)
from vgg_jax.evaluation.runner import evaluate_checkpoints, run_evaluation

__all__ = [
    "ClassScore",
    "evaluate_checkpoints",
    "imagenet_class_names",
    "load_for_prediction",
    "load_predictor",
    "predict",
    "read_image",
    "run_evaluation",
    "watch",
]
