"""The output writer: modes (new, overwrite, resume), locking, provenance, and completion.

Every run appends to a crash-safe staging store (`store.py`); where it stages is `state.py`'s
business. A new `.npy` output stages in its own directory and completion rewrites the headers in
place; a new HDF5 output stages in `<name>.h5.partial/` and completion copies it block by block
into `<name>.h5.tmp`, which then replaces `<name>.h5`, so `<name>.h5` only ever appears complete.
Replacing a complete output (`overwrite`) stages beside it and swaps in only when complete.

`Writer` is not thread-safe: give it one thread. It creates its lock with O_CLOEXEC, but a
`fork()`ed child inherits the lock until it exits, so open the writer after forking workers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from dinoreg._fs import fsync_dir, read_json, write_json_atomic
from dinoreg.errors import OutputError
from dinoreg.output import layout
from dinoreg.output.checks import check_free_space, os_error
from dinoreg.output.finished import (
    clear_stage,
    finished_meta,
    refuse_foreign,
    remove_stage,
    swap_in,
)
from dinoreg.output.hdf5 import convert_to_h5
from dinoreg.output.identity import INPUTS, InputList, identity, read_inputs
from dinoreg.output.lock import acquire_lock
from dinoreg.output.meta import now, prepare_meta
from dinoreg.output.resume import check_finished_run, check_same_inputs, check_same_run
from dinoreg.output.spec import Mode, OutputSpec, check_state
from dinoreg.output.state import (
    Located,
    locate,
    partial_dir,
)
from dinoreg.output.store import Journal, StagingStore, crash_point

# What `Writer.open` did: started a new output, continued an incomplete one, or found the same
# run already complete (resume only; nothing is written then).
ModeUsed = Literal["created", "continued", "already-complete"]


class Writer:
    """Writes one output, batch by batch; see the module docstring. Use `Writer.open`."""

    def __init__(
        self,
        spec: OutputSpec,
        store: StagingStore | None,
        lock_fd: int,
        meta: dict[str, Any],
        committed: set[str],
        mode_used: ModeUsed,
        identities: Mapping[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self._store = store  # None: an already-complete output, nothing to write
        self._lock_fd = lock_fd
        self._meta = meta
        self._committed = committed
        # Committed inputs by identity; the recorded input list maps each spelling to its real
        # path as resolved when the run started (relative paths depended on its directory).
        ids = identities or {}
        self._committed_ids = {ids.get(p) or identity(p) for p in committed}
        self.mode_used: ModeUsed = mode_used
        self._closed = store is None
        self._finished = store is None
        self._finished_counts = (0, 0)

    @classmethod
    def open(
        cls,
        spec: OutputSpec,
        meta: Mapping[str, Any],
        mode: Mode,
        inputs: Sequence[str] | None = None,
    ) -> Writer:
        """Create (new, overwrite, or resume of a missing output), continue (resume of an
        incomplete one) or confirm (resume of a complete one with the same settings and inputs)
        the output, holding its lock while it is written.

        `inputs` (as given) are recorded by identity (`identity.py`); a resume must cover the same
        ones. Resuming an output whose completion was interrupted writes nothing and
        `close(complete=True)` redoes the completion from the journal.
        """
        doc = prepare_meta(meta)
        listed = InputList.of(inputs) if inputs is not None else None
        path = spec.path
        loc = locate(path, spec.format)
        check_state(path, mode, loc.state)  # refuse before creating anything
        if loc.swap_pending:
            fd = acquire_lock(loc.stage, path)
            try:
                if locate(path, spec.format).swap_pending:
                    swap_in(path, loc.stage)  # a replacement completed, killed before its swap
            finally:
                os.close(fd)
            loc = locate(path, spec.format)
        if mode == "resume" and loc.state == "complete":
            return cls._already_complete(spec, doc, listed, loc)
        if spec.format == "npy" and mode == "overwrite" and path.is_dir():
            refuse_foreign(path)  # checked before anything else touches it
        stage = loc.stage
        if loc.state == "complete" or (spec.format == "npy" and loc.replacing):
            stage = partial_dir(path)  # replace: the old output stays until the new is done
        made_dir = not stage.exists()
        try:
            stage.mkdir(parents=True, exist_ok=True)
            if made_dir:
                fsync_dir(stage.parent)
            lock_fd = acquire_lock(stage, path)
        except OSError as e:
            raise os_error(path, e, "create") from e
        try:
            # Re-check under the lock: another process may have finished or started meanwhile.
            now_at = locate(path, spec.format)
            check_state(path, mode, now_at.state)
            if spec.format == "h5":
                # A conversion killed half-way; the staging dir still has everything.
                path.with_name(path.name + ".tmp").unlink(missing_ok=True)
            if now_at.state == "incomplete" and now_at.stage == stage and mode == "resume":
                return cls._resume(spec, stage, lock_fd, doc, listed)
            if now_at.state == "complete" and mode == "resume":
                raise OutputError(f"{path} was completed meanwhile; run again.", params=())
            clear_stage(stage, path)
            doc = {**doc, "created": now(), "run_id": uuid.uuid4().hex, "complete": False}
            doc["datasets"] = [s.to_json() for s in spec.datasets]
            extra = {}
            if listed is not None:
                doc["inputs"] = listed.digest()
                extra[INPUTS] = listed.to_bytes()
            try:
                store = StagingStore.create(stage, spec.format, spec.datasets, doc, extra)
            except OSError as e:
                raise os_error(path, e, "create") from e
            return cls(spec, store, lock_fd, doc, set(), "created")
        except BaseException:
            if made_dir:
                remove_stage(stage)  # we made it: nothing in it is anyone else's
            os.close(lock_fd)
            raise

    @classmethod
    def _resume(
        cls,
        spec: OutputSpec,
        stage: Path,
        lock_fd: int,
        doc: dict[str, Any],
        listed: InputList | None,
    ) -> Writer:
        for name in (layout.JOURNAL, layout.META):
            (stage / (name + ".tmp")).unlink(missing_ok=True)  # killed mid-replace
        store = StagingStore(stage, Journal.load(stage))
        try:
            old = read_json(stage / layout.META)
            recorded = read_inputs(stage)
            check_same_run(spec.path, old, doc, store.journal.datasets, spec.datasets)
            if listed is not None and recorded is not None:
                check_same_inputs(spec.path, recorded, listed)
            keep = ("created", "run_id", "datasets", "inputs")
            doc = {**doc, **{k: old[k] for k in keep if k in old}, "complete": False}
            write_json_atomic(stage, layout.META, doc)
            lengths = store.journal.lengths
            committed = set(layout.iter_paths(stage, lengths[layout.PATHS]))
            failed = layout.iter_failures(stage, lengths[layout.FAILED])
            committed.update(path for path, _ in failed)
        except BaseException:
            store.close()
            raise
        ids = {g: i for i, g in recorded.pairs()} if recorded is not None else None
        return cls(spec, store, lock_fd, doc, committed, "continued", ids)

    @classmethod
    def _already_complete(
        cls, spec: OutputSpec, doc: dict[str, Any], listed: InputList | None, loc: Located
    ) -> Writer:
        if spec.format == "h5" and loc.stage.exists():
            # Stale: killed between the final rename and the clean-up. Remove it under its lock.
            fd = acquire_lock(loc.stage, spec.path)
            try:
                remove_stage(loc.stage)
            finally:
                os.close(fd)
        old = finished_meta(spec.path, spec.format)
        check_finished_run(spec.path, old, doc, spec.datasets, listed)
        from dinoreg.output.reader import inspect_output

        info = inspect_output(spec.path)
        writer = cls(spec, None, -1, old, set(), "already-complete")
        writer._finished_counts = (info.rows, len(info.failures))
        return writer

    @property
    def committed_inputs(self) -> AbstractSet[str]:
        """Inputs (as given) already committed as rows or failures."""
        return self._committed

    def pending(self, paths: Sequence[str]) -> list[str]:
        """The `paths` not committed yet, matched by identity (real path), in the given order."""
        if self.mode_used == "already-complete":
            return []
        return [p for p in paths if identity(p) not in self._committed_ids]

    @property
    def rows(self) -> int:
        return self._store.journal.rows if self._store is not None else self._finished_counts[0]

    @property
    def failures(self) -> int:
        if self._store is None:
            return self._finished_counts[1]
        return self._store.journal.failures

    @property
    def nonfinite_values(self) -> int:
        """Values the store dtype cast made inf or nan (float16 overflow), in the whole output."""
        if self._store is not None:
            return self._store.journal.nonfinite
        return int(self._meta.get("nonfinite_values", 0))

    @property
    def rows_at(self) -> Path:
        """Where the committed rows are now: the output once complete, else its staging dir."""
        if self._store is None or self._finished:
            return self.spec.path
        return self._store.directory

    @property
    def lock_fd(self) -> int:
        """The descriptor holding the output's lock. A forked child (a decode worker) should close
        its copy, or the lock outlives this process until the child exits."""
        return self._lock_fd

    def write_batch(
        self,
        paths: Sequence[str],
        arrays: Mapping[str, Any],
        failures: Sequence[tuple[str, str]] = (),
        made_nonfinite: int = 0,
    ) -> None:
        """Append and commit one batch; when this returns the batch survives any crash.

        `arrays[name]` is an array with leading dimension `len(paths)`, or for a ragged dataset a
        sequence of `len(paths)` arrays of shape `(k_i, *row_shape)`. Values are cast to the store
        dtype. `failures` are `(path, reason)` pairs for inputs that get no row; a batch may hold
        only failures (then `arrays` may be empty). `made_nonfinite`: values an earlier cast to
        the store dtype (on the device) made inf or nan, counted with the writer's own.
        """
        if self._closed or self._store is None:
            raise ValueError("write_batch on a closed Writer")
        new = [*paths, *(p for p, _ in failures)]
        if len(set(new)) != len(new) or any(p in self._committed for p in new):
            raise ValueError("write_batch: an input is written twice")
        if not new:
            return
        try:
            self._store.append(paths, arrays, failures, made_nonfinite)
        except OSError as e:
            raise OutputError(
                f"could not write {self.spec.path} ({e.strerror or e}); the batches committed "
                "so far are kept and resume=True continues.",
                params=("resume",),
            ) from e
        self._committed.update(new)
        self._committed_ids.update(identity(p) for p in new)

    def close(self, complete: bool) -> None:
        """Finish the output (complete=True) or leave it resumable (False). Idempotent."""
        if self._closed or self._store is None:
            return
        self._closed = True
        store, path = self._store, self.spec.path
        stage = store.directory
        try:
            if complete:
                doc = {**self._meta, "nonfinite_values": store.journal.nonfinite}
                doc["complete"] = True
                if self.spec.format == "npy":
                    store.finalize(doc)
                    # the digest in meta.json is what a later resume compares; the list was for
                    # resuming this run only
                    (stage / INPUTS).unlink(missing_ok=True)
                    if stage != path:
                        swap_in(path, stage)
                else:
                    store.truncate()
                    need = sum(store.journal.lengths.values()) + (1 << 20)
                    check_free_space(path.parent, need, f"convert {stage} into {path}")
                    convert_to_h5(store, path, doc)
                    crash_point("h5-replaced")
                    store.close()
                    # A leftover is harmless: the next open sees the complete .h5 and removes
                    # it. The lock goes with it while still held; `acquire_lock` copes.
                    remove_stage(stage)
                self._meta = doc
                self._finished = True
        except (OSError, RuntimeError) as e:
            # h5py reports a full disk as OSError or RuntimeError depending on where it hits.
            raise OutputError(
                f"could not finish {path} ({getattr(e, 'strerror', None) or e}); what was "
                "committed is kept and resume=True finishes it.",
                params=("resume",),
            ) from e
        finally:
            store.close()
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
