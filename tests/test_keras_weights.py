"""Keras parity: keras.applications VGG16/VGG19 (random weights) imported into vgg_jax."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from vgg_jax import models
from vgg_jax.weights import importer
from vgg_jax.weights import keras as keras_weights


class KerasParityTest(parameterized.TestCase):
    @parameterized.parameters(("VGG16", "D"), ("VGG19", "E"))
    def test_same_logits_directly_and_through_h5(self, keras_name, net):
        import keras

        keras.utils.set_random_seed(0)
        keras_model = getattr(keras.applications, keras_name)(
            weights=None, classifier_activation=None
        )
        # Keras' random init gives near-zero logits; widen the biases so differences would show.
        rng = np.random.default_rng(0)
        for layer in keras_model.layers:
            if layer.get_weights():
                kernel, bias = layer.get_weights()
                layer.set_weights([kernel, rng.normal(0, 0.05, bias.shape).astype(np.float32)])
        images = rng.uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
        expected = keras_model.predict(images, verbose=0)

        model = models.VGG(models.LAYOUTS[net])
        imported_net, params = keras_weights.load_keras_weights(keras_model)
        self.assertEqual(imported_net, net)
        logits = np.asarray(jax.jit(model.apply)({"params": params}, images))
        scale = np.abs(expected).max()
        self.assertGreater(scale, 1e-3)
        self.assertLess(np.abs(logits - expected).max() / scale, 1e-4)

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{keras_name}.weights.h5")
            keras_model.save_weights(path)
            reloaded_net, reloaded = keras_weights.load_keras_weights(path)
        self.assertEqual(reloaded_net, net)
        jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)

    def test_a_trained_models_file_with_its_optimizer_state(self):
        """Keras 3's ``save_weights`` of a compiled model and Keras 2's ``model.save("x.h5")``
        store the optimizer's state beside the weights: Adam's two slots per variable are shaped
        like the kernels. Only the model's weights are counted (today: "does not hold a VGG with
        its 3 fully connected layers")."""
        import h5py

        kernels = [(3, 3, 3, 64), (3, 3, 64, 64)] + [(3, 3, 64, 64)] * 11
        kernels += [(7 * 7 * 512, 4096), (4096, 4096), (4096, 10)]
        tmp = self.create_tempdir().full_path
        for layout in ("keras3", "keras2"):
            path = os.path.join(tmp, f"{layout}.h5")
            with h5py.File(path, "w") as f:
                for i, shape in enumerate(kernels):
                    # Shapes only: datasets without data take no space.
                    if layout == "keras3":
                        f.create_dataset(f"layers/layer_{i}/vars/0", shape, "f4")
                        f.create_dataset(f"layers/layer_{i}/vars/1", shape[-1:], "f4")
                        for slot in (2 * i, 2 * i + 1):
                            f.create_dataset(f"optimizer/vars/{slot}", shape, "f4")
                    else:
                        f.create_dataset(f"model_weights/layer_{i}/layer_{i}/kernel", shape, "f4")
                        for slot in ("momentum", "velocity"):
                            f.create_dataset(f"optimizer_weights/adam/{i}_{slot}", shape, "f4")
            self.assertEqual(keras_weights._inspect_h5(path), (13, 10), layout)

    def test_whole_saved_models_nested_as_fine_tuning_nests_them(self):
        """The usual fine-tuning layout, ``Sequential([VGG16(include_top=False), Flatten(),
        Dense, Dense, Dense])``, saved whole as Keras 3's ``.keras`` archive and Keras 2's
        ``.h5``: loaded as the model they hold, the nested convs taken one by one (today: the
        ``.keras`` file is h5py's OSError "file signature not found", the ``.h5`` "Layer count
        mismatch", and the model itself "got 1 convs and 3 dense layers"). Thin layers at a
        32-pixel input: the importer reads the layers, not their sizes."""
        import keras

        keras.utils.set_random_seed(0)
        base = keras.Sequential([keras.Input((32, 32, 3))], name="vgg16")
        for block in models.LAYOUTS["D"]:
            for _ in block:
                base.add(keras.layers.Conv2D(2, 3, padding="same", activation="relu"))
            base.add(keras.layers.MaxPooling2D())
        fine_tuned = keras.Sequential(
            [keras.Input((32, 32, 3)), base, keras.layers.Flatten()]
            + [keras.layers.Dense(n, activation="relu") for n in (4, 4)]
            + [keras.layers.Dense(3)]
        )
        net, params = keras_weights.load_keras_weights(fine_tuned)
        self.assertEqual(net, "D")
        layers = base.layers + fine_tuned.layers[1:]
        kernels = [layer.get_weights()[0] for layer in layers if layer.get_weights()]
        names = models.conv_names("D") + ["fc1", "fc2", "fc3"]
        for name, kernel in zip(names, kernels, strict=True):
            np.testing.assert_array_equal(params[name]["kernel"], kernel)
        tmp = self.create_tempdir().full_path
        for name in ("fine_tuned.keras", "fine_tuned.h5"):
            path = os.path.join(tmp, name)
            fine_tuned.save(path)
            loaded_net, loaded = keras_weights.load_keras_weights(path)
            self.assertEqual(loaded_net, "D")
            jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)

        renamed = os.path.join(tmp, "fine_tuned.zip")
        os.rename(os.path.join(tmp, "fine_tuned.keras"), renamed)
        with self.assertRaisesRegex(ValueError, "only under a name ending in '.keras'"):
            keras_weights.load_keras_weights(renamed)
        not_hdf5 = os.path.join(tmp, "vgg16.h5")
        with open(not_hdf5, "wb") as f:
            f.write(b"\x80\x02not an HDF5 file")
        with self.assertRaisesRegex(ValueError, "vgg16.h5 is not an HDF5 file"):
            keras_weights.load_keras_weights(not_hdf5)

    def test_convs_in_channels_first_before_a_channels_last_flatten(self):
        """Convs and pools in ``channels_first`` before a Flatten in Keras' default
        ``channels_last`` (also how a Keras 2.0 Flatten, which had no ``data_format``, loads)
        flatten pool5 channel by channel: FC1's rows are in ``(C, H, W)`` order. They were
        imported as they were, every output changed without a word. The reference is Keras'
        computation written out layer by layer (TensorFlow runs no NCHW conv on a CPU)."""
        import keras

        def reference(keras_model, images):
            x = jnp.asarray(images)  # NHWC: the NCHW model's values, channels moved last
            for layer in keras_model.layers:
                kind = type(layer).__name__
                if kind == "Conv2D":
                    kernel, bias = layer.get_weights()
                    x = jax.lax.conv_general_dilated(
                        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
                    )
                    x = jax.nn.relu(x + bias)
                elif kind == "MaxPooling2D":
                    x = jax.lax.reduce_window(
                        x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
                    )
                elif kind == "Flatten":  # of the NCHW tensor, or channels moved last first
                    order = (0, 3, 1, 2) if layer.data_format == "channels_last" else (0, 1, 2, 3)
                    x = x.transpose(order).reshape(len(x), -1)
                else:
                    kernel, bias = layer.get_weights()
                    x = x @ kernel + bias
                    x = jax.nn.relu(x) if layer is not keras_model.layers[-1] else x
            return np.asarray(x)

        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
        for flatten_format in ("channels_last", "channels_first"):
            keras.utils.set_random_seed(0)
            layers = [keras.Input((3, 64, 64))]  # pool5 is 2x2: FC1's row order matters
            for block in models.LAYOUTS["D"]:
                for channels in block:
                    layers.append(
                        keras.layers.Conv2D(channels // 32, 3, padding="same",
                                            activation="relu", data_format="channels_first")
                    )  # fmt: skip
                layers.append(keras.layers.MaxPooling2D(data_format="channels_first"))
            layers.append(keras.layers.Flatten(data_format=flatten_format))
            layers += [keras.layers.Dense(8, activation="relu") for _ in range(2)]
            keras_model = keras.Sequential([*layers, keras.layers.Dense(5)])
            keras_model.set_weights([
                w if w.ndim > 1 else rng.normal(0, 0.3, w.shape).astype(np.float32)
                for w in keras_model.get_weights()
            ])  # fmt: skip
            net, params = keras_weights.load_keras_weights(keras_model)
            config, crop_size = importer.fit_model_config(net, params)
            logits = models.build_model(config, crop_size).apply({"params": params}, images)
            expected = reference(keras_model, images)
            self.assertGreater(np.abs(expected).max(), 1e-2)
            np.testing.assert_allclose(
                logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
            )
        mixed = [
            keras.layers.Conv2D(2, 3, data_format=f) for f in ("channels_last", "channels_first")
        ]
        with self.assertRaisesRegex(ValueError, "mix data formats"):
            keras_weights._flattens_channels_first([*mixed, keras.layers.Flatten()])

    def test_a_layer_vgg_has_no_place_for_is_refused(self):
        """A fine-tuned head with batch norm between its dense layers, average pooling instead of
        Flatten, a tanh hidden layer, a 'valid' conv: refused, naming the layer (today: imported
        as VGG, every output changed without a word)."""
        import keras

        def model(first_padding="same", pool="Flatten", hidden="relu", batch_norm=False):
            layers = [keras.Input((64, 64, 3))]  # 64: room for one 'valid' conv
            for block in models.LAYOUTS["D"]:
                for _ in block:
                    padding = first_padding if len(layers) == 1 else "same"
                    layers.append(
                        keras.layers.Conv2D(2, 3, padding=padding, activation="relu", name=padding)
                        if padding == "valid"
                        else keras.layers.Conv2D(2, 3, padding=padding, activation="relu")
                    )
                layers.append(keras.layers.MaxPooling2D())
            layers.append(getattr(keras.layers, pool)(name="pool"))
            layers.append(keras.layers.Dense(4, activation=hidden, name="fc1"))
            if batch_norm:
                layers.append(keras.layers.BatchNormalization(name="head_bn"))
            layers += [keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)]
            return keras.Sequential(layers)

        self.assertEqual(keras_weights.load_keras_weights(model())[0], "D")
        for flawed, message in (
            (model(batch_norm=True), "'head_bn' \\(BatchNormalization, 4 weight arrays\\)"),
            (model(pool="GlobalAveragePooling2D"), "'pool' \\(GlobalAveragePooling2D\\) is not"),
            (model(hidden="tanh"), "'fc1' \\(Dense\\) has activation 'tanh'"),
            (model(first_padding="valid"), "'valid' has strides \\(1, 1\\), padding 'valid'"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                keras_weights.load_keras_weights(flawed)

    def test_a_saved_model_keras_cannot_load_is_one_line(self):
        """A model with a custom layer Keras cannot locate where it is loaded: one ValueError,
        which the import command prints as a line (today: Keras' TypeError, a traceback)."""
        import keras

        @keras.saving.register_keras_serializable("vgg_jax_test")
        class Doubled(keras.layers.Layer):
            def call(self, x):
                return x * 2

        model = keras.Sequential([keras.Input((8, 8, 3)), Doubled(), keras.layers.Conv2D(2, 3)])
        path = os.path.join(self.create_tempdir().full_path, "custom.keras")
        model.save(path)
        del keras.saving.get_custom_objects()["vgg_jax_test>Doubled"]
        with self.assertRaisesRegex(ValueError, "Keras could not load the model saved in"):
            keras_weights.load_keras_weights(path)

    def test_a_notop_file_says_it_has_no_classifier(self):
        """keras.applications' ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` holds the
        13 convs alone (today: "does not hold a VGG with its 3 fully connected layers")."""
        import h5py

        path = os.path.join(self.create_tempdir().full_path, "vgg16_notop.h5")
        with h5py.File(path, "w") as f:
            for i in range(13):
                f.create_dataset(f"block{i}/block{i}/kernel", (3, 3, 64, 64), "f4")  # no data
        with self.assertRaisesRegex(ValueError, "include_top=False"):
            keras_weights.load_keras_weights(path)

    def test_not_a_vgg_file(self):
        with self.assertRaises(FileNotFoundError):
            keras_weights.load_keras_weights("/nonexistent/weights.h5")


if __name__ == "__main__":
    absltest.main()
