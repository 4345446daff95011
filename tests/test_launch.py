"""launch.py as users run it: summary mode, config arguments and start-up errors."""

import logging
import os
import subprocess
import sys
import tempfile

import pytest
from absl import flags
from absl.testing import absltest
from ml_collections import config_flags

from tests import fixtures
from vgg_jax.tools import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


launch = fixtures.run_launch


# What a worker process spawned to draw the built-in dataset does: import the program's main
# module again (as ``__mp_main__``), here launch.py's or ``python -m vgg_jax.tools.data``'s.
WORKER_IMPORTS = {
    "launch.py": "runpy.run_path('launch.py', run_name='__mp_main__')",
    "tools.data": "runpy.run_module('vgg_jax.tools.data', run_name='__mp_main__')",
}
HEAVY = "print(sorted(name for name in ('jax', 'orbax', 'tensorflow') if name in sys.modules))"


@pytest.mark.slow
class LaunchTest(absltest.TestCase):
    def test_a_spawned_worker_imports_the_commands_without_jax_or_tensorflow(self):
        for command, imports in WORKER_IMPORTS.items():
            code = f"import runpy, sys; {imports}; {HEAVY}"
            result = subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
            )
            self.assertEqual(result.returncode, 0, result.stderr[-2000:])
            self.assertEqual(result.stdout.strip(), "[]", command)

    def test_the_step_starts_compiling_before_tensorflow_loads(self):
        """A training run checks its config and starts compiling its step before anything
        imports TensorFlow (7-9 s of one core on a 2-core CPU), so the two overlap; the config
        checks alone import neither TensorFlow nor TFDS, for every config shipped."""
        code = """
import importlib
import os
import sys
from unittest import mock
from vgg_jax.tools import cli
from vgg_jax.training import loop

class Started(Exception):
    pass

def compile_ahead(*args, **kwargs):
    print("tensorflow at compile_ahead:", "tensorflow" in sys.modules)
    raise Started

config = importlib.import_module("experiments.demo").get_config()
with mock.patch.object(loop, "compile_ahead", compile_ahead):
    try:
        cli.run("train", config, sys.argv[1])
    except Started:
        pass
shipped = [("demo", "train"), ("vgg11", "train"), ("vgg16", "evaluate"), ("vgg19", "evaluate")]
tars = os.path.join(sys.argv[1], "imagenet_tars")  # ImageNet unprepared: its tars must be there
os.makedirs(tars)
for tar in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    open(os.path.join(tars, tar), "wb").close()
for name, mode in shipped:
    config = importlib.import_module(f"experiments.{name}").get_config()
    config.input.manual_dir = tars
    cli.checks.check_config(config, mode)
config = importlib.import_module("experiments.demo").get_config()
config.input.dataset, config.input.folder = "image_folder", sys.argv[1]
config.model.num_classes = 2
for name in ("cat", "dog"):
    os.makedirs(os.path.join(sys.argv[1], "train", name))
    open(os.path.join(sys.argv[1], "train", name, "a.jpg"), "wb").close()
cli.checks.check_config(config, "evaluate")
print("loaded by the checks:", sorted({"tensorflow", "tensorflow_datasets"} & set(sys.modules)))
"""
        with tempfile.TemporaryDirectory() as workdir:
            result = subprocess.run(
                [sys.executable, "-c", code, workdir],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("tensorflow at compile_ahead: False", result.stdout)
        self.assertIn("loaded by the checks: []", result.stdout)

    def test_summary_ends_with_paper_parameter_count(self):
        result = launch("--config=experiments/vgg19.py", "--mode=summary")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.strip().splitlines()
        self.assertEqual(lines[-1], "total parameters: 143667240")
        self.assertIn("block5_conv4", result.stdout)

    def test_overrides_and_config_argument(self):
        result = launch(
            "--config=experiments/vgg16.py:jitter",
            "--mode=summary",
            "--config.model.num_classes=10",
            "--config.model.name=A-LRN",
            "--config.schedule.num_epochs=1.5",  # fractional epochs (was: "invalid literal")
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("block1_lrn", result.stdout)
        self.assertTrue(
            result.stdout.strip().endswith(f"total parameters: {132863336 - 990 * 4097}")
        )

    def test_unknown_override_names_the_key(self):
        result = launch("--config=experiments/vgg16.py", "--mode=summary", "--config.no_such_key=1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("no_such_key", result.stderr)
        self.assertIn("'model'", result.stderr)  # lists the valid keys
        self.assertNotIn("Traceback", result.stderr)
        result = launch("--config=experiments/vgg16.py", "--mode=summary", "--config.model.nme=D")
        self.assertIn("'model.nme'", result.stderr)
        self.assertIn("'name'", result.stderr)

    def test_bad_values_stop_at_start_up_before_any_data_work(self):
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = os.path.join(tmp, "data")
            result = launch(
                "--config=experiments/demo.py",
                f"--workdir={tmp}/run",
                f"--config.input.data_dir={data_dir}",
                "--config.evals.methods=('dnese',)",
                "--config.input.batch_size=7",
            )
            self.assertFalse(os.path.exists(data_dir))  # nothing generated or prepared
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("config.evals.methods=('dnese',): unknown ['dnese']", result.stderr)
        self.assertIn("config.input.batch_size=7: must be a positive multiple", result.stderr)

    def test_unknown_scale_variant(self):
        result = launch("--config=experiments/vgg16.py:s512", "--mode=summary")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("'jitter'", result.stderr)


class LibraryInfoFilterTest(absltest.TestCase):
    def record(self, level: int, pathname: str) -> logging.LogRecord:
        return logging.LogRecord("absl", level, pathname, 1, "message", None, None)

    def test_hides_library_info_keeps_warnings_and_ours(self):
        keep = cli.LibraryInfoFilter(("orbax",)).filter
        orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py")
        self.assertFalse(keep(self.record(logging.INFO, orbax_file)))
        self.assertTrue(keep(self.record(logging.WARNING, orbax_file)))
        expected = self.record(logging.WARNING, orbax_file)
        expected.msg = cli.EXPECTED_WARNINGS[0] + "."
        self.assertFalse(keep(expected))
        ours = self.record(logging.WARNING, os.path.join(ROOT, "vgg_jax", "train.py"))
        ours.msg = cli.EXPECTED_WARNINGS[0]
        self.assertTrue(keep(ours))
        self.assertTrue(keep(self.record(logging.INFO, os.path.join(ROOT, "vgg_jax", "train.py"))))
        # TFDS's warning for every image folder's builder is expected; its other warnings stay.
        keep_tfds = cli.LibraryInfoFilter(("tensorflow_datasets",)).filter
        tfds_file = os.path.join(os.sep, "site-packages", "tensorflow_datasets", "core", "b.py")
        custom = self.record(logging.WARNING, tfds_file)
        custom.msg = "Using custom data configuration: FolderConfig(name='photos_1234')"
        self.assertFalse(keep_tfds(custom))
        other = self.record(logging.WARNING, tfds_file)
        other.msg = "Dataset is using deprecated text encoder API."
        self.assertTrue(keep_tfds(other))
        # A file merely named like the package is not inside it.
        self.assertTrue(keep(self.record(logging.INFO, os.path.join(ROOT, "orbax_notes.py"))))


class OverrideTest(absltest.TestCase):
    def test_a_key_given_twice_takes_its_last_value_tuples_too(self):
        """A base command with an override appended: a number was replaced, as absl does for
        any flag, but a tuple was extended, ``seeds=(0,1)`` then ``(5,)`` planning 0, 1 and 5."""
        argv = ["launch.py", "--config=experiments/study.py:smoke", "--config.seeds=(0,1)"]
        argv += ["--config.size=tiny", "--config.seeds=(5,)"]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
        cli.parse_flags(flag_values, argv)
        self.assertEqual(tuple(flag_values.config.seeds), (5,))
        self.assertEqual(flag_values.config.size, "tiny")
        # The "--key value" form is left as it is (its value is the next argument).
        spaced = ["a", "--config.x", "1", "--config.x=2"]
        self.assertEqual(cli.last_override_wins(spaced), spaced)

    def test_a_study_base_key_that_the_plan_replaces_is_refused(self):
        """``--config.base.optim.learning_rate=0.005`` trained every run at the scale settings'
        rates without a word: the plan sets that key for every run."""

        def parse(*overrides):
            argv = ["launch.py", "--config=experiments/study.py:smoke", *overrides]
            flag_values = flags.FlagValues()
            config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
            cli.parse_flags(flag_values, argv)
            return flag_values.config

        with self.assertRaises(SystemExit) as stop:
            parse("--config.base.model.width=0.25", "--config.base.optim.learning_rate=0.005")
        message = str(stop.exception.code)
        self.assertIn("--config.base.optim.learning_rate is set by the study's plan", message)
        self.assertIn("--config.scale_settings.{small,large,jitter}.learning_rate", message)
        self.assertNotIn("model.width", message)
        with self.assertRaisesRegex(SystemExit, r"--config.seeds instead"):
            parse("--config.base.seed=3")
        # A base key the plan leaves alone is the study's to take, and a training config's
        # own keys are not a study's.
        self.assertEqual(parse("--config.base.model.width=0.25").base.model.width, 0.25)
        argv = ["launch.py", "--config=experiments/demo.py", "--config.optim.learning_rate=0.1"]
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
        cli.parse_flags(flag_values, argv)
        self.assertEqual(flag_values.config.optim.learning_rate, 0.1)


if __name__ == "__main__":
    absltest.main()
