"""``checks.check_config``: every bad value is one line naming the key, the value and what is
valid, found before any data preparation or compilation."""

import os
import shutil
import tempfile
from unittest import mock

import numpy as np
from absl.testing import absltest

from experiments import demo
from tests import fixtures
from vgg_jax import checkpoint, checks, processes


def problems(config, mode="train", workdir=None) -> list[str]:
    try:
        checks.check_config(config, mode, workdir)
    except checks.ConfigError as e:
        return e.problems
    return []


class CheckConfigTest(absltest.TestCase):
    def test_the_shipped_configs_pass(self):
        self.assertEmpty(problems(demo.get_config(), "train_and_evaluate"))
        self.assertEmpty(problems(fixtures.tiny_config(with_data=False), "evaluate"))

    def test_each_bad_value_is_one_line_with_key_value_and_valid_range(self):
        config = fixtures.tiny_config(
            with_data=False,
            **{
                "input.crop_size": 33,
                "optim.learning_rate": 1e39,
                "schedule.num_epochs": 0,
                "evals.methods": ("dnese",),
                "model.name": "F",
                "input.batch_size": 6,  # 4 fake devices (conftest)
                "input.builtin_size": "ful",  # was a traceback from TFDS's builder config
            },
        )
        lines = problems(config)
        expected = {
            "config.input.crop_size=33": "multiple of 32",
            "config.optim.learning_rate=1e+39": "(0, 10]",
            "config.schedule.num_epochs=0": "> 0",
            "config.evals.methods=('dnese',)": "dense+multi_crop",
            "config.model.name='F'": "'E'",
            "config.input.batch_size=6": "4 devices",
            "config.input.builtin_size='ful'": "'full'",
        }
        for start, valid in expected.items():
            line = [x for x in lines if x.startswith(start)]
            self.assertLen(line, 1, (start, lines))
            self.assertIn(valid, line[0])
        self.assertTrue(all("\n" not in x for x in lines))

    def test_a_model_axis_across_processes_is_found_at_start_up(self):
        """Two processes of two devices each: a model axis of 4 would hold devices of both,
        which feed different rows of every batch (``sharding.model_axis_problem``)."""
        config = fixtures.tiny_config(with_data=False, **{"mesh.model": 4})
        self.assertEmpty(problems(config, "evaluate"))  # one process of 4 devices
        with (
            mock.patch.object(checks.jax, "process_count", return_value=2),
            mock.patch.object(checks.jax, "local_device_count", return_value=2),
            # the other process sees the same checkpoints (the training checks gather that)
            mock.patch.object(processes, "gather_json", side_effect=lambda mine: [mine, mine]),
        ):
            lines = problems(config, "evaluate")
            self.assertEmpty(problems(fixtures.tiny_config(with_data=False, **{"mesh.model": 2})))
        self.assertLen(lines, 1)
        self.assertTrue(lines[0].startswith("config.mesh.data=-1 x config.mesh.model=4: "))
        self.assertIn("use a mesh.model that divides 2", lines[0])

    def test_a_model_axis_that_splits_no_layer_warns(self):
        """``mesh.model=4`` with ``fc_width=10``: FC1 and FC2 stay whole on every device (the
        same numbers as ``mesh.model=1``), which the run used to do without a word."""
        config = fixtures.tiny_config(with_data=False, **{"mesh.model": 4, "model.fc_width": 10})
        with self.assertLogs(level="WARNING") as logs:
            self.assertEmpty(problems(config, "train"))
        self.assertIn(
            "config.mesh.model=4: 4 devices do not divide model.fc_width=10", logs.output[0]
        )
        with self.assertNoLogs(level="WARNING"):
            problems(fixtures.tiny_config(with_data=False, **{"mesh.model": 4}), "train")
            problems(config, "evaluate")  # the checkpoint's net, not model.*, is evaluated

    def test_dataset_rules_use_its_known_size_and_classes(self):
        config = fixtures.tiny_config(with_data=False, **{"model.num_classes": 1000})
        config.input.batch_size = 128  # the tiny built-in set has 100 training images
        lines = problems(config)
        self.assertTrue(any("has 10 classes" in x for x in lines), lines)
        self.assertTrue(any(x.startswith("config.input.batch_size=128") for x in lines), lines)
        # Evaluation takes any batch size: it only needs the class count to match.
        self.assertLen(problems(config, "evaluate"), 1)

    def test_test_scale_below_the_crop_is_caught_before_training(self):
        config = fixtures.tiny_config(with_data=False, **{"evals.single_scale": 16})
        (line,) = problems(config)
        self.assertStartsWith(line, "config.evals.single_scale=16")
        self.assertIn("at least input.crop_size (32)", line)

    def test_a_test_scale_given_twice_is_caught(self):
        config = fixtures.tiny_config(with_data=False, **{"evals.multi_scales": (32, 32, 48)})
        (line,) = problems(config, "evaluate")  # today: labelled (32, 32, 48), averaged once
        self.assertStartsWith(line, "config.evals.multi_scales=(32, 32, 48)")
        self.assertIn("[32] given more than once", line)

    def test_epochs_that_round_down_to_no_step_are_caught_for_a_new_run(self):
        config = fixtures.tiny_config(with_data=False, **{"schedule.num_epochs": 0.1})
        (line,) = problems(config, "train_and_evaluate")  # 100 images, batch 16: 6 steps
        # today: "nothing to train", then the evaluation's "train it first"
        self.assertStartsWith(line, "config.schedule.num_epochs=0.1: an epoch is 6 steps")
        self.assertIn("give at least 0.167", line)
        config.schedule.num_epochs = 0.167  # the value suggested: int(1.002), one step
        self.assertEmpty(problems(config, "train_and_evaluate"))
        config.schedule.num_epochs = 0.1
        trained = self.create_tempdir().full_path  # evaluated again after its training
        checkpoint.save_params(trained, {"w": np.zeros(2, np.float32)}, step=6)
        self.assertEmpty(problems(config, "train_and_evaluate", trained))
        self.assertEmpty(problems(config, "evaluate"))

    def test_plateau_rule_values_it_cannot_use_are_found_at_start_up(self):
        """A negative plateau_min_delta counted a worse validation as a new best (the best drifted
        down, the rate was never divided); -1 decays never divided it, silently."""
        for key, value, valid in (
            ("schedule.plateau_min_delta", -0.01, "[0, 1): a top-1 accuracy fraction"),
            ("schedule.plateau_min_delta", 1.0, "[0, 1)"),
            ("schedule.plateau_max_decays", -1, "whole number >= 0"),
        ):
            config = fixtures.tiny_config(with_data=False, **{key: value})
            (line,) = problems(config, "train")
            self.assertStartsWith(line, f"config.{key}={value}: must be")
            self.assertIn(valid, line)
        ok = fixtures.tiny_config(
            with_data=False,
            **{"schedule.plateau_min_delta": 0.002, "schedule.plateau_max_decays": 0},
        )
        self.assertEmpty(problems(ok, "train"))

    def test_evaluation_ignores_the_training_batch_size(self):
        config = fixtures.tiny_config(with_data=False, **{"input.batch_size": 6})  # 4 devices
        self.assertLen(problems(config, "train"), 1)
        self.assertEmpty(problems(config, "evaluate"))  # today: refused for a batch it never uses

    def test_a_statistics_sample_of_no_images_is_found_at_start_up(self):
        """input.stats_max_images=0 was "LinAlgError: Eigenvalues did not converge" (a mean of
        no pixels) at preparation; -5 silently computed the statistics without 5 images (a
        slice [:-5]) and again on every start (never the count asked for)."""
        for count in (0, -5):
            config = fixtures.tiny_config(with_data=False, **{"input.stats_max_images": count})
            (line,) = problems(config, "evaluate")
            self.assertStartsWith(line, f"config.input.stats_max_images={count}: must be a whole")
        one = fixtures.tiny_config(with_data=False, **{"input.stats_max_images": 1})
        self.assertEmpty(problems(one, "train"))

    def test_pixel_std_and_an_empty_init_source_are_found_at_start_up(self):
        config = fixtures.tiny_config(with_data=False, **{"input.pixel_std": (60.0, 60.0)})
        (line,) = problems(config, "evaluate")  # today: found after the data is prepared
        self.assertStartsWith(line, "config.input.pixel_std=(60.0, 60.0)")
        empty = self.create_tempdir().full_path
        config = fixtures.tiny_config(
            with_data=False, **{"init_from.mode": "full", "init_from.workdir": empty}
        )
        workdir = os.path.join(self.create_tempdir().full_path, "new_run")
        (line,) = problems(config, "train", workdir)
        self.assertStartsWith(line, f"config.init_from.workdir={empty!r}: holds no checkpoint")
        self.assertEmpty(problems(config, "train"))  # no workdir (a study's plan): not checked

    def test_seeds_jax_and_numpy_cannot_take_are_found_at_start_up(self):
        """A negative input.shuffle_seed was numpy's traceback ("expected non-negative integer")
        at the first batch, after preparation and compilation; 2**32 + 5 initialised the net and
        drew the on-device augmentation exactly as 5 did (``jax.random.key`` keeps 32 bits)."""
        import jax

        self.assertTrue(
            np.array_equal(
                jax.random.key_data(jax.random.key(5)),
                jax.random.key_data(jax.random.key(2**32 + 5)),
            )
        )
        for key, value in (("input.shuffle_seed", -1), ("seed", 2**32 + 5)):
            config = fixtures.tiny_config(with_data=False, **{key: value})
            (line,) = problems(config, "train")
            self.assertStartsWith(
                line, f"config.{key}={value}: must be a whole number in [0, 2**32)"
            )
            self.assertEmpty(problems(config, "evaluate"))  # evaluation draws nothing
        edge = fixtures.tiny_config(with_data=False, **{"seed": 2**32 - 1, "input.shuffle_seed": 0})
        self.assertEmpty(problems(edge, "train"))

    def test_deeper_paper_nets_start_from_net_a_or_say_how(self):
        from vgg_jax.configs import paper

        for net, mode in (("A", "none"), ("A-LRN", "none"), ("D", "shallow"), ("B-5x5", "fc")):
            self.assertEqual(paper.paper_config(net, "s256").init_from.mode, mode, net)
        config = paper.paper_config("E", "s256")  # today: mode none, E from random N(0, 0.01^2)
        config.input.manual_dir = "/nonexistent"
        (line,) = [p for p in problems(config) if p.startswith("config.init_from")]
        self.assertIn("section 3.1: net E starts from net A's layers", line)
        self.assertIn("init_from.mode=none with model.init=glorot", line)
        self.assertEmpty([p for p in problems(config, "evaluate") if "init_from" in p])
        resuming = self.create_tempdir().full_path  # its own checkpoint: init_from is not read
        checkpoint.save_params(resuming, {"w": np.zeros(2, np.float32)}, step=5)
        self.assertEmpty([p for p in problems(config, "train", resuming) if "init_from" in p])

    def test_an_init_source_of_another_net_is_found_at_start_up(self):
        """C fine-tuned from D's workdir (``vgg16_1x1.py:jitter`` given ``vgg16``'s run) was
        refused by ``init_from`` only after the data was prepared and the state initialised:
        55 s on the built-in data, the whole preparation on a first ImageNet run."""
        from vgg_jax.configs import paper

        source = self.create_tempdir().full_path
        checkpoint.save_params(
            source, {"w": np.zeros(2, np.float32)}, step=5, config=paper.paper_config("D", None)
        )
        workdir = os.path.join(self.create_tempdir().full_path, "new_run")
        for net, mode, wanted in (("C", "full", "C"), ("E", "shallow", "A or A-LRN")):
            config = fixtures.tiny_config(
                with_data=False,
                **{"model.name": net, "init_from.mode": mode, "init_from.workdir": source},
            )
            (line,) = problems(config, "train", workdir)
            self.assertEqual(
                line,
                f"config.init_from.workdir={source!r}: holds net D (step 5); "
                f"init_from.mode={mode!r} copies from net {wanted}",
            )
        right = fixtures.tiny_config(
            with_data=False,
            **{"model.name": "D", "init_from.mode": "full", "init_from.workdir": source},
        )
        self.assertEmpty(problems(right, "train", workdir))

    def test_an_init_source_that_is_the_runs_own_workdir_is_refused(self):
        """A fine-tune given its source's workdir as its own resumed the source run in place
        (nothing copied) and its keep-last-K deleted the source's checkpoints."""
        source = self.create_tempdir().full_path
        checkpoint.save_params(source, {"w": np.zeros(2, np.float32)}, step=5)
        config = fixtures.tiny_config(
            with_data=False, **{"init_from.mode": "full", "init_from.workdir": source + "/"}
        )
        (line,) = problems(config, "train", source)
        self.assertStartsWith(line, f"config.init_from.workdir={source + '/'!r}: is this run's own")

    def test_workdir_that_is_a_file_and_unknown_mode(self):
        with tempfile.NamedTemporaryFile() as f:
            (line,) = problems(fixtures.tiny_config(with_data=False), "train", f.name)
            self.assertIn("is a file", line)
            # Under a file: no directory can be made there (today: a traceback at start).
            (line,) = problems(fixtures.tiny_config(with_data=False), "train", f.name + "/run")
            self.assertIn(f"{f.name} above it is a file", line)
        with self.assertRaisesRegex(checks.ConfigError, "valid: .*'summary'"):
            checks.check_config(fixtures.tiny_config(with_data=False), "trian")

    def test_cloud_storage_urls_are_refused_where_the_project_writes_with_local_calls(self):
        """``--workdir=gs://bucket/run`` trained into a local directory ``gs:/bucket/run`` of the
        current one (on a TPU VM, its disk: gone with the VM); a ``gs://`` data_dir wrote the
        project's index and statistics there too."""
        config = fixtures.tiny_config(with_data=False)
        (line,) = problems(config, "train", "gs://bucket/run")
        self.assertStartsWith(line, "--workdir=gs://bucket/run is a URL, but vgg_jax reads and")
        self.assertIn(f"{os.path.abspath('gs://bucket/run')!r}); mount the bucket", line)
        config.init_from.workdir = "gs://bucket/a"
        config.evals.fusion_workdirs = ("/runs/d", "s3://bucket/e")
        config.input.data_dir = "gs://bucket/tfds"
        lines = problems(config, "train")
        self.assertLen(lines, 3, lines)
        self.assertStartsWith(lines[0], "config.init_from.workdir=gs://bucket/a is a URL")
        self.assertStartsWith(lines[1], "config.evals.fusion_workdirs=s3://bucket/e is a URL")
        self.assertStartsWith(lines[2], "config.input.data_dir=gs://bucket/tfds is a URL, which")
        self.assertIn("set --config.input.index_dir to a local or mounted directory", lines[2])
        # TFDS reads a remote data_dir; the project's own files then go to a local index_dir.
        config.init_from.workdir, config.evals.fusion_workdirs = None, ()
        config.input.index_dir = self.create_tempdir().full_path
        self.assertEmpty(problems(config, "train"))
        config.input.index_dir = "gs://bucket/index"
        (line,) = problems(config, "train")
        self.assertStartsWith(line, "config.input.index_dir=gs://bucket/index is a URL")

    def test_a_read_only_workdir_is_found_before_an_evaluation(self):
        read_only = self.create_tempdir().full_path  # root ignores mode bits: a read-only mount
        real_access = os.access
        access = lambda path, mode: path != read_only and real_access(path, mode)  # noqa: E731
        config = fixtures.tiny_config(with_data=False)
        with mock.patch.object(checks.os, "access", access):
            for workdir, where in ((read_only, "it"), (f"{read_only}/new/run", read_only)):
                (line,) = problems(config, "evaluate", workdir)  # today: a traceback at the end
                self.assertEqual(
                    line,
                    f"--workdir={workdir}: {where}{'' if where == 'it' else ' above it'} is not "
                    "writable (checkpoints, results and logs are written there); give a "
                    "writable --workdir",
                )
        self.assertEmpty(problems(config, "evaluate", read_only))

    def test_a_read_only_trained_workdir_is_told_how_to_be_evaluated(self):
        """A shared, read-only trained workdir: "give a writable --workdir" alone led to one
        holding no checkpoint; a writable one linking to its checkpoints evaluates it."""
        trained = self.create_tempdir().full_path
        os.makedirs(os.path.join(trained, "checkpoints"))
        real_access = os.access
        access = lambda path, mode: path != trained and real_access(path, mode)  # noqa: E731
        config = fixtures.tiny_config(with_data=False)
        with mock.patch.object(checks.os, "access", access):
            (line,) = problems(config, "evaluate", trained)
            self.assertEndsWith(
                line,
                "give a writable --workdir holding a link to its checkpoints, read from there "
                f"(mkdir W && ln -s {trained}/checkpoints W/checkpoints; then --workdir=W)",
            )
            (line,) = problems(config, "train", trained)  # training must write there
            self.assertEndsWith(line, "give a writable --workdir")

    def test_image_folder_classes_are_counted_from_its_directories(self):
        with tempfile.TemporaryDirectory() as root:
            for name in ("cat", "dog", "fox"):
                os.makedirs(os.path.join(root, "train", name))
                open(os.path.join(root, "train", name, "1.jpg"), "wb").close()
            config = fixtures.tiny_config(
                with_data=False,
                **{"input.dataset": "image_folder", "input.folder": root, "input.batch_size": 4},
            )
            self.assertEqual(checks.dataset_facts(config.input), (3, 3))
            lines = problems(config)
        self.assertTrue(any("has 3 classes" in x for x in lines), lines)
        self.assertTrue(any(x.startswith("config.input.batch_size=4") for x in lines), lines)

    def test_imagenet_neither_prepared_nor_downloaded_is_said_at_start_up(self):
        # It was said after the step's compile and TensorFlow's import (about a minute).
        with tempfile.TemporaryDirectory() as root:
            overrides = {
                "input.dataset": "imagenet2012",
                "model.num_classes": 1000,
                "input.data_dir": os.path.join(root, "data"),
                "input.manual_dir": os.path.join(root, "tars"),
            }
            config = fixtures.tiny_config(with_data=False, **overrides)
            lines = [x for x in problems(config) if x.startswith("config.input.manual_dir=")]
            self.assertLen(lines, 1)
            self.assertIn("Missing: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar", lines[0])
            self.assertNotIn("image_folder", lines[0])
            # The tars extracted into class folders instead: said how to train on those.
            os.makedirs(os.path.join(root, "tars", "train", "n01440764"))
            (line,) = [x for x in problems(config) if x.startswith("config.input.manual_dir=")]
            self.assertIn("holds ImageNet extracted into class folders (train/n...)", line)
            self.assertIn(f"--config.input.folder={os.path.join(root, 'tars')} ", line)
            shutil.rmtree(os.path.join(root, "tars"))
            os.makedirs(os.path.join(root, "tars"))
            for tar in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
                open(os.path.join(root, "tars", tar), "wb").close()
            self.assertFalse(any("manual_dir" in x for x in problems(config)))
            os.remove(os.path.join(root, "tars", "ILSVRC2012_img_val.tar"))
            self.assertTrue(any("Missing: ILSVRC2012_img_val.tar" in x for x in problems(config)))
            parent = os.path.join(root, "data", "imagenet2012")
            for left in ("5.1.0.bad", "incomplete.K1LLED_5.1.0"):  # moved aside, interrupted
                os.makedirs(os.path.join(parent, left))
                open(os.path.join(parent, left, "dataset_info.json"), "w").close()
            self.assertTrue(any("Missing: ILSVRC2012_img_val.tar" in x for x in problems(config)))
            prepared = os.path.join(parent, "5.1.0")
            os.makedirs(prepared)
            open(os.path.join(prepared, "dataset_info.json"), "w").close()
            self.assertFalse(any("manual_dir" in x for x in problems(config)))
            config.input.data_dir = "gs://bucket/tensorflow_datasets"  # only TFDS can look there
            self.assertFalse(any("manual_dir" in x for x in problems(config)))

    def test_training_on_the_evaluation_split_warns(self):
        config = fixtures.tiny_config(with_data=False, **{"input.eval_split": "train"})
        with self.assertLogs(level="WARNING") as logs:
            self.assertEmpty(problems(config, "train_and_evaluate"))
        self.assertIn("input.eval_split is the training split 'train'", logs.output[0])
        with self.assertNoLogs(level="WARNING"):
            problems(config, "evaluate")  # scoring a net on its training images may be the point
            problems(fixtures.tiny_config(with_data=False), "train_and_evaluate")

    def test_features_scored_on_the_split_they_are_fitted_on_warn(self):
        config = fixtures.tiny_config(with_data=False, **{"input.eval_split": "train"})
        with self.assertLogs(level="WARNING") as logs:
            self.assertEmpty(problems(config, "features"))
        self.assertIn(
            "linear classifiers are scored on the images they are fitted on", logs.output[0]
        )
        with self.assertNoLogs(level="WARNING"):
            problems(fixtures.tiny_config(with_data=False), "features")

    def test_one_class_is_refused_as_nothing_to_learn(self):
        # A one-class folder trained with loss 0.0000 and printed a table of 0.00% errors.
        with tempfile.TemporaryDirectory() as root:
            os.makedirs(os.path.join(root, "train", "cat"))
            open(os.path.join(root, "train", "cat", "1.jpg"), "wb").close()
            overrides = {"input.dataset": "image_folder", "input.folder": root}
            lines = problems(fixtures.tiny_config(with_data=False, **overrides))
            one = problems(
                fixtures.tiny_config(with_data=False, **overrides, **{"model.num_classes": 1})
            )
        for found in (lines, one):
            folder = [x for x in found if x.startswith("config.input.folder=")]
            self.assertLen(folder, 1, found)
            self.assertIn("holds 1 class folder: a classifier needs at least 2", folder[0])
            self.assertFalse(any("set --config.model.num_classes" in x for x in found), found)
        self.assertTrue(any(x.startswith("config.model.num_classes=1") for x in one), one)


if __name__ == "__main__":
    absltest.main()
