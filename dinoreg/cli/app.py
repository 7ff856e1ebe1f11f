"""The typer app, the options the commands share, progress on stderr, and the one place where
known errors become a one-line message and an exit code."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from enum import Enum
from typing import Annotated

import typer

from dinoreg import __version__
from dinoreg.cli import output
from dinoreg.cli.flags import as_flags
from dinoreg.errors import DinoregError

EXIT_OK, EXIT_SKIPPED, EXIT_INTERRUPTED = 0, 3, 130

app = typer.Typer(
    name="dinoreg",
    help="DINOv2-with-registers features and ImageNet labels for images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Format(str, Enum):
    h5 = "h5"
    npy = "npy"


# the spellings people type, each to the one the library takes
DTYPE_SPELLINGS = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
}


def dtype_choice(allowed: tuple[str, ...]):
    """A typer callback that accepts any spelling of `allowed` dtypes, case-insensitively."""

    def parse(value: str) -> str:
        name = DTYPE_SPELLINGS.get(value.strip().lower())
        if name not in allowed:
            spelled = ", ".join(allowed)
            raise typer.BadParameter(f"{value!r} is not one of {spelled} (or fp32, bf16, fp16).")
        return name

    return parse


def examples(*commands: str) -> str:
    """A help epilog: the commands, one per paragraph (rich help keeps paragraphs apart)."""
    return "Examples:\n\n" + "\n\n".join(f"  {c}" for c in commands)


# -- shared options ---------------------------------------------------------------------------

Inputs = Annotated[
    list[str],
    typer.Argument(
        metavar="INPUT",
        help="Image files, directories (recursive), glob patterns, or - for paths on stdin.",
    ),
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Alias (see `dinoreg models`), hub repo id, directory or weight file.",
        rich_help_panel="Model",
        metavar="NAME",
    ),
]
ImageSizeOpt = Annotated[
    int,
    typer.Option(
        "--image-size",
        help="Crop size, a multiple of 14; the short side goes to size*256/224 first.",
        rich_help_panel="Preprocessing",
        metavar="N",
    ),
]
NoCropOpt = Annotated[
    bool,
    typer.Option(
        "--no-crop",
        help="Resize the whole image to size x size, no crop.",
        rich_help_panel="Preprocessing",
        metavar="",
    ),
]
ExactOpt = Annotated[
    bool,
    typer.Option(
        "--exact-decode",
        help="Decode and resize large JPEGs exactly as the checkpoints' processor (slower).",
        rich_help_panel="Preprocessing",
        metavar="",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto, cpu, cuda, cuda:N or mps.",
        rich_help_panel="Compute",
        metavar="DEVICE",
    ),
]
DTypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        callback=dtype_choice(("auto", "float32", "bfloat16", "float16")),
        help="Compute dtype: auto, fp32, bf16, fp16; auto = bf16/fp16 on CUDA, fp32 elsewhere.",
        rich_help_panel="Compute",
    ),
]
DecodeOpt = Annotated[
    str,
    typer.Option(
        "--decode",
        metavar="auto|cpu|gpu",
        help="Where JPEGs are decoded: auto (on CUDA, whichever of the GPU and the decode "
        "workers measures faster on a sample of the inputs), cpu (decode workers), gpu (nvJPEG; "
        "needs the gpu extra: pip install 'dinoreg\\[gpu]').",
        rich_help_panel="Compute",
    ),
]
BatchOpt = Annotated[
    int,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        help="Images per batch.",
        rich_help_panel="Compute",
        metavar="N",
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        "-j",
        min=0,
        help="Decode worker processes (default: from the cores).",
        rich_help_panel="Compute",
        metavar="N",
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the model (pays off on long GPU runs).",
        rich_help_panel="Compute",
        metavar="",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or summary.", metavar="")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line.", metavar="")]


def _version(value: bool) -> None:
    if value:
        print(f"dinoreg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version.", metavar=""
        ),
    ] = False,
) -> None:
    """DINOv2-with-registers features and ImageNet labels for images."""


# -- the error boundary -----------------------------------------------------------------------


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (timeout, systemd, docker stop, Slurm) stops like Ctrl-C: commit, then exit 130.

    Installed for the CLI's run only and restored after, so library callers keep their own.
    """

    def handler(signum, frame) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run a command; map known errors to one line on stderr and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        # a file name that is not UTF-8 prints as its own bytes, whatever the locale's encoding
        # would otherwise refuse (PYTHONIOENCODING=utf-8 is strict)
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")
    with sigterm_as_interrupt():
        code = run(args)
    sys.exit(code)


def run(args: list[str]) -> int:
    """Run the command line `args`; return the exit code (the CLI's one error boundary)."""
    debug = "--debug" in args  # hidden: tracebacks for bug reports
    args = [a for a in args if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        # make_context + invoke, not command.main: typer's main turns a closed pipe into exit 1
        # and Ctrl-C into an Abort before we could say what was done
        with command.make_context("dinoreg", list(args), obj=Invocation(args)) as ctx:
            command.invoke(ctx)
        code = EXIT_OK
    except DinoregError as exc:
        if debug:
            raise
        output.error(as_flags(str(exc), exc.params))
        code = exc.exit_code
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.TyperException as exc:  # usage errors: bad flags, missing arguments
        exc.show(file=sys.stderr)
        code = exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        output.say("interrupted")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away (e.g. `| head`): stop quietly, and keep Python from
        # complaining about the unflushed stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = EXIT_OK
    return code if isinstance(code, int) else EXIT_OK


class Invocation:
    """The argv this run was started with, for messages that repeat the command."""

    def __init__(self, args: list[str]) -> None:
        self.args = list(args)
