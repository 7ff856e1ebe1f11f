"""`embed`: many images -> CLS, register and patch tokens in an HDF5 file or .npy directory.

Crash-safe and resumable through `dinoreg.output`; nothing accumulates per image in memory.
What is stored under which name: `dinoreg.embedding.rows`. With `keep_aspect`, rows come grouped
by patch grid (in (grid, input index) order, `dinoreg.inputs.buckets`), not in input order.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from dinoreg.batches import StageTimes, run_batches
from dinoreg.embedding.results import Interrupted, Progress, RunSummary
from dinoreg.embedding.rows import (
    TOKENS,
    OutputOptions,
    dataset_specs,
    make_forward,
    provenance,
    resolve_layers,
)
from dinoreg.embedding.shards import Shard, shard_path
from dinoreg.embedding.transfer import PendingRows
from dinoreg.errors import UsageError
from dinoreg.inputs.discover import as_input_list, discover
from dinoreg.inputs.recipe import Recipe
from dinoreg.output.background import BackgroundWriter
from dinoreg.output.layout import DatasetSpec
from dinoreg.output.shards import INDEX, shard_meta
from dinoreg.output.spec import OutputSpec, check_output
from dinoreg.output.state import infer_format
from dinoreg.output.writer import Writer
from dinoreg.runtime import ComputeOptions, device_list, prepare_model


def embed(
    inputs: Sequence[str] | str,
    out: str | Path,
    model: str = "small",
    *,
    image_size: int = 224,
    crop: bool | None = None,
    exact_decode: bool = False,
    keep_aspect: bool = False,
    max_size: int | None = None,
    layers: Sequence[int] | None = None,
    final_norm: bool = True,
    tokens: Sequence[str] | str = TOKENS,
    store_dtype: str = "float32",
    format: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    decode: str = "auto",
    batch_size: int = 16,
    workers: int | None = None,
    compile: bool = False,
    shard: str | tuple[int, int] | None = None,
    progress: Callable[[Progress], None] | None = None,
    stdin: TextIO | None = None,
) -> RunSummary:
    """Embed images (files, directories, globs, "-" for stdin) into `out` (.h5 or a directory).

    `crop` (default True) centre-crops `image_size`; False squeezes the whole image to a square.
    `keep_aspect` instead resizes each image with its short side to `image_size` and its long
    side capped at `max_size` (default 2 * image_size), both multiples of 14, no crop; patches
    are then stored ragged with a `grids` dataset, and rows come grouped by patch grid (in
    (grid, input index) order) rather than in input order. `layers` (block indices, negative
    from the end) stores those blocks' tokens as `layers/<block>/<token>` instead of the final
    output, final-normed unless `final_norm=False`. `compile` runs the model through
    torch.compile (a one-off cost per input shape; pays off on long GPU runs). `shard` "I/N"
    embeds shard I of N of the inputs into `<out stem>-0000I-of-0000N<suffix>` (`dinoreg.merge`
    joins the shards into one output).
    """
    if overwrite and resume:
        raise UsageError(
            "overwrite and resume contradict each other; pick one.", params=("overwrite", "resume")
        )
    recipe = embed_recipe(
        image_size, crop=crop, exact_decode=exact_decode, keep_aspect=keep_aspect, max_size=max_size
    )
    compute = ComputeOptions(
        device=device,
        dtype=dtype,
        decode=decode,
        batch_size=batch_size,
        workers=workers,
        compile=compile,
    )
    output = OutputOptions(
        tokens=tokens,
        store_dtype=store_dtype,
        format=format,
        mode="overwrite" if overwrite else "resume" if resume else "new",
        layers=tuple(layers) if layers is not None else None,
        final_norm=final_norm,
    )
    part = Shard.parse(shard) if shard is not None else None
    return run_embed(inputs, out, model, recipe, compute, output, progress, stdin, part)


def embed_recipe(
    image_size: int = 224,
    *,
    crop: bool | None = None,
    exact_decode: bool = False,
    keep_aspect: bool = False,
    max_size: int | None = None,
) -> Recipe:
    """The preprocessing of an embed run; `crop` None means the default (crop, unless
    `keep_aspect`, which never crops and so refuses any explicit `crop`)."""
    if keep_aspect and crop is not None:
        raise UsageError(
            f"crop={crop} cannot be combined with keep_aspect, which keeps the whole image at "
            "its own aspect; drop one of them.",
            params=("crop", "keep_aspect"),
        )
    return Recipe.for_size(
        image_size,
        crop=True if crop is None else crop,
        exact_decode=exact_decode,
        keep_aspect=keep_aspect,
        max_size=max_size,
    )


def run_embed(
    inputs: Sequence[str] | str,
    out: str | Path,
    model_name: str,
    recipe: Recipe,
    compute: ComputeOptions,
    output: OutputOptions,
    progress: Callable[[Progress], None] | None = None,
    stdin: TextIO | None = None,
    shard: Shard | None = None,
) -> RunSummary:
    """The embed run with its configuration already built (the CLI calls this).

    Several devices (`cpu,cpu`, `cuda:0,cuda:2`, or `cuda`/`auto` with several GPUs visible)
    run one process each (`dinoreg.embedding.devices`) and end in one output.
    """
    fmt = infer_format(out, output.format)  # before Path() drops a trailing slash
    devices = device_list(compute.device)
    if len(devices) > 1 and shard is not None:
        raise UsageError(
            "shard and several devices do not combine; give one device per shard job.",
            params=("shard", "device"),
        )
    target = shard_path(out, shard) if shard is not None else Path(out)
    check_output(target, output.mode, fmt)  # refuse before anything slow happens
    paths = discover(as_input_list(inputs), stdin=stdin)
    if len(devices) > 1:
        from dinoreg.embedding.devices import run_on_devices

        out = Path(out)
        return run_on_devices(
            paths, out, fmt, model_name, recipe, compute, output, devices, progress
        )
    return embed_paths(paths, Path(out), fmt, model_name, recipe, compute, output, progress, shard)


def embed_paths(
    paths: list[str],
    out: Path,
    fmt: str,
    model_name: str,
    recipe: Recipe,
    compute: ComputeOptions,
    output: OutputOptions,
    progress: Callable[[Progress], None] | None = None,
    shard: Shard | None = None,
) -> RunSummary:
    """Embed an already discovered input list (sorted, de-duplicated) on one device."""
    start = time.perf_counter()
    first = 0
    if shard is not None:
        out = shard_path(out, shard)
        everything = paths
        first, stop = shard.bounds(len(everything))
        paths = everything[first:stop]
    prepared = prepare_model(model_name, compute)
    model = prepared.model
    if output.layers is not None:
        output = dataclasses.replace(output, layers=resolve_layers(output.layers, model))
    datasets = dataset_specs(model.cfg.dim, model.cfg.num_registers, recipe.grid, output)
    meta = provenance(prepared, recipe, output)
    index = None
    if shard is not None:
        # rows carry their position in the whole input list; merge checks the shards agree on it
        datasets = (*datasets, DatasetSpec(INDEX, (), "int64"))
        meta |= shard_meta(shard.index, shard.count, everything, first)
        index = {p: first + i for i, p in enumerate(paths)}
    spec = OutputSpec(path=out, format=fmt, datasets=datasets)
    with Writer.open(spec, meta, output.mode, inputs=paths) as writer:
        todo = writer.pending(paths)  # by identity: ./a.jpg and a.jpg are one input
        summary = RunSummary(
            out=out,
            inputs=len(paths),
            resumed=len(paths) - len(todo),
            rows=0,
            failures_before=writer.failures,
            mode_used=writer.mode_used,
        )
        times = StageTimes()
        interrupted = False
        # Keep-aspect runs plan their batches over `todo` only: the order is a stable sort on
        # (grid, input index), so the rows an interrupted run committed are a prefix of the
        # uninterrupted order and this run continues it batch for batch (`dinoreg.inputs.buckets`).
        forward = make_forward(prepared, output, recipe.keep_aspect)
        try:
            if writer.mode_used != "already-complete":
                device = prepared.device
                run = _Run(forward, recipe, compute, device, writer, summary, times, progress)
                _loop(run, todo, index)
        except KeyboardInterrupt:
            interrupted = True
        try:
            writer.close(complete=not interrupted)
        except KeyboardInterrupt:  # during the final conversion: the staged rows stay
            interrupted = True
        summary.rows_at = writer.rows_at
        summary.nonfinite_values = writer.nonfinite_values
    summary.seconds = time.perf_counter() - start
    summary.complete = not interrupted
    summary.times = times.as_dict()
    summary.bytes = _size_on_disk(summary.rows_at or out)
    if interrupted:
        raise Interrupted(summary)
    return summary


@dataclass
class _Run:
    forward: Callable
    recipe: Recipe
    compute: ComputeOptions
    device: object
    writer: Writer
    summary: RunSummary
    times: StageTimes
    progress: Callable[[Progress], None] | None


def _loop(run: _Run, todo: list[str], index: dict[str, int] | None) -> None:
    summary, times = run.summary, run.times
    with BackgroundWriter(run.writer) as background:
        done = 0
        lock = (run.writer.lock_fd,)  # decode workers must not keep the output locked
        batches = run_batches(todo, run.recipe, run.compute, run.forward, run.device, times, lock)
        for result in batches:
            tick = time.perf_counter()
            rows = functools.partial(_rows, result.outputs, result.paths, index)
            background.submit(result.paths, rows, result.failures)  # waits there, not here
            times.write += time.perf_counter() - tick
            summary.rows += len(result.paths)
            summary.failures.extend(result.failures)
            done += len(result.paths) + len(result.failures)
            if run.progress is not None:
                run.progress(Progress(done, len(todo), summary.rows, result.failures))


def _rows(
    pending: PendingRows | None, paths: list[str], index: dict[str, int] | None
) -> tuple[dict[str, Any], int]:
    """A batch's arrays and the values their cast made non-finite, once on the host (called on
    the writer's thread); a batch of failures only has none."""
    arrays, made = pending.result() if pending is not None else ({}, 0)
    if index is not None and paths:
        arrays[INDEX] = np.array([index[p] for p in paths], np.int64)
    return arrays, made


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0
