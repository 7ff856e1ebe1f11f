"""Shard outputs and `merge`: N shards of one run become the output a single run writes.

A shard is an ordinary output plus `index` (each row's position in the whole input list) and
metadata naming its place (`shard` = [I, N]) and the whole input list (`inputs_all`, count and
sha256), so a merge can tell that its shards belong together, that none is missing, and where
each row goes. Rows are written in global input order (keep-aspect outputs: by patch grid, then
input order, as a single run groups them), streaming block by block through the same crash-safe
writer as `embed`, so memory stays flat and a merge killed half-way leaves a resumable output.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinoreg.errors import OutputError, UsageError
from dinoreg.output.identity import InputList
from dinoreg.output.layout import DatasetSpec
from dinoreg.output.meta import RESUME_KEYS
from dinoreg.output.sources import Source, open_source
from dinoreg.output.spec import Mode, OutputSpec, check_output
from dinoreg.output.state import infer_format
from dinoreg.output.writer import Writer

INDEX = "index"
# per-shard keys, left out of the merged output (`embed --shard` writes the first three; the
# Ray driver, `dinoreg.distributed`, the others)
SHARD_KEYS = ("shard", "shard_first", "inputs_all", "num_shards", "start", "stop", "rows")
_BLOCK_ROWS = 1024
# what must agree across shards besides the settings that change the numbers
_SAME = (*RESUME_KEYS, "inputs_all", "num_inputs", "dim", "num_registers")


def shard_meta(index: int, count: int, inputs: Sequence[str], first: int) -> dict[str, Any]:
    """What a shard records about its place in the whole run."""
    return {
        "shard": [index, count],
        "shard_first": first,
        "inputs_all": InputList.of(inputs).digest(),
    }


@dataclass(frozen=True)
class MergeSummary:
    out: Path
    shards: int
    rows: int
    failures: int


def merge(
    shards: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    format: str | None = None,
    overwrite: bool = False,
) -> MergeSummary:
    """Join every shard of one run into `out`; refuses (writing nothing) unless all N shards are
    there, complete, and made with the same weights, recipe, tokens and dtypes."""
    fmt = infer_format(out, format)
    out = Path(out)
    mode: Mode = "overwrite" if overwrite else "new"
    check_output(out, mode, fmt)
    with ExitStack() as stack:
        sources = _check([Path(s) for s in shards], stack)
        first = sources[0]
        specs = _datasets(first)
        meta = {k: v for k, v in first.meta.items() if k not in (*SHARD_KEYS, *_WRITER_KEYS)}
        meta["datasets_merged_from"] = len(sources)
        spec = OutputSpec(path=out, format=fmt, datasets=tuple(specs))
        rows = failures = 0
        with Writer.open(spec, meta, mode) as writer:
            for paths, arrays in _merged_blocks(sources, specs):
                writer.write_batch(paths, arrays)
                rows += len(paths)
            for src in sources:  # shards hold consecutive inputs: their failures in shard order
                skipped = src.failures()
                if skipped:
                    writer.write_batch([], {}, skipped)
                    failures += len(skipped)
            writer.close(complete=True)
    return MergeSummary(out, len(sources), rows, failures)


_WRITER_KEYS = ("created", "complete", "run_id", "inputs", "nonfinite_values", "datasets")


def position(meta: dict[str, Any]) -> tuple[int, int] | None:
    """(I, N) of a shard from either writer's metadata; None for an output that is no shard."""
    shard = meta.get("shard")
    if isinstance(shard, list) and len(shard) == 2:
        return int(shard[0]), int(shard[1])
    if isinstance(shard, int) and isinstance(meta.get("num_shards"), int):
        return shard, meta["num_shards"]
    return None


def _datasets(src: Source) -> list[DatasetSpec]:
    """The row datasets to merge: as recorded by the writer, else as found in the file."""
    if "datasets" in src.meta:
        return [DatasetSpec.from_json(d) for d in src.meta["datasets"] if d["name"] != INDEX]
    return [
        DatasetSpec(name, tuple(shape[1:]), dtype)
        for name, (shape, dtype) in src.shapes.items()
        if name not in (INDEX, "paths") and not name.startswith("failed/")
    ]


def _check(paths: list[Path], stack: ExitStack) -> list[Source]:
    if not paths:
        raise UsageError("merge needs the shard outputs to join.", params=("shards",))
    sources, not_shards, incomplete = [], [], []
    for path in paths:
        try:
            src = open_source(path, stack)
        except OutputError as exc:
            raise OutputError(f"cannot merge {path}: {exc}", params=("shards",)) from None
        if position(src.meta) is None:
            not_shards.append(str(path))
        elif not src.complete:
            incomplete.append(str(path))
        sources.append(src)
    if not_shards:
        raise OutputError(
            f"{', '.join(not_shards)} {'is' if len(not_shards) == 1 else 'are'} not a shard "
            "(written without shard=I/N); merge takes the shards of one run.",
            params=("shards",),
        )
    if incomplete:
        raise OutputError(
            f"incomplete shards: {', '.join(incomplete)}; finish each with resume=True, then "
            "merge again.",
            params=("shards", "resume"),
        )
    count = position(sources[0].meta)[1]
    by_index: dict[int, list[str]] = {}
    for src in sources:
        by_index.setdefault(position(src.meta)[0], []).append(str(src.path))
    twice = {i: p for i, p in by_index.items() if len(p) > 1}
    if twice:
        i, names = min(twice.items())
        raise OutputError(f"shard {i} is given twice ({', '.join(names)}).", params=("shards",))
    counts = {position(src.meta)[1] for src in sources}
    missing = [i for i in range(count) if i not in by_index]
    if len(counts) > 1 or missing:
        shown = ", ".join(f"{i}/{count}" for i in missing[:8])
        shown += " ..." if len(missing) > 8 else ""
        what = f"shards of {sorted(counts)} parts mixed" if len(counts) > 1 else f"missing {shown}"
        raise OutputError(
            f"cannot merge: {what}; give all {count} shards of one run.", params=("shards",)
        )
    sources.sort(key=lambda s: position(s.meta)[0])
    ref = sources[0]
    for src in sources[1:]:
        differ = [k for k in _SAME if src.meta.get(k) != ref.meta.get(k)]
        if differ:
            raise OutputError(
                f"{src.path} does not match {ref.path} ({', '.join(differ)} differ): these shards "
                "come from different runs.",
                params=("shards",),
            )
    return sources


def _merged_blocks(
    sources: list[Source], specs: list[DatasetSpec]
) -> Iterator[tuple[list[str], dict[str, Any]]]:
    """Rows of all shards in global order, in blocks for `write_batch`."""
    if not any(s.ragged for s in specs):
        for src in sources:  # consecutive inputs, each shard in input order: concatenate
            for start in range(0, src.rows, _BLOCK_ROWS):
                stop = min(src.rows, start + _BLOCK_ROWS)
                yield src.paths(start, stop), {s.name: src.read(s.name, start, stop) for s in specs}
        return
    # keep-aspect: every shard is sorted by (grid, index); a k-way merge keeps that order
    cursors = [_Cursor(src, specs) for src in sources]
    heap = [(c.key(), k) for k, c in enumerate(cursors) if not c.done]
    heapq.heapify(heap)
    paths: list[str] = []
    arrays: dict[str, list] = {s.name: [] for s in specs}
    while heap:
        _, k = heapq.heappop(heap)
        cursor = cursors[k]
        path, row = cursor.take()
        paths.append(path)
        for name, value in row.items():
            arrays[name].append(value)
        if not cursor.done:
            heapq.heappush(heap, (cursor.key(), k))
        if len(paths) == _BLOCK_ROWS or not heap:
            yield paths, {s.name: _stack(arrays[s.name], s) for s in specs}
            paths, arrays = [], {s.name: [] for s in specs}


def _stack(values: list, spec: DatasetSpec) -> Any:
    return values if spec.ragged else np.stack(values)


class _Cursor:
    """One shard read block by block, row by row."""

    def __init__(self, src: Source, specs: list[DatasetSpec]) -> None:
        self.src, self.specs, self.next_row = src, specs, 0
        self.block_start = 0
        self.block: dict[str, Any] = {}
        self._load()

    @property
    def done(self) -> bool:
        return self.next_row >= self.src.rows

    def _load(self) -> None:
        start, src = self.next_row, self.src
        stop = min(src.rows, start + _BLOCK_ROWS)
        self.block_start = start
        block: dict[str, Any] = {"": src.paths(start, stop), INDEX: src.read(INDEX, start, stop)}
        block["grids"] = src.read("grids", start, stop)
        for s in self.specs:
            if s.ragged:
                offsets = src.read(s.offsets_name, start, stop + 1)
                items = src.read(s.name, int(offsets[0]), int(offsets[-1]))
                block[s.name] = (items, offsets - offsets[0])
            else:
                block[s.name] = src.read(s.name, start, stop)
        self.block = block

    def key(self) -> tuple[int, int, int]:
        i = self.next_row - self.block_start
        h, w = self.block["grids"][i]
        return int(h), int(w), int(self.block[INDEX][i])

    def take(self) -> tuple[str, dict[str, Any]]:
        i = self.next_row - self.block_start
        row: dict[str, Any] = {}
        for s in self.specs:
            if s.ragged:
                items, offsets = self.block[s.name]
                row[s.name] = items[offsets[i] : offsets[i + 1]]
            else:
                row[s.name] = self.block[s.name][i]
        path = self.block[""][i]
        self.next_row += 1
        if not self.done and self.next_row - self.block_start >= len(self.block[""]):
            self._load()
        return path, row
