"""The jitted train step on 1, 4 and 2x2 (data x model) CPU devices gives the same parameters."""

import os
import types
from unittest import mock

import jax
import ml_collections
import numpy as np
from absl.testing import absltest
from jax._src import dispatch
from jax.sharding import PartitionSpec as P

from vgg_jax import models, sharding
from vgg_jax.configs import paper
from vgg_jax.training import optim, steps


def tiny_model_config():
    config = paper.model_config("B")
    config.update(dict(num_classes=5, width=1 / 16, fc_width=16, init="glorot"))
    return config


def synthetic_batches(count, batch_size=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, 5, batch_size).astype(np.int32),
        }
        for _ in range(count)
    ]


def train_steps(data: int, model: int, num_steps: int = 3):
    mesh_config = ml_collections.ConfigDict(dict(data=data, model=model))
    mesh = sharding.make_mesh(mesh_config, jax.devices()[: data * model])
    net = models.build_model(tiny_model_config(), crop_size=32)
    tx = optim.make_optimizer(paper.optim_config())
    state, shardings = steps.create_train_state(net, tx, mesh, seed=0)
    step = steps.make_train_step(net, tx, mesh, shardings, seed=0)
    losses = []
    for batch in synthetic_batches(num_steps):
        state, sums = step(state, sharding.global_batch(batch, mesh), np.float32(0.05))
        losses.append(float(sums["loss_sum"]))
    return state, losses


class ShardedStepTest(absltest.TestCase):
    def test_same_parameters_on_every_mesh(self):
        self.assertGreaterEqual(jax.device_count(), 4, "tests/conftest.py sets 4 CPU devices")
        reference, reference_losses = train_steps(1, 1)
        self.assertEqual(int(reference.step), 3)
        for data, model in ((4, 1), (2, 2)):
            state, losses = train_steps(data, model)
            np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
            jax.tree_util.tree_map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                jax.device_get(state.params),
                jax.device_get(reference.params),
            )
            if model == 2:
                self.assertEqual(state.params["fc1"]["kernel"].sharding.spec, P(None, "model"))
                self.assertEqual(state.params["fc2"]["kernel"].sharding.spec, P("model", None))
                momentum = state.opt_state[1].trace["fc1"]["kernel"]
                self.assertEqual(momentum.sharding.spec, P(None, "model"))
        # The step trained: parameters moved from their initial values.
        net = models.build_model(tiny_model_config(), crop_size=32)
        mesh = sharding.make_mesh(
            ml_collections.ConfigDict(dict(data=1, model=1)), jax.devices()[:1]
        )
        fresh, _ = steps.create_train_state(
            net, optim.make_optimizer(paper.optim_config()), mesh, 0
        )
        self.assertFalse(
            np.allclose(fresh.params["fc3"]["kernel"], reference.params["fc3"]["kernel"])
        )

    def test_mesh_must_match_devices(self):
        with self.assertRaisesRegex(ValueError, "does not match"):
            sharding.make_mesh(ml_collections.ConfigDict(dict(data=3, model=1)), jax.devices()[:4])
        # Called directly (a notebook), past launch.py's config check: model=0 divided by zero,
        # data=-2 made numpy's "cannot reshape" about a negative axis.
        for data, model, named in ((-1, 0, "mesh.model=0"), (-2, 2, "mesh.data=-2")):
            with self.assertRaisesRegex(ValueError, rf"^{named}: each axis is a device count"):
                config = ml_collections.ConfigDict(dict(data=data, model=model))
                sharding.make_mesh(config, jax.devices()[:4])

    def test_a_model_axis_across_processes_is_refused(self):
        """Two processes of two devices, ``mesh.data=1, mesh.model=4``: each process's share of
        a batch became the whole "global" batch on its devices, another one on each process."""
        devices = [types.SimpleNamespace(id=i, process_index=i // 2) for i in range(4)]
        with self.assertRaisesRegex(
            ValueError,
            r"^config.mesh.data=1 x config.mesh.model=-1: a model axis of 4 devices .* divides 2$",
        ):
            sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, model=-1)), devices)
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, model=2)), jax.devices())
        self.assertEqual(dict(mesh.shape), {"data": 2, "model": 2})  # rows of one process: fine


class XlaDefaultsTest(absltest.TestCase):
    def test_xla_defaults_drops_the_library_options_inside_only(self):
        from vgg_jax import xla_options

        shipped = xla_options.cpu_compiler_options()
        # Tests run on a CPU, with their own LLVM level in XLA_FLAGS (conftest.py), which wins.
        self.assertEqual(shipped, {"xla_cpu_experimental_ynn_fusion_type": ""})
        with self.assertRaises(KeyError), xla_options.xla_defaults():
            self.assertIsNone(xla_options.cpu_compiler_options())
            raise KeyError  # the options come back after an error too
        self.assertEqual(xla_options.cpu_compiler_options(), shipped)

    def test_llvm_level_two_unless_the_user_set_one(self):
        from vgg_jax import xla_options

        flags = os.environ.get("XLA_FLAGS", "")
        mine = flags.replace("--xla_backend_optimization_level=0", "")
        with mock.patch.dict(os.environ, {"XLA_FLAGS": mine}):
            self.assertEqual(
                xla_options.cpu_compiler_options()["xla_backend_optimization_level"], 2
            )
        with mock.patch.dict(
            os.environ, {"XLA_FLAGS": mine + " --xla_backend_optimization_level=1"}
        ):
            self.assertNotIn("xla_backend_optimization_level", xla_options.cpu_compiler_options())


if __name__ == "__main__":
    absltest.main()


class CompileAheadTest(absltest.TestCase):
    """``compile_ahead`` leaves the step's first call nothing to trace or compile."""

    def first_step_work(self, ahead: bool, batch_size: int = 8) -> list[str]:
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, model=1)))
        net = models.build_model(tiny_model_config(), crop_size=32)
        tx = optim.make_optimizer(paper.optim_config())
        _, abstract = steps.abstract_train_state(net, tx, mesh)
        step = steps.make_train_step(net, tx, mesh, steps.shardings_of(abstract), seed=0)
        if ahead:
            steps.compile_ahead(step, abstract, mesh, batch_size, 32)()
        state, _ = steps.create_train_state(net, tx, mesh, seed=0)
        batch = sharding.global_batch(synthetic_batches(1, batch_size)[0], mesh)
        work = []

        def listener(event: str, duration: float, **_) -> None:
            if event in (dispatch.JAXPR_TRACE_EVENT, dispatch.BACKEND_COMPILE_EVENT):
                work.append(event)

        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            jax.block_until_ready(step(state, batch, np.float32(0.05)))
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        return work

    def test_the_first_step_finds_its_program_compiled(self):
        self.assertIn(dispatch.JAXPR_TRACE_EVENT, self.first_step_work(ahead=False))
        self.assertEqual(self.first_step_work(ahead=True), [])

    def test_a_failed_compilation_is_raised_by_wait(self):
        mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, model=1)))
        net = models.build_model(tiny_model_config(), crop_size=32)
        tx = optim.make_optimizer(paper.optim_config())
        _, abstract = steps.abstract_train_state(net, tx, mesh)
        step = steps.make_train_step(net, tx, mesh, steps.shardings_of(abstract), seed=0)
        wait = steps.compile_ahead(step, abstract, mesh, 6, 32)  # 6 rows over 4 devices
        with self.assertRaisesRegex(ValueError, "divisible|evenly"):
            wait()
