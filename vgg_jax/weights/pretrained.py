"""The published ImageNet weights of the paper's nets: where their authors serve them, the hash
their authors publish, and a download that is cached, resumable and checked before it is used.

Two publishers ship the paper's nets with their classifier (the 1000-way FC layers included):

- torchvision: ``vgg11``, ``vgg13``, ``vgg16``, ``vgg19`` (nets A, B, D, E of Table 1) at
  ``https://download.pytorch.org/models/<name>-<hash>.pth``. The file name carries the first
  8 hex digits of the file's SHA-256; ``torch.hub`` checks exactly that prefix, and so does this
  module. torchvision's ``vgg*_bn`` files are listed too, only to refuse them clearly: batch norm
  is not one of the paper's nets.
- Keras: ``vgg16`` and ``vgg19`` (D, E) at ``https://storage.googleapis.com/tensorflow/
  keras-applications/<name>/<name>_weights_tf_dim_ordering_tf_kernels.h5``, with the MD5 file
  hash that ``keras.applications`` passes to ``get_file``.

A download goes to ``<cache>/<file name>.part`` and resumes from its length with an HTTP ``Range``
request after an interruption; the file takes its final name (an atomic rename) only after its
hash matched, so a file under its final name in the cache is always a verified one. The servers'
base address can be replaced (``base_url=``, or the ``VGG_JAX_WEIGHTS_URL`` environment variable)
for a mirror, or for the test suite's server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from absl import logging

from vgg_jax import writers

BASE_URLS = {
    "torchvision": "https://download.pytorch.org/models/",
    "keras": "https://storage.googleapis.com/tensorflow/keras-applications/",
}
BASE_URL_ENV = "VGG_JAX_WEIGHTS_URL"  # replaces every source's base address
CACHE_ENV = "VGG_JAX_CACHE"  # the cache directory (default ~/.cache/vgg_jax/weights)
CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class PublishedWeights:
    """One published weight file.

    ``path``: the file's address below its source's base URL. ``hash_name``/``hash_value``: the
    hash its authors publish; for torchvision only a prefix of the SHA-256 (the 8 hex digits in
    the file name). ``fmt``: the ``import_weights`` format that reads it. ``net``: the paper's
    name of the net (Table 1), or None where the file is not one of the paper's nets.
    ``top1_error``/``top5_error``: the authors' published single-crop ImageNet validation errors
    (%), for the message printed after an import."""

    name: str
    source: str
    path: str
    hash_name: str
    hash_value: str
    fmt: str
    net: str | None
    size_mb: int
    top1_error: float | None = None
    top5_error: float | None = None

    @property
    def file_name(self) -> str:
        return os.path.basename(self.path)

    def url(self, base_url: str | None = None) -> str:
        base = base_url or os.environ.get(BASE_URL_ENV) or BASE_URLS[self.source]
        return base.rstrip("/") + "/" + self.path


def _torchvision(name, digest, net, size_mb, top1=None, top5=None) -> PublishedWeights:
    return PublishedWeights(
        name, "torchvision", f"{name}-{digest}.pth", "sha256", digest, "torchvision", net,
        size_mb, top1, top5,
    )  # fmt: skip


def _keras(name, md5, net, size_mb) -> PublishedWeights:
    path = f"{name}/{name}_weights_tf_dim_ordering_tf_kernels.h5"
    return PublishedWeights(name, "keras", path, "md5", md5, "keras", net, size_mb)


# torchvision's published ImageNet-1K accuracies (acc@1, acc@5), as errors: 100 - accuracy.
REGISTRY: dict[tuple[str, str], PublishedWeights] = {
    (w.source, w.name): w
    for w in (
        _torchvision("vgg11", "8a719046", "A", 507, 30.980, 11.372),
        _torchvision("vgg13", "19584684", "B", 508, 30.072, 10.754),
        _torchvision("vgg16", "397923af", "D", 528, 28.408, 9.618),
        _torchvision("vgg19", "dcbb9e9d", "E", 548, 27.624, 9.124),
        _torchvision("vgg11_bn", "6002323d", None, 507),
        _torchvision("vgg13_bn", "abd245e5", None, 508),
        _torchvision("vgg16_bn", "6c64b313", None, 528),
        _torchvision("vgg19_bn", "c79401a0", None, 548),
        _keras("vgg16", "64373286793e3c8b2b4e3219cbf3544b", "D", 528),
        _keras("vgg19", "cbe5617147190e668d6c5d5026f83318", "E", 549),
    )
}
SOURCES = sorted(BASE_URLS)


class DownloadError(RuntimeError):
    """The file could not be fetched (no network, a server error, an interrupted transfer)."""


class HashMismatchError(ValueError):
    """The bytes are not the published file."""


class CacheDirError(ValueError):
    """The download cache cannot be written (a read-only or missing home directory)."""


def lookup(name: str, source: str) -> PublishedWeights:
    """The published file of net ``name`` (``vgg16``) from ``source`` (``torchvision``/``keras``);
    unknown pairs fail listing the known ones, and batch-norm nets fail saying why."""
    if source not in BASE_URLS:
        raise ValueError(f"Unknown source {source!r}; valid: {SOURCES}")
    weights = REGISTRY.get((source, name))
    if weights is None:
        valid = sorted(n for s, n in REGISTRY if s == source and REGISTRY[s, n].net)
        raise ValueError(f"{source} publishes no {name!r} weights here; valid: {valid}")
    if weights.net is None:
        raise ValueError(
            f"{source}'s {name} has batch norm after every conv: not one of the paper's nets, "
            f"which vgg_jax builds. Use {name.removesuffix('_bn')}."
        )
    return weights


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "vgg_jax", "weights"
    )


def file_hash(path: str, hash_name: str) -> str:
    """Hex digest of a file, read in 1 MiB chunks (the VGG files are 0.5 GB)."""
    digest = hashlib.new(hash_name)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str, weights: PublishedWeights) -> None:
    """Raises ``HashMismatchError`` unless ``path`` holds exactly the published file."""
    actual = file_hash(path, weights.hash_name)
    if not actual.startswith(weights.hash_value):
        what = "SHA-256 prefix" if weights.source == "torchvision" else weights.hash_name.upper()
        raise HashMismatchError(
            f"{path} is not {weights.source}'s {weights.file_name}: its {what} is "
            f"{actual[: len(weights.hash_value)]}, the published one {weights.hash_value}."
        )


def fetch(
    weights: PublishedWeights,
    cache_dir: str | None = None,
    base_url: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout_s: float = 60.0,
) -> str:
    """The path of the verified file in the cache, downloading (or resuming) it if needed.

    ``progress(bytes_so_far, total_bytes_or_None)`` is called as the bytes arrive. A failed
    transfer raises ``DownloadError`` and keeps the partial file for the next call to resume; a
    downloaded file whose hash does not match is deleted and raises ``HashMismatchError``; a file
    already in the cache whose hash does not match is moved to ``<name>.bad``, with a warning.
    """
    cache_dir = cache_dir or default_cache_dir()
    final = os.path.join(cache_dir, weights.file_name)
    if os.path.exists(final):
        try:
            verify(final, weights)
            return final
        except HashMismatchError as e:
            # Not written by fetch (it renames only verified files): someone's file, kept aside.
            aside = final + ".bad"
            os.replace(final, aside)
            logging.warning("%s Moved it to %s; fetching the published file.", e, aside)
    partial = final + ".part"
    try:  # before the download; a read-only cache that holds the file serves it above
        os.makedirs(cache_dir, exist_ok=True)
        with open(partial, "ab"):
            pass
    except OSError as e:
        # A container's or cluster's read-only (or absent) home: Python's traceback from
        # makedirs, or "The transfer broke after 0 bytes; run again to resume".
        raise CacheDirError(
            f"Cannot write the download cache {cache_dir} ({e.strerror or e}): pass "
            f"--cache_dir=DIR or set ${CACHE_ENV} to a writable directory."
        ) from None
    url = weights.url(base_url)
    _download(url, partial, progress, timeout_s)
    try:
        verify(partial, weights)
    except HashMismatchError as e:
        os.remove(partial)
        raise HashMismatchError(f"Downloaded from {url}: {e} The file was deleted.") from None
    os.replace(partial, final)
    return final


def _download(
    url: str,
    partial: str,
    progress: Callable[[int, int | None], None] | None,
    timeout_s: float,
) -> None:
    """Appends the rest of ``url`` to ``partial`` (a ``Range`` request from its length)."""
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "vgg_jax"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file is already complete
            return
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}.") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"Could not reach {url} ({reason}).") from None
    with response:
        resumed = have and response.status == 206
        if not resumed:
            have = 0  # the server sent the whole file: start over
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        received = have
        try:
            with open(partial, "ab" if resumed else "wb") as f:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    if progress:
                        progress(received, total)
        except (OSError, urllib.error.URLError, ConnectionError) as e:
            raise DownloadError(
                f"The transfer from {url} broke after {received:,} bytes ({e}); run again to "
                "resume."
            ) from None
        if total is not None and received < total:
            raise DownloadError(
                f"The transfer from {url} stopped after {received:,} of {total:,} bytes; run "
                "again to resume."
            )


class ProgressPrinter:
    """``fetch``'s ``progress`` as a line every 10% (or every 50 MB when the size is unknown)
    with the rate and the time left, for a terminal or a log."""

    def __init__(self, write: Callable[[str], None], step_fraction: float = 0.1):
        self.write, self.step_fraction = write, step_fraction
        self.start, self.first, self.next_mark = time.perf_counter(), None, 0.0

    def __call__(self, received: int, total: int | None) -> None:
        if self.first is None:
            self.first = received
        done = received / total if total else received / 50e6
        if done < self.next_mark and received != total:
            return
        self.next_mark = (int(done / self.step_fraction) + 1) * self.step_fraction
        elapsed = max(time.perf_counter() - self.start, 1e-6)
        rate = (received - self.first) / elapsed
        line = f"  {received / 1e6:,.0f} MB"
        if total:
            line += f" of {total / 1e6:,.0f} MB ({100 * received / total:.0f}%)"
            if rate > 0 and received < total:
                left = writers.format_duration((total - received) / rate)
                line += f", {rate / 1e6:.1f} MB/s, {left} left"
        self.write(line)
