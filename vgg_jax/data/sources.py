"""Where examples come from: one TFDS builder per ``config.input.dataset``, prepared into
``config.input.data_dir`` as ``array_record`` files and read back by index.

* ``imagenet2012``: TFDS's own builder, from ``ILSVRC2012_img_train.tar`` and
  ``ILSVRC2012_img_val.tar`` in ``config.input.manual_dir``.
* ``image_folder``: ``config.input.folder`` laid out ``root/<split>/<class>/<image>``, copied once
  into TFDS (``folder.py``) so that it is read exactly like the others.
* ``builtin``: the generated shapes dataset (``builtin.py``), no download.

Every source has the features ``image`` (encoded bytes) and ``label``. Records are read as raw
serialized examples by index (``as_data_source``), which is what makes the training order a pure
function of (seed, step).

The project's own files for a dataset (per-split index, statistics, the image folder's list of
skipped files) go next to the TFDS files, or under ``config.input.index_dir`` when the TFDS
data_dir is read-only (a shared cluster copy): ``files_dir``.
"""

from __future__ import annotations

import os
import re
import tarfile
import tempfile
from typing import BinaryIO

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vgg_jax import host, writers
from vgg_jax.data import DatasetError, builtin, choices, folder

DATASETS = choices.DATASETS
IMAGENET_TARS = choices.IMAGENET_TARS
# The test images' tar: optional; TFDS prepares an unlabelled third split when it is there.
IMAGENET_TEST_TAR = "ILSVRC2012_img_test.tar"
IMAGENET_SPLIT_TARS = {
    **dict(zip(("train", "validation"), IMAGENET_TARS, strict=True)),
    "test": IMAGENET_TEST_TAR,
}
# The names TFDS's imagenet2012 builder labels right, and how many validation labels it has.
_VALIDATION_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
_SYNSET_TAR = re.compile(r"n\d{8}\.tar")
IMAGENET_VALIDATION_IMAGES = 50_000
FILE_FORMAT = "array_record"
# What TFDS reads as one split's name (``tfds.core.splits._SUB_SPEC_RE``).
_SPLIT_NAME = re.compile(r"[\w-]+")
_NOT_IN_SPLIT_NAME = re.compile(r"[^\w-]+")


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown config.input.dataset {name!r}; valid: {list(DATASETS)}")


def data_dir(input_config: ml_collections.ConfigDict) -> str | None:
    return os.path.expanduser(input_config.data_dir) if input_config.data_dir else None


def get_builder(
    input_config: ml_collections.ConfigDict, fresh: bool = False
) -> tfds.core.DatasetBuilder:
    """The (possibly not yet prepared) TFDS builder that ``input_config`` names; an image
    folder as this process first listed it, or (``fresh``) as it is now
    (``folder.make_builder``)."""
    check_dataset_name(input_config.dataset)
    if input_config.dataset == "builtin":
        return builtin.make_builder(
            input_config.builtin_size, input_config.builtin_seed, data_dir(input_config)
        )
    if input_config.dataset == "image_folder":
        if not input_config.folder:
            raise ValueError(
                "config.input.dataset='image_folder' needs --config.input.folder=ROOT, a directory "
                "laid out ROOT/<split>/<class>/<image> (e.g. ROOT/train/cat/001.jpg)."
            )
        return folder.make_builder(
            os.path.expanduser(input_config.folder),
            data_dir(input_config),
            input_config.train_split,
            fresh,
        )
    return _imagenet_builder(data_dir(input_config))


def _imagenet_builder(where: str | None) -> tfds.core.DatasetBuilder:
    """TFDS's ``imagenet2012`` builder over ``where``, read as ``array_record`` files. A copy
    prepared in another format (TFDS's default, ``tfrecord``: what ``tfds build`` and most
    shared cluster copies hold) cannot be read by index; constructing the builder over it failed
    with a 30-line TFDS traceback ("File format is already set to FileFormat.TFRECORD")."""
    found = tfds.builder("imagenet2012", data_dir=where)
    file_format = found.info.file_format
    if found.is_prepared() and file_format is not None and file_format.value != FILE_FORMAT:
        new = os.path.join("NEW", "imagenet2012", str(found.version))
        raise DatasetError(
            f"{found.data_dir} holds imagenet2012 prepared as {file_format.value} files; vgg_jax "
            f"reads examples by index, which needs {FILE_FORMAT} files: prepare it from the tars "
            "into another data_dir (--config.input.data_dir=NEW --config.input.manual_dir=DIR), "
            "or convert this copy with TFDS's `tfds convert_format --dataset_version_dir="
            f"{found.data_dir} --out_file_format={FILE_FORMAT} --out_dir={new}` and set "
            "--config.input.data_dir=NEW."
        )
    return tfds.builder("imagenet2012", data_dir=where, file_format=FILE_FORMAT)


def files_dir(builder: tfds.core.DatasetBuilder, input_config: ml_collections.ConfigDict) -> str:
    """Where the project's files for this dataset live: ``input.index_dir/<dataset>/<config>/
    <version>`` when ``input.index_dir`` is set, else the TFDS files' own directory."""
    index_dir = input_config.get("index_dir")
    if not index_dir:
        return os.fspath(builder.data_dir)
    return os.path.join(os.path.expanduser(index_dir), builder.info.full_name)


def _write_error(directory: str) -> OSError | None:
    """What a real write in ``directory`` (or, where it is missing, the nearest directory above
    it that exists: the rest is made at the first write) raises, or None. Permission bits do not
    tell (root, read-only mounts, quotas). A URL (``gs://``, which TFDS writes through its own
    file system) is not checked: made absolute, it named a ``gs:`` directory of the current one,
    so a run from a read-only directory was told it could not prepare into ``<cwd>/gs:/...``."""
    if "://" in directory:
        return None
    existing = os.path.abspath(directory)
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".vgg_jax_write_test_"):
            pass
    except OSError as e:
        return e
    return None


def check_writable(directory: str) -> None:
    """Fails at once, before hours of indexing, when ``directory`` cannot take the index."""
    if (e := _write_error(directory)) is not None:
        raise DatasetError(
            f"Cannot write the project's index and statistics to {directory} ({e.strerror or e}); "
            "the prepared TFDS files can stay read-only: set --config.input.index_dir=DIR to a "
            "writable directory."
        ) from e


def _header_damage(f: BinaryIO, size: int, whole: str) -> tuple[bool, str] | None:
    """What is wrong with the tar read from ``f`` (``size`` bytes from its start) as a sequence of
    headers: (whether it is truncated, what shows it), or None if nothing shows. ``whole`` names
    the tar in the text ("the file").

    Walks the member headers only (seeking over the data, seconds even for ImageNet's 140 GB):
    Python's ``tarfile`` stops silently at a bad header after the first, so a tar with damaged
    bytes in the middle reads as a shorter tar; here the bytes after the last readable header are
    looked at, and a member running past the end shows a truncated tar."""
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            end = member.offset_data + member.size
            if end > size:
                return True, f"member {member.name} ends at byte {end:,}, {whole} has {size:,}"
        f.seek(tar.offset)
        tail = f.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE:
        return True, f"it ends at byte {size:,} without the end-of-archive blocks"
    if tail.strip(b"\0"):
        return False, (
            f"a bad tar header at byte {tar.offset:,} of {size:,} (Python's tarfile stops "
            "reading there without an error)"
        )
    return None


def tar_damage(path: str) -> str | None:
    """What is wrong with the tar at ``path`` as a sequence of headers (``_header_damage``), or
    in a synset tar it holds (``synset_tar_damage``); None if nothing shows."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as f:
            damage = _header_damage(f, os.path.getsize(path), "the file")
    except (OSError, tarfile.TarError) as e:
        return f"{name} is not a readable tar ({type(e).__name__}: {e})"
    if damage is None:
        return synset_tar_damage(path)
    truncated, detail = damage
    return f"{name} is truncated: {detail}" if truncated else f"{name} has {detail}"


def synset_tar_damage(path: str) -> str | None:
    """What is wrong with a ``<synset>.tar`` inside the tar at ``path`` (ILSVRC-2012's train tar
    holds one per class), or None if nothing shows (or the tar itself is damaged: ``tar_damage``
    says that). A synset tar cut short made TFDS fail deep in ``tarfile`` after reading every
    synset before it, naming neither tar.

    Cheap enough to run before preparing: a whole tar ends with zero blocks, so each synset tar's
    last two blocks are read, and only one that ends otherwise has its member headers walked, to
    say where it is cut."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as outer:
            synset_tars = [
                member
                for member in outer
                if _SYNSET_TAR.fullmatch(os.path.normpath(member.name))
                and member.offset_data + member.size <= size
            ]
            for member in synset_tars:
                if member.size >= 2 * tarfile.BLOCKSIZE:
                    f.seek(member.offset_data + member.size - 2 * tarfile.BLOCKSIZE)
                    if not f.read(2 * tarfile.BLOCKSIZE).strip(b"\0"):
                        continue  # ends with the end-of-archive blocks (or the record's zeros)
                synset_tar = outer.extractfile(member)
                try:
                    damage = _header_damage(synset_tar, member.size, "the synset tar")
                except tarfile.TarError as e:
                    damage = False, f"not a readable tar ({type(e).__name__}: {e})"
                if damage is not None:
                    truncated, detail = damage
                    state = "a truncated" if truncated else "a damaged"
                    return f"{name} holds {state} {member.name}: {detail}"
    except (OSError, tarfile.TarError):
        return None
    return None


def storage_fault(error: BaseException) -> str | None:
    """The first line of ``error`` (or of what it was raised from) when a full disk, a quota or a
    read-only place caused it: TFDS's writers say it only in their message (``RuntimeError:
    Failed to finalize writing of split "train": write() failed: No space left on device;
    writing <file>; ...``, under a 40-line traceback). None for anything else."""
    reasons = [os.strerror(number) for number in writers.STORAGE_ERRNOS]
    seen = 0
    while error is not None and seen < 20:
        if isinstance(error, OSError) and error.errno in writers.STORAGE_ERRNOS:
            return str(error)
        if any(reason in _first_line(error) for reason in reasons):
            return _first_line(error)
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def imagenet_culprit(manual_dir: str | None, split: str | None) -> tuple[str, bool]:
    """The likely bad tar for a problem with ``split`` (every tar TFDS reads when the split is
    not known: the test tar too when it is there, whose damage was blamed on the other two),
    with what a header walk finds wrong in it; and whether the walk found anything."""
    where = os.path.abspath(os.path.expanduser(manual_dir)) if manual_dir else "manual_dir"
    names = [IMAGENET_SPLIT_TARS[split]] if split in IMAGENET_SPLIT_TARS else list(IMAGENET_TARS)
    if split not in IMAGENET_SPLIT_TARS and os.path.exists(os.path.join(where, IMAGENET_TEST_TAR)):
        names.append(IMAGENET_TEST_TAR)
    found = [d for d in (tar_damage(os.path.join(where, n)) for n in names) if d]
    if found:
        return "; ".join(found) + f" (in {where})", True
    return f"{' or '.join(names)} in {where} is likely damaged", False


def validation_tar_problem(path: str) -> str | None:
    """Why TFDS would give the images of the validation tar at ``path`` other images' labels, or
    None when it labels them right (or the tar cannot be read: ``tar_damage`` explains that).

    TFDS's ``imagenet2012`` builder labels the validation images by position: the i-th name of
    the tar, sorted, gets the i-th line of its ``validation_labels.txt`` (the labels of
    ``ILSVRC2012_val_00000001.JPEG`` to ``_00050000.JPEG`` in order). So only a tar of exactly
    the first N of those names, at its top level, is labelled right; a subset with gaps, images
    in class folders (``valprep.sh``'s layout) or one extra file sorting first shift the labels
    of every image after it, with no error."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            names = tar.getnames()
    except (OSError, tarfile.TarError):
        return None
    numbers = set()
    for name in names:
        found = _VALIDATION_NAME.fullmatch(name)
        if not found:
            return f"it holds {name!r}, not an ILSVRC2012_val_NNNNNNNN.JPEG at its top level"
        number = int(found.group(1))
        if number in numbers:
            return f"it holds {name!r} more than once"
        numbers.add(number)
    if len(numbers) > IMAGENET_VALIDATION_IMAGES:
        return f"it holds {len(numbers):,} images, ILSVRC-2012 has {IMAGENET_VALIDATION_IMAGES:,}"
    if gaps := sorted(set(range(1, len(numbers) + 1)) - numbers):
        return (
            f"its {len(numbers):,} images are not the first {len(numbers):,} "
            f"(ILSVRC2012_val_{gaps[0]:08d}.JPEG is missing)"
        )
    return None


def train_tar_problem(path: str) -> str | None:
    """Why TFDS's ``imagenet2012`` builder cannot read the train tar at ``path``, or None (also
    when it is not a readable tar: ``tar_damage`` explains that). It reads each member as one
    synset's tar and takes its name for the label: a tar of class folders or of images, or an
    extra file, failed deep in TFDS with "invalid header", reported as a damaged tar. A synset
    tar held twice (appended again with ``tar -r``) gives every image of it twice under one key:
    TFDS failed with "Two examples share the same hashed key" only after writing the split."""
    synsets, seen = set(_imagenet_synsets()), set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                name = os.path.normpath(member.name)
                base = os.path.basename(name)
                if not member.isfile() or base.startswith(".") or name.endswith("~"):
                    continue  # TFDS skips these
                if not _SYNSET_TAR.fullmatch(name):
                    return f"it holds {member.name!r}, not a <synset>.tar such as n01440764.tar"
                if name[:-4] not in synsets:
                    return f"it holds {member.name!r}, not one of ILSVRC-2012's 1,000 synsets"
                if name in seen:
                    return f"it holds {member.name!r} more than once"
                seen.add(name)
    except (OSError, tarfile.TarError):
        return None
    return None


def _imagenet_synsets() -> list[str]:
    path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    with open(os.fspath(path)) as f:
        return f.read().split()


def _imagenet_download_config(manual_dir: str | None) -> tfds.download.DownloadConfig:
    if missing := choices.imagenet_tars_missing(manual_dir):
        raise FileNotFoundError(missing)
    where = os.path.abspath(os.path.expanduser(manual_dir))
    train_tar = os.path.join(where, IMAGENET_SPLIT_TARS["train"])
    if problem := train_tar_problem(train_tar):
        raise DatasetError(
            f"{train_tar} is not laid out as ILSVRC-2012's: {problem}. TFDS reads it as one tar "
            "per synset (n01440764.tar holding n01440764_*.JPEG, ...), as image-net.org ships "
            "it; make each class folder a <synset>.tar and put those in it, once each, nothing "
            "else."
        )
    validation_tar = os.path.join(where, IMAGENET_SPLIT_TARS["validation"])
    if problem := validation_tar_problem(validation_tar):
        raise DatasetError(
            f"{validation_tar} would be labelled wrong: {problem}. TFDS gives the i-th name of "
            "the validation tar, sorted, the label of ILSVRC2012_val_<i>.JPEG, so the tar must "
            "hold ILSVRC2012_val_00000001.JPEG to _N.JPEG (all 50,000, or the first N) at its "
            "top level and nothing else: use the original tar, or flatten class folders and "
            "take a prefix for a subset."
        )
    # Damage a header walk shows (seconds): TFDS found a truncated train or test tar, or a cut
    # synset tar, only when it reached the cut, after preparing every image before it (hours
    # for a partly downloaded ImageNet); a bad header in the middle it did not find at all
    # (tarfile stops there silently: the count check caught it after the whole preparation).
    for name in (*IMAGENET_TARS, IMAGENET_TEST_TAR):
        path = os.path.join(where, name)
        if _opens_as_plain_tar(path) and (damage := tar_damage(path)):
            raise DatasetError(
                f"{damage} (in {where}); TFDS would stop at it, or prepare fewer images, only "
                f"after reading everything before it. Download {name} again, or copy it again "
                "from a good copy, and run again."
            )
    return tfds.download.DownloadConfig(manual_dir=where)


def _opens_as_plain_tar(path: str) -> bool:
    """Whether ``path`` opens as an uncompressed tar; anything else (missing, a directory, a
    compressed tar TFDS may still read) is left to TFDS, as before the header walk."""
    try:
        with tarfile.open(path, mode="r:"):
            return True
    except (OSError, tarfile.TarError):
        return False


def prepare_builder(input_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Runs the builder's generation unless its files already exist; returns the builder."""
    builder = get_builder(input_config, fresh=True)
    if input_config.dataset == "image_folder":
        _check_folder_splits(builder, input_config)
    if builder.is_prepared():
        return builder
    # Not prepared: TFDS writes the files into data_dir (a relative one, as the demo's
    # workdirs/data, is under the current directory: a read-only checkout or mount was told to
    # set input.index_dir, which cannot help, then that preparing failed).
    if (e := _write_error(os.fspath(builder.data_dir))) is not None:
        raise DatasetError(
            f"Cannot prepare {builder.name} into {os.path.abspath(builder.data_dir)} "
            f"({e.strerror or e}): it is not prepared there, and preparing writes its files "
            "there; set --config.input.data_dir=DIR to a writable directory."
        ) from e
    project_files = files_dir(builder, input_config)
    check_writable(project_files)  # the index follows; better to know before TFDS's hours
    _warn_of_interrupted_preparations(builder)
    logging.info("Preparing %s into %s.", builder.name, builder.data_dir)
    if input_config.dataset == "image_folder" and (earlier := folder.earlier_copies(builder)):
        logging.warning(
            "Image folder %s differs from when it was prepared into %s (images added, removed, "
            "renamed or rewritten, or another train_split): preparing it again, so labels and "
            "class names follow what it holds now. Delete the old copy to free its space.",
            builder.builder_config.root,
            ", ".join(earlier),
        )
    download_config = None
    if input_config.dataset == "imagenet2012":
        download_config = _imagenet_download_config(input_config.manual_dir)
    try:
        builder.download_and_prepare(download_config=download_config, file_format=FILE_FORMAT)
    except Exception as e:
        if reason := storage_fault(e):
            # TFDS writes into a temporary directory that it renames only when every split is
            # written (and removes on this error): nothing half-written is taken for the data.
            raise DatasetError(
                f"Preparing {builder.name} into {builder.data_dir} failed: {reason}; free space "
                "there (or give another input.data_dir) and run again: nothing of this "
                "preparation is kept."
            ) from e
        if input_config.dataset != "imagenet2012":
            raise
        # TFDS reads the tars with tarfile: a truncated one ends in a 50-line traceback that
        # names no file. Other failures (a full disk, ...) stay as they are unless a tar shows
        # damage.
        culprit, found = imagenet_culprit(input_config.manual_dir, None)
        if not found and not isinstance(e, (tarfile.TarError, EOFError)):
            raise
        raise DatasetError(
            f"Preparing imagenet2012 failed ({type(e).__name__}: {_first_line(e)}): {culprit}; "
            "replace it and run again."
        ) from e
    if input_config.dataset == "image_folder":
        _report_skipped(builder, project_files)
    return builder


def interrupted_preparations(builder: tfds.core.DatasetBuilder) -> list[str]:
    """What earlier preparations of ``builder``'s version left when killed: TFDS writes into
    ``incomplete.<random>_<version>`` beside the version directory and renames it at the end, so
    an interrupted preparation is never taken for a finished one, but it is never resumed or
    deleted either (a killed ImageNet preparation leaves up to its whole size, every time)."""
    version_dir = os.fspath(builder.data_dir)
    parent, version = os.path.dirname(version_dir), os.path.basename(version_dir)
    if not os.path.isdir(parent):
        return []
    return sorted(
        os.path.join(parent, name)
        for name in os.listdir(parent)
        if name.startswith("incomplete.") and name.endswith(f"_{version}")
    )


def _warn_of_interrupted_preparations(builder: tfds.core.DatasetBuilder) -> None:
    if left := interrupted_preparations(builder):
        size = sum(
            os.path.getsize(os.path.join(root, name))
            for directory in left
            for root, _, names in os.walk(directory)
            for name in names
        )
        logging.warning(
            "%d interrupted preparation(s) of %s left %s (%.1f GB): TFDS starts again from the "
            "beginning and never deletes them. Delete them unless another process is preparing "
            "this dataset now.",
            len(left),
            builder.name,
            ", ".join(left),
            size / 1e9,
        )


def _check_folder_splits(
    builder: folder.VggJaxImageFolder, input_config: ml_collections.ConfigDict
) -> None:
    """The training and evaluation splits must be folders of the image folder: said in one line
    before the folder is copied (``check_split`` said it after, with a traceback)."""
    folder_scan = builder.folder_scan()
    held, root = folder_scan.splits, builder.builder_config.root
    wanted = dict.fromkeys([input_config.train_split, input_config.eval_split])
    missing = [split for split in wanted if split not in held]
    for split in missing:
        if os.path.isdir(os.path.join(root, split)):
            _no_class_folders(folder_scan, root, split)
    if missing:
        raise DatasetError(
            f"Image folder {builder.builder_config.root} has no split folder "
            f"{' or '.join(map(repr, missing))} (config.input.train_split="
            f"{input_config.train_split!r}, eval_split={input_config.eval_split!r}); it holds "
            f"{sorted(held)}. Set --config.input.train_split and --config.input.eval_split to "
            "two of them, or rename the folders."
        )
    for split in wanted:
        # TFDS reads a split by a spec (``train[:10%]+test``): other names fail only when read,
        # after the whole folder is copied ("Error parsing split 'test.v2'").
        if not _SPLIT_NAME.fullmatch(split):
            renamed = _NOT_IN_SPLIT_NAME.sub("_", split)
            raise DatasetError(
                f"Split folder {os.path.join(builder.builder_config.root, split)!r}: TFDS reads "
                "only split names of letters, digits, '_' and '-'; rename it (e.g. "
                f"{renamed!r}) and set the config's split name to match."
            )


def _no_class_folders(folder_scan: folder.FolderScan, root: str, split: str) -> None:
    """A split folder that exists but holds no class folder, said so: the split was reported
    missing ("has no split folder 'validation'; it holds ['train']") when its images lay straight
    in it, as ImageNet's validation images do."""
    directory = os.path.join(root, split)
    files = [
        os.path.basename(path)
        for path, why in folder_scan.skipped
        if why == "not a class directory" and os.path.dirname(path) == directory
    ]
    held = f"{len(files)} files straight in it, e.g. {files[0]}" if files else "it is empty"
    raise DatasetError(
        f"Image folder split folder {directory} holds no class folder ({held}); put each image "
        f"in {split}/<class>/<image> (the class folder's name is its label, as in the training "
        f"split), or set config.input.train_split/eval_split to another split."
    )


def _report_skipped(builder: folder.VggJaxImageFolder, directory: str) -> None:
    """One line in the log; every skipped entry named in a file beside the index. And one line
    when some images are one file reached by two paths (``FolderScan.same_file_summary``)."""
    root, folder_scan = builder.builder_config.root, builder.folder_scan()
    if same_file := folder_scan.same_file_summary():
        logging.warning("Image folder %s: %s.", root, same_file)
    not_images = builder.not_jpeg_or_png
    if folder_scan.skipped or not_images:
        path = folder.write_skipped_list(folder_scan, directory, not_images)
    if folder_scan.skipped:
        logging.warning(
            "Image folder %s: skipped %s; listed in %s",
            root,
            folder_scan.skipped_summary(),
            path,
        )
    if not_images:
        logging.warning(
            "Image folder %s: %s neither JPEG nor PNG inside, whatever the name (WebP, GIF, "
            "HEIC, ...): counted as undecodable and left out; listed in %s",
            root,
            "1 image is" if len(not_images) == 1 else f"{len(not_images)} images are",
            path,
        )


def prepared_builder(input_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    builder = get_builder(input_config)
    if not builder.is_prepared():
        changed = ""
        if input_config.dataset == "image_folder" and (earlier := folder.earlier_copies(builder)):
            changed = (
                f" The folder {builder.builder_config.root} differs from when it was prepared "
                f"into {', '.join(earlier)} (images added, removed, renamed or rewritten, or "
                "another train_split)."
            )
        raise FileNotFoundError(
            f"Dataset {input_config.dataset!r} is not prepared in {builder.data_dir}.{changed} "
            "Run `python -m vgg_jax.tools.data --config=<your config>` (or data.prepare(config)) "
            "first."
        )
    return builder


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    if split not in builder.info.splits:
        raise ValueError(
            f"Split {split!r} is not in {builder.name}; valid: {sorted(builder.info.splits)}"
        )


# Files beyond the dataset's that the open-file limit is raised to leave room for (Orbax's saves,
# TensorFlow's and JAX's own).
SPARE_OPEN_FILES = 256


def _check_open_file_limit(builder: tfds.core.DatasetBuilder, split: str) -> None:
    """Raises the soft open-file limit so every file of the dataset can be open at once: a reader
    keeps each file it has read from open, and training reads two splits at random. Under a soft
    limit of 1,024 (a batch system's; macOS's is 256) ImageNet (1,024 training files, more in its
    other splits) failed mid-pass with ``open() failed: Too many open files``: indexing said the
    files might be damaged and to delete and prepare them again; training ended in a traceback."""
    files = sum(int(info.num_shards) for info in builder.info.splits.values())
    now = host.open_files()
    limits = host.open_file_limit(now + files + SPARE_OPEN_FILES)
    if limits is not None and limits[0] < now + files:
        raise DatasetError(
            f"{builder.name} is {files:,} files (all its splits) that are kept open while "
            f"{split} is read, and this process has {now:,} open already, but it may open only "
            f"{limits[0]:,} (ulimit -n; its hard limit is {limits[1]:,}): raise the limit to at "
            f"least {now + files + SPARE_OPEN_FILES:,} (ulimit -n, or the container's or job's "
            "nofile limit) and run again."
        )


class RecordReader:
    """Random access to one split's serialized examples (``tf.train.Example`` bytes)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
        check_split(builder, split)
        _check_open_file_limit(builder, split)
        self._source = builder.as_data_source(
            split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
        )

    def __len__(self) -> int:
        return len(self._source)

    def read(self, indices: np.ndarray) -> list[bytes]:
        return [self._source[int(i)] for i in indices]


# The two features every source shares, as stored by TFDS.
_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Encoded image bytes and int32 label of one serialized example."""
    example = tf.io.parse_single_example(serialized, _FEATURES)
    return example["image"], tf.cast(example["label"], tf.int32)
