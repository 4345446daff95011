"""vgg_jax's .npz and .safetensors exports: bit-exact round trips, the safetensors layout; the
torchvision .pth export."""

import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl.testing import absltest, parameterized

from tests import fixtures
from vgg_jax import checkpoint, conventions, data, models
from vgg_jax.configs import paper
from vgg_jax.weights import export, importer
from vgg_jax.weights import torchvision as torch_weights


def tiny_params(seed=0):
    """Random values in the shapes of a small net A (no init to compile: values do not matter)."""
    config = paper.model_config("A")
    config.update(dict(num_classes=5, width=1 / 16, fc_width=16))
    shapes = models.abstract_params(models.build_model(config, crop_size=32))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)


def assert_bitwise_equal(test, actual, expected):
    test.assertEqual(jax.tree_util.tree_structure(actual), jax.tree_util.tree_structure(expected))
    leaves = jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)
    for a, e in zip(*leaves, strict=True):
        test.assertEqual(a.dtype, e.dtype)
        test.assertEqual(a.shape, e.shape)
        test.assertEqual(a.tobytes(), e.tobytes())


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExportTest(parameterized.TestCase):
    def setUp(self):
        self.tmp = self.create_tempdir().full_path
        self.params = tiny_params()
        # Other dtypes must survive too, bfloat16 (which .npy cannot name) and -0.0/nan bits.
        self.params["extra"] = {
            "bf16": np.array([1.5, -0.0, np.inf], ml_dtypes.bfloat16),
            "half": np.array([np.nan, -0.0], np.float16),
            "ints": np.arange(6, dtype=np.int64).reshape(2, 3),
        }
        self.meta = {"net": "A", "input_convention": dict(conventions.CAFFE), "note": "é"}

    @parameterized.parameters(".npz", ".safetensors")
    def test_round_trip_is_bitwise(self, suffix):
        path = os.path.join(self.tmp, "weights" + suffix)
        export.save(path, self.params, self.meta)
        params, meta = export.load(path)
        assert_bitwise_equal(self, params, self.params)
        self.assertEqual(meta, json.loads(json.dumps(self.meta)))
        self.assertEmpty([n for n in os.listdir(self.tmp) if n.endswith(".tmp")])
        # Saving what was loaded gives the same file, byte for byte.
        again = os.path.join(self.tmp, "again" + suffix)
        export.save(again, params, meta)
        if suffix == ".safetensors":  # npz (zip) entries carry timestamps
            self.assertEqual(read_bytes(path), read_bytes(again))

    def test_jax_arrays_export_like_numpy(self):
        path = os.path.join(self.tmp, "jax.npz")
        export.save_npz(path, jax.tree_util.tree_map(jnp.asarray, tiny_params(1)), {})
        params, meta = export.load_npz(path)
        assert_bitwise_equal(self, params, tiny_params(1))
        self.assertEqual(meta, {})

    def test_safetensors_layout_follows_the_spec(self):
        path = os.path.join(self.tmp, "w.safetensors")
        export.save_safetensors(path, self.params, self.meta)
        blob = read_bytes(path)
        (size,) = struct.unpack("<Q", blob[:8])
        self.assertEqual((8 + size) % 8, 0)
        header = json.loads(blob[8 : 8 + size])
        meta = json.loads(header.pop("__metadata__")["vgg_jax"])
        self.assertEqual(meta, json.loads(json.dumps(self.meta)))
        entry = header["fc1/kernel"]
        self.assertEqual(entry["dtype"], "F32")
        self.assertEqual(entry["shape"], list(self.params["fc1"]["kernel"].shape))
        begin, end = entry["data_offsets"]
        data = np.frombuffer(blob[8 + size + begin : 8 + size + end], "<f4")
        np.testing.assert_array_equal(data.reshape(entry["shape"]), self.params["fc1"]["kernel"])
        self.assertEqual(header["extra/bf16"]["dtype"], "BF16")
        # The tensors tile the buffer with no gaps, as the format requires.
        spans = sorted(e["data_offsets"] for e in header.values())
        self.assertEqual(spans[0][0], 0)
        self.assertEqual(spans[-1][1], len(blob) - 8 - size)
        for (_, end), (begin, _) in zip(spans[:-1], spans[1:], strict=True):
            self.assertEqual(end, begin)

    def test_corrupt_and_foreign_files_fail_clearly(self):
        path = os.path.join(self.tmp, "w.safetensors")
        export.save_safetensors(path, self.params, self.meta)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 4)
        with self.assertRaisesRegex(ValueError, "data_offsets"):
            export.load_safetensors(path)
        plain = os.path.join(self.tmp, "plain.npz")
        np.savez(plain, a=np.zeros(3))
        with self.assertRaisesRegex(ValueError, "not written by vgg_jax"):
            export.load_npz(plain)
        with self.assertRaisesRegex(ValueError, "is not an .npz file"):
            export.load_npz(path)
        with self.assertRaisesRegex(ValueError, "valid: \\['.npz', '.safetensors'\\]"):
            export.save(os.path.join(self.tmp, "w.pt"), self.params)

    def saved_run(self, seed: int, convention) -> tuple[str, object]:
        """A workdir holding net A's ``tiny_params(seed)`` at step 4; returns it and its config."""
        workdir = os.path.join(self.tmp, "run")
        config = paper.paper_config("A", None)
        checkpoint.save_params(
            workdir, tiny_params(seed), step=4, config=config, input_convention=convention
        )
        return workdir, config

    def test_export_checkpoint_carries_net_config_and_convention(self):
        workdir, _ = self.saved_run(2, conventions.TORCHVISION)
        path = os.path.join(self.tmp, "run.safetensors")
        export.export_checkpoint(workdir, path)
        params, meta = export.load(path)
        assert_bitwise_equal(self, params, tiny_params(2))
        self.assertEqual(meta["net"], "A")
        self.assertEqual(meta["step"], 4)
        self.assertEqual(conventions.checked(meta["input_convention"]), conventions.TORCHVISION)
        self.assertEqual(meta["config"]["model"]["name"], "A")

    def test_a_pth_export_is_torchvisions_state_dict_of_the_same_net(self):
        workdir, config = self.saved_run(3, conventions.CAFFE)
        path = os.path.join(self.tmp, "run.pth")
        meta = export.export_checkpoint(workdir, path)
        self.assertEqual(conventions.checked(meta["input_convention"]), conventions.CAFFE)
        self.assertEmpty([n for n in os.listdir(self.tmp) if n.endswith(".tmp")])
        state_dict = torch_weights.read_pth(path)
        self.assertEqual(list(state_dict)[:2], ["features.0.weight", "features.0.bias"])
        self.assertEqual(state_dict["features.0.weight"].shape, (4, 3, 3, 3))  # (out, in, kh, kw)
        net, params = torch_weights.load_torchvision_weights(path)
        self.assertEqual(net, "A")
        assert_bitwise_equal(self, params, tiny_params(3))
        config.model.name = "C"  # 1x1 convs: torchvision has no such net
        checkpoint.save_params(workdir, tiny_params(3), step=5, config=config)
        with self.assertRaisesRegex(ValueError, "torchvision has no net 'C'"):
            export.export_checkpoint(workdir, os.path.join(self.tmp, "c.pth"))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "c.pth")))

    def test_a_pth_export_imports_back_with_its_convention_config_and_classes(self):
        # A net trained here sees mean-subtracted 0-255 RGB (section 2.1), not torchvision's
        # standardised 0-1 inputs; its .pth read back as torchvision's scored every image with
        # the wrong inputs, a Q of 256 for a 32-pixel net and class indices for names.
        workdir = os.path.join(self.tmp, "run")
        config = paper.paper_config("A", None)
        config.model.update(dict(num_classes=5, width=1 / 16, fc_width=16))
        config.input.crop_size = 32
        config.evals.single_scale = 48
        convention = conventions.mean_subtracted((120.0, 115.0, 100.0), (50.0, 50.0, 50.0))
        names = ["disk", "ring", "square", "star", "cross"]
        checkpoint.save_params(workdir, tiny_params(4), 9, config, dict(convention), names)
        path = os.path.join(self.tmp, "run.pth")
        export.export_checkpoint(workdir, path)
        self.assertEqual(list(torch_weights.read_pth(path))[0], "features.0.weight")  # unchanged
        imported = os.path.join(self.tmp, "imported")
        importer.import_to_checkpoint(path, "torchvision", imported)
        params, step, meta = checkpoint.restore_params(imported)
        assert_bitwise_equal(self, jax.device_get(params), tiny_params(4))
        self.assertEqual(conventions.checked(meta["input_convention"]), convention)
        self.assertEqual(meta["class_names"], names)
        self.assertEqual(meta["config"], checkpoint.jsonable(config.to_dict()))

    def test_nan_parameters_are_not_exported(self):
        # A .pth goes to PyTorch, where nothing checks it: every image would score NaN there.
        workdir = os.path.join(self.tmp, "run")
        params = tiny_params(5)
        params["block3_conv2"]["kernel"][0, 0, 0, :2] = [np.nan, np.inf]
        checkpoint.save_params(workdir, params, 6, paper.paper_config("A", None), conventions.CAFFE)
        for suffix in export.EXPORT_FORMATS:
            path = os.path.join(self.tmp, "run" + suffix)
            with self.assertRaisesRegex(
                ValueError, r"step 6 holds NaN or infinite parameters: block3_conv2/kernel \(2\)"
            ):
                export.export_checkpoint(workdir, path)
            self.assertFalse(os.path.exists(path))

    def test_a_checkpoint_without_a_recorded_convention_gets_its_training_sets(self):
        # Saved before checkpoints recorded it: the file said None, and import_weights offered
        # only torchvision's and Caffe's conventions, neither the one the net was trained with.
        config = fixtures.tiny_config("A", **{"input.pixel_std": (60.0, 60.0, 60.0)})
        workdir = os.path.join(self.tmp, "old")
        params = jax.tree_util.tree_map(
            lambda s: np.full(s.shape, 0.01, np.float32),
            models.abstract_params(models.build_model(config.model, config.input.crop_size)),
        )
        checkpoint.save_params(workdir, params, 3, config, None)
        meta = export.export_checkpoint(workdir, os.path.join(self.tmp, "old.npz"))
        mean = data.dataset_info(config).mean_rgb
        expected = conventions.mean_subtracted(mean, (60.0, 60.0, 60.0))
        self.assertEqual(conventions.checked(meta["input_convention"]), expected)
        _, written = export.load(os.path.join(self.tmp, "old.npz"))
        self.assertEqual(conventions.checked(written["input_convention"]), expected)


class ExportCommandTest(absltest.TestCase):
    def test_bad_output_and_workdir_are_one_line(self):
        tmp = self.create_tempdir().full_path
        with open(f"{tmp}/kept.npz", "w") as f:
            f.write("an earlier export")
        for flags, says in (
            ([f"--workdir={tmp}", f"--out={tmp}/w.pt"], "unknown weight file suffix '.pt'"),
            ([f"--workdir={tmp}", f"--out={tmp}/no/w.npz"], f"no folder {tmp}/no"),
            ([f"--workdir={tmp}/none", f"--out={tmp}/w.npz"], "No checkpoints in"),
            # today: an earlier export replaced without a word
            ([f"--workdir={tmp}", f"--out={tmp}/kept.npz"], "kept.npz exists; give another --out"),
            ([f"--workdir={tmp}", f"--out={tmp}"], "is a folder; name the file"),
        ):
            result = subprocess.run(
                [sys.executable, "-m", "vgg_jax.tools.export", *flags],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.assertNotEqual(result.returncode, 0)
            self.assertNotIn("Traceback", result.stderr)  # today: a traceback of 8-11 frames
            self.assertIn(says, result.stderr.strip().splitlines()[-1])
        with open(f"{tmp}/kept.npz") as f:
            self.assertEqual(f.read(), "an earlier export")


if __name__ == "__main__":
    absltest.main()
