"""`dinoreg merge`: the shards of one run into one output."""

from __future__ import annotations

from typing import Annotated

import typer

from dinoreg.cli import output
from dinoreg.cli.app import Format, QuietOpt, app, examples

_MERGE_EXAMPLES = examples(
    "dinoreg merge feats-*-of-00008.h5 --out feats.h5",
    "dinoreg merge shards/*/ --out feats/   (npy shards into an npy directory)",
)


@app.command(epilog=_MERGE_EXAMPLES)
def merge(
    shards: Annotated[
        list[str],
        typer.Argument(metavar="SHARD", help="Every shard of one run (from embed --shard I/N)."),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", metavar="PATH", help="The merged output: x.h5 or dir/.")
    ],
    format: Annotated[
        Format | None, typer.Option("--format", help="h5 or npy (default: from --out).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", metavar="", help="Replace an existing output.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Join the shards of one run into the output a single run would have written."""
    from dinoreg.output.shards import merge as run_merge

    done = run_merge(shards, out, format.value if format else None, overwrite)
    if not quiet:
        output.say(
            f"merged {done.shards} shards: {done.rows} rows, {done.failures} skipped -> {done.out}"
        )
