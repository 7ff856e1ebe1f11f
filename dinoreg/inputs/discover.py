"""Input discovery: command-line arguments (directories, globs, files, "-") to image paths.

Imports neither torch nor Pillow, so listing inputs stays cheap.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TextIO

from dinoreg.errors import InputError

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
_GLOB_CHARS = frozenset("*?[")
_SHOWN_MISSES = 5


def as_input_list(inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[str]:
    """One input or many, as strings."""
    if isinstance(inputs, (str, os.PathLike)):
        return [os.fspath(inputs)]
    return [os.fspath(i) for i in inputs]


def discover(inputs: Sequence[str], stdin: TextIO | None = None) -> list[str]:
    """Expand directories, globs, files and "-" (paths on stdin) to a sorted, unique path list.

    Missing explicit files are kept so the run reports them; InputError if nothing exists at all.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    found: list[tuple[str, str]] = []  # (path as given, real path used to de-duplicate)
    missing: list[str] = []
    misses: list[str] = []
    for arg in _with_stdin(inputs, stdin, misses):
        if os.path.isdir(arg):
            before = len(found)
            found.extend(_walk(arg))
            if len(found) == before:
                misses.append(f"{arg} (a directory with no image files)")
        elif os.path.lexists(arg):
            # Named explicitly: kept whatever its suffix or state; decoding gives the verdict.
            found.append((arg, os.path.realpath(arg)))
        elif any(ch in arg for ch in _GLOB_CHARS):
            before = len(found)
            for match in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(match):
                    found.extend(_walk(match))
                elif _is_image_name(match):
                    found.append((match, os.path.realpath(match)))
            if len(found) == before:
                misses.append(f"{arg} (pattern matched no image files)")
        else:
            missing.append(arg)
            misses.append(f"{arg} (no such file or directory)")
    if not found:
        raise InputError(_nothing_found_message(misses))
    seen: set[str] = set()
    unique: list[str] = []
    for path, real in [*found, *((p, os.path.realpath(p)) for p in missing)]:
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return sorted(unique)


def _with_stdin(inputs: Sequence[str], stdin: TextIO | None, misses: list[str]) -> Iterator[str]:
    read = False
    for arg in inputs:
        if arg != "-":
            yield arg
            continue
        if read:  # a second "-" would find the stream already drained
            continue
        read = True
        count = 0
        for line in stdin if stdin is not None else sys.stdin:
            path = line.rstrip("\r\n")
            if path.strip():
                count += 1
                yield path
        if count == 0:
            misses.append("- (stdin held no paths)")


def _walk(root: str) -> Iterator[tuple[str, str]]:
    """Image files under `root`, skipping hidden names; symlinked dirs followed once each."""
    root_real = os.path.realpath(root)
    visited = {root_real}
    stack = [(root, root_real)]
    while stack:
        path, real = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue  # an unreadable folder below the one asked for is skipped, as find(1) does
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            link = entry.is_symlink()
            # Children of a real path are real unless they are links: no per-file realpath.
            entry_real = os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if entry_real not in visited:  # a link back up the tree would loop forever
                    visited.add(entry_real)
                    subdirs.append((entry.path, entry_real))
            elif _is_image_name(entry.name):
                # Dangling links are kept: the run lists them as failed inputs with the reason.
                yield entry.path, entry_real
        stack.extend(reversed(subdirs))


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def _nothing_found_message(misses: list[str]) -> str:
    if not misses:
        return (
            "No images found: no inputs were given; pass files, directories or globs, "
            "or - to read paths from stdin."
        )
    shown = ", ".join(misses[:_SHOWN_MISSES])
    if len(misses) > _SHOWN_MISSES:
        shown += f", and {len(misses) - _SHOWN_MISSES} more"
    suffixes = " ".join(sorted(IMAGE_SUFFIXES))
    return (
        f"No images found in {shown}; check the paths (directories and globs pick files "
        f"ending in {suffixes}, in any case; name other files explicitly)."
    )
