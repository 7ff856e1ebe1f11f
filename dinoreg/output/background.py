"""Committing batches on a thread of their own, so the model never waits on the disk."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dinoreg.output.writer import Writer

# Called on the writer's thread: waits for a batch's arrays (a copy from the device) and returns
# them with the values their cast to the store dtype made non-finite.
RowSource = Callable[[], tuple[Mapping[str, Any], int]]


class BackgroundWriter:
    """Commits batches on a thread of its own so the model never waits on the disk.

    At most two batches wait in the queue; leaving the block (normally or on Ctrl-C) commits
    everything submitted before returning, so a finished batch is never lost.
    """

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dinoreg-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self.thread.start()
        return self

    def submit(self, paths: Sequence[str], rows: RowSource, failures: Sequence) -> None:
        """Queue one batch; `rows()` runs on the writer's thread (`RowSource`)."""
        if self.error is not None:
            raise self.error
        self.queue.put((paths, rows, failures))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                paths, rows, failures = item
                try:
                    arrays, made = rows()
                    self.writer.write_batch(paths, arrays, failures, made_nonfinite=made)
                except BaseException as exc:  # re-raised in the main thread
                    self.error = exc

    def __exit__(self, *exc_info) -> None:
        while True:
            try:
                self.queue.put(None)
                self.thread.join()
                break
            except KeyboardInterrupt:
                continue  # a second Ctrl-C must not abandon committed work mid-flight
        if self.error is not None:
            raise self.error
