"""Timing, FLOP counting and the result records shared by the benchmark sections."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Options:
    """What `run.py` was asked for; each section reads the fields it needs."""

    quick: bool = False
    sizes: Sequence[str] = ("small", "base")
    batches: Sequence[int] = (1, 32)
    image_size: int = 224
    threads: int | None = None  # None: torch's default
    out: Path = Path("bench-out")  # results, and the generated photos' cache
    images: Path | None = None  # large JPEGs for `embed`; None: photos.large_photos(out)


@dataclass
class Section:
    """One section of the report: markdown blocks for people, `data` for the JSON file."""

    name: str
    title: str
    blocks: list[str] = field(default_factory=list)  # markdown tables and notes, in order
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Timing:
    """Wall seconds of repeated calls."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "best_s": self.best, "times_s": self.times}


def time_interleaved(
    calls: dict[str, Callable[[], object]], warmup: int, reps: int
) -> dict[str, Timing]:
    """Time each call `reps` times after `warmup` untimed runs, alternating the calls (order
    reversed on every other round) so that background load and thermal drift hit all alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(reps):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: Timing(t) for name, t in times.items()}


def environment() -> dict[str, Any]:
    """The machine and software a run measured, recorded next to the numbers."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def vit_flops(
    dim: int,
    depth: int,
    heads: int,
    ffn_hidden: int,
    h: int,
    w: int,
    *,
    patch: int = 14,
    registers: int = 4,
    swiglu: bool = False,
) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one image's forward, by part.

    Matmuls only: patch embedding, qkv, attention (QK^T and AV), output projection, FFN.
    LayerNorm, softmax, GELU, residuals and biases are left out (a few percent at these sizes).
    """
    del heads  # the attention FLOPs do not depend on how D is split into heads
    n = h * w
    t = 1 + registers + n
    ffn = (
        2 * t * dim * 2 * ffn_hidden + 2 * t * ffn_hidden * dim
        if swiglu
        else 4 * t * dim * ffn_hidden
    )
    parts = {
        "patch_embed": 2 * n * 3 * patch * patch * dim,
        "qkv": depth * 2 * t * dim * 3 * dim,
        "attention": depth * 2 * 2 * t * t * dim,
        "proj": depth * 2 * t * dim * dim,
        "ffn": depth * ffn,
    }
    parts["total"] = sum(parts.values())
    return parts


def matmul_peak(dtype_name: str, n: int = 2048, reps: int = 6) -> float:
    """Best GFLOP/s of an n x n x n torch.mm in this process (same threads as the model)."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
