"""Where an output stands, from the files alone: its format, state and staging directory.

A new run stages its rows in `<name>.h5.partial/` (HDF5) or in the output directory itself
(.npy). A run replacing a complete output (`overwrite`) stages beside it in `<name>.partial/`
for both formats, so the old output stays readable until the new one is complete and swapped in;
its `meta.json` has a `run_id` other than the finished output's, which is how a replacement in
progress is told from a staging directory left behind after completion.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dinoreg._fs import read_json
from dinoreg.errors import OutputError, UsageError
from dinoreg.output import layout

Format = Literal["h5", "npy"]
State = Literal["missing", "aborted", "damaged", "incomplete", "complete"]


def partial_dir(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def infer_format(path: str | os.PathLike[str], format_flag: str | None = None) -> Format:
    """`.h5`/`.hdf5` -> h5; a trailing slash, an existing directory or format="npy" -> npy."""
    text = os.fspath(path)
    is_dir = text.endswith(os.sep) or Path(text).is_dir()
    if format_flag == "npy":
        return "npy"
    if format_flag == "h5" or (
        format_flag is None and Path(text).suffix.lower() in (".h5", ".hdf5")
    ):
        if is_dir:
            raise UsageError(
                f"{text} is a directory; give an HDF5 file path like feats.h5 as out.",
                params=("out",),
            )
        return "h5"
    if format_flag is not None:
        raise UsageError(
            f"unknown output format {format_flag!r}; pass format='h5' or 'npy'.", params=("format",)
        )
    if is_dir:
        return "npy"
    raise UsageError(
        f"cannot tell the output format of {text}; name out like feats.h5 for HDF5, "
        "end it with / for a .npy directory, or pass format='npy'.",
        params=("out", "format"),
    )


@dataclass(frozen=True)
class Located:
    """An output's state and the staging directory that holds (or would hold) its rows.

    `replacing`: the staging directory is a run replacing a complete output, which stays in
    place (and readable) until that run completes. `swap_pending` (npy only): such a run
    completed but was killed before its directory was swapped in.
    """

    state: State
    stage: Path
    replacing: bool = False
    swap_pending: bool = False


def _run_id(path: Path, fmt: Format) -> object:
    try:
        if fmt == "npy":
            return read_json(path / layout.META).get("run_id")
        import h5py

        with h5py.File(path, "r") as f:
            return f.attrs.get("run_id")
    except (OSError, OutputError):
        return None


def locate(path: Path, fmt: Format) -> Located:
    """Where an output stands (no writes). States:

    missing: nothing there (or an empty directory); aborted: a run died before its first commit
    point (nothing committed); damaged: an unreadable meta.json and no journal (only overwrite
    helps); incomplete: a journal holds committed rows; complete: finished.
    """
    partial = partial_dir(path)
    if fmt == "h5":
        if path.is_dir():
            raise OutputError(
                f"{path} is a directory; give an HDF5 file path like feats.h5 as out.",
                params=("out",),
            )
        if path.exists():
            if (partial / layout.JOURNAL).exists():
                staged = _run_id(partial, "npy")
                if staged is not None and staged != _run_id(path, "h5"):
                    return Located("incomplete", partial, replacing=True)
            # only ever created complete; a staging dir beside it is stale
            return Located("complete", partial)
        if (partial / layout.JOURNAL).exists():
            return Located("incomplete", partial)
        # meta.json is the first file a run writes; without it the directory holds nothing of
        # value (at most the lock of a run that died at once).
        return Located("aborted" if (partial / layout.META).exists() else "missing", partial)
    if path.exists() and not path.is_dir():
        raise OutputError(
            f"{path} is a file; a .npy output needs a directory, choose another out.",
            params=("out",),
        )
    if (partial / layout.JOURNAL).exists():
        return Located("incomplete", partial, replacing=True)
    if (partial / layout.META).exists() and path.exists():
        try:
            done = read_json(partial / layout.META).get("complete") is True
        except OutputError:
            done = False
        if done:
            return Located("complete", partial, replacing=True, swap_pending=True)
    meta = path / layout.META
    if (path / layout.JOURNAL).exists():
        return Located("incomplete", path)
    if meta.exists():
        try:
            complete = read_json(meta).get("complete") is True
        except OutputError:
            return Located("damaged", path)
        return Located("complete" if complete else "aborted", path)
    if not path.exists() or not any(p.name != layout.LOCK for p in path.iterdir()):
        return Located("missing", path)
    raise OutputError(
        f"{path} is a directory that is not a dinoreg output; choose another out.", params=("out",)
    )


def output_state(path: Path, fmt: Format) -> State:
    return locate(path, fmt).state


def staging_dir(path: Path, fmt: Format) -> Path:
    """The directory holding (or about to hold) the rows of `path`."""
    return locate(path, fmt).stage
