"""Row slices of a `.npy` file through a read-only memory map, without growing resident memory."""

from __future__ import annotations

import mmap
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from dinoreg.output.layout import read_npy_header

__all__ = ["MappedNpy"]

# Not every platform has it (Windows); there the pages simply stay mapped until close.
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)


class MappedNpy:
    """A read-only memory map of one `.npy` file that hands out row slices as fresh arrays.

    After each slice the pages it touched are released (MADV_DONTNEED): they are clean file pages,
    so this costs nothing, and a full scan no longer leaves the whole file mapped into the
    process's resident memory.
    """

    def __init__(self, path: Path, stack: ExitStack) -> None:
        with open(path, "rb") as fh:
            shape, fortran, dtype, offset = read_npy_header(fh)
            if fortran or dtype.hasobject or not shape:
                raise ValueError(f"{path} is not a plain C-order array")
            self.shape, self.dtype, self._offset = tuple(shape), dtype, offset
            self._row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            size = offset + self._row_bytes * shape[0]
            # mmap cannot map an empty range; an empty array needs no mapping at all.
            self._map = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) if size else None
        if self._map is not None:
            stack.callback(self._map.close)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        if self._map is None or stop == start:
            return np.zeros((stop - start, *self.shape[1:]), self.dtype)
        lo = self._offset + start * self._row_bytes
        hi = self._offset + stop * self._row_bytes
        count = (hi - lo) // self.dtype.itemsize
        view = np.frombuffer(self._map, self.dtype, count, lo)
        out = view.reshape(stop - start, *self.shape[1:]).copy()
        del view  # an exported buffer would keep the map from closing
        if _DONTNEED is not None:
            page = mmap.PAGESIZE
            self._map.madvise(_DONTNEED, lo // page * page, hi - lo // page * page)
        return out
