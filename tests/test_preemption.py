"""SIGTERM (preemption) across two JAX processes on localhost (gloo CPU collectives).

A signal to one process, or to both, must stop both at the same step with one checkpoint there,
exit 0, and resume bitwise as an uninterrupted two-process run; continuous evaluation must stop on
both processes too. Every wait has a deadline and tearDown kills what is left, so a regression
fails in bounded time instead of hanging in a collective.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from absl.testing import absltest

from tests import fixtures
from vgg_jax import checkpoint, preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# builtin "tiny": 100 training images, batch 20. The SIGTERM goes out when epoch 1's checkpoint
# is committed and must land before the end: with 6 epochs a CI run under load once finished all
# 30 steps first (the stop was agreed at the last step), since the input got cheaper.
STEPS_PER_EPOCH, EPOCHS = 5, 12
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS
WAIT_SECONDS = 600  # any one wait: a whole two-process run took up to 260 s at load 19 on 2 cores
STOPPED_AT = re.compile(r"Stopped at step (\d+) after a termination signal")


def overrides(data_dir: str) -> dict:
    return {
        "input.data_dir": data_dir,
        "input.builtin_size": "tiny",
        "input.batch_size": 20,
        "input.eval_batch_size": 16,
        "model.width": 1 / 16,
        "model.fc_width": 16,
        "schedule.num_epochs": EPOCHS,
        "ckpt.every_steps": 1000,  # checkpoints only at new-best validations, stops, the end
        "ckpt.keep": 2,
        "log_every_steps": 5,
        "evals.every_epochs": 1,  # the demo validates every 3 epochs
        "evals.poll_seconds": 1,
        "evals.watch_timeout_seconds": 600,
    }


def final_params(workdir: str):
    params, step, _ = checkpoint.restore_params(workdir)
    return jax.device_get(params), step


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def logged_step(path: str) -> int:
    """The last training step a process's log reports (``step 15/60 epoch 3.00 | ...``)."""
    steps = re.findall(rf"step (\d+)/{TOTAL_STEPS} ", read(path))
    return int(steps[-1]) if steps else 0


class OneProcessTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(setattr, preemption, "_stopped", False)

    def test_sigterm_sets_the_flag_and_the_previous_handler_comes_back(self):
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.addCleanup(signal.signal, signal.SIGTERM, previous)
        stop = preemption.StopSignal()
        self.assertFalse(stop.requested())
        os.kill(os.getpid(), signal.SIGTERM)
        self.assertTrue(stop.requested())
        self.assertTrue(preemption.stopped())  # tools.cli skips train_and_evaluate's evaluation
        # Evaluation on one process has no one to agree with: its SIGTERM ends it outright.
        self.assertFalse(preemption.agreed_stop())
        stop.restore()
        self.assertEqual(signal.getsignal(signal.SIGTERM), signal.SIG_IGN)

    def test_ctrl_c_saves_and_stops_like_sigterm_and_a_second_one_stops_at_once(self):
        # Today: KeyboardInterrupt mid-step, every step since the last periodic checkpoint lost.
        previous = signal.getsignal(signal.SIGINT)
        stop = preemption.StopSignal()
        self.addCleanup(stop.restore)
        self.assertFalse(stop.requested())
        os.kill(os.getpid(), signal.SIGINT)
        self.assertTrue(stop.requested())
        self.assertTrue(preemption.stopped())
        with self.assertRaises(KeyboardInterrupt):  # the user will not wait for the save
            os.kill(os.getpid(), signal.SIGINT)
        stop.restore()
        self.assertEqual(signal.getsignal(signal.SIGINT), previous)


class TwoProcessTestCase(absltest.TestCase):
    """Launching, waiting for and cleaning up after two-process runs (no tests of its own)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.data_dir = fixtures.builtin_data_dir()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.processes: list[subprocess.Popen] = []

    def tearDown(self):
        for process in self.processes:  # left running only by a failed test
            if process.poll() is None:
                process.kill()
                process.wait()
        super().tearDown()

    @classmethod
    def launch(
        cls, workdir: str, mode: str, *extra: str
    ) -> tuple[list[subprocess.Popen], list[str]]:
        """Two processes of two CPU devices each, logs to files (a full pipe would block one)."""
        os.makedirs(workdir, exist_ok=True)
        port = fixtures.free_port()
        env = fixtures.host_devices_env(2)
        args = [sys.executable, "launch.py", "--config=experiments/demo.py"]
        args += [f"--workdir={workdir}", f"--mode={mode}"]
        args += [f"--config.{k}={v}" for k, v in overrides(cls.data_dir).items()]
        args += [*extra, f"--coordinator_address=localhost:{port}", "--num_processes=2"]
        processes, logs = [], []
        for i in range(2):
            logs.append(os.path.join(workdir, f"{mode}_{time.time_ns()}_{i}.log"))
            with open(logs[-1], "w") as log:
                processes.append(
                    subprocess.Popen(
                        args + [f"--process_id={i}"], cwd=ROOT, env=env, stderr=log, text=True
                    )
                )
        return processes, logs

    @staticmethod
    def finish(processes: list[subprocess.Popen], logs: list[str]) -> list[str]:
        """Waits for every process (bounded), asserts exit 0, returns their logs."""
        deadline = time.time() + WAIT_SECONDS
        for process in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                for p in processes:
                    p.kill()
        texts = []
        for process, log in zip(processes, logs, strict=True):
            texts.append(read(log))
            if process.returncode != 0:
                raise AssertionError(f"exit {process.returncode}:\n{texts[-1][-3000:]}")
        return texts

    def wait_for(self, condition, processes, what: str) -> None:
        deadline = time.time() + WAIT_SECONDS
        while not condition():
            if any(p.poll() is not None for p in processes):
                raise AssertionError(f"a process exited before {what}")
            if time.time() > deadline:
                raise AssertionError(f"no {what} within {WAIT_SECONDS} s")
            time.sleep(0.05)


@pytest.mark.slow
class TwoProcessPreemptionTest(TwoProcessTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.reference_dir = os.path.join(cls.tmp, "reference")
        processes, logs = cls.launch(cls.reference_dir, "train")
        cls.finish(processes, logs)
        cls.reference_params, step = final_params(cls.reference_dir)
        assert step == TOTAL_STEPS, step

    def stop(self, workdir: str, signalled: tuple[int, ...], resumed_from: int = 0) -> int:
        """Trains (resuming from ``resumed_from``), SIGTERMs the ``signalled`` processes once
        training is under way, and checks both stop at one step with one complete checkpoint
        there; returns that step. (A resumed run saves again only at a new best validation or at
        its end: waiting for a checkpoint signalled it after its last step.)"""
        processes, logs = self.launch(workdir, "train")
        self.processes += processes
        if resumed_from:  # under way once it logs a step after the one it resumed from
            self.wait_for(lambda: logged_step(logs[0]) > resumed_from, processes, "a new step")
        else:  # under way once the first validation checkpoint (epoch 1) is committed
            self.wait_for(
                lambda: STEPS_PER_EPOCH in checkpoint.available_steps(workdir),
                processes,
                "checkpoint",
            )
        for i in signalled:
            processes[i].send_signal(signal.SIGTERM)
        texts = self.finish(processes, logs)
        if resumed_from:
            for text in texts:
                self.assertIn(f"Resumed from step {resumed_from}", text)
        stops = [STOPPED_AT.findall(text) for text in texts]
        self.assertLen(stops[0], 1, texts[0][-3000:])
        self.assertEqual(stops[0], stops[1])  # the same step on both processes
        stopped_at = int(stops[0][0])
        self.assertBetween(stopped_at, max(resumed_from, STEPS_PER_EPOCH) + 1, TOTAL_STEPS - 1)
        # One complete checkpoint at that step, the newest, and no unfinished save beside it.
        self.assertEqual(max(checkpoint.available_steps(workdir)), stopped_at)
        leftovers = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
        self.assertEmpty(leftovers)
        _, step, meta = checkpoint.restore_params(workdir)
        self.assertEqual((step, meta["data"]["next_step"]), (stopped_at, stopped_at))
        return stopped_at

    def test_sigterm_to_process_0_then_to_both_stops_both_at_one_step_and_resumes_bitwise(self):
        """One run stopped twice (one launch fewer than a run per case, for the suite's time):
        process 0 alone signalled, which must stop process 1 at the same step, then both."""
        workdir = self.create_tempdir().full_path
        first = self.stop(workdir, signalled=(0,))
        second = self.stop(workdir, signalled=(0, 1), resumed_from=first)
        processes, logs = self.launch(workdir, "train")
        self.processes += processes
        texts = self.finish(processes, logs)
        for text in texts:
            self.assertIn(f"Resumed from step {second}", text)
        params, step = final_params(workdir)
        self.assertEqual(step, TOTAL_STEPS)
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, self.reference_params)

    def test_sigterm_to_process_0_stops_evaluation_on_both_between_batches(self):
        # Nine test scales, each compiled on its first batch: evaluation outlasts the signal.
        scales = "--config.evals.multi_scales=(32,40,48,56,64,72,80,88,96)"
        results = os.path.join(self.reference_dir, "results.json")
        processes, logs = self.launch(self.reference_dir, "evaluate", scales)
        self.processes += processes
        self.wait_for(
            lambda: all("Evaluating net" in read(log) for log in logs), processes, "evaluation"
        )
        processes[0].send_signal(signal.SIGTERM)
        texts = self.finish(processes, logs)
        for text in texts:
            self.assertIn("Evaluation stopped after a termination signal", text)
        self.assertFalse(os.path.exists(results))


@pytest.mark.slow
class TwoProcessContinuousEvaluationTest(TwoProcessTestCase):
    """Needs no trained reference: its own class, so pytest-xdist can run it on another worker
    while the training tests run."""

    def test_sigterm_to_process_1_stops_continuous_evaluation_on_both(self):
        workdir = self.create_tempdir().full_path  # no checkpoint: both poll, in step
        processes, logs = self.launch(workdir, "evaluate_continuously")
        self.processes += processes

        def polling():
            return all("mode=evaluate_continuously" in read(log) for log in logs)

        self.wait_for(polling, processes, "start-up")
        time.sleep(2)  # a few polls
        processes[1].send_signal(signal.SIGTERM)
        start = time.time()
        texts = self.finish(processes, logs)
        self.assertLess(time.time() - start, 120)  # not the 600 s watch timeout
        for text in texts:
            self.assertIn("Continuous evaluation stopped by a SIGTERM", text)


if __name__ == "__main__":
    absltest.main()
