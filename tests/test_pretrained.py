"""Published weights: download through a local HTTP server (Range, resume, cache, hash checks),
conversion into a checkpoint, and the command's errors. Nothing here reaches the internet: every
URL points at 127.0.0.1, and the files are generated."""

import dataclasses
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from unittest import mock

import jax
import numpy as np
import pytest
from absl.testing import absltest

from vgg_jax import checkpoint, conventions, models
from vgg_jax.configs import paper
from vgg_jax.tools import pretrained as pretrained_tool
from vgg_jax.weights import keras as keras_weights
from vgg_jax.weights import pretrained
from vgg_jax.weights import torchvision as torch_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(width=1 / 16, fc_width=32, num_classes=10)


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` ({url path: bytes}) with ``Range`` support; ``cut_once`` ({path: n})
    makes the next response for a path stop after n bytes, as a dropped connection."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_once: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        server: FileServer = self.server
        path = self.path.lstrip("/")
        server.requests.append((path, self.headers.get("Range")))
        if path not in server.files:
            self.send_error(404, "Not Found")
            return
        data = server.files[path]
        start = 0
        if (header := self.headers.get("Range")) and header.startswith("bytes="):
            start = int(header[len("bytes=") :].split("-")[0])
            if start >= len(data):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path in server.cut_once:
            body = body[: server.cut_once.pop(path)]
            self.close_connection = True
        self.wfile.write(body)


def random_params(net, seed=0):
    config = paper.model_config(net)
    config.update(TINY)
    shapes = models.abstract_params(models.build_model(config, 224))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)


def published_like(path: str, data: bytes, **changes) -> pretrained.PublishedWeights:
    """The registry entry of torchvision's vgg16, for a generated file: its own name and the
    first 8 hex digits of its SHA-256, as torchvision names its files."""
    digest = hashlib.sha256(data).hexdigest()[:8]
    entry = pretrained.REGISTRY["torchvision", "vgg16"]
    return dataclasses.replace(entry, path=path, hash_value=digest, **changes)


class DownloadTest(absltest.TestCase):
    def setUp(self):
        self.server = FileServer()
        self.cache = self.create_tempdir().full_path
        self.data = np.random.default_rng(0).bytes(3 * pretrained.CHUNK_BYTES + 12345)
        self.server.files["vgg16-x.pth"] = self.data
        self.weights = published_like("vgg16-x.pth", self.data)

    def tearDown(self):
        self.server.stop()

    def test_download_verifies_and_caches(self):
        seen = []
        path = pretrained.fetch(
            self.weights, self.cache, self.server.base_url, lambda got, total: seen.append(total)
        )
        self.assertEqual(path, os.path.join(self.cache, "vgg16-x.pth"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(set(seen), {len(self.data)})
        self.assertEqual(os.listdir(self.cache), ["vgg16-x.pth"])  # no .part left
        again = pretrained.fetch(self.weights, self.cache, self.server.base_url)
        self.assertEqual(again, path)
        self.assertLen(self.server.requests, 1)  # the cached file was not fetched again

    def test_an_unwritable_cache_is_one_line_naming_it_and_the_way_out(self):
        """A read-only home (a container's, a cluster's) ended in makedirs' traceback."""
        cache = os.path.join(self.cache, "home", ".cache")
        with (
            mock.patch.object(
                pretrained.os, "makedirs", side_effect=OSError(30, "Read-only file system")
            ),
            self.assertRaisesRegex(
                pretrained.CacheDirError,
                rf"^Cannot write the download cache {cache} \(Read-only file system\): pass "
                rf"--cache_dir=DIR or set \${pretrained.CACHE_ENV} to a writable directory\.$",
            ),
        ):
            pretrained.fetch(self.weights, cache, self.server.base_url)
        self.assertEmpty(self.server.requests)

    def test_interrupted_download_resumes_with_range(self):
        self.server.cut_once["vgg16-x.pth"] = pretrained.CHUNK_BYTES + 100
        with self.assertRaisesRegex(pretrained.DownloadError, "run again to resume"):
            pretrained.fetch(self.weights, self.cache, self.server.base_url)
        partial = os.path.join(self.cache, "vgg16-x.pth.part")
        self.assertEqual(os.path.getsize(partial), pretrained.CHUNK_BYTES + 100)
        self.assertFalse(os.path.exists(os.path.join(self.cache, "vgg16-x.pth")))

        path = pretrained.fetch(self.weights, self.cache, self.server.base_url)
        self.assertEqual(
            self.server.requests[-1], ("vgg16-x.pth", f"bytes={pretrained.CHUNK_BYTES + 100}-")
        )
        with open(path, "rb") as f:
            self.assertEqual(f.read(), self.data)

    def test_corrupt_file_and_wrong_hash_are_refused_and_deleted(self):
        corrupt = bytearray(self.data)
        corrupt[1000] ^= 0xFF
        self.server.files["vgg16-x.pth"] = bytes(corrupt)
        with self.assertRaisesRegex(pretrained.HashMismatchError, "SHA-256 prefix .* deleted"):
            pretrained.fetch(self.weights, self.cache, self.server.base_url)
        self.assertEqual(os.listdir(self.cache), [])

        md5 = dataclasses.replace(
            self.weights, source="keras", hash_name="md5", hash_value="0" * 32
        )
        with self.assertRaisesRegex(pretrained.HashMismatchError, "its MD5 is"):
            pretrained.fetch(md5, self.cache, self.server.base_url)
        self.assertEqual(os.listdir(self.cache), [])
        good_md5 = dataclasses.replace(md5, hash_value=hashlib.md5(bytes(corrupt)).hexdigest())
        self.assertTrue(
            os.path.exists(pretrained.fetch(good_md5, self.cache, self.server.base_url))
        )

    def test_a_cached_file_that_fails_its_hash_is_kept_aside_and_fetched_again(self):
        with open(os.path.join(self.cache, "vgg16-x.pth"), "wb") as f:
            f.write(b"not the file")
        with self.assertLogs(level="WARNING") as logs:
            path = pretrained.fetch(self.weights, self.cache, self.server.base_url)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), self.data)
        aside = os.path.join(self.cache, "vgg16-x.pth.bad")
        with open(aside, "rb") as f:
            self.assertEqual(f.read(), b"not the file")  # today: deleted without a word
        self.assertTrue(any(aside in line for line in logs.output))

    def test_no_server_and_missing_file_give_clear_errors(self):
        missing = dataclasses.replace(self.weights, path="vgg19-y.pth")
        with self.assertRaisesRegex(pretrained.DownloadError, "HTTP 404"):
            pretrained.fetch(missing, self.cache, self.server.base_url)
        closed = self.server.base_url
        self.server.stop()
        self.server = FileServer()  # for tearDown; the old port is closed
        with self.assertRaisesRegex(pretrained.DownloadError, "Could not reach http://127"):
            pretrained.fetch(self.weights, self.cache, closed, timeout_s=5)

    def test_registry_urls_and_lookup(self):
        vgg16 = pretrained.lookup("vgg16", "torchvision")
        self.assertEqual(vgg16.url(), "https://download.pytorch.org/models/vgg16-397923af.pth")
        self.assertEqual(vgg16.net, "D")
        keras16 = pretrained.lookup("vgg16", "keras")
        self.assertEqual(
            keras16.url(),
            "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
            "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        )
        self.assertEqual((keras16.hash_name, len(keras16.hash_value)), ("md5", 32))
        self.assertEqual(keras16.url("http://mirror/x/"), "http://mirror/x/" + keras16.path)
        with mock.patch.dict(os.environ, {pretrained.BASE_URL_ENV: "http://127.0.0.1:1"}):
            self.assertEqual(vgg16.url(), "http://127.0.0.1:1/vgg16-397923af.pth")
        self.assertEqual(
            {w.net for w in pretrained.REGISTRY.values() if w.source == "torchvision"},
            {"A", "B", "D", "E", None},
        )
        with self.assertRaisesRegex(ValueError, "batch norm .* Use vgg16"):
            pretrained.lookup("vgg16_bn", "torchvision")
        with self.assertRaisesRegex(ValueError, r"valid: \['vgg16', 'vgg19'\]"):
            pretrained.lookup("vgg11", "keras")
        with self.assertRaisesRegex(ValueError, r"valid: \['keras', 'torchvision'\]"):
            pretrained.lookup("vgg16", "caffe")


class FetchAndImportTest(absltest.TestCase):
    def setUp(self):
        self.server = FileServer()
        self.tmp = self.create_tempdir().full_path
        self.params = random_params("D")
        pth = os.path.join(self.tmp, "made.pth")
        torch_weights.save_pth(pth, torch_weights.state_dict_from_params("D", self.params))
        with open(pth, "rb") as f:
            self.data = f.read()
        self.server.files["vgg16-made.pth"] = self.data
        self.weights = published_like("vgg16-made.pth", self.data)
        self.registry = mock.patch.dict(
            pretrained.REGISTRY, {("torchvision", "vgg16"): self.weights}
        )
        self.registry.start()

    def tearDown(self):
        self.registry.stop()
        self.server.stop()

    def test_download_becomes_a_checkpoint_with_its_convention(self):
        workdir = os.path.join(self.tmp, "imported")
        lines = []
        summary = pretrained_tool.fetch_and_import(
            "vgg16", "torchvision", workdir, cache_dir=self.tmp + "/cache",
            base_url=self.server.base_url, write=lines.append,
        )  # fmt: skip
        self.assertEqual(summary["net"], "D")
        params, step, meta = checkpoint.restore_params(workdir)
        self.assertEqual(step, 0)
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, self.params)
        self.assertEqual(conventions.checked(meta["input_convention"]), conventions.TORCHVISION)
        self.assertIn("verified sha256", lines[-1])
        text = "\n".join(pretrained_tool.next_steps(summary, workdir))
        self.assertIn(f"python -m vgg_jax.tools.predict --workdir={workdir}", text)
        self.assertIn("--config=experiments/vgg16.py --mode=evaluate", text)
        self.assertIn("top-1 28.41%", text)

        with self.assertRaisesRegex(FileExistsError, "new --workdir"):
            pretrained_tool.fetch_and_import("vgg16", "torchvision", workdir, write=lines.append)

    def test_file_on_disk_needs_no_network_and_must_be_the_published_one(self):
        self.server.stop()
        self.server = FileServer()  # serves nothing
        path = os.path.join(self.tmp, "made.pth")
        workdir = os.path.join(self.tmp, "from_file")
        pretrained_tool.fetch_and_import("vgg16", "torchvision", workdir, file=path, write=id)
        self.assertEqual(checkpoint.available_steps(workdir), [0])
        self.assertEqual(self.server.requests, [])
        other = os.path.join(self.tmp, "other.pth")
        torch_weights.save_pth(
            other, torch_weights.state_dict_from_params("D", random_params("D", 1))
        )
        with self.assertRaisesRegex(pretrained.HashMismatchError, "import_weights"):
            pretrained_tool.fetch_and_import(
                "vgg16", "torchvision", self.tmp + "/other", file=other, write=id
            )

    def test_keras_file_is_checked_by_md5_and_gets_caffe_convention(self):
        params = random_params("E", 2)
        data = b"an h5 file"
        self.server.files["vgg19/v.h5"] = data
        entry = dataclasses.replace(
            pretrained.REGISTRY["keras", "vgg19"],
            path="vgg19/v.h5",
            hash_value=hashlib.md5(data).hexdigest(),
        )
        workdir = os.path.join(self.tmp, "keras")
        with (
            mock.patch.dict(pretrained.REGISTRY, {("keras", "vgg19"): entry}),
            mock.patch.object(keras_weights, "load_keras_weights", return_value=("E", params)),
        ):
            pretrained_tool.fetch_and_import(
                "vgg19", "keras", workdir, cache_dir=self.tmp + "/cache",
                base_url=self.server.base_url, write=id,
            )  # fmt: skip
        _, _, meta = checkpoint.restore_params(workdir)
        self.assertEqual(conventions.checked(meta["input_convention"]), conventions.CAFFE)
        self.assertEqual(meta["config"]["model"]["name"], "E")


@pytest.mark.slow
class CommandLineTest(absltest.TestCase):
    def run_tool(self, *flags):
        return subprocess.run(
            [sys.executable, "-m", "vgg_jax.tools.pretrained", *flags],
            cwd=self.create_tempdir().full_path,  # any directory: the package is on PYTHONPATH
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=300,
        )

    def test_without_network_one_clear_line(self):
        tmp = self.create_tempdir().full_path
        result = self.run_tool(
            "--net=vgg16", "--source=torchvision", f"--workdir={tmp}/w",
            f"--cache_dir={tmp}/cache", "--base_url=http://127.0.0.1:9/",
        )  # fmt: skip
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            "pretrained: Could not reach http://127.0.0.1:9/vgg16-397923af.pth", result.stderr
        )
        self.assertIn("--file=PATH", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn("Unable to initialize backend", result.stderr)

        wrong = os.path.join(tmp, "vgg16-397923af.pth")
        with open(wrong, "wb") as f:
            f.write(b"not the published file")
        result = self.run_tool("--net=vgg16", f"--file={wrong}", f"--workdir={tmp}/w")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("published one 397923af", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


if __name__ == "__main__":
    absltest.main()
