"""Can an output be written where it is asked for? Cheap checks made before any model loads, so
an unwritable destination is one line, not a traceback an hour into a run."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dinoreg.errors import OutputError

# The longest sibling name a run creates: `<name>.partial` (the `.h5.tmp` file is shorter).
_LONGEST_SUFFIX = ".partial"
# Refuse to start with less free space than this: a run could not commit even a few batches.
MIN_FREE_BYTES = 16 << 20


def _existing_parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_destination(path: Path) -> None:
    """OutputError if `path` (or its `.partial` sibling) cannot be created and written."""
    parent = _existing_parent(path)
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise OutputError(
            f"the folder for {path} ({parent}) {what}; create it or choose another out.",
            params=("out",),
        )
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    longest = len(os.fsencode(path.name + _LONGEST_SUFFIX))
    if longest > name_max:
        raise OutputError(
            f"the name {path.name[:40]}... is too long: a run also writes {path.name}"
            f"{_LONGEST_SUFFIX}, {longest} bytes where this file system allows {name_max}; "
            "choose a shorter out.",
            params=("out",),
        )
    st = os.statvfs(parent)
    if st.f_flag & os.ST_RDONLY:
        raise OutputError(
            f"{parent} is on a read-only file system; choose another out.", params=("out",)
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"no permission to write in {parent}; choose another out.", params=("out",)
        )
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        raise OutputError(
            f"{parent} has only {free >> 20} MiB free; free some space or choose another out.",
            params=("out",),
        )


def check_free_space(directory: Path, need: int, what: str) -> None:
    """OutputError (one line, nothing written) if `directory` has less than `need` bytes free."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise OutputError(
            f"not enough space to {what}: it needs about {need >> 20} MiB and {directory} has "
            f"{free >> 20} MiB free; free some space and pass resume=True to finish it.",
            params=("resume",),
        )


def os_error(path: Path, e: OSError, doing: str) -> OutputError:
    """An OSError met while creating or writing an output, as one line naming the cause."""
    reasons = {
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.ENAMETOOLONG: "the name is too long",
    }
    reason = reasons.get(e.errno or 0, e.strerror or str(e))
    return OutputError(f"could not {doing} {path} ({reason}).", params=("out",))
