"""The predict command: a generated folder (JPEG, PNG, grayscale, truncated and broken files)
through an imported 1000-class checkpoint; top-k with ImageNet names, JSON, score maps, skips."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import absltest
from test_evaluate_predict import CROP, imagenet_sized_tiny_model, numpy_params

from vgg_jax import conventions
from vgg_jax.evaluation import predict
from vgg_jax.tools import predict as predict_tool
from vgg_jax.weights import export, importer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_folder(root):
    """Images the pipeline takes (JPEG, PNG under a .jpg name, grayscale, a truncated JPEG) and
    two it skips (text named .jpg, a JPEG whose data is garbage)."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "cats"))
    os.makedirs(os.path.join(root, "dogs"))
    colour = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(colour, quality=95).numpy()
    files = {
        "cats/a.jpg": jpeg,
        "cats/b.jpg": tf.io.encode_png(colour[:, :50]).numpy(),  # a PNG named .jpg
        "dogs/grey.jpeg": tf.io.encode_jpeg(grey).numpy(),
        "dogs/truncated.jpg": jpeg[: int(len(jpeg) * 0.8)],
        "dogs/text.jpg": b"this is not an image",
        "dogs/garbage.jpg": jpeg[:4] + bytes(200),
        "dogs/notes.txt": b"not listed: not an image extension",
    }
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return colour


class PredictCommandTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.folder = os.path.join(cls.tmp, "images")
        cls.colour = write_folder(cls.folder)
        model = imagenet_sized_tiny_model()
        cls.params = numpy_params(model)
        npz = os.path.join(cls.tmp, "net.npz")
        export.save_npz(npz, cls.params, {"net": "A", "input_convention": conventions.TORCHVISION})
        cls.workdir = os.path.join(cls.tmp, "imported")
        importer.import_to_checkpoint(npz, "npz", cls.workdir)
        cls.predictor = predict.load_predictor(cls.workdir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_same_named_images_keep_their_own_maps_and_links_are_followed(self):
        root = os.path.join(self.create_tempdir().full_path, "photos")
        for name in ("a/x/1.jpg", "b/x/1.jpg", "x/dup.jpg", "x/dup.png"):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            shutil.copy(os.path.join(self.folder, "cats/a.jpg"), os.path.join(root, name))
        elsewhere = os.path.join(self.create_tempdir().full_path, "y")
        os.makedirs(elsewhere)
        shutil.copy(os.path.join(self.folder, "cats/a.jpg"), os.path.join(elsewhere, "2.jpg"))
        os.symlink(elsewhere, os.path.join(root, "linked"))  # today: not searched
        os.symlink(root, os.path.join(root, "a", "loop"))  # a link back up: no endless walk
        os.symlink(os.path.join(root, "gone.jpg"), os.path.join(root, "x", "dangling.jpg"))
        images = predict_tool.list_images([root])
        self.assertIn(os.path.join(root, "linked", "2.jpg"), images)
        self.assertLen(images, 6)
        maps = os.path.join(self.tmp, "distinct_maps")
        results = predict_tool.predict_files(self.predictor, images, top_k=2, score_maps=maps)
        (dangling,) = [r for r in results if r["image"].endswith("dangling.jpg")]
        self.assertStartsWith(dangling["error"], "cannot be read")  # today: a traceback
        written = [p for r in results for p in r.get("score_maps", [])]
        self.assertLen(written, 2 * (len(images) - 1))
        self.assertLen(set(written), len(written))  # today: x_1 and x_dup written twice
        self.assertEqual(sorted(os.listdir(maps)), sorted(os.path.basename(p) for p in written))
        # Maps written into the input folder are not images of the next run (today: 10 more).
        inside = os.path.join(root, "maps")
        predict_tool.predict_files(self.predictor, images[:1], top_k=2, score_maps=inside)
        self.assertNotEmpty(os.listdir(inside))
        self.assertEqual(predict_tool.list_images([root], skip=inside), images)

    def test_folder_top_k_names_and_skipped_files(self):
        images = predict_tool.list_images([self.folder])
        self.assertEqual(
            [os.path.relpath(p, self.folder) for p in images],
            ["cats/a.jpg", "cats/b.jpg", "dogs/garbage.jpg", "dogs/grey.jpeg",
             "dogs/text.jpg", "dogs/truncated.jpg"],
        )  # fmt: skip
        maps = os.path.join(self.tmp, "maps")
        results = predict_tool.predict_files(
            self.predictor, images, top_k=3, scale=64, score_maps=maps
        )
        by_name = {os.path.relpath(r["image"], self.folder): r for r in results}
        self.assertEqual(by_name["dogs/text.jpg"]["error"], "not a JPEG or PNG")
        self.assertStartsWith(by_name["dogs/garbage.jpg"]["error"], "does not decode")
        for name in ("cats/a.jpg", "cats/b.jpg", "dogs/grey.jpeg", "dogs/truncated.jpg"):
            self.assertLen(by_name[name]["top"], 3)
            self.assertEqual(by_name[name]["scale"], 64)
        self.assertEqual(by_name["cats/a.jpg"]["size"], [48, 80])
        self.assertEqual(by_name["dogs/grey.jpeg"]["size"], [40, 40])

        # The command's numbers are predict's on the decoded file, with the net's convention.
        image = predict.read_image(os.path.join(self.folder, "cats/a.jpg"))
        expected, _ = predict.predict(
            self.predictor.model, self.params, image, top_k=3,
            input_convention=conventions.TORCHVISION, scale=64,
        )  # fmt: skip
        top = by_name["cats/a.jpg"]["top"]
        self.assertEqual([g["class_index"] for g in top], [g.class_index for g in expected])
        np.testing.assert_allclose(
            [g["probability"] for g in top], [g.probability for g in expected], rtol=1e-5
        )
        names = predict.imagenet_class_names()
        self.assertEqual(top[0]["class_name"], names[top[0]["class_index"]])

        written = by_name["cats/a.jpg"]["score_maps"]
        self.assertEqual(
            [os.path.basename(p) for p in written], ["cats_a_map.png", "cats_a_top3.png"]
        )
        for path in written:
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
        lines = predict_tool.format_result(by_name["cats/a.jpg"])
        self.assertIn("(80x48, tested at Q=64)", lines[0])
        self.assertRegex(lines[1], r"^  1\.  +\d+\.\d\d%  \S")
        self.assertEqual(
            predict_tool.format_result(by_name["dogs/text.jpg"]),
            [f"{by_name['dogs/text.jpg']['image']}: skipped, not a JPEG or PNG"],
        )

    def test_an_elongated_strip_is_skipped_not_blown_up(self):
        folder = os.path.join(self.tmp, "strips")
        os.makedirs(folder)
        rng = np.random.default_rng(1)
        for name, shape in (("strip.png", (4, 200, 3)), ("wide.png", (8, 128, 3))):
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(tf.io.encode_png(pixels).numpy())
        results = predict_tool.predict_files(
            self.predictor, predict_tool.list_images([folder]), top_k=2, scale=64
        )
        by_name = {os.path.basename(r["image"]): r for r in results}
        # 4x200 at Q=64 would be 64x3200 (today: computed); 8x128 (1:16) still is.
        self.assertRegex(by_name["strip.png"]["error"], "4x200 .* 64x3200; crop it first")
        self.assertLen(by_name["wide.png"]["top"], 2)
        self.assertIn("skipped", predict_tool.format_result(by_name["strip.png"])[0])

    def test_chosen_class_and_default_scale(self):
        self.assertEqual(self.predictor.test_scale, 256)  # the paper config's single-scale Q
        names = list(predict.imagenet_class_names())
        self.assertEqual(predict_tool.resolve_class("tench", names), 0)
        self.assertEqual(predict_tool.resolve_class("7", names), 7)
        self.assertEqual(predict_tool.resolve_class("Carassius", names), 1)
        self.assertEqual(predict_tool.resolve_class("n01443537", names), 1)  # its WordNet ID
        with self.assertRaisesRegex(ValueError, "matches .* classes"):
            predict_tool.resolve_class("shark", names)
        with self.assertRaisesRegex(ValueError, "No class named"):
            predict_tool.resolve_class("unicorn", names)
        maps = os.path.join(self.tmp, "chosen")
        path = os.path.join(self.folder, "cats/a.jpg")
        (result,) = predict_tool.predict_files(
            self.predictor, [path], top_k=2, scale=64, score_maps=maps, map_class="goldfish"
        )
        self.assertTrue(os.path.exists(os.path.join(maps, "cats_a_map.png")))
        import matplotlib.image

        self.assertEqual(matplotlib.image.imread(result["score_maps"][0]).shape[1], 500)

    def test_missing_paths(self):
        with self.assertRaisesRegex(FileNotFoundError, "No file or folder"):
            predict_tool.list_images([os.path.join(self.tmp, "nowhere")])
        empty = os.path.join(self.tmp, "empty")
        os.makedirs(empty, exist_ok=True)
        with self.assertRaisesRegex(FileNotFoundError, "No .jpg/.jpeg/.png files under"):
            predict_tool.list_images([empty])


@pytest.mark.slow
class PredictCommandLineTest(absltest.TestCase):
    def test_json_from_another_directory(self):
        tmp = self.create_tempdir().full_path
        folder = os.path.join(tmp, "images")
        write_folder(folder)
        model = imagenet_sized_tiny_model()
        npz = os.path.join(tmp, "net.npz")
        export.save_npz(
            npz, numpy_params(model), {"net": "A", "input_convention": conventions.CAFFE}
        )
        workdir = os.path.join(tmp, "imported")
        importer.import_to_checkpoint(npz, "npz", workdir)
        self.assertEqual(model.crop_size, CROP)
        command = [sys.executable, "-m", "vgg_jax.tools.predict", f"--workdir={workdir}"]
        result = subprocess.run(
            [*command, "--json", "--scale=64", "--top_k=2", folder],
            cwd=tmp,
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        parsed = json.load(io.StringIO(result.stdout))
        self.assertLen(parsed, 6)
        self.assertEqual(sum("error" in r for r in parsed), 2)
        self.assertLen(parsed[0]["top"], 2)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn("Unable to initialize backend", result.stderr)

        broken = subprocess.run(
            [*command, os.path.join(folder, "dogs/text.jpg")],
            cwd=tmp,
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(broken.returncode, 1)
        self.assertIn("skipped, not a JPEG or PNG", broken.stdout)
        self.assertNotIn("Traceback", broken.stderr)


class ResolveClassTest(absltest.TestCase):
    def test_a_class_named_by_a_number_is_chosen_by_its_name_not_its_index(self):
        names = sorted(str(i) for i in range(12))  # an image folder's 0..11, sorted as text
        self.assertEqual(names[:5], ["0", "1", "10", "11", "2"])
        self.assertEqual(names[predict_tool.resolve_class("2", names)], "2")  # was "10"
        self.assertEqual(names[predict_tool.resolve_class("11", names)], "11")  # was "9"
        self.assertEqual(predict_tool.resolve_class("12", [*names, "x"]), 12)  # not a name
        self.assertEqual(predict_tool.resolve_class("1", ["cat", "dog"]), 1)  # an index still


class ChosenClassTest(absltest.TestCase):
    def test_a_name_matches_in_either_unicode_form(self):
        # Class folders copied from a Mac are named decomposed; a keyboard types composed.
        names = ["cafe\u0301", "the\u0301 vert", "zebra"]
        self.assertEqual(predict_tool.resolve_class("caf\u00e9", names), 0)
        self.assertEqual(predict_tool.resolve_class("TH\u00c9 VERT", names), 1)
        self.assertEqual(predict_tool.resolve_class("th\u00e9", names), 1)


if __name__ == "__main__":
    absltest.main()
