"""The matrix-product form of small convolutions (vgg_jax/conv_lowering.py) computes XLA's
convolution, is used exactly where its rule says, and leaves the net's outputs and gradients as
they were."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from vgg_jax import conv_lowering, models


def xla_conv(x, w, padding):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def primitive_names(fn, *args) -> list[str]:
    return [eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


class ShiftedMatmulConvTest(parameterized.TestCase):
    @parameterized.parameters(
        ((2, 2), 3, ((1, 1), (1, 1))),
        ((2, 3), 3, ((1, 1), (1, 1))),
        ((5, 4), 3, ((1, 1), (1, 1))),
        ((3, 3), 5, ((2, 2), (2, 2))),
        ((4, 6), 3, ((0, 2), (1, 0))),  # uneven padding
        ((3, 2), 1, ((0, 0), (0, 0))),
    )
    def test_values_and_gradients_equal_xla_convolution(self, hw, k, padding):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((3, *hw, 5)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, 5, 7)), jnp.float32)
        np.testing.assert_allclose(
            conv_lowering.shifted_matmul_conv(x, w, padding),
            xla_conv(x, w, padding),
            rtol=1e-5,
            atol=1e-5,
        )

        def loss(conv, x, w):
            return jnp.sum(jnp.sin(conv(x, w, padding)))

        ours = jax.grad(lambda x, w: loss(conv_lowering.shifted_matmul_conv, x, w), (0, 1))(x, w)
        theirs = jax.grad(lambda x, w: loss(xla_conv, x, w), (0, 1))(x, w)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


class RuleTest(absltest.TestCase):
    def lowered_as(self, hw, k, **kwargs):
        x = jnp.zeros((2, *hw, 4))
        w = jnp.zeros((k, k, 4, 8))
        names = primitive_names(
            lambda x, w: conv_lowering.conv_general_dilated(
                x,
                w,
                kwargs.pop("strides", (1, 1)),
                [(k // 2, k // 2)] * 2,
                dimension_numbers=jax.lax.conv_dimension_numbers(
                    x.shape, w.shape, ("NHWC", "HWIO", "NHWC")
                ),
                **kwargs,
            ),
            x,
            w,
        )
        return "matmul" if "dot_general" in names else "conv"

    def test_matmul_where_the_map_has_fewer_pixels_than_the_kernel_has_taps(self):
        self.assertEqual(self.lowered_as((2, 2), 3), "matmul")
        self.assertEqual(self.lowered_as((2, 3), 3), "matmul")
        self.assertEqual(self.lowered_as((1, 4), 3), "matmul")
        self.assertEqual(self.lowered_as((4, 4), 5), "matmul")
        self.assertEqual(self.lowered_as((3, 3), 3), "conv")
        self.assertEqual(self.lowered_as((2, 8), 3), "conv")
        self.assertEqual(self.lowered_as((2, 2), 1), "conv")

    def test_xla_convolution_for_what_the_matmul_form_does_not_cover(self):
        self.assertEqual(self.lowered_as((2, 2), 3, strides=(2, 2)), "conv")
        self.assertEqual(self.lowered_as((2, 2), 3, rhs_dilation=(2, 2)), "conv")
        with mock.patch.object(jax, "default_backend", return_value="gpu"):
            self.assertEqual(self.lowered_as((2, 2), 3), "conv")


class NetTest(absltest.TestCase):
    """Configuration A at 1/8 width on 32-pixel crops (the demo's net): its last block works on
    2x2 maps, so its two convs take the matmul form; the net's logits and gradients are those of
    XLA's convolutions throughout."""

    def test_last_block_as_matmul_same_logits_and_gradients(self):
        model = models.VGG(models.LAYOUTS["A"], num_classes=10, crop_size=32, width=1 / 8,
                           fc_width=16, dropout_rate=0.0)  # fmt: skip
        images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
        params = model.init(jax.random.key(0), images)["params"]

        def loss(params):
            return jnp.sum(jax.nn.log_softmax(model.apply({"params": params}, images))[:, 0])

        names = primitive_names(lambda p: model.apply({"params": p}, images), params)
        self.assertEqual(names.count("conv_general_dilated"), 6)  # 8 convs, 2 on 2x2 maps
        ours = (model.apply({"params": params}, images), jax.grad(loss)(params))
        with mock.patch.object(conv_lowering, "fewer_pixels_than_taps", return_value=False):
            names = primitive_names(lambda p: model.apply({"params": p}, images), params)
            self.assertEqual(names.count("conv_general_dilated"), 8)
            theirs = (model.apply({"params": params}, images), jax.grad(loss)(params))
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    absltest.main()
