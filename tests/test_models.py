"""Tests of vgg_jax.models: Table 1 layouts, Table 2 parameter counts, dense form, LRN, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import linen as nn

from vgg_jax import models
from vgg_jax.configs import paper

# The paper's Table 2, exact (torchvision / Keras counts; A-LRN equals A; C is D minus three
# 3x3->1x1 kernels).
PAPER_PARAMS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}
WEIGHT_LAYERS = {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}


def tiny(name="A", **kwargs):
    """A small-width net on 32x32 crops, for fast tests."""
    defaults = dict(num_classes=5, crop_size=32, width=1 / 16, fc_width=16, initializer="glorot")
    defaults.update(kwargs)
    return models.VGG(models.LAYOUTS[name], **defaults)


@functools.partial(jax.jit, static_argnums=0)  # eager Flax compiles every primitive: slow
def init(model, images):
    """``model``'s parameters for ``images``' shape, from key 0."""
    return model.init(jax.random.key(0), images)["params"]


@functools.partial(jax.jit, static_argnums=0)
def dense(model, params, images, sizes=None):
    """``model``'s dense form: ``(score_map, scores)``."""
    return model.apply({"params": params}, images, sizes, method="dense")


class ParameterCountTest(parameterized.TestCase):
    @parameterized.parameters(*PAPER_PARAMS.items())
    def test_paper_parameter_count(self, name, expected):
        config = paper.model_config(name)
        model = models.build_model(config, crop_size=224)
        params = models.abstract_params(model)
        self.assertEqual(models.count_params(params), expected)
        self.assertLen(params, WEIGHT_LAYERS[name])

    def test_config_c_has_three_1x1_convs(self):
        params = models.abstract_params(models.VGG(models.LAYOUTS["C"]))
        one_by_one = [n for n, p in params.items() if p["kernel"].shape[:2] == (1, 1)]
        self.assertEqual(one_by_one, ["block3_conv3", "block4_conv3", "block5_conv3"])

    def test_b_5x5_replaces_each_pair_of_3x3_convs_with_one_5x5(self):
        """Section 4.1: B's ten 3x3 convs become five 5x5 convs, same channels, same FC layers.
        Expected count by hand at 224 px: the convs' 5*5*C_in*C_out + C_out (10,860,672) plus the
        three FC layers of every net (123,642,856)."""
        config = paper.model_config("B-5x5")
        params = models.abstract_params(models.build_model(config, crop_size=224))
        self.assertEqual(models.count_params(params), 10_860_672 + 123_642_856)
        convs = {n: p["kernel"].shape for n, p in params.items() if "conv" in n}
        self.assertEqual(
            convs,
            {
                "block1_conv1": (5, 5, 3, 64),
                "block2_conv1": (5, 5, 64, 128),
                "block3_conv1": (5, 5, 128, 256),
                "block4_conv1": (5, 5, 256, 512),
                "block5_conv1": (5, 5, 512, 512),
            },
        )
        b_channels = [
            p["kernel"].shape[-1]
            for n, p in models.abstract_params(
                models.build_model(paper.model_config("B"), crop_size=224)
            ).items()
            if "conv" in n
        ]
        self.assertEqual([c[-1] for c in convs.values()], b_channels[::2])
        self.assertLen(params, 8)

    def test_unknown_names_fail_with_valid_ones(self):
        config = paper.model_config("F")
        with self.assertRaisesRegex(ValueError, r"'F'.*'A-LRN'"):
            models.build_model(config, 224)
        config = paper.model_config("D")
        config.dtype = "float16"
        with self.assertRaisesRegex(ValueError, "bfloat16"):
            models.build_model(config, 224)
        config.dtype = "float32"
        config.init = "xavier"
        with self.assertRaisesRegex(ValueError, "glorot"):
            models.build_model(config, 224)

    def test_summary_table_follows_the_layout(self):
        rows = models.layer_table(models.VGG(models.LAYOUTS["A-LRN"]))
        names = [row.name for row in rows]
        self.assertEqual(names[:3], ["block1_conv1", "block1_lrn", "block1_pool"])
        self.assertEqual(rows[names.index("block5_pool")].output_shape, (1, 7, 7, 512))
        self.assertEqual(sum(r.params for r in rows), PAPER_PARAMS["A-LRN"])


class DenseFormTest(absltest.TestCase):
    def setUp(self):
        self.model = tiny("B")
        self.params = init(self.model, jnp.zeros((1, 32, 32, 3)))

    def test_crop_sized_score_map_equals_logits(self):
        images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
        logits = self.model.apply({"params": self.params}, images)
        score_map, scores = self.model.apply({"params": self.params}, images, method="dense")
        self.assertEqual(score_map.shape, (2, 1, 1, 5))
        np.testing.assert_allclose(score_map[:, 0, 0], logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores, logits, rtol=1e-5, atol=1e-6)

    def test_full_size_score_map_shapes(self):
        model = models.VGG(models.LAYOUTS["D"], num_classes=10)
        params = models.abstract_params(model)
        for (h, w), expected in {
            (224, 224): (1, 1),
            (288, 352): (3, 5),
            (256, 384): (2, 6),
        }.items():
            images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
            score_map, scores = jax.eval_shape(
                lambda p, x: model.apply({"params": p}, x, method="dense"), params, images
            )
            self.assertEqual(score_map.shape, (1, *expected, 10))
            self.assertEqual(scores.shape, (1, 10))

    def test_score_map_is_the_classifier_head_slid_over_pool5(self):
        # With 64-pixel crops FC1 sees a 2x2 window of pool5, so the (H, W, C) row order of its
        # kernel matters. Each score-map cell must be the FC head applied to the pool5 window under
        # it (the whole image's features, so crops differ: dense evaluation sees context).
        model = tiny("A", crop_size=64)
        images = jax.random.normal(jax.random.key(2), (1, 96, 128, 3))
        params = init(model, images[:, :64, :64])
        (score_map, scores), state = model.apply(
            {"params": params}, images, method="dense", mutable=["intermediates"]
        )
        pool5 = state["intermediates"]["block5_pool"][0]
        self.assertEqual(pool5.shape[1:3], (3, 4))
        self.assertEqual(score_map.shape, (1, 2, 3, 5))

        def head(window):
            x = window.reshape(1, -1) @ params["fc1"]["kernel"] + params["fc1"]["bias"]
            x = jax.nn.relu(x) @ params["fc2"]["kernel"] + params["fc2"]["bias"]
            return jax.nn.relu(x) @ params["fc3"]["kernel"] + params["fc3"]["bias"]

        for i in range(2):
            for j in range(3):
                expected = head(pool5[:, i : i + 2, j : j + 2])
                np.testing.assert_allclose(score_map[:, i, j], expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(scores, score_map.mean((1, 2)), rtol=1e-6)

    def test_padded_image_with_sizes_equals_unpadded(self):
        model = tiny("A", crop_size=64)
        params = init(model, jnp.zeros((1, 64, 64, 3)))
        images = jax.random.normal(jax.random.key(3), (2, 75, 101, 3))
        score_map, scores = dense(model, params, images)
        # Pad into a larger bucket; garbage in the padding must not leak in.
        padded = jnp.full((2, 128, 160, 3), 7.0).at[:, :75, :101].set(images)
        sizes = jnp.array([[75, 101], [75, 101]])
        padded_map, padded_scores = dense(model, params, padded, sizes)
        self.assertEqual(score_map.shape, (2, 2, 3, 5))  # ceil(75/32) - 1, ceil(101/32) - 1
        np.testing.assert_allclose(padded_map[:, :2, :3], score_map, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(padded_scores, scores, rtol=1e-5, atol=1e-6)
        unmasked = dense(model, params, padded)[1]
        self.assertFalse(np.allclose(unmasked, scores, rtol=1e-3))

    def test_transposed_params_see_the_transposed_image(self):
        # 64-pixel crops: FC1 reads a 2x2 window of pool5, so its (H, W, C) rows must move too;
        # C has 1x1 convs and an odd-sized, padded image exercises the masks.
        for name in ("A", "C"):
            model = tiny(name, crop_size=64)
            params = init(model, jnp.zeros((1, 64, 64, 3)))
            images = jax.random.normal(jax.random.key(4), (2, 96, 128, 3))
            sizes = jnp.array([[96, 128], [75, 101]])
            score_map, scores = dense(model, params, images, sizes)
            flipped = models.transposed_params(model, params)
            transposed_map, transposed_scores = dense(
                model, flipped, jnp.swapaxes(images, 1, 2), sizes[:, ::-1]
            )
            np.testing.assert_allclose(
                jnp.swapaxes(transposed_map, 1, 2), score_map, rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(transposed_scores, scores, rtol=1e-5, atol=1e-6)
            # Not the same parameters with the image merely transposed.
            plain = dense(model, params, jnp.swapaxes(images, 1, 2))
            self.assertFalse(np.allclose(plain[1], scores, rtol=1e-3))

    def test_one_parameter_tree(self):
        images = jnp.zeros((1, 64, 96, 3))
        variables = self.model.init(jax.random.key(0), images, fully_convolutional=True)
        shapes = jax.tree_util.tree_map(jnp.shape, variables["params"])
        self.assertEqual(shapes, jax.tree_util.tree_map(jnp.shape, self.params))

    def test_classifier_rejects_whole_images(self):
        with self.assertRaisesRegex(ValueError, "dense"):
            self.model.apply({"params": self.params}, jnp.zeros((1, 64, 64, 3)))


class BehaviourTest(absltest.TestCase):
    def test_dropout_only_in_training(self):
        model = tiny("A", dropout_rate=0.5)
        images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
        params = init(model, images)
        eval_a = model.apply({"params": params}, images)
        eval_b = model.apply({"params": params}, images, train=False)
        np.testing.assert_array_equal(eval_a, eval_b)
        rngs = lambda seed: {"dropout": jax.random.key(seed)}  # noqa: E731
        train_a = model.apply({"params": params}, images, train=True, rngs=rngs(1))
        train_b = model.apply({"params": params}, images, train=True, rngs=rngs(2))
        self.assertFalse(np.allclose(train_a, eval_a))
        self.assertFalse(np.allclose(train_a, train_b))

    def test_bfloat16_compute_float32_params(self):
        model = tiny("A", dtype=jnp.bfloat16)
        images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
        params = init(model, images)
        dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)}
        self.assertEqual(dtypes, {jnp.dtype(jnp.float32)})
        _, state = model.apply(
            {"params": params}, images, capture_intermediates=True, mutable=["intermediates"]
        )
        # The activations between layers are bfloat16 (a conv's own output is float32: its bias
        # is added in float32, ``models.promote_keeping_bias``).
        self.assertEqual(state["intermediates"]["block3_pool"][0].dtype, jnp.bfloat16)
        logits = model.apply({"params": params}, images)
        reference = tiny("A").apply({"params": params}, images)
        self.assertEqual(logits.dtype, jnp.float32)
        np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.05)

    def test_bfloat16_bias_gradients_are_summed_in_float32(self):
        # A bias's gradient sums its output's gradient over the batch and every position: 4,096
        # terms per channel in block 1 here. Summed in bfloat16 (XLA:CPU accumulates a bfloat16
        # reduction in bfloat16) it was 3-6% off at the demo's sizes and up to 33% at 224-pixel
        # crops; the tolerance is float32's.
        model = tiny("A", dtype=jnp.bfloat16, num_classes=10)
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, 10, 4))
        params = init(model, images)
        layers = ("block1_conv1", "block2_conv1", "fc1", "fc3")

        def add_offsets(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            name = context.module.name
            if context.method_name == "__call__" and name in layers and offsets is not None:
                out = out + offsets[name]  # zeros: the gradient is the output's gradient
            return out

        def loss(params, given):
            nonlocal offsets
            offsets = given
            with nn.intercept_methods(add_offsets):
                logits = model.apply({"params": params}, images)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

        offsets = None
        _, state = model.apply(
            {"params": params}, images, capture_intermediates=True, mutable=["intermediates"]
        )
        zeros = {
            name: jnp.zeros_like(state["intermediates"][name]["__call__"][0]) for name in layers
        }
        grads, output_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, zeros)
        for name in layers:
            output_grad = np.asarray(output_grads[name], np.float64)
            expected = output_grad.reshape(-1, output_grad.shape[-1]).sum(axis=0)
            np.testing.assert_allclose(
                grads[name]["bias"], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max()
            )

    def test_lrn_matches_alexnet_formula(self):
        x = np.random.default_rng(0).normal(size=(2, 3, 4, 7)).astype(np.float32) * 30
        n, k, alpha, beta = 5, 2.0, 1e-4, 0.75
        expected = np.empty_like(x)
        channels = x.shape[-1]
        for c in range(channels):
            lo, hi = max(0, c - n // 2), min(channels - 1, c + n // 2)
            total = (x[..., lo : hi + 1] ** 2).sum(-1)
            expected[..., c] = x[..., c] / (k + alpha / n * total) ** beta
        np.testing.assert_allclose(models.local_response_norm(jnp.asarray(x)), expected, rtol=1e-5)

    def test_lrn_only_in_a_lrn(self):
        for name, has_lrn in (("A", False), ("A-LRN", True), ("E", False)):
            rows = models.layer_table(tiny(name), image_size=32)
            self.assertEqual(any(r.name.endswith("_lrn") for r in rows), has_lrn)

    def test_initialisers(self):
        images = jnp.zeros((1, 32, 32, 3))
        normal = tiny("A", width=1.0, initializer="paper_normal", init_std=0.01)
        params = init(normal, images)
        kernel = params["block4_conv1"]["kernel"]
        self.assertAlmostEqual(float(jnp.std(kernel)), 0.01, delta=0.0005)
        self.assertEqual(float(jnp.abs(params["block4_conv1"]["bias"]).max()), 0.0)
        glorot = tiny("A", width=1.0, initializer="glorot")
        params = init(glorot, images)
        kernel = params["block4_conv2"]["kernel"]  # fan_in = fan_out = 9 * 512
        limit = np.sqrt(6 / (2 * 9 * 512))
        self.assertLessEqual(float(jnp.abs(kernel).max()), limit)
        self.assertAlmostEqual(float(jnp.std(kernel)), limit / np.sqrt(3), delta=0.001)


class MaxPoolTest(parameterized.TestCase):
    """``max_pool_2x2``: ``nn.max_pool``'s values in Caffe's ceil mode, and the gradient of JAX's
    ``max`` (tied maxima share a window's gradient equally), ties included."""

    @parameterized.parameters(((6, 8),), ((5, 7),))
    def test_values_and_gradient_with_ties(self, hw):
        rng = np.random.default_rng(0)
        # Inputs >= 0 (pools follow a ReLU), 3 levels: most windows hold tied maxima.
        x = jnp.asarray(rng.integers(0, 3, (2, *hw, 3)), jnp.float32)
        pooled_hw = [-(-size // 2) for size in hw]
        cotangent = jnp.asarray(rng.standard_normal((2, *pooled_hw, 3)), jnp.float32)
        padding = [(0, hw[0] % 2), (0, hw[1] % 2)]
        pooled, pool_vjp = jax.vjp(models.max_pool_2x2, x)
        np.testing.assert_array_equal(pooled, nn.max_pool(x, (2, 2), (2, 2), padding))
        (gradient,) = pool_vjp(cotangent)

        def reshape_max(x):  # JAX's own rule for max, on the same zero-padded windows
            x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
            n, h, w, c = x.shape
            return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

        np.testing.assert_array_equal(gradient, jax.vjp(reshape_max, x)[1](cotangent)[0])
        # A window of k tied maxima gives each cotangent / k; most windows tie here.
        even = x[:, : hw[0] // 2 * 2, : hw[1] // 2 * 2]
        windows = even.reshape(2, hw[0] // 2, 2, hw[1] // 2, 2, 3)
        ties = (windows == windows.max(axis=(2, 4), keepdims=True)).sum(axis=(2, 4))
        self.assertGreater(float(jnp.mean(ties > 1)), 0.3)
        top_left = gradient[:, 0 : hw[0] // 2 * 2 : 2, 0 : hw[1] // 2 * 2 : 2]
        is_max = windows[:, :, 0, :, 0] == windows.max(axis=(2, 4))
        expected = np.where(is_max, cotangent[:, : hw[0] // 2, : hw[1] // 2] / ties, 0)
        np.testing.assert_allclose(top_left, expected, rtol=1e-6)
        if not (hw[0] % 2 or hw[1] % 2):  # a padded zero tied with a real one takes a share
            np.testing.assert_allclose(gradient.sum(), cotangent.sum(), rtol=1e-5)


if __name__ == "__main__":
    absltest.main()
