"""Committing batches on a thread of their own, so the model never waits on the disk."""

from __future__ import annotations

import queue
import threading

from dinoreg.output.writer import Writer


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

    def submit(self, paths, arrays, failures) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((paths, arrays, failures))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write_batch(*item)
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
