"""`dinoreg classify` and `dinoreg models`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dinoreg.cli import output
from dinoreg.cli.app import (
    EXIT_SKIPPED,
    BatchOpt,
    CompileOpt,
    DecodeOpt,
    DeviceOpt,
    DTypeOpt,
    ExactOpt,
    ImageSizeOpt,
    Inputs,
    JsonOpt,
    ModelOpt,
    NoCropOpt,
    QuietOpt,
    WorkersOpt,
    app,
    examples,
)

_CLASSIFY_EXAMPLES = examples(
    "dinoreg classify cat.jpg",
    "dinoreg classify ./photos -k 3 --json",
    "dinoreg classify ./photos | sort -t$'\\t' -k5 -gr",
)


@app.command(epilog=_CLASSIFY_EXAMPLES)
def classify(
    inputs: Inputs,
    model: ModelOpt = "small-imagenet1k",
    head: Annotated[
        Path | None,
        typer.Option(
            "--head",
            help="Original *_linear_head.pth or *_linear4_head.pth on --model.",
            rich_help_panel="Model",
            metavar="PATH",
        ),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, help="How many classes per image.", metavar="K")
    ] = 5,
    json_out: JsonOpt = False,
    image_size: ImageSizeOpt = 224,
    no_crop: NoCropOpt = False,
    exact_decode: ExactOpt = False,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = "auto",
    decode: DecodeOpt = "auto",
    batch_size: BatchOpt = 16,
    workers: WorkersOpt = None,
    compile: CompileOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """ImageNet-1k top-k labels: a table on a terminal, TSV when piped, or --json lines."""
    from dinoreg.classification import Classified
    from dinoreg.classification import classify as run_classify
    from dinoreg.inputs.recipe import Recipe
    from dinoreg.runtime import ComputeOptions

    recipe = Recipe.for_size(image_size, crop=not no_crop, exact_decode=exact_decode)
    compute = ComputeOptions(
        device=device,
        dtype=dtype,
        decode=decode,
        batch_size=batch_size,
        workers=workers,
        compile=compile,
    )
    if model == "small-imagenet1k" and head is not None:
        model = "small"  # a head file goes on a backbone
    results = run_classify(
        inputs,
        model,
        head=str(head) if head else None,
        top=top_k,
        recipe=recipe,
        compute=compute,
        stdin=sys.stdin,
        notice=output.warning,
    )
    skipped = 0
    table = sys.stdout.isatty() and not json_out
    for item in results:
        if not isinstance(item, Classified):
            skipped += 1
            output.skipped(item.path, item.reason)
            continue
        if json_out:
            top = [vars(p) for p in item.top]
            print(json.dumps({"path": item.path, "top": top}, ensure_ascii=False), flush=True)
        elif table:
            _print_table(item)
        else:
            for p in item.top:
                print(f"{_tsv(item.path)}\t{p.rank}\t{p.index}\t{_tsv(p.label)}\t{p.prob:.6f}")
            sys.stdout.flush()
    if skipped:
        raise typer.Exit(EXIT_SKIPPED)


def _tsv(text: str) -> str:
    # the one quoting rule of every text file dinoreg writes (paths.txt, failed.tsv)
    from dinoreg.output.layout import encode_field

    return encode_field(text)


def _print_table(item) -> None:
    from rich.table import Table

    table = Table(title=item.path, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("prob", justify="right")
    for p in item.top:
        table.add_row(str(p.rank), p.label, f"{p.prob:.1%}")
    Console().print(table)
