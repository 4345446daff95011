"""init_from: the paper's shallow-net initialisation and the scale fine-tune initialisation."""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from experiments import vgg16
from tests import fixtures
from vgg_jax import checkpoint, conventions, models
from vgg_jax.configs import paper
from vgg_jax.training import init_from, loop


def tiny(name):
    config = paper.model_config(name)
    config.update(dict(num_classes=5, width=1 / 16, fc_width=16, init="glorot"))
    return models.build_model(config, crop_size=32)


def init(model, seed):
    return model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]


class InitFromTest(absltest.TestCase):
    def setUp(self):
        self.workdir = self.create_tempdir().full_path
        self.net_a = init(tiny("A"), seed=1)
        checkpoint.save_params(self.workdir, self.net_a, step=7)

    def test_shallow_copies_first_four_convs_and_fcs_of_net_a(self):
        fresh = init(tiny("D"), seed=2)
        config = paper.paper_config("D", None).init_from
        config.update(dict(mode="shallow", workdir=self.workdir))
        params = init_from.initialise(config, fresh)[0]
        copied = set(init_from.SHALLOW_LAYERS)
        self.assertLen(copied, 7)
        for name in params:
            expected = self.net_a[name] if name in copied else fresh[name]
            jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], expected)
        # The fresh layers really are different from anything in net A.
        self.assertFalse(
            np.allclose(
                params["block1_conv2"]["kernel"], fresh["block2_conv1"]["kernel"][:, :, :, :4]
            )
        )
        self.assertIn("block1_conv2", params)
        self.assertNotIn("block1_conv2", self.net_a)

    def test_fc_copies_only_the_fc_layers_into_b_5x5(self):
        fresh = init(tiny("B-5x5"), seed=2)
        config = paper.paper_config("B-5x5", None).init_from
        config.update(dict(mode="fc", workdir=self.workdir))
        params = init_from.initialise(config, fresh)[0]
        for name in params:
            expected = self.net_a[name] if name.startswith("fc") else fresh[name]
            jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], expected)
        self.assertFalse(np.allclose(params["fc1"]["kernel"], fresh["fc1"]["kernel"]))
        config.mode = "shallow"  # A's 3x3 convs do not fit B-5x5's 5x5 ones
        with self.assertRaisesRegex(ValueError, "block3_conv2"):
            init_from.initialise(config, fresh)[0]

    def test_full_loads_every_layer_and_fine_tune_lowers_the_rate(self):
        fresh = init(tiny("A"), seed=3)
        config = vgg16.get_config("s384")
        self.assertEqual(config.init_from.mode, "full")
        self.assertEqual(config.optim.learning_rate, 1e-3)
        self.assertEqual(vgg16.get_config("s256").optim.learning_rate, 1e-2)
        config.init_from.workdir = self.workdir
        params = init_from.initialise(config.init_from, fresh)[0]
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, self.net_a)

    def test_errors_name_the_problem(self):
        config = paper.paper_config("D", None).init_from
        config.mode = "deep"
        with self.assertRaisesRegex(ValueError, "shallow"):
            init_from.initialise(config, {})[0]
        config.mode = "full"
        with self.assertRaisesRegex(ValueError, "workdir"):
            init_from.initialise(config, {})[0]
        config.workdir = tempfile.mkdtemp()
        with self.assertRaisesRegex(FileNotFoundError, "checkpoints"):
            init_from.initialise(config, {})[0]
        config.workdir = self.workdir
        wider = init(
            models.VGG(models.LAYOUTS["A"], num_classes=5, crop_size=32, width=1 / 8, fc_width=16),
            0,
        )
        with self.assertRaisesRegex(ValueError, "block1_conv1: shape .*widths"):
            init_from.initialise(config, wider)[0]

    def test_the_source_must_be_the_net_the_mode_copies_from(self):
        net_e = os.path.join(self.create_tempdir().full_path, "e")
        e_config = paper.paper_config("E", None)
        e_config.model.update(dict(num_classes=5, width=1 / 16, fc_width=16))
        checkpoint.save_params(net_e, init(tiny("E"), seed=4), step=9, config=e_config)
        fresh = init(tiny("D"), seed=2)
        config = paper.paper_config("D", "s384").init_from
        config.update(dict(mode="full", workdir=net_e))
        # E's layer names and shapes include all of D's: today copied without a word.
        with self.assertRaisesRegex(ValueError, "copies from net D; .* holds net E"):
            init_from.initialise(config, fresh, "D")[0]
        config.mode = "shallow"
        with self.assertRaisesRegex(ValueError, "copies from net A or A-LRN; .* holds net E"):
            init_from.initialise(config, fresh, "D")[0]
        config.mode = "full"
        with self.assertLogs(level="INFO") as logs:
            init_from.initialise(config, init(tiny("E"), seed=5), "E")[0]
        self.assertTrue(any(f"from {net_e} step 9 (net E)" in line for line in logs.output))

    def test_a_source_trained_on_other_classes_is_refused(self):
        names = ["ant", "bee", "cow", "dog", "elk"]
        source = os.path.join(self.create_tempdir().full_path, "a")
        checkpoint.save_params(source, self.net_a, step=3, class_names=names)
        fresh = init(tiny("D"), seed=2)
        config = paper.paper_config("D", None).init_from
        config.update(dict(mode="shallow", workdir=source))
        init_from.initialise(config, fresh, "D", names)[0]  # the same classes: copied
        with self.assertRaisesRegex(ValueError, "other classes .*class 1: 'bee' there, 'cat' here"):
            init_from.initialise(config, fresh, "D", ["ant", "cat", "cow", "dog", "elk"])[0]

    def test_a_source_not_trained_to_the_end_is_named(self):
        """A net D started from net A's newest checkpoint while A still trains (or after A was
        stopped) began from a half-trained A without a word."""
        source = os.path.join(self.create_tempdir().full_path, "a")
        checkpoints = checkpoint.Checkpointer(source, keep=2, keep_best=False)
        checkpoints.save(4, self.net_a, {"momentum": self.net_a}, {"final": False})
        checkpoints.close()
        fresh = init(tiny("D"), seed=2)
        config = paper.paper_config("D", None).init_from
        config.update(dict(mode="shallow", workdir=source))
        with self.assertLogs(level="WARNING") as logs:
            init_from.initialise(config, fresh, "D")[0]
        self.assertTrue(any("step 4, is not the end of its training" in x for x in logs.output))
        config.step = 4  # asked for by number: a choice, no warning
        with self.assertNoLogs(level="WARNING"):
            init_from.initialise(config, fresh, "D")[0]


class InitFromTrainingTest(absltest.TestCase):
    def test_a_run_feeds_its_copied_first_conv_the_sources_input_convention(self):
        """A fine-tune of an imported torchvision net (RGB 0-1, ImageNet mean and std) was fed
        the paper's 0-255 mean-subtracted pixels, about 58 times the range its first conv was
        trained on, and recorded that convention for its evaluation."""
        config = fixtures.tiny_config("A", **{"schedule.num_epochs": 1, "ckpt.every_steps": 1})
        config.input.batch_size = 20
        source = self.create_tempdir().full_path
        model = models.build_model(config.model, config.input.crop_size)
        net = init(model, seed=1)
        checkpoint.save_params(source, net, config=config, input_convention=conventions.TORCHVISION)
        config.init_from.update(dict(mode="full", workdir=source))
        workdir = self.create_tempdir().full_path
        with self.assertLogs(level="WARNING") as logs:
            loop.train(config, workdir)
        self.assertTrue(any("prepared as RGB, 0-1" in line for line in logs.output))
        _, _, meta = checkpoint.restore_params(workdir)
        self.assertEqual(conventions.checked(meta["input_convention"]), conventions.TORCHVISION)
        # Resumed (nothing left to train), the dataset's mean is the same: no warning about it.
        with self.assertLogs(level="INFO") as logs:
            loop.train(config, workdir)
        self.assertFalse([line for line in logs.output if "mean RGB has changed" in line])
        # An explicit input.pixel_std that contradicts the source's std is refused at start-up
        # (the evaluator refuses it for the trained net: before, after all the training).
        config.input.pixel_std = (60.0, 60.0, 60.0)
        with self.assertRaisesRegex(ValueError, r"trained with input std .*0\.229.*pixel_std"):
            loop.train(config, self.create_tempdir().full_path)


if __name__ == "__main__":
    absltest.main()
