"""Published ImageNet weights in one command: download, verify, convert, and what to run next.

    python -m vgg_jax.tools.pretrained --net=vgg16 --source=torchvision \\
        --workdir=workdirs/vgg16_torchvision
    python -m vgg_jax.tools.pretrained --net=vgg19 --source=keras --workdir=workdirs/vgg19_keras
    python -m vgg_jax.tools.pretrained --net=vgg16 --source=torchvision \\
        --file=vgg16-397923af.pth --workdir=workdirs/vgg16_torchvision  # no network

The file comes from its authors' own address (``vgg_jax.weights.pretrained``), into a cache
(``--cache_dir``, default ``~/.cache/vgg_jax/weights``) where an interrupted download resumes;
its hash is checked against the published one before it is converted. The checkpoint records the
weights' input convention (torchvision: RGB, 0-1, ImageNet mean and std; Keras: Caffe's BGR, 0-255,
mean subtracted), which ``predict`` and the evaluator apply.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from vgg_jax import conventions
from vgg_jax.weights import pretrained


def fetch_and_import(
    name: str,
    source: str,
    workdir: str,
    file: str | None = None,
    cache_dir: str | None = None,
    base_url: str | None = None,
    write: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fetches (or takes ``file``), verifies and imports the published ``name`` weights of
    ``source`` into a new checkpoint in ``workdir``; returns ``import_to_checkpoint``'s summary
    with ``weights`` (the ``PublishedWeights``) and ``path`` (the verified file) added."""
    from vgg_jax import checkpoint
    from vgg_jax.weights import importer

    weights = pretrained.lookup(name, source)
    if checkpoint.available_steps(workdir):  # before a 500 MB download, not after
        raise FileExistsError(
            f"{workdir} already holds checkpoints {checkpoint.available_steps(workdir)}; pass a "
            "new --workdir."
        )
    if file:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No file at --file={file}")
        write(f"checking {file} against {source}'s {weights.file_name}")
        try:
            pretrained.verify(file, weights)
        except pretrained.HashMismatchError as e:
            raise pretrained.HashMismatchError(
                f"{e} To import other weights (fine-tuned, another release), use "
                "python -m vgg_jax.tools.import_weights."
            ) from None
        path = file
    else:
        url = weights.url(base_url)
        write(f"fetching {url} (about {weights.size_mb} MB)")
        path = pretrained.fetch(
            weights, cache_dir, base_url, pretrained.ProgressPrinter(write), timeout_s=60
        )
        write(f"verified {weights.hash_name} {weights.hash_value}: {path}")
    summary = importer.import_to_checkpoint(path, weights.fmt, workdir)
    if summary["net"] != weights.net:
        raise ValueError(f"{path} holds net {summary['net']}, not {weights.net} ({name}).")
    return dict(summary, weights=weights, path=path)


def next_steps(summary: dict[str, Any], workdir: str) -> list[str]:
    """What to print after an import: the net, its convention and the commands that use it."""
    from vgg_jax.weights import importer

    weights = summary["weights"]
    lines = [
        f"{source_name(weights)} -> net {summary['net']} (Table 1), "
        f"{summary['num_params']:,} parameters, checkpoint {summary['checkpoint']}",
        f"input convention (applied for you): {conventions.describe(summary['input_convention'])}",
    ]
    if weights.top1_error is not None:
        lines.append(
            f"published ImageNet validation error (one 224 crop): top-1 {weights.top1_error:.2f}%"
            f", top-5 {weights.top5_error:.2f}%"
        )
    lines += [
        "next:",
        f"  classify images: python -m vgg_jax.tools.predict --workdir={workdir} IMAGE_OR_FOLDER"
        " [--score_maps=DIR]",
        "  evaluate on ImageNet (dense, multi-crop, multi-scale): "
        + importer.evaluate_command(summary["net"], summary["config"], workdir),
        f"  start a training run from it: --config.init_from.workdir={workdir}",
    ]
    return lines


def source_name(weights: pretrained.PublishedWeights) -> str:
    return f"{weights.source} {weights.name}"


def main(argv: list[str]) -> None:
    from absl import app, flags

    from vgg_jax.tools import cli

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    values = flags.FLAGS
    if values.list:
        for (source, name), weights in sorted(pretrained.REGISTRY.items()):
            if weights.net:
                print(f"--source={source} --net={name}: net {weights.net}, {weights.url()}")
        return
    if not values.workdir:
        sys.exit("pretrained: pass --workdir (a new directory for the checkpoint).")
    try:
        summary = fetch_and_import(
            values.net,
            values.source,
            values.workdir,
            values.file,
            values.cache_dir,
            values.base_url,
        )
    except (
        pretrained.DownloadError,
        pretrained.HashMismatchError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as e:
        hint = ""
        if isinstance(e, pretrained.DownloadError) and not values.file:
            weights = pretrained.lookup(values.net, values.source)
            hint = (
                f"\nWithout network: download {weights.url()} elsewhere and pass --file=PATH "
                "(the same command, no download)."
            )
        sys.exit(f"pretrained: {e}{hint}")
    for line in next_steps(summary, values.workdir):
        print(line)


def define_flags() -> None:
    from absl import flags

    names = sorted({name for (_, name), w in pretrained.REGISTRY.items() if w.net})
    flags.DEFINE_string("net", "vgg16", f"Which net: {names}.")
    flags.DEFINE_enum("source", "torchvision", pretrained.SOURCES, "Who published the weights.")
    flags.DEFINE_string("workdir", None, "New directory for the checkpoint.")
    flags.DEFINE_string("file", None, "The published file, already on disk: no download.")
    flags.DEFINE_string(
        "cache_dir", None, f"Download cache (default ${pretrained.CACHE_ENV} or "
        "~/.cache/vgg_jax/weights).",
    )  # fmt: skip
    flags.DEFINE_string(
        "base_url", None, f"Replaces the publishers' base address (a mirror); also "
        f"${pretrained.BASE_URL_ENV}.",
    )  # fmt: skip
    flags.DEFINE_bool("list", False, "List the published weights and exit.")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
