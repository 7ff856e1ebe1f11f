"""The `dinoreg` command: parse flags, build configs, call the library, render results.

stdout carries results only; progress, warnings and summaries go to stderr. Known errors become
one-line messages here and nowhere else. Nothing heavy (torch) is imported before a command runs.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dinoreg import __version__
from dinoreg.errors import DinoregError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SKIPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(
    name="dinoreg",
    help="DINOv2-with-registers features and ImageNet labels for images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Format(str, Enum):
    h5 = "h5"
    npy = "npy"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class StoreDType(str, Enum):
    float32 = "float32"
    float16 = "float16"


# -- shared options ---------------------------------------------------------------------------

Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Image files, directories (recursive), glob patterns, or - for paths on stdin."
    ),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Alias (see `dinoreg models`), hub repo id, directory or weight file."
    ),
]
ImageSizeOpt = Annotated[
    int,
    typer.Option(
        "--image-size",
        help="Crop size, a multiple of 14; the short side goes to size*256/224 first.",
    ),
]
NoCropOpt = Annotated[
    bool, typer.Option("--no-crop", help="Resize the whole image to size x size, no crop.")
]
ExactOpt = Annotated[
    bool,
    typer.Option("--exact-decode", help="Decode large JPEGs at full size (slower; see README)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DTypeOpt = Annotated[
    DType, typer.Option("--dtype", help="Compute dtype; auto = bf16/fp16 on CUDA, fp32 elsewhere.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", "-j", min=0, help="Decode worker processes (default: from the cores)."
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", hidden=True)]


def _version(value: bool) -> None:
    if value:
        print(f"dinoreg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """DINOv2-with-registers features and ImageNet labels for images."""


# -- embed ------------------------------------------------------------------------------------


@app.command()
def embed(
    inputs: Inputs,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Output: x.h5, or a directory (dir/) for .npy files.")
    ],
    model: ModelOpt = "small",
    format: Annotated[
        Format | None, typer.Option("--format", help="h5 or npy (default: from --out).")
    ] = None,
    tokens: Annotated[
        str, typer.Option("--tokens", help="Which tokens to store: any of cls,registers,patches.")
    ] = "cls,registers,patches",
    store_dtype: Annotated[
        StoreDType, typer.Option("--store-dtype", help="Dtype on disk.")
    ] = StoreDType.float32,
    image_size: ImageSizeOpt = 224,
    no_crop: NoCropOpt = False,
    exact_decode: ExactOpt = False,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    batch_size: BatchOpt = 16,
    workers: WorkersOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted output.")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Embed images into an HDF5 file or a directory of .npy files (resumable)."""
    from dinoreg.embedding import Interrupted, OutputOptions, run_embed
    from dinoreg.errors import UsageError
    from dinoreg.images import Recipe
    from dinoreg.pipeline import ComputeOptions

    if overwrite and resume:
        raise UsageError("--overwrite and --resume contradict each other; pick one.")
    recipe = Recipe.for_size(image_size, crop=not no_crop, exact_decode=exact_decode)
    compute = ComputeOptions(
        device=device, dtype=dtype.value, batch_size=batch_size, workers=workers
    )
    output = OutputOptions(
        tokens=tuple(t.strip() for t in tokens.split(",") if t.strip()),
        store_dtype=store_dtype.value,
        format=format.value if format else None,
        mode="overwrite" if overwrite else "resume" if resume else "new",
    )
    bar = _ProgressBar("embed", enabled=not quiet)
    try:
        summary = run_embed(inputs, out, model, recipe, compute, output, bar.update, sys.stdin)
    except Interrupted as stop:
        bar.close()
        s = stop.summary
        err.print(
            f"[yellow]interrupted[/]: {s.rows} rows committed to {out}; continue with:\n"
            f"  {_resume_command()}"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        bar.close()
    if not quiet:
        size = _human_bytes(summary.bytes)
        resumed = f", {summary.resumed} done by earlier runs" if summary.resumed else ""
        earlier = f", {summary.failures_before} earlier" if summary.failures_before else ""
        err.print(
            f"embedded {summary.rows} images ({len(summary.failures)} skipped{earlier}{resumed}) "
            f"in {summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s -> {out} ({size})"
        )
    if summary.failures or summary.failures_before:
        raise typer.Exit(EXIT_SKIPPED)  # the output lacks rows for some inputs


def _resume_command() -> str:
    args = [a for a in sys.argv[1:] if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    text = shlex.join(["dinoreg", *args])
    if "-" in args:
        text += "   (feed the same paths on stdin again)"
    return text


# -- classify ---------------------------------------------------------------------------------


@app.command()
def classify(
    inputs: Inputs,
    model: ModelOpt = "small-imagenet1k",
    head: Annotated[
        Path | None,
        typer.Option("--head", help="Original *_linear_head.pth or *_linear4_head.pth on --model."),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, help="How many classes per image.")
    ] = 5,
    json_out: JsonOpt = False,
    image_size: ImageSizeOpt = 224,
    no_crop: NoCropOpt = False,
    exact_decode: ExactOpt = False,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    batch_size: BatchOpt = 16,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """ImageNet-1k top-k labels: a table on a terminal, TSV when piped, or --json lines."""
    from dinoreg.classify import Classified
    from dinoreg.classify import classify as run_classify
    from dinoreg.images import Recipe
    from dinoreg.pipeline import ComputeOptions

    recipe = Recipe.for_size(image_size, crop=not no_crop, exact_decode=exact_decode)
    compute = ComputeOptions(
        device=device, dtype=dtype.value, batch_size=batch_size, workers=workers
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
    )
    skipped = 0
    table = sys.stdout.isatty() and not json_out
    for item in results:
        if not isinstance(item, Classified):
            skipped += 1
            err.print(f"[yellow]skipped[/] {item.path}: {item.reason}")
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
    # a tab or newline inside a field would break the columns
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in '\t\n\r"\\') else text


def _print_table(item) -> None:
    from rich.table import Table

    table = Table(title=item.path, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("prob", justify="right")
    for p in item.top:
        table.add_row(str(p.rank), p.label, f"{p.prob:.1%}")
    Console().print(table)


# -- models and info --------------------------------------------------------------------------


@app.command()
def models(json_out: JsonOpt = False) -> None:
    """Known model aliases, their hub repos and sizes, and whether each is cached locally."""
    from dinoreg.model.config import VARIANTS, count_parameters
    from dinoreg.model.weights import is_cached

    rows = []
    for alias, v in VARIANTS.items():
        params = count_parameters(v.config)
        rows.append(
            {
                "alias": alias,
                "repo_id": v.repo_id,
                "params": params,
                "download_bytes": params * 4,
                "for": v.purpose,
                "cached": is_cached(v.repo_id),
            }
        )
    if json_out:
        for row in rows:
            print(json.dumps(row))
        return
    if not sys.stdout.isatty():
        for r in rows:
            print(
                "\t".join(
                    str(r[k])
                    for k in ("alias", "repo_id", "params", "download_bytes", "for", "cached")
                )
            )
        return
    from rich.table import Table

    table = Table(show_edge=False)
    for col in ("alias", "hub repo", "params", "download", "for", "cached"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["alias"],
            r["repo_id"],
            f"{r['params'] / 1e6:.1f} M",
            _human_bytes(r["download_bytes"]),
            r["for"],
            "yes" if r["cached"] else "no",
        )
    Console().print(table)


@app.command()
def info(
    file: Annotated[
        Path, typer.Argument(help="An output of `dinoreg embed` (.h5 or .npy directory).")
    ],
    json_out: JsonOpt = False,
) -> None:
    """What an output holds: datasets and shapes, model, recipe, complete or not, failures."""
    from dinoreg.reader import inspect_output

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
        "grid",
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


# -- progress and the error boundary ----------------------------------------------------------


class _ProgressBar:
    """tqdm on stderr, only on a terminal and unless --quiet."""

    def __init__(self, what: str, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.what = what
        self.bar = None

    def update(self, event) -> None:
        for path, reason in event.new_failures:
            # every skipped input is named once, as it happens
            message = f"skipped {path}: {reason}"
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                err.print(f"[yellow]{message}[/]", markup=True)
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total, unit="img", file=sys.stderr, dynamic_ncols=True, desc=self.what
            )
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # the same orderly stop as Ctrl-C: commit, then exit 130


def main(argv: list[str] | None = None) -> None:
    """Entry point: run a command; map known errors to one line on stderr and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    signal.signal(signal.SIGTERM, _sigterm)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="dinoreg", standalone_mode=False)
    except DinoregError as exc:
        if debug:
            raise
        err.print(f"[red]error:[/] {exc}", markup=True)
        code = exc.exit_code
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # click-style usage errors: bad flags, missing args
        exc.show(file=sys.stderr)
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away (e.g. `| head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_OK
    sys.exit(code if isinstance(code, int) else EXIT_OK)
