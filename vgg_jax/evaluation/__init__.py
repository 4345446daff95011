"""The evaluator: the paper's testing protocol (section 3.2) over Orbax checkpoints.

``methods`` (dense and multi-crop as on-device functions of a padded batch, and
``CompiledFunctions`` that any caller reuses), ``runner`` (``run_evaluation``: scales,
combination, fusion, exact counts), ``report`` (the tables), ``continuous`` (``watch``: evaluate
each new checkpoint of a training run), ``predict`` (one image, and its score map as a PNG).
"""
