"""The paper's optimiser (SGD, momentum, L2 on kernels) and the plateau learning-rate rule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl.testing import absltest

from vgg_jax.configs import paper
from vgg_jax.training import optim


def schedule(**overrides):
    config = paper.schedule_config()
    config.update(overrides)
    return config


class PlateauTest(absltest.TestCase):
    def test_lowers_exactly_after_patience_and_at_most_three_times(self):
        config = schedule(plateau_patience=2, plateau_max_decays=3)
        state = optim.PlateauState()
        history = []
        # Improves twice, then never again: decays after every 2 flat validations, 3 times only.
        for accuracy in [0.1, 0.2] + [0.2] * 10:
            state = optim.update_plateau(state, accuracy, config)
            history.append(state.decays)
        self.assertEqual(history, [0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 3])
        rates = [
            optim.learning_rate(0, optim.PlateauState(decays=d), 1e-2, config, 10) for d in range(4)
        ]
        np.testing.assert_allclose(rates, [1e-2, 1e-3, 1e-4, 1e-5])

    def test_improvement_resets_patience(self):
        config = schedule(plateau_patience=2)
        state = optim.PlateauState()
        for accuracy in [0.5, 0.4, 0.6, 0.5, 0.7, 0.6]:
            state = optim.update_plateau(state, accuracy, config)
        self.assertEqual(state.decays, 0)
        self.assertEqual(state.best, 0.7)

    def test_state_round_trips_through_json_meta(self):
        for state in (optim.PlateauState(), optim.PlateauState(0.25, 1, 2)):
            self.assertEqual(optim.PlateauState.from_dict(state.to_dict()), state)

    def test_warmup_and_cosine(self):
        config = schedule(kind="cosine", num_epochs=10, warmup_epochs=1)
        plateau = optim.PlateauState()
        lr = lambda step: optim.learning_rate(step, plateau, 0.1, config, 100)  # noqa: E731
        self.assertAlmostEqual(lr(0), 0.1 / 100)
        self.assertAlmostEqual(lr(99), 0.1)
        self.assertAlmostEqual(lr(100 + 450), 0.05)
        self.assertAlmostEqual(lr(1000), 0.0)

    def test_unknown_schedule(self):
        with self.assertRaisesRegex(ValueError, "plateau"):
            optim.check_schedule(schedule(kind="step"))


class TotalStepsTest(absltest.TestCase):
    def test_epochs_that_floats_write_a_hair_short_are_not_a_step_short(self):
        self.assertEqual(int(2.3 * 100), 229)  # what the loop counted: 2.3 epochs of 100 steps
        self.assertEqual(optim.total_steps(2.3, 100), 230)
        self.assertEqual(optim.total_steps(0.5, 39), 19)  # part of a step is no step
        self.assertEqual(optim.total_steps(0.001, 100), 0)
        self.assertEqual(optim.total_steps(74, 5004), 370296)


class PlateauWarningTest(absltest.TestCase):
    def test_too_few_validations_for_the_rule_are_said(self):
        from vgg_jax.training import loop

        config = paper.paper_config("A", "s256")
        config.schedule.num_epochs, config.evals.every_epochs = 2.5, 5  # no validation at all
        with self.assertLogs(level="WARNING") as logs:
            loop.warn_if_the_plateau_rule_cannot_act(config)
        # Was "2 epochs with ...": the epochs as given, not rounded down.
        self.assertIn(
            "2.5 epochs with a validation every 5: 0 validations, and the plateau rule needs 3",
            logs.output[0],
        )
        config.schedule.num_epochs, config.evals.every_epochs = 3, 1  # 3 validations: enough
        with self.assertNoLogs(level="WARNING"):
            loop.warn_if_the_plateau_rule_cannot_act(config)


class OptimizerTest(absltest.TestCase):
    def test_l2_on_kernels_added_to_gradient_before_momentum(self):
        config = ml_collections.ConfigDict(dict(learning_rate=0.1, momentum=0.9, weight_decay=0.5))
        tx = optim.make_optimizer(config)
        params = {"conv": {"kernel": jnp.array([2.0]), "bias": jnp.array([2.0])}}
        grads = {"conv": {"kernel": jnp.array([1.0]), "bias": jnp.array([1.0])}}
        state = tx.init(params)
        first, state = tx.update(grads, state, params)
        # kernel: g + wd * w = 1 + 0.5 * 2 = 2; bias: no decay.
        self.assertEqual(float(first["conv"]["kernel"][0]), 2.0)
        self.assertEqual(float(first["conv"]["bias"][0]), 1.0)
        second, _ = tx.update(grads, state, params)
        self.assertAlmostEqual(float(second["conv"]["kernel"][0]), 0.9 * 2.0 + 2.0)
        self.assertAlmostEqual(float(second["conv"]["bias"][0]), 1.9, places=6)

    def test_adam_option_and_unknown_name(self):
        config = paper.optim_config()
        config.name = "adam"
        params = {"fc1": {"kernel": jnp.array([2.0, -1.0]), "bias": jnp.array([1.0])}}
        grads = {"fc1": {"kernel": jnp.array([1e-3, 5.0]), "bias": jnp.array([-3.0])}}
        tx = optim.make_optimizer(config)
        updates, _ = tx.update(grads, tx.init(params), params)
        # Adam's first step is the sign of the (L2-augmented) gradient, whatever its size.
        np.testing.assert_allclose(updates["fc1"]["kernel"], [1.0, 1.0], rtol=1e-3)
        np.testing.assert_allclose(updates["fc1"]["bias"], [-1.0], rtol=1e-3)
        config.name = "rmsprop"
        with self.assertRaisesRegex(ValueError, "'adam'"):
            optim.make_optimizer(config)

    def test_kernel_mask(self):
        params = {"fc1": {"kernel": 1, "bias": 2}, "block1_conv1": {"kernel": 3, "bias": 4}}
        mask = optim.kernel_mask(jax.tree_util.tree_map(jnp.asarray, params))
        self.assertEqual(
            mask,
            {
                "fc1": {"kernel": True, "bias": False},
                "block1_conv1": {"kernel": True, "bias": False},
            },
        )


if __name__ == "__main__":
    absltest.main()
