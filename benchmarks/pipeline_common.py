"""What the sections of `pipeline.py` share: its options, its report, and interleaved timing."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import photos


@dataclass(frozen=True)
class PipelineOptions:
    """What `pipeline.py` was asked for; each section reads the fields it needs."""

    out: Path = Path("bench-out")
    images: Path | None = None  # large JPEGs; None: generated from examples/images
    quick: bool = False
    workers: tuple[int, ...] = ()  # () : 0, 1, 2, 4, ... up to all cores
    batch_size: int = 32  # embed's CPU batch size in the README's runs
    model: str = "small"
    repeats: int = 3
    sections: tuple[str, ...] = ("stages", "loader", "handover", "forward", "profile")

    @property
    def reps(self) -> int:
        return 1 if self.quick else self.repeats


@dataclass
class Report:
    """Everything measured so far; rewritten to disk after every section."""

    options: dict[str, Any]
    environment: dict[str, Any]
    photos: dict[str, Any] = field(default_factory=dict)
    sections: dict[str, Any] = field(default_factory=dict)
    markdown: dict[str, str] = field(default_factory=dict)

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **asdict(self),
        }
        del payload["markdown"]
        (out / "pipeline.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        (out / "pipeline.md").write_text(self.render())

    def render(self) -> str:
        env = self.environment
        load = env.get("loadavg_start", [0.0])[0]
        lines = [
            "# dinoreg input pipeline",
            "",
            f"{env['cpu']} ({env.get('cpu_flags', '?')}), {env['cores']} cores, "
            f"torch {env['torch']}, Pillow {env['pillow']} "
            f"(libjpeg-turbo {env['libjpeg_turbo']}), numpy {env['numpy']}, Python "
            f"{env['python']}; 1-minute load average at the start {load:.2f} (other work on the "
            "machine makes every number noisier; ratios within one run hold better).",
            "",
            f"Options: {' '.join(f'{k}={v}' for k, v in self.options.items())}",
            "",
            photos.sets_line(self.photos.values()),
        ]
        for text in self.markdown.values():
            lines += ["", text]
        return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# timing helpers


@dataclass(frozen=True)
class Cost:
    """ms per image: wall time, and this process's CPU time (less hurt by other load)."""

    wall: float
    cpu: float


def interleaved_cost(
    calls: dict[str, tuple[Callable[[], object], int]], reps: int, warmup: int = 1
) -> dict[str, Cost]:
    """Median ms per image of each in-process call (fn, images it handles), wall and CPU, the
    calls alternated round by round (reversed every other round) so that load hits all alike."""
    for _ in range(warmup):  # page cache, lazy imports, allocator
        for fn, _count in calls.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(reps):
        for name in names if r % 2 == 0 else reversed(names):
            fn, count = calls[name]
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - w0) * 1e3 / count)
            cpu[name].append((time.process_time() - c0) * 1e3 / count)
    return {n: Cost(statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


def interleaved_ms(
    calls: dict[str, Callable[[], object]], count: int, reps: int, warmup: int = 1
) -> dict[str, float]:
    """Wall ms per image of each call (each handles `count` images; DataLoader runs, whose work
    is in other processes), median of interleaved repeats."""
    from benchmarks.common import time_interleaved

    timings = time_interleaved(calls, warmup=warmup, reps=reps)
    return {name: t.median * 1e3 / count for name, t in timings.items()}


def cycled(paths: Sequence[Path], count: int) -> list[str]:
    return [str(paths[i % len(paths)]) for i in range(count)]


def worker_counts(opts: PipelineOptions) -> list[int]:
    if opts.workers:
        return sorted(set(opts.workers))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts, n = {0, 1, cores or 1}, 2
    while n < (cores or 1):
        counts.add(n)
        n *= 2
    return sorted(counts)
