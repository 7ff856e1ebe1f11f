"""Tar shards as inputs: each image member is read in place, never unpacked to disk.

A webdataset shard (as img2dataset writes them) holds `key.jpg` beside `key.json` / `key.txt`.
Each image member is one input, recorded as the tar path as given + "/" + the member name, and
identified by the tar's real path + "/" + the member name: respelling the tar does not duplicate
rows, and the member name is never resolved, so a member named `../x.jpg` is not the file `x.jpg`.

Reading a member needs where its data lies. Each process that reads members (a DataLoader worker,
the keep-aspect header pass, discovery) scans a tar's headers once into a compact `TarIndex`
(`tarindex.py`) and keeps it in a per-process cache within a byte budget, keyed by the file
(device, inode) and checked against its size and mtime on every open. Forked workers inherit what
discovery indexed. Each member read opens the tar afresh, as a file input opens its file: no
descriptor is cached, so none leaks into forks or is closed under another thread.
"""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict

from dinoreg.inputs.names import IMAGE_SUFFIXES, is_image_name
from dinoreg.inputs.tarindex import BUFFER, ByteView, TarError, TarIndex, scan

CACHE_BYTES = 64 << 20  # index bytes one process keeps: about 180 shards of 10 000 images


def split_member(path: str) -> tuple[str, str] | None:
    """(tar, member) when `path` is `some.tar/member` and `some.tar` is an existing file.

    The first `.tar` component that is a file wins: nothing below a file can be a file, so a path
    that names a member never also names a file, and real files pay only a substring search.
    """
    lowered = path.lower()
    cut = lowered.find(".tar/")
    while cut >= 0:
        tar, member = path[: cut + 4], path[cut + 5 :]
        if member and os.path.isfile(tar):
            return tar, member
        cut = lowered.find(".tar/", cut + 1)
    return None


def member_path(tar: str, member: str) -> str:
    """How a member is recorded: the tar as given, a slash, the member name."""
    return f"{tar}/{member}"


def identity(path: str) -> str:
    """The real path of a file; for a tar member, the tar's real path + "/" + member name."""
    member = split_member(path)
    if member is None:
        return os.path.realpath(path)
    return member_path(os.path.realpath(member[0]), member[1])


class _Cache:
    """Tar indexes of this process by file (device, inode), least recently used evicted first."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int], tuple[tuple[int, int], TarIndex]]
        self._entries = OrderedDict()
        self._bytes = 0
        # A lock held by another thread at fork time would stay held in the child forever.
        os.register_at_fork(after_in_child=self._new_lock)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def get(self, fd: int, info: os.stat_result) -> TarIndex:
        key, version = (info.st_dev, info.st_ino), (info.st_size, info.st_mtime_ns)
        # Scanning under the lock: threads asking for one tar wait for one scan, not each scan.
        with self._lock:
            hit = self._entries.pop(key, None)
            if hit is not None:
                self._bytes -= hit[1].nbytes
                if hit[0] != version:  # the tar was rewritten: its offsets are stale
                    hit = None
            index = hit[1] if hit is not None else scan(fd, info.st_size)
            self._entries[key] = (version, index)
            self._bytes += index.nbytes
            while self._bytes > self.budget and len(self._entries) > 1:
                _, (_, old) = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
        return index

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


_CACHE = _Cache(CACHE_BYTES)


def _open(tar: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(tar, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise TarError("no such file") from None
    except PermissionError:
        raise TarError("permission denied") from None
    except OSError as exc:
        raise TarError(f"cannot open ({exc.strerror or exc})") from None
    return fd, os.fstat(fd)


def load_index(tar: str) -> TarIndex:
    """The index of the tar at `tar` (cached); TarError when it cannot be read at all."""
    fd, info = _open(tar)
    try:
        return _CACHE.get(fd, info)
    finally:
        os.close(fd)


def open_member(tar: str, member: str) -> io.BufferedReader:
    """A buffered, seekable reader of one image member; TarError names why it cannot be read."""
    fd, info = _open(tar)
    try:
        index = _CACHE.get(fd, info)
        i = index.find(member)
        if i is None:
            raise TarError(_not_found(index, member))
        size = int(index.sizes[i])
        if size == 0:
            raise TarError("empty file (0 bytes)")
        view = ByteView(fd, int(index.offsets[i]), size, owns=True)
    except BaseException:
        os.close(fd)
        raise
    return io.BufferedReader(view, BUFFER)


def _not_found(index: TarIndex, member: str) -> str:
    if not is_image_name(member):
        return f"not an image member (tars are read by suffix: {' '.join(sorted(IMAGE_SUFFIXES))})"
    if index.damage is not None:
        return index.damage  # the member may have been beyond the damage
    return "no such member in the tar"


def tar_problem(tar: str) -> str:
    """Why the tar at `tar` given as an input yields a failure entry rather than its members."""
    try:
        index = load_index(tar)
    except TarError as exc:
        return exc.reason
    if index.damage is not None:
        return index.damage
    if not len(index):
        return "a tar with no image members"
    return "a tar archive, not an image (give it as an input to read its members)"
