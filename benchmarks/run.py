"""dinoreg against the transformers reference, side by side in one run.

    python benchmarks/run.py                    # all sections, a few minutes on 2 CPU cores
    python benchmarks/run.py --quick            # a short run (small model only), under a minute
    python benchmarks/run.py --sections forward --sizes small,base --out bench-out
    python benchmarks/run.py --images DIR       # embed reads these large JPEGs instead

Needs nothing outside the repository: `embed` reads 1.3-4.9 MP JPEGs that `benchmarks/photos.py`
generates from examples/images (cached under `--out`/photos). Inputs are checked before anything
is measured. Writes `results.md` (tables) and `results.json` (every number, raw timings
included) under `--out` after every section, so an interrupted run keeps what it finished, and
prints the markdown. Each section is a module with `run(Options) -> Section`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmark this checkout's dinoreg and the helper modules

from benchmarks import endtoend, photos, report  # noqa: E402  (no torch: imports stay fast)
from benchmarks.common import Options, Section, environment  # noqa: E402

# name -> (module, function), imported only after the inputs are checked: `forward` imports
# torch and transformers, which takes seconds that a wrong --images should not wait for.
SECTIONS: dict[str, tuple[str, str]] = {
    "forward": ("benchmarks.forward", "run"),
    "embed": ("benchmarks.endtoend", "run_embed"),
    "memory": ("benchmarks.endtoend", "run_memory"),
    "coldstart": ("benchmarks.coldstart", "run"),
    "classify": ("benchmarks.endtoend", "run_classify_start"),
}


def section(name: str) -> Callable[[Options], Section]:
    module, function = SECTIONS[name]
    return getattr(importlib.import_module(module), function)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    p.add_argument("--quick", action="store_true", help="short run: small model, few repeats")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, from: {', '.join(SECTIONS)} (default: all)",
    )
    p.add_argument("--sizes", default=None, help="model sizes (default small,base; quick: small)")
    p.add_argument("--batches", default="1,32", help="batch sizes of the forward section")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--images",
        type=Path,
        default=None,
        help="a folder of large JPEGs for `embed` (default: generated from examples/images)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2
    sizes = args.sizes or ("small" if args.quick else "small,base")
    opts = Options(
        quick=args.quick,
        sizes=tuple(s.strip() for s in sizes.split(",")),
        batches=tuple(int(b) for b in args.batches.split(",")),
        image_size=args.image_size,
        threads=args.threads,
        out=args.out,
        images=args.images,
    )
    # Inputs first: a wrong --images or an incomplete checkout must fail now, not after the
    # sections before `embed` have run for minutes.
    large = None
    if "embed" in names:
        large = endtoend.large_set(opts)
        print(f"[bench] photos: {large.describe()}", file=sys.stderr, flush=True)
    if "memory" in names or "classify" in names:
        photos.sources()
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    env = environment()
    started = time.perf_counter()
    arguments = {
        "sections": ",".join(names),
        "sizes": ",".join(opts.sizes),
        "batches": ",".join(map(str, opts.batches)),
        "image_size": opts.image_size,
        "quick": opts.quick,
        "threads": opts.threads or "default",
        "images": large.origin if large else "-",
    }
    sections = []
    md = ""
    for i, name in enumerate(names):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        sections.append(section(name)(opts))
        print(f"[bench] {name} done in {sections[-1].seconds:.0f} s", file=sys.stderr, flush=True)
        if hasattr(os, "getloadavg"):
            env["loadavg_end"] = list(os.getloadavg())
        env["total_seconds"] = time.perf_counter() - started
        # Rewrite the report after every section: an interrupted run keeps what it finished.
        pending = names[i + 1 :]
        md = report.write(
            args.out, env, {**arguments, "not_run_yet": ",".join(pending) or "-"}, sections
        )
    print(md)
    print(f"[bench] wrote {args.out / 'results.md'} and results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
