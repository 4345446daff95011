"""``launch.py --mode=evaluate`` as users run it, on the built-in dataset with the demo config.

The first test makes its own checkpoint (random weights of the demo's net) and a tiny copy of the
built-in dataset, so it needs no training run. The second evaluates a trained demo workdir when
``VGG_JAX_DEMO_WORKDIR`` names one (``python launch.py --config=experiments/demo.py
--workdir=workdirs/demo``) and checks the net is far better than chance.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from absl.testing import absltest

from experiments import demo
from vgg_jax import checkpoint, data, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_TITLES = ("dense", "multi-crop", "dense + multi-crop")


def launch_evaluate(workdir, *overrides):
    return subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--config=experiments/demo.py",
            f"--workdir={workdir}",
            "--mode=evaluate",
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def table_rows(stdout):
    """(test Q, method, top-1, top-5, images) of each printed table row."""
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[3] in METHOD_TITLES:
            rows.append((cells[2], cells[3], float(cells[4]), float(cells[5]), int(cells[7])))
    return rows


class EvaluateModeTest(absltest.TestCase):
    def test_demo_config_prints_dense_multi_crop_both_and_multi_scale_rows(self):
        tmp = self.create_tempdir().full_path
        overrides = [f"--config.input.data_dir={tmp}/data", "--config.input.builtin_size=tiny"]
        config = demo.get_config()
        config.input.data_dir = f"{tmp}/data"
        config.input.builtin_size = "tiny"
        data.prepare(config)
        model = models.build_model(config.model, config.input.crop_size)
        rng = np.random.default_rng(0)
        params = jax.tree_util.tree_map(
            lambda leaf: (rng.normal(size=leaf.shape) * 0.05).astype(np.float32),
            models.abstract_params(model),
        )
        checkpoint.save_params(f"{tmp}/work", params, step=1, config=config)

        result = launch_evaluate(f"{tmp}/work", *overrides)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        rows = table_rows(result.stdout)
        single, multi = str(config.evals.single_scale), "32,48,64"
        self.assertEqual(
            [(q, method) for q, method, *_ in rows],
            [(q, m) for q in (single, multi) for m in METHOD_TITLES],
        )
        num_eval = data.num_eval_examples(config)
        self.assertEqual({images for *_, images in rows}, {num_eval})
        with open(f"{tmp}/work/results.json") as f:
            self.assertLen(json.load(f)["rows"], 6)

    def test_trained_demo_beats_chance(self):
        workdir = os.environ.get("VGG_JAX_DEMO_WORKDIR")
        if not workdir:
            self.skipTest("Set VGG_JAX_DEMO_WORKDIR to a trained demo workdir.")
        result = launch_evaluate(os.path.abspath(workdir))
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        rows = table_rows(result.stdout)
        self.assertLen(rows, 6)
        for q, method, top1, _, _ in rows:
            self.assertLess(top1, 50.0, (q, method))  # chance is 90% for ten classes


if __name__ == "__main__":
    absltest.main()
