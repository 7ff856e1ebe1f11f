"""What one model shows on one image: patch-token norms and their outliers, the numbers a
compare row is labelled with, and the log-count histogram of norms per model.

"Vision Transformers Need Registers" finds that large ViTs without registers repurpose ~2% of
patch tokens as global stores; before the final norm those tokens have norms several times the
rest, a second mode in the histogram of norms. The paper cuts at a fixed norm (~150 for
ViT-L), which does not carry over to other sizes, images or resolutions: norms scale with the
width and the training. So we call a token an outlier relative to its own image:

    norm > median + OUTLIER_MADS * max(MAD, MAD_FLOOR * median)

over that image's patch tokens (MAD: the median absolute deviation from the median). Median and
MAD barely move for a few percent of artifacts, so those cannot raise their own bar, which they
would do to a mean and standard deviation. OUTLIER_MADS = 12 (about 8 standard deviations of a
normal main mode) was chosen on tiny random-weight models of both families (widths 32 and 64,
three seeds each) on the example photos at 224, 448 and 896 pixels: their norm tails reached 11
MADs and none of 620k tokens passed 12, so random weights report 0%. The floor keeps a nearly
constant map (MAD about 0) from flagging tokens a hair above the median.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUTLIER_MADS = 12.0
MAD_FLOOR = 0.02  # the MAD counts as at least 2% of the median

# Histogram picture geometry, in pixels.
HIST_SIZE = (640, 360)
HIST_BINS = 64
HIST_MARGINS = (56, 30, 14, 34)  # left, top, right, bottom of the plot area
HIST_BACKGROUND = (24, 24, 24)
HIST_AXES = (150, 150, 150)
HIST_TEXT = (235, 235, 235)
# One colour per model, distinct on the dark background (cycled past six models).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 159, 64),
    (77, 201, 246),
    (240, 96, 160),
    (130, 220, 110),
    (250, 220, 90),
    (180, 140, 255),
)


@dataclass(frozen=True)
class NormStats:
    """The norms of one image's patch tokens under one model, summed up."""

    median: float
    mad: float  # median absolute deviation from the median
    threshold: float  # norms above this are outliers (see the module's docstring)
    outlier_share: float  # share of patch tokens above the threshold, in [0, 1]
    max: float


def patch_norms(tokens: np.ndarray) -> np.ndarray:
    """L2 norm of each token: (..., D) -> (...)."""
    return np.linalg.norm(np.asarray(tokens, dtype=np.float64), axis=-1)


def outlier_threshold(norms: np.ndarray) -> float:
    """The norm above which a token of this set is an outlier: median + 12 x max(MAD, 2% med)."""
    v = np.asarray(norms, dtype=np.float64).ravel()
    median = float(np.median(v))
    mad = float(np.median(np.abs(v - median)))
    return median + OUTLIER_MADS * max(mad, MAD_FLOOR * median)


def norm_stats(norms: np.ndarray) -> NormStats:
    """Median, MAD, outlier threshold and share, and maximum of one image's token norms."""
    v = np.asarray(norms, dtype=np.float64).ravel()
    if not v.size:
        raise ValueError("norm statistics need at least one token")
    median = float(np.median(v))
    threshold = outlier_threshold(v)
    return NormStats(
        median=median,
        mad=float(np.median(np.abs(v - median))),
        threshold=threshold,
        outlier_share=float((v > threshold).mean()),
        max=float(v.max()),
    )


@dataclass(frozen=True)
class HistogramSeries:
    """One model's norms in a histogram: its name (legend) and its outlier threshold (marker)."""

    name: str
    norms: np.ndarray
    threshold: float | None = None
    outlier_share: float | None = None

    @classmethod
    def of(cls, name: str, norms: np.ndarray, stats: NormStats) -> HistogramSeries:
        return cls(name, norms, stats.threshold, stats.outlier_share)


def shared_bins(series: Sequence[HistogramSeries], bins: int = HIST_BINS) -> np.ndarray:
    """Bin edges over the range of every series, so the models' counts are comparable; the range
    reaches the outlier thresholds too, so each cut is drawn even where no token passes it."""
    values = np.concatenate([np.asarray(s.norms, np.float64).ravel() for s in series])
    cuts = [s.threshold for s in series if s.threshold is not None]
    lo, hi = float(values.min()), max(float(values.max()), *cuts)
    # a margin, so a cut at the very top is not hidden by the frame; a constant set still gets
    # a readable axis
    hi = hi + 0.02 * (hi - lo) if hi > lo else lo + 1.0
    return np.linspace(lo, hi, bins + 1)


def histogram_picture(
    series: Sequence[HistogramSeries], size: tuple[int, int] = HIST_SIZE
) -> Image.Image:
    """Log-count histograms of patch-token norms, one outline per model on shared bins.

    Counts are drawn as log10(1 + count), so a second mode of a few dozen high-norm tokens is
    as visible as the main mode of thousands; each model's outlier threshold is a dashed line.
    """
    if not series:
        raise ValueError("a histogram needs at least one series")
    edges = shared_bins(series)
    counts = [np.histogram(np.asarray(s.norms).ravel(), bins=edges)[0] for s in series]
    top = max(1.0, float(np.ceil(np.log10(1 + max(int(c.max()) for c in counts)))))
    image = Image.new("RGB", size, HIST_BACKGROUND)
    pen = ImageDraw.Draw(image)
    left, upper, right, lower = HIST_MARGINS
    x0, y0, x1, y1 = left, upper, size[0] - right, size[1] - lower

    def x_at(value: float) -> float:
        return x0 + (value - edges[0]) / (edges[-1] - edges[0]) * (x1 - x0)

    def y_at(count: float) -> float:
        return y1 - np.log10(1 + count) / top * (y1 - y0)

    pen.rectangle((x0, y0, x1, y1), outline=HIST_AXES)
    for decade in range(int(top) + 1):  # y ticks at 1, 10, 100, ... tokens
        y = y_at(10**decade - 1 if decade == 0 else 10**decade)
        pen.line((x0 - 4, y, x0, y), fill=HIST_AXES)
        pen.text((4, y - 6), f"{10**decade if decade else 0:g}", fill=HIST_TEXT)
    for value in np.linspace(edges[0], edges[-1], 5):
        x = x_at(value)
        pen.line((x, y1, x, y1 + 4), fill=HIST_AXES)
        pen.text((x - 14, y1 + 6), f"{value:.4g}", fill=HIST_TEXT)
    pen.text((x0, y1 + 20), "patch-token norm before the final norm (shared bins)", fill=HIST_TEXT)
    pen.text((x0, 8), "tokens per bin (log scale)", fill=HIST_TEXT)
    for k, (s, c) in enumerate(zip(series, counts, strict=True)):
        colour = PALETTE[k % len(PALETTE)]
        points = []
        for i, n in enumerate(c):  # a step outline: overlapping models stay readable
            y = y_at(float(n))
            points += [(x_at(edges[i]), y), (x_at(edges[i + 1]), y)]
        pen.line(points, fill=colour, width=2)
        if s.threshold is not None and edges[0] <= s.threshold <= edges[-1]:
            x = x_at(s.threshold)
            for y in np.arange(y0, y1, 8):
                pen.line((x, y, x, min(y + 4, y1)), fill=colour)
        share = "" if s.outlier_share is None else f": outliers {s.outlier_share:.1%}"
        pen.text((x1 - 250, y0 + 6 + 14 * k), f"{s.name}{share}", fill=colour)
    return image


@dataclass(frozen=True)
class ModelRow:
    """One model on one image: the numbers its row is labelled with."""

    model: str  # the name as given (alias, repo id or path)
    family: str  # "dinov2_with_registers" or "dinov2"
    registers: int
    grid: tuple[int, int]  # (h, w) patches
    outlier_share: float  # share of patch tokens whose norm is an outlier (see viz.norms)
    outlier_threshold: float
    register_attention: float | None  # CLS attention mass on registers; None without registers
    median_norm: float
    max_norm: float

    @property
    def label(self) -> str:
        registers = "n/a" if self.register_attention is None else f"{self.register_attention:.1%}"
        return (
            f"{self.model} ({self.registers} registers): outlier patches {self.outlier_share:.1%}"
            f" (norm > {self.outlier_threshold:.4g}), CLS attention on registers {registers}"
        )


@dataclass(frozen=True)
class ModelMaps:
    """What one model leaves for one image's compare sheet (kept on disk until it is drawn)."""

    row: ModelRow
    attention: np.ndarray  # (h, w) float32: CLS attention to each patch, mean over heads
    norms: np.ndarray  # (h, w) float32: patch-token norms before the final norm
    pca: np.ndarray  # (h, w, 3) uint8 PCA colours, this model's own PCA of this image

    def save(self, path: Path) -> None:
        row = json.dumps(asdict(self.row))  # the numbers as text: no pickle in the scratch files
        np.savez(path, attention=self.attention, norms=self.norms, pca=self.pca, row=row)

    @classmethod
    def load(cls, path: Path) -> ModelMaps:
        with np.load(path, allow_pickle=False) as d:
            doc = json.loads(str(d["row"]))
            row = ModelRow(**{**doc, "grid": tuple(doc["grid"])})
            return cls(row, d["attention"], d["norms"], d["pca"])
