"""Input discovery: command-line arguments (directories, globs, files, "-") to image paths.

Imports neither torch nor Pillow, so listing inputs stays cheap.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from dinoreg.errors import InputError

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
_GLOB_CHARS = frozenset("*?[")
_SHOWN_MISSES = 5
_NUL_REASON = "a path cannot contain a NUL byte"


def as_input_list(inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[str]:
    """One input or many, as strings."""
    if isinstance(inputs, (str, os.PathLike)):
        return [os.fspath(inputs)]
    return [os.fspath(i) for i in inputs]


@dataclass(frozen=True)
class Discovery:
    """What the inputs named: the image paths found, and the inputs that could not be used.

    `paths` are sorted and de-duplicated by real path, each spelled as given or as found under
    a directory. `missing` holds (input, reason) in the order met: a path that does not exist
    ("no such file"), a glob argument that matched no image file, a directory that could not be
    listed, a stdin line that cannot be a path. A run records each one as a failed input.
    """

    paths: list[str]
    missing: list[tuple[str, str]] = field(default_factory=list)


def find_inputs(inputs: Sequence[str], stdin: TextIO | None = None) -> Discovery:
    """Expand directories, globs, files and "-" (paths on stdin) into a `Discovery`.

    A stdin line is one literal path. An argument is a glob only when no file of that name
    exists. Raises InputError when no input exists at all (the message names what was tried).
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    found: list[tuple[str, str]] = []  # (path as given, real path used to de-duplicate)
    missing: list[tuple[str, str]] = []
    notes: list[str] = []  # for the "nothing found" message: arguments that gave nothing
    for arg, literal in _with_stdin(inputs, stdin, missing, notes):
        if os.path.isdir(arg):
            before, failed = len(found), len(missing)
            found.extend(_walk(arg, missing))
            if len(found) == before and len(missing) == failed:
                notes.append(f"{arg} (a directory with no image files)")
        elif os.path.lexists(arg):
            # Named explicitly: kept whatever its suffix or state; decoding gives the verdict.
            found.append((arg, os.path.realpath(arg)))
        elif not literal and any(ch in arg for ch in _GLOB_CHARS):
            before, failed = len(found), len(missing)
            for match in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(match):
                    found.extend(_walk(match, missing))
                elif _is_image_name(match):
                    found.append((match, os.path.realpath(match)))
            if len(found) == before and len(missing) == failed:
                missing.append((arg, "no such file or matching image file"))
        else:
            missing.append((arg, "no such file"))
    if not found:
        misses = [*(f"{name} ({reason})" for name, reason in missing), *notes]
        raise InputError(_nothing_found_message(misses))
    seen: set[str] = set()
    unique: list[str] = []
    for path, real in found:
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return Discovery(sorted(unique), _unique(missing))


def discover(inputs: Sequence[str], stdin: TextIO | None = None) -> list[str]:
    """`find_inputs` as one sorted list: the paths found plus the missing inputs, which the run
    then fails one by one when decoding them ("no such file").

    Prefer `find_inputs`, which keeps the missing inputs apart with their own reasons. Raises
    InputError for a stdin line holding a NUL byte: no file can have that name.
    """
    found = find_inputs(inputs, stdin)
    for name, reason in found.missing:
        if reason == _NUL_REASON:
            raise InputError(f"Cannot use input {name}: {reason}; give one path per line.")
    return sorted([*found.paths, *(name for name, _ in found.missing)])


def _unique(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    out = []
    for name, reason in pairs:
        if name not in seen:
            seen.add(name)
            out.append((name, reason))
    return out


def _with_stdin(
    inputs: Sequence[str], stdin: TextIO | None, missing: list[tuple[str, str]], notes: list[str]
) -> Iterator[tuple[str, bool]]:
    """(input, literal) pairs: arguments may be globs, stdin lines are literal paths."""
    read = False
    for arg in inputs:
        if arg != "-":
            if "\0" in arg:  # argv cannot hold one, but library callers can pass anything
                missing.append((_printable(arg), _NUL_REASON))
            else:
                yield arg, False
            continue
        if read:  # a second "-" would find the stream already drained
            continue
        read = True
        count = 0
        for number, path in enumerate(_stdin_lines(stdin), start=1):
            if not path.strip():
                continue
            count += 1
            if "\0" in path:
                missing.append((f"stdin line {number}: {_printable(path)}", _NUL_REASON))
            else:
                yield path, True
        if count == 0:
            notes.append("- (stdin held no paths)")


def _stdin_lines(stdin: TextIO | None) -> Iterator[str]:
    """Lines of `stdin` without their line ends. A byte stream is decoded as file names are
    (surrogateescape), so a name that is not UTF-8 survives and still opens."""
    stream = stdin if stdin is not None else sys.stdin
    raw = getattr(stream, "buffer", None)
    lines = (os.fsdecode(b) for b in raw) if raw is not None else iter(stream)
    for line in lines:
        yield line.rstrip("\r\n")


def _printable(name: str) -> str:
    # A NUL cannot be stored or shown as a path; show it escaped in reports instead.
    return name.replace("\0", "\\0")


def _walk(root: str, missing: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    """Image files under `root`, skipping hidden names; symlinked dirs followed once each.

    A folder that cannot be listed goes to `missing` with the reason (find(1) reports it too).
    """
    root_real = os.path.realpath(root)
    visited = {root_real}
    stack = [(root, root_real)]
    while stack:
        path, real = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            missing.append((path, f"cannot list directory ({exc.strerror or exc})"))
            continue
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
