"""Decode worker processes: how they start, what they close, and why they ignore Ctrl-C.

Ctrl-C and SIGTERM reach the whole process group; the main process turns them into an orderly
stop that shuts the workers down itself, so the workers must neither die of the signal first nor
print the hand-over they were in the middle of.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

import torch
import torch.utils.data


def init_worker(fds: tuple[int, ...], worker_id: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    # Ctrl-C and SIGTERM reach the whole process group; the main process turns them into an
    # orderly stop that shuts the workers down itself. A worker dying of the signal first would
    # make the DataLoader raise "worker killed by signal" from a destructor instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by start_workers
    sys.excepthook = _quiet_when_the_reader_left


def _quiet_when_the_reader_left(kind: type[BaseException], value, traceback) -> None:
    """A worker hands batches over by passing file descriptors from a helper thread
    (multiprocessing's resource sharer, which reports through `sys.excepthook`). When the main
    process stops mid-hand-over (Ctrl-C, SIGTERM), that thread sees its connection drop: the stop
    we asked for, not an error to print in the middle of the one-line summary. Anything else is
    reported as usual."""
    if issubclass(kind, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(kind, value, traceback)


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_workers(loader: torch.utils.data.DataLoader) -> Iterator:
    """The loader's iterator, its workers forked with Ctrl-C and SIGTERM held back.

    A signal landing between a fork and `init_worker` would run the parent's handler in the new
    worker (a KeyboardInterrupt inside the fork's own bookkeeping) and leave it half-started;
    held back, it reaches the worker only once ignored there, and the main process right after.
    """
    if loader.num_workers == 0:
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
