"""The output's lock: one writer at a time, released by the kernel even on kill -9."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from dinoreg.errors import OutputError
from dinoreg.output.layout import LOCK


def acquire_lock(directory: Path, output: Path) -> int:
    """Hold an exclusive flock on `directory/.lock`; the kernel drops it if we are killed."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise _locked(output, pid) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def probe_lock(directory: Path, output: Path) -> None:
    """Fail if another process holds the lock, without creating or writing anything."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        raise _locked(output, pid) from None
    finally:
        os.close(fd)


def _locked(output: Path, pid: str) -> OutputError:
    return OutputError(
        f"{output} is being written by another dinoreg process (pid {pid}); "
        "wait for it or choose another --out."
    )
