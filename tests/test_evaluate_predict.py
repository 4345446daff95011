"""predict on one image (top-k, ImageNet names, score map) and the score-map pictures."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from tests import fixtures
from vgg_jax import checkpoint, conventions, models
from vgg_jax.configs import paper
from vgg_jax.evaluation import predict, score_map

CROP = 32


def imagenet_sized_tiny_model():
    config = paper.model_config("A")
    config.update(dict(num_classes=1000, width=1 / 16, fc_width=16))
    return models.build_model(config, CROP)


def numpy_params(model, seed=0):
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 0.1 if len(leaf.shape) == 1 else np.sqrt(1.0 / np.prod(leaf.shape[:-1]))
        return (rng.normal(size=leaf.shape) * scale).astype(np.float32)

    return jax.tree_util.tree_map(draw, models.abstract_params(model))


class PredictTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = imagenet_sized_tiny_model()
        cls.params = numpy_params(cls.model)
        rng = np.random.default_rng(1)
        cls.image = rng.integers(0, 256, size=(64, 96, 3)).astype(np.uint8)
        cls.input_convention = dict(mean=(120.0, 110.0, 100.0))

    def test_top_k_and_score_map_match_dense_evaluation(self):
        top, score_map = predict.predict(
            self.model, self.params, self.image, input_convention=self.input_convention, flip=False
        )
        self.assertEqual(score_map.shape, (2, 3, 1000))  # 64x96 at stride 32, 32-pixel window
        # The paper's convention, written out: RGB, 0-255, the mean subtracted, std 1.
        normalized = self.image.astype(np.float32) - np.float32(self.input_convention["mean"])
        _, scores = self.model.apply(
            {"params": self.params}, jnp.asarray(normalized)[None], method="dense"
        )
        probabilities = np.asarray(jax.nn.softmax(scores[0]))
        self.assertLen(top, 5)
        self.assertEqual([c.class_index for c in top], np.argsort(-probabilities)[:5].tolist())
        self.assertGreater(top[0].probability, top[4].probability)
        np.testing.assert_allclose(
            [c.probability for c in top], np.sort(probabilities)[::-1][:5], rtol=1e-5
        )
        np.testing.assert_allclose(score_map.mean(axis=(0, 1)), scores[0], rtol=1e-4, atol=1e-5)
        names = predict.imagenet_class_names()
        self.assertEqual(names[0], "tench, Tinca tinca")
        self.assertEqual(top[0].class_name, names[top[0].class_index])

        flipped_top, _ = predict.predict(
            self.model, self.params, self.image, input_convention=self.input_convention
        )
        _, mirrored = self.model.apply(
            {"params": self.params}, jnp.asarray(normalized)[None, :, ::-1], method="dense"
        )
        both = (probabilities + np.asarray(jax.nn.softmax(mirrored[0]))) / 2
        self.assertAlmostEqual(flipped_top[0].probability, float(both.max()), places=5)

    def test_a_net_trained_in_bfloat16_predicts_in_the_asked_dtype(self):
        """As evaluation computes in its config's model.dtype (float32 by default): predict used
        the checkpoint's, so a bfloat16-trained net's probabilities were not evaluation's."""
        config = fixtures.tiny_config(**{"model.num_classes": 1000, "model.dtype": "bfloat16"})
        workdir = self.create_tempdir().full_path
        convention = conventions.mean_subtracted((120.0, 110.0, 100.0))
        checkpoint.save_params(workdir, self.params, config=config, input_convention=convention)
        self.assertEqual(predict.load_predictor(workdir).model.dtype, jnp.float32)
        net = predict.load_predictor(workdir, dtype="bfloat16")
        self.assertEqual(net.model.dtype, jnp.bfloat16)

    def test_scale_names_and_errors(self):
        small = self.image[:40, :60]
        top, score_map = predict.predict(
            self.model,
            self.params,
            small,
            top_k=3,
            input_convention=self.input_convention,
            scale=64,
            class_names=[f"c{i}" for i in range(1000)],
        )
        self.assertEqual(score_map.shape[:2], (2, 3))  # rescaled to 64 x 96
        self.assertEqual(top[0].class_name, f"c{top[0].class_index}")
        self.assertLen(top, 3)
        with self.assertRaisesRegex(ValueError, "scale="):
            predict.predict(
                self.model, self.params, small[:24], input_convention=self.input_convention
            )
        with self.assertRaisesRegex(ValueError, "input_convention="):
            predict.predict(self.model, self.params, self.image)

    def test_a_net_with_nan_parameters_is_an_error_not_nan_percent(self):
        params = jax.tree_util.tree_map(np.copy, self.params)
        params["fc1"]["bias"][0] = np.nan
        with self.assertRaisesRegex(ValueError, "class scores are NaN"):
            predict.predict(self.model, params, self.image, input_convention=self.input_convention)

    def test_nan_image_and_bad_top_k_are_errors(self):
        nan_image = np.full(self.image.shape, np.nan, np.float32)
        with self.assertRaisesRegex(ValueError, "NaN or infinite"):
            predict.predict(
                self.model, self.params, nan_image, input_convention=self.input_convention
            )
        for top_k in (-1, 0):
            with self.assertRaisesRegex(ValueError, "top_k must be"):
                predict.predict(
                    self.model,
                    self.params,
                    self.image,
                    top_k,
                    input_convention=self.input_convention,
                )

    def test_class_names_ship_with_the_package_in_label_order(self):
        classes = predict.imagenet_classes()
        self.assertLen(classes, 1000)
        self.assertEqual(classes[0], ("n01440764", "tench, Tinca tinca"))
        self.assertEqual(classes[999][1], "toilet tissue, toilet paper, bathroom tissue")
        wnids = [wnid for wnid, _ in classes]
        self.assertEqual(wnids, sorted(wnids))  # TFDS's, torchvision's and Keras' label order
        self.assertLen(set(wnids), 1000)


class ReadImageTest(absltest.TestCase):
    def test_exif_orientation_is_applied_as_the_image_folder_applies_it(self):
        from tests import testdata

        stored = np.zeros((24, 40, 3), np.uint8)
        stored[:6, :10] = 255  # a white top-left corner shows the turn
        path = os.path.join(self.create_tempdir().full_path, "sideways.jpg")
        with open(path, "wb") as f:
            f.write(testdata.exif_jpeg(stored, 6))  # shown turned 90 degrees clockwise
        image = predict.read_image(path)
        self.assertEqual(image.shape, (40, 24, 3))  # today: (24, 40, 3), as stored
        self.assertGreater(image[:10, -6:].mean(), 200)  # the corner is now top right
        self.assertLess(image[-10:, :6].mean(), 50)


class ScoreMapPictureTest(absltest.TestCase):
    """The pictures: each map coloured over its own range, placed on the image, with its colour
    bar, class name, probability and Q; a grid of the top-k maps."""

    def setUp(self):
        # 1000 classes, almost uniform (as a real net's map): class 3 is most probable in the
        # top-right cell and least in the bottom-left one, by 0.1% of the total probability.
        self.score_map = np.zeros((2, 3, 1000), np.float32)
        self.score_map[..., 3] = [[0.0, 0.3, 0.9], [-0.5, 0.2, 0.4]]
        self.image = np.full((64, 96, 3), 128, np.uint8)

    def test_map_is_scaled_to_its_own_range(self):
        values = score_map.class_probability_map(self.score_map, 3)
        self.assertEqual(values.shape, (2, 3))
        self.assertLess(values.max(), 0.0025)  # black on a [0, 1] scale
        figure = score_map.render(self.image, self.score_map, 3, "goldfish, Carassius", 0.0011,
                                  scale=64, crop_size=CROP)  # fmt: skip
        image_axes = figure.axes[0]
        photo, heat = image_axes.get_images()
        self.assertEqual(heat.get_clim(), (values.min(), values.max()))
        self.assertAlmostEqual(heat.get_alpha(), score_map.MAP_ALPHA)
        self.assertEqual(heat.get_array().shape, (64, 96))  # the map on the image's pixels
        # The window centres carry the cell values: top-right most, bottom-left least.
        self.assertAlmostEqual(float(heat.get_array().max()), float(values.max()), places=6)
        self.assertAlmostEqual(float(heat.get_array().min()), float(values.min()), places=6)
        self.assertEqual(np.unravel_index(np.argmax(heat.get_array()), (64, 96))[0], 0)
        self.assertGreater(np.argmax(heat.get_array()) % 96, 64)
        np.testing.assert_array_equal(photo.get_array(), self.image)
        title = image_axes.get_title()
        self.assertIn("goldfish: 0.1%", title)
        self.assertIn("Q=64", title)
        colour_bar = figure.axes[1]
        self.assertEqual(colour_bar.get_ylim(), (values.min(), values.max()))
        self.assertIn("probability", colour_bar.get_ylabel())

    def test_cells_sit_at_their_window_centres(self):
        # A 100-pixel input, 32-pixel windows at stride 32, ceil-mode pools: 4 cells whose
        # windows start at 0, 32, 64, 96 (the last mostly padding); centres 16, 48, 80, 112.
        rows = np.arange(4, dtype=float)[:, None] * np.ones((1, 4))
        on_input = score_map.upsample(rows, 100, 100, CROP)
        # Pixel row r is at r + 0.5: rows 16, 48, 80 lie half a pixel past centres 0, 1, 2.
        np.testing.assert_allclose(on_input[[16, 48, 80], 0], np.array([0, 1, 2]) + 1 / 64)
        self.assertEqual(on_input[:16, 0].max(), 0)  # above the first centre: cell 0's value
        self.assertLess(on_input[99, 0], 3)  # the last centre (112) is past the edge
        # The original image at half the size: the same windows, at the same fractions.
        on_original = score_map.upsample(rows, 50, 50, CROP, input_size=(100, 100))
        np.testing.assert_allclose(on_original[:, 0], on_input[1::2, 0], atol=1 / 64)
        self.assertEqual(predict.rescaled_size(50, 80, 100), (100, 160))

    def test_rescaled_size_is_the_evaluation_pipelines(self):
        """predict tests an image at the size evaluation does, also where the long side lands
        on an exact half (201x192 at Q=224: 234.5, rounded to even)."""
        from vgg_jax.data import transforms

        heights, widths = np.meshgrid(np.arange(1, 420), np.arange(1, 200), indexing="ij")
        for scale in (32, 224, 256, 384):
            want_h, want_w = transforms.eval_size(heights, widths, scale)
            got = np.array(
                [
                    predict.rescaled_size(h, w, scale)
                    for h, w in zip(heights.ravel(), widths.ravel(), strict=True)
                ]
            )
            np.testing.assert_array_equal(got[:, 0], want_h.ravel(), err_msg=f"Q={scale}")
            np.testing.assert_array_equal(got[:, 1], want_w.ravel(), err_msg=f"Q={scale}")
        self.assertEqual(predict.rescaled_size(201, 192, 224), (234, 224))

    def test_png_size_and_colours(self):
        path = os.path.join(self.create_tempdir().full_path, "maps", "a.png")
        figure = score_map.render(self.image, self.score_map, 3, "goldfish", 0.5, scale=64,
                                  crop_size=CROP, width_inches=5.0, dpi=100)  # fmt: skip
        width, height = (figure.get_size_inches() * figure.dpi).round().astype(int)
        figure.canvas.draw()
        box = figure.axes[0].get_window_extent()  # the map's pixels, from the bottom left
        score_map.save(figure, path)
        import matplotlib.image

        picture = matplotlib.image.imread(path)  # float RGBA in [0, 1]
        self.assertEqual(picture.shape[:2], (height, width))
        self.assertEqual(width, 500)
        rows = slice(height - int(box.y1) + 2, height - int(box.y0) - 2)
        shown = picture[rows, int(box.x0) + 2 : int(box.x1) - 2, :3].mean(-1)
        self.assertGreater(shown.shape[0] * shown.shape[1], 250 * 200)
        # Bright where the class is most probable (top right), dark where least (bottom left),
        # though all cells lie within 0.1% of each other.
        h, w = shown.shape
        top_right = shown[: h // 4, -w // 4 :].mean()
        bottom_left = shown[-h // 4 :, : w // 4].mean()
        self.assertGreater(top_right, 0.6)
        self.assertLess(bottom_left, 0.35)

    def test_top_k_grid(self):
        top, _ = predict.predict(
            imagenet_sized_tiny_model(), numpy_params(imagenet_sized_tiny_model()),
            self.image, input_convention=dict(mean=(120.0, 110.0, 100.0)), top_k=3, flip=False,
        )  # fmt: skip
        figure = score_map.render_top_k(self.image, self.score_map, top, scale=64, crop_size=CROP)
        titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
        self.assertEqual(titles[0], "image 96x64")
        self.assertLen(titles, 4)
        for rank, (title, guess) in enumerate(zip(titles[1:], top, strict=True), start=1):
            self.assertTrue(title.startswith(f"{rank}. {guess.class_name.split(',')[0]}: "))
        self.assertLen(figure.axes, 1 + 2 * 3)  # the image, then a map and its bar per class
        path = score_map.save(figure, os.path.join(self.create_tempdir().full_path, "g.png"))
        self.assertTrue(os.path.getsize(path) > 1000)
        with self.assertRaisesRegex(ValueError, "class index below 1000"):
            score_map.class_probability_map(self.score_map, 1000)


if __name__ == "__main__":
    absltest.main()
