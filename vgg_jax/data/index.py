"""One pass over a split that records, per example, what the pipeline needs before decoding:
format (JPEG or PNG, whatever the file is named), height, width, colour channels, whether the
file is truncated, whether it decodes at all, and a 63-bit fingerprint of its bytes (so copies
of one image in two splits or two classes are found: ``verify.check_copies``).

Stored as ``vgg_jax_index_<split>.npz`` next to the TFDS files (or under ``input.index_dir``, see
``sources.files_dir``) and read by the pipeline: training
crop windows and evaluation buckets are planned from these sizes, and examples that do not decode
are left out of every order (skipped and counted, never a crash). The decode check uses libjpeg's
1/8-scale DCT decoding: it still entropy-decodes the whole file, so corruption shows, at a fraction
of the cost of a full decode.

Only an example's decode may fail and be counted: a record that cannot be read (a damaged
``array_record`` chunk, an I/O error) stops the pass with ``DatasetError`` and nothing is saved:
``tf.data``'s ``ignore_errors`` would end the record stream at it, and every later example would
be marked undecodable in an index that is saved and reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vgg_jax import writers
from vgg_jax.data import DatasetError, generator_dataset, image_bytes, sources, transforms
from vgg_jax.data.progress import ProgressLog

_READ_CHUNK = 256
_END_OF_IMAGE = b"\xff\xd9"
_DIGEST_BUCKETS = 2**63 - 1  # the largest TF allows: the fingerprint itself, nearly


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    fmt: np.ndarray  # uint8: transforms.JPEG, PNG or UNDECODABLE
    height: np.ndarray  # int32, 0 where undecodable
    width: np.ndarray
    # uint8: 1 grayscale, 3 colour, 4 CMYK/YCCK JPEG; a PNG: 1-4, 2 and 4 with alpha
    channels: np.ndarray
    truncated: np.ndarray  # bool: a JPEG cut before its end marker (decoded, the rest grey)
    label: np.ndarray  # int32
    # int64: FarmHash Fingerprint64 of the encoded bytes (mod 2^63 - 1); None in an index made
    # before fingerprints were recorded (it stays usable: only the copy check is skipped).
    digest: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        """Indices of the examples that decode, in record order."""
        return np.flatnonzero(self.fmt != transforms.UNDECODABLE)

    def counts(self, crop_size: int | None = None) -> dict[str, int]:
        """How many examples of each kind of unusual input the split holds."""
        ok = self.fmt != transforms.UNDECODABLE
        counts = {
            "examples": int(len(self.fmt)),
            "skipped_undecodable": int((~ok).sum()),
            "png": int((self.fmt == transforms.PNG).sum()),
            "cmyk_jpeg": int((ok & (self.fmt == transforms.JPEG) & (self.channels == 4)).sum()),
            # Grey, or grey + alpha (a PNG's 2 channels).
            "grayscale": int((ok & np.isin(self.channels, (1, 2))).sum()),
            # Grey + alpha, RGBA or a palette with transparency: decoded to RGB without the
            # alpha (the colours under transparent pixels kept, as PIL's convert("RGB")).
            "png_alpha_dropped": int(
                (ok & (self.fmt == transforms.PNG) & np.isin(self.channels, (2, 4))).sum()
            ),
            "truncated_jpeg": int((ok & self.truncated).sum()),
        }
        if crop_size is not None:
            small = ok & (np.minimum(self.height, self.width) < crop_size)
            counts["smaller_than_crop_upscaled"] = int(small.sum())
        return counts


def index_path(builder: tfds.core.DatasetBuilder, split: str, files_dir: str | None = None) -> str:
    """``files_dir``: where the project's files for this dataset live (``sources.files_dir``);
    next to the TFDS files when None."""
    return os.path.join(files_dir or os.fspath(builder.data_dir), f"vgg_jax_index_{split}.npz")


def _probe(position: tf.Tensor, serialized: tf.Tensor):
    encoded, label = sources.parse(serialized)
    fmt = transforms.image_format(encoded)
    tf.debugging.assert_less(fmt, transforms.UNDECODABLE, "neither JPEG nor PNG")

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        decoded = tf.io.decode_jpeg(
            encoded,
            channels=3,
            ratio=8,
            try_recover_truncated=True,
            acceptable_fraction=transforms.ACCEPTABLE_FRACTION,
        )
        with tf.control_dependencies([decoded]):
            return tf.identity(shape)

    def png():
        return tf.shape(tf.io.decode_png(encoded), out_type=tf.int32)

    shape = tf.cond(tf.equal(fmt, transforms.PNG), png, jpeg)

    def ends_before_its_end_marker():
        cut = tf.numpy_function(jpeg_truncated, [encoded], tf.bool, stateful=False)
        return tf.reshape(cut, [])

    # Most JPEGs end with their end marker: only the others (cut, or with data after the end)
    # are read in Python, so the pass over an ordinary split pays nothing for the check.
    ends_with_end_marker = tf.equal(tf.strings.substr(encoded, -2, 2), _END_OF_IMAGE)
    truncated = tf.logical_and(
        tf.equal(fmt, transforms.JPEG),
        tf.cond(ends_with_end_marker, lambda: tf.constant(False), ends_before_its_end_marker),
    )
    digest = tf.strings.to_hash_bucket_fast(encoded, _DIGEST_BUCKETS)
    return position, fmt, shape, truncated, label, digest


def jpeg_truncated(encoded: bytes) -> bool:
    """Whether a JPEG's bytes end before the image's end-of-image marker (FF D9): a file cut
    short. Bytes after that marker (a camera's or editor's trailer, padding) are not the image's
    and do not make it truncated.

    The search starts after the header segments (``image_bytes.jpeg_header_segments``), so an
    EXIF thumbnail's end marker is never taken for the image's. From the scan on, FF D9 can only
    be the end marker: in entropy-coded data an FF is always followed by 00 or a restart marker
    (D0-D7)."""
    _, scan = image_bytes.jpeg_header_segments(encoded)
    return encoded.find(_END_OF_IMAGE, scan) < 0


def build_index(builder: tfds.core.DatasetBuilder, split: str) -> SplitIndex:
    """Probes every example of ``split`` (in parallel, errors dropped and counted)."""
    reader = sources.RecordReader(builder, split)
    total = len(reader)
    # A read error must not reach ``ignore_errors`` below: it would end the stream there and
    # every later example would look undecodable. The generator keeps it and ends; it is raised
    # after the pass.
    failed: list[tuple[int, BaseException]] = []

    def records():
        for start in range(0, total, _READ_CHUNK):
            positions = np.arange(start, min(start + _READ_CHUNK, total))
            try:
                chunk = reader.read(positions)
            except Exception as e:  # noqa: BLE001 - raised after the pass, with the split named
                failed.append((start, e))
                return
            yield positions, chunk

    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.string))
    ds = generator_dataset.from_generator(records, output_signature=signature).unbatch()
    ds = ds.map(transforms.no_autograph(_probe), num_parallel_calls=tf.data.AUTOTUNE)
    # Batched after the errors are dropped: tf.data hands Python whole chunks, not examples.
    ds = ds.ignore_errors().batch(_READ_CHUNK)
    fmt = np.full(total, transforms.UNDECODABLE, np.uint8)
    height, width = np.zeros(total, np.int32), np.zeros(total, np.int32)
    channels, truncated = np.zeros(total, np.uint8), np.zeros(total, bool)
    label = np.full(total, -1, np.int32)
    digest = np.full(total, -1, np.int64)
    report = ProgressLog(f"Indexing {builder.name}/{split}", total)
    done = 0
    for position, kind, shape, cut, lab, fingerprint in ds.as_numpy_iterator():
        fmt[position], truncated[position], label[position] = kind, cut, lab
        digest[position] = fingerprint
        height[position], width[position], channels[position] = shape.T
        done += len(position)
        report.update(done)
    if failed:
        start, error = failed[0]
        where = os.fspath(builder.data_dir)
        raise DatasetError(
            f"Cannot read the records of {builder.name}/{split} from record {start:,} of "
            f"{total:,} ({type(error).__name__}: {_first_line(error)}); nothing was indexed. Run "
            f"again if the storage had a passing fault; if the files in {where} are damaged, "
            "delete that directory and prepare the dataset again."
        ) from error
    return SplitIndex(fmt, height, width, channels, truncated, label, digest)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def split_source(builder: tfds.core.DatasetBuilder, split: str) -> str:
    """What the index of ``split`` is made from, as TFDS recorded it when it wrote the split: an
    index (or statistics) made from other files (``input.index_dir`` is keyed by the dataset's
    name and version only, so two data_dirs of ``imagenet2012`` share it) is told apart."""
    info = builder.info.splits[split]
    return f"{int(info.num_examples)} examples, {int(info.num_bytes)} bytes"


def _save(path: str, split_index: SplitIndex, source: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Per process: two runs preparing one data_dir at once must not write one temporary file.
    temporary = writers.temporary_path(path, ".npz")  # np.savez adds .npz to other names
    try:
        arrays = {k: v for k, v in dataclasses.asdict(split_index).items() if v is not None}
        np.savez(temporary, **arrays, source=np.asarray(source))
        os.replace(temporary, path)
    except OSError as e:  # a full disk: one line naming the file, no partial file left
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise writers.write_error(e, path) from e


class StaleIndexError(DatasetError):
    """The index on disk was made from other TFDS files than the builder's."""


def load_index(
    builder: tfds.core.DatasetBuilder, split: str, files_dir: str | None = None
) -> SplitIndex:
    path = index_path(builder, split, files_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No index for split {split!r} at {path}. Run `python -m vgg_jax.tools.data "
            "--config=<your config>` (or data.prepare(config)) first."
        )
    split_index, source = _load(path, os.path.getmtime(path))
    now = split_source(builder, split)
    if len(split_index.fmt) != int(builder.info.splits[split].num_examples) or (
        source is not None and source != now
    ):
        made = source or f"{len(split_index.fmt)} examples"
        raise StaleIndexError(
            f"The index {path} was made from other {builder.name}/{split} files ({made}) than "
            f"those in {builder.data_dir} ({now}); two data_dirs sharing one input.index_dir? "
            "Run `python -m vgg_jax.tools.data --config=<your config>` to index them again."
        )
    return split_index


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime: float) -> tuple[SplitIndex, str | None]:
    del mtime  # part of the cache key: a rebuilt index is read again
    with np.load(path) as stored:
        names = [f.name for f in dataclasses.fields(SplitIndex)]
        split_index = SplitIndex(**{name: stored[name] for name in names if name in stored.files})
        source = str(stored["source"]) if "source" in stored.files else None  # older indexes
    return split_index, source


def ensure_index(
    builder: tfds.core.DatasetBuilder, split: str, files_dir: str | None = None
) -> SplitIndex:
    """The split's index, built and saved on first use, and again when the one on disk was made
    from other files."""
    path = index_path(builder, split, files_dir)
    if os.path.exists(path):
        try:
            return load_index(builder, split, files_dir)
        except StaleIndexError as e:
            logging.warning("%s Indexing again.", str(e).rsplit(" Run ", 1)[0])
    logging.info("Indexing %s/%s (sizes, formats, decode check).", builder.name, split)
    split_index = build_index(builder, split)
    _save(path, split_index, split_source(builder, split))
    logging.info("Indexed %s/%s: %s", builder.name, split, split_index.counts())
    return split_index
