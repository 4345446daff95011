"""The evaluator: the paper's testing protocol (section 3.2) over Orbax checkpoints.

``methods`` (dense, multi-crop: on-device functions of a padded batch), ``runner``
(``--mode=evaluate``: scales, combination, fusion, exact counts), ``report`` (the tables),
``continuous`` (evaluate each new checkpoint of a training run), ``predict`` (one image, and its
score map as a PNG). ``vgg_jax.evaluate`` gathers the public entry points.
"""
