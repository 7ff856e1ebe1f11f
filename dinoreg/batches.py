"""Images through the model in batches: the DataLoader, exact batches, the batch loop.

Shared by `embed` and `classify`. The library never prints: progress goes to a callback.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.data

from dinoreg.inputs.buckets import Plan, plan
from dinoreg.inputs.calibrate import measure_decode
from dinoreg.inputs.dataset import Batch, ImageDataset, collate
from dinoreg.inputs.gpu_decode import TensorDecoder, choose_decoder, finish_encoded
from dinoreg.inputs.normalise import normalise_batch
from dinoreg.inputs.recipe import Recipe
from dinoreg.runtime import ComputeOptions
from dinoreg.workers import init_worker, start_workers


def default_workers(device: torch.device) -> int:
    """Decode workers: most cores on a GPU box; on CPU, leave most cores to the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device.type == "cpu":
        return max(1, cores // 4)
    return max(1, min(8, cores - 1))


def make_loader(
    paths: Sequence[str],
    recipe: Recipe,
    options: ComputeOptions,
    device: torch.device,
    batch_plan: Plan | None = None,
    close_in_workers: Sequence[int] = (),
    encoded: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over the paths in input order, decoding in worker processes (`encoded`:
    JPEGs the device can decode are only read, `dinoreg.inputs.gpu_decode`).

    With a keep-aspect `batch_plan` (`dinoreg.buckets`) batches follow it instead: one patch
    grid each, every image resized to its planned size. `close_in_workers` are descriptors a
    forked worker must not keep open (the output's lock, which would outlive a killed run).
    """
    workers = options.workers if options.workers is not None else default_workers(device)
    sizes = batch_plan.sizes if batch_plan is not None else None
    dataset = ImageDataset(paths, recipe, sizes=sizes, encoded=encoded)
    chunk = chunk_size(options.batch_size, workers)
    sampler = PieceSampler(len(paths), options.batch_size, chunk, batch_plan)
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=functools.partial(init_worker, tuple(close_in_workers)),
        batch_sampler=sampler,
    )


def chunk_size(batch_size: int, workers: int) -> int:
    """Images one decode worker prepares at a time. A DataLoader worker builds a whole batch, so
    with big batches and few inputs most workers would idle; workers deliver pieces of a batch
    instead, and the batch loop puts them back together."""
    if workers <= 1:
        return batch_size
    return max(1, min(batch_size, -(-batch_size // workers)))


def batch_indices(
    count: int, batch_size: int, batch_plan: Plan | None = None
) -> Iterator[list[int]]:
    """Input indices of each batch: `batch_size` inputs in input order (the last one shorter),
    or the keep-aspect plan's one-grid batches (full but for the last of each grid)."""
    if batch_plan is not None:
        yield from batch_plan.batches(batch_size)
        return
    for start in range(0, count, batch_size):
        yield list(range(start, min(count, start + batch_size)))


class PieceSampler:
    """A DataLoader `batch_sampler`: each batch of `batch_indices` handed out in pieces of at
    most `chunk` inputs, so several decode workers share one batch.

    Pieces never straddle two batches: the batch loop joins a batch's pieces back together, and
    a piece that spilled into the next batch would make the model see more than `batch_size`.
    """

    def __init__(
        self, count: int, batch_size: int, chunk: int | None = None, batch_plan: Plan | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.count = count
        self.batch_size = batch_size
        self.chunk = max(1, min(chunk or batch_size, batch_size))
        self.plan = batch_plan  # keep-aspect: one grid per batch, in the plan's order

    def batches(self) -> Iterator[list[int]]:
        return batch_indices(self.count, self.batch_size, self.plan)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches():
            for start in range(0, len(batch), self.chunk):
                yield batch[start : start + self.chunk]

    def __len__(self) -> int:
        return sum(-(-len(b) // self.chunk) for b in self.batches())


@dataclass
class StageTimes:
    """Seconds spent per stage of the batch loop (wall time in the main process)."""

    plan: float = 0.0  # keep-aspect header pre-pass
    wait_input: float = 0.0  # waiting on decode workers
    forward: float = 0.0  # host-to-device copy, the model, device-to-host copy
    write: float = 0.0  # handing results to the writer
    decode: str = "cpu"  # where JPEGs were decoded: "cpu" (the workers) or "device"
    decode_choice: str = ""  # with decode="auto" on a device that decodes: what was measured

    def as_dict(self) -> dict[str, float | str]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(self).items()}


@dataclass
class BatchResult:
    """One batch: the inputs that produced rows (in order), the outputs, and the failures."""

    paths: list[str]
    outputs: object  # whatever `compute` returned, already on the CPU
    failures: list[tuple[str, str]] = field(default_factory=list)


def run_batches(
    paths: Sequence[str],
    recipe: Recipe,
    options: ComputeOptions,
    compute: Callable[[torch.Tensor], object],
    device: torch.device,
    times: StageTimes | None = None,
    close_in_workers: Sequence[int] = (),
    *,
    _tensor_decoder: TensorDecoder | None = None,
) -> Iterator[BatchResult]:
    """Decode, batch and run `compute(pixels_on_device)` for each batch, in input order.

    Workers hand over uint8 crops; they are copied to the device as they arrive and normalised
    there (`dinoreg.inputs.normalise`), so `compute` gets (B, 3, H, W) float32 as always.

    A batch is `options.batch_size` inputs, whatever the number of workers; the last batch (and,
    with keep-aspect, the last of each grid) may be shorter. An input that fails to decode still
    counts toward its batch but yields no row, so `compute` sees at most `batch_size` images, and
    exactly that many when none failed. Counting inputs rather than rows keeps batch boundaries
    independent of which files fail, which a resumed run relies on to continue batch for batch.

    Keep-aspect recipes first read every header and batch by patch grid (`dinoreg.buckets`):
    batches then come grouped by grid, in (grid, input index) order.

    With JPEGs decoded on the device (`options.decode`, `choose_decoder`) workers hand those
    over as bytes and each batch decodes them before normalising; rows, batches and failures
    stay as on the CPU path. `_tensor_decoder` forces that path with the given decoder on any
    device (tests run it on CPU tensors).
    """
    decoder = _tensor_decoder or choose_decoder(options.decode, device, recipe, paths)
    times = times if times is not None else StageTimes()
    if decoder is not None and options.decode == "auto":
        workers = options.workers if options.workers is not None else default_workers(device)
        measured = measure_decode(paths, recipe, decoder, device, compute, workers)
        if measured is not None:
            times.decode_choice = measured.describe()
        if measured is None or not measured.prefers_device():
            decoder = None
    times.decode = "cpu" if decoder is None else "device"
    tick = time.perf_counter()
    batch_plan = plan(paths, recipe) if recipe.keep_aspect else None
    times.plan += time.perf_counter() - tick
    loader = make_loader(
        paths, recipe, options, device, batch_plan, close_in_workers, encoded=decoder is not None
    )
    finish = functools.partial(_decode_rows, loader.dataset, recipe, device, decoder)
    # The pieces arrive in sampler order and each lies inside one batch, so a batch is complete
    # once its pieces hold exactly its number of inputs (failed ones included).
    lengths = (len(b) for b in batch_indices(len(paths), options.batch_size, batch_plan))
    pending: list[tuple[Batch, torch.Tensor | None]] = []  # pieces of the next batch
    target, count = next(lengths, 0), 0
    tick = time.perf_counter()
    for piece in start_workers(loader):
        piece: Batch
        times.wait_input += time.perf_counter() - tick
        # start the copy to the device now; it overlaps with waiting for the next piece
        on_device = None
        if piece.pixels is not None:
            on_device = piece.pixels.to(device, non_blocking=True)
        pending.append((piece, on_device))
        count += len(piece.indices) + len(piece.failures) + len(piece.encoded)
        if count >= target:
            if count > target:  # the sampler's contract is broken: never run an oversized batch
                raise RuntimeError(f"batch loop: pieces hold {count} inputs, batch has {target}")
            yield from _flush(pending, paths, recipe, compute, times, finish)
            pending, target, count = [], next(lengths, 0), 0
        tick = time.perf_counter()
    if pending:
        yield from _flush(pending, paths, recipe, compute, times, finish)


def _flush(
    pending: list[tuple[Batch, torch.Tensor | None]],
    paths: Sequence[str],
    recipe: Recipe,
    compute: Callable[[torch.Tensor], object],
    times: StageTimes,
    finish: Callable[[list[tuple[Batch, torch.Tensor | None]]], tuple] | None = None,
) -> Iterator[BatchResult]:
    """Run one batch made of the pending pieces; yield its result."""
    now = time.perf_counter()
    if finish is not None and any(piece.encoded for piece, _ in pending):
        indices, pixels, failed = finish(pending)
        good = [paths[i] for i in indices]
        failures = [(paths[i], reason) for i, reason in failed]
    else:  # the CPU path: every image decoded by the workers
        good = [paths[i] for piece, _ in pending for i in piece.indices]
        failures = [(paths[i], reason) for piece, _ in pending for i, reason in piece.failures]
        tensors = [p for _, p in pending if p is not None]
        pixels = None
        if tensors:
            pixels = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    outputs = None
    if pixels is not None:
        outputs = compute(normalise_batch(pixels, recipe))
    times.forward += time.perf_counter() - now
    yield BatchResult(good, outputs, failures)
    _return_freed_memory()


def _decode_rows(
    dataset: ImageDataset,
    recipe: Recipe,
    device: torch.device,
    decoder: TensorDecoder,
    pending: list[tuple[Batch, torch.Tensor | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """A batch whose pieces hold undecoded JPEGs: decode them on the device and put every row
    back in sampler order. Returns (row indices, (B, H, W, 3) uint8 on the device, failures)."""
    rows: dict[int, torch.Tensor] = {}
    failures: dict[int, str] = {}
    for piece, on_device in pending:
        if on_device is not None:
            rows.update(zip(piece.indices, on_device, strict=True))
        failures.update(piece.failures)
    items = [item for piece, _ in pending for item in piece.encoded]
    images = finish_encoded(items, device, recipe, decoder)
    for item, image in zip(items, images, strict=True):
        if image is None:
            # The device refused it (or decoded another size): decode it here as the workers
            # would have, so it becomes a row, or fails in the CPU path's words. Rare, so the
            # loop may pay for it.
            sample = dataset.decoded(item.index)
            if sample.pixels is None:
                failures[item.index] = sample.error or "unknown error"
                continue
            image = sample.pixels.to(device)
        rows[item.index] = image
    order = [i for piece, _ in pending for i in piece.order]
    good = [i for i in order if i in rows]
    pixels = torch.stack([rows[i] for i in good]) if good else None
    return good, pixels, [(i, failures[i]) for i in order if i in failures]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the OS after each batch.

    Batches allocate and free the same large buffers from two threads (the loop and the writer);
    glibc keeps the freed space in fragmented heaps, and the main process grew from 0.45 to
    0.9-1.3 GB over 4000 images (measured; a different amount each run). Trimming after each
    batch keeps it flat at 0.44-0.45 GB, at the cost of one cheap call per batch.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
