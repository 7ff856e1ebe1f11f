"""Shard files of a distributed embed run: names, input ranges, atomic writing, resume checks.

A run over N inputs split into S shards writes `feats-{i:05d}-of-{S:05d}.h5` for each shard i,
holding the inputs with global indices `start <= index < stop` (contiguous, balanced ranges).
Each file is a regular dinoreg HDF5 output (`cls`, `registers`, `patches`, `paths`,
`failed/paths`, `failed/reasons`, provenance attributes as `dinoreg.output.hdf5` encodes them)
plus `index` (int64, the global input index of each row) and `failed/index`. Rows are in index
order. A shard is written as `<name>.tmp` and renamed when finished, so a file under its final
name is always whole; `complete` is True in every such file.

Nothing here imports Ray: `dinoreg merge` and the tests read shards with h5py alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dinoreg._fs import fsync_dir
from dinoreg.errors import OutputError
from dinoreg.output.hdf5 import chunk_rows, decode_attrs, encode_attrs
from dinoreg.output.meta import RESUME_KEYS

SHARD_RE = re.compile(r"^feats-(\d{5})-of-(\d{5})\.h5(\.tmp)?$")
# What a completed shard must match to be kept by a resumed run, besides RESUME_KEYS.
SHARD_KEYS = ("shard", "num_shards", "start", "stop", "num_inputs", "inputs_sha256")
_STR = h5py.string_dtype("utf-8")


def shard_name(shard: int, num_shards: int) -> str:
    return f"feats-{shard:05d}-of-{num_shards:05d}.h5"


def shard_ranges(num_inputs: int, num_shards: int) -> list[range]:
    """Contiguous global index ranges, sizes differing by at most one, in shard order."""
    return [
        range(i * num_inputs // num_shards, (i + 1) * num_inputs // num_shards)
        for i in range(num_shards)
    ]


def inputs_sha256(paths: Sequence[str]) -> str:
    """Digest of an input list, so a resumed shard proves it covers the same inputs."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def our_files(directory: Path) -> list[Path]:
    """Shard files (finished or temporary) in `directory`; nothing else is ever touched."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if SHARD_RE.match(p.name) and p.is_file())


def read_meta(path: Path) -> dict[str, Any] | None:
    """A shard's attributes, or None when the file cannot be read as HDF5."""
    try:
        with h5py.File(path, "r") as f:
            return decode_attrs(f.attrs)
    except (OSError, ValueError):
        return None


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """`key stored -> wanted` for each setting that changes what a shard's rows mean."""
    return [
        f"{key} {stored.get(key)!r} -> {wanted.get(key)!r}"
        for key in (*RESUME_KEYS, *SHARD_KEYS)
        if stored.get(key) != wanted.get(key)
    ]


def is_done(path: Path, meta: Mapping[str, Any]) -> bool:
    """True when `path` is a complete shard made with `meta`'s settings; OutputError when it
    is complete but was made differently (resuming must not mix two runs' rows)."""
    stored = read_meta(path)
    if stored is None or stored.get("complete") is not True:
        return False
    diffs = differences(stored, meta)
    if diffs:
        raise OutputError(
            f"{path} was written with other settings ({'; '.join(diffs[:4])}); "
            "use the same settings, another output directory, or overwrite."
        )
    return True


def _encode(texts: Sequence[str]) -> np.ndarray:
    return np.array([t.encode("utf-8", "surrogateescape") for t in texts], dtype=object)


class ShardWriter:
    """One shard's rows, appended in global index order into `<name>.tmp`, renamed at `finish`.

    `shapes` maps each token dataset to its row shape; features are stored as `store_dtype`.
    """

    def __init__(
        self,
        directory: Path,
        meta: Mapping[str, Any],
        shapes: Mapping[str, tuple[int, ...]],
        store_dtype: str,
    ) -> None:
        self.dest = directory / shard_name(meta["shard"], meta["num_shards"])
        self.tmp = self.dest.with_name(self.dest.name + ".tmp")
        self.meta = dict(meta)
        self.expected = meta["stop"] - meta["start"]
        self.handled = 0  # rows plus failures so far
        self.rows = 0
        self.failures: list[tuple[int, str, str]] = []  # (index, path, reason); few, kept in RAM
        self._file = h5py.File(self.tmp, "w", track_order=True)
        dtype = np.dtype(store_dtype)
        for name, shape in shapes.items():
            row_bytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            self._file.create_dataset(
                name,
                (0, *shape),
                dtype=dtype,
                maxshape=(None, *shape),
                chunks=(chunk_rows(max(self.expected, 1), row_bytes), *shape),
            )
        self._file.create_dataset("paths", (0,), dtype=_STR, maxshape=(None,), chunks=(4096,))
        self._file.create_dataset("index", (0,), dtype="<i8", maxshape=(None,), chunks=(4096,))

    def add(
        self, indices: np.ndarray, paths: Sequence[str], arrays: Mapping[str, np.ndarray]
    ) -> None:
        """Append good rows (already in index order)."""
        n = len(indices)
        if n:
            end = self.rows + n
            for name, values in arrays.items():
                dset = self._file[name]
                dset.resize(end, axis=0)
                dset[self.rows : end] = values
            for name, values in (("paths", _encode(paths)), ("index", np.asarray(indices))):
                self._file[name].resize(end, axis=0)
                self._file[name][self.rows : end] = values
            self.rows = end
        self.handled += n

    def fail(self, index: int, path: str, reason: str) -> None:
        self.failures.append((index, path, reason))
        self.handled += 1

    @property
    def full(self) -> bool:
        return self.handled == self.expected

    def finish(self) -> Path:
        """Write the failures and attributes, make the file durable, and give it its name."""
        f = self._file
        group = f.create_group("failed")
        group.create_dataset("paths", data=_encode([p for _, p, _ in self.failures]), dtype=_STR)
        group.create_dataset("reasons", data=_encode([r for _, _, r in self.failures]), dtype=_STR)
        group.create_dataset("index", data=np.array([i for i, _, _ in self.failures], "<i8"))
        encode_attrs(f.attrs, {**self.meta, "rows": self.rows, "complete": True})
        f.close()
        fd = os.open(self.tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp, self.dest)
        fsync_dir(self.dest.parent)
        return self.dest

    def abandon(self) -> None:
        """Drop an unfinished shard; a resumed run writes it again from its first input."""
        if self._file.id.valid:
            self._file.close()
        self.tmp.unlink(missing_ok=True)
