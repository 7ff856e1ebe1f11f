"""Keep-aspect batching: each input's size from its header, its planned size, and batches that
each hold one patch grid, in a deterministic order.

Images resized at their own aspect have their own patch grids, and a batch only stacks images of
one grid. A header pre-pass (Pillow opens a file without decoding it; a thread pool when it
waits on storage) reads each input's size and applies EXIF orientations 5-8 (a quarter turn
swaps width and height); the recipe then plans its target (W, H). Inputs are ordered by a stable
sort on (grid, input index) and cut into batches of one grid: every batch is full except the last
of each grid. Inputs whose header cannot be read come last, one per batch: they fail in decode
with the usual reason (one that decodes after all, say a file replaced meanwhile, is sized then).

The order depends only on each input's own size and index, so restricting it to a subset of the
inputs keeps their relative order. A resumed run plans the inputs not yet committed; as an
interrupted run commits whole batches in order, it continues with exactly the batches the
uninterrupted run would have made (same batch size), and ends with the same rows in the same order.
"""

from __future__ import annotations

import os
import stat
import struct
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dinoreg.inputs import tars
from dinoreg.inputs.decode import open_formats
from dinoreg.inputs.recipe import PATCH_SIZE, Recipe

ORIENTATION = 0x0112  # EXIF tag
QUARTER_TURNS = frozenset({5, 6, 7, 8})  # orientations that transpose the stored image
_CHUNK = 4096  # paths handed to the pool at a time, so pending futures stay few
_TASK = 64  # paths per pool task, and headers timed before choosing to use the pool
SLOW_HEADER_S = 250e-6  # seconds per header above which reading waits on storage


def header_size(path: str) -> tuple[int, int] | None:
    """(W, H) as displayed (EXIF orientation applied), from the header alone; None if unreadable.

    Like decoding, refuses anything but a non-empty regular file (opening a FIFO would block);
    a tar member (`shard.tar/key.jpg`) is read from its tar, as decoding reads it.
    """
    try:
        member = tars.split_member(path)
        if member is not None:
            with tars.open_member(*member) as handle:
                return _displayed_size(Image.open(handle, formats=open_formats()))
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return None
        return _displayed_size(Image.open(path, formats=open_formats()))
    except Exception:  # unreadable for any reason: decoding will name it
        return None


def _displayed_size(opened: Image.Image) -> tuple[int, int] | None:
    with opened as image:
        width, height = image.size
        if _orientation(image) in QUARTER_TURNS:
            width, height = height, width
    return (width, height) if width > 0 and height > 0 else None


def _orientation(image: Image.Image) -> int:
    # Decoding applies the EXIF orientation Pillow sees once the image is loaded; the plan must
    # read the same one, or the decoded image would be squashed into the unturned grid.
    if image.format == "PNG" and "exif" not in image.info:
        # Pillow reaches an eXIf chunk that follows the pixel data only by decoding them all;
        # walking the chunk headers finds it without decoding.
        return _late_png_orientation(image)
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # broken EXIF: decoding then uses the image as stored, and so do we
        return 1


def _late_png_orientation(image: Image.Image) -> int:
    """The orientation in an eXIf chunk anywhere in the PNG; 1 when there is none."""
    fp = image.fp
    if fp is None:
        return 1
    fp.seek(8)  # after the signature
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return 1
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return 1
        if kind == b"eXIf":
            exif = Image.Exif()
            try:
                exif.load(fp.read(length))
                return int(exif.get(ORIENTATION, 1))
            except Exception:  # broken EXIF: decoding ignores it too
                return 1
        fp.seek(length + 4, os.SEEK_CUR)  # data and CRC


def default_threads() -> int:
    return min(32, 4 * (os.cpu_count() or 1))


def read_sizes(
    paths: Sequence[str], threads: int | None = None, slow_s: float = SLOW_HEADER_S
) -> np.ndarray:
    """(N, 2) int32 displayed (W, H) per input; (0, 0) where the header cannot be read.

    Each block of inputs starts with a few headers read in this thread; if they take more than
    `slow_s` each, storage is the bottleneck and the rest of the block goes to a thread pool. On
    cached files threads only fight over the GIL (about 50 us per header alone, 150 us with 16
    threads on 2 cores), while on network storage they overlap the waits.
    """
    sizes = np.zeros((len(paths), 2), np.int32)
    open_formats()  # loads Pillow's plugins once, outside the timed probe
    pool: ThreadPoolExecutor | None = None
    try:
        with warnings.catch_warnings():
            # Decompression-bomb and damaged-metadata warnings: decoding reports what matters.
            warnings.simplefilter("ignore")
            for start in range(0, len(paths), _CHUNK):
                stop = min(len(paths), start + _CHUNK)
                probe = min(stop, start + _TASK)
                tick = time.perf_counter()
                found = _header_sizes(paths[start:probe])
                slow = (time.perf_counter() - tick) / (probe - start) > slow_s
                if slow and probe < stop and threads != 1:
                    if pool is None:
                        workers = threads or default_threads()
                        pool = ThreadPoolExecutor(workers, thread_name_prefix="dinoreg-header")
                    # A task per slice, not per path: a future costs about what a header does.
                    slices = [paths[i : min(stop, i + _TASK)] for i in range(probe, stop, _TASK)]
                    found += [size for part in pool.map(_header_sizes, slices) for size in part]
                else:
                    found += _header_sizes(paths[probe:stop])
                for i, size in enumerate(found, start):
                    if size is not None:
                        sizes[i] = size
    finally:
        if pool is not None:
            # No thread may outlive the pre-pass: DataLoader workers fork right after it.
            pool.shutdown(wait=True, cancel_futures=True)
    return sizes


def _header_sizes(paths: Sequence[str]) -> list[tuple[int, int] | None]:
    return [header_size(p) for p in paths]


@dataclass(frozen=True)
class Plan:
    """Planned sizes and the batch order of a keep-aspect run."""

    sizes: np.ndarray  # (N, 2) int32 planned (W, H) per input; (0, 0) when the header failed
    order: np.ndarray  # (N,) int64 input indices, sorted by (grid, index), unreadable last
    starts: np.ndarray  # (B + 1,) int64 bucket boundaries in `order`
    unsized: bool  # the last bucket holds the inputs whose header could not be read

    @property
    def grids(self) -> np.ndarray:
        """(N, 2) int32 patch grid (h, w) per input; (0, 0) when unplanned."""
        return self.sizes[:, ::-1] // PATCH_SIZE

    def buckets(self) -> Iterator[np.ndarray]:
        """Input indices of each bucket, in batch order."""
        for lo, hi in zip(self.starts[:-1], self.starts[1:], strict=True):
            yield self.order[lo:hi]

    def _steps(self, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
        last = len(self.starts) - 2
        for b, bucket in enumerate(self.buckets()):
            yield bucket, 1 if self.unsized and b == last else batch_size

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        """Lists of input indices, one grid each: full but for the last of each bucket."""
        for bucket, step in self._steps(batch_size):
            for start in range(0, len(bucket), step):
                yield bucket[start : start + step].tolist()

    def num_batches(self, batch_size: int) -> int:
        return sum(-(-len(bucket) // step) for bucket, step in self._steps(batch_size))


def plan_sizes(sizes: np.ndarray, recipe: Recipe) -> Plan:
    """The plan for inputs of displayed `sizes` (from `read_sizes`) under a keep-aspect recipe."""
    if not recipe.keep_aspect:
        raise ValueError("plan_sizes needs a keep-aspect recipe")
    sizes = np.asarray(sizes, np.int32).reshape(-1, 2)
    # Photos share a handful of sizes: plan each distinct one once, with no per-input objects.
    distinct, inverse = np.unique(sizes, axis=0, return_inverse=True)
    targets = np.zeros_like(distinct)
    for k, (w, h) in enumerate(distinct.tolist()):
        if w > 0 and h > 0:
            targets[k] = recipe.target_size(w, h)
    planned = targets[inverse.reshape(-1)]
    n = len(planned)
    unknown = (planned[:, 0] == 0).astype(np.int8)
    rows, cols = planned[:, 1] // PATCH_SIZE, planned[:, 0] // PATCH_SIZE
    order = np.lexsort((np.arange(n), cols, rows, unknown)).astype(np.int64)
    keys = np.stack([unknown[order], rows[order], cols[order]], axis=1)
    change = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
    starts = np.concatenate([[0], change, [n]]).astype(np.int64) if n else np.zeros(1, np.int64)
    return Plan(planned, order, starts, bool(unknown.any()))


def plan(paths: Sequence[str], recipe: Recipe, threads: int | None = None) -> Plan:
    """Read every header (threaded) and plan the keep-aspect batches of `paths`."""
    return plan_sizes(read_sizes(paths, threads), recipe)
