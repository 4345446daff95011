"""Input settings that need no TensorFlow: the demo's recommended values for the built-in data."""

from __future__ import annotations


def demo_input_config() -> dict:
    """Demo values for the built-in dataset: ``{"input": ..., "evals": ...}``, to apply with
    ``config.input.update(values["input"])`` and ``config.evals.update(values["evals"])``.


    Stored images have a short side of 48-128 px with objects 12-45% of it in radius, so S in
    [32, 64] with 32 x 32 crops keeps whole objects in most crops at every scale while the object
    size in the crop still varies ~8x; test scales Q = 32, 48, 64 (single scale 48) span it.

    Evaluation at this size: a 3x3 grid of crops (x 2 flips) per Q, not the paper's 5x5: at
    Q = 32-64 a 5x5 grid of 32-pixel crops steps by at most 8 pixels (at Q = 32 its rows are one
    row), so 25 positions are near-copies of 9; it was 70% of the demo's evaluation time
    (docs/performance.md). Evaluation buckets round the long side to 32 pixels, the per-epoch
    validation's to 16: the evaluation runs once and 32 compiles 5 dense programs instead of 7
    (1.8 s less of its 18, the same table), while the validation, run 16 times, would pad 11%
    more pixels at Q = 48 with 32."""
    return {
        "input": dict(
            dataset="builtin",
            builtin_size="full",
            crop_size=32,
            train_scale_min=32,
            train_scale_max=64,
            eval_bucket_step=32,
        ),
        "evals": dict(
            single_scale=48,
            multi_scales=(32, 48, 64),
            multi_crop_grid=3,
            validation_bucket_step=16,
        ),
    }
