"""Class score maps as pictures a person can read (matplotlib).

Dense evaluation (section 3.2 of the paper) gives a class score map: cell (i, j) of it is the
classifier applied to the crop-size window at ``(32 i, 32 j)`` of the image rescaled to test scale
Q, so the map of a class shows where in the image the net sees it, a coarse localisation for free
(our reading of the map; the paper only averages it).

A 1000-class net spreads its probability thin: one class rarely reaches 0.01 in a cell where it
is not the answer, so a colour scale fixed at [0, 1] paints every map black. Here each map is
coloured over its own range (its least to its most probable cell), blended over the image, with a
colour bar in probability units, the class name, the image's probability for the class and Q.
``render_top_k`` draws the first k classes side by side.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, safe in servers and tests

import jax  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vgg_jax import models  # noqa: E402
from vgg_jax.evaluation import predict  # noqa: E402

STRIDE = 2**models.NUM_POOLS  # pixels between neighbouring score-map cells at test scale Q
# Dark where the class is least likely, bright where most: the image glows where the net sees the
# class (a map whose top is dark red, as jet's, reads as "low" over a photo).
COLOUR_MAP = "inferno"
MAP_ALPHA = 0.6  # the map's weight in the blend: the image stays visible under it


BAR_INCHES = 1.0  # a colour bar and its labels, beside each map
TITLE_INCHES = 0.7  # two title lines above each map


def class_probability_map(score_map: np.ndarray, class_index: int) -> np.ndarray:
    """``(h, w)``: the softmax probability of ``class_index`` in each cell of a ``(h, w,
    classes)`` score map (raw class scores, as ``predict`` returns)."""
    score_map = np.asarray(score_map, np.float32)
    if score_map.ndim != 3 or not 0 <= class_index < score_map.shape[-1]:
        raise ValueError(
            f"Need an (h, w, classes) score map and a class index below {score_map.shape[-1]}; "
            f"got shape {score_map.shape} and class {class_index}."
        )
    return np.asarray(jax.nn.softmax(score_map, axis=-1))[..., class_index]


def own_range(values: np.ndarray) -> tuple[float, float]:
    """The colour scale's limits: the map's least and most probable cells (a flat map gets a
    tiny range around its value, so it shows as one colour, not as an error)."""
    low, high = float(np.min(values)), float(np.max(values))
    if high - low < 1e-12:
        low, high = low - 1e-6, high + 1e-6
    return low, high


def _cell_coordinates(pixels: int, cells: int, crop_size: int, input_pixels: int) -> np.ndarray:
    """For each pixel row (or column) of a rendering ``pixels`` long, its fractional score-map
    cell: cell ``i`` is the window from ``STRIDE * i`` to ``STRIDE * i + crop_size`` of the net's
    input, ``input_pixels`` long (the image at test scale Q), so its centre lies at that fraction
    of any rendering of the image. With the pools' ceil mode the last window may reach past the
    image (into the zero padding); its centre may then lie beyond the image's edge."""
    centres = (STRIDE * np.arange(cells) + crop_size / 2) / input_pixels
    return np.interp((np.arange(pixels) + 0.5) / pixels, centres, np.arange(cells, dtype=float))


def upsample(
    values: np.ndarray,
    height: int,
    width: int,
    crop_size: int,
    input_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Bilinear interpolation of a cell map onto an image of ``height`` x ``width`` (the original
    or the rescaled one), each cell at its window's centre. ``input_size``: the net's input
    (the image at test scale Q), default ``(height, width)`` (the image is the net's input)."""
    input_height, input_width = input_size or (height, width)
    rows = _cell_coordinates(height, values.shape[0], crop_size, input_height)
    cols = _cell_coordinates(width, values.shape[1], crop_size, input_width)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, values.shape[0] - 1), np.minimum(c0 + 1, values.shape[1] - 1)
    wr, wc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = values[r0][:, c0] * (1 - wc) + values[r0][:, c1] * wc
    bottom = values[r1][:, c0] * (1 - wc) + values[r1][:, c1] * wc
    return top * (1 - wr) + bottom * wr


def short_name(class_name: str) -> str:
    """The first of a synset's words ("tabby, tabby cat" -> "tabby"), for titles."""
    return class_name.split(",")[0].strip()


def _draw(
    axes: Any,
    image: np.ndarray,
    values: np.ndarray,
    crop_size: int,
    scale: int | None,
    title: str,
) -> Any:
    pixels = np.clip(np.asarray(image, np.float32), 0, 255).astype(np.uint8)
    height, width = pixels.shape[:2]
    input_size = predict.rescaled_size(height, width, scale) if scale else None
    low, high = own_range(values)
    axes.imshow(pixels, interpolation="bilinear")
    heat = axes.imshow(
        upsample(values, height, width, crop_size, input_size),
        cmap=COLOUR_MAP,
        vmin=low,
        vmax=high,
        alpha=MAP_ALPHA,
        interpolation="bilinear",
    )
    axes.set_title(title, fontsize=10)
    axes.set_axis_off()
    return heat


def _colour_bar(figure: Figure, heat: Any, axes: Any) -> Any:
    bar = figure.colorbar(heat, ax=axes, fraction=0.046, pad=0.02)
    bar.solids.set_alpha(1.0)
    bar.ax.tick_params(labelsize=8)
    bar.set_label("probability per window", fontsize=8)
    return bar


def _title(class_name: str, probability: float, scale: int | None, cells: tuple) -> str:
    at = f"Q={scale}, " if scale else ""
    return (
        f"{short_name(class_name)}: {100 * probability:.1f}%\n({at}{cells[0]}x{cells[1]} windows)"
    )


def render(
    image: Any,
    score_map: np.ndarray,
    class_index: int,
    class_name: str,
    probability: float,
    scale: int | None = None,
    crop_size: int = 224,
    width_inches: float = 5.0,
    dpi: int = 100,
) -> Figure:
    """One class's map over ``image`` (RGB 0-255, the original or the rescaled one), coloured
    over its own range, with a colour bar; titled with the class, its image probability (as
    ``predict`` reports it) and the test scale Q. ``scale``: the Q ``predict`` used (None: the
    image is the net's input as it is), which places the windows. ``save`` (or ``plt.close``)
    the figure when done."""
    values = class_probability_map(score_map, class_index)
    pixels = np.asarray(image)
    aspect = pixels.shape[0] / pixels.shape[1]
    figure = plt.figure(
        figsize=_whole_pixels(
            width_inches, (width_inches - BAR_INCHES) * aspect + TITLE_INCHES, dpi
        ),
        dpi=dpi,
        layout="constrained",
    )
    axes = figure.add_subplot()
    title = _title(class_name, probability, scale, values.shape)
    heat = _draw(axes, pixels, values, crop_size, scale, title)
    _colour_bar(figure, heat, axes)
    return figure


def render_top_k(
    image: Any,
    score_map: np.ndarray,
    top: Sequence[Any],
    scale: int | None = None,
    crop_size: int = 224,
    panel_inches: float = 3.2,
    dpi: int = 100,
) -> Figure:
    """The maps of ``top`` (``predict``'s ``ClassScore`` list) side by side, each over its own
    range with its own colour bar, after the image itself."""
    pixels = np.asarray(image)
    aspect = pixels.shape[0] / pixels.shape[1]
    panels = len(top) + 1
    figure, axes = plt.subplots(
        1,
        panels,
        figsize=_whole_pixels(
            panel_inches * panels, (panel_inches - BAR_INCHES) * aspect + TITLE_INCHES, dpi
        ),
        dpi=dpi,
        squeeze=False,
        layout="constrained",
    )
    axes = axes[0]
    axes[0].imshow(np.clip(pixels.astype(np.float32), 0, 255).astype(np.uint8))
    axes[0].set_title(f"image {pixels.shape[1]}x{pixels.shape[0]}", fontsize=10)
    axes[0].set_axis_off()
    for rank, (panel, guess) in enumerate(zip(axes[1:], top, strict=True), start=1):
        values = class_probability_map(score_map, guess.class_index)
        title = f"{rank}. " + _title(guess.class_name, guess.probability, scale, values.shape)
        heat = _draw(panel, pixels, values, crop_size, scale, title)
        _colour_bar(figure, heat, panel)
    return figure


def _whole_pixels(width: float, height: float, dpi: int) -> tuple[float, float]:
    """A figure size in inches that is a whole number of pixels at ``dpi`` (the PNG's size)."""
    return round(width * dpi) / dpi, round(height * dpi) / dpi


def save(figure: Figure, path: str) -> str:
    """Writes ``figure`` as a PNG at ``path`` (directories created; the figure's size in inches
    times its dpi, in pixels) and closes it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
