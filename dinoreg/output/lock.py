"""The output's lock: one writer at a time, released by the kernel even on kill -9.

On Linux the lock is an open-file-description (OFD) record lock on the whole `.lock` file. OFD
locks belong to the open file, like flock, so closing another descriptor of the same file does
not drop them (POSIX `lockf` locks would), and the kernel releases them when the last descriptor
goes, kill -9 included. Their point here is the query: `F_OFD_GETLK` reports a conflicting lock
without placing one, so `probe_lock` can never make a writer that starts at the same instant fail
(probing by briefly taking the lock, even a shared one, can). Where OFD locks are missing we fall
back to flock, and then probing takes a shared lock for a moment (documented race, not Linux).

The lock file is never unlinked while its lock is live, with one exception: a finished HDF5 run
removes its staging directory, lock included, just before releasing. An acquirer that opened the
old file in that window would lock an orphaned inode, so `acquire_lock` checks after locking that
the path still names the file it locked, and starts again otherwise.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

from dinoreg.errors import OutputError
from dinoreg.output.layout import LOCK

_OFD = hasattr(fcntl, "F_OFD_SETLK") and hasattr(fcntl, "F_OFD_GETLK")
# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = "hhqqi4x"


def _ofd(fd: int, cmd: int, kind: int) -> int:
    """Run an OFD lock command over the whole file; returns the l_type the kernel reports."""
    arg = struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return struct.unpack(_FLOCK, out)[0]


def _try_lock(fd: int) -> bool:
    try:
        if _OFD:
            _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_WRLCK)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def _is_locked(fd: int) -> bool:
    """Whether another open file holds the lock; takes no lock itself where OFD locks exist."""
    if _OFD:
        return _ofd(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK) != fcntl.F_UNLCK
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def acquire_lock(directory: Path, output: Path) -> int:
    """Hold an exclusive lock on `directory/.lock`; the kernel drops it if we are killed."""
    path = directory / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if not _try_lock(fd):
                raise _locked(output, _pid(fd))
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its holder had just removed: try the new one
        except BaseException:
            os.close(fd)
            raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(directory: Path) -> str | None:
    """The pid (as text, or "unknown") of another process holding the lock, or None if free.

    Creates nothing, writes nothing, and never takes the lock (see the module docstring).
    """
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    try:
        return _pid(fd) if _is_locked(fd) else None
    finally:
        os.close(fd)


def probe_lock(directory: Path, output: Path) -> None:
    """Fail if another process holds the lock, without creating, writing or locking anything."""
    pid = lock_holder(directory)
    if pid is not None:
        raise _locked(output, pid)


def _pid(fd: int) -> str:
    return os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"


def _locked(output: Path, pid: str) -> OutputError:
    return OutputError(
        f"{output} is being written by another dinoreg process (pid {pid}); "
        "wait for it or choose another out.",
        params=("out",),
    )
