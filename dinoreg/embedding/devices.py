"""One run on several devices: one process per device, each embedding its shard, then a merge.

Each process runs the ordinary single-device run on shard I of N of the same input list, into a
shard output under `<out>.devices/`, so resume and kill -9 safety hold per device: a killed run,
started again with resume, has each device continue its own shard. Once every shard is complete
they are merged into `out` (the same file, format and row order a single device writes) and the
shard directory is removed. Processes are spawned, not forked: CUDA cannot be used in a forked
child, and a fresh interpreter per device keeps the threads of each apart.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import queue
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinoreg.embedding.results import Interrupted, Progress, RunSummary
from dinoreg.embedding.shards import Shard, shard_path
from dinoreg.errors import DinoregError, OutputError
from dinoreg.inputs.recipe import Recipe
from dinoreg.output.shards import merge
from dinoreg.output.state import locate
from dinoreg.runtime import ComputeOptions


@dataclass(frozen=True)
class DeviceJob:
    """What one device's process runs."""

    shard: Shard
    device: str
    threads: int  # torch threads (CPU devices share the cores)
    workers: int | None  # decode workers of this device


def work_dir(out: Path) -> Path:
    """Where the per-device shards live until they are merged."""
    return out.with_name(out.name + ".devices")


def plan_jobs(devices: Sequence[str], compute: ComputeOptions) -> list[DeviceJob]:
    """One job per device; cores and decode workers shared out among them."""
    n = len(devices)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // n)
    workers = None if compute.workers is None else max(0, compute.workers // n)
    return [DeviceJob(Shard(i, n), d, threads, workers) for i, d in enumerate(devices)]


def run_on_devices(
    paths: list[str],
    out: Path,
    fmt: str,
    model_name: str,
    recipe: Recipe,
    compute: ComputeOptions,
    output: Any,
    devices: Sequence[str],
    progress: Callable | None = None,
) -> Any:
    """Embed `paths` into `out` with one process per device; returns the combined RunSummary."""
    start = time.perf_counter()
    work = work_dir(out)
    if output.mode == "resume" and locate(out, fmt).state == "complete" and not work.exists():
        done = RunSummary(out=out, inputs=len(paths), resumed=len(paths), rows=0)
        done.mode_used, done.complete, done.rows_at = "already-complete", True, out
        return done
    if output.mode == "new" and work.exists():
        raise OutputError(
            f"an interrupted run on several devices left {work}; pass resume=True to continue "
            "it, or overwrite=True to start again.",
            params=("resume", "overwrite"),
        )
    if output.mode == "overwrite" and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    base = work / ("part.h5" if fmt == "h5" else "part")
    jobs = plan_jobs(devices, compute)
    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = [
        ctx.Process(
            target=_device_main,
            args=(job, paths, str(base), fmt, model_name, recipe, compute, output, messages),
            name=f"dinoreg-{job.device}",
        )
        for job in jobs
    ]
    for p in procs:
        p.start()
    results, interrupted, error = _collect(procs, messages, len(paths), progress)
    summary = RunSummary(out=out, inputs=len(paths), resumed=0, rows=0)
    for r in results.values():
        summary.rows += r["rows"]
        summary.resumed += r["resumed"]
        summary.failures.extend(map(tuple, r["failures"]))
        summary.failures_before += r["failures_before"]
        summary.nonfinite_values += r["nonfinite_values"]
        if r["mode_used"] == "continued":
            summary.mode_used = "continued"
    summary.times = combined_times([r["times"] for r in results.values()])
    summary.seconds = time.perf_counter() - start
    if error is not None:
        raise error
    if interrupted:
        summary.rows_at = work
        raise Interrupted(summary)
    shards = [shard_path(base, job.shard) for job in jobs]
    merge(shards, out, fmt, overwrite=output.mode == "overwrite")
    shutil.rmtree(work)
    summary.complete, summary.rows_at = True, out
    summary.bytes = out.stat().st_size if out.is_file() else _dir_size(out)
    return summary


def _collect(procs, messages, total: int, progress) -> tuple[dict, bool, Exception | None]:
    """Wait for every process, relaying one combined progress; (results, interrupted, error)."""
    done_by: dict[int, int] = {}
    rows_by: dict[int, int] = {}
    results: dict[int, dict] = {}
    interrupted, error = False, None
    while True:
        try:
            kind, index, *rest = messages.get(timeout=0.2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
            continue
        except KeyboardInterrupt:
            interrupted = True  # the processes got the same Ctrl-C: they commit and report
            continue
        if kind == "progress":
            done, rows, failures = rest
            done_by[index], rows_by[index] = done, rows
            if progress is not None:
                progress(Progress(sum(done_by.values()), total, sum(rows_by.values()), failures))
        elif kind == "done":
            results[index] = rest[0]
        elif kind == "interrupted":
            results[index] = rest[0]
            interrupted = True
        elif kind == "error" and error is None:
            cls, message, params = rest
            error = cls(message, params=tuple(params))
            for p in procs:  # the others stop as after Ctrl-C: what they committed stays
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGINT)
    for p in procs:
        p.join()
    if error is None and not interrupted and len(results) < len(procs):
        codes = ", ".join(f"{p.name} exit {p.exitcode}" for p in procs if p.exitcode)
        error = OutputError(
            f"a device process died ({codes}); what it committed is kept and resume=True "
            "continues.",
            params=("resume",),
        )
    return results, interrupted, error


def _device_main(
    job: DeviceJob,
    paths: list[str],
    base: str,
    fmt: str,
    model_name: str,
    recipe: Recipe,
    compute: ComputeOptions,
    output: Any,
    messages: Any,
) -> None:
    """One device's process: its shard through the ordinary run, reported on `messages`."""
    import torch

    from dinoreg.embedding.run import embed_paths  # run imports this module

    def stop(signum, frame) -> None:
        raise KeyboardInterrupt  # SIGTERM commits like Ctrl-C

    signal.signal(signal.SIGTERM, stop)
    if job.device.startswith("cpu"):
        torch.set_num_threads(job.threads)
    mine = dataclasses.replace(compute, device=job.device, workers=job.workers)
    i = job.shard.index

    def relay(p) -> None:
        messages.put(("progress", i, p.done, p.rows, p.new_failures))

    try:
        summary = embed_paths(
            paths, Path(base), fmt, model_name, recipe, mine, output, relay, job.shard
        )
        messages.put(("done", i, _result(summary)))
    except Interrupted as stopped:
        messages.put(("interrupted", i, _result(stopped.summary)))
    except KeyboardInterrupt:
        messages.put(("interrupted", i, _result(None)))
    except DinoregError as exc:
        messages.put(("error", i, type(exc), str(exc), exc.params))
    except Exception as exc:  # a bug: name it, and let the parent stop the others
        messages.put(("error", i, RuntimeError, f"{type(exc).__name__}: {exc}", ()))


def combined_times(per_device: Sequence[dict[str, float | str]]) -> dict[str, float | str]:
    """The stage times of several devices as one: seconds summed (so shares such as the
    model's wait on input weigh every device by its time), and where each decoded, listed."""
    seconds: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    for times in per_device:
        for key, value in times.items():
            if isinstance(value, str):
                seen = texts.setdefault(key, [])
                if value and value not in seen:
                    seen.append(value)
            else:
                seconds[key] = seconds.get(key, 0.0) + value
    return {
        **{key: round(total, 3) for key, total in seconds.items()},
        **{key: "; ".join(values) for key, values in texts.items()},
    }


def _result(summary) -> dict:
    if summary is None:
        return {"rows": 0, "resumed": 0, "failures": [], "failures_before": 0,
                "nonfinite_values": 0, "mode_used": "created", "times": {}}  # fmt: skip
    return {
        "times": summary.times,
        "rows": summary.rows,
        "resumed": summary.resumed,
        "failures": summary.failures,
        "failures_before": summary.failures_before,
        "nonfinite_values": summary.nonfinite_values,
        "mode_used": summary.mode_used,
    }


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
