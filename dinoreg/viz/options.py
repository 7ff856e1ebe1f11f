"""What `show` draws and how (checked before any model loads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dinoreg.errors import UsageError
from dinoreg.inputs.recipe import PATCH_SIZE
from dinoreg.viz import draw


@dataclass(frozen=True)
class ShowOptions:
    """What `show` draws and how; the defaults suit the small model on photos."""

    size: int = 448  # short side, rounded to a multiple of the patch size
    max_size: int | None = None  # long-side cap; None means 2 * size
    mask: bool = False  # black out PCA background (first component below its threshold)
    pca: str | Path | None = None  # apply this saved PCA (colours comparable across images)
    fit_pca: str | Path | None = None  # fit one PCA over all inputs, save it here, use it
    heads: bool = True  # write one attention picture per head (the sheet shows them anyway)
    upsample: draw.Upsample = "nearest"  # patch squares; "bilinear" is smoother
    alpha: float = 0.6  # opacity of heat maps over the image
    attention_cmap: str = "inferno"
    norm_cmap: str = "viridis"
    overwrite: bool = False
    resume: bool = False  # skip images whose pictures are all there (a rerun continues)
    norms_histogram: bool = False  # also a log-count histogram of the patch-token norms

    def __post_init__(self) -> None:
        if isinstance(self.size, int) and self.size % PATCH_SIZE:
            lower = max(PATCH_SIZE, self.size // PATCH_SIZE * PATCH_SIZE)
            raise UsageError(
                f"size must be a multiple of {PATCH_SIZE} (the patch size), like embed's "
                f"image_size; got {self.size}, try {lower} or {lower + PATCH_SIZE}.",
                params=("size",),
            )
        if not isinstance(self.size, int) or self.size < PATCH_SIZE:
            raise UsageError(f"Size must be an integer of at least {PATCH_SIZE}, got {self.size}.")
        if self.max_size is not None and self.max_size < self.size:
            raise UsageError(f"Max size ({self.max_size}) must be at least size ({self.size}).")
        if self.pca is not None and self.fit_pca is not None:
            raise UsageError(
                "Give either pca (apply a saved PCA) or fit_pca, not both.",
                params=("pca", "fit_pca"),
            )
        if self.pca is not None and not Path(self.pca).is_file():  # before any model loads
            raise UsageError(
                f"PCA file {self.pca} does not exist; fit one with fit_pca {self.pca}.",
                params=("pca", "fit_pca"),
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"Alpha must be between 0 and 1, got {self.alpha}.")
        if self.upsample not in ("nearest", "bilinear"):
            raise UsageError(f"Unknown upsampling {self.upsample!r}; use nearest or bilinear.")
        draw.colormap(self.attention_cmap)  # raises UsageError naming the choices
        draw.colormap(self.norm_cmap)

    @property
    def long_side(self) -> int:
        return self.max_size if self.max_size is not None else 2 * self.size
