"""The input side alone, no model: what each stage of decode -> batch -> device costs, how the
DataLoader scales with workers, and whether the input side or the model bounds a run.

    python benchmarks/pipeline.py                 # about 4 minutes on 2 busy cores
    python benchmarks/pipeline.py --quick         # under a minute
    python benchmarks/pipeline.py --images DIR    # large JPEGs of your own instead of generated

Two photo sets (`benchmarks/photos.py`): `large` (1.3-4.9 MP, generated from examples/images
unless `--images`) and `dataset` (the same and the shipped photos at 500x375, ImageNet's size).
Sections, each written to `--out`/pipeline.{json,md} as soon as it finishes:

1. stages: ms per image of each stage on one core, in this process, with the library's own
   functions (`load_image`, `resize`, `normalise`, `collate`), timed stage by stage over the set.
2. loader: img/s of `dinoreg.batches.make_loader` (the DataLoader `embed` uses) against the
   number of workers, and the scaling efficiency from 1 worker to all cores.
3. handover: float32 (3, 224, 224) against uint8 (224, 224, 3) samples through a DataLoader
   (issue 11 §2: hand over uint8 and normalise on the device), synthetic and on real decodes.
4. forward: forward-only img/s of the chosen model shape (random weights, fp32 and bf16, as
   `prepare_model` sets it up on CPU), and which side bounds the run.
5. profile (`decode_profile.py`): where the ms of decode + preprocess go on the large photos,
   and measured alternatives (smaller draft, reducing_gap, one-pass resize-and-crop, copies).

The options, the report and the timing helpers the sections share are in `pipeline_common.py`.

Timings are medians of repeats, each alternative timed interleaved with the others in the same
run (`common.time_interleaved`), so that other load on the machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from resource import RUSAGE_CHILDREN, RUSAGE_SELF
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmark this checkout's dinoreg and the helper modules

from benchmarks import photos  # noqa: E402  (numpy and Pillow only: the check below is fast)
from benchmarks.decode_profile import run_profile  # noqa: E402
from benchmarks.pipeline_common import (  # noqa: E402
    Cost,
    PipelineOptions,
    Report,
    cycled,
    interleaved_cost,
    interleaved_ms,
    worker_counts,
)

# ---------------------------------------------------------------------------------------------
# 1. per-stage cost on one core


def stages(paths: Sequence[Path], opts: PipelineOptions) -> dict[str, Cost]:
    """ms per image of each stage, one core, the library's functions, stage by stage."""
    import torch

    from dinoreg.inputs.dataset import Sample, collate
    from dinoreg.inputs.decode import load_image
    from dinoreg.inputs.normalise import normalise
    from dinoreg.inputs.recipe import Recipe, resize

    recipe = Recipe()
    files = [str(p) for p in paths]
    # one pass is short: a few more repeats are cheap (quick: two, for a median at all)
    n, reps = len(files), (2 if opts.quick else opts.reps + 2)
    decoded = [load_image(f, recipe) for f in files]
    cropped = [resize(im, recipe) for im in decoded]
    tensors = [normalise(im, recipe) for im in cropped]
    batch = opts.batch_size
    samples = [Sample(i, tensors[i % n], None) for i in range(batch)]
    stacked = collate(samples).pixels
    assert stacked is not None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def to_device() -> None:
        x = stacked.pin_memory() if device.type == "cuda" else stacked
        x.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    few = reps * 20  # collate and the copy take microseconds: more rounds of them
    calls: dict[str, tuple[Callable[[], object], int]] = {
        "read": (lambda: [Path(f).read_bytes() for f in files], n),
        "decode (load_image, read included)": (lambda: [load_image(f, recipe) for f in files], n),
        "resize + crop (recipe.resize)": (lambda: [resize(im, recipe) for im in decoded], n),
        "normalise (recipe.normalise)": (lambda: [normalise(im, recipe) for im in cropped], n),
        "collate (dataset.collate)": (lambda: [collate(samples) for _ in range(few)], batch * few),
        f"host-to-device ({device.type})": (lambda: [to_device() for _ in range(few)], batch * few),
    }
    result = interleaved_cost(calls, reps)
    return result


def run_stages(sets: dict[str, photos.PhotoSet], opts: PipelineOptions, report: Report) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the cost a decode worker pays per image
    try:
        data = {name: stages(s.paths, opts) for name, s in sets.items()}
    finally:
        torch.set_num_threads(threads)
    for values in data.values():
        parts = [v for k, v in values.items() if k != "read"]  # read is inside decode
        values["total (one core)"] = Cost(sum(c.wall for c in parts), sum(c.cpu for c in parts))
    names = list(sets)
    head = " | ".join(f"{n} CPU ms | {n} wall ms" for n in names)
    rows = [f"| stage | {head} |", "| --- |" + " ---: | ---: |" * len(names)]
    for stage in data[names[0]]:
        cells = " | ".join(f"{data[n][stage].cpu:.3f} | {data[n][stage].wall:.3f}" for n in names)
        rows.append(f"| {stage} | {cells} |")
    totals = [data[n]["total (one core)"] for n in names]
    rates = " | ".join(f"{1e3 / t.cpu:.1f} | {1e3 / t.wall:.1f}" for t in totals)
    rows.append(f"| one-core rate, img/s | {rates} |")
    report.sections["stages"] = {n: {k: asdict(c) for k, c in v.items()} for n, v in data.items()}
    report.markdown["stages"] = "\n".join(
        [
            "## Per-stage cost on one core (ms per image)",
            "",
            *rows,
            "",
            "In this process, torch on 1 thread, page cache warm, each stage timed over the "
            "whole set, the stages alternated round by round (median of repeats). CPU ms is "
            "this process's CPU time, which other load on the machine inflates far less than "
            "wall time. `read` is part of `decode` (load_image opens the "
            "file itself) and is left out of the total. The DataLoader hand-over to the main "
            "process is measured in the hand-over section. "
            + (
                "No CUDA here: host-to-device is `.to('cpu')`, a no-op, and `pin_memory` is "
                "not called (it needs an accelerator)."
                if not torch.cuda.is_available()
                else "Host-to-device: pin_memory() then a non-blocking copy, synchronised."
            ),
        ]
    )


# ---------------------------------------------------------------------------------------------
# 2. the DataLoader against the number of workers


@dataclass
class LoaderRuns:
    """What the passes of one DataLoader configuration measured, one value per pass."""

    firsts: list[float] = field(default_factory=list)  # seconds to the first piece
    steady: list[float] = field(default_factory=list)  # img/s once every worker delivered
    cpu: list[float] = field(default_factory=list)  # CPU ms per image, all processes


def loader_rate(
    paths: list[str], workers: int, opts: PipelineOptions, runs: LoaderRuns
) -> Callable[[], int]:
    """One pass of embed's DataLoader over `paths`, recorded in `runs`: the seconds to the first
    piece (worker start-up and the first decodes); the rate once every worker has delivered a
    piece, which start-up does not touch; and the CPU ms per image of all its processes (main
    + workers, joined at the end): what the input side costs in core time, whatever share of
    the cores other load left it."""
    import torch

    from dinoreg.batches import make_loader
    from dinoreg.inputs.recipe import Recipe
    from dinoreg.runtime import ComputeOptions

    compute = ComputeOptions(device="cpu", batch_size=opts.batch_size, workers=workers)
    recipe = Recipe()

    def used() -> float:
        own, children = (resource.getrusage(r) for r in (RUSAGE_SELF, RUSAGE_CHILDREN))
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def run() -> int:
        start, cpu0 = time.perf_counter(), used()
        loader = make_loader(paths, recipe, compute, torch.device("cpu"))
        # Steady state starts once every worker has delivered its first piece: from then on
        # all of them are decoding, and none had a head start the others lacked.
        warm_pieces = max(workers, 1)
        count, warm, warm_at = 0, 0, start
        for pieces, piece in enumerate(loader, 1):  # the batch loop's hand-over, no model
            if pieces == 1:
                runs.firsts.append(time.perf_counter() - start)
            if piece.pixels is not None:
                piece.pixels.to("cpu", non_blocking=True)
            count += len(piece.indices)
            if pieces == warm_pieces:
                warm, warm_at = count, time.perf_counter()
        # nan when the pass was too short to have anything after the workers' first pieces
        after = time.perf_counter() - warm_at
        runs.steady.append((count - warm) / after if count > warm else float("nan"))
        # exhausting the iterator joined the workers: their CPU time is in RUSAGE_CHILDREN now
        runs.cpu.append((used() - cpu0) * 1e3 / max(count, 1))
        return count

    return run


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "n/a (too few images)" if value is None else f"{value:.0%}"


def run_loader(sets: dict[str, photos.PhotoSet], opts: PipelineOptions, report: Report) -> None:
    counts = worker_counts(opts)
    # Enough images per run that worker start-up (a fork each, every run) stays a small part.
    per_set = {"large": 16 if opts.quick else 144, "dataset": 96 if opts.quick else 576}
    data: dict[str, Any] = {}
    for name, s in sets.items():
        paths = cycled(s.paths, per_set.get(name, 96))
        runs = {w: LoaderRuns() for w in counts}
        calls = {str(w): loader_rate(paths, w, opts, runs[w]) for w in counts}
        ms = interleaved_ms(calls, len(paths), opts.reps, warmup=0 if opts.quick else 1)
        rates = {w: 1e3 / ms[str(w)] for w in counts}
        steady = {w: statistics.median(runs[w].steady) for w in counts}
        top = max(counts)
        scales = 1 in rates and top > 1
        steady_scales = scales and all(math.isfinite(steady[w]) and steady[w] > 0 for w in (1, top))
        data[name] = {
            "images_per_run": len(paths),
            "img_s": {str(w): r for w, r in rates.items()},
            "img_s_workers_running": {
                str(w): r if math.isfinite(r) else None for w, r in steady.items()
            },
            "first_batch_s": {str(w): statistics.median(runs[w].firsts) for w in counts},
            "cpu_ms_per_image_all_processes": {
                str(w): statistics.median(runs[w].cpu) for w in counts
            },
            "scaling_efficiency": steady[top] / (top * steady[1]) if steady_scales else None,
            "scaling_efficiency_with_start_up": rates[top] / (top * rates[1]) if scales else None,
            "workers_max": top,
        }
        report.sections["loader"] = data
        print(f"[pipeline] loader {name}: {data[name]}", file=sys.stderr, flush=True)
    names = list(data)
    head = " | ".join(
        f"{n} img/s | {n} img/s, workers running | {n} first batch s | {n} CPU ms/img"
        for n in names
    )
    rows = [f"| workers | {head} |", "| ---: |" + " ---: | ---: | ---: | ---: |" * len(names)]
    for w in counts:
        cells = " | ".join(
            f"{data[n]['img_s'][str(w)]:.1f} | {_rate(data[n]['img_s_workers_running'][str(w)])} | "
            f"{data[n]['first_batch_s'][str(w)]:.2f} | "
            f"{data[n]['cpu_ms_per_image_all_processes'][str(w)]:.1f}"
            for n in names
        )
        rows.append(f"| {w} | {cells} |")
    eff = "; ".join(
        f"`{n}` {_percent(data[n]['scaling_efficiency'])} "
        f"({_percent(data[n]['scaling_efficiency_with_start_up'])} with start-up)"
        for n in names
        if data[n]["scaling_efficiency_with_start_up"] is not None
    )
    report.markdown["loader"] = "\n".join(
        [
            "## DataLoader img/s against workers",
            "",
            *rows,
            "",
            f"`dinoreg.batches.make_loader` as `embed` builds it (batch {opts.batch_size}, "
            "the library's chunking and prefetch), the main process only receiving batches; "
            "each run starts its workers afresh (as every `embed` does), median of interleaved "
            f"repeats. Scaling efficiency from 1 worker to {max(counts)}: the rate once every "
            f"worker has delivered its first piece, at {max(counts)} / ({max(counts)} x the same "
            f"at 1), so that forking the workers and their first decodes do not count: {eff}. "
            "0 workers decode in the main process (no hand-over).",
        ]
    )


# ---------------------------------------------------------------------------------------------
# 3. hand-over: float32 against uint8


class _Fixed:
    """A dataset of fresh copies of one tensor wrapped as `Sample`s: hand-over cost only."""

    def __init__(self, template: Any, count: int) -> None:
        self.template, self.count = template, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        from dinoreg.inputs.dataset import Sample

        return Sample(index, self.template.clone(), None)  # a fresh tensor, as decoding makes


class _Float32Images:
    """The decode path as it was before issue 11: normalised in the worker, (3, H, W) float32."""

    def __init__(self, paths: list[str]) -> None:
        from dinoreg.inputs.recipe import Recipe

        self.paths, self.recipe = paths, Recipe()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        from dinoreg.inputs.dataset import Sample
        from dinoreg.inputs.decode import load_image
        from dinoreg.inputs.recipe import preprocess

        return Sample(
            index, preprocess(load_image(self.paths[index], self.recipe), self.recipe), None
        )


def device_normalise(batch: Any, mean: Any, std: Any) -> Any:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised: what the device would do (§2)."""
    return batch.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)


def through_loader(dataset: Any, workers: int, opts: PipelineOptions, post=None) -> Callable:
    import torch
    import torch.utils.data

    from dinoreg.batches import chunk_size
    from dinoreg.inputs.dataset import collate

    def run() -> int:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=chunk_size(opts.batch_size, workers),
            num_workers=workers,
            collate_fn=collate,
            prefetch_factor=4 if workers else None,
        )
        count = 0
        for piece in loader:
            if post is not None:
                post(piece.pixels)
            count += len(piece.indices)
        return count

    return run


def run_handover(sets: dict[str, photos.PhotoSet], opts: PipelineOptions, report: Report) -> None:
    import torch

    from dinoreg.inputs.dataset import ImageDataset
    from dinoreg.inputs.normalise import normalise_batch
    from dinoreg.inputs.recipe import IMAGENET_MEAN, IMAGENET_STD, Recipe

    # 0, 1 and 2 workers show the trend; quick mode keeps 0 and 1 (each run forks its workers)
    counts = [w for w in worker_counts(opts) if w <= (1 if opts.quick else 2)] or [0, 1]
    n = 256 if opts.quick else 2048
    f32 = torch.randn(3, 224, 224)
    u8 = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8)
    calls: dict[str, Callable[[], object]] = {}
    for w in counts:
        calls[f"float32 (3,224,224), {w} workers"] = through_loader(_Fixed(f32, n), w, opts)
        calls[f"uint8 (224,224,3), {w} workers"] = through_loader(_Fixed(u8, n), w, opts)
    synthetic = interleaved_ms(calls, n, opts.reps if opts.quick else opts.reps + 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    batch = torch.randint(0, 256, (opts.batch_size, 224, 224, 3), dtype=torch.uint8)
    dev_ms = interleaved_cost(
        {"n": (lambda: device_normalise(batch, mean, std), opts.batch_size)}, 20
    )["n"].wall
    print(f"[pipeline] handover synthetic: {synthetic}", file=sys.stderr, flush=True)

    # The same on real decodes of the dataset-size set: the library's ImageDataset (which hands
    # over uint8 since issue 11, normalised by `normalise_batch` as the batch loop does) against a
    # float32 hand-over (normalised in the worker, as before).
    paths = cycled(sets["dataset"].paths, 64 if opts.quick else 576)
    real_calls: dict[str, Callable[[], object]] = {}
    for w in [w for w in counts if w] or [1]:
        real_calls[f"float32 normalised in the worker, {w} workers"] = through_loader(
            _Float32Images(paths), w, opts
        )
        real_calls[f"uint8 ImageDataset + normalise_batch, {w} workers"] = through_loader(
            ImageDataset(paths, Recipe()), w, opts, post=lambda x: normalise_batch(x, Recipe())
        )
    real = interleaved_ms(real_calls, len(paths), opts.reps)
    print(f"[pipeline] handover real: {real}", file=sys.stderr, flush=True)
    report.sections["handover"] = {
        "synthetic_ms_per_image": synthetic,
        "device_normalise_ms_per_image": dev_ms,
        "dataset_set_ms_per_image": real,
        "bytes_per_image": {"float32": 3 * 224 * 224 * 4, "uint8": 3 * 224 * 224},
    }
    rows = ["| samples through a DataLoader | ms/image | img/s |", "| --- | ---: | ---: |"]
    rows += [f"| {k} | {v:.3f} | {1e3 / v:.0f} |" for k, v in synthetic.items()]
    rows += [f"| {k} (dataset set) | {v:.3f} | {1e3 / v:.0f} |" for k, v in real.items()]
    gains = []
    for w in counts:
        a = synthetic.get(f"float32 (3,224,224), {w} workers")
        b = synthetic.get(f"uint8 (224,224,3), {w} workers")
        if a and b:
            gains.append(f"{w} workers {a - b:.3f} ms/image saved ({a / b:.1f}x)")
    report.markdown["handover"] = "\n".join(
        [
            "## Hand-over: float32 against uint8 samples",
            "",
            *rows,
            "",
            "Synthetic rows: a dataset of fresh tensor copies wrapped as `Sample`s, the "
            "library's `collate` and chunking, batch "
            f"{opts.batch_size}: the cost of moving pixels from a worker to the main process "
            "(shared-memory copy and rebuild), 602,112 against 150,528 bytes per image. "
            + "; ".join(gains)
            + f". Normalising a uint8 batch in the main process instead (torch, permute + float "
            f"+ mean/std, what a GPU would do almost for free): {dev_ms:.3f} ms/image on this "
            "CPU. Dataset-set rows: real decodes at 500x375, normalised in the worker and "
            "handed over as float32, against the library's `ImageDataset` (uint8) normalised "
            "in the main process by `normalise_batch`.",
        ]
    )


# ---------------------------------------------------------------------------------------------
# 4. forward only, and which side bounds


def run_forward(opts: PipelineOptions, report: Report) -> None:
    import torch

    from dinoreg.model import VARIANTS, RegistersViT
    from dinoreg.model import cpu as cpu_paths
    from dinoreg.runtime import set_precision

    # quick: a tiny batch, since bf16 without AVX-512 BF16 / AMX runs at ~1 img/s
    batch = 2 if opts.quick else opts.batch_size
    device = torch.device("cpu")
    rates: dict[str, float] = {}
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        model = RegistersViT(VARIANTS[opts.model].config).eval().requires_grad_(False)
        # prepare_model's CPU steps, on random weights: precision, then the fast paths
        model = cpu_paths.apply(set_precision(model, device, dtype), dtype)
        x = torch.randn(batch, 3, 224, 224)

        def forward(model=model, x=x) -> None:
            with torch.inference_mode():
                model.forward_features(x)

        cost = interleaved_cost({"f": (forward, batch)}, opts.reps)["f"]
        rates[dtype_name] = 1e3 / cost.wall
        del model
    report.sections["forward"] = {
        "model": opts.model,
        "batch": batch,
        "threads": torch.get_num_threads(),
        "img_s": rates,
    }
    print(f"[pipeline] forward: {rates}", file=sys.stderr, flush=True)
    report.markdown["forward"] = "\n".join(
        [
            "## Forward only",
            "",
            "| model | dtype | batch | img/s |",
            "| --- | --- | ---: | ---: |",
            *(f"| {opts.model} | {d} | {batch} | {r:.1f} |" for d, r in rates.items()),
            "",
            f"`RegistersViT(VARIANTS['{opts.model}'].config)` with random weights, set up as "
            "`prepare_model` does on CPU (bf16: weights cast, CPU fast paths), "
            f"{torch.get_num_threads()} torch threads, 224x224.",
        ]
    )


def run_bound(sets: dict[str, photos.PhotoSet], report: Report) -> None:
    """Which side bounds a CPU run, where decode workers and the model share the cores."""
    stage = report.sections.get("stages", {})
    loader = report.sections.get("loader", {})
    fwd = report.sections.get("forward", {}).get("img_s", {})
    if not (stage and loader and fwd):
        return
    cores = os.cpu_count() or 1
    lines, data = [], {}
    for name in sets:
        core_ms = stage[name]["total (one core)"]["cpu"]
        best = max(loader[name]["img_s"].values())
        data[name] = {"input_img_s_all_cores": best, "core_ms_per_image": core_ms}
        for dtype, rate in fwd.items():
            # Both on the same cores: each image costs its decode core-ms plus the forward's
            # all-core time, so the rates add as reciprocals.
            combined = 1e3 / (core_ms / cores + 1e3 / rate)
            share = (core_ms / cores) / (core_ms / cores + 1e3 / rate)
            data[name][dtype] = {"combined_img_s_estimate": combined, "input_share": share}
            bound = "input" if 1e3 / rate < core_ms / cores else "the model"
            lines.append(
                f"| {name} | {dtype} | {best:.1f} | {rate:.1f} | {combined:.1f} | "
                f"{share:.0%} | {bound} |"
            )
    report.sections["bound"] = data
    report.markdown["bound"] = "\n".join(
        [
            "## Which side bounds",
            "",
            "| set | dtype | input img/s (best workers) | forward img/s | both on these cores, "
            "img/s (estimate) | input's share of the time | bound by |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
            *lines,
            "",
            "Input core-ms: the one-core CPU ms per image of the stages table. "
            f"On a CPU box decode and the model share the {cores} cores, so per image the run "
            "pays the input's core-ms spread over the cores plus the forward's time "
            "(1 / (core_ms / cores + 1 / forward rate)); the larger of the two bounds it. On a "
            "GPU box the forward leaves the cores to decoding: the input side then needs "
            "forward rate x core-ms per image / 1000 cores to keep up.",
        ]
    )


# ---------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import numpy
    import PIL
    import torch
    from PIL import features

    from benchmarks.common import _cpu_name

    # Not common.environment(): it imports transformers (seconds), which nothing here uses.
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = list(os.getloadavg())
    env["pillow"] = PIL.__version__
    env["libjpeg_turbo"] = features.version_feature("libjpeg_turbo")
    env["numpy"] = numpy.__version__
    return env


def _cpu_flags() -> str:
    """The vector extensions that decide bf16 speed (AMX / AVX-512 BF16) and SIMD decode."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(w for w in wanted if w in have) or "none of " + ",".join(wanted)
    except OSError:
        pass
    return "unknown"


def parse_args(argv: list[str] | None = None) -> PipelineOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--images", type=Path, default=None, help="large JPEGs (default: generated)")
    p.add_argument("--quick", action="store_true", help="one repeat, fewer images: under a minute")
    p.add_argument("--workers", default="", help="comma-separated (default 0,1,2,4,.. cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", default="small", help="model shape for the forward-only rate")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--sections",
        default="stages,loader,handover,forward,profile",
        help="comma-separated subset of stages,loader,handover,forward,profile",
    )
    a = p.parse_args(argv)
    workers = tuple(int(w) for w in a.workers.split(",") if w.strip())
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    return PipelineOptions(
        a.out, a.images, a.quick, workers, a.batch_size, a.model, a.repeats, sections
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    sections = opts.sections
    # Inputs first, before torch is imported: a bad --images fails in well under a second.
    large, dataset = photos.photo_sets(opts.out, opts.images)
    sets = {"large": large, "dataset": dataset}
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    report = Report(options, environment(), {k: s.describe() for k, s in sets.items()})
    started = time.perf_counter()
    steps: list[tuple[str, Callable[[], None]]] = [
        ("stages", lambda: run_stages(sets, opts, report)),
        ("loader", lambda: run_loader(sets, opts, report)),
        ("handover", lambda: run_handover(sets, opts, report)),
        ("forward", lambda: run_forward(opts, report)),
        ("profile", lambda: run_profile(large, opts, report)),
    ]
    for name, step in steps:
        if name not in sections:
            continue
        tick = time.perf_counter()
        print(f"[pipeline] {name} ...", file=sys.stderr, flush=True)
        step()
        run_bound(sets, report)
        report.environment["seconds"] = {
            **report.environment.get("seconds", {}),
            name: round(time.perf_counter() - tick, 1),
        }
        if hasattr(os, "getloadavg"):
            report.environment["loadavg_end"] = list(os.getloadavg())
        report.save(opts.out)  # after every section: an interrupted run keeps what it finished
    report.environment["total_seconds"] = round(time.perf_counter() - started, 1)
    report.save(opts.out)
    print((opts.out / "pipeline.md").read_text())
    print(f"[pipeline] wrote {opts.out / 'pipeline.md'} and pipeline.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
