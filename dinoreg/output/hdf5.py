"""HDF5 output: converting a finished staging store into one `.h5` file, and its attribute codec.

Layout: each dataset under its name (`/` makes groups), ragged ones as `(total, *row_shape)` plus
`<name>_offsets` `(N + 1,)` int64; `paths` `(N,)` and `failed/paths`, `failed/reasons` `(M,)` as
variable-length UTF-8 strings (file names that are not valid UTF-8 are stored with their raw
bytes, read back with errors="surrogateescape"). Root attributes hold the provenance: strings,
numbers and booleans as themselves, anything else as a JSON string, with the names of those listed
in the `json_attrs` attribute (a JSON list). No compression: float features barely compress and
it slows reads and writes alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dinoreg._fs import fsync_dir
from dinoreg.output import layout
from dinoreg.output.layout import OFFSETS_DTYPE, STORE_DTYPES
from dinoreg.output.store import StagingStore, crash_point

JSON_ATTRS = "json_attrs"
# ~1 MiB chunks serve both one-row reads and scans; a row bigger than that is a chunk of its own.
CHUNK_BYTES = 1 << 20
# Copy in blocks this big so converting never holds a whole dataset in memory.
BLOCK_BYTES = 16 << 20
_STRING_BLOCK = 65536


def chunk_rows(n: int, row_bytes: int) -> int:
    return max(1, min(n, CHUNK_BYTES // max(row_bytes, 1)))


def encode_attrs(attrs: h5py.AttributeManager, meta: Mapping[str, Any]) -> None:
    json_keys = []
    for key, value in meta.items():
        plain = isinstance(value, (str, bool, float)) or (
            isinstance(value, int) and -(2**63) <= value < 2**63
        )
        if plain:
            attrs[key] = value
        else:
            attrs[key] = json.dumps(value, ensure_ascii=False)
            json_keys.append(key)
    attrs[JSON_ATTRS] = json.dumps(json_keys)


def decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    json_keys = set(json.loads(attrs.get(JSON_ATTRS, "[]")))
    meta: dict[str, Any] = {}
    for key, value in attrs.items():
        if key == JSON_ATTRS:
            continue
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        meta[key] = json.loads(value) if key in json_keys else value
    return meta


@contextlib.contextmanager
def interrupts_between_blocks() -> Iterator[Callable[[], None]]:
    """Ctrl-C and SIGTERM take effect when the returned check is called, between blocks.

    h5py runs Python code in weakref callbacks, where a KeyboardInterrupt is printed and
    swallowed: a conversion interrupted there went on and finished as if nothing had happened.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None  # signals only reach the main thread
        return
    seen: list[int] = []

    def hold(signum: int, frame: object) -> None:
        seen.append(signum)

    def check() -> None:
        if seen:
            raise KeyboardInterrupt

    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, hold) for s in stops}
    try:
        yield check
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def convert_to_h5(store: StagingStore, dest: Path, meta: Mapping[str, Any]) -> None:
    """Write `dest` from the committed contents of `store`: via `<dest>.tmp`, fsync, rename.

    Interrupted (Ctrl-C, SIGTERM) between blocks, it removes the temporary file and raises
    KeyboardInterrupt; the staged rows are untouched, so a resumed run converts again.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    j = store.journal
    try:
        with interrupts_between_blocks() as check, h5py.File(tmp, "w", track_order=True) as f:
            for spec in j.datasets:
                count = j.items[spec.name] if spec.ragged else j.rows
                _copy(store, f, spec.name, STORE_DTYPES[spec.dtype], spec.row_shape, count, check)
                if spec.ragged:
                    _copy(store, f, spec.offsets_name, OFFSETS_DTYPE, (), j.rows + 1, check)
                crash_point("h5")
            paths = layout.iter_paths(store.directory, j.lengths[layout.PATHS])
            _write_strings(f.create_dataset("paths", (j.rows,), dtype=_STR), paths)
            group = f.create_group("failed")
            failed_paths = group.create_dataset("paths", (j.failures,), dtype=_STR)
            reasons = group.create_dataset("reasons", (j.failures,), dtype=_STR)
            failures = layout.iter_failures(store.directory, j.lengths[layout.FAILED])
            start = 0
            while block := list(islice(failures, _STRING_BLOCK)):
                failed_paths[start : start + len(block)] = _encode([p for p, _ in block])
                reasons[start : start + len(block)] = _encode([r for _, r in block])
                start += len(block)
            encode_attrs(f.attrs, meta)
            check()
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_STR = h5py.string_dtype("utf-8")


def _encode(texts: Iterable[str]) -> np.ndarray:
    return np.array([t.encode("utf-8", "surrogateescape") for t in texts], dtype=object)


def _write_strings(dset: h5py.Dataset, texts: Iterator[str]) -> None:
    start = 0
    while block := list(islice(texts, _STRING_BLOCK)):
        dset[start : start + len(block)] = _encode(block)
        start += len(block)


def _copy(
    store: StagingStore,
    f: h5py.File,
    name: str,
    descr: str,
    row_shape: tuple[int, ...],
    count: int,
    check: Callable[[], None] = lambda: None,
) -> None:
    dtype = np.dtype(descr)
    row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    rows = chunk_rows(count, row_bytes)
    # An empty dataset cannot have chunks (h5py refuses chunks larger than the shape).
    chunks = (rows, *row_shape) if count else None
    dset = f.create_dataset(name, (count, *row_shape), dtype=dtype, chunks=chunks)
    block = max(rows, BLOCK_BYTES // max(row_bytes, 1) // rows * rows)
    for start in range(0, count, block):
        stop = min(count, start + block)
        check()
        dset[start:stop] = store.read(name, start, stop)
