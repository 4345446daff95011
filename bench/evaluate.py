"""Test-time cost: images/s of dense evaluation and of 150-crop multi-crop evaluation, same net,
same test scales, and their ratio (the paper's case for dense evaluation, section 3.2).

    python bench/evaluate.py                                  # net D at 1/16 width, ~1 min on CPU
    python bench/evaluate.py --width=1 --fc_width=4096        # the full net D (use an accelerator)
    python bench/evaluate.py --net=E --scales=256,384,512 --batch=32 --images=256

Both methods are the evaluator's own jitted functions (``vgg_jax.evaluation.methods``), run over
the same synthetic images (4:3, smaller side Q, already on the device, so the input pipeline is not
timed) at each Q of ``--scales``: dense evaluation of the whole image and its flip, and multi-crop
evaluation of a 5x5 grid of crops and their flips (50 crops per Q, 150 for three Q). An image
counts once per method over all the scales, as in multi-scale testing. The two methods alternate
batch by batch, so load on a shared machine hits both alike; compilation is done first and
reported apart. Imports nothing from ``vgg_jax.data``: TensorFlow need not be installed.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import app, flags

# Run from anywhere: the repository root holds ``vgg_jax`` and ``experiments``.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_NET = flags.DEFINE_string("net", "D", "Configuration of Table 1: A, A-LRN, B, C, D or E.")
_WIDTH = flags.DEFINE_float("width", 1 / 16, "Conv channel multiplier (1 for the paper's net).")
_FC_WIDTH = flags.DEFINE_integer("fc_width", 256, "FC1/FC2 width (4096 for the paper's net).")
_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classes.")
_CROP = flags.DEFINE_integer("crop_size", 224, "Training crop size (a multiple of 32).")
_SCALES = flags.DEFINE_list("scales", ["256", "384", "512"], "Test scales Q (smaller side).")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per batch (global; a multiple of devices).")
_IMAGES = flags.DEFINE_integer("images", 8, "Images per scale (a multiple of --batch).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_GRID = flags.DEFINE_integer("grid", 5, "Crops per side: 5 gives 5x5 x 2 flips = 50 per scale.")


def build(scales: list[int]):
    """The net, random parameters on the mesh, one batch per scale on the mesh, the methods."""
    import jax
    import numpy as np

    from vgg_jax import models, sharding
    from vgg_jax.configs import paper
    from vgg_jax.evaluation import methods

    config = paper.model_config(_NET.value)
    config.update(
        dict(
            num_classes=_CLASSES.value,
            width=_WIDTH.value,
            fc_width=_FC_WIDTH.value,
            dtype=_DTYPE.value,
        )
    )
    model = models.build_model(config, _CROP.value)
    mesh = sharding.make_mesh(paper.paper_config(_NET.value, None).mesh)
    functions = methods.compiled_methods(model, mesh, flip=True, grid=_GRID.value)
    rng = np.random.default_rng(0)

    def draw(leaf):  # NumPy, not model.init: no RNG program to compile
        scale = 0.01 if len(leaf.shape) == 1 else np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        return (rng.normal(size=leaf.shape) * scale).astype(np.float32)

    params = jax.device_put(
        jax.tree_util.tree_map(draw, models.abstract_params(model)), functions.param_shardings
    )
    batches = {}
    for q in scales:
        height, width = q, -(-4 * q // 3)
        images = rng.standard_normal((_BATCH.value, height, width, 3), np.float32)
        sizes = np.tile(np.array([height, width], np.int32), (_BATCH.value, 1))
        batches[q] = sharding.global_batch({"image": images, "size": sizes}, mesh)
    return model, mesh, functions, params, batches


def main(argv):
    del argv
    import jax

    scales = [int(q) for q in _SCALES.value]
    if _IMAGES.value % _BATCH.value:
        raise app.UsageError(f"--images={_IMAGES.value} is not a multiple of --batch.")
    if min(scales) < _CROP.value:
        raise app.UsageError(f"Every test scale must be >= --crop_size={_CROP.value}.")
    model, mesh, functions, params, batches = build(scales)

    start = time.perf_counter()
    for batch in batches.values():
        for method in ("dense", "multi_crop"):
            functions.compile(method, params, batch["image"], batch["size"])
            functions(method, params, batch["image"], batch["size"]).block_until_ready()  # warm
    compile_s = time.perf_counter() - start

    seconds = {"dense": 0.0, "multi_crop": 0.0}
    for _ in range(_IMAGES.value // _BATCH.value):
        for batch in batches.values():
            for method in seconds:
                start = time.perf_counter()
                functions(method, params, batch["image"], batch["size"]).block_until_ready()
                seconds[method] += time.perf_counter() - start

    device = mesh.devices.flat[0]
    device_text = f"{mesh.devices.size} x {device.device_kind}"
    if device.platform == "cpu":
        device_text = f"cpu ({len(os.sched_getaffinity(0))} cores)"
    dense_rate = _IMAGES.value / seconds["dense"]
    crop_rate = _IMAGES.value / seconds["multi_crop"]
    crops = _GRID.value**2 * 2 * len(scales)
    # What the conv stack sees per image: crops' pixels over the dense passes' (image + flip).
    dense_pixels = sum(2 * q * -(-4 * q // 3) for q in scales)
    pixel_ratio = _GRID.value**2 * 2 * len(scales) * _CROP.value**2 / dense_pixels
    fields = [
        f"net={_NET.value}",
        f"width={_WIDTH.value:g}",
        f"fc_width={_FC_WIDTH.value}",
        f"crop={_CROP.value}",
        f"Q={','.join(map(str, scales))}",
        f"dtype={_DTYPE.value}",
        f"batch={_BATCH.value}",
        f"images={_IMAGES.value}",
        f"device={device_text}",
        f"dense_images/s={dense_rate:.3g} (whole image + flip at each Q)",
        f"multi_crop_images/s={crop_rate:.3g} ({crops} crops)",
        f"dense/multi_crop={dense_rate / crop_rate:.2f}x",
        f"(input pixels ratio {pixel_ratio:.2f}x)",
        f"compile+warmup_s={compile_s:.0f} ({functions.compilations} executables)",
        f"jax={jax.__version__}",
    ]
    print(" ".join(fields))
    print("reproduce: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    app.run(main)
