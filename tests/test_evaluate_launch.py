"""``launch.py --mode=evaluate`` as users run it, on the built-in dataset with the demo config.

The tests make their own checkpoint (random weights of the demo's net) on the shared tiny
built-in dataset, so they need no training run.
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from absl.testing import absltest

from experiments import demo
from tests import fixtures
from vgg_jax import checkpoint, data, models
from vgg_jax.data import builtin
from vgg_jax.evaluation import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_TITLES = ("dense", "multi-crop", "dense + multi-crop")


def launch_args(workdir, *overrides):
    return [
        sys.executable,
        "launch.py",
        "--config=experiments/demo.py",
        f"--workdir={workdir}",
        "--mode=evaluate",
        *overrides,
    ]


def launch_evaluate(workdir, *overrides):
    return subprocess.run(
        launch_args(workdir, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def saved_figures(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        rows = json.load(f)["rows"]
    return [
        (r["method"], r["test_scales"], r["top1_error"], r["top5_error"], r["count"]) for r in rows
    ]


def table_rows(stdout):
    """(test Q, method, top-1, top-5, images) of each printed table row."""
    rows = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[3] in METHOD_TITLES:
            rows.append((cells[2], cells[3], float(cells[4]), float(cells[5]), int(cells[7])))
    return rows


@pytest.mark.slow
class EvaluateModeTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        """A tiny built-in dataset and a checkpoint of the demo's net with random weights."""
        cls.tmp = tempfile.mkdtemp(prefix="evaluate_launch_")
        data_dir = fixtures.builtin_data_dir()
        cls.overrides = [f"--config.input.data_dir={data_dir}", "--config.input.builtin_size=tiny"]
        cls.config = demo.get_config()
        cls.config.input.data_dir = data_dir
        cls.config.input.builtin_size = "tiny"
        model = models.build_model(cls.config.model, cls.config.input.crop_size)
        rng = np.random.default_rng(0)
        cls.params = jax.tree_util.tree_map(
            lambda leaf: (rng.normal(size=leaf.shape) * 0.05).astype(np.float32),
            models.abstract_params(model),
        )
        checkpoint.save_params(f"{cls.tmp}/one", cls.params, step=1, config=cls.config)
        checkpoint.save_params(f"{cls.tmp}/two", cls.params, step=1, config=cls.config)

    def test_demo_config_prints_dense_multi_crop_both_and_multi_scale_rows(self):
        result = launch_evaluate(f"{self.tmp}/one", *self.overrides)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        rows = table_rows(result.stdout)
        single, multi = str(self.config.evals.single_scale), "32,48,64"
        self.assertEqual(
            [(q, method) for q, method, *_ in rows],
            [(q, m) for q in (single, multi) for m in METHOD_TITLES],
        )
        num_eval = data.num_eval_examples(self.config)
        self.assertEqual({images for *_, images in rows}, {num_eval})
        self.assertLen(saved_figures(f"{self.tmp}/one"), 6)

        # The same checkpoint evaluated by two processes (two CPU devices each; dense at one scale,
        # to save compilations): every example still counts once and the figures are the same.
        port = fixtures.free_port()
        env = fixtures.host_devices_env(2)
        distributed = [
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            "--config.evals.methods=('dense',)",
            "--config.evals.multi_scales=(48,)",
        ]
        processes = [
            subprocess.Popen(
                launch_args(f"{self.tmp}/two", *self.overrides, *distributed, f"--process_id={i}"),
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for process in processes:
            _, stderr = process.communicate(timeout=900)
            self.assertEqual(process.returncode, 0, stderr[-3000:])
        one = [r for r in saved_figures(f"{self.tmp}/one") if r[:2] == ("dense", [48])]
        two = saved_figures(f"{self.tmp}/two")
        self.assertLen(two, 1)
        self.assertEqual([r[:2] + r[4:] for r in one], [r[:2] + r[4:] for r in two])
        np.testing.assert_allclose([r[2:4] for r in one], [r[2:4] for r in two], atol=1e-6)

    def start_two_processes(self, workdirs: tuple[str, str], *extra: str):
        """Processes 0 and 1 of one job, each with its workdir, one CPU device each."""
        distributed = [f"--coordinator_address=localhost:{fixtures.free_port()}"]
        return [
            subprocess.Popen(
                [
                    *launch_args(workdir, *self.overrides, *distributed, "--num_processes=2"),
                    *extra,
                    f"--process_id={i}",
                ],
                cwd=ROOT,
                env=fixtures.host_devices_env(1),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, workdir in enumerate(workdirs)
        ]

    def test_a_process_whose_workdir_holds_no_checkpoint_stops_every_process(self):
        """Process 1 given another --workdir (no checkpoint there; the workdir is not part of
        the config the processes compare): it stopped with its one line while process 0 waited
        for it in the next collective until JAX aborted both 5 minutes later (exit 134)."""
        elsewhere = tempfile.mkdtemp(prefix="evaluate_elsewhere_")
        started = self.start_two_processes((f"{self.tmp}/one", elsewhere))
        lines = []
        for process in started:
            returncode, _, stderr = fixtures.finish(process, 150)
            self.assertEqual(returncode, 1, stderr[-3000:])
            self.assertNotIn("Traceback", stderr)
            lines.append(stderr.strip().splitlines()[-1])
        self.assertIn(f"No committed checkpoint in {elsewhere}", lines[1])
        self.assertIn(
            "Finding the checkpoints to evaluate failed on another process of this job: "
            f"process 1: FileNotFoundError: No committed checkpoint in {elsewhere}",
            lines[0],
        )

    def test_a_watcher_waits_until_every_process_sees_the_checkpoints(self):
        """Continuous evaluation on two processes, process 1 not seeing ``checkpoints/`` (here:
        another --workdir; in a job, the watcher started before training's first save and one
        host seeing the new directory a moment later). Orbax's listing is a collective, made
        only where the directory exists: process 0's met process 1's next collective, and both
        hung until JAX aborted them 5 minutes later. Now they wait for it together."""
        elsewhere = tempfile.mkdtemp(prefix="watch_elsewhere_")
        watch = [
            "--config.evals.watch_timeout_seconds=2",
            "--config.evals.poll_seconds=1",
            "--mode=evaluate_continuously",
        ]
        started = self.start_two_processes((f"{self.tmp}/two", elsewhere), *watch)
        errors = []
        for process in started:
            returncode, _, stderr = fixtures.finish(process, 150)
            self.assertEqual(returncode, 0, stderr[-3000:])
            errors.append(stderr)
        self.assertIn("Processes [1] do not see", errors[0])

    def test_load_for_prediction_brings_convention_and_class_names(self):
        model, params, input_convention, class_names = predict.load_for_prediction(
            f"{self.tmp}/one"
        )
        self.assertEqual(model.crop_size, 32)
        info = data.dataset_info(self.config)
        np.testing.assert_allclose(input_convention["mean"], info.mean_rgb)
        self.assertEqual(input_convention["std"], tuple(self.config.input.pixel_std))
        self.assertEqual(class_names, list(builtin.CLASS_NAMES))
        image, _ = builtin.draw_example(0, "validation", 0)
        top, score_map = predict.predict(
            model,
            params,
            image,
            class_names=class_names,
            input_convention=input_convention,
            scale=48,
        )
        self.assertIn(top[0].class_name, builtin.CLASS_NAMES)
        self.assertEqual(score_map.shape[-1], 10)


if __name__ == "__main__":
    absltest.main()
