"""The built-in dataset's images, drawn with NumPy alone (no TensorFlow), so worker processes
that draw them start in about a second (``builtin.py`` stores them through TFDS).

Every image is a pure function of (seed, split, index): ``numpy.random.default_rng`` keyed by all
three, so the dataset is the same on every machine, in any generation order and in any process.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Iterator

import numpy as np
from absl import logging
from PIL import Image

from vgg_jax import host

CLASS_NAMES = (
    "disk",
    "ring",
    "square",
    "frame",
    "diamond",
    "triangle",
    "plus",
    "cross",
    "star",
    "crescent",
)
SHORT_SIDE = (48, 128)  # pixels, uniform
MAX_ASPECT = 1.6  # long side / short side, log-uniform in [1, MAX_ASPECT]
OBJECT_RADIUS = (0.15, 0.45)  # fraction of the short side, log-uniform
MAX_ROTATION = np.deg2rad(20.0)  # small, so square and diamond stay distinct classes
SPLIT_IDS = {"train": 0, "validation": 1}
JPEG_QUALITY = 90  # the stored images' (builtin.py)


def _shape_distance(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance to the class's outline, in units of the object radius
    (negative inside). ``u`` right, ``v`` down, both already rotated and scaled.

    For every class, wherever the distance is below ``e >= 0``, ``hypot(u, v) < 1.25 + 2 * e``
    (the outlines reach at most 1.22 from the centre, the frame's corners; the triangle's
    distance grows slowest outside, half as fast as ``hypot``): ``draw_example`` paints the
    object only within that reach."""
    radius = np.hypot(u, v)
    name = CLASS_NAMES[label]
    if name == "disk":
        return radius - 1.0
    if name == "ring":
        return np.abs(radius - 0.72) - 0.25
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if name == "frame":
        return np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.68) - 0.18
    if name == "diamond":
        return (np.abs(u) + np.abs(v) - 1.0) / np.sqrt(2.0)
    if name == "triangle":  # apex up
        edges = [np.cos(a) * u + np.sin(a) * v for a in np.deg2rad([90.0, 210.0, 330.0])]
        return np.max(edges, axis=0) - 0.5
    if name in ("plus", "cross"):
        if name == "cross":
            u, v = (u - v) / np.sqrt(2.0), (u + v) / np.sqrt(2.0)
        bar = lambda a, b: np.maximum(np.abs(a) - 1.0, np.abs(b) - 0.28)
        return np.minimum(bar(u, v), bar(v, u))
    if name == "star":  # five points, one up
        angle = np.arctan2(u, -v) * 5.0 / (2.0 * np.pi)
        to_tip = np.abs(angle - np.round(angle)) * 2.0  # 0 at a tip, 1 between tips
        return radius - (1.0 - 0.58 * to_tip)
    if name == "crescent":
        return np.maximum(radius - 1.0, 0.78 - np.hypot(u - 0.5, v + 0.15))
    raise ValueError(f"No shape for label {label}.")


def _colour_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random colour background: a coarse random grid, bilinearly upsampled (float32).

    Each grid row is interpolated across the width once, then those rows are blended down the
    height: per pixel the same float64 operations on the same operands as interpolating the four
    corners per pixel, so the same values (the dataset's images are pinned bit for bit)."""
    grid_h, grid_w = rng.integers(2, 6, size=2)
    grid = rng.uniform(0, 255, size=(grid_h, grid_w, 3))
    rows = np.interp(np.linspace(0, grid_h - 1, height), np.arange(grid_h), np.arange(grid_h))
    cols = np.interp(np.linspace(0, grid_w - 1, width), np.arange(grid_w), np.arange(grid_w))
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, grid_h - 1), np.minimum(c0 + 1, grid_w - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[:, None]
    across = grid[:, c0] * (1 - fc) + grid[:, c1] * fc
    # As [rows, width * 3]: faster than broadcasting over the three channels.
    across = across.reshape(grid_h, width * 3)
    top, bottom = across[r0], across[r1]
    top *= 1 - fr
    bottom *= fr
    field = np.add(top, bottom, out=np.empty((height, width * 3), np.float32))
    return field.reshape(height, width, 3)


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    canvas += alpha[..., None] * (colour - canvas)


def _window(centre, half_extent, shape) -> tuple[slice, slice]:
    """The pixel rows and columns within ``half_extent`` of ``centre``, clipped to the image."""
    (cy, cx), (hy, hx) = centre, half_extent
    rows = slice(max(int(cy - hy), 0), min(int(cy + hy) + 2, shape[0]))
    cols = slice(max(int(cx - hx), 0), min(int(cx + hx) + 2, shape[1]))
    return rows, cols


def _segment_distance(ys, xs, p0, p1) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((ys - p0[0]) * d[0] + (xs - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0.0, 1.0)
    return np.hypot(ys - (p0[0] + t * d[0]), xs - (p0[1] + t * d[1]))


def _add_clutter(rng: np.random.Generator, canvas: np.ndarray, ys, xs, short: int) -> None:
    """Thin line segments and small blobs of random colours: edges everywhere, none of them a
    class shape at object scale. Each is drawn only inside its bounding box. ``ys`` is the
    column [H, 1] of pixel-centre rows, ``xs`` the row [1, W] of pixel-centre columns."""
    height, width = canvas.shape[:2]
    for _ in range(rng.integers(4, 14)):
        colour = rng.uniform(0, 255, size=3).astype(np.float32)
        if rng.random() < 0.6:
            p0 = rng.uniform((0, 0), (height, width))
            p1 = p0 + rng.normal(0.0, 0.35 * short, size=2)
            half_width = rng.uniform(0.4, 1.3)
            rows, cols = _window((p0 + p1) / 2, np.abs(p1 - p0) / 2 + half_width + 1, canvas.shape)
            distance = _segment_distance(ys[rows], xs[:, cols], p0, p1)
            alpha = np.clip(half_width + 0.5 - distance, 0.0, 1.0)
        else:
            centre = rng.uniform((0, 0), (height, width))
            radii = rng.uniform(0.015, 0.06, size=2) * short
            rows, cols = _window(centre, radii + 1, canvas.shape)
            dist = np.hypot((ys[rows] - centre[0]) / radii[0], (xs[:, cols] - centre[1]) / radii[1])
            alpha = np.clip((1.0 - dist) * radii.min() + 0.5, 0.0, 1.0)
        _paint(canvas[rows, cols], alpha * np.float32(rng.uniform(0.5, 1.0)), colour)


def draw_example(
    seed: int, split: str, index: int, short_side: tuple[int, int] | None = None
) -> tuple[np.ndarray, int]:
    """One image (uint8 [H, W, 3]) and its label; a pure function of its arguments (the short
    side is uniform in ``short_side``, default ``SHORT_SIDE``)."""
    low, high = short_side or SHORT_SIDE
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    label = int(rng.integers(len(CLASS_NAMES)))
    short = int(rng.integers(low, high + 1))
    long = int(round(short * np.exp(rng.uniform(0.0, np.log(MAX_ASPECT)))))
    height, width = (short, long) if rng.random() < 0.5 else (long, short)
    # Pixel centres as a column and a row: broadcast, they give the values the full grids would.
    ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, :] + 0.5

    canvas = _colour_field(rng, height, width)
    _add_clutter(rng, canvas, ys, xs, short)

    radius = short * np.exp(rng.uniform(*np.log(OBJECT_RADIUS)))
    centre_y = rng.uniform(min(radius, height / 2), max(height - radius, height / 2))
    centre_x = rng.uniform(min(radius, width / 2), max(width - radius, width / 2))
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    cos, sin = np.cos(angle), np.sin(angle)
    # The object's alpha is 0 beyond 1.25 radii + 1 pixel from its centre (_shape_distance), and
    # painting with alpha 0 leaves a pixel as it is: only this window (2 pixels to spare) is drawn.
    rows, cols = _window((centre_y, centre_x), (1.25 * radius + 3,) * 2, canvas.shape)
    dy, dx = (ys[rows] - centre_y) / radius, (xs[:, cols] - centre_x) / radius
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    alpha = np.clip(0.5 - _shape_distance(label, u, v) * radius, 0.0, 1.0)
    window = canvas[rows, cols]
    # The object's colour is random but kept away from the background behind it.
    inside = alpha > 0.5
    behind = window[inside].mean(axis=0) if inside.any() else canvas.mean((0, 1))
    colour = rng.uniform(0, 255, size=3)
    if np.abs(colour - behind).max() < 60:
        colour = np.where(behind > 127, behind - 110, behind + 110)
    shading = 1.0 + 0.15 * (u * rng.normal() + v * rng.normal())[..., None]
    window += alpha[..., None] * (np.clip(colour * shading, 0, 255) - window)

    canvas += rng.normal(0.0, rng.uniform(0.0, 10.0), size=canvas.shape).astype(np.float32)
    np.rint(canvas, out=canvas)
    return np.clip(canvas, 0, 255, out=canvas).astype(np.uint8), label


PARALLEL_FROM = 500  # fewer images than this are drawn in this process (workers take ~1 s to start)
_workers_allowed = False


def allow_worker_processes() -> None:
    """Lets ``draw_split`` spawn worker processes; called under the ``if __name__ ==
    "__main__":`` guard of the command lines (launch.py, ``python -m vgg_jax.tools.data``). A
    spawned worker imports the program's main module again: a user's script without that guard
    would run itself again in every worker, so anything else (scripts, notebooks, tests) draws in
    its own process."""
    global _workers_allowed
    _workers_allowed = True


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """``image`` (uint8 RGB) as a baseline JPEG with full-resolution colour (4:4:4): byte for byte
    what ``tf.io.encode_jpeg(image, quality=quality, chroma_downsampling=False)`` writes, the
    dataset's format since its first release (both are libjpeg-turbo with its standard tables
    and TensorFlow's JFIF header says 300 dpi; tests/test_data_sources.py compares them). PIL,
    not TensorFlow, so the workers that draw the images encode them too: TensorFlow's eager op
    cost the main process about 1.2 ms an image, a fifth of the demo's dataset generation."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(
        buffer, format="JPEG", quality=quality, subsampling=0, dpi=(300, 300)
    )
    return buffer.getvalue()


def _draw_indexed(
    args: tuple[int, str, int, tuple[int, int], bool],
) -> tuple[np.ndarray | bytes, int]:
    *example, as_jpeg = args
    image, label = draw_example(*example)
    return (encode_jpeg(image) if as_jpeg else image), label


def draw_split(
    seed: int, split: str, count: int, as_jpeg: bool = False
) -> Iterator[tuple[np.ndarray | bytes, int]]:
    """``draw_example`` for indices 0 .. count - 1, in order, each image as an array or, with
    ``as_jpeg``, as ``encode_jpeg``'s bytes; drawn (and encoded) by one process per core when
    there are ``PARALLEL_FROM`` or more and the program allows it (``allow_worker_processes``;
    drawing is most of generating the demo's dataset, the caller stores meanwhile). Workers are
    spawned, not forked: the caller holds JAX's and TensorFlow's threads."""
    tasks = [(seed, split, index, SHORT_SIDE, as_jpeg) for index in range(count)]
    # A container's CPU quota counts: os.cpu_count and the affinity list the host's cores, and
    # workers beyond the quota only cost their start-up (about a second of CPU each) and memory.
    processes = min(host.usable_cpus(), 8)
    if count < PARALLEL_FROM or processes < 2 or not _workers_allowed:
        yield from map(_draw_indexed, tasks)
        return
    try:
        pool = multiprocessing.get_context("spawn").Pool(processes)
    except OSError as e:
        # The pool's locks live in /dev/shm: a sandbox or container without a writable one
        # failed the preparation, blamed on data_dir ("Read-only file system; free space there").
        logging.warning(
            "Drawing the built-in %s split in this process: no worker processes (%s; they need "
            "a writable /dev/shm).",
            split,
            e.strerror or e,
        )
        yield from map(_draw_indexed, tasks)
        return
    with pool:
        yield from pool.imap(_draw_indexed, tasks, chunksize=16)
