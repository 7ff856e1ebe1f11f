"""The typer app, the options the commands share, progress on stderr, and the one place where
known errors become a one-line message and an exit code."""

from __future__ import annotations

import os
import signal
import sys
from enum import Enum
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
CompileOpt = Annotated[
    bool, typer.Option("--compile", help="torch.compile the model (pays off on long GPU runs).")
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


# -- progress and the error boundary ----------------------------------------------------------


class ProgressBar:
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


def human_bytes(n: int) -> str:
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
