"""The real training loop on the built-in dataset (tiny size): kill/resume, SIGTERM, NaN stop,
validation, and two JAX processes on localhost matching one process."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import absltest

from experiments import demo
from tests import fixtures
from vgg_jax import checkpoint, data, preemption, sharding
from vgg_jax.evaluation import runner
from vgg_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, BATCH, TRAIN_SIZE = 4, 20, 100  # builtin "tiny": 100 training images -> 5 steps/epoch
TOTAL_STEPS = EPOCHS * TRAIN_SIZE // BATCH


def overrides(data_dir: str, **extra) -> dict:
    values = {
        "input.data_dir": data_dir,
        "input.builtin_size": "tiny",
        "input.batch_size": BATCH,
        "input.eval_batch_size": 16,
        "model.width": 1 / 16,
        "model.fc_width": 16,
        "schedule.num_epochs": EPOCHS,
        "ckpt.every_steps": 1,
        "ckpt.keep": 2,
        "log_every_steps": 5,
        "evals.every_epochs": 1,  # the demo validates every 3 epochs
    }
    values.update(extra)
    return values


def loop_config(data_dir: str, **extra):
    config = demo.get_config()
    for key, value in overrides(data_dir, **extra).items():
        group, _, name = key.rpartition(".")
        (config[group] if group else config)[name] = value
    return config


def launch_args(data_dir: str, workdir: str, mode: str = "train", **extra) -> list[str]:
    args = [sys.executable, "launch.py", "--config=experiments/demo.py", f"--workdir={workdir}"]
    args.append(f"--mode={mode}")
    return args + [f"--config.{k}={v}" for k, v in overrides(data_dir, **extra).items()]


def final_params(workdir: str):
    params, step, _ = checkpoint.restore_params(workdir)
    return jax.device_get(params), step


def wait_for_checkpoint(
    workdir: str, process: subprocess.Popen, step: int, started: bool = False
) -> None:
    """Returns as soon as ``step`` is committed (Orbax renames its temporary directory to the
    step's number) or, with ``started``, as soon as its temporary directory appears; checked with
    a listing: an Orbax manager per poll took seconds on a loaded machine, long enough for the
    tiny run to finish before the test's signal."""
    deadline = time.time() + 240
    directory = os.path.join(workdir, checkpoint.SUBDIR)

    def there() -> bool:
        names = os.listdir(directory) if os.path.isdir(directory) else []
        if started:
            return any(
                n == str(step) or n.startswith(f"{step}{checkpoint.TMP_MARKER}") for n in names
            )
        return str(step) in names and step in checkpoint.available_steps(workdir)

    while not there():
        if process.poll() is not None:
            raise AssertionError(f"training exited early:\n{process.stderr.read()}")
        if time.time() > deadline:
            raise AssertionError("no checkpoint in time")
        time.sleep(0.01)


def orbax_only_file_names() -> set[str]:
    """Names of Orbax's source files that no file of ours shares."""
    import orbax.checkpoint

    def py_names(package_dir):
        return {f for _, _, files in os.walk(package_dir) for f in files if f.endswith(".py")}

    orbax_dir = os.path.dirname(os.path.dirname(orbax.checkpoint.__file__))
    return py_names(orbax_dir) - py_names(ROOT)


def info_line_sources(stderr: str) -> set[str]:
    """Source files of absl INFO lines (``I1128 15:17:14.02 123 train.py:312] ...``)."""
    return set(re.findall(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\]", stderr, flags=re.M))


def assert_trees_equal(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


class TrainLoopTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.data_dir = fixtures.builtin_data_dir()
        cls.reference_dir = os.path.join(cls.tmp, "reference")
        cls.reference_state = loop.train(loop_config(cls.data_dir), cls.reference_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_uninterrupted_run_trains_and_validates(self):
        params, step = final_params(self.reference_dir)
        self.assertEqual(step, TOTAL_STEPS)
        assert_trees_equal(params, jax.device_get(self.reference_state.params))
        _, _, meta = checkpoint.restore_params(self.reference_dir)
        validation = meta["validation"]
        self.assertTrue(meta["final"])  # the schedule's end: a continuous evaluator stops there
        self.assertBetween(validation["val_top1_accuracy"], 0.0, 1.0)
        self.assertGreaterEqual(validation["val_top5_accuracy"], validation["val_top1_accuracy"])
        self.assertTrue(os.listdir(os.path.join(self.reference_dir, "tensorboard")))
        with open(os.path.join(self.reference_dir, "metrics.jsonl")) as f:
            self.assertIn("val_top1_accuracy", f.read())

    def test_a_sigterm_during_the_last_save_still_stops_what_follows(self):
        workdir = os.path.join(self.create_tempdir().full_path, "finished")
        shutil.copytree(self.reference_dir, workdir)  # nothing left to train
        self.addCleanup(setattr, preemption, "_stopped", False)
        close = checkpoint.Checkpointer.close

        def close_after_a_sigterm(checkpointer):
            os.kill(os.getpid(), signal.SIGTERM)
            close(checkpointer)

        with mock.patch.object(checkpoint.Checkpointer, "close", close_after_a_sigterm):
            loop.train(loop_config(self.data_dir), workdir)
        self.assertTrue(preemption.stopped())  # today: False, and the evaluation ran

    def test_a_validation_saves_only_a_new_best(self):
        """With a rate too small to change any prediction, only the first validation is a new
        best: it and the end are saved, not the validations between (no periodic saves)."""
        workdir = self.create_tempdir().full_path
        config = loop_config(
            self.data_dir, **{"optim.learning_rate": 1e-9, "ckpt.every_steps": 1000}
        )
        config.ckpt.keep = 3
        loop.train(config, workdir)
        steps_per_epoch = TRAIN_SIZE // BATCH
        self.assertEqual(checkpoint.available_steps(workdir), [steps_per_epoch, TOTAL_STEPS])
        _, _, meta = checkpoint.restore_params(workdir)
        first = checkpoint.restore_params(workdir, steps_per_epoch)[2]["validation"]
        self.assertEqual(meta["best_val_top1"], first["val_top1_accuracy"])

    def test_evaluation_feeds_each_net_its_trained_convention(self):
        """The demo trains with input.pixel_std 60: the checkpoint carries mean and std, and an
        evaluation config that does not set pixel_std still feeds the net what it saw."""
        _, _, meta = checkpoint.restore_params(self.reference_dir)
        config = loop_config(self.data_dir)
        self.assertEqual(tuple(meta["input_convention"]["std"]), (60.0, 60.0, 60.0))
        np.testing.assert_allclose(
            meta["input_convention"]["mean"], data.dataset_info(config).mean_rgb
        )
        config.input.pixel_std = None
        config.evals.update(dict(methods=("dense",), single_scale=48, multi_scales=(48,)))
        seen = []

        def batches(config, scale, input_convention):
            seen.append(input_convention)
            return data.eval_batches(config, scale, input_convention=input_convention)

        runner.evaluate_checkpoints(config, self.reference_dir, "latest", batches=batches)
        self.assertEqual([tuple(n["std"]) for n in seen], [(60.0, 60.0, 60.0)])
        config.input.pixel_std = (1.0, 1.0, 1.0)  # an explicit contradiction
        with self.assertRaisesRegex(ValueError, "trained with input std \\(60.0"):
            runner.evaluate_checkpoints(config, self.reference_dir, "latest", batches=batches)

    def test_evaluating_another_net_or_class_count_fails_unless_asked(self):
        config = loop_config(self.data_dir)
        config.model.name = "B"
        with self.assertRaisesRegex(ValueError, "another net .*'A' in the checkpoint vs 'B'"):
            runner.evaluate_checkpoints(config, self.reference_dir, "latest")
        net = runner.load_net(self.reference_dir, "latest", sharding.make_mesh(config.mesh), config)
        with self.assertRaisesRegex(ValueError, "has 10 classes, the dataset .* has 1000"):
            runner.check_net_fits(net, loop_config(self.data_dir), 1000)
        config.evals.accept_checkpoint_net = True
        runner.check_net_fits(net, config, 1000)  # asked for: no error

    @pytest.mark.slow
    def test_sigkill_then_resume_is_bitwise_identical(self):
        workdir = self.create_tempdir().full_path
        args = launch_args(self.data_dir, workdir)
        process = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        wait_for_checkpoint(workdir, process, 3)
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.assertLess(max(checkpoint.available_steps(workdir)), TOTAL_STEPS)
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("Resumed from step", result.stderr)
        sources = info_line_sources(result.stderr)
        self.assertIn("loop.py", sources)  # the progress lines (vgg_jax/training/loop.py)
        self.assertRegex(result.stderr, r"top-1 error [\d.]+% top-5 error [\d.]+% .*\| \S+ left")
        self.assertEmpty(sources & orbax_only_file_names())  # cli.quiet_library_logs
        params, step = final_params(workdir)
        self.assertEqual(step, TOTAL_STEPS)
        assert_trees_equal(params, final_params(self.reference_dir)[0])

    @pytest.mark.slow
    def test_sigterm_saves_exits_and_resumes(self):
        """In the default mode (train_and_evaluate) too: a preempted run saves, exits 0 and does
        not evaluate the partly trained net as if it were final."""
        workdir = self.create_tempdir().full_path
        extra = {"ckpt.every_steps": 1000}
        args = launch_args(self.data_dir, workdir, **extra)
        interrupted = launch_args(self.data_dir, workdir, "train_and_evaluate", **extra)
        process = subprocess.Popen(interrupted, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        # The signal goes as the first validation's save starts: the 15 steps after it take a
        # fraction of a second, and waiting for its commit left them to finish first on a
        # loaded machine.
        wait_for_checkpoint(workdir, process, 5, started=True)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
        self.assertEqual(process.returncode, 0, stderr[-3000:])
        stopped_at = max(checkpoint.available_steps(workdir))
        self.assertIn(f"Stopped at step {stopped_at}", stderr)
        self.assertLess(stopped_at, TOTAL_STEPS)
        self.assertIn("evaluation skipped", stderr)
        self.assertFalse(os.path.exists(os.path.join(workdir, "results.json")))
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        assert_trees_equal(final_params(workdir)[0], final_params(self.reference_dir)[0])

    def test_a_stop_between_log_lines_logs_the_steps_since_the_last(self):
        """Stopped at step 7 with a line every 5 steps: steps 6 and 7's loss and error were
        never written (metrics.jsonl, TensorBoard, console), and the resumed run starts at 8."""
        workdir = self.create_tempdir().full_path
        config = loop_config(self.data_dir, **{"ckpt.every_steps": 100})
        calls = []

        def stop_at_step_7(signal_handler):
            calls.append(None)
            return len(calls) >= 7

        with mock.patch.object(preemption.StopSignal, "requested", stop_at_step_7):
            loop.train(config, workdir)
        self.assertEqual(max(checkpoint.available_steps(workdir)), 7)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            logged = [r["step"] for r in map(json.loads, f) if "train_loss" in r]
        self.assertEqual(logged, [5, 7])

    def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(self):
        workdir = self.create_tempdir().full_path
        config = loop_config(self.data_dir, **{"optim.learning_rate": 1e12})
        config.schedule.num_epochs = 1
        with self.assertRaisesRegex(loop.NonFiniteLossError, "last good checkpoint"):
            loop.train(config, workdir)
        for step in checkpoint.available_steps(workdir):
            params, _, _ = checkpoint.restore_params(workdir, step)
            finite = jax.tree_util.tree_map(lambda p: bool(np.isfinite(p).all()), params)
            self.assertTrue(all(jax.tree_util.tree_leaves(finite)))

    def test_the_rate_and_time_left_leave_out_the_start_up(self):
        """The first line's rate was the images of its interval over the start-up too (data
        decoded, first step compiled): a resumed demo's first line said 11.6 img/s and 3m29s left
        with 2 s left. A first batch held back 4 s stands for that start-up here."""
        workdir = self.create_tempdir().full_path
        config = loop_config(self.data_dir, **{"ckpt.every_steps": 100, "log_every_steps": 2})
        config.schedule.num_epochs = 1
        from vgg_jax.data import on_device

        real_batches, held = on_device.train_batches, 4.0

        def slow_first_batch(*args, **kwargs):
            batches = real_batches(*args, **kwargs)
            time.sleep(held)
            yield next(batches)
            yield from batches

        with mock.patch.object(on_device, "train_batches", slow_first_batch):
            loop.train(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rates = [r["images_per_second"] for r in map(json.loads, f) if "images_per_second" in r]
        # With the start-up counted, the first interval's 2 batches took over 4 s: < 10 img/s.
        self.assertGreater(rates[0], 2 * (2 * BATCH / held), rates)

    @pytest.mark.slow
    def test_two_processes_match_one(self):
        workdir = self.create_tempdir().full_path
        port = fixtures.free_port()
        env = fixtures.host_devices_env(2)
        processes = [
            subprocess.Popen(
                launch_args(self.data_dir, workdir, **{"ckpt.every_steps": 1000})
                + [
                    f"--coordinator_address=localhost:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ],
                cwd=ROOT,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for process in processes:
            _, stderr = process.communicate(timeout=600)
            self.assertEqual(process.returncode, 0, stderr[-3000:])
        params, step = final_params(workdir)
        self.assertEqual(step, TOTAL_STEPS)
        reference = final_params(self.reference_dir)[0]
        # Same batches bitwise (tests/test_data_on_device.py); the gradients' cross-device sums
        # run in another order (Gloo between processes), which after 10 steps moved one value
        # of 1,152 by 2.6e-4 relative (1.4e-5 absolute). A wrong split of the data moves them
        # by orders of magnitude more.
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), params, reference
        )


if __name__ == "__main__":
    absltest.main()
