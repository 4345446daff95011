"""torchvision import: .pth files read without PyTorch, logits equal to an NCHW reference."""

import argparse
import collections
import io
import os
import pickle
import struct
import zipfile

import jax
import numpy as np
from absl.testing import absltest, parameterized

from vgg_jax import conventions, models
from vgg_jax.weights import torchvision as torch_weights

TINY = dict(width=1 / 16, fc_width=32, num_classes=10)  # full depth and 224 crop, thin layers


def torchvision_state_dict(net, rng, width=1.0, fc_width=4096, num_classes=1000, fill=None):
    """A state dict with torchvision's key names and shapes for ``net``, made here from Table 1
    (not through vgg_jax's converter); ``fill(shape)`` makes the values."""
    fill = fill or (lambda shape: rng.normal(0, 0.1, shape).astype(np.float32))
    state_dict, channels, index = collections.OrderedDict(), 3, 0
    for block in models.LAYOUTS[net]:
        for out in block:
            out = max(1, round(out * width))
            state_dict[f"features.{index}.weight"] = fill((out, channels, 3, 3))
            state_dict[f"features.{index}.bias"] = fill((out,))
            channels, index = out, index + 2  # Conv2d, ReLU
        index += 1  # MaxPool2d
    inputs = channels * 7 * 7
    for index, outputs in ((0, fc_width), (3, fc_width), (6, num_classes)):
        state_dict[f"classifier.{index}.weight"] = fill((outputs, inputs))
        state_dict[f"classifier.{index}.bias"] = fill((outputs,))
        inputs = outputs
    return state_dict


def reference_logits(state_dict, images_nchw):
    """torchvision's VGG forward in float64 NumPy, NCHW throughout: 3x3 convs (cross-correlation,
    padding 1), ReLU, 2x2 max-pools, flatten in (C, H, W) order, then the classifier."""
    x = reference_features(state_dict, images_nchw)
    x = x.reshape(x.shape[0], -1)  # (C, H, W) order, as torch.flatten
    for layer in (0, 3, 6):
        weight = state_dict[f"classifier.{layer}.weight"].astype(np.float64)
        x = x @ weight.T + state_dict[f"classifier.{layer}.bias"]
        if layer != 6:
            x = np.maximum(x, 0)
    return x


def timm_state_dict(torchvision):
    """timm's layout of a torchvision state dict, as timm/models/vgg.py's ``_filter_fn`` makes
    it: FC1 a 7x7 conv ``pre_logits.fc1``, FC2 a 1x1 conv ``pre_logits.fc2``, FC3 ``head.fc``."""
    timm = collections.OrderedDict()
    for key, value in torchvision.items():
        key = key.replace("classifier.0", "pre_logits.fc1")
        key = key.replace("classifier.3", "pre_logits.fc2")
        key = key.replace("classifier.6", "head.fc")
        if key == "pre_logits.fc1.weight":
            value = value.reshape(value.shape[0], -1, 7, 7)
        if key == "pre_logits.fc2.weight":
            value = value.reshape(value.shape[0], -1, 1, 1)
        timm[key] = value
    return timm


def timm_reference_logits(timm, images_nchw):
    """timm's VGG forward in float64 NumPy: the features, ``pre_logits`` as a valid 7x7 conv
    and a 1x1 conv (each with ReLU), global average pooling, then ``head.fc``."""
    x = reference_features(timm, images_nchw)
    fc1 = timm["pre_logits.fc1.weight"].astype(np.float64)
    x = np.einsum("nchw,ochw->no", x, fc1) + timm["pre_logits.fc1.bias"]  # a 7x7 map -> 1x1
    x = np.maximum(x, 0)
    fc2 = timm["pre_logits.fc2.weight"].astype(np.float64)[:, :, 0, 0]
    x = np.maximum(x @ fc2.T + timm["pre_logits.fc2.bias"], 0)  # the 1x1 map pooled: itself
    return x @ timm["head.fc.weight"].astype(np.float64).T + timm["head.fc.bias"]


def reference_features(state_dict, images_nchw):
    """The conv part (``features``) of torchvision's and timm's VGG, in float64 NCHW."""
    x = images_nchw.astype(np.float64)
    convs = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("features.")})
    index = 0
    while index <= convs[-1] + 2:  # the last max-pool follows the last conv's ReLU
        if index in convs:
            weight = state_dict[f"features.{index}.weight"].astype(np.float64)
            bias = state_dict[f"features.{index}.bias"].astype(np.float64)
            padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
            height, width = x.shape[2:]
            out = sum(
                np.einsum(
                    "nchw,oc->nohw",
                    padded[:, :, dy : dy + height, dx : dx + width],
                    weight[:, :, dy, dx],
                    optimize=True,
                )
                for dy in range(3)
                for dx in range(3)
            )
            x = np.maximum(out + bias[None, :, None, None], 0)
            index += 2
        else:  # a max-pool
            n, c, h, w = x.shape
            x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
            index += 1
    return x


def write_legacy_pth(path, state_dict):
    """The pre-1.6 ``torch.save`` stream that torchvision's download files use: magic number,
    protocol version, sys info, the pickle, the storage keys, then each storage's bytes."""
    data_pkl, storages = torch_weights.pickle_state_dict(state_dict)
    with open(path, "wb") as f:
        for header in (
            torch_weights.LEGACY_MAGIC_NUMBER,
            torch_weights.LEGACY_PROTOCOL_VERSION,
            dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4)),
        ):
            pickle.dump(header, f, protocol=2)
        f.write(data_pkl)
        pickle.dump([str(k) for k in range(len(storages))], f, protocol=2)
        for array in storages:
            f.write(struct.pack("<q", array.size) + array.tobytes())


def write_checkpoint_pth(path, checkpoint):
    """``torch.save(checkpoint)`` of a training checkpoint: a dict of tensors, numbers and other
    picklable values (an ``argparse.Namespace``) with the state dict nested in it."""

    def tensors(value):
        if isinstance(value, np.ndarray):
            ref = torch_weights._StorageRef(str(len(storages)), value.dtype, value.size)
            storages.append(np.ascontiguousarray(value).reshape(-1))
            return torch_weights._TensorToSave(ref, value.shape)
        if isinstance(value, dict):
            return type(value)((k, tensors(v)) for k, v in value.items())
        return value

    storages = []
    buffer = io.BytesIO()
    torch_weights._StateDictPickler(buffer, protocol=2).dump(tensors(checkpoint))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        for key, array in enumerate(storages):
            archive.writestr(f"archive/data/{key}", array.tobytes())


class TorchvisionImportTest(parameterized.TestCase):
    @parameterized.parameters("D", "E")
    def test_logits_match_nchw_reference(self, net):
        rng = np.random.default_rng(0)
        state_dict = torchvision_state_dict(net, rng, **TINY)
        path = os.path.join(self.create_tempdir().full_path, "vgg.pth")
        torch_weights.save_pth(path, state_dict)
        imported_net, params = torch_weights.load_torchvision_weights(path)
        self.assertEqual(imported_net, net)

        pixels = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)  # RGB, NHWC
        # torchvision's preprocessing, written out: ToTensor then Normalize, in NCHW.
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        nchw = ((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2)
        expected = reference_logits(state_dict, nchw)

        model = models.VGG(models.LAYOUTS[net], **TINY)
        images = conventions.normalize(pixels, torch_weights.TORCHVISION_INPUT)
        logits = np.asarray(jax.jit(model.apply)({"params": params}, images))
        scale = np.abs(expected).max()
        self.assertGreater(scale, 1e-3)
        self.assertLess(np.abs(logits - expected).max() / scale, 1e-4)
        # The two images score differently: a wrong permutation could not pass by symmetry.
        self.assertGreater(np.abs(expected[0] - expected[1]).max(), 1e-3 * scale)

    @parameterized.parameters("D", "E")
    def test_full_size_shapes_and_fc1_permutation(self, net):
        rng = np.random.default_rng(1)
        state_dict = torchvision_state_dict(net, rng, fill=lambda shape: np.zeros(shape, "f4"))
        fc1 = rng.standard_normal((4096, 512 * 7 * 7), dtype=np.float32)
        state_dict["classifier.0.weight"] = fc1
        imported_net, params = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(imported_net, net)
        expected = models.abstract_params(models.VGG(models.LAYOUTS[net]))
        self.assertEqual(
            jax.tree_util.tree_map(np.shape, params), jax.tree_util.tree_map(np.shape, expected)
        )
        # vgg_jax row (h, w, c) of FC1 is torchvision column (c, h, w).
        h, w, c = rng.integers(0, 7, 100), rng.integers(0, 7, 100), rng.integers(0, 512, 100)
        out = rng.integers(0, 4096, 100)
        np.testing.assert_array_equal(
            params["fc1"]["kernel"][(h * 7 + w) * 512 + c, out], fc1[out, c * 49 + h * 7 + w]
        )

    @parameterized.parameters("A", "B", "D", "E")
    def test_inverse_conversion_round_trips(self, net):
        state_dict = torchvision_state_dict(net, np.random.default_rng(2), **TINY)
        imported_net, params = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(imported_net, net)
        back = torch_weights.state_dict_from_params(net, params)
        self.assertEqual(list(back), list(state_dict))
        for key, value in state_dict.items():
            np.testing.assert_array_equal(back[key], value)

    def test_zip_and_legacy_files_read_back_exactly(self):
        rng = np.random.default_rng(3)
        state_dict = torchvision_state_dict("A", rng, **TINY)
        state_dict["features.0.bias"] = state_dict["features.0.bias"].astype(np.float16)
        tmp = self.create_tempdir().full_path
        for name, write in (("zip.pth", torch_weights.save_pth), ("legacy.pth", write_legacy_pth)):
            path = os.path.join(tmp, name)
            write(path, state_dict)
            loaded = torch_weights.read_pth(path)
            self.assertEqual(list(loaded), list(state_dict))
            for key, value in state_dict.items():
                self.assertEqual(loaded[key].dtype, value.dtype)
                np.testing.assert_array_equal(loaded[key], value)
        with zipfile.ZipFile(os.path.join(tmp, "zip.pth")) as archive:
            self.assertIn("archive/data.pkl", archive.namelist())
            self.assertIn("archive/data/0", archive.namelist())

    def test_strided_tensor_is_rebuilt_from_its_storage(self):
        """A tensor saved as a view (a transposed weight, an offset slice) keeps its values."""
        storage = torch_weights._StorageRef("0", np.dtype("float32"), 12)
        values = np.arange(12, dtype=np.float32)
        transposed = torch_weights._TensorRef(storage, 0, (4, 3), (1, 4))
        sliced = torch_weights._TensorRef(storage, 5, (3,), (2,))
        np.testing.assert_array_equal(
            torch_weights._tensor_array(transposed, values), values.reshape(3, 4).T
        )
        np.testing.assert_array_equal(torch_weights._tensor_array(sliced, values), [5, 7, 9])
        outside = torch_weights._TensorRef(storage, 4, (3, 4), (4, 1))
        with self.assertRaisesRegex(ValueError, "outside its storage"):
            torch_weights._tensor_array(outside, values)

    def test_refuses_batch_norm_nets_and_foreign_pickles(self):
        state_dict = torchvision_state_dict("D", np.random.default_rng(4), **TINY)
        state_dict["features.1.running_mean"] = np.zeros(4, np.float32)
        with self.assertRaisesRegex(ValueError, "vgg\\*_bn"):
            torch_weights.params_from_state_dict(state_dict)
        state_dict = torchvision_state_dict("D", np.random.default_rng(4), **TINY)
        del state_dict["features.0.weight"], state_dict["features.0.bias"]
        with self.assertRaisesRegex(ValueError, "12 conv layers"):
            torch_weights.params_from_state_dict(state_dict)

        path = os.path.join(self.create_tempdir().full_path, "model.pth")
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps(collections.Counter(), protocol=2))
        with self.assertRaisesRegex(ValueError, "collections.Counter"):
            torch_weights.read_pth(path)  # a ValueError: the import command prints one line
        with open(path, "wb") as f:
            f.write(b"not a torch file")
        with self.assertRaisesRegex(ValueError, "not a file written by torch.save"):
            torch_weights.read_pth(path)

    @parameterized.parameters("A", "B", "D", "E")
    def test_timm_state_dicts_import_as_torchvision(self, net):
        rng = np.random.default_rng(7)
        torchvision = torchvision_state_dict(net, rng, **TINY)
        timm = timm_state_dict(torchvision)
        # The six keys timm renames, and its conv-shaped FC1/FC2 kernels.
        self.assertEqual(
            sorted(set(timm) - set(torchvision)),
            ["head.fc.bias", "head.fc.weight", "pre_logits.fc1.bias", "pre_logits.fc1.weight",
             "pre_logits.fc2.bias", "pre_logits.fc2.weight"],
        )  # fmt: skip
        channels = round(512 * TINY["width"])
        self.assertEqual(timm["pre_logits.fc1.weight"].shape, (32, channels, 7, 7))
        self.assertEqual(timm["pre_logits.fc2.weight"].shape, (32, 32, 1, 1))
        path = os.path.join(self.create_tempdir().full_path, "timm.pth")
        torch_weights.save_pth(path, timm)
        imported_net, params = torch_weights.load_torchvision_weights(path)
        self.assertEqual(imported_net, net)
        _, expected_params = torch_weights.params_from_state_dict(torchvision)
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected_params)
        if net not in ("D", "E"):
            return  # the logits of the deep nets suffice; the params are equal for all four
        pixels = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
        mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
        expected = timm_reference_logits(
            timm, ((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2)
        )
        model = models.VGG(models.LAYOUTS[net], **TINY)
        images = conventions.normalize(pixels, torch_weights.TORCHVISION_INPUT)
        logits = np.asarray(jax.jit(model.apply)({"params": params}, images))
        self.assertLess(np.abs(logits - expected).max() / np.abs(expected).max(), 1e-4)

    def test_a_file_cut_short_says_so(self):
        path = os.path.join(self.create_tempdir().full_path, "vgg.pth")
        torch_weights.save_pth(path, torchvision_state_dict("A", np.random.default_rng(6), **TINY))
        with open(path, "rb") as f:
            whole = f.read()
        for keep in (len(whole) // 2, len(whole) - 30):
            with open(path, "wb") as f:
                f.write(whole[:keep])
            with self.assertRaisesRegex(ValueError, "cut short"):
                torch_weights.read_pth(path)

    def test_a_legacy_file_cut_short_says_so_wherever_it_ends(self):
        """The legacy stream cut inside its pickle (an interrupted download of torchvision's own
        files): the error names the file and says it is cut short (today: pickle's bare "pickle
        data was truncated")."""
        path = os.path.join(self.create_tempdir().full_path, "vgg11-8a719046.pth")
        write_legacy_pth(path, torchvision_state_dict("A", np.random.default_rng(6), **TINY))
        with open(path, "rb") as f:
            whole = f.read()
        for keep in (200, 400, len(whole) // 2, len(whole) - 30):
            with open(path, "wb") as f:
                f.write(whole[:keep])
            with self.assertRaisesRegex(ValueError, "(cut short|truncated)") as raised:
                torch_weights.read_pth(path)
            self.assertTrue(str(raised.exception).startswith(path), (keep, raised.exception))

    def test_a_compiled_models_state_dict(self):
        """``torch.compile(model).state_dict()`` prefixes every key with ``_orig_mod.``, and
        ``DataParallel`` of a compiled model with ``module._orig_mod.`` (today: "Found 0 conv
        layers")."""
        state_dict = torchvision_state_dict("A", np.random.default_rng(5), **TINY)
        _, direct = torch_weights.params_from_state_dict(state_dict)
        for prefix in ("_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
            prefixed = {f"{prefix}{k}": v for k, v in state_dict.items()}
            net, params = torch_weights.params_from_state_dict({"model": prefixed, "epoch": 1})
            self.assertEqual(net, "A")
            jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)

    def test_an_averaged_models_state_dict(self):
        """``torch.optim.swa_utils.AveragedModel(model).state_dict()`` (SWA, EMA): ``n_averaged``
        beside the ``module.``-prefixed weights (today: "Found 0 conv layers")."""
        state_dict = torchvision_state_dict("A", np.random.default_rng(5), **TINY)
        averaged = {"n_averaged": np.array(12, np.int64)}
        averaged.update({f"module.{k}": v for k, v in state_dict.items()})
        net, params = torch_weights.params_from_state_dict(averaged)
        _, direct = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(net, "A")
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)

    def test_a_timm_training_checkpoint_with_its_arguments(self):
        """timm's train.py writes ``model_best.pth.tar`` as ``{"epoch", "arch", "optimizer",
        "version", "args": argparse.Namespace, "state_dict", "metric"}``: the arguments are read
        as a plain record (today: refused, "pickles argparse.Namespace ... not the model")."""
        state_dict = torchvision_state_dict("A", np.random.default_rng(5), **TINY)
        checkpoint = {
            "epoch": 3,
            "arch": "vgg11",
            "optimizer": {"state": {0: {"momentum_buffer": np.ones(3, np.float32)}}},
            "version": 2,
            "args": argparse.Namespace(model="vgg11", lr=0.05, epochs=[1, 2]),
            "state_dict": timm_state_dict(state_dict),
            "metric": 71.5,
        }
        # --model-ema adds the average beside the weights: the weights are imported, and said so.
        checkpoint["state_dict_ema"] = timm_state_dict(
            torchvision_state_dict("A", np.random.default_rng(6), **TINY)
        )
        path = os.path.join(self.create_tempdir().full_path, "model_best.pth.tar")
        write_checkpoint_pth(path, checkpoint)
        self.assertEqual(torch_weights.read_pth(path)["args"].model, "vgg11")
        with self.assertLogs(level="WARNING") as logs:
            net, params = torch_weights.load_torchvision_weights(path)
        self.assertIn("also holds 'state_dict_ema'", logs.output[0])
        _, direct = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(net, "A")
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)

    def test_numpy_values_beside_the_weights(self):
        """A checkpoint whose metric is a numpy number (``best_acc1 = np.float64(...)`` from a
        numpy mean) or that keeps a numpy array: read as numpy reads it (today: refused, "pickles
        numpy._core.multiarray.scalar ... not the model")."""
        state_dict = torchvision_state_dict("A", np.random.default_rng(5), **TINY)
        checkpoint = {
            "state_dict": state_dict,
            "best_acc1": np.float64(71.5),
            "epoch": np.int64(3),
            "history": [np.arange(4, dtype=np.float32)],  # a list: kept a numpy array, no tensor
        }
        path = os.path.join(self.create_tempdir().full_path, "checkpoint.pth.tar")
        write_checkpoint_pth(path, checkpoint)
        read = torch_weights.read_pth(path)
        self.assertEqual((read["best_acc1"], read["epoch"]), (71.5, 3))
        self.assertIsInstance(read["best_acc1"], np.float64)
        np.testing.assert_array_equal(read["history"][0], np.arange(4, dtype=np.float32))
        net, params = torch_weights.load_torchvision_weights(path)
        _, direct = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(net, "A")
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)

    def test_a_file_holding_no_state_dict_is_one_short_line(self):
        """``torch.save([state_dict])`` or ``torch.save(tensor)``: a ValueError, which the import
        command prints as one line, naming what was found (today: a TypeError, a traceback, whose
        message is the repr of every tensor in the file)."""
        state_dict = torchvision_state_dict("A", np.random.default_rng(5), **TINY)
        for obj, found in (
            ([state_dict], r"got a list of 1 items \(OrderedDict\)\."),
            (np.zeros((64, 3, 3, 3), np.float32), r"got a single tensor of shape \(64, 3, 3, 3\)"),
            (3, r"got an object of type int\."),
        ):
            with self.assertRaisesRegex(ValueError, found) as raised:
                torch_weights.params_from_state_dict(obj)
            self.assertLess(len(str(raised.exception)), 200)
        path = os.path.join(self.create_tempdir().full_path, "list.pth")
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps([1, 2], protocol=2))
        with self.assertRaisesRegex(ValueError, r"got a list of 2 items \(int\)"):
            torch_weights.load_torchvision_weights(path)

    def test_nested_and_data_parallel_state_dicts(self):
        state_dict = torchvision_state_dict("A", np.random.default_rng(5), **TINY)
        wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}
        net, params = torch_weights.params_from_state_dict(wrapped)
        _, direct = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(net, "A")
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)
        # PyTorch's tutorial layout and a LightningModule's "model." prefix (today: "Found 0
        # conv layers").
        tutorial = {"model_state_dict": state_dict, "optimizer_state_dict": {"state": {}}}
        lightning = {"state_dict": {f"model.{k}": v for k, v in state_dict.items()}}
        for nested in (tutorial, lightning):
            _, params = torch_weights.params_from_state_dict(nested)
            jax.tree_util.tree_map(np.testing.assert_array_equal, params, direct)
        with self.assertRaisesRegex(ValueError, r"Its first keys: \['weights.0'"):
            torch_weights.params_from_state_dict({"weights.0": np.zeros(3)})

    def test_a_torchvision_state_dict_in_safetensors_imports_as_one(self):
        from vgg_jax.weights import export, importer

        state_dict = torchvision_state_dict("A", np.random.default_rng(6), **TINY)
        path = os.path.join(self.create_tempdir().full_path, "vgg11.safetensors")
        export.save_safetensors(path, state_dict)  # flat dotted names, no vgg_jax metadata
        imported = importer.load(path, "safetensors")  # today: "they are not a VGG"
        _, direct = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(imported.net, "A")
        self.assertEqual(imported.input_convention, torch_weights.TORCHVISION_INPUT)
        jax.tree_util.tree_map(np.testing.assert_array_equal, imported.params, direct)

    def test_any_state_dict_in_safetensors_goes_through_the_torchvision_import(self):
        """A state dict saved as safetensors with nn.DataParallel's ``module.`` prefix imports as
        its ``.pth`` does, and another net's names the keys it found (today: "does not say which
        net it holds; pass --net", then "pass --input_convention", then "not a VGG"). So does
        one saved with ``np.savez``."""
        from vgg_jax.weights import export, importer

        state_dict = torchvision_state_dict("A", np.random.default_rng(6), **TINY)
        tmp = self.create_tempdir().full_path
        path = os.path.join(tmp, "vgg11_dp.safetensors")
        export.save_safetensors(path, {f"module.{k}": v for k, v in state_dict.items()})
        imported = importer.load(path, "safetensors")
        _, direct = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(imported.net, "A")
        self.assertEqual(imported.input_convention, torch_weights.TORCHVISION_INPUT)
        jax.tree_util.tree_map(np.testing.assert_array_equal, imported.params, direct)
        path = os.path.join(tmp, "vgg11.npz")  # np.savez(path, **state_dict), timm's names
        np.savez(path, **timm_state_dict(state_dict))
        imported = importer.load(path, "npz")  # today: "was not written by ... save_npz"
        self.assertEqual(imported.net, "A")
        self.assertEqual(imported.input_convention, torch_weights.TORCHVISION_INPUT)
        jax.tree_util.tree_map(np.testing.assert_array_equal, imported.params, direct)
        path = os.path.join(tmp, "resnet.safetensors")
        export.save_safetensors(path, {"conv1.weight": np.zeros((4, 3, 7, 7), np.float32)})
        with self.assertRaisesRegex(ValueError, r"Found 0 conv layers.*\['conv1.weight'\]"):
            importer.import_to_checkpoint(path, "safetensors", os.path.join(tmp, "w"), "A")


class WithPyTorchTest(absltest.TestCase):
    """Only where PyTorch happens to be installed (it is no dependency): the files are the ones
    torch itself reads and writes."""

    def setUp(self):
        try:
            import torch
        except ImportError:
            self.skipTest("PyTorch is not installed")
        self.torch = torch

    def test_torch_reads_our_files_and_we_read_its_files(self):
        torch = self.torch
        state_dict = torchvision_state_dict("A", np.random.default_rng(6), **TINY)
        tmp = self.create_tempdir().full_path
        ours = os.path.join(tmp, "ours.pth")
        torch_weights.save_pth(ours, state_dict)
        loaded = torch.load(ours, weights_only=True)
        for key, value in state_dict.items():
            np.testing.assert_array_equal(loaded[key].numpy(), value)
        tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in state_dict.items())
        tensors["classifier.6.weight"] = tensors["classifier.6.weight"].t().contiguous().t()
        for legacy in (False, True):
            path = os.path.join(tmp, f"torch_{legacy}.pth")
            torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
            read = torch_weights.read_pth(path)
            for key, value in state_dict.items():
                np.testing.assert_array_equal(read[key], value)


class WithTimmTest(absltest.TestCase):
    """Only where timm and PyTorch happen to be installed (neither is a dependency): a timm
    ``vgg16``'s own state dict and logits."""

    def test_timm_vgg16_logits(self):
        try:
            import timm
            import torch
        except ImportError:
            self.skipTest("timm or PyTorch is not installed")
        torch.manual_seed(0)
        model = timm.create_model("vgg16", pretrained=False, num_classes=10).eval()
        state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
        net, params = torch_weights.params_from_state_dict(state_dict)
        self.assertEqual(net, "D")
        pixels = np.random.default_rng(8).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
        images = conventions.normalize(pixels, torch_weights.TORCHVISION_INPUT)
        with torch.no_grad():
            expected = model(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2))).numpy()
        ours = models.VGG(models.LAYOUTS["D"], num_classes=10)
        logits = np.asarray(jax.jit(ours.apply)({"params": params}, images))
        self.assertLess(np.abs(logits - expected).max() / np.abs(expected).max(), 1e-4)


if __name__ == "__main__":
    absltest.main()
