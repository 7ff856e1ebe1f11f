"""One L2-normalised vector per row of an embed output, read lazily in blocks.

`open_vectors` checks that the file is a finished embed output, picks the vectors (`cls`, or
`patches-mean`: the mean of a row's patch tokens, on the regular grid or keep-aspect ragged), at the
root or in a stored `layers/<i>/` block, and gives a `Vectors` view over them. Data is only read
when a block is asked for: h5py reads the chunks of that block, `.npy` files are memory-mapped, and
float16 stores are converted to float32 one block at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from dinoreg.errors import InputError, OutputError, UsageError
from dinoreg.neighbours.files import open_h5, open_npy, pick
from dinoreg.output import layout

__all__ = ["TOKEN_CHOICES", "Tokens", "Vectors", "open_vectors"]

Tokens = Literal["cls", "patches-mean"]
TOKEN_CHOICES: tuple[str, ...] = ("cls", "patches-mean")
# Stored bytes per block: large enough for fast matmuls, small enough to keep memory flat.
BLOCK_BYTES = 32 << 20


class Vectors:
    """Normalised float32 vectors of one output, read in row blocks; close it (or use `with`)."""

    def __init__(
        self,
        path: Path,
        fmt: str,
        stack: ExitStack,
        arrays: dict[str, Any],
        meta: dict[str, Any],
        rows: int,
        tokens: str,
        prefix: str,
        layer: int | None,
        files: list[Path],
    ) -> None:
        self.path, self.format, self.meta, self.rows = path, fmt, meta, rows
        self.tokens, self.layer = tokens, layer
        self._stack, self._arrays, self._prefix, self._files = stack, arrays, prefix, files
        self._h5: h5py.File | None = arrays.get("__file__")
        main = arrays["data"]
        self.store_dtype: str = np.dtype(main.dtype).name
        self.dim: int = int(main.shape[-1])
        self.ragged = "offsets" in arrays
        row_items = int(np.prod(main.shape[1:-1], dtype=np.int64)) if not self.ragged else 1
        if self.ragged and rows:
            row_items = max(1, int(main.shape[0]) // rows)
        self._row_bytes = row_items * self.dim * np.dtype(main.dtype).itemsize

    # Provenance, for checking that a query was embedded the same way as the file.
    @property
    def model(self) -> str | None:
        return self.meta.get("model")

    @property
    def weights_sha256(self) -> str | None:
        return self.meta.get("weights_sha256")

    @property
    def recipe(self) -> dict[str, Any] | None:
        return self.meta.get("recipe")

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Vectors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def default_block_rows(self, budget_bytes: int = BLOCK_BYTES) -> int:
        return max(1, budget_bytes // max(self._row_bytes, 1))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` as a fresh (n, D) float32 array, each row of unit norm (or zero)."""
        start, stop = max(0, start), min(self.rows, stop)
        if stop <= start:
            return np.zeros((0, self.dim), np.float32)
        data = self._arrays["data"]
        if self.ragged:
            offsets = np.asarray(self._arrays["offsets"][start : stop + 1], np.int64)
            counts = np.diff(offsets)
            if (counts <= 0).any():
                raise OutputError(f"{self.path}: a row has no patch tokens; the file is damaged.")
            items = np.asarray(data[offsets[0] : offsets[-1]], np.float32)
            out = np.add.reduceat(items, offsets[:-1] - offsets[0], axis=0)
            out /= counts[:, None].astype(np.float32)
        elif data.ndim == 2:
            out = np.array(data[start:stop], np.float32)
        else:
            block = np.asarray(data[start:stop])
            out = block.reshape(len(block), -1, self.dim).mean(axis=1, dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        # Zero rows stay zero (score 0 with everything) instead of turning into NaN.
        np.maximum(norms, np.float32(1e-12), out=norms)
        out /= norms
        return out

    def blocks(
        self, block_rows: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, vectors) for consecutive blocks covering rows `start:stop`."""
        step = block_rows or self.default_block_rows()
        end = self.rows if stop is None else min(stop, self.rows)
        for first in range(start, end, step):
            yield first, self.read(first, min(end, first + step))

    def take(self, rows: Sequence[int]) -> np.ndarray:
        """The vectors of `rows` (any order, repeats allowed) as a (len(rows), D) array."""
        out = np.zeros((len(rows), self.dim), np.float32)
        for i, row in enumerate(rows):
            out[i] = self.read(row, row + 1)[0]
        return out

    def paths(self, start: int = 0, stop: int | None = None) -> list[str]:
        stop = self.rows if stop is None else min(stop, self.rows)
        if stop <= start:
            return []
        if self._h5 is not None:
            return list(self._h5["paths"].asstr(errors="surrogateescape")[start:stop])
        return list(islice(layout.iter_paths(self.path), start, stop))

    def path_of(self, rows: Sequence[int]) -> list[str]:
        """The stored path of each row in `rows`, reading the paths once in row order."""
        if self._h5 is not None:
            names = self._h5["paths"].asstr(errors="surrogateescape")
            return [names[int(r)] for r in rows]
        want = {int(r) for r in rows}
        found: dict[int, str] = {}
        for i, p in enumerate(islice(layout.iter_paths(self.path), max(want, default=-1) + 1)):
            if i in want:
                found[i] = p
        return [found[int(r)] for r in rows]

    def find_paths(self, paths: Sequence[str]) -> list[int]:
        """Row of each path in `paths` (the first row if stored twice); InputError if absent."""
        want = {p: -1 for p in paths}
        row = 0
        for start in range(0, self.rows, 65536):
            for p in self.paths(start, start + 65536):
                if p in want and want[p] < 0:
                    want[p] = row
                row += 1
        missing = [p for p, r in want.items() if r < 0]
        if missing:
            raise InputError(f"paths: {missing[0]!r} is not a row of {self.path}.")
        return [want[p] for p in paths]

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(file, size, mtime_ns) of every file the vectors come from, to detect a changed FEATS."""
        out = []
        for f in self._files:
            st = os.stat(f)
            out.append((f.name, st.st_size, st.st_mtime_ns))
        return out


def open_vectors(
    feats: str | os.PathLike[str], tokens: Tokens = "cls", layer: int | None = None
) -> Vectors:
    """Open a finished embed output for search; OutputError if it is not one or lacks `tokens`."""
    if tokens not in TOKEN_CHOICES:
        raise UsageError(
            f"tokens must be one of {', '.join(TOKEN_CHOICES)}, not {tokens!r}.", params=("tokens",)
        )
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, (int, np.integer))):
        raise UsageError(
            f"layer must be a block index such as 11 or -1, not {layer!r}.", params=("layer",)
        )
    path = Path(feats)
    stack = ExitStack()
    try:
        if path.is_dir():
            fmt, arrays, meta, files = "npy", *open_npy(path, stack)
        elif path.exists():
            fmt, arrays, meta, files = "h5", *open_h5(path, stack)
        elif path.with_name(path.name + ".partial").is_dir():
            raise OutputError(
                f"feats: {path} is not finished (its staging directory {path.name}.partial "
                "exists); finish or resume the embed run first."
            )
        else:
            raise OutputError(f"feats: {path} does not exist.", params=("feats",))
        rows, prefix, block, picked = pick(path, arrays, meta, tokens, layer)
        if fmt == "npy":
            files = [*files, *(path / layout.dataset_file(n) for n in picked.values())]
        chosen = {role: arrays[name] for role, name in picked.items()}
        if "__file__" in arrays:
            chosen["__file__"] = arrays["__file__"]
        return Vectors(path, fmt, stack, chosen, meta, rows, tokens, prefix, block, files)
    except BaseException:
        stack.close()
        raise
