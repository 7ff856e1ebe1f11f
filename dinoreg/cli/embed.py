"""`dinoreg embed` and `dinoreg info`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from dinoreg.cli import output
from dinoreg.cli.app import (
    EXIT_INTERRUPTED,
    EXIT_SKIPPED,
    BatchOpt,
    CompileOpt,
    DecodeOpt,
    DeviceOpt,
    DTypeOpt,
    ExactOpt,
    Format,
    Inputs,
    ModelOpt,
    NoCropOpt,
    QuietOpt,
    WorkersOpt,
    app,
    dtype_choice,
    examples,
)
from dinoreg.cli.summary import resume_command, summary_doc, summary_line

EmbedSizeOpt = Annotated[
    int,
    typer.Option(
        "--image-size",
        help="Crop size, a multiple of 14 (the short side goes to size*256/224 first); "
        "with --keep-aspect, the short side.",
        rich_help_panel="Preprocessing",
        metavar="N",
    ),
]
KeepAspectOpt = Annotated[
    bool,
    typer.Option(
        "--keep-aspect",
        help="No crop: short side to --image-size, long side capped at --max-size, both "
        "multiples of 14; patches stored per image with their grid, rows grouped by grid.",
        rich_help_panel="Preprocessing",
        metavar="",
    ),
]
MaxSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--max-size",
        help="With --keep-aspect: cap on the long side (default 2 * --image-size).",
        rich_help_panel="Preprocessing",
        metavar="N",
    ),
]
LayersOpt = Annotated[
    str | None,
    typer.Option(
        "--layers",
        help="Store these blocks instead of the final output, as layers/<block>/<token>; "
        "indices like -4,-3,-2,-1 (from the end) or 8,11.",
        rich_help_panel="Dense features",
        metavar="LIST",
    ),
]
NoFinalNormOpt = Annotated[
    bool,
    typer.Option(
        "--no-final-norm",
        help="With --layers: store blocks before the final norm.",
        rich_help_panel="Dense features",
        metavar="",
    ),
]


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """`-4,-3,-2,-1` -> (-4, -3, -2, -1); UsageError on anything else."""
    from dinoreg.errors import UsageError

    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    try:
        if not parts or not all(parts):
            raise ValueError
        return tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(
            f"--layers takes comma-separated block indices like -4,-3,-2,-1 or 8,11; got {text!r}."
        ) from None


_EMBED_EXAMPLES = examples(
    "dinoreg embed ./photos --out feats.h5",
    "find /data -name '*.jpg' | dinoreg embed - -o feats/ --tokens cls --store-dtype fp16",
    "dinoreg embed ./photos -o feats.h5 --resume   (create, continue, or do nothing)",
)


@app.command(epilog=_EMBED_EXAMPLES)
def embed(
    ctx: typer.Context,
    inputs: Inputs,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Output: x.h5, or a directory (dir/) for .npy files.",
            rich_help_panel="Output",
            metavar="PATH",
        ),
    ],
    model: ModelOpt = "small",
    format: Annotated[
        Format | None,
        typer.Option("--format", help="h5 or npy (default: from --out).", rich_help_panel="Output"),
    ] = None,
    tokens: Annotated[
        str,
        typer.Option(
            "--tokens",
            help="Which tokens to store: any of cls,registers,patches.",
            rich_help_panel="Output",
            metavar="LIST",
        ),
    ] = "cls,registers,patches",
    store_dtype: Annotated[
        str,
        typer.Option(
            "--store-dtype",
            metavar="DTYPE",
            callback=dtype_choice(("float32", "float16")),
            help="Dtype on disk: fp32 or fp16 (halves the file).",
            rich_help_panel="Output",
        ),
    ] = "float32",
    image_size: EmbedSizeOpt = 224,
    no_crop: NoCropOpt = False,
    keep_aspect: KeepAspectOpt = False,
    max_size: MaxSizeOpt = None,
    layers: LayersOpt = None,
    no_final_norm: NoFinalNormOpt = False,
    exact_decode: ExactOpt = False,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = "auto",
    decode: DecodeOpt = "auto",
    batch_size: BatchOpt = 16,
    workers: WorkersOpt = None,
    compile: CompileOpt = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing output.", rich_help_panel="Output", metavar=""
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted output.", rich_help_panel="Output", metavar=""
        ),
    ] = False,
    quiet: QuietOpt = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run the whole job on Ray: local (a Ray on this machine), auto (this machine's "
            "cluster) or ray://host:port; --out is then a directory of shard files.",
            rich_help_panel="Scaling out",
        ),
    ] = None,
    shards: Annotated[
        int,
        typer.Option(
            "--shards",
            metavar="N",
            min=1,
            help="With --ray: shard files to write.",
            rich_help_panel="Scaling out",
        ),
    ] = 1,
    merge_to: Annotated[
        str | None,
        typer.Option(
            "--merge",
            metavar="PATH",
            help="With --ray: merge the shards into this output.",
            rich_help_panel="Scaling out",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="I/N",
            help="Embed only shard I of N (from 0) of the inputs, into OUT-0000I-of-0000N; "
            "join the shards with dinoreg merge.",
            rich_help_panel="Scaling out",
        ),
    ] = None,
    json_out: Annotated[
        bool,
        typer.Option("--json", metavar="", help="The run summary as one JSON object on stdout."),
    ] = False,
) -> None:
    """Embed images into an HDF5 file or a directory of .npy files (resumable)."""
    # With --keep-aspect rows are grouped by patch grid (by grid, then input order), not in input
    # order; `paths` names each row's input. With --layers only the listed blocks are stored
    # (under layers/<block>/); the final output equals --layers -1.
    from dinoreg.embedding.results import Interrupted
    from dinoreg.embedding.run import embed as run
    from dinoreg.errors import UsageError

    if "-" in inputs and sys.stdin.isatty():
        output.say("reading image paths from stdin, one per line; end with Ctrl-D")
    if ray is not None:
        from dinoreg.cli.embed_ray import RayFlags, embed_on_ray

        flags = RayFlags(
            image_size, not no_crop, exact_decode, keep_aspect, layers is not None, tokens,
            store_dtype, device, dtype, batch_size, overwrite, resume,
        )  # fmt: skip
        embed_on_ray(inputs, out, model, flags, ray, shards, merge_to, quiet)
        return
    if merge_to is not None:
        raise UsageError("--merge goes with --ray (for --shard runs, use dinoreg merge).")
    bar = output.ProgressBar("embed", enabled=not quiet)
    try:
        summary = run(
            inputs,
            out,
            model,
            image_size=image_size,
            crop=False if no_crop else None,
            exact_decode=exact_decode,
            keep_aspect=keep_aspect,
            max_size=max_size,
            layers=parse_layers(layers),
            final_norm=not no_final_norm,
            tokens=tokens,
            store_dtype=store_dtype,
            format=format.value if format else None,
            overwrite=overwrite,
            resume=resume,
            device=device,
            dtype=dtype,
            decode=decode,
            batch_size=batch_size,
            workers=workers,
            compile=compile,
            shard=shard,
            progress=bar.update,
            stdin=sys.stdin,
        )
    except Interrupted as stop:
        bar.close()
        s = stop.summary
        output.say(
            ("interrupted", "yellow"),
            f": {s.rows} rows committed to {s.rows_at or out}; continue with:\n"
            f"  {resume_command(ctx)}",
        )
        if json_out:
            print(json.dumps(summary_doc(s), ensure_ascii=False))
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        bar.close()
    if summary.nonfinite_values:
        output.warning(
            f"{summary.nonfinite_values} values were beyond float16's range (+-65504) and are "
            f"stored as inf in {out}; use --store-dtype float32 to keep them."
        )
    if json_out:
        print(json.dumps(summary_doc(summary), ensure_ascii=False))
    elif not quiet:
        output.say(summary_line(summary))
    if summary.failures or summary.failures_before:
        raise typer.Exit(EXIT_SKIPPED)  # the output lacks rows for some inputs
