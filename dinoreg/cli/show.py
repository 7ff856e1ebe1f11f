"""`dinoreg show`: pictures of the features of each image (PCA, attention, norms, a sheet)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from dinoreg.cli import output
from dinoreg.cli.app import EXIT_SKIPPED, DeviceOpt, Inputs, JsonOpt, ModelOpt, QuietOpt, app


@app.command()
def show(
    inputs: Inputs,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the PNG files.")],
    model: ModelOpt = "small",
    size: Annotated[
        int, typer.Option("--size", help="Short side in pixels (aspect kept; multiples of 14).")
    ] = 448,
    max_size: Annotated[
        int | None, typer.Option("--max-size", help="Long-side cap (default: 2 x --size).")
    ] = None,
    mask: Annotated[bool, typer.Option("--mask", help="Black out the PCA background.")] = False,
    fit_pca: Annotated[
        Path | None, typer.Option("--fit-pca", help="Fit one PCA over all inputs and save it here.")
    ] = None,
    pca: Annotated[
        Path | None, typer.Option("--pca", help="Apply a saved PCA so colours match across runs.")
    ] = None,
    no_heads: Annotated[
        bool, typer.Option("--no-heads", help="No per-head attention files (the sheet has them).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing PNGs.")] = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PNGs per image: PCA of patch features, CLS attention per head, token norms, a sheet."""
    from dinoreg.inputs.discover import discover
    from dinoreg.runtime import ComputeOptions, prepare_model
    from dinoreg.viz.show import ShowOptions
    from dinoreg.viz.show import show as draw

    options = ShowOptions(
        size=size,
        max_size=max_size,
        mask=mask,
        pca=pca,
        fit_pca=fit_pca,
        heads=not no_heads,
        overwrite=overwrite,
    )
    paths = discover(inputs, stdin=sys.stdin)
    net = prepare_model(model, ComputeOptions(device=device))

    def progress(stage: str, done: int, total: int) -> None:
        if not quiet and sys.stderr.isatty():
            output.err.print(f"{stage} {done}/{total}", end="\r")

    result = draw(net, paths, out, options, progress)
    for path, reason in result.failed:
        output.skipped(path, reason)
    for report in result.images:
        # stdout: one line per image with the numbers worth comparing (results, not chatter)
        if json_out:
            doc = {
                "path": report.path,
                "files": [str(f) for f in report.files],
                "size": list(report.size),
                "grid": list(report.grid),
                "register_attention": round(report.register_attention, 6),
                "max_norm": round(report.max_norm, 4),
                "median_norm": round(report.median_norm, 4),
            }
            print(json.dumps(doc, ensure_ascii=False))
        else:
            print(
                f"{report.path}\t{report.size[0]}x{report.size[1]}\t"
                f"register_attention={report.register_attention:.3f}\t"
                f"max_norm={report.max_norm:.1f}\tmedian_norm={report.median_norm:.1f}"
            )
    if not quiet:
        saved = f"; PCA saved to {result.pca_file}" if result.pca_file else ""
        output.say(f"wrote {len(result.files)} pictures to {out}{saved}")
    if result.failed:
        raise typer.Exit(EXIT_SKIPPED)
