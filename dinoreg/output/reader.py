"""Reading outputs back: `inspect_output` (for `dinoreg info`) and `read` (rows, streamed).

Both work on a finished `.h5`, a finished `.npy` directory, and a run still in progress or killed
(the `.h5` path whose `<name>.h5.partial/` exists, or an `.npy` directory with a journal); `read`
refuses an unfinished one unless asked (`allow_incomplete=True`), since its rows are a prefix of
what the caller expects. For an unfinished run only what the journal says is committed is read,
and nothing is written or locked, so it is safe while another process writes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from dinoreg.errors import OutputError
from dinoreg.output import layout
from dinoreg.output.lock import lock_holder
from dinoreg.output.sources import Source, open_source
from dinoreg.output.state import partial_dir

__all__ = ["OutputInfo", "Row", "Rows", "inspect_output", "open_output", "read"]

_BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class OutputInfo:
    """What `inspect_output` found. `complete`: the output at `path` is finished (its rows are
    all there); `being_written`: another process holds the output's lock right now;
    `staged_at`: the staging directory holding a run's committed rows (an unfinished run, or a
    run replacing a complete output), else None. Counts and datasets describe what `read` sees:
    the finished output if there is one, else the staged rows."""

    path: Path
    format: str
    complete: bool
    rows: int
    failures: list[tuple[str, str]]
    datasets: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, dtype), e.g. ragged offsets
    meta: dict[str, Any]
    being_written: bool = False
    staged_at: Path | None = None


@dataclass(frozen=True)
class Row:
    """One input's tokens; None for tokens the output does not store. `patches` is (h, w, D)."""

    path: str
    cls: np.ndarray | None
    registers: np.ndarray | None
    patches: np.ndarray | None


def _staged_at(path: Path) -> Path | None:
    """The staging directory holding rows of an unfinished run for `path`, if any."""
    partial = partial_dir(path)
    if (partial / layout.JOURNAL).exists() or (partial / layout.META).exists():
        return partial
    if path.is_dir() and (path / layout.JOURNAL).exists():
        return path
    return None


def inspect_output(path: str | os.PathLike[str]) -> OutputInfo:
    """What an output holds (shapes, counts, provenance), reading no feature data.

    Takes no lock: whether another process is writing is probed without acquiring (`lock.py`).
    """
    path = Path(path)
    with ExitStack() as stack:
        src = open_source(path, stack)
        staged = _staged_at(path)
        where = staged if staged is not None else (path if path.is_dir() else None)
        return OutputInfo(
            path=src.path,
            format=src.format,
            complete=src.complete,
            rows=src.rows,
            failures=src.failures(),
            datasets=dict(src.shapes),
            meta=dict(src.meta),
            being_written=where is not None and lock_holder(where) is not None,
            staged_at=staged,
        )


class Rows:
    """The rows of an output, streamed: an iterator, and a context manager that closes its files.

    Files close when the rows run out, on `close()`, on leaving a `with` block, or (without
    those) when the object is garbage collected: stopping early with `break` needs one of them.
    """

    def __init__(self, src: Source, prefix: str, stack: ExitStack) -> None:
        self._stack = stack
        self._gen = self._iterate(src, prefix)

    def _iterate(self, src: Source, prefix: str) -> Iterator[Row]:
        try:
            yield from _rows(src, prefix)
        finally:
            self._stack.close()

    def __iter__(self) -> Rows:
        return self

    def __next__(self) -> Row:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        self._stack.close()  # a generator never started does not run its finally

    def __enter__(self) -> Rows:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def read(
    path: str | os.PathLike[str], layer: int | None = None, *, allow_incomplete: bool = False
) -> Rows:
    """Rows in output order, read in bounded blocks; patches come back as (h, w, D).

    Ragged patches are reshaped with the `grids` dataset; without one they stay (k, D). For an
    output written with `layers`, `layer` picks a stored block (its index, or negative from the
    model's end); by default the root tokens, or the deepest stored layer when there are none.
    An unfinished output is refused (OutputError) unless `allow_incomplete=True`, which reads
    the rows committed so far. A checkpoint with no registers gives (0, D) `registers`.
    Use as `with read(path) as rows:` (or call `rows.close()`) to close files when stopping early.
    """
    stack = ExitStack()
    try:
        src = open_source(Path(path), stack)
        if not src.complete and not allow_incomplete:
            where = _staged_at(Path(path)) or Path(path)
            raise OutputError(
                f"{path} is not complete ({src.rows} rows committed so far, in {where}); "
                "finish it with resume=True, or pass allow_incomplete=True to read those rows.",
                params=("resume", "allow_incomplete"),
            )
        prefix = _layer_prefix(src, layer)
    except BaseException:
        stack.close()
        raise
    return Rows(src, prefix, stack)


open_output = read  # `with open_output(path) as rows:` reads as what it does


def _layer_prefix(src: Source, layer: int | None) -> str:
    stored = sorted(
        {int(n.split("/")[1]) for n in src.shapes if re.fullmatch(r"layers/-?\d+/\w+", n)}
    )
    if not stored:
        if layer is not None:
            raise OutputError(f"{src.path} holds no intermediate layers; read it without layer=.")
        return ""
    if layer is None:
        has_root = any(t in src.shapes for t in ("cls", "registers", "patches"))
        return "" if has_root else f"layers/{stored[-1]}/"
    depth = src.meta.get("depth")
    block = layer + depth if layer < 0 and isinstance(depth, int) else layer
    if block not in stored:
        raise OutputError(
            f"{src.path} holds layers {', '.join(map(str, stored))}, not {layer}; pick one of them."
        )
    return f"layers/{block}/"


def _rows(src: Source, prefix: str = "") -> Iterator[Row]:
    tokens = [t for t in ("cls", "registers", "patches") if prefix + t in src.shapes]
    names = [prefix + t for t in tokens]
    patches = prefix + "patches"
    ragged = patches + "_offsets" in src.shapes and patches in names
    grids = "grids" in src.shapes
    no_registers = _empty_registers(src, prefix, tokens)
    row_bytes = 0
    for name in names:
        shape, dtype = src.shapes[name]
        count = shape[0] / max(src.rows, 1) if name == patches and ragged else 1
        row_bytes += int(np.dtype(dtype).itemsize * np.prod(shape[1:]) * count)
    block = max(1, _BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, src.rows, block):
        stop = min(src.rows, start + block)
        data = {n: src.read(n, start, stop) for n in names if not (n == patches and ragged)}
        if ragged:
            offsets = src.read(patches + "_offsets", start, stop + 1)
            items = src.read(patches, int(offsets[0]), int(offsets[-1]))
            offsets = offsets - offsets[0]
        grid = src.read("grids", start, stop) if ragged and grids else None
        for i, row_path in enumerate(src.paths(start, stop)):
            values = {n.removeprefix(prefix): a[i].copy() for n, a in data.items()}
            if ragged:
                own = items[offsets[i] : offsets[i + 1]].copy()
                if grid is not None:
                    h, w = (int(x) for x in grid[i])
                    if h * w != len(own):
                        raise OutputError(f"{src.path}: row {start + i} does not match its grid.")
                    own = own.reshape(h, w, *own.shape[1:])
                values["patches"] = own
            registers = values.get("registers", no_registers)
            yield Row(row_path, values.get("cls"), registers, values.get("patches"))


def _empty_registers(src: Source, prefix: str, tokens: list[str]) -> np.ndarray | None:
    """(0, D) for an output of a 0-register checkpoint that was asked to store registers."""
    asked = src.meta.get("tokens") or ()
    if "registers" in tokens or "registers" not in asked or src.meta.get("num_registers") != 0:
        return None
    for t in tokens:
        shape, dtype = src.shapes[prefix + t]
        return np.empty((0, shape[-1]), dtype)
    dim = src.meta.get("dim")
    return np.empty((0, dim), src.meta.get("store_dtype", "float32")) if dim else None
