"""The crash-safe, append-only store every run writes into (layout: `layout.py`).

Data files are only ever written past their committed length (at offsets taken from the
journal), and a batch becomes committed when `journal.json` is atomically replaced with the new
byte lengths after every file was fsynced. The journal is the single source of truth: anything
past the journaled lengths is a batch that was in flight when the process died, cut away on the
next open. No HDF5 file is ever touched while a run is in progress, so a kill at any moment cannot
corrupt committed rows.

Each `.npy` header has a fixed, reserved length and a placeholder shape `(0, ...)` while staging,
so the file is always a valid (empty) array; `finalize` rewrites the header in place with the real
shape. For the `.npy` output format this directory *is* the output; for HDF5 it is converted once
complete (`hdf5.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dinoreg._fs import fsync_dir, pwrite_all, read_json, write_json_atomic, write_new
from dinoreg.errors import OutputError
from dinoreg.output.layout import (
    FAILED,
    JOURNAL,
    META,
    OFFSETS_DTYPE,
    PATHS,
    STORE_DTYPES,
    DatasetSpec,
    dataset_file,
    encode_field,
    header_length,
    npy_header,
    read_header_length,
    read_rows,
)

JOURNAL_VERSION = 1

# Tests set this to a callable receiving the name of each crash point ("append", "commit",
# "finalise", "finalise-meta", "h5", "h5-replaced") so a child process can SIGKILL itself there.
crash_hook: Callable[[str], None] | None = None


def crash_point(name: str) -> None:
    if crash_hook is not None:
        crash_hook(name)


@dataclass(frozen=True)
class Journal:
    """What is committed: row and failure counts, ragged item totals, byte length of each file."""

    format: str
    datasets: tuple[DatasetSpec, ...]
    rows: int
    failures: int
    items: Mapping[str, int]
    lengths: Mapping[str, int]
    # Values the store dtype cast turned into inf/nan (float16 overflow), committed with the rows.
    nonfinite: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "version": JOURNAL_VERSION,
            "format": self.format,
            "datasets": [spec.to_json() for spec in self.datasets],
            "rows": self.rows,
            "failures": self.failures,
            "items": dict(self.items),
            "lengths": dict(self.lengths),
            "nonfinite": self.nonfinite,
        }

    @classmethod
    def load(cls, directory: Path) -> Journal:
        doc = read_json(directory / JOURNAL)
        try:
            if doc["version"] != JOURNAL_VERSION:
                raise ValueError("version")
            journal = cls(
                format=str(doc["format"]),
                datasets=tuple(DatasetSpec.from_json(d) for d in doc["datasets"]),
                rows=int(doc["rows"]),
                failures=int(doc["failures"]),
                items={str(k): int(v) for k, v in doc["items"].items()},
                lengths={str(k): int(v) for k, v in doc["lengths"].items()},
                nonfinite=int(doc.get("nonfinite", 0)),
            )
            expected = {file for file, *_ in journal.layout()} | {PATHS, FAILED}
            if set(journal.lengths) != expected:
                raise ValueError("files")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise OutputError(
                f"{directory / JOURNAL} is damaged; pass overwrite=True.", params=("overwrite",)
            ) from None
        return journal

    def layout(self) -> Iterator[tuple[str, str, tuple[int, ...], int]]:
        """(file, descr, row_shape, committed count) for every array file."""
        for spec in self.datasets:
            descr = STORE_DTYPES[spec.dtype]
            if spec.ragged:
                yield dataset_file(spec.name), descr, spec.row_shape, self.items[spec.name]
                yield dataset_file(spec.offsets_name), OFFSETS_DTYPE, (), self.rows + 1
            else:
                yield dataset_file(spec.name), descr, spec.row_shape, self.rows


def _cast(a: np.ndarray, dt: np.dtype) -> tuple[np.ndarray, int]:
    """`a` as `dt`, and how many values the cast made non-finite (float16 overflows to inf)."""
    with np.errstate(over="ignore", invalid="ignore"):  # counted below, not warned about
        out = np.ascontiguousarray(a, dtype=dt)
    if dt.kind != "f" or a.dtype.kind != "f" or a.dtype.itemsize <= dt.itemsize:
        return out, 0
    made = np.count_nonzero(~np.isfinite(out)) - np.count_nonzero(~np.isfinite(a))
    return out, int(made)


def _row_bytes(descr: str, row_shape: tuple[int, ...]) -> int:
    return np.dtype(descr).itemsize * int(np.prod(row_shape, dtype=np.int64))


class StagingStore:
    """An open staging directory. The caller holds its lock; not thread-safe."""

    def __init__(self, directory: Path, journal: Journal) -> None:
        self.directory = directory
        self.journal = journal
        self._fds: dict[str, int] = {}
        self.header_lengths: dict[str, int] = {}
        try:
            for file in journal.lengths:
                try:
                    fd = os.open(directory / file, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise OutputError(
                        f"{directory / file} is missing; the output is damaged, pass "
                        "overwrite=True.",
                        params=("overwrite",),
                    ) from None
                self._fds[file] = fd
            self._check_and_trim()
        except BaseException:
            self.close()
            raise

    def _check_and_trim(self) -> None:
        damaged = OutputError(
            f"{self.directory} does not match its journal; the output is damaged, pass "
            "overwrite=True.",
            params=("overwrite",),
        )
        for file, descr, row_shape, count in self.journal.layout():
            hl = read_header_length(self._fds[file])
            self.header_lengths[file] = hl
            if self.journal.lengths[file] != hl + count * _row_bytes(descr, row_shape):
                raise damaged
        for file, length in self.journal.lengths.items():
            fd = self._fds[file]
            size = os.fstat(fd).st_size
            if size < length:
                raise damaged
            if size > length:
                # A batch that was in flight when the last process died: never committed.
                os.ftruncate(fd, length)
        for spec in self.journal.datasets:
            if spec.ragged:
                last = self.read(spec.offsets_name, self.journal.rows, self.journal.rows + 1)
                if int(last[0]) != self.journal.items[spec.name]:
                    raise damaged

    @classmethod
    def create(
        cls,
        directory: Path,
        fmt: str,
        datasets: Sequence[DatasetSpec],
        meta: Mapping[str, Any],
        extra: Mapping[str, bytes] | None = None,
    ) -> StagingStore:
        """Start an empty store in `directory` (locked by the caller, emptied of old files).

        `extra` files (the input list) are written before the journal, so a resumable store
        always has them.
        """
        # meta.json first: from here on the directory is recognisably ours.
        write_json_atomic(directory, META, meta)
        for name, data in (extra or {}).items():
            write_new(directory / name, data)
        journal = Journal(fmt, tuple(datasets), 0, 0, {}, {})
        items = {spec.name: 0 for spec in datasets if spec.ragged}
        journal = replace(journal, items=items)
        lengths: dict[str, int] = {}
        offsets_files = {dataset_file(s.offsets_name) for s in datasets if s.ragged}
        for file, descr, row_shape, _ in journal.layout():
            data = npy_header(descr, (0, *row_shape), header_length(descr, row_shape))
            if file in offsets_files:
                data += np.zeros(1, OFFSETS_DTYPE).tobytes()  # offsets[0] = 0
            lengths[file] = len(data)
            write_new(directory / file, data)
        for file in (PATHS, FAILED):
            lengths[file] = 0
            write_new(directory / file, b"")
        journal = replace(journal, lengths=lengths)
        fsync_dir(directory)
        write_json_atomic(directory, JOURNAL, journal.to_json())
        return cls(directory, journal)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `start:stop` of a dataset (or `<name>_offsets`) as committed."""
        file = dataset_file(name)
        for f, descr, row_shape, _ in self.journal.layout():
            if f == file:
                return read_rows(
                    self._fds[file], self.header_lengths[file], descr, row_shape, start, stop
                )
        raise KeyError(name)

    def append(
        self,
        paths: Sequence[str],
        arrays: Mapping[str, Any],
        failures: Sequence[tuple[str, str]],
        made_nonfinite: int = 0,
    ) -> None:
        """Append one batch and commit it: durable once this returns, absent if it never does."""
        n = len(paths)
        j = self.journal
        pieces: list[tuple[str, np.ndarray | bytes]] = []
        items = dict(j.items)
        nonfinite = made_nonfinite
        for spec in j.datasets:
            dt = np.dtype(STORE_DTYPES[spec.dtype])
            value = arrays.get(spec.name)
            if value is None and n == 0:
                continue
            if value is None:
                raise ValueError(f"write_batch: missing array {spec.name!r}")
            if spec.ragged:
                if len(value) != n:
                    raise ValueError(f"{spec.name}: {len(value)} items for {n} rows")
                ends = []
                for item in value:
                    a = np.asarray(item)
                    if a.ndim != len(spec.row_shape) + 1 or a.shape[1:] != spec.row_shape:
                        want = f"(k, *{spec.row_shape})"
                        raise ValueError(f"{spec.name}: item shape {a.shape}, want {want}")
                    cast, bad = _cast(a, dt)
                    pieces.append((dataset_file(spec.name), cast))
                    nonfinite += bad
                    items[spec.name] += a.shape[0]
                    ends.append(items[spec.name])
                pieces.append((dataset_file(spec.offsets_name), np.asarray(ends, OFFSETS_DTYPE)))
            else:
                a = np.asarray(value)
                if a.shape != (n, *spec.row_shape):
                    raise ValueError(f"{spec.name}: shape {a.shape}, want {(n, *spec.row_shape)}")
                cast, bad = _cast(a, dt)
                pieces.append((dataset_file(spec.name), cast))
                nonfinite += bad
        unknown = set(arrays) - {spec.name for spec in j.datasets}
        if unknown:
            raise ValueError(f"write_batch: unknown arrays {sorted(unknown)}")
        if n:
            pieces.append((PATHS, "".join(encode_field(p) + "\n" for p in paths).encode()))
        if failures:
            text = "".join(f"{encode_field(p)}\t{encode_field(r)}\n" for p, r in failures)
            pieces.append((FAILED, text.encode()))

        # Write at the journaled offsets, not at the end of file: leftovers of a batch that failed
        # part-way in this process are simply overwritten.
        lengths = dict(j.lengths)
        touched: set[str] = set()
        for file, data in pieces:
            raw = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else data
            if len(raw):
                pwrite_all(self._fds[file], memoryview(raw), lengths[file])
                lengths[file] += len(raw)
                touched.add(file)
            crash_point("append")
        for file in touched:
            os.fsync(self._fds[file])
        crash_point("commit")
        new = replace(j, rows=j.rows + n, failures=j.failures + len(failures))
        new = replace(new, nonfinite=j.nonfinite + nonfinite)
        new = replace(new, items=items, lengths=lengths)
        write_json_atomic(self.directory, JOURNAL, new.to_json())
        self.journal = new

    def truncate(self) -> None:
        """Cut every file to its journaled length (drops a half-written batch of this process)."""
        for file, length in self.journal.lengths.items():
            if os.fstat(self._fds[file]).st_size != length:
                os.ftruncate(self._fds[file], length)

    def finalize(self, meta: Mapping[str, Any]) -> None:
        """Turn the store into a finished `.npy` output. Idempotent: safe to re-run after a kill."""
        self.truncate()
        for file, descr, row_shape, count in self.journal.layout():
            header = npy_header(descr, (count, *row_shape), self.header_lengths[file])
            pwrite_all(self._fds[file], memoryview(header), 0)
        for fd in self._fds.values():
            os.fsync(fd)
        crash_point("finalise")
        write_json_atomic(self.directory, META, meta)
        crash_point("finalise-meta")
        # Removing the journal is the commit point of completion, so it goes last.
        os.unlink(self.directory / JOURNAL)
        fsync_dir(self.directory)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
