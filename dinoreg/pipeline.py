"""Images through the model in batches: device and dtype choice, the DataLoader, the batch loop.

Shared by `embed` and `classify`. The library never prints: progress goes to a callback.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils.data

from dinoreg.buckets import BucketBatchSampler, Plan, plan
from dinoreg.errors import UsageError
from dinoreg.images import Batch, ImageDataset, Recipe, collate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ComputeOptions:
    """Where and how the model runs, and how images are fed to it."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    batch_size: int = 16
    workers: int | None = None  # None: chosen from the cores present
    compile: bool = False  # torch.compile the model's entry points (worth it on long GPU runs)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, got {self.workers}.")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UsageError(f"Unknown --dtype {self.dtype!r}; use auto, {', '.join(DTYPES)}.")


def as_input_list(inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[str]:
    """One input or many, as strings."""
    if isinstance(inputs, (str, os.PathLike)):
        return [os.fspath(inputs)]
    return [os.fspath(i) for i in inputs]


def choose_device(spec: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(
            f"Unknown --device {spec!r}; use auto, cpu, cuda, cuda:N or mps."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "--device cuda was asked for but CUDA is not available; use --device cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available; use --device cpu.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"Unsupported --device {spec!r}; use auto, cpu, cuda, cuda:N or mps.")
    return device


def choose_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA that supports it, else fp16 on CUDA, fp32 elsewhere."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[spec]


def default_workers(device: torch.device) -> int:
    """Decode workers: most cores on a GPU box; on CPU, leave most cores to the model."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if device.type == "cpu":
        return max(1, cores // 4)
    return max(1, min(8, cores - 1))


def compile_model(model: torch.nn.Module, options: ComputeOptions) -> torch.nn.Module:
    """With `options.compile`, route the model's entry points through torch.compile.

    The instance attributes shadow the methods, so callers keep calling `forward_features` etc.
    Each new input shape (a keep-aspect grid, a last short batch) compiles once more.
    """
    if not options.compile:
        return model
    for name in ("forward_features", "intermediate_layers", "logits"):
        setattr(model, name, torch.compile(getattr(model, name), dynamic=False))
    return model


def casts_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on CPU runs on bf16 weights rather than autocast: oneDNN then fuses bias and GELU
    into the matmuls and nothing is re-cast per batch (measured ~1.4x autocast's throughput,
    CLS cosine to fp32 >= 0.9999). GPUs use autocast."""
    return device.type == "cpu" and dtype == torch.bfloat16


def set_precision(model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """Put the model in the form `autocast` expects for this device and dtype.

    With bf16 weights the position table stays float32: it is resized in float32 and cast to
    the token dtype only when added. LayerNorm and softmax compute in float32 inside their kernels.
    """
    if casts_weights(device, dtype):
        pos = model.pos_embed.data
        model.to(dtype)
        model.pos_embed.data = pos
    return model


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for reduced dtypes (where weights are not cast); the model keeps norms,
    softmax and positions in float32."""
    if dtype == torch.float32 or casts_weights(device, dtype):
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def make_loader(
    paths: Sequence[str],
    recipe: Recipe,
    options: ComputeOptions,
    device: torch.device,
    batch_plan: Plan | None = None,
    close_in_workers: Sequence[int] = (),
) -> torch.utils.data.DataLoader:
    """A DataLoader over the paths in input order, decoding in worker processes.

    With a keep-aspect `batch_plan` (`dinoreg.buckets`) batches follow it instead: one patch
    grid each, every image resized to its planned size. `close_in_workers` are descriptors a
    forked worker must not keep open (the output's lock, which would outlive a killed run).
    """
    workers = options.workers if options.workers is not None else default_workers(device)
    chunk = chunk_size(options.batch_size, workers)
    if batch_plan is None:
        dataset = ImageDataset(paths, recipe)
        batching: dict = {"batch_size": chunk, "shuffle": False}
    else:
        dataset = ImageDataset(paths, recipe, sizes=batch_plan.sizes)
        batching = {"batch_sampler": BucketBatchSampler(batch_plan, options.batch_size, chunk)}
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=functools.partial(_close_fds, tuple(close_in_workers)),
        **batching,
    )


def chunk_size(batch_size: int, workers: int) -> int:
    """Images one decode worker prepares at a time. A DataLoader worker builds a whole batch, so
    with big batches and few inputs most workers would idle; workers deliver pieces of a batch
    instead, and the batch loop puts them back together."""
    if workers <= 1:
        return batch_size
    return max(1, min(batch_size, -(-batch_size // workers)))


def _close_fds(fds: tuple[int, ...], worker_id: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass
class StageTimes:
    """Seconds spent per stage of the batch loop (wall time in the main process)."""

    plan: float = 0.0  # keep-aspect header pre-pass
    wait_input: float = 0.0  # waiting on decode workers
    forward: float = 0.0  # host-to-device copy, the model, device-to-host copy
    write: float = 0.0  # handing results to the writer

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in vars(self).items()}


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
) -> Iterator[BatchResult]:
    """Decode, batch and run `compute(pixels_on_device)` for each batch, in input order.

    Keep-aspect recipes first read every header and batch by patch grid (`dinoreg.buckets`):
    batches then come grouped by grid, in (grid, input index) order.
    """
    times = times if times is not None else StageTimes()
    tick = time.perf_counter()
    batch_plan = plan(paths, recipe) if recipe.keep_aspect else None
    times.plan += time.perf_counter() - tick
    loader = make_loader(paths, recipe, options, device, batch_plan, close_in_workers)
    # the batches the pieces add up to: fixed-size runs, or the plan's one-grid batches
    if batch_plan is None:
        size = options.batch_size
        lengths = iter([size] * (len(paths) // size) + [len(paths) % size])
    else:
        lengths = iter([len(b) for b in batch_plan.batches(options.batch_size)])
    pending: list[tuple[Batch, torch.Tensor | None]] = []  # pieces of the next batch
    target, count = next(lengths, 0), 0
    tick = time.perf_counter()
    for piece in loader:
        piece: Batch
        times.wait_input += time.perf_counter() - tick
        # start the copy to the device now; it overlaps with waiting for the next piece
        on_device = None
        if piece.pixels is not None:
            on_device = piece.pixels.to(device, non_blocking=True)
        pending.append((piece, on_device))
        count += len(piece.indices) + len(piece.failures)
        if count >= target:
            yield from _flush(pending, paths, compute, times)
            pending, target, count = [], next(lengths, 0), 0
        tick = time.perf_counter()
    if pending:
        yield from _flush(pending, paths, compute, times)


def _flush(
    pending: list[tuple[Batch, torch.Tensor | None]],
    paths: Sequence[str],
    compute: Callable[[torch.Tensor], object],
    times: StageTimes,
) -> Iterator[BatchResult]:
    """Run one batch made of the pending pieces; yield its result."""
    now = time.perf_counter()
    good = [paths[i] for piece, _ in pending for i in piece.indices]
    failures = [(paths[i], reason) for piece, _ in pending for i, reason in piece.failures]
    tensors = [p for _, p in pending if p is not None]
    outputs = None
    if tensors:
        pixels = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        outputs = compute(pixels)
    times.forward += time.perf_counter() - now
    yield BatchResult(good, outputs, failures)
    _return_freed_memory()


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
