"""The on-disk layout shared by the staging store, the HDF5 converter and the reader.

An output directory (and an HDF5 run's staging directory) holds one `.npy` file per dataset,
`paths.txt`, `failed.tsv` and `meta.json` (plus `journal.json` and `.lock` while unfinished).

Dataset names may contain `/` (an HDF5 group path such as `layers/-1/cls`); in a directory they
become dots: `layers/-1/cls` -> `layers.-1.cls.npy`. Names cannot contain dots, so the mapping is
reversible. A ragged dataset `name` also has `name_offsets` (`name_offsets.npy`).

`paths.txt` has one input per line; `failed.tsv` has `path<TAB>reason` lines. A field that holds a
newline, tab, backslash or other control character, starts with `"`, or is not valid UTF-8
(undecodable file names reach Python as surrogates) is written as a JSON string instead; so a
line (or field) starting with `"` is JSON.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dinoreg.errors import OutputError

JOURNAL = "journal.json"
META = "meta.json"
PATHS = "paths.txt"
FAILED = "failed.tsv"
LOCK = ".lock"

# Little-endian on disk whatever the machine, so files move between hosts unchanged.
STORE_DTYPES = {"float32": "<f4", "float16": "<f2", "int32": "<i4", "int64": "<i8"}
OFFSETS_DTYPE = "<i8"

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")
_RESERVED = ("paths", "failed")
_MIN_HEADER = 256
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the output; each row (input image) contributes one record to it.

    `row_shape` is the shape of one row, or for a `ragged` dataset the trailing shape of one item:
    a ragged row is `(k, *row_shape)` with `k` varying per row, stored concatenated as
    `(total, *row_shape)` plus `<name>_offsets` `(N + 1,)` int64 (row i = items
    `offsets[i]:offsets[i + 1]`).
    """

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    ragged: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"dataset name {self.name!r} must be [A-Za-z0-9_-] parts joined by /")
        if self.name in _RESERVED or self.name.startswith("failed/"):
            raise ValueError(f"dataset name {self.name!r} is reserved")
        shape = tuple(int(d) for d in self.row_shape)
        if any(d < 1 for d in shape):
            raise ValueError(f"dataset {self.name!r}: row_shape {shape} must be positive")
        object.__setattr__(self, "row_shape", shape)
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dataset {self.name!r}: dtype must be one of {sorted(STORE_DTYPES)}")

    @property
    def offsets_name(self) -> str:
        return f"{self.name}_offsets"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "row_shape": list(self.row_shape),
            "dtype": self.dtype,
            "ragged": self.ragged,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DatasetSpec:
        return cls(doc["name"], tuple(doc["row_shape"]), doc["dtype"], bool(doc["ragged"]))


def validate_datasets(datasets: Sequence[DatasetSpec]) -> None:
    """Reject sets of datasets that would collide on disk (programming errors, not user input)."""
    names: list[str] = []
    for spec in datasets:
        names.append(spec.name)
        if spec.ragged:
            names.append(spec.offsets_name)
    if len(set(names)) != len(names):
        raise ValueError(f"dataset names collide: {names}")
    taken = set(names)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in taken:
                raise ValueError(f"dataset {name!r} would live inside dataset {parts[:i]}")


def dataset_file(name: str) -> str:
    return name.replace("/", ".") + ".npy"


def dataset_name(file: str) -> str:
    return file.removesuffix(".npy").replace(".", "/")


def npy_header(descr: str, shape: tuple[int, ...], length: int) -> bytes:
    """A version 1.0 `.npy` header padded with spaces to exactly `length` bytes."""
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    pad = length - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"npy header for shape {shape} does not fit in {length} bytes")
    body = (text + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length - 10) + body


def header_length(descr: str, row_shape: tuple[int, ...]) -> int:
    # Reserve room for the largest row count numpy could ever hold, rounded to numpy's 64 bytes.
    worst = len(npy_header(descr, (2**63 - 1, *row_shape), 1 << 16).rstrip(b" \n")) + 1
    return max(_MIN_HEADER, -(-worst // 64) * 64)


def read_header_length(fd: int) -> int:
    pre = os.pread(fd, 10, 0)
    if len(pre) != 10 or pre[:8] != b"\x93NUMPY\x01\x00":
        raise OutputError(
            "a staged .npy file has a damaged header; pass overwrite=True to start again.",
            params=("overwrite",),
        )
    return 10 + struct.unpack("<H", pre[8:10])[0]


# Paths are written one per line (reasons after a tab); anything that would break that framing, or
# is not valid UTF-8 (undecodable file names arrive as surrogates), is written as a JSON string.
_NEEDS_JSON = re.compile(r'^"|[\x00-\x1f\x7f\\]')


def encode_field(text: str) -> str:
    if _NEEDS_JSON.search(text):
        return json.dumps(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(text)
    return text


def decode_field(text: str) -> str:
    return json.loads(text) if text.startswith('"') else text


_DECODER = json.JSONDecoder()


def decode_failure(line: str) -> tuple[str, str]:
    if line.startswith('"'):
        path, end = _DECODER.raw_decode(line)
    else:
        end = line.index("\t")
        path = line[:end]
    if line[end : end + 1] != "\t":
        raise ValueError("missing tab")
    return path, decode_field(line[end + 1 :])


def iter_lines(path: Path, limit: int | None = None) -> Iterator[str]:
    """Lines of `path` without their newline, reading at most `limit` bytes, in bounded memory."""
    left = limit if limit is not None else -1
    if left == 0:
        return
    rest = b""
    with open(path, "rb") as fh:
        while left != 0:
            chunk = fh.read(_READ_CHUNK if left < 0 else min(_READ_CHUNK, left))
            if not chunk:
                break
            left = left - len(chunk) if left > 0 else left
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line.decode("utf-8")
    if rest:
        yield rest.decode("utf-8")


def iter_paths(directory: Path, limit: int | None = None) -> Iterator[str]:
    for line in iter_lines(directory / PATHS, limit):
        yield decode_field(line)


def iter_failures(directory: Path, limit: int | None = None) -> Iterator[tuple[str, str]]:
    for line in iter_lines(directory / FAILED, limit):
        try:
            yield decode_failure(line)
        except ValueError:
            raise OutputError(
                f"{directory / FAILED} is damaged; pass overwrite=True.", params=("overwrite",)
            ) from None


def read_rows(
    fd: int, offset: int, dtype: str, row_shape: tuple[int, ...], start: int, stop: int
) -> np.ndarray:
    """Rows `start:stop` of the array stored at byte `offset` of `fd`, as a fresh array."""
    dt = np.dtype(dtype)
    row_bytes = dt.itemsize * int(np.prod(row_shape, dtype=np.int64))
    want = (stop - start) * row_bytes
    buf = bytearray(want)
    view = memoryview(buf)
    done = 0
    while done < want:
        got = os.preadv(fd, [view[done:]], offset + start * row_bytes + done)
        if got == 0:
            raise OutputError(
                "a staged .npy file is shorter than its journal; pass overwrite=True.",
                params=("overwrite",),
            )
        done += got
    return np.frombuffer(buf, dtype=dt).reshape(stop - start, *row_shape)


def read_npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of the `.npy` file open in `handle`."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    return tuple(shape), fortran, dtype, handle.tell()
