"""PCA of patch features for pictures: streamed fitting, robust colour scaling, save and apply.

Fitting never holds all patches: `PCAAccumulator` keeps the sum and the sum of outer products in
float64 (about D x D numbers) plus a bounded, seeded reservoir sample used only for the colour
range and the mask threshold. Colours are fixed at fit time, so a saved PCA paints every image
(and every run) on the same scale.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinoreg._fs import atomic_write
from dinoreg.errors import InputError, UsageError

FORMAT = "dinoreg-pca/1"
COMPONENTS = 3
# Colours span the 1st..99th percentile of each component, so a handful of outlier patches
# (high-norm artifacts) cannot squash everything else into one colour.
PERCENTILES = (1.0, 99.0)


@dataclass(frozen=True, eq=False)
class PCA:
    """The first three principal components of patch features and their colour scaling."""

    mean: np.ndarray  # (D,) float64
    components: np.ndarray  # (3, D) float64, unit rows, signs fixed (see PCAAccumulator.fit)
    variance: np.ndarray  # (3,) eigenvalues, largest first
    lo: np.ndarray  # (3,) score mapped to 0
    hi: np.ndarray  # (3,) score mapped to 1
    threshold: float  # foreground = first-component score above this (Otsu at fit time)
    samples: int  # patches the fit saw
    model_name: str = ""
    model_sha: str = ""

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def scores(self, patches: np.ndarray) -> np.ndarray:
        """Features (..., D) -> component scores (..., 3), float64."""
        x = np.asarray(patches, dtype=np.float64)
        if x.shape[-1] != self.dim:
            raise UsageError(f"features have width {x.shape[-1]}, but this PCA expects {self.dim}")
        return (x - self.mean) @ self.components.T

    def colors(self, patches: np.ndarray) -> np.ndarray:
        """Features (..., D) -> RGB in [0, 1] (..., 3), one component per channel."""
        span = np.where(self.hi > self.lo, self.hi - self.lo, 1.0)
        return np.clip((self.scores(patches) - self.lo) / span, 0.0, 1.0)

    def foreground(self, patches: np.ndarray) -> np.ndarray:
        """Features (..., D) -> boolean mask (...,): first component above the threshold."""
        return self.scores(patches)[..., 0] > self.threshold

    def check(self, model_name: str, model_sha: str, dim: int, source: str = "this PCA") -> None:
        """Refuse to paint a model's features with a PCA fitted on another model's.

        The weight hash is the model's identity (names differ for one model: alias, path); when
        either side has none, only the feature width can be checked.
        """
        fitted = f"{self.model_name or 'an unnamed model'}"
        if dim != self.dim:
            raise UsageError(
                f"PCA file {source} was fitted on {self.dim}-dim features ({fitted}), but the "
                f"model {model_name or ''} gives {dim}-dim ones; fit one for this model with "
                "fit_pca.",
                params=("fit_pca",),
            )
        if self.model_sha and model_sha and self.model_sha != model_sha:
            raise UsageError(
                f"PCA file {source} was fitted on {fitted} (weights {self.model_sha[:12]}), not "
                f"on {model_name or 'this model'} (weights {model_sha[:12]}); use the same "
                "model or fit a new PCA with fit_pca.",
                params=(
                    "fit_pca",
                    "model",
                ),
            )

    def save(self, path: str | Path) -> Path:
        """Write an .npz (at exactly `path`) atomically; returns the path."""
        path = Path(path)
        arrays = {
            "format": np.array(FORMAT),
            "mean": self.mean,
            "components": self.components,
            "variance": self.variance,
            "lo": self.lo,
            "hi": self.hi,
            "threshold": np.array(self.threshold),
            "samples": np.array(self.samples),
            "dim": np.array(self.dim),
            "model_name": np.array(self.model_name),
            "model_sha": np.array(self.model_sha),
        }
        # Through a buffer, so numpy does not append ".npz" to a name the user chose.
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return atomic_write(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> PCA:
        """Read a file written by `save`; InputError when it is missing or not one."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(
                f"PCA file {path} does not exist; fit one with fit_pca {path}.", params=("fit_pca",)
            )
        bad = f"{path} is not a PCA file written by dinoreg (fit_pca)"
        try:
            with np.load(path, allow_pickle=False) as data:
                if "format" not in data.files or str(data["format"]) != FORMAT:
                    raise InputError(
                        f"{bad} (no {FORMAT} marker); fit it again with fit_pca.",
                        params=("fit_pca",),
                    )
                pca = cls(
                    mean=np.asarray(data["mean"], np.float64),
                    components=np.asarray(data["components"], np.float64),
                    variance=np.asarray(data["variance"], np.float64),
                    lo=np.asarray(data["lo"], np.float64),
                    hi=np.asarray(data["hi"], np.float64),
                    threshold=float(data["threshold"]),
                    samples=int(data["samples"]),
                    model_name=str(data["model_name"]),
                    model_sha=str(data["model_sha"]),
                )
                dim = int(data["dim"])
        except InputError:
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise InputError(
                f"{bad} ({type(exc).__name__}); fit it again with fit_pca.", params=("fit_pca",)
            ) from None
        k = COMPONENTS
        shapes_ok = (
            pca.mean.shape == (dim,)
            and pca.components.shape == (k, dim)
            and pca.lo.shape == pca.hi.shape == pca.variance.shape == (k,)
        )
        if not shapes_ok:
            raise InputError(
                f"{bad} (inconsistent array shapes); fit it again with fit_pca.",
                params=("fit_pca",),
            )
        return pca


class PCAAccumulator:
    """Streams patch features in, one image at a time, and fits a `PCA` at the end.

    Memory is O(D^2 + sample_cap * D) whatever the number of images.
    """

    def __init__(self, dim: int, *, sample_cap: int = 16_384, seed: int = 0) -> None:
        self.dim = dim
        self.count = 0
        self.sample_cap = sample_cap
        # Sums are taken around a shift (the first batch's mean): with raw sums, a mean large
        # against the spread would cancel catastrophically in sum(xx^T) - n mu mu^T.
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(dim)
        self._outer = np.zeros((dim, dim))
        self._border_sum = np.zeros(dim)
        self._border_count = 0
        self._sample = np.empty((0, dim), dtype=np.float32)
        self._rng = np.random.default_rng(seed)

    def add(self, patches: np.ndarray) -> None:
        """Add features as an (h, w, D) grid (its border patches inform the sign) or (N, D)."""
        x = np.asarray(patches, dtype=np.float64)
        if x.ndim not in (2, 3) or x.shape[-1] != self.dim:
            raise ValueError(f"expected (h, w, {self.dim}) or (N, {self.dim}), got {x.shape}")
        rows = x.reshape(-1, self.dim)
        if not len(rows):
            return
        if self._shift is None:
            self._shift = rows.mean(axis=0)
        y = rows - self._shift
        self._sum += y.sum(axis=0)
        self._outer += y.T @ y
        if x.ndim == 3:
            edge = np.zeros(x.shape[:2], dtype=bool)
            edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
            self._border_sum += (x[edge] - self._shift).sum(axis=0)
            self._border_count += int(edge.sum())
        self._reservoir(rows)
        self.count += len(rows)

    def _reservoir(self, rows: np.ndarray) -> None:
        # Algorithm R: after n rows, each one is in the sample with probability cap / n.
        free = self.sample_cap - len(self._sample)
        take = max(0, min(free, len(rows)))
        if take:
            self._sample = np.concatenate([self._sample, rows[:take].astype(np.float32)])
        rest = rows[take:]
        if not len(rest):
            return
        seen = np.arange(self.count + take, self.count + len(rows)) + 1
        slots = self._rng.integers(0, seen)
        for i in np.flatnonzero(slots < self.sample_cap):
            self._sample[slots[i]] = rest[i]

    def fit(self, model_name: str = "", model_sha: str = "") -> PCA:
        """Eigen-decompose the covariance and fix signs, colour range and mask threshold.

        Signs: the first component points away from the image border (mean border score below
        the mean), so that with typical framing the object is high and "above the threshold" is
        foreground; the others have their largest-magnitude loading positive.
        """
        n = self.count
        if n < 2 or self._shift is None:
            raise InputError("A PCA needs at least two patches; give it more images.")
        if self.dim < COMPONENTS:
            raise UsageError(f"A PCA of {COMPONENTS} components needs features of width >= 3.")
        centre = self._sum / n  # mean, relative to the shift
        cov = (self._outer - n * np.outer(centre, centre)) / (n - 1)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(values)[::-1][:COMPONENTS]
        components = vectors[:, order].T.copy()
        variance = np.maximum(values[order], 0.0)
        for k, row in enumerate(components):
            biggest = int(np.argmax(np.abs(row)))
            if row[biggest] < 0:
                components[k] = -row
        if self._border_count:
            border = self._border_sum / self._border_count - centre
            if border @ components[0] > 0:
                components[0] = -components[0]
        mean = self._shift + centre
        scores = (self._sample.astype(np.float64) - mean) @ components.T
        lo, hi = np.percentile(scores, PERCENTILES, axis=0)
        return PCA(
            mean=mean,
            components=components,
            variance=variance,
            lo=lo,
            hi=hi,
            threshold=otsu(scores[:, 0]),
            samples=n,
            model_name=model_name,
            model_sha=model_sha,
        )


def fit_patches(patches: np.ndarray, model_name: str = "", model_sha: str = "") -> PCA:
    """A PCA of one image's (h, w, D) patch grid (or (N, D) rows), through the same path."""
    x = np.asarray(patches)
    acc = PCAAccumulator(x.shape[-1], sample_cap=max(1, int(np.prod(x.shape[:-1]))))
    acc.add(x)
    return acc.fit(model_name, model_sha)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a 1-D sample that maximises the between-class variance."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not v.size or v.max() <= v.min():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    p = hist / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)[:-1]  # weight below each inner edge
    m0 = np.cumsum(p * centres)[:-1]
    total = float((p * centres).sum())
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(w0 * w1 > 0, (total * w0 - m0) ** 2 / (w0 * w1), -1.0)
    # Well-separated classes leave a plateau of equally good cuts (every empty bin in the gap);
    # take its middle rather than its first edge.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[int(best[len(best) // 2]) + 1])
