"""Console and library output: one naming of metrics (error) with the time left in progress
lines, and no library noise (Orbax's expected warnings, JAX's backend probes)."""

import logging as std_logging
import os
from unittest import mock

from absl import logging
from absl.testing import absltest

from vgg_jax import checkpoint, writers
from vgg_jax.tools import cli
from vgg_jax.training import loop


def record(message, level=std_logging.WARNING, pathname="/x/orbax/checkpoint/manager.py"):
    return std_logging.LogRecord("absl", level, pathname, 1, message, (), None)


class ConsoleLinesTest(absltest.TestCase):
    def test_durations(self):
        self.assertEqual(writers.format_duration(12.4), "12s")
        self.assertEqual(writers.format_duration(245), "4m05s")
        self.assertEqual(writers.format_duration(3720), "1h02m")
        self.assertEqual(writers.format_duration(-3), "0s")

    def test_training_line_speaks_of_error_and_time_left(self):
        scalars = dict(
            train_loss=1.5,
            train_top1_accuracy=0.66,
            train_top5_accuracy=0.9,
            learning_rate=0.01,
            images_per_second=64.0,
        )
        with self.assertLogs("absl", "INFO") as logs:
            loop._log_progress(100, 400, 50, scalars, batch_size=32)  # 2 steps/s, 300 left
        (line,) = logs.output
        self.assertIn("top-1 error 34.00% top-5 error 10.00%", line)
        self.assertIn("| 2m30s left", line)
        self.assertNotIn("top-1 66", line)

    def test_top5_of_five_classes_or_fewer_is_logged_as_not_applicable(self):
        # Validation and training sums of a 3-class net hold no top-5 count: the lines said
        # "top-5 error 0.00%" as if it were measured.
        totals = dict(loss_sum=6.0, top1_correct=3.0, count=4.0)
        validation = loop._summarise(totals, "val_")
        self.assertNotIn("val_top5_accuracy", validation)
        scalars = loop._summarise(totals, "train_") | dict(
            learning_rate=0.01, images_per_second=64.0
        )
        with self.assertLogs("absl", "INFO") as logs:
            loop._log_progress(100, 400, 50, scalars, batch_size=32)
        (line,) = logs.output
        self.assertIn("top-1 error 25.00% top-5 error n/a |", line)

    def test_evaluation_pass_gives_the_time_left(self):
        from test_evaluate import fake_eval_batches, init_params, mesh_of, tiny_config, tiny_model

        from vgg_jax.evaluation import methods, runner

        config = tiny_config()
        model = tiny_model(config)
        mesh = mesh_of(4)
        batches = list(fake_eval_batches(24)(config, 48))
        self.assertGreater(len(batches), 1)
        functions = methods.compiled_methods(model, mesh)
        with (
            mock.patch.object(runner, "PROGRESS_SECONDS", 0.0),
            self.assertLogs("absl", "INFO") as logs,
        ):
            runner.evaluate_scale(
                init_params(model), functions, batches, ["dense"], mesh, 10, total=24, scale=48
            )
        lines = [line for line in logs.output if "left at this scale" in line]
        self.assertLen(lines, len(batches) - 1)  # not after the last batch: nothing is left
        self.assertRegex(lines[0], r"Q=48: \d+/24 images, \d+s left at this scale")

    def test_library_use_hides_orbax_expected_warnings_only(self):
        filters = logging.get_absl_logger().filters
        (keep,) = [f for f in filters if isinstance(f, checkpoint.ExpectedOrbaxWarnings)]
        self.assertFalse(keep.filter(record("Given directory is read only=/w/checkpoints")))
        self.assertFalse(keep.filter(record("CheckpointManagerOptions.read_only=True, setting")))
        self.assertTrue(keep.filter(record("Checkpoint save failed: disk full")))
        ours = record("Given directory is read only", pathname=f"{os.sep}vgg_jax{os.sep}a.py")
        self.assertTrue(keep.filter(ours))
        error = record("Given directory is read only", std_logging.ERROR)
        self.assertTrue(keep.filter(error))

    def test_commands_hide_jax_backend_probes(self):
        probe = cli.BackendProbeFilter()
        self.assertFalse(
            probe.filter(
                record("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so",
                       std_logging.INFO, "/x/jax/_src/xla_bridge.py")
            )
        )  # fmt: skip
        self.assertTrue(probe.filter(record("Unable to initialize backend 'cuda'")))  # a WARNING
        cli.quiet_library_logs()
        self.assertTrue(
            any(
                isinstance(f, cli.BackendProbeFilter)
                for f in std_logging.getLogger(cli.JAX_BACKEND_LOGGER).filters
            )
        )


if __name__ == "__main__":
    absltest.main()
