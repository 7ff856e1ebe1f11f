"""Durable file writes: whole writes, fsync, atomic replace."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dinoreg.errors import OutputError


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(directory: Path, name: str, doc: Mapping[str, Any]) -> None:
    """Replace `directory/name` so a reader (or a crash) sees the old or new file, never half."""
    data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    tmp = directory / (name + ".tmp")
    write_new(tmp, data)
    os.replace(tmp, directory / name)
    fsync_dir(directory)


def read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise OutputError(
            f"{path} is missing or damaged; pass overwrite=True.", params=("overwrite",)
        ) from None
    if not isinstance(doc, dict):
        raise OutputError(f"{path} is damaged; pass overwrite=True.", params=("overwrite",))
    return doc


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pwrite_all(fd, memoryview(data), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> Path:
    """Write `path` whole or not at all: a half-written file never takes the final name.

    open(..., "xb") rather than mkstemp: the file gets the umask's permissions, not 0600.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crashed run that had our pid
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
