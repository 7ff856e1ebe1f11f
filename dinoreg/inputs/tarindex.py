"""The member index of one tar: where each image member's bytes lie, read from its headers.

An index holds no Python object per member: the names in one sorted bytes blob, offsets and sizes
in numpy arrays (about 24 bytes plus the name per member), so a process can keep the indexes of
many shards, and forked workers share them copy-on-write. The tar is read through `ByteView`, by
positional reads: views of one descriptor never move each other's file position.
"""

from __future__ import annotations

import bisect
import io
import os
import tarfile
from dataclasses import dataclass

import numpy as np

from dinoreg.inputs.names import is_image_name

_BLOCK = tarfile.BLOCKSIZE
BUFFER = 64 * 1024  # read-ahead of a view; Pillow reads JPEG markers a few bytes at a time


class TarError(Exception):
    """A tar, or one member, that cannot be read; `reason` is short enough for a failure table."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TarIndex:
    """The image members of one tar, sorted by name; `damage` says why the scan stopped early."""

    names: bytes  # member names (file-system encoded) in sorted order, concatenated
    ends: np.ndarray  # (M + 1,) int64 boundaries of each name in `names`
    offsets: np.ndarray  # (M,) int64 where each member's data starts in the tar
    sizes: np.ndarray  # (M,) int64 each member's data size
    damage: str | None  # "truncated tar after member N (name)" and the like; None when sound

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        return len(self.names) + self.ends.nbytes + self.offsets.nbytes + self.sizes.nbytes

    def name(self, i: int) -> str:
        return os.fsdecode(self._name_bytes(i))

    def _name_bytes(self, i: int) -> bytes:
        return self.names[self.ends[i] : self.ends[i + 1]]

    def member_names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def find(self, member: str) -> int | None:
        """The position of `member`, or None; a binary search, as the names are sorted."""
        key = os.fsencode(member)
        i = bisect.bisect_left(range(len(self)), key, key=self._name_bytes)
        return i if i < len(self) and self._name_bytes(i) == key else None


class ByteView(io.RawIOBase):
    """A read-only, seekable window [start, start + size) of a descriptor, by positional reads
    (no shared file position, so views of one tar never disturb each other)."""

    def __init__(self, fd: int, start: int, size: int, *, owns: bool) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._owns, self._pos = fd, start, size, owns, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._start + self._pos)
        memoryview(buffer).cast("B")[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._owns and not self.closed:
            os.close(self._fd)
        super().close()


def scan(fd: int, size: int) -> TarIndex:
    """Index the image members of the tar open at `fd` (`size` bytes); TarError if not a tar.

    A tar cut short keeps the members before the cut; `damage` then names where it broke. A tar
    must end in its zero block: one that stops at a member boundary was cut there, and the
    members after the cut are lost without any other trace.
    """
    if size == 0:
        raise TarError("empty file (0 bytes)")
    found: dict[bytes, tuple[int, int]] = {}  # this tar's members only, dropped once indexed
    count, last, damage = 0, "", None
    stream = io.BufferedReader(ByteView(fd, 0, size, owns=False), BUFFER)
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")  # noqa: SIM115 - owns no descriptor
    except tarfile.TarError as exc:
        if not _starts_as_tar(stream):
            raise TarError(f"not a tar archive ({exc})") from None
        # A sound first header (say a pax header) whose member is cut: a tar, damaged at once.
        return _index({}, _damage(exc, 0, ""))
    try:
        while True:
            info = tar.next()
            tar.members.clear()  # TarFile keeps every header read; the index is the only copy
            if info is None:
                damage = _end_damage(stream, tar.offset, size, count, last)
                break
            plain = info.isreg() and not info.issparse()
            if plain and info.offset_data + info.size > size:
                damage = _truncated(count, last)
                break
            count, last = count + 1, info.name
            # Links, sparse files and folders are no images; a later copy of a name replaces
            # the earlier one, as extracting the tar would.
            if plain and is_image_name(info.name):
                found[os.fsencode(info.name)] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, UnicodeError) as exc:
        # A header tarfile cannot parse, or data cut before the next header.
        damage = _damage(exc, count, last)
    return _index(found, damage)


def _starts_as_tar(stream: io.BufferedReader) -> bool:
    stream.seek(0)
    try:
        tarfile.TarInfo.frombuf(stream.read(_BLOCK), "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _damage(exc: Exception, count: int, last: str) -> str:
    message = str(exc)
    if message in ("unexpected end of data", "empty header", "truncated header"):
        return _truncated(count, last)
    if not count:
        return f"damaged tar: {message}"
    return f"damaged tar after member {count} ({last}): {message}"


def _truncated(count: int, last: str) -> str:
    if not count:
        return "truncated tar: its first member is cut"
    return f"truncated tar after member {count} ({last})"


def _end_damage(
    stream: io.BufferedReader, end: int, size: int, count: int, last: str
) -> str | None:
    """Why the headers stopped at `end`: None for the end-of-archive zero block."""
    stream.seek(end)
    block = stream.read(_BLOCK)
    if len(block) < _BLOCK:
        return _truncated(count, last)
    if block.count(0) == _BLOCK:
        return None
    return f"damaged tar: unreadable header after member {count} ({last})"


def _index(found: dict[bytes, tuple[int, int]], damage: str | None) -> TarIndex:
    names = sorted(found)
    ends = np.cumsum([0, *map(len, names)], dtype=np.int64)
    spans = np.array([found[n] for n in names], dtype=np.int64).reshape(-1, 2)
    return TarIndex(b"".join(names), ends, spans[:, 0].copy(), spans[:, 1].copy(), damage)
