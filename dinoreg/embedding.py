"""`embed`: many images -> CLS, register and patch tokens in an HDF5 file or .npy directory.

Crash-safe and resumable through `dinoreg.writers`; nothing accumulates per image in memory.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

import numpy as np
import torch

from dinoreg import __version__
from dinoreg.errors import UsageError
from dinoreg.images import Recipe, discover
from dinoreg.pipeline import (
    ComputeOptions,
    StageTimes,
    as_input_list,
    autocast,
    choose_device,
    choose_dtype,
    run_batches,
)
from dinoreg.writers import DatasetSpec, OutputSpec, Writer, check_output, infer_format

TOKENS = ("cls", "registers", "patches")
Mode = Literal["new", "overwrite", "resume"]


@dataclass(frozen=True)
class OutputOptions:
    """What is stored and how."""

    tokens: tuple[str, ...] = TOKENS
    store_dtype: str = "float32"
    format: str | None = None  # None: from the output path
    mode: Mode = "new"

    def __post_init__(self) -> None:
        unknown = [t for t in self.tokens if t not in TOKENS]
        if unknown or not self.tokens:
            raise UsageError(
                f"--tokens takes a comma-separated subset of {','.join(TOKENS)}; "
                f"got {','.join(self.tokens) or 'nothing'}."
            )
        if self.store_dtype not in ("float32", "float16"):
            raise UsageError(f"--store-dtype must be float32 or float16, not {self.store_dtype!r}.")


@dataclass
class Progress:
    """What a progress callback receives after each committed batch."""

    done: int  # inputs handled so far in this run (rows + skipped)
    total: int  # inputs this run handles (resumed inputs excluded)
    rows: int
    new_failures: list[tuple[str, str]]


@dataclass
class RunSummary:
    """The outcome of an embed run."""

    out: Path
    inputs: int  # inputs discovered
    resumed: int  # inputs already committed by an earlier run and skipped
    rows: int  # rows written by this run
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    failures_before: int = 0  # inputs skipped by the earlier runs of a resumed output
    seconds: float = 0.0
    complete: bool = False
    bytes: int = 0
    times: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return (self.rows + len(self.failures)) / self.seconds if self.seconds > 0 else 0.0


class Interrupted(Exception):
    """The run stopped on Ctrl-C or SIGTERM after committing every finished batch."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary


def embed(
    inputs: Sequence[str] | str,
    out: str | Path,
    model: str = "small",
    *,
    image_size: int = 224,
    crop: bool = True,
    exact_decode: bool = False,
    tokens: Sequence[str] = TOKENS,
    store_dtype: str = "float32",
    format: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 16,
    workers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    stdin: TextIO | None = None,
) -> RunSummary:
    """Embed images (files, directories, globs, "-" for stdin) into `out` (.h5 or a directory)."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume contradict each other; pick one.")
    recipe = Recipe.for_size(image_size, crop=crop, exact_decode=exact_decode)
    compute = ComputeOptions(device=device, dtype=dtype, batch_size=batch_size, workers=workers)
    output = OutputOptions(
        tokens=tuple(tokens),
        store_dtype=store_dtype,
        format=format,
        mode="overwrite" if overwrite else "resume" if resume else "new",
    )
    return run_embed(inputs, out, model, recipe, compute, output, progress, stdin)


def run_embed(
    inputs: Sequence[str] | str,
    out: str | Path,
    model_name: str,
    recipe: Recipe,
    compute: ComputeOptions,
    output: OutputOptions,
    progress: Callable[[Progress], None] | None = None,
    stdin: TextIO | None = None,
) -> RunSummary:
    """The embed run with its configuration already built (the CLI calls this)."""
    from dinoreg.model.weights import load_model

    start = time.perf_counter()
    fmt = infer_format(out, output.format)  # before Path() drops a trailing slash
    out = Path(out)
    check_output(out, output.mode, fmt)  # refuse before anything slow happens
    paths = discover(as_input_list(inputs), stdin=stdin)
    device = choose_device(compute.device)
    dtype = choose_dtype(compute.dtype, device)
    model = load_model(model_name, device=device)
    datasets = dataset_specs(model.cfg.dim, model.cfg.num_registers, recipe.grid, output)
    meta = provenance(model, recipe, dtype, output, device)
    spec = OutputSpec(path=out, format=fmt, datasets=datasets)
    with Writer.open(spec, meta, output.mode) as writer:
        done_before = writer.committed_inputs
        todo = [p for p in paths if p not in done_before]
        summary = RunSummary(
            out=out,
            inputs=len(paths),
            resumed=len(paths) - len(todo),
            rows=0,
            failures_before=writer.failures,
        )
        times = StageTimes()
        interrupted = False
        try:
            _loop(
                model,
                todo,
                recipe,
                compute,
                output,
                device,
                dtype,
                writer,
                summary,
                times,
                progress,
            )
        except KeyboardInterrupt:
            interrupted = True
        writer.close(complete=not interrupted)
    summary.seconds = time.perf_counter() - start
    summary.complete = not interrupted
    summary.times = times.as_dict()
    summary.bytes = _size_on_disk(out)
    if interrupted:
        raise Interrupted(summary)
    return summary


def _loop(model, todo, recipe, compute, output, device, dtype, writer, summary, times, progress):
    tokens = output.tokens

    def forward(pixels: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode(), autocast(device, dtype):
            out = model.forward_features(pixels)
        return {t: getattr(out, t).float().cpu().numpy() for t in tokens}

    with BackgroundWriter(writer) as background:
        done = 0
        for result in run_batches(todo, recipe, compute, forward, device, times):
            tick = time.perf_counter()
            arrays = result.outputs if result.outputs is not None else _empty(writer)
            background.submit(result.paths, arrays, result.failures)
            times.write += time.perf_counter() - tick
            summary.rows += len(result.paths)
            summary.failures.extend(result.failures)
            done += len(result.paths) + len(result.failures)
            if progress is not None:
                progress(Progress(done, len(todo), summary.rows, result.failures))


def _empty(writer: Writer) -> dict[str, np.ndarray]:
    return {d.name: np.zeros((0, *d.row_shape), np.float32) for d in writer.spec.datasets}


class BackgroundWriter:
    """Commits batches on a thread of its own so the model never waits on the disk.

    At most two batches wait in the queue; leaving the block (normally or on Ctrl-C) commits
    everything submitted before returning, so a finished batch is never lost.
    """

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dinoreg-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self.thread.start()
        return self

    def submit(self, paths, arrays, failures) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((paths, arrays, failures))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_batch(*item)
                except BaseException as exc:  # re-raised in the main thread
                    self.error = exc

    def __exit__(self, *exc_info) -> None:
        while True:
            try:
                self.queue.put(None)
                self.thread.join()
                break
            except KeyboardInterrupt:
                continue  # a second Ctrl-C must not abandon committed work mid-flight
        if self.error is not None:
            raise self.error


def dataset_specs(
    dim: int, registers: int, grid: tuple[int, int], output: OutputOptions
) -> tuple[DatasetSpec, ...]:
    shapes = {"cls": (dim,), "registers": (registers, dim), "patches": (*grid, dim)}
    return tuple(DatasetSpec(t, shapes[t], output.store_dtype) for t in output.tokens)


def provenance(model, recipe: Recipe, dtype: torch.dtype, output: OutputOptions, device) -> dict:
    info = model.info
    return {
        "dinoreg_version": __version__,
        "model": info.name,
        "weights_sha256": info.sha256,
        "weights_layout": info.layout,
        "dim": model.cfg.dim,
        "num_registers": model.cfg.num_registers,
        "image_size": recipe.image_size,
        "grid": list(recipe.grid),
        "recipe": recipe.to_dict(),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "store_dtype": output.store_dtype,
        "tokens": list(output.tokens),
        "device": device.type,
    }


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0
