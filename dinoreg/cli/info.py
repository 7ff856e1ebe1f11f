"""`dinoreg info`: what an output file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dinoreg.cli.app import JsonOpt, app, examples

_INFO_EXAMPLES = examples(
    "dinoreg info feats.h5",
    "dinoreg info feats/ --json",
)


@app.command(epilog=_INFO_EXAMPLES)
def info(
    file: Annotated[
        Path, typer.Argument(help="An output of `dinoreg embed` (.h5 or .npy directory).")
    ],
    json_out: JsonOpt = False,
) -> None:
    """What an output holds: datasets and shapes, model, recipe, complete or not, failures."""
    from dinoreg.output.reader import inspect_output

    about = inspect_output(file)
    if json_out:
        from dataclasses import asdict

        print(json.dumps(asdict(about), ensure_ascii=False, default=str))
        return
    state = "complete" if about.complete else "INCOMPLETE: continue it with embed --resume"
    lines = [
        f"{about.path}  ({about.format}, {state})",
        f"rows       {about.rows}",
        f"failures   {len(about.failures)}",
    ]
    meta = about.meta
    for key in (
        "model",
        "weights_sha256",
        "image_size",
        "keep_aspect",
        "grid",
        "layers",
        "final_norm",
        "compute_dtype",
        "store_dtype",
        "tokens",
        "dinoreg_version",
        "created",
    ):
        if key in meta:
            lines.append(f"{key:<10} {meta[key]}")
    if "recipe" in meta:
        lines.append(f"recipe     {json.dumps(meta['recipe'])}")
    lines.append("datasets")
    for name, (shape, dt) in about.datasets.items():
        lines.append(f"  {name:<16} {tuple(shape)!s:<24} {dt}")
    for path, reason in about.failures[:20]:
        lines.append(f"  failed: {path}: {reason}")
    if len(about.failures) > 20:
        lines.append(f"  ... and {len(about.failures) - 20} more failures")
    print("\n".join(lines))
