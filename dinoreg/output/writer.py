"""The output writer: modes (new, overwrite, resume), locking, provenance, and completion.

Every run appends to a crash-safe staging store (`staging.py`). For `format="npy"` the staging
directory is the output and completion rewrites the `.npy` headers in place. For `format="h5"`
rows are staged in `<name>.h5.partial/` and, on completion, copied block by block into
`<name>.h5.tmp`, which then replaces `<name>.h5`; an HDF5 file is never appended to during a
run, so a kill cannot corrupt it. `<name>.h5` only ever appears complete.

`Writer` is not thread-safe: give it one thread. It creates its lock with O_CLOEXEC, but a
`fork()`ed child inherits the lock until it exits, so open the writer after forking workers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from dinoreg._fs import fsync_dir, read_json, write_json_atomic
from dinoreg.errors import OutputError
from dinoreg.output import layout
from dinoreg.output.hdf5 import convert_to_h5
from dinoreg.output.layout import DatasetSpec
from dinoreg.output.lock import acquire_lock, probe_lock
from dinoreg.output.meta import RESUME_KEYS, now, prepare_meta, resume_differences
from dinoreg.output.store import Journal, StagingStore, crash_point

__all__ = [
    "RESUME_KEYS",
    "DatasetSpec",
    "OutputSpec",
    "Writer",
    "check_output",
    "infer_format",
    "output_state",
    "staging_dir",
]

Format = Literal["h5", "npy"]
Mode = Literal["new", "overwrite", "resume"]

# What overwrite may delete from an npy directory; anything else in it is left alone.
_OWN_SUFFIXES = (".npy", ".tmp")
_OWN_FILES = (layout.PATHS, layout.FAILED, layout.META, layout.JOURNAL)


@dataclass(frozen=True)
class OutputSpec:
    path: Path
    format: Format
    datasets: tuple[DatasetSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if self.format not in ("h5", "npy"):
            raise ValueError(f"format must be 'h5' or 'npy', not {self.format!r}")
        layout.validate_datasets(self.datasets)


def staging_dir(path: Path, fmt: Format) -> Path:
    return path if fmt == "npy" else path.with_name(path.name + ".partial")


def infer_format(path: str | os.PathLike[str], format_flag: str | None = None) -> Format:
    """`.h5`/`.hdf5` -> h5; a trailing slash, an existing directory or `--format npy` -> npy."""
    text = os.fspath(path)
    is_dir = text.endswith(os.sep) or Path(text).is_dir()
    if format_flag == "npy":
        return "npy"
    if format_flag == "h5" or (
        format_flag is None and Path(text).suffix.lower() in (".h5", ".hdf5")
    ):
        if is_dir:
            raise OutputError(f"{text} is a directory; give an HDF5 file path like feats.h5.")
        return "h5"
    if format_flag is not None:
        raise OutputError(f"unknown output format {format_flag!r}; use --format h5 or npy.")
    if is_dir:
        return "npy"
    raise OutputError(
        f"cannot tell the output format of {text}; name it like feats.h5 for HDF5, "
        "end it with / for a .npy directory, or pass --format npy."
    )


State = Literal["missing", "aborted", "damaged", "incomplete", "complete"]


def output_state(path: Path, fmt: Format) -> State:
    """Where an output stands, from the files alone (no writes).

    missing: nothing there (or an empty directory); aborted: a run died before its first commit
    point (nothing committed); damaged: an unreadable meta.json and no journal (only
    --overwrite helps); incomplete: a journal holds committed rows; complete: finished.
    """
    stage = staging_dir(path, fmt)
    if fmt == "h5":
        if path.is_dir():
            raise OutputError(f"{path} is a directory; give an HDF5 file path like feats.h5.")
        if path.exists():
            return "complete"  # only ever created complete; a staging dir beside it is stale
        if (stage / layout.JOURNAL).exists():
            return "incomplete"
        # meta.json is the first file a run writes; without it the directory holds nothing of
        # value (at most the lock of a run that died at once).
        return "aborted" if (stage / layout.META).exists() else "missing"
    if path.exists() and not path.is_dir():
        raise OutputError(
            f"{path} is a file; a .npy output needs a directory, choose another --out."
        )
    if (stage / layout.JOURNAL).exists():
        return "incomplete"
    meta = stage / layout.META
    if meta.exists():
        try:
            complete = read_json(meta).get("complete") is True
        except OutputError:
            return "damaged"
        return "complete" if complete else "aborted"
    if not path.exists() or not any(p.name != layout.LOCK for p in path.iterdir()):
        return "missing"
    raise OutputError(f"{path} is a directory that is not a dinoreg output; choose another --out.")


def check_output(
    target: OutputSpec | str | os.PathLike[str], mode: Mode, format_flag: str | None = None
) -> None:
    """Refuse early (before any model loads) what `Writer.open` would refuse. Writes nothing."""
    if isinstance(target, OutputSpec):
        path, fmt = target.path, target.format
    else:
        path, fmt = Path(target), infer_format(target, format_flag)
    _check_state(path, mode, output_state(path, fmt))
    probe_lock(staging_dir(path, fmt), path)


def _check_state(path: Path, mode: Mode, state: State) -> None:
    if mode not in ("new", "overwrite", "resume"):
        raise ValueError(f"mode must be new, overwrite or resume, not {mode!r}")
    if mode == "new" and state != "missing":
        raise OutputError(
            f"{path} already exists; pass --overwrite to replace it or --resume to continue it."
        )
    if mode == "resume" and state == "missing":
        raise OutputError(f"{path} does not exist; drop --resume to start it.")
    if mode == "resume" and state == "damaged":
        raise OutputError(f"{path} has a damaged meta.json; pass --overwrite to start again.")
    if mode == "resume" and state == "complete":
        raise OutputError(
            f"{path} is already complete; nothing to resume (pass --overwrite to redo it)."
        )


def _clear_stage(stage: Path, fmt: Format) -> None:
    """Delete an old run's files, keeping the lock we hold."""
    for entry in stage.iterdir():
        if entry.name == layout.LOCK:
            continue
        if fmt == "npy" and not (entry.name in _OWN_FILES or entry.suffix in _OWN_SUFFIXES):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class Writer:
    """Writes one output, batch by batch; see the module docstring. Use `Writer.open`."""

    def __init__(
        self,
        spec: OutputSpec,
        store: StagingStore,
        lock_fd: int,
        meta: dict[str, Any],
        committed: set[str],
    ) -> None:
        self.spec = spec
        self._store = store
        self._lock_fd = lock_fd
        self._meta = meta
        self._committed = committed
        self._closed = False

    @classmethod
    def open(cls, spec: OutputSpec, meta: Mapping[str, Any], mode: Mode) -> Writer:
        """Create (mode new/overwrite) or reopen (resume) the output and take its lock.

        Resuming an output whose completion was interrupted works too: open, write nothing, and
        `close(complete=True)` redoes the completion from the journal.
        """
        doc = prepare_meta(meta)
        stage = staging_dir(spec.path, spec.format)
        state = output_state(spec.path, spec.format)
        if not (spec.format == "h5" and state == "complete" and stage.exists()):
            # Refuse before creating anything, unless there is a stale staging dir to clean.
            _check_state(spec.path, mode, state)
        made_dir = not stage.exists()
        stage.mkdir(parents=True, exist_ok=True)
        if made_dir:
            fsync_dir(stage.parent)
        made_lock = not (stage / layout.LOCK).exists()
        lock_fd = acquire_lock(stage, spec.path)
        try:
            # Re-check under the lock: another process may have finished or started meanwhile.
            state = output_state(spec.path, spec.format)
            if spec.format == "h5" and state == "complete":
                _clear_stage(stage, "h5")  # stale: killed between replace and clean-up
            _check_state(spec.path, mode, state)
            if spec.format == "h5":
                # A conversion killed half-way; the staging dir still has everything.
                spec.path.with_name(spec.path.name + ".tmp").unlink(missing_ok=True)
            if state == "incomplete" and mode == "resume":
                return cls._resume(spec, stage, lock_fd, doc)
            if spec.format == "h5" and spec.path.exists():
                spec.path.unlink()  # overwrite: only now that we hold the lock
                fsync_dir(spec.path.parent)
            _clear_stage(stage, spec.format)
            doc = {**doc, "created": now(), "complete": False}
            store = StagingStore.create(stage, spec.format, spec.datasets, doc)
            return cls(spec, store, lock_fd, doc, set())
        except BaseException:
            if spec.format == "h5" and (made_dir or state == "complete"):
                shutil.rmtree(stage, ignore_errors=True)
            elif made_lock:
                (stage / layout.LOCK).unlink(missing_ok=True)
            os.close(lock_fd)
            raise

    @classmethod
    def _resume(cls, spec: OutputSpec, stage: Path, lock_fd: int, doc: dict[str, Any]) -> Writer:
        for name in (layout.JOURNAL, layout.META):
            (stage / (name + ".tmp")).unlink(missing_ok=True)  # killed mid-replace
        store = StagingStore(stage, Journal.load(stage))
        try:
            old = read_json(stage / layout.META)
            diffs = resume_differences(old, doc, store.journal.datasets, spec.datasets)
            if diffs:
                raise OutputError(
                    f"{spec.path} was started with different options ({'; '.join(diffs)}); "
                    "use the same options or pass --overwrite."
                )
            doc = {**doc, "created": old.get("created", now()), "complete": False}
            write_json_atomic(stage, layout.META, doc)
            lengths = store.journal.lengths
            committed = set(layout.iter_paths(stage, lengths[layout.PATHS]))
            failed = layout.iter_failures(stage, lengths[layout.FAILED])
            committed.update(path for path, _ in failed)
        except BaseException:
            store.close()
            raise
        return cls(spec, store, lock_fd, doc, committed)

    @property
    def committed_inputs(self) -> AbstractSet[str]:
        """Inputs (as given) already committed as rows or failures; a resumed run skips them."""
        return self._committed

    @property
    def rows(self) -> int:
        return self._store.journal.rows

    @property
    def lock_fd(self) -> int:
        """The descriptor holding the output's lock. A forked child (a decode worker) should close
        its copy, or the lock outlives this process until the child exits."""
        return self._lock_fd

    @property
    def failures(self) -> int:
        return self._store.journal.failures

    def write_batch(
        self,
        paths: Sequence[str],
        arrays: Mapping[str, Any],
        failures: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Append and commit one batch; when this returns the batch survives any crash.

        `arrays[name]` is an array with leading dimension `len(paths)`, or for a ragged dataset a
        sequence of `len(paths)` arrays of shape `(k_i, *row_shape)`. Values are cast to the store
        dtype. `failures` are `(path, reason)` pairs for inputs that get no row; a batch may hold
        only failures (then `arrays` may be empty).
        """
        if self._closed:
            raise ValueError("write_batch on a closed Writer")
        new = [*paths, *(p for p, _ in failures)]
        if len(set(new)) != len(new) or any(p in self._committed for p in new):
            raise ValueError("write_batch: an input is written twice")
        if not new:
            return
        try:
            self._store.append(paths, arrays, failures)
        except OSError as e:
            raise OutputError(
                f"could not write {self.spec.path} ({e.strerror or e}); the batches committed "
                "so far are kept and --resume continues."
            ) from e
        self._committed.update(new)

    def close(self, complete: bool) -> None:
        """Finish the output (complete=True) or leave it resumable (False). Idempotent."""
        if self._closed:
            return
        self._closed = True
        stage = self._store.directory
        finished = False
        try:
            if complete:
                doc = {**self._meta, "complete": True}
                if self.spec.format == "npy":
                    self._store.finalize(doc)
                else:
                    self._store.truncate()
                    convert_to_h5(self._store, self.spec.path, doc)
                    crash_point("h5-replaced")
                    self._store.close()
                    # A leftover is harmless: the next open sees the complete .h5 and removes it.
                    shutil.rmtree(stage, ignore_errors=True)
                finished = True
        except OSError as e:
            raise OutputError(
                f"could not finish {self.spec.path} ({e.strerror or e}); what was committed is "
                "kept and --resume finishes it."
            ) from e
        finally:
            self._store.close()
            if finished and self.spec.format == "npy":
                # The lock file has no job in a finished directory; we still hold it, so no other
                # writer can be mid-run on it.
                (stage / layout.LOCK).unlink(missing_ok=True)
            os.close(self._lock_fd)

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Completion is always explicit: an incomplete output can be resumed, a wrongly
        # completed one cannot.
        self.close(complete=False)
