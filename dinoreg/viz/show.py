"""Pictures of what the model sees, per image: PCA colours, CLS attention, token norms, a sheet.

Each image is resized at its own aspect (short side `size`, long side capped, both multiples of
the patch size) and run once; that one pass gives the final-norm patches (PCA), the last block's
pre-norm patches (norm map) and its attention (CLS row). Every PNG has the resized image's size,
and maps are drawn patch for patch on it, so overlays line up exactly.

Files per image, in this order: `<stem>_pca.png`, `<stem>_attn_mean.png`, one
`<stem>_attn_head<k>.png` per head (k zero-padded to the width of the last head's index, so
they sort), `<stem>_norm.png`, `<stem>_sheet.png`, and with `norms_histogram`
`<stem>_norm_histogram.png` (`viz.norms`). `viz.compare` puts several models side by side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dinoreg.errors import InputError, OutputError
from dinoreg.inputs.decode import ImageDecodeError
from dinoreg.runtime import PreparedModel
from dinoreg.viz import draw
from dinoreg.viz.maps import Maps, load_resized, model_identity, run_maps, to_pixels
from dinoreg.viz.norms import HistogramSeries, histogram_picture, norm_stats, patch_norms
from dinoreg.viz.options import ShowOptions
from dinoreg.viz.pca import PCA, PCAAccumulator, fit_patches

Progress = Callable[[str, int, int], None]  # (stage "fit" or "render", done, total)


@dataclass(frozen=True)
class ImageReport:
    """What was drawn for one input, with the numbers worth printing."""

    path: str
    stem: str
    size: tuple[int, int]  # (W, H) of every picture
    grid: tuple[int, int]  # (h, w) patches
    register_attention: float  # CLS attention mass on the registers, mean over heads
    register_attention_heads: tuple[float, ...]
    max_norm: float  # largest pre-norm patch-token L2 norm
    median_norm: float
    foreground: float | None  # share of patches in the mask, when masking
    files: tuple[Path, ...]
    outlier_share: float = 0.0  # share of high-norm patch tokens (`viz.norms.norm_stats`)
    upscale: float = 1.0  # how much the image was enlarged (short side after / before)


@dataclass(frozen=True)
class ShowResult:
    files: tuple[Path, ...]  # every PNG written, in input order
    images: tuple[ImageReport, ...]
    failed: tuple[tuple[str, str], ...]  # (path, reason) of inputs that could not be read
    pca_file: Path | None  # where --fit-pca saved its PCA


def unique_stems(paths: Sequence[str]) -> list[str]:
    """File stems for outputs; repeats become `name-2`, `name-3`, ... (case-insensitively, as
    macOS and Windows compare names)."""
    taken: set[str] = set()
    stems = []
    for path in paths:
        stem = Path(path).stem or "image"
        candidate, k = stem, 2
        while candidate.casefold() in taken:
            candidate, k = f"{stem}-{k}", k + 1
        taken.add(candidate.casefold())
        stems.append(candidate)
    return stems


def output_names(stem: str, heads: int, with_heads: bool = True, hist: bool = False) -> list[str]:
    """The file names `show` writes for one image, in order."""
    digits = len(str(max(heads - 1, 0)))
    per_head = [f"{stem}_attn_head{k:0{digits}d}.png" for k in range(heads)] if with_heads else []
    return [
        f"{stem}_pca.png",
        f"{stem}_attn_mean.png",
        *per_head,
        f"{stem}_norm.png",
        f"{stem}_sheet.png",
        *([f"{stem}_norm_histogram.png"] if hist else []),
    ]


def fit_pca(
    prepared: PreparedModel,
    paths: Sequence[str],
    options: ShowOptions | None = None,
    progress: Progress | None = None,
) -> tuple[PCA, list[tuple[str, str]]]:
    """One PCA over the final-norm patches of all readable inputs, streamed (flat memory).

    Returns it with the (path, reason) of inputs that could not be read.
    """
    options = options or ShowOptions()
    model = prepared.model
    name, sha = model_identity(model)
    acc = PCAAccumulator(model.cfg.dim)
    failed = []
    for i, path in enumerate(paths):
        try:
            image = load_resized(path, options.size, options.long_side)
        except ImageDecodeError as exc:
            failed.append((path, exc.reason))
        else:
            acc.add(run_maps(prepared, to_pixels(image, model), attention=False).patches)
        if progress:
            progress("fit", i + 1, len(paths))
    if acc.count == 0:
        raise InputError("No input could be read, so there is nothing to fit a PCA on.")
    return acc.fit(name, sha), failed


def show(
    prepared: PreparedModel,
    paths: Sequence[str],
    out_dir: str | Path,
    options: ShowOptions | None = None,
    progress: Progress | None = None,
    on_image: Callable[[ImageReport | tuple[str, str]], None] | None = None,
) -> ShowResult:
    """Draw the pictures of every input into `out_dir`; unreadable inputs are skipped and listed.

    Each image's pictures are written (atomically) as it is drawn, and `on_image` gets its
    report, or (path, reason) when it could not be read, right then. Raises OutputError before
    any work if a file would be overwritten without `overwrite`; with `resume` images whose
    pictures are all there are skipped instead.
    """
    options = options or ShowOptions()
    model = prepared.model
    out = Path(out_dir)
    heads, regs, hist = model.cfg.heads, model.cfg.num_registers, options.norms_histogram
    stems = unique_stems(paths)
    names = {s: [out / n for n in output_names(s, heads, options.heads, hist)] for s in stems}
    planned = [p for s in stems for p in names[s]]
    if options.fit_pca is not None:
        planned.append(Path(options.fit_pca))
    existing = [str(p) for p in planned if p.exists()]
    done = {s for s in stems if options.resume and all(p.exists() for p in names[s])}
    if existing and not (options.overwrite or options.resume):
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OutputError(
            f"{', '.join(existing[:3])}{more} already exist; "
            "pass overwrite=True or another out_dir.",
            params=("overwrite", "out_dir"),
        )
    name, sha = model_identity(model)
    shared: PCA | None = None
    failed: list[tuple[str, str]] = []
    if options.pca is not None:
        shared = PCA.load(options.pca)
        shared.check(name, sha, model.cfg.dim, str(options.pca))
    _check_destinations(out, options.fit_pca)  # before any work: fitting a PCA takes a pass
    out.mkdir(parents=True, exist_ok=True)
    saved = None
    if options.fit_pca is not None:
        shared, failed = fit_pca(prepared, paths, options, progress)
        saved = shared.save(options.fit_pca)
    skip = {p for p, _ in failed}
    reports = []
    for i, (path, stem) in enumerate(zip(paths, stems, strict=True)):
        if path in skip or stem in done:
            pass
        else:
            try:
                image, upscale = load_resized(
                    path, options.size, options.long_side, with_scale=True
                )
            except ImageDecodeError as exc:
                failed.append((path, exc.reason))
                if on_image is not None:
                    on_image(failed[-1])
            else:
                maps = run_maps(prepared, to_pixels(image, model))
                report = _draw(image, maps, stem, path, out, shared, options, regs, name)
                reports.append(dataclasses.replace(report, upscale=upscale))
                if on_image is not None:
                    on_image(reports[-1])
        if progress:
            progress("render", i + 1, len(paths))
    files = tuple(f for r in reports for f in r.files)
    return ShowResult(files, tuple(reports), tuple(failed), saved)


def _draw(
    image: Image.Image,
    maps: Maps,
    stem: str,
    path: str,
    out: Path,
    shared: PCA | None,
    options: ShowOptions,
    registers: int,
    model_name: str = "",
) -> ImageReport:
    size = image.size
    h, w = maps.patches.shape[:2]
    picture = np.asarray(image)
    pca = shared or fit_patches(maps.patches)
    rgb = pca.colors(maps.patches)
    foreground = None
    if options.mask:
        keep = pca.foreground(maps.patches)
        rgb = rgb * keep[..., None]
        foreground = float(keep.mean())
    pca_png = np.rint(draw.upsample(rgb, size, options.upsample) * 255).astype(np.uint8)

    def heat(grid: np.ndarray, cmap: str) -> np.ndarray:
        # Each map on its own min..max: an outlier patch shows as the lone bright square it is.
        colours = draw.apply_colormap(
            draw.upsample(draw.rescale(grid), size, options.upsample), cmap
        )
        return draw.overlay(picture, colours, options.alpha)

    to_registers = maps.cls_attention[:, 1 : 1 + registers].sum(axis=1)  # (heads,)
    per_head = maps.cls_attention[:, 1 + registers :].reshape(-1, h, w)  # (heads, h, w)
    attn_mean = heat(per_head.mean(axis=0), options.attention_cmap)
    attn_heads = [heat(a, options.attention_cmap) for a in per_head]
    norms = patch_norms(maps.raw)
    stats = norm_stats(norms)
    norm_png = heat(norms, options.norm_cmap)

    pca_label = "PCA 1-3 as RGB" + (f", foreground {foreground:.0%}" if options.mask else "")
    tiles = [
        (f"image {size[0]}x{size[1]} (w x h), grid {h}x{w} (h x w)", picture),
        (pca_label, pca_png),
        (f"CLS attention, mean; registers {to_registers.mean():.1%}", attn_mean),
        (f"patch norm before final norm, max {norms.max():.1f}", norm_png),
        *[
            (f"head {k}; registers {m:.1%}", a)
            for k, (m, a) in enumerate(zip(to_registers, attn_heads, strict=True))
        ],
    ]
    names = output_names(stem, len(per_head), options.heads, options.norms_histogram)
    shown_heads = attn_heads if options.heads else []
    pictures = [pca_png, attn_mean, *shown_heads, norm_png, draw.contact_sheet(tiles)]
    if options.norms_histogram:
        pictures.append(histogram_picture([HistogramSeries.of(model_name, norms, stats)]))
    files = tuple(draw.write_png(out / n, p) for n, p in zip(names, pictures, strict=True))
    return ImageReport(
        path=path,
        stem=stem,
        size=size,
        grid=(h, w),
        register_attention=float(to_registers.mean()),
        register_attention_heads=tuple(float(m) for m in to_registers),
        max_norm=float(norms.max()),
        median_norm=float(np.median(norms)),
        foreground=foreground,
        files=files,
        outlier_share=stats.outlier_share,
    )


def _check_destinations(out: Path, fit_pca: str | Path | None) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"{out} is a file, not a directory; give a directory as out_dir.", params=("out_dir",)
        )
    if fit_pca is not None and not Path(fit_pca).parent.is_dir():
        raise OutputError(
            f"cannot save the PCA to {fit_pca}: {Path(fit_pca).parent} is not a directory; create "
            "it or choose another fit_pca path.",
            params=("fit_pca",),
        )
