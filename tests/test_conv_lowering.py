"""The matrix-product forms of convolutions (vgg_jax/conv_lowering.py) compute XLA's convolution
and its gradients, are used exactly where their rule says, and leave the net's outputs and
gradients as they were."""

import itertools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from vgg_jax import conv_lowering, models

XLA, IM2COL, COL2IM = conv_lowering.XLA, conv_lowering.IM2COL, conv_lowering.COL2IM


def xla_conv(x, w, padding):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def primitive_names(fn, *args) -> list[str]:
    """Every primitive ``fn`` traces to, including those inside custom-VJP calls."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


SHAPES = (
    ((2, 2), 3, ((1, 1), (1, 1))),
    ((2, 3), 3, ((1, 1), (1, 1))),
    ((5, 4), 3, ((1, 1), (1, 1))),
    ((3, 3), 5, ((2, 2), (2, 2))),
    ((4, 6), 3, ((0, 2), (1, 0))),  # uneven padding
    ((3, 2), 1, ((0, 0), (0, 0))),
)


class FormsTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.rng = np.random.default_rng(0)

    def inputs(self, hw, k, cin=5, cout=7):
        x = jnp.asarray(self.rng.standard_normal((3, *hw, cin)), jnp.float32)
        w = jnp.asarray(self.rng.standard_normal((k, k, cin, cout)), jnp.float32)
        return x, w

    @parameterized.parameters(*SHAPES)
    def test_matrix_forms_equal_xla_convolution(self, hw, k, padding):
        x, w = self.inputs(hw, k)
        for form in (conv_lowering.shifted_matmul_conv, conv_lowering.shifted_sum_conv):
            np.testing.assert_allclose(
                form(x, w, padding), xla_conv(x, w, padding), rtol=1e-5, atol=1e-5
            )

    @parameterized.parameters(*SHAPES)
    def test_every_choice_of_forms_gives_xla_values_and_gradients(self, hw, k, padding):
        x, w = self.inputs(hw, k, cin=3, cout=6)

        def loss(conv, x, w):
            return jnp.sum(jnp.sin(conv(x, w)))

        theirs = jax.grad(lambda x, w: loss(lambda x, w: xla_conv(x, w, padding), x, w), (0, 1))
        expected = theirs(x, w)
        for forms in itertools.product((XLA, IM2COL, COL2IM), repeat=3):
            conv = lambda x, w, forms=forms: conv_lowering.conv_in_forms(  # noqa: E731
                x, w, padding, forms, None
            )
            np.testing.assert_allclose(conv(x, w), xla_conv(x, w, padding), rtol=1e-5, atol=1e-5)
            ours = jax.grad(lambda x, w, conv=conv: loss(conv, x, w), (0, 1))(x, w)
            for a, b in zip(ours, expected, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=str(forms))


class RuleTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        # One device, as a training or evaluation run on one CPU (the tests see four).
        self.enter_context(mock.patch.object(conv_lowering, "chunks_allowed", return_value=True))

    def lowered_as(self, hw, k, cin=4, cout=16, batch=2, **kwargs):
        x = jnp.zeros((batch, *hw, cin))
        w = jnp.zeros((k, k, cin, cout))
        strides = kwargs.pop("strides", (1, 1))
        names = primitive_names(
            lambda x, w: conv_lowering.conv_general_dilated(
                x,
                w,
                strides,
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

    def forms(self, batch, hw, cin, cout, k=3):
        return conv_lowering.conv_forms(
            (batch, hw, hw, cin), (k, k, cin, cout), ((k // 2,) * 2,) * 2
        )

    def test_matmul_where_the_map_has_fewer_pixels_than_the_kernel_has_taps(self):
        self.assertEqual(self.lowered_as((2, 2), 3), "matmul")
        self.assertEqual(self.lowered_as((2, 3), 3), "matmul")
        self.assertEqual(self.lowered_as((1, 4), 3), "matmul")
        self.assertEqual(self.lowered_as((4, 4), 5), "matmul")
        self.assertEqual(self.lowered_as((3, 3), 3), "conv")
        self.assertEqual(self.lowered_as((2, 8), 3), "conv")
        self.assertEqual(self.lowered_as((2, 2), 1), "conv")
        self.assertEqual(self.forms(64, 2, 64, 64), (IM2COL, COL2IM, IM2COL))

    def test_few_channels_take_the_form_with_the_smaller_buffer_while_it_is_small(self):
        # The demo's first conv (an RGB batch of 64 at 32x32): im2col forward, 7 MB of columns.
        self.assertEqual(self.forms(64, 32, 3, 8), (IM2COL, COL2IM, XLA))
        self.assertEqual(self.forms(64, 32, 3, 64)[0], IM2COL)
        # Its second: 8 -> 16 channels is XLA's forward; the gradient (16 -> 8) is col2im.
        self.assertEqual(self.forms(64, 16, 8, 16), (XLA, COL2IM, XLA))
        self.assertEqual(self.forms(64, 16, 32, 8)[0], COL2IM)
        # Wider convs stay XLA's; a larger batch runs in chunks, a larger image in bands of rows,
        # and only a conv whose buffer for one output row is over MAX_BUFFER_BYTES stays XLA's.
        self.assertEqual(self.forms(64, 8, 16, 32), (XLA, XLA, XLA))
        self.assertEqual(self.forms(128, 32, 3, 8)[0], IM2COL)  # 14 MB of columns, 2 chunks
        self.assertEqual(self.forms(8, 224, 3, 64)[0], IM2COL)  # VGG16's first: 5.4 MB an image
        self.assertEqual(self.forms(1, 512, 3, 8)[0], IM2COL)  # 28 MB for one image: 4 bands
        widest = conv_lowering.MAX_BUFFER_BYTES // (9 * 3 * 4)  # whose row of columns fits
        for width, form in ((widest, IM2COL), (widest + 1, XLA)):
            shape = (1, 3, width, 3)
            self.assertEqual(conv_lowering.conv_forms(shape, (3, 3, 3, 8), ((1, 1),) * 2)[0], form)
        budget = conv_lowering.MAX_BUFFER_BYTES
        pixels = budget // (9 * 3 * 4)  # the largest map whose columns fit
        self.assertEqual(conv_lowering.few_channel_form(pixels, pixels, 9, 3, 8, 4), IM2COL)
        self.assertEqual(conv_lowering.few_channel_form(pixels + 1, pixels + 1, 9, 3, 8, 4), XLA)

    def test_the_gradients_run_in_their_forms(self):
        # 8 -> 16 channels on 16x16: the forward and kernel gradient are convolutions, the input
        # gradient a matrix product (the transpose of im2col).
        x, w = jnp.zeros((64, 16, 16, 8)), jnp.zeros((3, 3, 8, 16))

        def loss(x, w):
            numbers = ("NHWC", "HWIO", "NHWC")
            conv = conv_lowering.conv_general_dilated(
                x, w, (1, 1), [(1, 1)] * 2, None, None, numbers
            )
            return conv.sum()

        names = primitive_names(jax.grad(loss, (0, 1)), x, w)
        self.assertEqual(names.count("conv_general_dilated"), 2)
        self.assertEqual(names.count("dot_general"), 1)

    def test_xla_convolution_for_what_the_matmul_form_does_not_cover(self):
        self.assertEqual(self.lowered_as((2, 2), 3, strides=(2, 2)), "conv")
        self.assertEqual(self.lowered_as((2, 2), 3, rhs_dilation=(2, 2)), "conv")
        self.assertEqual(self.lowered_as((32, 32), 3, cin=3, strides=(2, 2)), "conv")
        with mock.patch.object(jax, "default_backend", return_value="gpu"):
            self.assertEqual(self.lowered_as((2, 2), 3), "conv")
            self.assertEqual(self.lowered_as((32, 32), 3, cin=3), "conv")

    def test_an_empty_output_map_is_xla_s(self):
        # A 5-row kernel on 3 rows (with no vertical padding): XLA gives an empty map; the
        # matrix forms' slices would not line up.
        x, w = jnp.ones((2, 3, 6, 3)), jnp.ones((5, 3, 3, 4))
        numbers = ("NHWC", "HWIO", "NHWC")
        out = conv_lowering.conv_general_dilated(
            x, w, (1, 1), ((0, 0), (1, 1)), None, None, numbers
        )
        self.assertEqual(out.shape, (2, 0, 6, 4))

    def test_below_float32_only_single_products_are_used(self):
        # col2im adds shifted pieces: in bfloat16 that sum would round where XLA's convolution
        # accumulates in float32; im2col's forward and its input gradient are single products.
        def forms(batch, hw, cin, cout, itemsize):
            return conv_lowering.conv_forms(
                (batch, hw, hw, cin), (3, 3, cin, cout), ((1, 1),) * 2, itemsize
            )

        self.assertEqual(forms(64, 32, 3, 8, 4), (IM2COL, COL2IM, XLA))
        self.assertEqual(forms(64, 32, 3, 8, 2), (IM2COL, XLA, XLA))
        self.assertEqual(forms(64, 16, 8, 16, 2), (XLA, XLA, XLA))
        self.assertEqual(forms(64, 16, 32, 8, 2)[0], XLA)
        self.assertEqual(forms(64, 2, 64, 64, 2), (IM2COL, XLA, IM2COL))
        self.assertEqual(forms(64, 16, 16, 3, 2)[1], IM2COL)  # 3 -> 16 gradient: a product


class DevicesTest(absltest.TestCase):
    def test_chunks_on_one_device_only(self):
        self.assertFalse(conv_lowering.chunks_allowed())  # the tests' four CPU devices
        with mock.patch.object(jax, "device_count", return_value=1):
            self.assertTrue(conv_lowering.chunks_allowed())


class ChunkTest(parameterized.TestCase):
    """A matrix form whose buffer outgrows ``MAX_BUFFER_BYTES`` runs the batch in chunks (on one
    device: the tests see four)."""

    def setUp(self):
        super().setUp()
        self.enter_context(mock.patch.object(conv_lowering, "chunks_allowed", return_value=True))

    @parameterized.parameters((1, 100), (7, 100), (8, 100), (9, 100), (128, 3), (5, 10_000))
    def test_chunks_fit_the_budget_and_cover_the_batch(self, batch, per_example):
        budget = 800
        with mock.patch.object(conv_lowering, "MAX_BUFFER_BYTES", budget):
            chunk = conv_lowering.batch_chunk(batch, per_example)
        fits = max(1, budget // per_example)
        chunks = -(-batch // chunk)
        self.assertEqual(chunks, -(-batch // fits))  # as few chunks as fit the budget
        self.assertLessEqual(chunk, fits)
        self.assertLess(chunks * chunk - batch, chunks)  # the filler is less than one a chunk
        if batch <= fits:
            self.assertEqual(chunk, batch)

    def forms_against_xla(self, forms, x_shape, budget, seed):
        """``conv_in_forms`` on random ``x_shape`` inputs (3 -> 4 channels, 3x3) at ``budget``:
        asserts XLA's values and gradients, returns the gradient program's primitives."""
        rng = np.random.default_rng(seed)
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, x_shape[-1], 4)), jnp.float32)
        padding = ((1, 1), (1, 1))

        def loss(conv, x, w):
            return jnp.sum(jnp.sin(conv(x, w)))

        ours = lambda x, w: conv_lowering.conv_in_forms(x, w, padding, forms, None)  # noqa: E731
        theirs = lambda x, w: xla_conv(x, w, padding)  # noqa: E731
        expected = (theirs(x, w), *jax.grad(lambda x, w: loss(theirs, x, w), (0, 1))(x, w))
        grad = jax.grad(lambda x, w: loss(ours, x, w), (0, 1))
        with mock.patch.object(conv_lowering, "MAX_BUFFER_BYTES", budget):
            names = primitive_names(grad, x, w)
            got = (ours(x, w), *grad(x, w))
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        return names

    @parameterized.parameters(
        ((IM2COL, COL2IM, XLA),), ((COL2IM, IM2COL, XLA),), ((IM2COL, COL2IM, IM2COL),)
    )
    def test_chunked_forms_give_xla_values_and_gradients(self, forms):
        # One example's buffer: im2col 30 pixels x 27, col2im 30 pixels x 36 floats; a budget
        # of two examples' runs the 5 examples in 3 chunks of 2, the last filled with a zero one.
        self.assertIn("scan", self.forms_against_xla(forms, (5, 6, 5, 3), 2 * 30 * 36 * 4, 2))
        # The default budget: one piece (another batch size: JAX caches the traced VJP by shape).
        grad = jax.grad(
            lambda x, w: conv_lowering.conv_in_forms(x, w, ((1, 1),) * 2, forms, None).sum(),
            (0, 1),
        )
        self.assertNotIn(
            "scan", primitive_names(grad, jnp.zeros((4, 6, 5, 3)), jnp.zeros((3, 3, 3, 4)))
        )

    @parameterized.parameters(
        ((IM2COL, COL2IM, XLA),), ((COL2IM, IM2COL, XLA),), ((IM2COL, COL2IM, IM2COL),)
    )
    def test_bands_of_rows_give_xla_values_and_gradients(self, forms):
        # One output row of im2col: 5 pixels x 27 floats. A budget of 4 rows cuts each example's
        # 10 rows into 3 bands of 4 (2 filler rows); col2im's rows (5 x 36 floats, each band
        # reading 2 rows more) into bands of 1 row.
        self.assertIn("scan", self.forms_against_xla(forms, (2, 10, 5, 3), 4 * 5 * 27 * 4, 3))

    def test_bands_split_an_example_into_equal_pieces_that_fit(self):
        x, w = jnp.zeros((1, 10, 5, 3)), jnp.zeros((3, 3, 3, 4))
        seen = []

        def recording(lhs, rhs, padding, precision=None):
            seen.append((lhs.shape, padding))
            return conv_lowering.shifted_matmul_conv(lhs, rhs, padding, precision)

        with mock.patch.object(conv_lowering, "MAX_BUFFER_BYTES", 4 * 5 * 27 * 4):
            out = conv_lowering._matrix_form(
                recording, x, w, ((1, 1), (1, 1)), None, 5 * 27 * 4, 10, 0
            )
        self.assertEqual(out.shape, (1, 10, 5, 4))
        # 3 bands of 4 output rows, each reading 6 input rows, vertical padding already applied.
        self.assertEqual(seen, [((1, 6, 5, 3), ((0, 0), (1, 1)))])


class NetTest(absltest.TestCase):
    """Configuration A at 1/8 width on 32-pixel crops (the demo's net): its first conv reads 3
    channels, its last block works on 2x2 maps, so three convs take a matrix form (and the second
    conv's input gradient); the net's logits and gradients are those of XLA's convolutions."""

    def test_matrix_forms_same_logits_and_gradients(self):
        model = models.VGG(models.LAYOUTS["A"], num_classes=10, crop_size=32, width=1 / 8,
                           fc_width=16, dropout_rate=0.0)  # fmt: skip
        images = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32, 32, 3)), jnp.float32)
        params = model.init(jax.random.key(0), images)["params"]

        def logits_and_gradients(params):
            def loss(params):
                return jnp.sum(jax.nn.log_softmax(model.apply({"params": params}, images))[:, 0])

            # A new jit each time: traced (and lowered) under the conv_forms in force.
            return jax.jit(lambda p: (model.apply({"params": p}, images), jax.grad(loss)(p)))(
                params
            )

        names = primitive_names(lambda p: model.apply({"params": p}, images), params)
        self.assertEqual(names.count("conv_general_dilated"), 5)  # 8 convs, 3 in matrix form
        ours = logits_and_gradients(params)
        all_xla = (XLA, XLA, XLA)
        with mock.patch.object(conv_lowering, "conv_forms", return_value=all_xla):
            names = primitive_names(lambda p: model.apply({"params": p}, images), params)
            self.assertEqual(names.count("conv_general_dilated"), 8)
            theirs = logits_and_gradients(params)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    absltest.main()
