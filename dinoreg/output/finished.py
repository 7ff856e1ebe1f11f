"""Finished outputs: what one records (for a resume that finds it complete), swapping a replaced
.npy directory into place, and removing only the files dinoreg wrote."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dinoreg._fs import fsync_dir, read_json
from dinoreg.errors import OutputError
from dinoreg.output import layout
from dinoreg.output.identity import INPUTS

# Names dinoreg writes in a directory besides its datasets' `.npy` files.
OWN_FILES = frozenset(
    {layout.PATHS, layout.FAILED, layout.META, layout.JOURNAL, layout.LOCK, INPUTS}
)


def finished_meta(path: Path, fmt: str) -> dict[str, Any]:
    """The metadata of a complete output."""
    if fmt == "npy":
        return read_json(path / layout.META)
    import h5py

    from dinoreg.output.hdf5 import decode_attrs

    try:
        with h5py.File(path, "r") as f:
            return decode_attrs(f.attrs)
    except OSError:
        raise OutputError(
            f"{path} is not a readable HDF5 file; pass overwrite=True to replace it.",
            params=("overwrite",),
        ) from None


def own_files(directory: Path, meta: Mapping[str, Any] | None) -> set[str]:
    """The names in `directory` that dinoreg wrote: the layout's files and the datasets'."""
    names = set(OWN_FILES)
    specs = (meta or {}).get("datasets")
    if isinstance(specs, list):
        for spec in specs:
            name = spec.get("name", "") if isinstance(spec, dict) else ""
            names.add(layout.dataset_file(name))
            if isinstance(spec, dict) and spec.get("ragged"):
                names.add(layout.dataset_file(name + "_offsets"))
    else:
        # An output from before datasets were recorded: its .npy files are its datasets.
        names.update(p.name for p in directory.iterdir() if p.suffix == ".npy")
    names.update([n + ".tmp" for n in names])
    return names


def _meta_or_none(directory: Path) -> dict[str, Any] | None:
    try:
        return read_json(directory / layout.META)
    except OutputError:
        return None


def foreign_files(directory: Path) -> list[str]:
    """Files in an output directory that dinoreg did not write, sorted."""
    if not directory.is_dir():
        return []
    own = own_files(directory, _meta_or_none(directory))
    return sorted(p.name for p in directory.iterdir() if p.name not in own)


def refuse_foreign(directory: Path) -> None:
    foreign = foreign_files(directory)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputError(
            f"{directory} holds files dinoreg did not write ({foreign[0]}{more}); move them "
            "or choose another out.",
            params=("out",),
        )


def remove_own(directory: Path, keep: Iterable[str] = ()) -> None:
    """Delete the files dinoreg wrote in `directory` (but `keep`); never anything else."""
    own = own_files(directory, _meta_or_none(directory)) - set(keep)
    for entry in directory.iterdir():
        if entry.name in own and not entry.is_dir():
            entry.unlink()
    fsync_dir(directory)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # ENOSYS, EINVAL: kernel or file system without RENAME_EXCHANGE
    raise OSError(err, os.strerror(err), str(a))


def swap_in(path: Path, staged: Path) -> None:
    """Put the finished directory `staged` at `path`, then delete what dinoreg wrote of the old.

    With RENAME_EXCHANGE readers see the old or the new output, never neither. Without it, two
    renames leave a moment with no `path`; a run killed there is finished by the next open
    (`state.locate` reports the staged directory as swap_pending).
    """
    if path.exists() and _exchange(staged, path):
        old = staged
    else:
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.rename(path, old)
        os.rename(staged, path)
    fsync_dir(path.parent)
    if old.exists():
        remove_own(old)
        with contextlib.suppress(OSError):  # something not ours was left in it: keep it
            old.rmdir()
        fsync_dir(path.parent)


def remove_stage(stage: Path) -> None:
    """Remove a finished HDF5 run's staging directory (all of it is ours)."""
    shutil.rmtree(stage, ignore_errors=True)


def clear_stage(stage: Path, output: Path) -> None:
    """Delete an old run's files from a staging dir, keeping the lock the caller holds."""
    if stage == output:  # an npy output in place: only what dinoreg wrote
        refuse_foreign(stage)
        remove_own(stage, keep=(layout.LOCK,))
        return
    for entry in stage.iterdir():
        if entry.name == layout.LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
