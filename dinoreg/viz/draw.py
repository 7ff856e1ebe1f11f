"""Maps to pictures with numpy and Pillow only: colour maps, upsampling, overlays, contact sheets.

Colour maps are 256 x 3 uint8 lookup tables built by linear interpolation (in sRGB) between nine
evenly spaced anchor colours of the published perceptually uniform maps. Nine anchors keep the
tables small to write down while staying monotonic in lightness, which the tests check.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from dinoreg._fs import atomic_write
from dinoreg.errors import UsageError

Upsample = Literal["nearest", "bilinear"]

# Evenly spaced stops of each map, as hex sRGB. A table interpolated from them differs from the
# 256-entry originals by a few levels at most, which no one can see in a heat map.
_ANCHORS: dict[str, tuple[str, ...]] = {
    "viridis": (
        "440154", "472d7b", "3b528b", "2c728e", "21918c", "28ae80", "5ec962", "addc30", "fde725",
    ),
    "magma": (
        "000004", "1c1044", "4f127b", "812581", "b5367a", "e55064", "fb8761", "fec287", "fcfdbf",
    ),
    "inferno": (
        "000004", "1f0c48", "550f6d", "88226a", "ba3655", "e35933", "f98e09", "f9cb35", "fcffa4",
    ),
    "gray": ("000000", "ffffff"),
}  # fmt: skip

COLORMAPS: tuple[str, ...] = tuple(_ANCHORS)

# Contact-sheet geometry, in pixels.
SHEET_MAX_SIDE = 4096  # at --size 896 a sheet was 5340 px wide and 12 MB
SHEET_PAD = 4
SHEET_LABEL = 16
SHEET_BACKGROUND = (24, 24, 24)
SHEET_TEXT = (235, 235, 235)


@cache
def colormap(name: str) -> np.ndarray:
    """The (256, 3) uint8 table of a colour map (read-only)."""
    if name not in _ANCHORS:
        raise UsageError(f"Unknown colour map {name!r}; use one of {', '.join(COLORMAPS)}.")
    stops = np.array([[int(h[i : i + 2], 16) for i in (0, 2, 4)] for h in _ANCHORS[name]], float)
    where = np.linspace(0.0, 1.0, len(stops))
    levels = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(levels, where, stops[:, c]) for c in range(3)], axis=1)
    table = np.rint(table).astype(np.uint8)
    table.flags.writeable = False
    return table


def apply_colormap(values: np.ndarray, name: str) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3); NaN maps to 0, outside is clipped."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
    index = np.rint(np.clip(v, 0.0, 1.0) * 255).astype(np.intp)
    return colormap(name)[index]


def rescale(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Map [lo, hi] (default: the values' min and max) linearly onto [0, 1], clipping outside.

    A constant map becomes all zeros rather than a division by zero.
    """
    v = np.asarray(values, dtype=np.float64)
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    if not hi > lo:
        return np.zeros_like(v)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def upsample(grid: np.ndarray, size: tuple[int, int], mode: Upsample = "nearest") -> np.ndarray:
    """A (h, w) or (h, w, C) patch map -> (H, W[, C]) float64 at image `size` = (W, H).

    "nearest" paints each patch as its own square: patch (i, j) covers exactly the pixels the
    model saw for it when the size is a multiple of the grid, so nothing is invented. "bilinear"
    is smoother, with pixel centres aligned (no half-patch shift).
    """
    g = np.asarray(grid, dtype=np.float64)
    width, height = size
    if mode not in ("nearest", "bilinear"):
        raise UsageError(f"Unknown upsampling {mode!r}; use nearest or bilinear.")
    channels = g[..., None] if g.ndim == 2 else g
    h, w = channels.shape[:2]
    if mode == "nearest" and height % h == 0 and width % w == 0:
        out = channels.repeat(height // h, axis=0).repeat(width // w, axis=1)
    else:
        resample = Image.Resampling.NEAREST if mode == "nearest" else Image.Resampling.BILINEAR
        planes = [
            np.asarray(
                Image.fromarray(channels[..., c].astype(np.float32), "F").resize(size, resample),
                dtype=np.float64,
            )
            for c in range(channels.shape[2])
        ]
        out = np.stack(planes, axis=-1)
    return out[..., 0] if g.ndim == 2 else out


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Blend a uint8 RGB heat map over a uint8 RGB image of the same size; alpha is the heat's."""
    if image.shape != heat.shape:
        raise ValueError(f"overlay sizes differ: image {image.shape}, heat {heat.shape}")
    a = min(max(float(alpha), 0.0), 1.0)
    out = image.astype(np.float64) * (1.0 - a) + heat.astype(np.float64) * a
    return np.rint(out).astype(np.uint8)


def sheet_layout(count: int, tile: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
    """(columns, rows, (width, height)) of a contact sheet of `count` tiles of size `tile`."""
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    width = columns * (tile[0] + SHEET_PAD) + SHEET_PAD
    height = rows * (tile[1] + SHEET_LABEL + SHEET_PAD) + SHEET_PAD
    return columns, rows, (width, height)


def contact_sheet(
    tiles: Sequence[tuple[str, np.ndarray]], max_side: int = SHEET_MAX_SIDE
) -> Image.Image:
    """Labelled tiles (all the same size) on a grid, each with its label in a band above it.

    Tiles are shrunk (by whole-pixel steps, nearest) so the sheet stays within `max_side`.
    """
    if not tiles:
        raise ValueError("a contact sheet needs at least one tile")
    th, tw = tiles[0][1].shape[:2]
    step = 1
    while max(sheet_layout(len(tiles), (-(-tw // step), -(-th // step)))[2]) > max_side:
        step += 1
    if step > 1:
        tiles = [(label, np.ascontiguousarray(pixels[::step, ::step])) for label, pixels in tiles]
        th, tw = tiles[0][1].shape[:2]
    columns, _, size = sheet_layout(len(tiles), (tw, th))
    sheet = Image.new("RGB", size, SHEET_BACKGROUND)
    for i, (label, pixels) in enumerate(tiles):
        if pixels.shape[:2] != (th, tw):
            raise ValueError(f"tile {label!r} is {pixels.shape[:2]}, not {(th, tw)}")
        row, col = divmod(i, columns)
        x = SHEET_PAD + col * (tw + SHEET_PAD)
        y = SHEET_PAD + row * (th + SHEET_LABEL + SHEET_PAD)
        # Drawn on a band of the tile's width, so a long label is cut at the tile's edge instead
        # of running into its neighbour. Pillow's default font (no font argument) is bundled
        # with Pillow: the sheet does not depend on the fonts installed.
        band = Image.new("RGB", (tw, SHEET_LABEL), SHEET_BACKGROUND)
        ImageDraw.Draw(band).text((2, 2), label, fill=SHEET_TEXT)
        sheet.paste(band, (x, y))
        sheet.paste(Image.fromarray(pixels, "RGB"), (x, y + SHEET_LABEL))
    return sheet


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """PNG encoding with no metadata, so equal pixels give equal bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    # A fresh image carries no info dict; clearing it anyway keeps a stray key (dpi, text) from
    # ever reaching the file.
    image.info = {}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def write_png(path: Path, image: Image.Image | np.ndarray) -> Path:
    """Write a PNG atomically: a half-written file never takes the final name."""
    return atomic_write(path, png_bytes(image))
