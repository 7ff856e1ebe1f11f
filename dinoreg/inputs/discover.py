"""Input discovery: command-line arguments (directories, globs, braces, files, tar shards, "-")
to image paths.

A tar shard named as an input (an argument, a glob or brace match, a stdin line) expands to one
input per image member, `shard.tar/key.jpg` (`tars.py`). Walking a directory does not open the
tars inside it: a walk picks image files by suffix, and a tar there may be a backup or the source
of images already unpacked beside it; reading it silently would change what a folder means.

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
from dinoreg.inputs import tars
from dinoreg.inputs.braces import expand_braces, has_braces
from dinoreg.inputs.names import IMAGE_SUFFIXES, is_image_name, is_tar_name

__all__ = ["IMAGE_SUFFIXES", "Discovery", "as_input_list", "discover", "find_inputs"]

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

    `paths` are sorted and de-duplicated by identity (real path; for a tar member, the tar's real
    path + "/" + member), each spelled as given or as found under a directory or in a tar.
    `missing` holds (input, reason) in the order met: a path that does not exist ("no such
    file"), a glob argument that matched no image file, a directory that could not be listed, a
    stdin line that cannot be a path, a tar that cannot be read or is damaged (its intact members
    are in `paths`). A run records each one as a failed input.
    """

    paths: list[str]
    missing: list[tuple[str, str]] = field(default_factory=list)


def find_inputs(inputs: Sequence[str], stdin: TextIO | None = None) -> Discovery:
    """Expand directories, globs, files and "-" (paths on stdin) into a `Discovery`.

    A stdin line is one literal path. An argument is brace-expanded and then a glob only when
    no file of that name exists. Raises InputError when no input exists at all (the message
    names what was tried).
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
        elif _is_tar(arg):
            found.extend(_tar_members(arg, missing, notes))
        elif os.path.lexists(arg):
            # Named explicitly: kept whatever its suffix or state; decoding gives the verdict.
            found.append((arg, os.path.realpath(arg)))
        elif (member := tars.split_member(arg)) is not None:
            # One member named explicitly (`shard.tar/key.jpg`): decoding gives the verdict.
            found.append((arg, tars.member_path(os.path.realpath(member[0]), member[1])))
        elif not literal and any(ch in arg for ch in _GLOB_CHARS):
            before, failed = len(found), len(missing)
            for match in sorted(glob.glob(arg, recursive=True)):
                if os.path.isdir(match):
                    found.extend(_walk(match, missing))
                elif _is_tar(match):  # as if the shell had expanded the glob
                    found.extend(_tar_members(match, missing, notes))
                elif is_image_name(match):
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
    """(input, literal) pairs: arguments may be braces and globs, stdin lines are literal paths."""
    read = False
    for arg in inputs:
        if arg != "-":
            if "\0" in arg:  # argv cannot hold one, but library callers can pass anything
                missing.append((_printable(arg), _NUL_REASON))
            elif has_braces(arg) and not os.path.lexists(arg):
                # A quoted `shards/{00000..00099}.tar`: expanded as the shell would have.
                yield from ((word, False) for word in expand_braces(arg))
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


def read_stdin_paths(stdin: TextIO | None = None) -> list[str]:
    """The non-empty lines of stdin as literal paths (query lists, for instance)."""
    return [line for line in _stdin_lines(stdin) if line.strip()]


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
            elif is_image_name(entry.name):
                # Dangling links are kept: the run lists them as failed inputs with the reason.
                yield entry.path, entry_real
        stack.extend(reversed(subdirs))


def _is_tar(path: str) -> bool:
    return is_tar_name(path) and os.path.isfile(path)


def _tar_members(
    tar: str, missing: list[tuple[str, str]], notes: list[str]
) -> Iterator[tuple[str, str]]:
    """(`tar/member`, identity) per image member; an unreadable or damaged tar goes to `missing`
    (a damaged one after its intact members), so the run lists it as failed with the reason."""
    try:
        index = tars.load_index(tar)
    except tars.TarError as exc:
        missing.append((tar, exc.reason))
        return
    real = os.path.realpath(tar)
    for name in index.member_names():
        yield tars.member_path(tar, name), tars.member_path(real, name)
    if index.damage is not None:
        missing.append((tar, index.damage))
    elif not len(index):
        notes.append(f"{tar} (a tar with no image members)")


def _nothing_found_message(misses: list[str]) -> str:
    if not misses:
        return (
            "No images found: no inputs were given; pass files, directories, globs or tar "
            "shards, or - to read paths from stdin."
        )
    shown = ", ".join(misses[:_SHOWN_MISSES])
    if len(misses) > _SHOWN_MISSES:
        shown += f", and {len(misses) - _SHOWN_MISSES} more"
    suffixes = " ".join(sorted(IMAGE_SUFFIXES))
    return (
        f"No images found in {shown}; check the paths (directories and globs pick files "
        f"ending in {suffixes}, in any case, and .tar files named or matched are read by "
        "member; name other files explicitly)."
    )
