"""Models side by side on the same images: one sheet per image with a row per model.

Each row shows the image, the CLS attention over the patches (mean over heads), the norm of
each patch token before the final norm, and the PCA colours of the final patch tokens. Every
model sees the same resized image, so every row has the same patch grid; attention and norm
maps share one colour scale across the rows of a sheet, so a brighter square is a larger value
whichever model it belongs to. That is the paper's figure: artifacts in the models without
registers, clean maps in the ones with them.

Memory holds one model at a time: each model is loaded, run over every image and freed before
the next. What a sheet needs from each model (three small maps per image) waits in a scratch
folder inside the output folder, so memory stays flat however many images there are; a sheet
is drawn and written as soon as the last model has seen its image, and the scratch folder goes
away at the end, whatever happens.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dinoreg.errors import OutputError, UsageError
from dinoreg.inputs.decode import ImageDecodeError, load_image
from dinoreg.inputs.recipe import aspect_size, resize
from dinoreg.runtime import ComputeOptions, PreparedModel, prepare_model
from dinoreg.viz import draw
from dinoreg.viz.maps import recipe_for, run_maps, to_pixels
from dinoreg.viz.norms import (
    HistogramSeries,
    ModelMaps,
    ModelRow,
    histogram_picture,
    norm_stats,
    patch_norms,
)
from dinoreg.viz.options import ShowOptions
from dinoreg.viz.pca import fit_patches
from dinoreg.viz.show import Progress, unique_stems

Loader = Callable[[str, ComputeOptions], PreparedModel]

COLUMNS = ("image", "attention", "norm", "pca")
ROW_HEADER = 16  # pixels of the band that names the model above its row


@dataclass(frozen=True)
class CompareReport:
    """One image compared: its rows in model order, the row labels, the files written."""

    path: str
    stem: str
    size: tuple[int, int]  # (W, H) every model saw
    rows: tuple[ModelRow, ...]
    labels: tuple[str, ...]  # one per row, as drawn above it
    files: tuple[Path, ...]

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows[0].grid


@dataclass(frozen=True)
class CompareResult:
    files: tuple[Path, ...]  # every PNG written, in input order
    images: tuple[CompareReport, ...]
    failed: tuple[tuple[str, str], ...]  # (path, reason) of inputs that could not be read
    models: tuple[str, ...]


@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on a compare sheet of `rows` models with tiles of `tile` (W, H)."""

    rows: int
    tile: tuple[int, int]

    @property
    def row_height(self) -> int:
        return ROW_HEADER + draw.SHEET_LABEL + self.tile[1] + draw.SHEET_PAD

    @property
    def size(self) -> tuple[int, int]:
        width = len(COLUMNS) * (self.tile[0] + draw.SHEET_PAD) + draw.SHEET_PAD
        return width, draw.SHEET_PAD + self.rows * self.row_height

    def origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left of a tile's label band; the tile itself starts SHEET_LABEL lower."""
        x = draw.SHEET_PAD + column * (self.tile[0] + draw.SHEET_PAD)
        return x, draw.SHEET_PAD + row * self.row_height + ROW_HEADER


def output_names(stem: str, histogram: bool = False) -> list[str]:
    """The files `compare` writes for one image, in order."""
    return [f"{stem}_compare.png", *([f"{stem}_norm_histogram.png"] if histogram else [])]


def check_models(models: Sequence[str], options: ShowOptions) -> None:
    """Refuse what cannot be compared before anything is loaded."""
    if len(models) < 2:
        raise UsageError(
            f"compare needs two or more models, got {len(models)}; list them separated by commas.",
            params=("compare",),
        )
    repeated = sorted({m for m in models if list(models).count(m) > 1})
    if repeated:
        raise UsageError(
            f"compare lists {', '.join(repeated)} more than once; name each model once.",
            params=("compare",),
        )
    for name in ("pca", "fit_pca"):
        if getattr(options, name) is not None:
            # a PCA belongs to one model's features; compare fits one per model and image
            raise UsageError(
                f"{name} applies to one model, not to compare; leave it out.",
                params=(name, "compare"),
            )


def compare(
    models: Sequence[str],
    paths: Sequence[str],
    out_dir: str | Path,
    options: ShowOptions | None = None,
    compute: ComputeOptions | None = None,
    progress: Progress | None = None,
    load: Loader = prepare_model,
) -> CompareResult:
    """Run each model in turn over every input and write one sheet per image (and, with
    `options.norms_histogram`, the histogram of norms); unreadable inputs are skipped and listed.

    Raises UsageError for fewer than two models or models of different patch sizes, and
    OutputError before any work if a file would be overwritten without `overwrite`.
    """
    options = options or ShowOptions()
    compute = compute or ComputeOptions()
    models = list(models)
    check_models(models, options)
    out = Path(out_dir)
    stems = unique_stems(paths)
    names = [output_names(s, options.norms_histogram) for s in stems]
    existing = [str(out / n) for ns in names for n in ns if (out / n).exists()]
    if existing and not options.overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OutputError(
            f"{', '.join(existing[:3])}{more} already exist; "
            "pass overwrite=True or another out_dir.",
            params=("overwrite", "out_dir"),
        )
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".compare-", dir=out))
    failed: dict[str, str] = {}
    reports: list[CompareReport] = []
    patch = None
    try:
        for m, name in enumerate(models):
            prepared = load(name, compute)
            cfg = prepared.model.cfg
            if patch is None:
                patch = cfg.patch_size
            elif cfg.patch_size != patch:
                raise UsageError(
                    f"compare needs models of one patch size, but {name} has {cfg.patch_size} "
                    f"and {models[0]} has {patch}, so their maps would not share a grid.",
                    params=("compare",),
                )
            last = m == len(models) - 1
            for i, (path, stem) in enumerate(zip(paths, stems, strict=True)):
                if path not in failed:
                    try:
                        image = _load(path, options, patch)
                    except ImageDecodeError as exc:
                        failed[path] = exc.reason
                    else:
                        maps = _model_maps(prepared, name, image, options)
                        if not last:
                            maps.save(scratch / f"{i}-{m}.npz")
                        else:  # every model has seen this image: its sheet can be drawn now
                            rows = [ModelMaps.load(scratch / f"{i}-{k}.npz") for k in range(m)]
                            done = _finish(image, [*rows, maps], path, stem, names[i], out, options)
                            reports.append(done)
                if progress:
                    progress(name, i + 1, len(paths))
            del prepared
            gc.collect()  # the next model must not sit next to this one's weights and caches
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = tuple(f for r in reports for f in r.files)
    return CompareResult(files, tuple(reports), tuple(failed.items()), tuple(models))


def _load(path: str, options: ShowOptions, patch: int) -> Image.Image:
    """Decode and resize at the image's aspect to multiples of the models' patch size."""
    recipe = recipe_for(options.size, options.long_side)
    image = load_image(path, recipe)
    return resize(image, recipe, aspect_size(*image.size, options.size, options.long_side, patch))


def _model_maps(
    prepared: PreparedModel, name: str, image: Image.Image, options: ShowOptions
) -> ModelMaps:
    model = prepared.model
    registers = model.cfg.num_registers
    maps = run_maps(prepared, to_pixels(image, model))
    h, w = maps.patches.shape[:2]
    attention = maps.cls_attention[:, 1 + registers :].mean(axis=0).reshape(h, w)
    to_registers = (
        maps.cls_attention[:, 1 : 1 + registers].sum(axis=1).mean() if registers else None
    )
    norms = patch_norms(maps.raw)
    stats = norm_stats(norms)
    pca = fit_patches(maps.patches)
    rgb = pca.colors(maps.patches)
    if options.mask:
        rgb = rgb * pca.foreground(maps.patches)[..., None]
    row = ModelRow(
        model=name,
        family=getattr(getattr(model, "info", None), "family", model.cfg.family),
        registers=registers,
        grid=(h, w),
        outlier_share=stats.outlier_share,
        outlier_threshold=stats.threshold,
        register_attention=None if to_registers is None else float(to_registers),
        median_norm=stats.median,
        max_norm=stats.max,
    )
    to_u8 = np.rint(rgb * 255).astype(np.uint8)
    return ModelMaps(row, attention.astype(np.float32), norms.astype(np.float32), to_u8)


def _finish(
    image: Image.Image,
    maps: Sequence[ModelMaps],
    path: str,
    stem: str,
    names: Sequence[str],
    out: Path,
    options: ShowOptions,
) -> CompareReport:
    grids = {m.row.grid for m in maps}
    if len(grids) != 1:  # same patch size and image: cannot happen, but a sheet must not lie
        raise RuntimeError(f"models gave different grids for {path}: {sorted(grids)}")
    labels = tuple(m.row.label for m in maps)
    pictures = [compare_sheet(image, maps, labels, options)]
    if options.norms_histogram:
        series = [
            HistogramSeries(m.row.model, m.norms, m.row.outlier_threshold, m.row.outlier_share)
            for m in maps
        ]
        pictures.append(histogram_picture(series))
    files = tuple(draw.write_png(out / n, p) for n, p in zip(names, pictures, strict=True))
    rows = tuple(m.row for m in maps)
    return CompareReport(path, stem, image.size, rows, labels, files)


def compare_sheet(
    image: Image.Image, maps: Sequence[ModelMaps], labels: Sequence[str], options: ShowOptions
) -> Image.Image:
    """The sheet: a header band naming each model, then its four labelled tiles."""
    size = image.size
    picture = np.asarray(image)
    # One scale per kind across the rows: the point is to compare magnitudes between models.
    attn_lo = min(float(m.attention.min()) for m in maps)
    attn_hi = max(float(m.attention.max()) for m in maps)
    norm_lo = min(float(m.norms.min()) for m in maps)
    norm_hi = max(float(m.norms.max()) for m in maps)

    def heat(grid: np.ndarray, lo: float, hi: float, cmap: str) -> np.ndarray:
        scaled = draw.rescale(grid, lo, hi)
        colours = draw.apply_colormap(draw.upsample(scaled, size, options.upsample), cmap)
        return draw.overlay(picture, colours, options.alpha)

    layout = SheetLayout(len(maps), size)
    sheet = Image.new("RGB", layout.size, draw.SHEET_BACKGROUND)
    pen = ImageDraw.Draw(sheet)
    for r, (m, label) in enumerate(zip(maps, labels, strict=True)):
        x, y = layout.origin(r, 0)
        pen.text((x + 2, y - ROW_HEADER + 2), label, fill=draw.SHEET_TEXT)
        pca = draw.upsample(m.pca.astype(np.float64), size, options.upsample)
        tiles = [
            (
                f"image {size[0]}x{size[1]} (w x h), grid {m.row.grid[0]}x{m.row.grid[1]} (h x w)",
                picture,
            ),
            (
                f"CLS attention, mean of heads; scale shared by rows {attn_lo:.3g}..{attn_hi:.3g}",
                heat(m.attention, attn_lo, attn_hi, options.attention_cmap),
            ),
            (
                f"patch norm; scale shared by rows {norm_lo:.4g}..{norm_hi:.4g}",
                heat(m.norms, norm_lo, norm_hi, options.norm_cmap),
            ),
            ("PCA 1-3 as RGB (this model's own)", np.rint(pca).astype(np.uint8)),
        ]
        for c, (text, pixels) in enumerate(tiles):
            x, y = layout.origin(r, c)
            # on a band of the tile's width, so a long label stops at the tile's edge
            band = Image.new("RGB", (size[0], draw.SHEET_LABEL), draw.SHEET_BACKGROUND)
            ImageDraw.Draw(band).text((2, 2), text, fill=draw.SHEET_TEXT)
            sheet.paste(band, (x, y))
            sheet.paste(Image.fromarray(pixels, "RGB"), (x, y + draw.SHEET_LABEL))
    return sheet
