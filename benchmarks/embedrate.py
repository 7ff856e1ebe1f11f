"""The CPU rate targets in one run: `embed` against the model's forward-only rate, large photos
against model-size JPEGs, and `embed` against the transformers recipe, start-up cancelled.

    python benchmarks/embedrate.py                    # about 10 minutes on 2 idle cores
    python benchmarks/embedrate.py --quick            # one round, 1 and 2 batches: 1.5 min
    python benchmarks/embedrate.py --dtype bfloat16   # the model in bf16 (weights cast on CPU)
    python benchmarks/embedrate.py --images DIR       # large JPEGs of your own instead

Every rate is measured the same way: the work is timed at two input counts N1 < N2 (whole
batches: 2 and 6 batches, `--quick` 1 and 2) and the rate is (N2 - N1) / (t2 - t1), the extra
images over the extra seconds, so that what a run pays once (imports, model load, starting the
decode workers, the first batch's wait) cancels. The cases, timed interleaved round by round
(order reversed every other round) and reported as the median of the rounds' rates:

- forward: the model alone in this process, built from the same checkpoint as `prepare_model`
  builds it on CPU (precision, CPU fast paths), `model.features` on random normalised pixels,
  N / batch batches, torch's default threads (what `embed` uses);
- embed 224: `python -m dinoreg embed` in a fresh process on N 224x224 JPEGs (quality 90,
  `photos.square_photos`: the large set and the shipped photos re-encoded), default workers and
  tokens (cls, registers, patches), float32 stored to HDF5, `--device cpu`;
- embed large: the same on N of the 1.3-4.9 MP photos (`photos.large_photos`, or `--images`);
- transformers: the transformers recipe (`endtoend.HF_RECIPE`) on the same N large photos.

Each folder holds N hard links to its set, cycled and named apart (`endtoend.image_folder`); the
page cache is warm (the sources are read once before anything is timed). The model has the real
ViT's shapes with random weights, saved as a transformers checkpoint (`endtoend.make_checkpoint`)
that both `embed` and the recipe load. Writes `--out`/embedrate.{json,md} and prints the markdown.

Targets: embed 224 >= 95% of forward; embed large >= 85% of embed 224; embed large >= 1.4x the
transformers recipe in float32 (with another `--dtype` that row is shown, not judged).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmark this checkout's dinoreg and the helper modules

from benchmarks import photos  # noqa: E402  (numpy and Pillow only: the check below is fast)
from benchmarks.common import environment  # noqa: E402  (imports torch when called)
from benchmarks.endtoend import (  # noqa: E402  (no torch at import)
    SIZES,
    embed_args,
    image_folder,
    make_checkpoint,
    recipe_args,
    timed,
)

# (name, what it is measured against, the lowest passing ratio)
TARGETS: dict[str, tuple[str, float]] = {
    "embed_224": ("forward", 0.95),
    "embed_large": ("embed_224", 0.85),
    "embed_vs_transformers": ("transformers", 1.4),
}


@dataclass(frozen=True)
class RateOptions:
    out: Path = Path("bench-out")
    images: Path | None = None  # large JPEGs; None: generated from examples/images
    quick: bool = False
    model: str = "small"  # endtoend.SIZES: small, base, large
    dtype: str = "float32"  # float32 | bfloat16 | auto (float32 on CPU)
    batch_size: int = 32
    repeats: int = 3

    @property
    def reps(self) -> int:
        return 1 if self.quick else self.repeats

    @property
    def counts(self) -> tuple[int, int]:
        """N1, N2 inputs: whole batches, so that no case pays for a short last batch."""
        low, high = (1, 2) if self.quick else (2, 6)
        return low * self.batch_size, high * self.batch_size


@dataclass
class Case:
    """One thing timed at one input count; `run` does it and returns its wall seconds."""

    name: str  # forward, embed_224, embed_large, transformers
    count: int
    run: Callable[[], float]
    times: list[float] = field(default_factory=list)


@dataclass
class Report:
    options: dict[str, Any]
    environment: dict[str, Any]
    photos: dict[str, Any]
    counts: tuple[int, int]
    times: dict[str, dict[int, list[float]]] = field(default_factory=dict)  # name -> N -> s
    rates: dict[str, float] = field(default_factory=dict)  # img/s, median over rounds
    round_rates: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    # set name -> an in-process `dinoreg.embed` run's stage seconds (`RunSummary.times`)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **asdict(self),
        }
        (out / "embedrate.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        (out / "embedrate.md").write_text(self.render())

    def render(self) -> str:
        env, opts = self.environment, self.options
        n1, n2 = self.counts
        load = env.get("loadavg_start", [0.0])[0]
        end = env.get("loadavg_end", [0.0])[0]
        r = self.rates
        rows = [
            ("forward only, `model.features`", r["forward"], "", None),
            ("`embed`, 224x224 JPEGs", r["embed_224"], "of forward only", "embed_224"),
            ("`embed`, large photos", r["embed_large"], "of embed 224", "embed_large"),
            ("transformers recipe, large photos", r["transformers"], "", None),
            ("`embed` / transformers recipe, large photos", None, "", "embed_vs_transformers"),
        ]
        table = [
            "| measure | img/s | ratio | target | result |",
            "| --- | ---: | ---: | --- | --- |",
        ]
        for label, rate, against, key in rows:
            cells = [label, "" if rate is None else f"{rate:.2f}", "", "", ""]
            if key is not None:
                ratio = self.ratios[key]
                if key == "embed_vs_transformers":
                    cells[2] = f"{ratio['ratio']:.2f}x"
                    cells[3] = f">= {ratio['target']}x ({ratio['target_dtype']})"
                else:
                    cells[2] = f"{100 * ratio['ratio']:.1f}% {against}"
                    cells[3] = f">= {100 * ratio['target']:.0f}%"
                cells[4] = {True: "**pass**", False: "**FAIL**", None: "n/a"}[ratio["passed"]]
            table.append("| " + " | ".join(cells) + " |")
        times = [
            f"| {name} | " + " | ".join(f"{statistics.median(t[n]):.2f}" for n in (n1, n2)) + " |"
            for name, t in self.times.items()
        ]
        n_rounds = len(next(iter(self.round_rates.values()), []))
        rounds = [
            f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |"
            for name, values in self.round_rates.items()
        ]
        stages = []
        for name, t in self.stages.items():
            loop = sum(t.get(k, 0.0) for k in ("wait_input", "forward", "write")) or 1.0
            stages.append(
                f"| {name} | {100 * t.get('forward', 0.0) / loop:.1f}% | "
                f"{100 * t.get('wait_input', 0.0) / loop:.1f}% | "
                f"{100 * t.get('write', 0.0) / loop:.2f}% |"
            )
        lines = [
            "# dinoreg embed rates on CPU",
            "",
            f"{env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, torch "
            f"{env['torch']}, transformers {env['transformers']}, Python {env['python']}; "
            f"1-minute load average at the start {load:.2f}, at the end {end:.2f} (other work on "
            "the machine makes every rate noisier; `--quick` differs by one batch: a smoke test).",
            "",
            f"Options: {' '.join(f'{k}={v}' for k, v in opts.items())}",
            "",
            photos.sets_line(self.photos.values()),
            "",
            f"## Rates, ViT {opts['model']} at 224, {opts['dtype']}, batch {opts['batch_size']}",
            "",
            *table,
            "",
            f"Each rate is (N2 - N1) / (t2 - t1) with N1 = {n1} and N2 = {n2} images, t the wall "
            "seconds of the whole run (a fresh process for `embed` and the recipe, imports and "
            "model load included; the forward loop in this process), so start-up cancels; the "
            f"median over {n_rounds} interleaved round(s). "
            "`embed` stores all tokens (cls, registers, patches) in float32 to HDF5 with its "
            "default decode workers; the recipe writes the same with h5py.",
            "",
            "## Wall seconds (median)",
            "",
            f"| case | N = {n1} | N = {n2} |",
            "| --- | ---: | ---: |",
            *times,
            "",
            "## Each round's rate (img/s)",
            "",
            "| case | " + " | ".join(f"round {i + 1}" for i in range(n_rounds)) + " |",
            "| --- |" + " ---: |" * n_rounds,
            *rounds,
            "",
            "## Where an `embed` run's loop time goes",
            "",
            "| set | forward pass | waiting on decode workers | handing rows to the writer |",
            "| --- | ---: | ---: | ---: |",
            *stages,
            "",
            f"`dinoreg.embed` in this process on N = {n2} images of each set, the same options "
            "(`RunSummary.times`): the share of the batch loop's wall time in the forward pass "
            "(normalising the uint8 batch, the model, the rows' cast), waiting for the next batch "
            "from the decode workers, and queueing rows for the writer's thread. Read beside the "
            "rates: what the model did not wait for cannot have slowed the run.",
        ]
        return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------


def interleave(cases: list[Case], reps: int) -> None:
    """Run every case `reps` times, alternating them (order reversed every other round) as
    `common.time_interleaved` does, but each case times itself, so that checks and clean-up
    around a subprocess stay outside its seconds."""
    for r in range(reps):
        for case in cases if r % 2 == 0 else reversed(cases):
            seconds = case.run()
            case.times.append(seconds)
            print(
                f"[embedrate] round {r + 1}/{reps} {case.name} N={case.count}: {seconds:.2f} s",
                file=sys.stderr,
                flush=True,
            )


def forward_case(opts: RateOptions, count: int, prepared: Any) -> Case:
    """`count` images through the model alone, in batches of `opts.batch_size`."""
    import torch

    batches = count // opts.batch_size
    x = torch.randn(opts.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def run() -> float:
        start = time.perf_counter()
        with prepared.inference():
            for _ in range(batches):
                prepared.model.features(x)
        return time.perf_counter() - start

    return Case("forward", count, run)


def subprocess_case(name: str, count: int, cmd: Callable[[Path], list[str]], out: Path) -> Case:
    """A fresh process writing `count` images to the HDF5 file `out`, timed from start to exit;
    the file must hold one row per image (a skipped input would inflate the rate)."""
    import h5py

    # this checkout's dinoreg whatever the working directory; the checkpoint is local
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"}

    def run() -> float:
        out.unlink(missing_ok=True)
        seconds, _rss = timed(cmd(out), env)
        with h5py.File(out, "r") as f:
            rows = f["cls"].shape[0]
        if rows != count:
            raise SystemExit(f"{name} at N={count}: {rows} rows written, expected {count}")
        out.unlink()
        return seconds

    return Case(name, count, run)


def stage_times(folder: Path, out: Path, ckpt: Path, opts: RateOptions) -> dict[str, Any]:
    """`RunSummary.times` of an in-process `dinoreg.embed` of `folder`, as the CLI runs it."""
    import dinoreg

    summary = dinoreg.embed(
        str(folder),
        out,
        model=str(ckpt),
        device="cpu",
        dtype=opts.dtype,
        batch_size=opts.batch_size,
        overwrite=True,
    )
    return summary.times


def rate(cases: list[Case], name: str, counts: tuple[int, int]) -> list[float]:
    """(N2 - N1) / (t2 - t1) of each round; nan where load made t2 <= t1."""
    by_count = {c.count: c.times for c in cases if c.name == name}
    low, high = (by_count[n] for n in counts)
    extra = counts[1] - counts[0]
    return [extra / (b - a) if b > a else float("nan") for a, b in zip(low, high, strict=True)]


def judge(rates: dict[str, float], dtype: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, (against, target) in TARGETS.items():
        ours = rates["embed_large"] if key == "embed_vs_transformers" else rates[key]
        ratio = ours / rates[against]
        passed: bool | None = ratio >= target
        if key == "embed_vs_transformers" and dtype != "float32":
            passed = None  # the target is set in float32
        out[key] = {"ratio": ratio, "against": against, "target": target, "passed": passed}
    out["embed_vs_transformers"]["target_dtype"] = "float32"
    return out


def measure(
    large: photos.PhotoSet, square: photos.PhotoSet, opts: RateOptions, report: Report
) -> None:
    import torch

    from dinoreg.runtime import ComputeOptions, choose_dtype, prepare_model

    counts = report.counts
    dtype = str(choose_dtype(opts.dtype, torch.device("cpu"))).removeprefix("torch.")
    report.options["dtype"] = dtype
    for p in (*large.paths, *square.paths):
        p.read_bytes()  # the page cache: every timed run finds its inputs in memory
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("[embedrate] checkpoint ...", file=sys.stderr, flush=True)
        ckpt = make_checkpoint(opts.model, work)
        compute = ComputeOptions(device="cpu", dtype=dtype, batch_size=opts.batch_size)
        prepared = prepare_model(str(ckpt), compute)
        with prepared.inference():  # oneDNN's first-call set-up, outside every timing
            prepared.model.features(torch.zeros(opts.batch_size, 3, 224, 224))

        def embed(folder: Path) -> Callable[[Path], list[str]]:
            return lambda out: embed_args(
                folder, out, ckpt, opts.batch_size, dtype, "--device", "cpu"
            )

        def recipe(folder: Path) -> Callable[[Path], list[str]]:
            return lambda out: recipe_args(folder, out, ckpt, opts.batch_size, dtype)

        square_in = {n: image_folder(work / f"square-{n}", list(square.paths), n) for n in counts}
        large_in = {n: image_folder(work / f"large-{n}", list(large.paths), n) for n in counts}
        # each case at N1 then N2, the cases in the order of the report's table
        cases = [forward_case(opts, n, prepared) for n in counts]
        for name, command, inputs in (
            ("embed_224", embed, square_in),
            ("embed_large", embed, large_in),
            ("transformers", recipe, large_in),
        ):
            cases += [
                subprocess_case(name, n, command(inputs[n]), work / f"{name}-{n}.h5")
                for n in counts
            ]
        interleave(cases, opts.reps)
        for name, inputs in (("224x224 JPEGs", square_in), ("large photos", large_in)):
            report.stages[name] = stage_times(inputs[counts[1]], work / "stages.h5", ckpt, opts)
    for c in cases:
        report.times.setdefault(c.name, {})[c.count] = c.times
    for name in report.times:
        report.round_rates[name] = rate(cases, name, counts)
        report.rates[name] = statistics.median(report.round_rates[name])
    report.ratios = judge(report.rates, dtype)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> RateOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--images", type=Path, default=None, help="large JPEGs (default: generated)")
    p.add_argument("--quick", action="store_true", help="one round, 1 and 2 batches")
    p.add_argument("--model", default="small", choices=list(SIZES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (quick: 1)")
    a = p.parse_args(argv)
    return RateOptions(a.out, a.images, a.quick, a.model, a.dtype, a.batch_size, a.repeats)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.perf_counter()
    # Inputs first, before torch is imported: a bad --images fails in well under a second.
    large = photos.check_folder(opts.images) if opts.images else photos.large_photos(opts.out)
    square = photos.square_photos(opts.out, large)
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    sets = {s.name: s.describe() for s in (large, square)}
    report = Report(options, environment(), sets, opts.counts)
    measure(large, square, opts, report)
    if hasattr(os, "getloadavg"):
        report.environment["loadavg_end"] = list(os.getloadavg())
    report.environment["total_seconds"] = round(time.perf_counter() - started, 1)
    report.save(opts.out)
    print((opts.out / "embedrate.md").read_text())
    print(f"[embedrate] wrote {opts.out / 'embedrate.md'} and embedrate.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
