"""import_weights: imported nets become checkpoints that the evaluator and init_from take."""

import json
import os
import subprocess
import sys
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest
from absl.testing import absltest

from vgg_jax import checkpoint, conventions, models
from vgg_jax.configs import paper
from vgg_jax.training import init_from
from vgg_jax.weights import export, importer
from vgg_jax.weights import keras as keras_weights
from vgg_jax.weights import torchvision as torch_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=1 / 16, fc_width=32, num_classes=10)


def random_params(net, seed=0, crop_size=224, **model):
    """Random values in the shapes of ``net`` (eval_shape only: nothing to compile)."""
    config = paper.model_config(net)
    config.update(model or TINY)
    shapes = models.abstract_params(models.build_model(config, crop_size))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)


def run_import(*flags):
    return subprocess.run(
        [sys.executable, "-m", "vgg_jax.tools.import_weights", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_trees_equal(actual, expected):
    jax.tree_util.tree_map(np.testing.assert_array_equal, actual, expected)


class ImportWeightsTest(absltest.TestCase):
    def setUp(self):
        self.tmp = self.create_tempdir().full_path
        self.params = random_params("D")
        self.pth = os.path.join(self.tmp, "vgg16.pth")
        torch_weights.save_pth(self.pth, torch_weights.state_dict_from_params("D", self.params))

    def test_torchvision_file_becomes_a_checkpoint_init_from_accepts(self):
        workdir = os.path.join(self.tmp, "imported")
        summary = importer.import_to_checkpoint(self.pth, "torchvision", workdir)
        self.assertEqual(summary["net"], "D")

        params, step, meta = checkpoint.restore_params(workdir)
        self.assertEqual(step, 0)
        assert_trees_equal(params, self.params)
        self.assertEqual(conventions.checked(meta["input_convention"]), conventions.TORCHVISION)
        model_config = ml_collections.ConfigDict(meta["config"]["model"])
        self.assertEqual(model_config.name, "D")
        self.assertEqual(
            (model_config.width, model_config.fc_width, model_config.num_classes), (1 / 16, 32, 10)
        )
        self.assertEqual(meta["config"]["input"]["crop_size"], 224)
        # The recorded config builds a model whose parameters are exactly the checkpoint's.
        model = models.build_model(model_config, meta["config"]["input"]["crop_size"])
        self.assertEqual(
            jax.tree_util.tree_map(np.shape, models.abstract_params(model)),
            jax.tree_util.tree_map(np.shape, params),
        )

        config = paper.paper_config("D", None).init_from
        config.update(dict(mode="full", workdir=workdir))
        fresh = jax.tree_util.tree_map(lambda p: jax.numpy.zeros_like(p), self.params)
        assert_trees_equal(init_from.initialise(config, fresh)[0], self.params)

    def test_an_imagenet_net_records_the_ilsvrc_classes_so_other_orders_are_refused(self):
        from vgg_jax import sharding
        from vgg_jax.evaluation import predict, runner

        params = random_params("D", width=1 / 16, fc_width=32, num_classes=1000)
        pth = os.path.join(self.tmp, "imagenet.pth")
        torch_weights.save_pth(pth, torch_weights.state_dict_from_params("D", params))
        workdir = os.path.join(self.tmp, "imagenet")
        importer.import_to_checkpoint(pth, "torchvision", workdir)
        _, _, meta = checkpoint.restore_params(workdir)
        self.assertLen(meta.get("class_names") or [], 1000)  # today: none, nothing was checked
        self.assertEqual(meta["class_names"][:2], ["n01440764", "n01443537"])  # TFDS's labels
        config = ml_collections.ConfigDict(meta["config"])
        mesh = sharding.make_mesh(
            ml_collections.ConfigDict(dict(data=1, model=1)), jax.devices()[:1]
        )
        net = runner.load_net(workdir, "latest", mesh, config)
        runner.check_net_fits(net, config, 1000, class_names=meta["class_names"])  # imagenet2012
        # ImageNet-V2's class folders "0".."999", as an image folder sorts them: output 2 was
        # scored as folder "10" (today: a table near 100% error, without a word).
        folder_order = sorted(str(i) for i in range(1000))
        with self.assertRaisesRegex(checkpoint.NetMismatchError, "class 0: 'n01440764' there"):
            runner.check_net_fits(net, config, 1000, class_names=folder_order)
        init = paper.paper_config("D", None).init_from
        init.update(dict(mode="full", workdir=workdir))
        with self.assertRaisesRegex(checkpoint.NetMismatchError, "other classes"):
            init_from.initialise(init, params, "D", folder_order)[0]
        # predict still names them by their words
        self.assertIsNone(predict.load_predictor(workdir).class_names)
        self.assertEqual(predict.imagenet_class_names()[0], "tench, Tinca tinca")

    def test_export_file_names_its_net_or_takes_it_from_net_flag(self):
        params = random_params("A", seed=1)
        path = os.path.join(self.tmp, "a.safetensors")
        export.save(path, params, {"input_convention": conventions.CAFFE})  # no "net"
        workdir = os.path.join(self.tmp, "a_lrn")
        summary = importer.import_to_checkpoint(path, "safetensors", workdir, net="A-LRN")
        self.assertEqual(summary["net"], "A-LRN")  # A's parameters: only the file's maker knows
        restored, _, meta = checkpoint.restore_params(workdir)
        assert_trees_equal(restored, params)
        self.assertEqual(meta["config"]["model"]["name"], "A-LRN")
        self.assertEqual(conventions.checked(meta["input_convention"]), conventions.CAFFE)

        with self.assertRaisesRegex(FileExistsError, "new --workdir"):
            importer.import_to_checkpoint(path, "safetensors", workdir, net="A-LRN")
        mismatch = r"net B .*: block1_conv2/bias is missing in the file, \(4,\) in the model"
        with self.assertRaisesRegex(ValueError, mismatch):
            importer.import_to_checkpoint(path, "safetensors", self.tmp + "/b", net="B")
        with self.assertRaisesRegex(ValueError, "holds net D, not --net=E"):
            importer.import_to_checkpoint(self.pth, "torchvision", self.tmp + "/e", net="E")

    def test_fitted_config_checks_every_shape(self):
        config, crop_size = importer.fit_model_config("D", self.params)
        self.assertEqual((config.width, config.fc_width, config.num_classes), (1 / 16, 32, 10))
        self.assertEqual(crop_size, 224)
        full = models.abstract_params(models.VGG(models.LAYOUTS["E"]))
        config, crop_size = importer.fit_model_config("E", full)
        self.assertEqual((config.width, config.fc_width, config.num_classes), (1, 4096, 1000))
        self.assertEqual(crop_size, 224)
        self.params["block3_conv2"]["kernel"] = np.zeros((3, 3, 16, 8), np.float32)
        with self.assertRaisesRegex(ValueError, r"block3_conv2/kernel is \(3, 3, 16, 8\) in the"):
            importer.fit_model_config("D", self.params)

    def test_widths_off_the_64ths_are_fitted(self):
        for width in (0.1, 1 / 3, 0.3):  # today: "does not fit net D ... Pass the right --net"
            params = random_params("D", crop_size=32, width=width, fc_width=16, num_classes=10)
            config, _ = importer.fit_model_config("D", params)
            model = models.build_model(config, 32)
            self.assertEqual(
                jax.tree_util.tree_map(np.shape, models.abstract_params(model)),
                jax.tree_util.tree_map(np.shape, params),
            )

    def test_a_net_trained_here_comes_back_with_its_config_and_class_names(self):
        from vgg_jax.evaluation import predict

        trained = os.path.join(self.tmp, "trained")
        config = paper.paper_config("A", None)
        config.model.update(TINY)
        config.input.update(dict(dataset="builtin", crop_size=32, data_dir=self.tmp + "/gone"))
        config.input.pixel_std = (60.0, 60.0, 60.0)
        convention = {"channel_order": "RGB", "pixel_range": 255.0, "mean": [120.0] * 3,
                      "std": [60.0] * 3}  # fmt: skip
        names = [f"shape{i}" for i in range(10)]
        params = random_params("A", seed=4, crop_size=32)
        checkpoint.save_params(trained, params, 7, config, convention, class_names=names)
        path = os.path.join(self.tmp, "trained.npz")
        export.export_checkpoint(trained, path)
        workdir = os.path.join(self.tmp, "back")
        summary = importer.import_to_checkpoint(path, "npz", workdir)
        self.assertIn("the config it was trained with", importer.evaluate_command(
            summary["net"], ml_collections.ConfigDict(summary["config"]), workdir))  # fmt: skip
        _, _, meta = checkpoint.restore_params(workdir)
        self.assertEqual(meta["config"]["input"]["dataset"], "builtin")  # today: imagenet2012
        self.assertEqual(meta["class_names"], names)
        # Its dataset is gone: predict still has the convention and the names (today: it asked
        # for ImageNet's prepared files).
        predictor = predict.load_predictor(workdir)
        self.assertEqual(predictor.class_names, names)
        self.assertEqual(predictor.input_convention["std"], [60.0] * 3)
        assert_trees_equal(predictor.params, params)
        # Names that are not its outputs' (an edited file): refused, not shown for other classes.
        checkpoint.save_params(trained, params, 8, config, convention, class_names=names[:9])
        export.export_checkpoint(trained, path)
        with self.assertRaisesRegex(ValueError, "names 9 classes for a net with 10 outputs"):
            importer.import_to_checkpoint(path, "npz", os.path.join(self.tmp, "again"))

    def test_missing_net_or_convention_is_asked_for(self):
        path = os.path.join(self.tmp, "bare.npz")
        export.save_npz(path, self.params, {})
        with self.assertRaisesRegex(ValueError, "pass --net"):
            importer.import_to_checkpoint(path, "npz", self.tmp + "/x")
        with self.assertRaisesRegex(ValueError, "pass --input_convention"):
            importer.import_to_checkpoint(path, "npz", self.tmp + "/x", net="D")
        with self.assertRaisesRegex(ValueError, "valid: \\['caffe', 'torchvision'\\]"):
            importer.import_to_checkpoint(path, "npz", self.tmp + "/x", "D", "bgr")
        importer.import_to_checkpoint(path, "npz", self.tmp + "/x", "D", "torchvision")
        _, _, meta = checkpoint.restore_params(self.tmp + "/x")
        self.assertEqual(meta["input_convention"]["channel_order"], "RGB")
        # A net trained here (mean-subtracted 0-255 RGB) whose .pth lost its record: today only
        # the named conventions could be given, both wrong for it.
        trained_here = conventions.mean_subtracted((120.5, 115.0, 104.25), (60.0, 60.0, 60.0))
        text = json.dumps(trained_here)
        importer.import_to_checkpoint(path, "npz", self.tmp + "/z", "D", text)
        self.assertEqual(conventions.as_text(trained_here), text)  # what export prints
        self.assertEqual(conventions.as_text(conventions.CAFFE), "caffe")
        _, _, meta = checkpoint.restore_params(self.tmp + "/z")
        self.assertEqual(conventions.checked(meta["input_convention"]), trained_here)
        for bad, says in (
            ('{"channel_order": "RGB"', "is not JSON \\(Expecting"),
            ('{"channel_order": "RGB"}', "--input_convention: Input convention keys"),
            (text.replace("255.0", "2.0"), "--input_convention: pixel_range 2.0"),
        ):
            with self.assertRaisesRegex(ValueError, says):
                importer.import_to_checkpoint(path, "npz", self.tmp + "/w", "D", bad)
        with self.assertRaisesRegex(ValueError, "valid: \\['keras', 'npz'"):
            importer.import_to_checkpoint(path, "pth", self.tmp + "/y")

    def test_nan_or_infinite_parameters_are_refused_by_layer(self):
        """A float16 .pth whose fine-tuning overflowed: refused, naming the layers (today: a
        checkpoint whose every prediction is "nan%")."""
        params = random_params("A", seed=4, **TINY)
        state_dict = torch_weights.state_dict_from_params("A", params)
        state_dict = {k: v.astype(np.float16) for k, v in state_dict.items()}
        state_dict["features.3.weight"][0, 0, 0, :2] = [np.inf, -np.inf]
        state_dict["classifier.6.bias"][1] = np.nan
        path = os.path.join(self.tmp, "overflowed.pth")
        torch_weights.save_pth(path, state_dict)
        workdir = os.path.join(self.tmp, "nan")
        with self.assertRaisesRegex(
            ValueError, r"NaN or infinite parameters: block2_conv1/kernel \(2\), fc3/bias \(1\)\."
        ):
            importer.import_to_checkpoint(path, "torchvision", workdir)
        self.assertEqual(checkpoint.available_steps(workdir), [])

    def test_keras_files_state_the_caffe_convention(self):
        params = random_params("E", seed=3, width=1 / 16, fc_width=32, num_classes=1000)
        with mock.patch.object(keras_weights, "load_keras_weights", return_value=("E", params)):
            workdir = os.path.join(self.tmp, "keras")
            importer.import_to_checkpoint(self.pth, "keras", workdir)
        restored, _, meta = checkpoint.restore_params(workdir)
        assert_trees_equal(restored, params)
        self.assertEqual(conventions.checked(meta["input_convention"]), conventions.CAFFE)
        self.assertEqual(meta["config"]["model"]["name"], "E")

    @pytest.mark.slow
    def test_command_line(self):
        workdir = os.path.join(self.tmp, "cli")
        result = run_import(f"--source={self.pth}", "--format=torchvision", f"--workdir={workdir}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("input convention: RGB, 0-1, mean (0.485, 0.456, 0.406)", result.stdout)
        self.assertIn(
            "evaluate: python launch.py --config=experiments/vgg16.py --mode=evaluate "
            "--config.model.width=0.0625 --config.model.fc_width=32 --config.model.num_classes=10 "
            f"--workdir={workdir}",
            result.stdout,
        )
        self.assertEqual(checkpoint.available_steps(workdir), [0])
        again = run_import(f"--source={self.pth}", "--format=torchvision", f"--workdir={workdir}")
        self.assertNotEqual(again.returncode, 0)
        self.assertIn("already holds checkpoints", again.stderr)
        self.assertNotIn("Traceback", again.stderr)


if __name__ == "__main__":
    absltest.main()
