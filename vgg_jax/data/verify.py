"""Preparation checks what it built before anything trains on it.

Python's ``tarfile`` stops at a damaged header without an error, so an ILSVRC-2012 train tar with
bytes overwritten in the middle prepares "successfully" into a fraction of ImageNet (seen: 548 of
2,000 images, 274 of 1,000 classes), and TFDS then reuses it forever. So after preparation:

* each split's example count is compared with the expected one (``input.expected_counts``;
  ``published``: ImageNet's 1,281,167 train and 50,000 validation examples), and
* the classes that have decodable training examples are counted from the training index and
  compared with the expected class count (``classes=`` in ``input.expected_counts``, else every
  class of the dataset's labels: the ImageNet synsets, the image folder's class folders).

A mismatch moves the prepared TFDS files aside (``<version dir>.bad``, replacing an older one)
and removes the project's index and statistics of them, so the next run prepares again once the
input is fixed, and raises ``DatasetError`` naming the likely bad input: the split's tar (with
what a header walk finds in it), or the folder.
"""

from __future__ import annotations

import glob
import os
import shutil

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vgg_jax.data import DatasetError, choices, index, sources

parse_expected_counts = choices.parse_expected_counts


def _culprit(builder: tfds.core.DatasetBuilder, input_config, split: str) -> str:
    if input_config.dataset == "imagenet2012":
        return sources.imagenet_culprit(input_config.manual_dir, split)[0]
    if input_config.dataset == "image_folder":
        return f"check the folder {os.path.join(builder.builder_config.root, split)}"
    return f"the generated files in {builder.data_dir} are damaged"


def _move_aside(builder: tfds.core.DatasetBuilder, files_dir: str) -> str:
    """Moves the prepared files out of TFDS's sight; says where, or what to delete."""
    source = os.fspath(builder.data_dir)
    target = f"{source}.bad"  # one bad copy at most: a partial ImageNet can be large
    try:
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(source, target)
    except OSError as e:
        return f"could not move {source} aside ({e.strerror or e}): delete it before the next run"
    if os.path.abspath(files_dir) != os.path.abspath(source):
        for pattern in ("vgg_jax_index_*.npz", "vgg_jax_stats.json", "vgg_jax_skipped_files.txt"):
            for path in glob.glob(os.path.join(files_dir, pattern)):
                os.remove(path)
    return f"moved the prepared files aside to {target}, so the next run prepares them again"


def _fail(builder, input_config, files_dir: str, split: str, what: str) -> None:
    culprit = _culprit(builder, input_config, split)
    moved = _move_aside(builder, files_dir)
    raise DatasetError(f"{builder.name} {what}: {culprit}. {moved[0].upper()}{moved[1:]}.")


def check_examples(
    builder: tfds.core.DatasetBuilder, input_config: ml_collections.ConfigDict, files_dir: str
) -> None:
    """Each split's example count (as TFDS wrote it: cheap) against ``input.expected_counts``."""
    expected = parse_expected_counts(input_config.expected_counts, input_config.dataset) or {}
    splits = builder.info.splits
    unknown = sorted(set(expected) - set(splits) - {"classes"})
    if unknown:  # a typo must not move a good dataset aside
        raise DatasetError(
            f"config.input.expected_counts={input_config.expected_counts!r} names "
            f"{', '.join(map(repr, unknown))}, not a split of {builder.name}; valid: "
            f"{sorted(splits)} and 'classes'"
        )
    for split, count in expected.items():
        if split == "classes":
            continue
        actual = int(splits[split].num_examples)
        if actual != count:
            _fail(
                builder,
                input_config,
                files_dir,
                split,
                f"split {split!r} has {actual:,} examples, expected {count:,}",
            )


def check_classes(
    builder: tfds.core.DatasetBuilder,
    input_config: ml_collections.ConfigDict,
    train_index: index.SplitIndex,
    files_dir: str,
) -> None:
    """How many classes have decodable training examples, against the expected class count."""
    expected = parse_expected_counts(input_config.expected_counts, input_config.dataset)
    if expected is None:
        return
    label = builder.info.features["label"]
    want = expected.get("classes", int(label.num_classes))
    present = np.unique(train_index.label[train_index.label >= 0])
    if len(present) == want:
        return
    split = input_config.train_split
    what = f"split {split!r} has decodable examples of {len(present):,} classes, expected {want:,}"
    if input_config.dataset == "image_folder":
        missing = sorted(set(range(int(label.num_classes))) - set(present.tolist()))
        what += f" (none decodable in: {', '.join(label.names[i] for i in missing[:10])})"
    if split in expected:
        # The split holds exactly the examples the config expects (``check_examples``): what was
        # built is what was given (a subset of ImageNet's synsets), not a damaged tar, which
        # would have lost examples too; the class count was not given, or given wrong. Moving it
        # aside cost a whole preparation again.
        given = (
            f"gives classes={want}"
            if "classes" in expected
            else "gives no class count: every class of its labels"
        )
        raise DatasetError(
            f"{builder.name} {what}, though it holds the {expected[split]:,} examples "
            f"config.input.expected_counts={input_config.expected_counts!r} expects (which "
            f"{given}). For this subset make it classes={len(present)}; the prepared files are "
            "kept."
        )
    _fail(builder, input_config, files_dir, split, what)


def check_labelled(
    builder: tfds.core.DatasetBuilder,
    input_config: ml_collections.ConfigDict,
    split: str,
    split_index: index.SplitIndex,
) -> None:
    """A split whose decodable examples carry no label (TFDS stores -1: ImageNet's test split,
    prepared when ``ILSVRC2012_img_test.tar`` is in ``manual_dir``) cannot be trained on or
    scored: its table said 100% error, and training took label -1 as the last class. Raises
    ``DatasetError`` naming the config key; the prepared files are fine and stay.

    Nor can an evaluation split none of whose examples decode (an image folder's validation
    split of WebP or GIF files named .jpg): its table said 100% top-1 and top-5 error, over 0
    images. (The training split is ``check_classes``'s: it also moves damaged files aside.)"""
    if not len(split_index.valid) and split != input_config.get("train_split"):
        _no_decodable_example(builder, split, split_index, input_config.dataset)
    unlabelled = int((split_index.label[split_index.valid] < 0).sum())
    if not unlabelled:
        return
    keys = [k for k in ("train_split", "eval_split") if input_config.get(k) == split]
    labelled = [str(s) for s in builder.info.splits if str(s) != split]
    raise DatasetError(
        f"{builder.name}/{split} has {unlabelled:,} examples without a label (label -1"
        + (": ImageNet's test set is unlabelled" if builder.name == "imagenet2012" else "")
        + "), so it cannot be trained on or scored; set "
        + " and ".join(f"config.input.{k}" for k in keys or ["eval_split"])
        + f" to a labelled split ({', '.join(map(repr, sorted(labelled)))})."
    )


def _no_decodable_example(
    builder: tfds.core.DatasetBuilder, split: str, split_index: index.SplitIndex, dataset: str
) -> None:
    if dataset == "image_folder":
        fix = (
            f"check the folder {os.path.join(builder.builder_config.root, split)} (only JPEG "
            "and PNG decode, whatever a file is named: WebP, GIF or HEIC files named .jpg do not)"
        )
    else:
        fix = f"the prepared files in {builder.data_dir} may be damaged"
    raise DatasetError(
        f"{builder.name}/{split} has no image that decodes ({len(split_index.fmt):,} skipped as "
        f"undecodable), so it cannot be scored: {fix}."
    )


def copies_found(
    builder: tfds.core.DatasetBuilder,
    train_split: str,
    eval_split: str,
    train_index: index.SplitIndex,
    eval_index: index.SplitIndex,
) -> list[str]:
    """Byte-identical images where they make scores wrong without a word: evaluation images that
    are training images (the validation behind the learning-rate rule and the final table score
    what the net was trained on), and training images stored in two classes (trained towards two
    labels). Copies are common in scraped or hand-split folders; symbolic links to one file are
    named by the folder scan already. Compares the indexes' byte fingerprints; one line per kind,
    with an example by record number and class; empty when there is none (or an index predates
    fingerprints)."""
    if train_index.digest is None or eval_index.digest is None:
        return []
    names = builder.info.features["label"].names or None

    def where(split: str, split_index: index.SplitIndex, record: int) -> str:
        label = int(split_index.label[record])
        return f"{split} record {record:,} (class {names[label] if names else label!r})"

    train_valid, eval_valid = train_index.valid, eval_index.valid
    train_digest = train_index.digest[train_valid]
    found = []
    if eval_split != train_split:
        copied = eval_valid[np.isin(eval_index.digest[eval_valid], train_digest)]
        if len(copied):
            first = int(copied[0])
            twin = int(train_valid[np.flatnonzero(train_digest == eval_index.digest[first])[0]])
            example = f"{where(eval_split, eval_index, first)} is " + where(
                train_split, train_index, twin
            )
            found.append(
                f"{len(copied):,} of {len(eval_valid):,} {builder.name}/{eval_split} images are "
                f"byte-identical to {train_split} images (e.g. {example}): the validation "
                "behind the learning-rate rule and the evaluation score images the net trains "
                "on; remove them from one split"
            )
    # Training images whose bytes recur under another label.
    order = np.lexsort((train_index.label[train_valid], train_digest))
    digest, label = train_digest[order], train_index.label[train_valid][order]
    same = digest[1:] == digest[:-1]
    relabelled = np.flatnonzero(same & (label[1:] != label[:-1]))
    if len(relabelled):
        clashes = np.unique(digest[1:][relabelled])
        first, second = train_valid[order][relabelled[0]], train_valid[order][relabelled[0] + 1]
        found.append(
            f"{len(clashes):,} {builder.name}/{train_split} "
            + ("image is" if len(clashes) == 1 else "images are")
            + " stored in two or more "
            f"classes (e.g. {where(train_split, train_index, int(first))} is "
            f"{where(train_split, train_index, int(second))}): each is trained towards two labels"
            "; keep each in its one class"
        )
    return found
