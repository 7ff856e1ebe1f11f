"""Uniform row access over the three kinds of output: a finished `.h5`, a finished `.npy`
directory, and the staging directory of an unfinished run (read up to its journal)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from itertools import islice
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dinoreg._fs import read_json
from dinoreg.errors import OutputError
from dinoreg.output import layout
from dinoreg.output.finished import own_files
from dinoreg.output.hdf5 import decode_attrs
from dinoreg.output.store import Journal


class Source:
    """Uniform row access over the three kinds of output."""

    path: Path
    format: str
    complete: bool
    rows: int
    meta: dict[str, Any]
    shapes: dict[str, tuple[tuple[int, ...], str]]

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def paths(self, start: int, stop: int) -> list[str]:
        raise NotImplementedError

    def failures(self) -> list[tuple[str, str]]:
        raise NotImplementedError


class _DirSource(Source):
    """An `.npy` directory, finished (shapes from the headers) or staging (from the journal)."""

    def __init__(self, directory: Path, fmt: str, stack: ExitStack) -> None:
        self.path, self.format, self.directory = directory, fmt, directory
        self._arrays: dict[str, tuple[int, int, str, tuple[int, ...]]] = {}
        self.shapes = {}
        self.meta = read_json(directory / layout.META)
        self._limits: dict[str, int | None] = {layout.PATHS: None, layout.FAILED: None}
        self._path_iter: Iterator[str] | None = None
        self._path_next = 0
        if (directory / layout.JOURNAL).exists():
            journal = Journal.load(directory)
            self.complete, self.rows = False, journal.rows
            self._limits = {f: journal.lengths[f] for f in self._limits}
            for file, descr, row_shape, count in journal.layout():
                fd = self._open(directory / file, stack)
                self._add(file, fd, layout.read_header_length(fd), descr, (count, *row_shape))
        elif self.meta.get("complete") is True:
            self.complete = True
            # only the datasets this output recorded: other .npy files there are not ours
            own = own_files(directory, self.meta)
            for file in sorted(os.listdir(directory)):
                if file.endswith(".npy") and file in own:
                    self._add_npy(file, stack)
            self.rows = self._count_rows()
        else:
            # A run killed before its first commit point: nothing was committed.
            self.complete, self.rows = False, 0
            self._limits = dict.fromkeys(self._limits, 0)

    def _count_rows(self) -> int:
        # Any dataset tells, without reading paths.txt through.
        for name, (shape, _) in self.shapes.items():
            if name.endswith("_offsets") and name.removesuffix("_offsets") in self.shapes:
                return shape[0] - 1
            if f"{name}_offsets" not in self.shapes:
                return shape[0]
        return sum(1 for _ in layout.iter_lines(self.directory / layout.PATHS))

    @staticmethod
    def _open(path: Path, stack: ExitStack) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # A writer finished or restarted between reading the journal and opening files.
            raise OutputError(f"{path} vanished while being read; try again.") from None
        stack.callback(os.close, fd)
        return fd

    def _add(self, file: str, fd: int, offset: int, descr: str, shape: tuple[int, ...]) -> None:
        name = layout.dataset_name(file)
        self._arrays[name] = (fd, offset, descr, shape[1:])
        self.shapes[name] = (shape, np.dtype(descr).name)

    def _add_npy(self, file: str, stack: ExitStack) -> None:
        path = self.directory / file
        try:
            with open(path, "rb") as fh:
                shape, fortran, dtype, offset = layout.read_npy_header(fh)
        except (OSError, ValueError):
            raise OutputError(f"{path} is not a readable .npy file.") from None
        if fortran or dtype.hasobject or not shape:
            raise OutputError(f"{path} is not an array file written by dinoreg.")
        self._add(file, self._open(path, stack), offset, dtype.str, tuple(shape))

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        fd, offset, descr, row_shape = self._arrays[name]
        return layout.read_rows(fd, offset, descr, row_shape, start, stop)

    def paths(self, start: int, stop: int) -> list[str]:
        # Called with consecutive ranges, so keep one iterator rather than rescanning the file.
        if self._path_iter is None or start != self._path_next:
            it = layout.iter_paths(self.directory, self._limits[layout.PATHS])
            self._path_iter, self._path_next = it, 0
            for _ in islice(it, start):
                pass
        out = list(islice(self._path_iter, stop - start))
        if len(out) != stop - start:
            raise OutputError(f"{self.directory / layout.PATHS} has fewer lines than rows.")
        self._path_next = stop
        return out

    def failures(self) -> list[tuple[str, str]]:
        return list(layout.iter_failures(self.directory, self._limits[layout.FAILED]))


class _H5Source(Source):
    def __init__(self, path: Path, stack: ExitStack) -> None:
        self.path, self.format = path, "h5"
        try:
            self._file = stack.enter_context(h5py.File(path, "r"))
        except OSError:
            raise OutputError(
                f"{path} is not an HDF5 file or a dinoreg output directory."
            ) from None
        f = self._file
        if not isinstance(f.get("paths"), h5py.Dataset):
            raise OutputError(f"{path} is an HDF5 file but not a dinoreg output.")
        self.meta = decode_attrs(f.attrs)
        self.complete = self.meta.get("complete") is True
        self.rows = len(f["paths"])
        self.shapes = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and name != "paths" and not name.startswith("failed/"):
                self.shapes[name] = (tuple(obj.shape), obj.dtype.name)

        f.visititems(visit)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._file[name][start:stop]

    def paths(self, start: int, stop: int) -> list[str]:
        return list(self._file["paths"].asstr(errors="surrogateescape")[start:stop])

    def failures(self) -> list[tuple[str, str]]:
        group = self._file.get("failed")
        if group is None:
            return []
        paths = group["paths"].asstr(errors="surrogateescape")[:]
        reasons = group["reasons"].asstr(errors="surrogateescape")[:]
        return list(zip(paths, reasons, strict=True))


def open_source(path: Path, stack: ExitStack) -> Source:
    path = Path(path)
    if path.is_dir():
        if (path / layout.JOURNAL).exists() or (path / layout.META).exists():
            return _DirSource(path, "npy", stack)
        raise OutputError(f"{path} is a directory but not a dinoreg output.")
    if path.exists():
        return _H5Source(path, stack)
    stage = path.with_name(path.name + ".partial")
    if (stage / layout.META).exists():
        source = _DirSource(stage, "h5", stack)
        source.path = path
        return source
    raise OutputError(f"{path} does not exist.")
