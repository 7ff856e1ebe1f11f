"""`dinoreg show`: pictures of the features of each image (PCA, attention, norms, a sheet), or
with `--compare` several models side by side, one sheet per image."""

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
    ctx: typer.Context,
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
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            metavar="MODEL,MODEL...",
            help="Two or more models, comma-separated: one sheet per image, a row per model.",
        ),
    ] = None,
    norms_histogram: Annotated[
        bool,
        typer.Option("--norms-histogram", help="Also a log-count histogram of patch-token norms."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", metavar="", help="Replace existing PNGs.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", metavar="", help="Skip images whose pictures are all there (a rerun)."
        ),
    ] = False,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PNGs per image: PCA of patch features, CLS attention per head, token norms, a sheet."""
    from dinoreg.errors import UsageError
    from dinoreg.inputs.discover import discover
    from dinoreg.runtime import ComputeOptions, prepare_model
    from dinoreg.viz.compare import check_models
    from dinoreg.viz.compare import compare as run_compare
    from dinoreg.viz.options import ShowOptions
    from dinoreg.viz.show import show as draw

    options = ShowOptions(
        size=size,
        max_size=max_size,
        mask=mask,
        pca=pca,
        fit_pca=fit_pca,
        heads=not no_heads,
        overwrite=overwrite,
        resume=resume,
        norms_histogram=norms_histogram,
    )

    def progress(stage: str, done: int, total: int) -> None:
        if not quiet and sys.stderr.isatty():
            output.err.print(f"{stage} {done}/{total}", end="\r")

    if compare is not None:
        # by name: typer bundles its own click, whose enum is not click.core's
        source = ctx.get_parameter_source("model")
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            raise UsageError(
                "compare takes the models itself; leave out model.", params=("model", "compare")
            )
        names = [m.strip() for m in compare.split(",") if m.strip()]
        check_models(names, options)  # before the inputs are listed: a typo fails at once
        paths = discover(inputs, stdin=sys.stdin)
        done = run_compare(names, paths, out, options, ComputeOptions(device=device), progress)
        _print_compare(done, json_out, quiet, out)
        return
    paths = discover(inputs, stdin=sys.stdin)
    net = prepare_model(model, ComputeOptions(device=device))

    def one_image(report) -> None:
        # each image's line as it is drawn: results on stdout, problems on stderr
        if isinstance(report, tuple):
            output.skipped(*report)
            return
        if report.upscale > 2:
            output.warning(
                f"{report.path} was enlarged {report.upscale:.1f}x to {report.size[0]}x"
                f"{report.size[1]}; its patches show interpolated pixels (try a smaller --size)."
            )
        if json_out:
            doc = {
                **_image_doc(report),
                "register_attention": round(report.register_attention, 6),
                "max_norm": round(report.max_norm, 4),
                "median_norm": round(report.median_norm, 4),
                "outlier_share": round(report.outlier_share, 6),
            }
            print(json.dumps(doc, ensure_ascii=False))
        else:
            print(
                f"{report.path}\t{report.size[0]}x{report.size[1]}\t"
                f"register_attention={report.register_attention:.3f}\t"
                f"max_norm={report.max_norm:.1f}\tmedian_norm={report.median_norm:.1f}\t"
                f"outlier_share={report.outlier_share:.4f}",
                flush=True,
            )

    result = draw(net, paths, out, options, progress, one_image)
    if not quiet:
        saved = f"; PCA saved to {result.pca_file}" if result.pca_file else ""
        output.say(f"wrote {len(result.files)} pictures to {out}{saved}")
    if result.failed:
        raise typer.Exit(EXIT_SKIPPED)


def _print_compare(result, json_out: bool, quiet: bool, out: Path) -> None:
    """stdout: one line per image with each model's numbers; skipped inputs and the summary on
    stderr; exit 3 when some inputs were skipped."""
    for path, reason in result.failed:
        output.skipped(path, reason)
    for report in result.images:
        if json_out:
            doc = {
                **_image_doc(report),
                "models": [
                    {
                        "model": row.model,
                        "family": row.family,
                        "registers": row.registers,
                        "outlier_share": round(row.outlier_share, 6),
                        "outlier_threshold": round(row.outlier_threshold, 4),
                        "register_attention": None
                        if row.register_attention is None
                        else round(row.register_attention, 6),
                        "median_norm": round(row.median_norm, 4),
                        "max_norm": round(row.max_norm, 4),
                    }
                    for row in report.rows
                ],
            }
            print(json.dumps(doc, ensure_ascii=False))
        else:
            # path, then per model: name, outlier share, register attention (n/a without)
            fields = [report.path]
            for row in report.rows:
                to_registers = (
                    "n/a" if row.register_attention is None else f"{row.register_attention:.4f}"
                )
                fields += [
                    row.model,
                    f"outlier_share={row.outlier_share:.4f}",
                    f"register_attention={to_registers}",
                ]
            print("\t".join(fields))
    if not quiet:
        output.say(f"wrote {len(result.files)} pictures to {out}")
    if result.failed:
        raise typer.Exit(EXIT_SKIPPED)


def _image_doc(report) -> dict:
    """The JSON fields every per-image line of `show` starts with."""
    return {
        "path": report.path,
        "files": [str(f) for f in report.files],
        "size": {"width": report.size[0], "height": report.size[1]},
        "grid": {"rows": report.grid[0], "columns": report.grid[1]},
    }
