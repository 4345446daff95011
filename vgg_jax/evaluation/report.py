"""Result rows laid out like the paper's Tables 3-6, and where they are saved.

A row is a plain dict: ``net``, ``train_scale`` (S, e.g. "256" or "[256;512]"), ``test_scales``
(the Q set, a list), ``method`` (``dense``, ``multi_crop`` or ``dense+multi_crop``),
``top1_error`` and ``top5_error`` (%), ``images_per_second``, ``count`` (examples counted) and
``step`` (the checkpoint's step; a tuple of steps for fused nets). ``top5_error`` is ``None``
(``null`` in JSON, "n/a" in tables) for a net of 5 classes or fewer, where it measures nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from vgg_jax import writers

METHOD_TITLES = {
    "dense": "dense",
    "multi_crop": "multi-crop",
    "dense+multi_crop": "dense + multi-crop",
}
COLUMNS = (
    "ConvNet config.",
    "train (S)",
    "test (Q)",
    "method",
    "top-1 val. error (%)",
    "top-5 val. error (%)",
    "images/s",
    "images",
)
RESULTS = "results"  # results.json and results.md


def train_scale_text(smin: int, smax: int) -> str:
    """S as the paper writes it: ``256`` for fixed S, ``[256;512]`` for scale jittering."""
    return str(smin) if smin == smax else f"[{smin};{smax}]"


def test_scales_text(scales: Sequence[int]) -> str:
    return ",".join(str(q) for q in scales)


def error_text(error: float | None, unit: str = "") -> str:
    """An error for tables and log lines: ``12.34`` (then ``unit``), or ``n/a`` for a top-k that
    measures nothing (``None``: 5 classes or fewer for top-5)."""
    return "n/a" if error is None else f"{error:.2f}{unit}"


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        row["net"],
        row["train_scale"],
        test_scales_text(row["test_scales"]),
        METHOD_TITLES.get(row["method"], row["method"]),
        error_text(row["top1_error"]),
        error_text(row["top5_error"]),
        f"{row['images_per_second']:.1f}",
        str(int(row["count"])),
    ]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, padded so it also reads as plain text on a terminal."""
    table = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(table[0]), rule] + [line(cells) for cells in table[1:]])


def write_results(
    directory: str, rows: Sequence[dict[str, Any]], about: dict[str, Any], name: str = RESULTS
) -> tuple[str, str]:
    """Writes ``<name>.json`` (rows and ``about``: checkpoints, test settings) and ``<name>.md``
    (the table) into ``directory``; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, f"{name}.json")
    markdown_path = os.path.join(directory, f"{name}.md")
    json_text = json.dumps({**about, "rows": list(rows)}, indent=2) + "\n"  # fails before a write
    checkpoints = ", ".join(
        f"{c['workdir']} step {c['step']}" for c in about.get("checkpoints", [])
    )
    images, what = "", "validation error"
    if data := about.get("data"):
        images = f" on {data['images']} images of {data['dataset']}/{data['split']}"
        if data["skipped_undecodable"]:
            images += f" ({data['skipped_undecodable']} more do not decode: left out)"
        what = "error"  # the split is named: the train split's is not a validation error
    markdown = f"Top-1/top-5 {what}{images}; checkpoints: {checkpoints}.\n\n"
    # Together, the .json last: its presence marks a step evaluated (continuous.py), and it never
    # stands beside a .md of another evaluation (a full disk, a kill between the two).
    writers.write_together(
        {markdown_path: markdown + format_table(rows) + "\n", json_path: json_text}
    )
    return json_path, markdown_path


def scalar_name(row: dict[str, Any], metric: str) -> str:
    """A TensorBoard tag for one figure of a row, e.g. ``dense_Q224-256-288/top1_error``."""
    scales = "-".join(str(q) for q in row["test_scales"])
    return f"{row['method'].replace('+', '_and_')}_Q{scales}/{metric}"
