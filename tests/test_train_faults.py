"""Faults around checkpoints (issue 13, points 4, 5, 9, 10) on the tiny config:

- an update that overflows is never saved, and the error names the last good (finite) step;
- a second trainer on a busy workdir is refused at once; a killed trainer's lock does not block;
- a damaged newest checkpoint is reported in one line; readers fall back to the newest that reads;
- a save that fails (disk full) fails the run at that save, with the OS's reason, leaving no
  temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import absltest
from etils import epath

from tests import fixtures
from vgg_jax import checkpoint, data, sharding, writers
from vgg_jax.evaluation import runner
from vgg_jax.tools import cli
from vgg_jax.training import lock, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 6  # the tiny built-in dataset: 100 training images, batch 16


def config_for(with_data: bool = True, **values):
    defaults = {"schedule.num_epochs": 1, "ckpt.every_steps": 1, "log_every_steps": 1000}
    return fixtures.tiny_config(with_data=with_data, **{**defaults, **values})


def saved_trees(workdir: str, step: int):
    """A step's parameters and optimiser state, as saved."""
    checkpoints = checkpoint.Checkpointer(workdir)
    try:
        params, opt_state, _ = checkpoints.restore(step, None, None)
    finally:
        checkpoints.close()
    return params, opt_state


def all_finite(tree) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree_util.tree_leaves(tree))


def temporary_dirs(workdir: str) -> list[str]:
    return glob.glob(os.path.join(workdir, checkpoint.SUBDIR, f"*{checkpoint.TMP_MARKER}*"))


class OneTrainedRun(absltest.TestCase):
    """One epoch of the tiny net, a checkpoint at every step (the last ``ckpt.keep`` kept);
    each test works on its own copy."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.trained = os.path.join(cls.tmp, "trained")
        loop.train(config_for(), cls.trained)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def copy_of_run(self) -> str:
        workdir = os.path.join(self.create_tempdir().full_path, "run")
        shutil.copytree(self.trained, workdir)
        return workdir


class NonFiniteUpdateTest(OneTrainedRun):
    def test_an_overflowing_update_is_never_saved(self):
        workdir = self.copy_of_run()
        self.assertEqual(max(checkpoint.available_steps(workdir)), STEPS_PER_EPOCH)
        # From a finite state with a finite loss, SGD at 3e38 overflows float32 in the update.
        config = config_for(**{"optim.learning_rate": 3e38, "schedule.num_epochs": 2})
        with self.assertRaisesRegex(
            loop.NonFiniteLossError,
            f"after step {STEPS_PER_EPOCH + 1};.* last good checkpoint is step {STEPS_PER_EPOCH} ",
        ):
            loop.train(config, workdir)
        steps = checkpoint.available_steps(workdir)
        self.assertEqual(max(steps), STEPS_PER_EPOCH)
        for step in steps:
            self.assertTrue(all_finite(saved_trees(workdir, step)), f"step {step}")


class UnreadableCheckpointTest(OneTrainedRun):
    def damage_newest(self, workdir: str, how: str) -> int:
        newest = max(checkpoint.available_steps(workdir))
        pattern = os.path.join(workdir, checkpoint.SUBDIR, str(newest), "params", "**", "d", "*")
        biggest = max(glob.glob(pattern, recursive=True), key=os.path.getsize)
        if how == "truncate":
            os.truncate(biggest, os.path.getsize(biggest) // 2)
        else:
            os.remove(biggest)
        return newest

    def assert_one_fallback_line(self, logs, bad: int, good: int) -> None:
        lines = [m for m in logs.output if "is unreadable" in m]
        self.assertLen(lines, 1, logs.output)
        self.assertNotIn("\n", lines[0])
        self.assertLess(len(lines[0]), 600)
        self.assertIn(f"Checkpoint step {bad} in ", lines[0])
        self.assertIn(f"falling back to step {good}", lines[0])

    def test_evaluation_falls_back_with_one_line(self):
        for how in ("truncate", "delete"):
            with self.subTest(how):
                workdir = self.copy_of_run()
                bad = self.damage_newest(workdir, how)
                with self.assertLogs("absl", "WARNING") as logs:
                    params, step, _ = checkpoint.restore_params(workdir)
                self.assertEqual(step, bad - 1)
                self.assert_one_fallback_line(logs, bad, bad - 1)
                config = config_for()
                mesh = sharding.make_mesh(config.mesh)
                with self.assertLogs("absl", "WARNING"):
                    net = runner.load_net(workdir, "latest", mesh, config)
                self.assertEqual(net.step, bad - 1)
                # An explicit step is not replaced by another: one line naming it and the cause.
                with self.assertRaisesRegex(
                    checkpoint.UnreadableCheckpointError, rf"^Checkpoint step {bad} in .*\(.+\)"
                ):
                    checkpoint.restore_params(workdir, bad)

    def test_training_resumes_from_the_newest_step_that_reads(self):
        workdir = self.copy_of_run()
        bad = self.damage_newest(workdir, "truncate")
        with self.assertLogs("absl", "INFO") as logs:
            loop.train(config_for(**{"schedule.num_epochs": 2}), workdir)
        self.assert_one_fallback_line(logs, bad, bad - 1)
        self.assertTrue(any(f"Resumed from step {bad - 1}" in m for m in logs.output))
        self.assertTrue(os.path.isdir(os.path.join(workdir, checkpoint.CORRUPT_SUBDIR, str(bad))))
        self.assertEqual(max(checkpoint.available_steps(workdir)), 2 * STEPS_PER_EPOCH)


class ChangedConfigResumeTest(OneTrainedRun):
    def test_another_net_is_refused_in_one_line_and_nothing_is_moved(self):
        workdir = self.copy_of_run()
        steps = checkpoint.available_steps(workdir)
        with self.assertRaises(checkpoint.IncompatibleCheckpointError) as raised:
            loop.train(config_for(**{"model.fc_width": 8}), workdir)
        message = str(raised.exception)
        self.assertIn(f"step {steps[-1]} in {workdir}", message)
        self.assertIn("model.fc_width", message)
        self.assertNotIn("unreadable", message)  # today: every step reported unreadable
        self.assertEqual(checkpoint.available_steps(workdir), steps)
        self.assertFalse(os.path.exists(os.path.join(workdir, checkpoint.CORRUPT_SUBDIR)))

    def test_another_data_order_is_named_when_resuming(self):
        workdir = self.copy_of_run()
        with self.assertLogs("absl", "WARNING") as logs:
            loop.train(config_for(**{"schedule.num_epochs": 2, "input.shuffle_seed": 7}), workdir)
        (line,) = [m for m in logs.output if "differs from the one it was trained with" in m]
        self.assertIn("input.shuffle_seed 0 -> 7", line)
        self.assertIn("schedule.num_epochs 1.0 -> 2.0", line)
        self.assertEqual(max(checkpoint.available_steps(workdir)), 2 * STEPS_PER_EPOCH)

    def resumed_on(self, workdir: str, **changes) -> None:
        """Trains the copy a second epoch on the same data, as described with ``changes``."""
        real = data.dataset_info

        def changed(config):
            return dataclasses.replace(real(config), **changes)

        with mock.patch.object(data, "dataset_info", changed):
            loop.train(config_for(**{"schedule.num_epochs": 2}), workdir)

    def test_a_dataset_with_other_classes_is_refused_when_resuming(self):
        workdir = self.copy_of_run()
        steps = checkpoint.available_steps(workdir)
        names = list(checkpoint.restore_params(workdir)[2]["class_names"])
        renamed = [*names[:2], "zebra", *names[3:]]  # a class folder renamed: labels move
        with self.assertRaisesRegex(
            checkpoint.IncompatibleCheckpointError,
            f"other classes than the dataset now has \\(class 2: {names[2]!r} there, 'zebra' "
            "here\\): resuming would train each output on another class",
        ):
            self.resumed_on(workdir, class_names=renamed)
        self.assertEqual(checkpoint.available_steps(workdir), steps)

    def test_a_changed_mean_warns_and_keeps_the_trained_convention(self):
        workdir = self.copy_of_run()
        trained = checkpoint.restore_params(workdir)[2]["input_convention"]
        with self.assertLogs("absl", "WARNING") as logs:
            self.resumed_on(workdir, mean_rgb=np.float32([1.0, 2.0, 3.0]))
        self.assertTrue(any("mean RGB has changed" in line for line in logs.output))
        last = max(checkpoint.available_steps(workdir))
        self.assertEqual(last, 2 * STEPS_PER_EPOCH)
        self.assertEqual(checkpoint.restore_params(workdir, last)[2]["input_convention"], trained)

    def test_another_batch_size_is_refused_in_one_line(self):
        workdir = self.copy_of_run()
        config = config_for(**{"input.batch_size": 8})  # today: epochs miscounted
        with self.assertRaisesRegex(
            checkpoint.IncompatibleCheckpointError, "batches of 16; with batches of 8"
        ):
            loop.train(config, workdir)


class RecordedConfigTest(absltest.TestCase):
    def test_a_key_added_since_the_checkpoint_is_no_change(self):
        """A checkpoint saved before input.eval_max_batch_pixels existed, resumed with its
        default (the old behaviour): no "config differs" warning; another value is named."""
        config = fixtures.tiny_config(with_data=False)
        saved = checkpoint.jsonable(config.to_dict())
        del saved["input"]["eval_max_batch_pixels"]
        with self.assertNoLogs("absl", "WARNING"):
            loop.check_resumable(saved, config, "the run")
        config.input.eval_max_batch_pixels = 1000
        with self.assertLogs("absl", "WARNING") as logs:
            loop.check_resumable(saved, config, "the run")
        self.assertIn("input.eval_max_batch_pixels None -> 1000", logs.output[0])


def disk_full_at(step: int):
    """Makes Orbax's Python-side writes into step ``step``'s temporary directory fail as on a
    full disk (TensorStore's array writes cannot be patched from Python)."""
    real_write_text = epath.Path.write_text

    def write_text(path, *args, **kwargs):
        if f"{os.sep}{step}{checkpoint.TMP_MARKER}" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write_text(path, *args, **kwargs)

    return mock.patch.object(epath.Path, "write_text", write_text)


class FailedSaveTest(absltest.TestCase):
    def test_a_failed_save_fails_the_run_at_that_save(self):
        workdir = self.create_tempdir().full_path
        config = config_for(**{"ckpt.every_steps": 2})
        with (
            disk_full_at(4),
            self.assertRaisesRegex(
                checkpoint.SaveError, r"^Saving checkpoint step 4 to .*No space left on device"
            ),
        ):
            loop.train(config, workdir)
        self.assertEqual(checkpoint.available_steps(workdir), [2])  # step 6 was never started
        self.assertEmpty(temporary_dirs(workdir))

    def test_the_resumed_run_logs_each_step_once(self):
        """Steps 3 and 4 were logged, then step 4's save failed: resumed from step 2, they were
        logged again after them (two values for one step in metrics.jsonl)."""
        workdir = self.create_tempdir().full_path
        config = config_for(**{"ckpt.every_steps": 2, "log_every_steps": 1})
        with disk_full_at(4), self.assertRaises(checkpoint.SaveError):
            loop.train(config, workdir)
        loop.train(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            steps = [(json.loads(line)["step"], "val_loss" in line) for line in f]
        self.assertEqual(steps, [(step, False) for step in range(1, 7)] + [(6, True)])

    @pytest.mark.slow
    def test_the_last_line_says_why(self):
        workdir = self.create_tempdir().full_path
        result = run_trainer(workdir, {"ckpt.every_steps": 2}, disk_full_at_step=4)
        self.assertNotEqual(result.returncode, 0)
        last_line = result.stderr.strip().splitlines()[-1]
        self.assertRegex(last_line, r"^SaveError: Saving checkpoint step 4 to .*No space left on")
        # Before it, Orbax's errors in one line each: it was ~500 lines, 29 tracebacks through
        # Orbax's threads and asyncio's "Event loop is closed".
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("No space left on device", result.stderr.replace(last_line, ""))
        self.assertEqual(checkpoint.available_steps(workdir), [2])
        self.assertEmpty(temporary_dirs(workdir))


# A trainer process as launch.py runs one (cli.run_or_exit), on the tiny config and the shared
# built-in dataset: argv = data_dir, workdir, JSON overrides, step whose save fails (0: none).
TRAINER = """
import json, sys
from tests import fixtures, test_train_faults
from vgg_jax.tools import cli
config = test_train_faults.config_for(with_data=False, **json.loads(sys.argv[3]))
config.input.data_dir = sys.argv[1]
if int(sys.argv[4]):
    test_train_faults.disk_full_at(int(sys.argv[4])).start()
cli.run_or_exit("train", config, sys.argv[2])
"""


def trainer_args(workdir: str, values: dict, disk_full_at_step: int = 0) -> list[str]:
    data_dir = fixtures.builtin_data_dir()
    # The injected write fault leaves Orbax objects for the garbage collector, whose warnings
    # Python prints at exit, after our last line: not the project's output.
    python = [sys.executable, "-W", "ignore"]
    return [*python, "-c", TRAINER, data_dir, workdir, json.dumps(values)] + [
        str(disk_full_at_step)
    ]


def run_trainer(workdir: str, values: dict, disk_full_at_step: int = 0):
    args = trainer_args(workdir, values, disk_full_at_step)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


class FailedSaveOutputTest(absltest.TestCase):
    def test_orbax_errors_caused_by_the_os_lose_only_their_traceback(self):
        def record(error: BaseException, path: str = "/site-packages/orbax/checkpoint/x.py"):
            try:
                raise error
            except BaseException:
                exc_info = sys.exc_info()
            return logging.LogRecord(
                "absl", logging.ERROR, path, 1, "failed: %s", (error,), exc_info
            )

        keep = checkpoint.ExpectedOrbaxWarnings()
        full = record(OSError(errno.ENOSPC, "No space left on device"))
        self.assertTrue(keep.filter(full))
        self.assertIsNone(full.exc_info)  # one line: the message names the OS error
        try:
            raise ValueError("Orbax's own bug") from OSError(errno.EACCES, "Permission denied")
        except ValueError as error:
            wrapped = record(error)
        self.assertTrue(keep.filter(wrapped))
        self.assertIsNone(wrapped.exc_info)
        for kept in (record(ValueError("Orbax's own bug")), record(OSError(), "/elsewhere/x.py")):
            self.assertTrue(keep.filter(kept))
            self.assertIsNotNone(kept.exc_info)  # a traceback that says something stays

    def test_a_full_disk_reported_by_tensorstore_is_said_first_in_one_line(self):
        """A real full disk (a 2 MB tmpfs) fails the array writes in TensorStore, whose status
        Orbax raises as a ValueError: the SaveError line was cut at 300 characters before "No
        space left on device", and four Orbax errors kept their tracebacks (338 lines)."""
        tmp = "/w/checkpoints/1.orbax-checkpoint-tmp/opt_state.orbax-checkpoint-tmp/ocdbt.process_0"
        status = (
            f'RESOURCE_EXHAUSTED: Error writing "1.count/0" in OCDBT database at local file '
            f'"{tmp}/": Failed writing: "{tmp}/d/a21b893c41df4cb59fcb90a218114a42": Failed to '
            "write 435174 bytes to file 8: No space left on device [os_error_code='28']"
        )
        saver = checkpoint.Checkpointer(self.create_tempdir().full_path)
        saver._writing = 1
        try:
            with (
                self.assertRaisesRegex(
                    checkpoint.SaveError,
                    r"^Saving checkpoint step 1 to \S+ failed: \[Errno 28\] No space left on "
                    rf"device: '{tmp}/d/a21b893c41df4cb59fcb90a218114a42'$",
                ),
                saver._save_errors(),
            ):
                raise ValueError(status)
        finally:
            saver._failed = False
            saver.close()
        try:
            raise ValueError(status)
        except ValueError:
            exc_info = sys.exc_info()
        record = logging.LogRecord(
            "absl", logging.ERROR, "/site-packages/orbax/checkpoint/x.py", 1, "%s", ("x",), exc_info
        )
        self.assertTrue(checkpoint.ExpectedOrbaxWarnings().filter(record))
        self.assertIsNone(record.exc_info)

    def test_callbacks_into_a_closed_event_loop_are_not_printed(self):
        closed = asyncio.new_event_loop()
        closed.close()
        try:
            closed.call_soon_threadsafe(print)
        except RuntimeError as error:
            late = error
        other = RuntimeError("Event loop is closed")  # raised elsewhere: not asyncio's check
        reported = []
        with mock.patch.object(sys, "unraisablehook", reported.append):
            checkpoint._install_closed_loop_filter()
            checkpoint._install_closed_loop_filter()  # once: not wrapped twice
            for error in (late, other):
                sys.unraisablehook(
                    types.SimpleNamespace(
                        exc_type=type(error),
                        exc_value=error,
                        exc_traceback=error.__traceback__,
                        err_msg=None,
                        object=None,
                    )
                )
        self.assertEqual([r.exc_value for r in reported], [other])


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a flush or close raises it


class FullDiskOutputTest(absltest.TestCase):
    """A full disk met by a write of results, metrics or the lock: one line naming the file.
    It was a chained traceback ending in "OSError: [Errno 28] No space left on device", no file
    named (a flush or a close names none), after the evaluation's table or at a trainer's start."""

    def test_results_not_written_name_the_file_and_leave_nothing(self):
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "results.json")
        with (
            self.assertRaisesRegex(
                writers.WriteError,
                rf"^Could not write {path}: No space left on device \[Errno 28\]$",
            ),
            writers.atomic_open(path) as f,
        ):
            f.write("{}")
            _no_space()
        self.assertEqual(os.listdir(directory), [])

    def test_two_writers_of_one_file_at_once_each_write_whole(self):
        # Today: one "<path>.tmp" for both; the second open truncated the first's, and the
        # first's rename then failed (its temporary already renamed away).
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "weights.npz")
        with writers.atomic_open(path) as first, writers.atomic_open(path) as second:
            first.write("first, whole")
            second.write("second")
        with open(path) as f:
            self.assertEqual(f.read(), "first, whole")  # the last to finish, whole
        self.assertEqual(os.listdir(directory), ["weights.npz"])

    def test_a_killed_writers_temporary_is_removed_by_the_next_write(self):
        """Each writer's temporary has its own name, so the next writer no longer overwrote a
        killed one's: it stayed for good (a killed export: a whole net's size)."""
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "weights.npz")
        dead = subprocess.Popen(["true"])
        dead.wait()
        host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())  # as the names have it
        left = {
            "killed": f"weights.npz.{host}.{dead.pid}.0123abcd.tmp",
            "killed_index": f"weights.npz.{host}.{dead.pid}.0123abcd.tmp.npz",
            "running": f"weights.npz.{host}.{os.getpid()}.0123abcd.tmp",
            "other_host": f"weights.npz.other-{host}.{dead.pid}.0123abcd.tmp",
            "other_file": f"weights.npz.old.{host}.{dead.pid}.0123abcd.tmp",
        }
        for name in left.values():
            with open(os.path.join(directory, name), "w") as f:
                f.write("part of a net")
        with writers.atomic_open(path) as f:
            f.write("a net")
        kept = [name for key, name in left.items() if not key.startswith("killed")]
        self.assertCountEqual(os.listdir(directory), ["weights.npz", left["killed_index"], *kept])
        self.assertEndsWith(writers.temporary_path(path, ".npz"), ".tmp.npz")
        self.assertCountEqual(os.listdir(directory), ["weights.npz", *kept])

    def test_no_process_is_signalled_on_windows(self):
        """On Windows os.kill(pid, 0) is TerminateProcess(pid): the liveness probe of a leftover
        temporary's writer killed that pid's process (a live writer, or any that reused it)."""
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "weights.npz")
        host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
        left = f"weights.npz.{host}.{os.getpid()}.0123abcd.tmp"
        with open(os.path.join(directory, left), "w") as f:
            f.write("part of a net")
        with (
            mock.patch.object(writers.os, "name", "nt"),
            mock.patch.object(writers.os, "kill") as kill,
        ):
            writers.temporary_path(path)
        kill.assert_not_called()
        self.assertIn(left, os.listdir(directory))  # whose writer may run: kept

    def test_metrics_not_written_name_the_file_once(self):
        directory = self.create_tempdir().full_path
        writer = writers.MetricWriter(directory, enabled=True)
        with (
            mock.patch.object(writer._jsonl, "flush", _no_space),
            self.assertRaisesRegex(
                writers.WriteError, r"^Could not write \S+/metrics.jsonl: No space left on device"
            ),
        ):
            writer.write_scalars(1, {"train_loss": 2.0})
        with mock.patch.object(writer._jsonl, "write", _no_space):
            writer.close()  # the error was said: closing does not raise it again

    def test_a_line_cut_short_is_not_glued_to_the_next_runs(self):
        """A full disk cuts a metrics line where its last block ends; the resumed run appended
        its first line to it, a line no JSON reader parses (the study's report stopped there)."""
        directory = self.create_tempdir().full_path
        path = os.path.join(directory, "metrics.jsonl")
        for before in ('{"step": 1}\n{"step": 2, "train_lo', '{"step": 2, "tr', ""):
            with open(path, "w") as f:
                f.write(before)
            with self.assertLogs("absl", "WARNING") if before else contextlib.nullcontext():
                writer = writers.MetricWriter(directory, enabled=True)
            writer.write_scalars(2, {"train_loss": 1.5})
            writer.close()
            with open(path) as f:
                steps = [json.loads(line)["step"] for line in f]
            self.assertEqual(steps, [1, 2] if before.startswith('{"step": 1}') else [2])

    def test_tensorboard_events_not_written_name_the_directory(self):
        status = (
            "{{function_node __wrapped__FlushSummaryWriter_device_/job:localhost/replica:0/task:0"
            "/device:CPU:0}} /w/tensorboard/events.out.tfevents.1.vm.1.0.v2; No space left on "
            "device\n\tFailed to flush 1 events to /w/tensorboard/events.out.tfevents.1.vm.1.0.v2"
        )
        error = types.new_class("ResourceExhaustedError", (Exception,))(status)
        type(error).__module__ = "tensorflow.python.framework.errors_impl"
        self.assertEqual(
            str(writers.write_error(error, "/w/tensorboard")),
            "Could not write /w/tensorboard: No space left on device [Errno 28]",
        )

    def test_a_lock_not_written_names_it_and_is_released(self):
        workdir = self.create_tempdir().full_path
        with (
            mock.patch.object(os, "pwrite", _no_space),
            self.assertRaisesRegex(
                writers.WriteError,
                rf"^Could not write {workdir}/train.lock: No space left on device",
            ),
            lock.hold(workdir),
        ):
            pass
        with lock.hold(workdir):  # released
            pass

    def test_the_command_line_says_it_in_one_line(self):
        for error in (
            writers.WriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/results.md"),
            OSError(errno.EROFS, os.strerror(errno.EROFS), "/w/x"),  # a write not wrapped
        ):
            with (
                mock.patch.object(cli, "run", side_effect=error),
                self.assertRaises(SystemExit) as stop,
            ):
                cli.run_or_exit("evaluate", config_for(with_data=False), "/w")
            self.assertEqual(str(stop.exception.code), f"{type(error).__name__}: {error}")
        with (
            mock.patch.object(cli, "run", side_effect=OSError(errno.EBADF, "bug")),
            self.assertRaises(OSError),  # not the storage's fault: the traceback says where
        ):
            cli.run_or_exit("evaluate", config_for(with_data=False), "/w")


class WorkdirLockTest(absltest.TestCase):
    def test_a_second_holder_in_one_process_is_refused(self):
        workdir = self.create_tempdir().full_path
        with (
            lock.hold(workdir),
            self.assertRaisesRegex(
                lock.WorkdirBusyError, f"in use by trainer pid {os.getpid()} on host "
            ),
            lock.hold(workdir),
        ):
            pass
        with lock.hold(workdir):  # released on exit
            pass

    @pytest.mark.slow
    def test_a_busy_workdir_is_refused_and_a_killed_trainers_lock_is_not(self):
        workdir = self.create_tempdir().full_path
        lock_path = os.path.join(workdir, lock.LOCK_FILE)
        first = subprocess.Popen(
            trainer_args(workdir, {"schedule.num_epochs": 100}),
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 120
            while not (os.path.exists(lock_path) and epath.Path(lock_path).read_text()):
                self.assertIsNone(first.poll(), "the first trainer exited early")
                self.assertLess(time.time(), deadline)
                time.sleep(0.1)
            started = time.time()
            second = run_trainer(workdir, {"schedule.num_epochs": 100})
            self.assertNotEqual(second.returncode, 0)
            self.assertLess(time.time() - started, 60)  # before any data preparation or compile
            self.assertRegex(
                second.stderr.strip().splitlines()[-1],
                rf"^WorkdirBusyError: Workdir .* is in use by trainer pid {first.pid} on host "
                f"{socket.gethostname()}",
            )
            self.assertIsNone(first.poll())  # the first one trains on
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        restarted = run_trainer(workdir, {"schedule.num_epochs": 1})
        self.assertEqual(restarted.returncode, 0, restarted.stderr[-3000:])
