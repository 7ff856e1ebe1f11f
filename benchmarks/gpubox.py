"""Every GPU target of the GPU issue in one run, sized for a short loan of a GPU box.

    python benchmarks/gpubox.py --out DIR                  # H200, 16 cores: 4-6 min (estimate)
    python benchmarks/gpubox.py --out DIR --quick          # one and two batches: a device smoke
    python benchmarks/gpubox.py --out DIR --device cpu --quick   # the CPU smoke (under 2 min)
    python benchmarks/gpubox.py --out DIR --images DIR2    # large JPEGs of your own
    python benchmarks/gpubox.py --out DIR --budget-s 300   # skip what starts after 300 s

Writes `DIR/gpubox.json` and `DIR/gpubox.md` after every step, so an interrupted run keeps what it
finished. `DIR` holds nothing else: the generated photos are cached under `--cache` (default
`bench-out`, as the other benchmarks), the checkpoints and outputs in a temporary folder.

Models: ViT-S/14, ViT-B/14 and ViT-L/14 shapes with random weights, saved as transformers
checkpoints (`endtoend.make_checkpoint`). Photos: `large`, 1.3-4.9 MP JPEGs (`photos.large_photos`,
or `--images`; two of the twelve generated ones are progressive, which the GPU path hands to the
CPU workers), and `dataset`, 500x375 re-encodes of them (`photos.dataset_photos`). Each input
folder holds N hard links to one set, cycled (`endtoend.image_folder`); the page cache is warm.

The numbers, in the order they are measured:

- forward img/s: `prepare_model(ckpt, ComputeOptions(device, "bfloat16", batch))` and
  `prepared.model.features(x)` on random (batch, 3, 224, 224) pixels already on the device,
  under `prepared.inference()`, after three warm-up batches, synchronised, over about 3 s
  (`gpu.throughput`). Measured right before that model's `embed` cases, in the same process.
- embed img/s: `dinoreg.embed(folder, out.h5, model=ckpt, device, dtype="bfloat16", batch_size,
  workers=cores - 1, decode=cpu|gpu|auto, tokens=["cls"], overwrite=True)` in this process, at
  N1 and N2 inputs; the rate is (N2 - N1) / (t2 - t1), t the wall seconds of the whole call
  (model load, worker start-up, the decode=auto calibration, the writer's close), so that what a
  run pays once cancels. One case stores all tokens (ViT-S, large photos, decode=auto) to show
  the writer's path. Each row also gives `% of forward` (embed / forward img/s), where the JPEGs
  were decoded (`summary.times["decode"]`, and what decode=auto measured) and the share of the
  batch loop the model waited on input (wait_input / (wait_input + forward + write) of the N2
  run, as the CLI's summary line says it).
- agreement: the decode="gpu" path against decode="cpu" (the reference) on each photo set, one
  image each (12 large, 19 dataset-size), ViT-S shape in float32 on the device so that only the
  decoding differs: the minimum cosine similarity of the CLS token over the images and the
  minimum and mean over every patch token of every image (`dinoreg.read` of two all-token runs).
- several GPUs: ViT-S on the large photos, decode="gpu", `device="cuda"` (every GPU) against
  `device="cuda:0"`, rates as above; with one GPU it is recorded as not measured.

Targets (judged only on CUDA; a CPU run is a smoke test of the script and shows `n/a`):
ViT-B on dataset-size JPEGs >= 90% of its forward rate (the better decode of cpu and auto);
ViT-L on the large photos with decode="gpu" >= 80% of its forward rate; ViT-S on the large
photos >= 3,000 img/s (the best decode); GPU decode against CPU decode: CLS cosine >= 0.999 and
patch cosine >= 0.99 on both sets; N GPUs >= 0.9 N times one.

Before each step the elapsed time is checked against `--budget-s`: once it is spent the remaining
steps are recorded as skipped with the reason, so the run always ends with its JSON written.
Without CUDA, decode="gpu" is a usage error: those cases and the agreement are skipped ("no CUDA").
`--device cpu` smokes the script itself: float32 (bf16 crawls on CPUs without AVX-512 BF16 or
AMX), batches of 2 with `--quick` (8 without), nothing judged.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmark this checkout's dinoreg and the helper modules

from benchmarks import photos  # noqa: E402  (numpy and Pillow only: the photos check is fast)
from benchmarks.common import environment  # noqa: E402  (imports torch when called)
from benchmarks.endtoend import image_folder, make_checkpoint  # noqa: E402  (no torch at import)
from benchmarks.gpu import throughput  # noqa: E402  (no torch at import)

MODELS = {"small": "ViT-S/14", "base": "ViT-B/14", "large": "ViT-L/14"}  # endtoend.SIZES keys
ALL_TOKENS = ("cls", "registers", "patches")
NO_CUDA = "no CUDA: decode='gpu' is a usage error without it"
CLS_TARGET, PATCH_TARGET = 0.999, 0.99
MULTI_GPU_TARGET = 0.9  # N devices >= 0.9 N times one


@dataclass(frozen=True)
class BoxOptions:
    """What the run was asked for."""

    out: Path = Path("bench-out/gpubox")  # gpubox.json and gpubox.md, nothing else
    images: Path | None = None  # large JPEGs; None: generated from examples/images
    cache: Path = Path("bench-out")  # the generated photos' cache (photos.large_photos)
    quick: bool = False
    device: str = "cuda"  # cuda | cuda:N | cpu
    budget_s: float = 480.0
    batch_size: int | None = None  # None: 256 on CUDA, 2 (quick) or 8 on the CPU
    workers: int | None = None  # None: cores - 1
    forward_s: float | None = None  # None: 3 s on CUDA (quick 1 s), 0.5 s on the CPU

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def single_device(self) -> str:
        """One device for the single-device cases: `cuda` would mean every visible GPU."""
        return "cuda:0" if self.device == "cuda" else self.device

    @property
    def batch(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 256 if self.cuda else 2 if self.quick else 8

    @property
    def dtype(self) -> str:
        """bf16 as the targets say; float32 on the CPU, where bf16 without AVX-512 BF16 or AMX
        runs 50x slower and the smoke run would not end in minutes."""
        return "bfloat16" if self.cuda else "float32"

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers is not None else max(1, (os.cpu_count() or 2) - 1)

    @property
    def forward_seconds(self) -> float:
        if self.forward_s is not None:
            return self.forward_s
        return (1.0 if self.quick else 3.0) if self.cuda else 0.5

    def counts(self, photo_set: str) -> tuple[int, int]:
        """N1, N2 for a photo set: whole batches, each run a few seconds on an H200."""
        b = self.batch
        if self.quick:
            return b, 2 * b
        return (16 * b, 64 * b) if photo_set == "dataset" else (4 * b, 16 * b)


@dataclass(frozen=True)
class RateCase:
    """One `embed` configuration timed at N1 and N2 inputs."""

    model: str  # small | base | large
    photos: str  # large | dataset
    decode: str  # cpu | gpu | auto
    tokens: tuple[str, ...] = ("cls",)

    @property
    def name(self) -> str:
        extra = " all tokens" if len(self.tokens) > 1 else ""
        return f"{MODELS[self.model]} {self.photos} decode={self.decode}{extra}"


# In the order they run: ViT-B (the issue's first target), ViT-L, ViT-S, then the writer's case.
RATE_CASES: tuple[RateCase, ...] = (
    RateCase("base", "dataset", "cpu"),
    RateCase("base", "dataset", "auto"),
    RateCase("large", "large", "gpu"),
    RateCase("large", "large", "cpu"),
    RateCase("large", "large", "auto"),
    RateCase("small", "large", "gpu"),
    RateCase("small", "large", "cpu"),
    RateCase("small", "large", "auto"),
    RateCase("small", "large", "auto", ALL_TOKENS),
)


@dataclass(frozen=True)
class RateTarget:
    """A rate target over some of the cls-only cases: the best of them is judged."""

    key: str
    text: str
    model: str
    photos: str
    decodes: tuple[str, ...]
    of_forward: float | None = None  # the lowest passing embed / forward ratio, or
    img_s: float | None = None  # the lowest passing rate


RATE_TARGETS: tuple[RateTarget, ...] = (
    RateTarget(
        "vit_b_dataset",
        "ViT-B/14 bf16, dataset-size JPEGs, end to end >= 90% of forward-only",
        "base",
        "dataset",
        ("cpu", "auto"),
        of_forward=0.90,
    ),
    RateTarget(
        "vit_l_large_gpu_decode",
        "ViT-L/14 bf16, large photos, decode=gpu, end to end >= 80% of forward-only",
        "large",
        "large",
        ("gpu",),
        of_forward=0.80,
    ),
    RateTarget(
        "vit_s_large",
        "ViT-S/14 bf16, large photos, end to end >= 3,000 img/s",
        "small",
        "large",
        ("gpu", "cpu", "auto"),
        img_s=3000.0,
    ),
)


@dataclass
class Step:
    """What every measured step records besides its numbers."""

    status: str = "pending"  # done | skipped | error
    reason: str = ""  # why skipped, or the error
    wall_s: float = 0.0  # the step's own seconds, set-up included


@dataclass
class ForwardResult(Step):
    model: str = ""
    batch: int = 0
    img_s: float | None = None


@dataclass
class EmbedRun:
    """One `dinoreg.embed` call."""

    images: int
    seconds: float  # wall seconds of the call
    summary_seconds: float  # RunSummary.seconds (model load onwards)
    times: dict[str, Any]  # RunSummary.times: wait_input, forward, write, decode, decode_choice
    bytes: int


@dataclass
class RateResult(Step):
    case: str = ""
    model: str = ""
    photos: str = ""
    decode: str = ""
    tokens: list[str] = field(default_factory=list)
    device: str = ""
    runs: list[EmbedRun] = field(default_factory=list)
    img_s: float | None = None  # (N2 - N1) / (t2 - t1)
    forward_img_s: float | None = None
    of_forward: float | None = None
    decoded_on: str = ""  # where the N2 run decoded its JPEGs: cpu or device
    decode_choice: str = ""  # what decode=auto measured, when it did
    wait_input_share: float | None = None  # of the N2 run's batch loop


@dataclass
class AgreementResult(Step):
    photos: str = ""
    images: int = 0
    decoded_on: str = ""  # where the decode="gpu" run decoded (device; progressive: the CPU)
    cls_cos_min: float | None = None
    patch_cos_min: float | None = None
    patch_cos_mean: float | None = None
    passed: bool | None = None


@dataclass
class MultiGpuResult(Step):
    devices: int = 0
    one: RateResult | None = None
    all: RateResult | None = None
    ratio: float | None = None  # all / one
    target: float | None = None  # 0.9 N


@dataclass
class Verdict:
    key: str
    text: str
    value: float | None
    threshold: str
    basis: str  # which case or cases the value comes from
    passed: bool | None  # None: not measured, or not a CUDA run


@dataclass
class Report:
    options: dict[str, Any]
    environment: dict[str, Any]
    gpu: dict[str, Any] = field(default_factory=dict)
    photos: dict[str, Any] = field(default_factory=dict)
    forward: list[ForwardResult] = field(default_factory=list)
    rates: list[RateResult] = field(default_factory=list)
    agreement: list[AgreementResult] = field(default_factory=list)
    multi_gpu: MultiGpuResult | None = None
    targets: list[Verdict] = field(default_factory=list)
    finished: bool = False

    def save(self, out: Path, judged: bool) -> None:
        self.targets = verdicts(self, judged)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **asdict(self),
        }
        tmp = out / "gpubox.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        tmp.replace(out / "gpubox.json")  # a run killed mid-write keeps the last whole file
        (out / "gpubox.md").write_text(render(self))


# ---------------------------------------------------------------------------------------------


class Budget:
    """Seconds since the start against `--budget-s`: each step asks before it starts."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> str:
        """Why a step is skipped, or "" while time is left."""
        if self.elapsed <= self.seconds:
            return ""
        return f"budget: {self.elapsed:.0f} s of --budget-s {self.seconds:.0f} spent"


def log(message: str) -> None:
    print(f"[gpubox] {message}", file=sys.stderr, flush=True)


def attempt(step: Step, budget: Budget, work: Callable[[], None], skip: str = "") -> None:
    """Run one step unless `skip` or the budget says otherwise; an error is recorded, not
    raised, so that one broken case does not cost the rest of the loan."""
    reason = skip or budget.spent()
    if reason:
        step.status, step.reason = "skipped", reason
        return
    start = time.perf_counter()
    try:
        work()
        step.status = "done"
    except Exception as exc:
        step.status = "error"
        step.reason = f"{type(exc).__name__}: {exc}"[:500]
        log(f"error: {step.reason}\n{traceback.format_exc(limit=8)}")
    finally:
        step.wall_s = round(time.perf_counter() - start, 2)
        release_memory()


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Workspace:
    """Checkpoints (made on first use) and input folders of N hard links, under one temp dir."""

    def __init__(self, root: Path, sets: dict[str, photos.PhotoSet]) -> None:
        self.root = root
        self.sets = sets
        self._checkpoints: dict[str, Path] = {}
        self._folders: dict[tuple[str, int], Path] = {}

    def checkpoint(self, model: str) -> Path:
        if model not in self._checkpoints:
            log(f"checkpoint {MODELS[model]} ...")
            self._checkpoints[model] = make_checkpoint(model, self.root / "checkpoints")
        return self._checkpoints[model]

    def folder(self, photo_set: str, count: int) -> Path:
        key = (photo_set, count)
        if key not in self._folders:
            sources = list(self.sets[photo_set].paths)
            self._folders[key] = image_folder(self.root / f"{photo_set}-{count}", sources, count)
        return self._folders[key]

    @property
    def output(self) -> Path:
        return self.root / "out.h5"


def embed_once(
    ws: Workspace,
    case: RateCase,
    count: int,
    device: str,
    opts: BoxOptions,
    dtype: str | None = None,
    out: Path | None = None,
) -> EmbedRun:
    """One whole `dinoreg.embed` call on `count` inputs, timed; every input must give a row."""
    import dinoreg

    out = out or ws.output
    folder = ws.folder(case.photos, count)
    start = time.perf_counter()
    summary = dinoreg.embed(
        str(folder),
        out,
        model=str(ws.checkpoint(case.model)),
        device=device,
        dtype=dtype or opts.dtype,
        batch_size=opts.batch,
        workers=opts.worker_count,
        decode=case.decode,
        tokens=list(case.tokens),
        overwrite=True,
    )
    seconds = time.perf_counter() - start
    if summary.rows != count:
        raise RuntimeError(f"{case.name}: {summary.rows} rows for {count} inputs")
    return EmbedRun(count, seconds, summary.seconds, summary.times, summary.bytes)


def rate_result(case: RateCase, device: str) -> RateResult:
    return RateResult(
        case=case.name,
        model=case.model,
        photos=case.photos,
        decode=case.decode,
        tokens=list(case.tokens),
        device=device,
    )


def measure_rate(ws: Workspace, case: RateCase, opts: BoxOptions, result: RateResult) -> None:
    """`case` at N1 then N2 inputs into `result`: the rate with start-up cancelled, and the
    N2 run's split."""
    device = result.device
    for count in opts.counts(case.photos):
        run = embed_once(ws, case, count, device, opts)
        ws.output.unlink(missing_ok=True)
        result.runs.append(run)
        log(f"{case.name} on {device}, N={count}: {run.seconds:.2f} s ({run.times})")
    low, high = result.runs
    if high.seconds > low.seconds:
        result.img_s = (high.images - low.images) / (high.seconds - low.seconds)
    times = high.times
    result.decoded_on = str(times.get("decode", ""))
    result.decode_choice = str(times.get("decode_choice", ""))
    loop = sum(float(times.get(k, 0.0)) for k in ("wait_input", "forward", "write"))
    result.wait_input_share = float(times.get("wait_input", 0.0)) / loop if loop > 0 else None


def measure_forward(ws: Workspace, model: str, opts: BoxOptions, result: ForwardResult) -> None:
    """The model alone on random pixels already on the device: the rate `embed` is held to."""
    import torch

    from dinoreg.runtime import ComputeOptions, prepare_model

    compute = ComputeOptions(device=opts.single_device, dtype=opts.dtype, batch_size=opts.batch)
    prepared = prepare_model(str(ws.checkpoint(model)), compute)
    x = torch.randn(opts.batch, 3, 224, 224, device=prepared.device)

    def features(x: torch.Tensor) -> object:
        with prepared.inference():
            return prepared.model.features(x)

    result.img_s = throughput(features, x, opts.forward_seconds)
    log(f"forward {MODELS[model]} batch {opts.batch}: {result.img_s:.0f} img/s")


def cosines(a: Any, b: Any) -> Any:
    """Cosine similarity of matching rows of two (n, D) float arrays, in float64."""
    import numpy as np

    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-30)


def measure_agreement(ws: Workspace, opts: BoxOptions, result: AgreementResult) -> None:
    """decode="gpu" against decode="cpu" into `result`: every token, ViT-S, float32 on the
    device."""
    import numpy as np

    import dinoreg

    photo_set, count = result.photos, result.images
    outputs = {}
    for decode in ("cpu", "gpu"):
        case = RateCase("small", photo_set, decode, ALL_TOKENS)
        out = ws.root / f"agree-{photo_set}-{decode}.h5"
        run = embed_once(ws, case, count, opts.single_device, opts, "float32", out)
        outputs[decode] = out
        if decode == "gpu":
            result.decoded_on = str(run.times.get("decode", ""))
    cls_cos, patch_cos = [], []
    with dinoreg.read(outputs["cpu"]) as ref, dinoreg.read(outputs["gpu"]) as got:
        for r, g in zip(ref, got, strict=True):
            if r.path != g.path:
                raise RuntimeError(f"rows out of step: {r.path} vs {g.path}")
            cls_cos.append(cosines(r.cls[None], g.cls[None]))
            d = r.patches.shape[-1]
            patch_cos.append(cosines(r.patches.reshape(-1, d), g.patches.reshape(-1, d)))
    for out in outputs.values():
        out.unlink(missing_ok=True)
    cls, patches = np.concatenate(cls_cos), np.concatenate(patch_cos)
    result.cls_cos_min = float(cls.min())
    result.patch_cos_min = float(patches.min())
    result.patch_cos_mean = float(patches.mean())
    result.passed = result.cls_cos_min >= CLS_TARGET and result.patch_cos_min >= PATCH_TARGET
    log(
        f"agreement {photo_set}: CLS cos min {result.cls_cos_min:.7f}, patch cos min "
        f"{result.patch_cos_min:.5f} mean {result.patch_cos_mean:.6f}"
    )


def gpu_facts(opts: BoxOptions, sample: Path) -> dict[str, Any]:
    """The card, the versions, and whether torchvision's decode_jpeg works on it."""
    import torch

    from dinoreg.inputs.gpu_decode import _torchvision_problem, decode_jpegs

    facts: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    }
    problem = _torchvision_problem()
    facts["torchvision_problem"] = problem
    if problem is None:
        import torchvision

        facts["torchvision"] = torchvision.__version__
    if problem is not None:
        facts["decode_jpeg_cuda"] = f"not tried: torchvision does not load ({problem})"
    elif not opts.cuda or not torch.cuda.is_available():
        facts["decode_jpeg_cuda"] = "not tried: no CUDA"
    else:
        device = torch.device(opts.single_device)
        data = torch.frombuffer(bytearray(sample.read_bytes()), dtype=torch.uint8)
        try:
            image = decode_jpegs([data], device)[0]
            torch.cuda.synchronize(device)
            facts["decode_jpeg_cuda"] = f"works: {sample.name} -> {tuple(image.shape)}"
        except Exception as exc:
            facts["decode_jpeg_cuda"] = f"fails: {type(exc).__name__}: {exc}"[:300]
    return facts


# ---------------------------------------------------------------------------------------------


def verdicts(report: Report, judged: bool) -> list[Verdict]:
    """Each target against what has been measured so far."""
    out: list[Verdict] = []
    for t in RATE_TARGETS:
        rows = [
            r
            for r in report.rates
            if r.status == "done"
            and (r.model, r.photos) == (t.model, t.photos)
            and r.decode in t.decodes
            and r.tokens == ["cls"]
        ]
        if t.of_forward is not None:
            scored = [(r.of_forward, r) for r in rows if r.of_forward is not None]
            threshold, limit = f">= {100 * t.of_forward:.0f}% of forward", t.of_forward
        else:
            scored = [(r.img_s, r) for r in rows if r.img_s is not None]
            threshold, limit = f">= {t.img_s:,.0f} img/s", t.img_s or 0.0
        best = max(scored, key=lambda s: s[0], default=None)
        value = best[0] if best else None
        basis = f"decode={best[1].decode}" if best else "not measured"
        passed = None if value is None or not judged else value >= limit
        out.append(Verdict(t.key, t.text, value, threshold, basis, passed))
    for a in report.agreement:
        done = a.status == "done"
        out.append(
            Verdict(
                f"agreement_{a.photos}",
                f"GPU decode vs CPU decode, {a.photos} photos: CLS cos min, patch cos min",
                a.patch_cos_min if done else None,
                f"CLS >= {CLS_TARGET}, patch >= {PATCH_TARGET}",
                f"CLS cos min {a.cls_cos_min:.7f}" if done else a.reason or a.status,
                a.passed if done and judged else None,
            )
        )
    m = report.multi_gpu
    if m is not None:
        done = m.status == "done" and m.ratio is not None
        out.append(
            Verdict(
                "multi_gpu",
                f"N GPUs >= {MULTI_GPU_TARGET} N times one (N = {m.devices})",
                m.ratio if done else None,
                f">= {m.target:.2f}x" if m.target else "",
                "ViT-S/14 large decode=gpu" if done else m.reason or m.status,
                (m.ratio >= m.target) if done and judged and m.target else None,
            )
        )
    return out


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _rate(value: float | None) -> str:
    """Images/s: whole numbers on a GPU, two decimals for a CPU smoke run's few."""
    return _num(value, ",.0f" if value is not None and value >= 100 else ".2f")


def _result(passed: bool | None) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "n/a"}[passed]


def render(report: Report) -> str:
    env, opts, gpu = report.environment, report.options, report.gpu
    lines = [
        "# dinoreg on a GPU box: every target of the GPU issue",
        "",
        f"{', '.join(gpu.get('names', [])) or 'no GPU'} ({gpu.get('device_count', 0)} visible); "
        f"{env['cpu']}, {env['cores']} cores; torch {gpu.get('torch')} (CUDA "
        f"{gpu.get('torch_cuda')}), torchvision {gpu.get('torchvision', 'not loaded')}; "
        f"decode_jpeg on CUDA: {gpu.get('decode_jpeg_cuda', '')}; Python {env['python']}.",
        "",
        f"Options: {' '.join(f'{k}={v}' for k, v in opts.items())}"
        + ("" if report.finished else " (**unfinished**: the steps so far)"),
        "",
        "Photo sets: "
        + "; ".join(
            f"`{p['name']}` {p['count']} JPEGs, {p['megapixels_min']}-{p['megapixels_max']} MP, "
            f"{p['origin']}"
            for p in report.photos.values()
        ),
        "",
        "## Targets",
        "",
        "| target | measured | threshold | from | result |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for v in report.targets:
        if v.value is None:
            shown = ""
        elif "forward" in v.threshold:
            shown = f"{100 * v.value:.1f}%"
        elif "img/s" in v.threshold:
            shown = f"{_rate(v.value)} img/s"
        elif v.key == "multi_gpu":
            shown = f"{v.value:.2f}x"
        else:
            shown = f"{v.value:.5f}"
        lines.append(f"| {v.text} | {shown} | {v.threshold} | {v.basis} | {_result(v.passed)} |")
    lines += [
        "",
        f"## End to end against forward-only ({opts['dtype']}, start-up cancelled)",
        "",
        "| case | N1 / N2 | t1 / t2 s | embed img/s | forward img/s | of forward | decoded on "
        "| waited on input | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for r in report.rates:
        counts = " / ".join(str(run.images) for run in r.runs)
        seconds = " / ".join(f"{run.seconds:.2f}" for run in r.runs)
        status = r.status if r.status == "done" else f"{r.status}: {r.reason}"
        lines.append(
            f"| {r.case} | {counts} | {seconds} | {_rate(r.img_s)} | "
            f"{_rate(r.forward_img_s)} | "
            f"{'' if r.of_forward is None else f'{100 * r.of_forward:.1f}%'} | {r.decoded_on} | "
            f"{'' if r.wait_input_share is None else f'{100 * r.wait_input_share:.0f}%'} | "
            f"{status} |"
        )
    choices = [f"- {r.case}: {r.decode_choice}" for r in report.rates if r.decode_choice]
    lines += [
        "",
        f"embed img/s = (N2 - N1) / (t2 - t1), t the wall seconds of the whole `dinoreg.embed` "
        f"call; {opts['batch']} images a batch, {opts['workers']} decode workers, the CLS token "
        "only (float32 to HDF5) unless the case says all tokens. Forward: `model.features` alone "
        "on random pixels on the device, same batch and dtype. Waited on input: the N2 run's "
        "wait_input over its batch loop.",
        *(["", "decode=auto measured:", "", *choices] if choices else []),
        "",
        "## Forward-only",
        "",
        "| model | batch | img/s | status |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {MODELS.get(f.model, f.model)} | {f.batch} | {_rate(f.img_s)} | "
            f"{f.status if f.status == 'done' else f'{f.status}: {f.reason}'} |"
            for f in report.forward
        ),
        "",
        "## GPU decode against CPU decode (ViT-S/14 shape, float32 on the device)",
        "",
        "| photos | images | decoded on | CLS cos min | patch cos min | patch cos mean | status |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
        *(
            f"| {a.photos} | {a.images} | {a.decoded_on} | {_num(a.cls_cos_min, '.7f')} | "
            f"{_num(a.patch_cos_min, '.5f')} | {_num(a.patch_cos_mean, '.6f')} | "
            f"{a.status if a.status == 'done' else f'{a.status}: {a.reason}'} |"
            for a in report.agreement
        ),
        "",
    ]
    m = report.multi_gpu
    if m is not None:
        lines += ["## Several GPUs", ""]
        if m.status != "done":
            lines.append(f"{m.status}: {m.reason}")
        else:
            one, every = m.one, m.all
            lines.append(
                f"ViT-S/14, large photos, decode=gpu: {m.devices} GPUs "
                f"{_rate(every.img_s if every else None)} img/s, one "
                f"{_rate(one.img_s if one else None)} img/s: {_num(m.ratio, '.2f')}x "
                f"(target {_num(m.target, '.2f')}x)."
            )
        lines.append("")
    total = env.get("total_seconds")
    if total is not None:
        lines += [f"Total wall time {total:.0f} s.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def run_rates(ws: Workspace, opts: BoxOptions, report: Report, budget: Budget) -> None:
    """Each model's forward-only rate, then its embed cases, saving after every step."""
    forward: dict[str, ForwardResult] = {}
    for case in RATE_CASES:
        if case.model not in forward:
            f = forward[case.model] = ForwardResult(model=case.model, batch=opts.batch)
            report.forward.append(f)
            attempt(f, budget, lambda f=f: measure_forward(ws, f.model, opts, f))
            report.save(opts.out, opts.cuda)
        skip = NO_CUDA if case.decode == "gpu" and not opts.cuda else ""
        result = rate_result(case, opts.single_device)
        report.rates.append(result)

        def work(case: RateCase = case, result: RateResult = result) -> None:
            measure_rate(ws, case, opts, result)
            result.forward_img_s = forward[case.model].img_s
            if result.forward_img_s and result.img_s is not None:
                result.of_forward = result.img_s / result.forward_img_s

        attempt(result, budget, work, skip)
        report.save(opts.out, opts.cuda)


def run_agreement(ws: Workspace, opts: BoxOptions, report: Report, budget: Budget) -> None:
    for photo_set in ("large", "dataset"):
        result = AgreementResult(photos=photo_set, images=len(ws.sets[photo_set].paths))
        report.agreement.append(result)
        attempt(
            result,
            budget,
            lambda result=result: measure_agreement(ws, opts, result),
            "" if opts.cuda else NO_CUDA,
        )
        report.save(opts.out, opts.cuda)


def run_multi_gpu(ws: Workspace, opts: BoxOptions, report: Report, budget: Budget) -> None:
    import torch

    count = torch.cuda.device_count() if opts.cuda and torch.cuda.is_available() else 0
    result = report.multi_gpu = MultiGpuResult(devices=count)
    skip = "" if count > 1 else "one GPU: not measured" if count == 1 else "no CUDA"
    case = RateCase("small", "large", "gpu")

    def work() -> None:
        result.one, result.all = rate_result(case, "cuda:0"), rate_result(case, "cuda")
        measure_rate(ws, case, opts, result.one)
        measure_rate(ws, case, opts, result.all)
        result.target = MULTI_GPU_TARGET * count
        if result.one.img_s and result.all.img_s is not None:
            result.ratio = result.all.img_s / result.one.img_s

    attempt(result, budget, work, skip)
    report.save(opts.out, opts.cuda)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    budget = Budget(opts.budget_s)
    # Inputs first, before torch is imported: a bad --images fails in well under a second.
    large, dataset = photos.photo_sets(opts.cache, opts.images)
    sets = {s.name: s for s in (large, dataset)}
    for s in sets.values():
        for p in s.paths:
            p.read_bytes()  # the page cache: every timed run finds its inputs in memory
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    options |= {"batch": opts.batch, "workers": opts.worker_count, "dtype": opts.dtype}
    report = Report(options, environment())
    report.photos = {name: s.describe() for name, s in sets.items()}
    report.gpu = gpu_facts(opts, dataset.paths[0])  # a baseline JPEG, whatever --images holds
    if opts.cuda and not report.gpu["cuda_available"]:
        raise SystemExit(f"--device {opts.device}: no CUDA device visible (--device cpu smokes)")
    log(f"{report.gpu}")
    report.save(opts.out, opts.cuda)
    with tempfile.TemporaryDirectory(prefix="gpubox-") as tmp:
        ws = Workspace(Path(tmp), sets)
        # Agreement first: short, and the first decode on the device (a broken GPU path shows
        # in seconds); it also pays the embed path's one-off costs before anything is timed.
        run_agreement(ws, opts, report, budget)
        run_rates(ws, opts, report, budget)
        run_multi_gpu(ws, opts, report, budget)
    if hasattr(os, "getloadavg"):
        report.environment["loadavg_end"] = list(os.getloadavg())
    report.environment["total_seconds"] = round(budget.elapsed, 1)
    report.finished = True
    report.save(opts.out, opts.cuda)
    print((opts.out / "gpubox.md").read_text())
    log(f"wrote {opts.out / 'gpubox.md'} and gpubox.json in {budget.elapsed:.0f} s")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> BoxOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="gpubox.json and gpubox.md go here")
    p.add_argument("--images", type=Path, default=None, help="large JPEGs (default: generated)")
    p.add_argument("--cache", type=Path, default=Path("bench-out"), help="generated photos")
    p.add_argument("--quick", action="store_true", help="one and two batches per case")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (a smoke)")
    p.add_argument("--budget-s", type=float, default=480.0, help="no step starts after this")
    p.add_argument("--batch-size", type=int, default=None, help="256 on CUDA, 2/8 on the CPU")
    p.add_argument("--workers", type=int, default=None, help="decode workers (cores - 1)")
    p.add_argument("--forward-s", type=float, default=None, help="seconds per forward rate")
    a = p.parse_args(argv)
    return BoxOptions(
        out=a.out,
        images=a.images,
        cache=a.cache,
        quick=a.quick,
        device=a.device,
        budget_s=a.budget_s,
        batch_size=a.batch_size,
        workers=a.workers,
        forward_s=a.forward_s,
    )


if __name__ == "__main__":
    sys.exit(main())
