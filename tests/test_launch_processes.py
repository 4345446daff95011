"""launch.py's multi-process jobs started wrongly: a clear error in seconds, never a silent run."""

import os
import socket
import subprocess
import sys
import time
import types
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest
from absl.testing import absltest

from experiments import demo
from tests import fixtures, testdata
from vgg_jax import checkpoint, data, models, processes, sharding
from vgg_jax.tools import cli
from vgg_jax.training import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch_processes(
    per_process: list[list[str]],
    workdir: str,
    data: list[str] | None = None,
    device_counts: list[int] | None = None,
    homes: list[str] | None = None,
) -> list[tuple[int, str]]:
    """Starts one launch.py process of a job per ``per_process`` entry (that process's extra
    flags) and returns each one's ``(exit status, stderr)``. ``data``: the flags naming the
    dataset (default: the tiny built-in one); ``device_counts``: each process's CPU devices
    (default: 2 each); ``homes``: each process's HOME (``~`` in a config value is another
    directory on each, as on hosts that do not share it)."""
    device_counts = device_counts or [2] * len(per_process)
    port = fixtures.free_port()
    if data is None:
        data = [
            f"--config.input.data_dir={fixtures.builtin_data_dir()}",
            "--config.input.builtin_size=tiny",
        ]
    common = [
        sys.executable,
        "launch.py",
        "--config=experiments/demo.py",
        f"--workdir={workdir}",
        "--mode=train",
        "--config.model.width=0.0625",
        "--config.model.fc_width=16",
        "--config.input.batch_size=16",
        "--config.input.eval_batch_size=16",
        *data,
        "--config.schedule.num_epochs=1",
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={len(per_process)}",
    ]
    started = [
        subprocess.Popen(
            [*common, f"--process_id={i}", *extra],
            cwd=ROOT,
            env=fixtures.host_devices_env(device_counts[i]) | ({"HOME": homes[i]} if homes else {}),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, extra in enumerate(per_process)
    ]
    return [fixtures.finish(process, 240)[::2] for process in started]


@pytest.mark.slow
class MultiProcessStartTest(absltest.TestCase):
    def test_processes_with_different_configs_stop_naming_the_keys(self):
        """Process 1 given another learning rate and shuffle seed trained to the end (exit 0)
        with its own rate on its devices and its own data order in its share of each batch."""
        workdir = self.create_tempdir().full_path
        started = time.perf_counter()
        results = launch_processes(
            [[], ["--config.optim.learning_rate=0.01", "--config.input.shuffle_seed=7"]], workdir
        )
        for returncode, stderr in results:
            self.assertEqual(returncode, 1, stderr[-3000:])
            last = stderr.strip().splitlines()
            message = "\n".join(last[-2:])
            self.assertIn("process 1: ", message)
            self.assertIn("input.shuffle_seed 0 -> 7", message)
            self.assertIn("optim.learning_rate 0.001 -> 0.01", message)
            self.assertNotIn("Traceback", stderr)
        self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))
        self.assertLess(time.perf_counter() - started, 120)

    def test_hosts_with_different_copies_of_the_data_stop(self):
        """Each host's own copy of an image folder (``input.folder`` may differ between hosts),
        one of them with an image more: 8 and 9 training examples, two steps of 4 either way.
        On the per-step ``tf.data`` path (ImageNet's; here ``decoded_cache_mb=0``) each process
        took its share of every batch from its own order: the job ran to the end, exit 0, its
        epochs neither the one copy's nor the other's. (The decoded in-memory path aborted in
        a gloo "collective mismatch" when JAX's ``device_put`` found the buffers differ.)"""
        tmp = self.create_tempdir().full_path
        folders = [os.path.join(tmp, "host0"), os.path.join(tmp, "host1")]
        for folder in folders:
            testdata.write_image_folder(folder, {"train": 4, "validation": 2}, ["ant", "bee"])
        image, _ = testdata.builtin.draw_example(0, "train", 99)
        with open(os.path.join(folders[1], "train", "ant", "extra.jpg"), "wb") as f:
            f.write(testdata.jpeg(image))
        workdir = os.path.join(tmp, "run")
        shared = [
            "--config.input.dataset=image_folder",
            "--config.model.num_classes=2",
            "--config.input.batch_size=4",
            "--config.input.eval_batch_size=4",
            "--config.input.decoded_cache_mb=0",
        ]
        results = launch_processes(
            [[f"--config.input.folder={f}", f"--config.input.data_dir={f}_tfds"] for f in folders],
            workdir,
            data=shared,
        )
        for returncode, stderr in results:
            self.assertEqual(returncode, 1, stderr[-3000:])
            self.assertIn("copies of the dataset differ", stderr)
            line = stderr.strip().splitlines()[-1]
            self.assertTrue(line.startswith("  process 1: "), line)
            self.assertIn("train examples 8 (records", line)
            self.assertIn("-> 9 (records", line)
            self.assertNotIn("Traceback", stderr)
        self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints")))

    def test_processes_with_different_device_counts_stop_in_one_line(self):
        """2 and 3 devices: before, a traceback (``cannot reshape array of size 5 into shape
        (2,2)``) from JAX's multi-host utilities on one process and an abort on the other."""
        workdir = self.create_tempdir().full_path
        results = launch_processes([[], []], workdir, device_counts=[2, 3])
        for returncode, stderr in results:
            self.assertEqual(returncode, 1, stderr[-3000:])
            self.assertIn(
                "hold different numbers of devices (process 0: 2, process 1: 3)",
                stderr.strip().splitlines()[-1],
            )
            self.assertNotIn("Traceback", stderr)

    def test_a_busy_workdir_stops_every_process(self):
        """Process 0 alone found the lock taken and raised; process 1 waited for it in the
        first collective, and both ended 300 s later in JAX's shutdown barrier (an abort)."""
        workdir = self.create_tempdir().full_path
        started = time.perf_counter()
        with lock.hold(workdir):  # this test process is the running trainer
            results = launch_processes([[], []], workdir)
        for returncode, stderr in results:
            self.assertEqual(returncode, 1, stderr[-3000:])
            self.assertIn(
                f"WorkdirBusyError: Workdir {workdir} is in use by trainer pid {os.getpid()}",
                stderr.strip().splitlines()[-1],
            )
        self.assertLess(time.perf_counter() - started, 120)

    def test_a_host_whose_data_cannot_be_prepared_stops_every_process(self):
        """Process 1's folder missing on its host: it stopped with its one line, while process 0
        waited for it in the processes' data check until JAX's coordination service aborted
        both 5 minutes later (exit 134, a page of gRPC errors, nothing on process 0 about the
        data). The same with ``--mode=evaluate`` and a host whose copy was not prepared."""
        tmp = self.create_tempdir().full_path
        root = os.path.join(tmp, "host0")
        testdata.write_image_folder(root, {"train": 4, "validation": 2}, ["ant", "bee"])
        missing = os.path.join(tmp, "host1")
        shared = [
            "--config.input.dataset=image_folder",
            "--config.model.num_classes=2",
            "--config.input.batch_size=4",
            "--config.input.eval_batch_size=4",
        ]
        started = time.perf_counter()
        results = launch_processes(
            [
                [f"--config.input.folder={f}", f"--config.input.data_dir={f}_tfds"]
                for f in (root, missing)
            ],
            os.path.join(tmp, "run"),
            data=shared,
        )
        self.assertLess(time.perf_counter() - started, 200)
        lines = [stderr.strip().splitlines()[-1] for _, stderr in results]
        for returncode, stderr in results:
            self.assertEqual(returncode, 1, stderr[-3000:])
            self.assertNotIn("Traceback", stderr)
        self.assertIn(f"Image folder {missing} does not exist", lines[1])
        self.assertIn(
            "Preparing the dataset failed on another process of this job: process 1: ", lines[0]
        )
        self.assertIn(f"Image folder {missing} does not exist", lines[0])

    def test_a_config_problem_of_one_process_stops_every_process(self):
        """Process 1 given a --workdir under a file (a problem only its config check saw): it
        stopped with its "Config error" while process 0 went on into the next collective, and
        both hung until JAX aborted them 5 minutes later."""
        tmp = self.create_tempdir().full_path
        blocked = os.path.join(tmp, "a_file")
        with open(blocked, "w"):
            pass
        results = launch_processes(
            [[], [f"--workdir={blocked}/run"]], os.path.join(tmp, "run"), device_counts=[1, 1]
        )
        problem = f"--workdir={blocked}/run: {blocked} above it is a file, not a directory"
        lines = []
        for returncode, stderr in results:
            self.assertEqual(returncode, 1, stderr[-3000:])
            self.assertNotIn("Traceback", stderr)
            lines.append(stderr.strip().splitlines()[-1].strip())
        self.assertEqual(lines[1], problem)
        self.assertEqual(
            lines[0],
            "The config check failed on another process of this job: process 1: ConfigError: "
            + problem,
        )

    def test_an_init_from_source_on_one_host_only_stops_every_process(self):
        """init_from.workdir (one config text, ``~/src``) holding the source run on process
        0's host only: process 1's config check stopped it alone, process 0's listed the
        source's checkpoints with Orbax (a collective) that met process 1's next one, and both
        aborted (exit 134, a gloo "collective mismatch")."""
        tmp = self.create_tempdir().full_path
        homes = [os.path.join(tmp, "host0"), os.path.join(tmp, "host1")]
        for home in homes:
            os.makedirs(home)
        config = demo.get_config()
        config.model.update(width=0.0625, fc_width=16)
        model = models.build_model(config.model, config.input.crop_size)
        params = jax.tree_util.tree_map(
            lambda leaf: np.zeros(leaf.shape, np.float32), models.abstract_params(model)
        )
        checkpoint.save_params(os.path.join(homes[0], "src"), params, step=1, config=config)
        source = ["--config.init_from.mode=full", "--config.init_from.workdir=~/src"]
        results = launch_processes(
            [source, source], os.path.join(tmp, "run"), device_counts=[1, 1], homes=homes
        )
        for returncode, stderr in results:
            self.assertEqual(returncode, 1, stderr[-3000:])
            self.assertNotIn("Traceback", stderr)
            self.assertIn(
                "The processes of this job do not see the same checkpoints (each compared with "
                "process 0; every host needs --workdir and init_from.workdir on storage all of "
                "them see): process 1: init_from.workdir sees its checkpoints/ -> does not see "
                "its checkpoints/",
                stderr.strip().splitlines()[-1],
            )

    def test_a_workdir_not_shared_between_hosts_stops_every_process(self):
        """Each host given a workdir on its own disk (here: process 1 another directory)
        trained to the end, then hung in the first checkpoint save (each process had written
        its part into its own directory, nothing committed) until both aborted 10 min later:
        the whole run lost."""
        tmp = self.create_tempdir().full_path
        workdir, elsewhere = os.path.join(tmp, "run"), os.path.join(tmp, "host1_run")
        os.makedirs(elsewhere)
        results = launch_processes([[], [f"--workdir={elsewhere}"]], workdir)
        for returncode, stderr in results:
            self.assertEqual(returncode, 1, stderr[-3000:])
            self.assertIn("WorkdirNotSharedError: The processes of this job must share", stderr)
            self.assertIn(
                f"process 1 on host {socket.gethostname()}: --workdir={elsewhere} lacks "
                "process 0's train.lock",
                stderr.strip().splitlines()[-1],
            )
            self.assertNotIn("Traceback", stderr)
        for directory in (workdir, elsewhere):
            self.assertFalse(os.path.exists(os.path.join(directory, "checkpoints")))


# Each process of a 2-process job restores a checkpoint's parameters and prints their sum.
RESTORE = """
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from vgg_jax import checkpoint
params, step, _ = checkpoint.restore_params(sys.argv[3])
total = sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree_util.tree_leaves(params))
print("restored", step, total)
"""


@pytest.mark.slow
class MultiProcessRestoreTest(absltest.TestCase):
    def test_every_process_reads_a_one_process_checkpoint(self):
        """What ``--mode=evaluate`` and ``init_from`` read on several processes. A checkpoint
        saved by one process (on its device 0) came back on process 1 as an array with no shard
        there: every step "unreadable", UnreadableCheckpointError on process 1 while process 0
        waited for it until JAX's 300 s shutdown barrier aborted both."""
        workdir = self.create_tempdir().full_path
        # As training saves it: on the one-device mesh of a one-device run.
        one_device = ml_collections.ConfigDict(dict(data=1, model=1))
        mesh = sharding.make_mesh(one_device, [jax.devices()[0]])
        kernel = jax.device_put(np.arange(6.0).reshape(2, 3), sharding.replicated(mesh))
        checkpoint.save_params(workdir, {"fc": {"kernel": kernel}}, 7)
        address = f"localhost:{fixtures.free_port()}"
        started = [
            subprocess.Popen(
                [sys.executable, "-c", RESTORE, address, str(i), workdir],
                cwd=ROOT,
                env=fixtures.host_devices_env(1),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        for process in started:
            returncode, stdout, stderr = fixtures.finish(process, 120)
            self.assertEqual(returncode, 0, stderr[-3000:])
            self.assertIn("restored 7 15.0", stdout)


class ConfigDifferencesTest(absltest.TestCase):
    def test_names_each_differing_key_and_ignores_host_paths(self):
        config = fixtures.tiny_config(with_data=False)
        other = fixtures.tiny_config(
            with_data=False, **{"optim.learning_rate": 0.5, "input.data_dir": "/x"}
        )
        lines = processes.differences(
            [
                cli._flat_settings("train", config),
                cli._flat_settings("train", config),
                cli._flat_settings("evaluate", other),
            ]
        )
        self.assertEqual(
            lines,
            [
                f'process 2: mode "train" -> "evaluate"; optim.learning_rate '
                f"{config.optim.learning_rate} -> 0.5"
            ],
        )

    def test_device_counts_must_be_equal(self):
        def devices(*counts: int) -> list[types.SimpleNamespace]:
            return [
                types.SimpleNamespace(process_index=p)
                for p, n in enumerate(counts)
                for _ in range(n)
            ]

        self.assertIsNone(processes.device_count_problem(devices(4)))
        self.assertIsNone(processes.device_count_problem(devices(2, 2)))
        problem = processes.device_count_problem(devices(8, 8, 7))
        self.assertIn("process 0: 8, process 1: 8, process 2: 7", problem)


class AgreedStepTest(absltest.TestCase):
    """``processes.agreed``: a step that fails on one process stops every process (simulated:
    the collective answers for the other process)."""

    def gathered(self, other: str | None):
        return mock.patch.object(processes, "gather_json", side_effect=lambda mine: [mine, other])

    def test_the_others_name_the_failed_process(self):
        config = fixtures.tiny_config()
        problem = "FileNotFoundError: Dataset 'image_folder' is not prepared in /host1/tfds."
        expected = (
            "Reading the prepared dataset failed on another process of this job: process 1: "
            + problem
        )
        with (
            mock.patch.object(jax, "process_count", return_value=2),
            self.gathered(problem),
            self.assertRaisesRegex(data.DatasetError, expected),
        ):
            processes.check_same_data(config)

    def test_the_failed_process_tells_the_others_then_raises_its_own_error(self):
        def fail():
            raise FileNotFoundError("no copy here")

        with (
            mock.patch.object(jax, "process_count", return_value=2),
            self.gathered(None) as told,
            self.assertRaisesRegex(FileNotFoundError, "no copy here"),
        ):
            processes.agreed("Preparing the dataset", fail)
        told.assert_called_once_with("FileNotFoundError: no copy here")

    def test_an_interrupted_step_tells_the_others_too(self):
        """A KeyboardInterrupt (or SystemExit) on one process passed ``agreed``'s ``except
        Exception`` without the collective: the others waited for it until JAX aborted them."""

        def interrupted():
            raise KeyboardInterrupt

        with (
            mock.patch.object(jax, "process_count", return_value=2),
            self.gathered(None) as told,
            self.assertRaises(KeyboardInterrupt),
        ):
            processes.agreed("Preparing the dataset", interrupted)
        told.assert_called_once_with("KeyboardInterrupt")


class CoordinatorPortTest(absltest.TestCase):
    def listening(self) -> tuple[socket.socket, int]:
        """A socket listening on a free port of every interface, as a running job's coordinator
        or another program would."""
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        return holder, holder.getsockname()[1]

    def test_a_port_in_use_is_named_before_jax_starts(self):
        _, port = self.listening()
        problem = cli.coordinator_port_problem(f"localhost:{port}", 0)
        self.assertIsNotNone(problem)
        self.assertIn(f"port {port} is in use", problem)
        # Only process 0 binds the port; the others connect to it.
        self.assertIsNone(cli.coordinator_port_problem(f"localhost:{port}", 1))
        self.assertIsNone(cli.coordinator_port_problem(f"localhost:{fixtures.free_port()}", 0))

    @pytest.mark.slow
    def test_launch_stops_in_one_line(self):
        """Before: a traceback ending in ``JaxRuntimeError: UNKNOWN: Failed to start RPC
        server``, which names neither the port nor the cause."""
        _, port = self.listening()
        result = fixtures.run_launch(
            "--config=experiments/demo.py",
            "--mode=summary",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=1",
            "--process_id=0",
            timeout=120,
        )
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn(f"port {port} is in use", result.stderr.strip().splitlines()[-1])

    @pytest.mark.slow
    def test_a_process_waiting_for_its_coordinator_says_so(self):
        """Process 1 of a job whose process 0 never starts waited JAX's 300 s without a word."""
        port = fixtures.free_port()  # nobody serves it
        process = subprocess.Popen(
            [sys.executable, "launch.py", "--config=experiments/demo.py", "--mode=summary",
             f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=1"],
            cwd=ROOT, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        waiting = f"Process 1 of 2: joining the job through its coordinator localhost:{port}"
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline and process.poll() is None:
            seen.append(process.stderr.readline())
            if waiting in seen[-1]:
                self.assertIn(f"up to {cli.COORDINATOR_WAIT_S} s", seen[-1])
                return
        self.fail(f"no line saying what process 1 waits for:\n{''.join(seen)[-3000:]}")


if __name__ == "__main__":
    absltest.main()
