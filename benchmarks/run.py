"""dinoreg against the transformers reference, side by side in one run.

    python benchmarks/run.py                    # all sections, a few minutes on 2 CPU cores
    python benchmarks/run.py --quick            # a short run (small model only), under a minute
    python benchmarks/run.py --sections forward --sizes small,base --out bench-out

Writes `results.md` (tables) and `results.json` (every number, raw timings included) under
`--out`, and prints the markdown. Each section is a module with `run(Options) -> Section`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmark this checkout's dinoreg and the helper modules

from benchmarks import coldstart, endtoend, forward, report  # noqa: E402
from benchmarks.common import Options, environment  # noqa: E402

SECTIONS = {
    "forward": forward.run,
    "embed": endtoend.run_embed,
    "memory": endtoend.run_memory,
    "coldstart": coldstart.run,
    "classify": endtoend.run_classify_start,
}


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
    )
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    env = environment()
    started = time.perf_counter()
    sections = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        sections.append(SECTIONS[name](opts))
        print(f"[bench] {name} done in {sections[-1].seconds:.0f} s", file=sys.stderr, flush=True)
    if hasattr(os, "getloadavg"):
        env["loadavg_end"] = list(os.getloadavg())
    env["total_seconds"] = time.perf_counter() - started
    arguments = {
        "sections": ",".join(names),
        "sizes": ",".join(opts.sizes),
        "batches": ",".join(map(str, opts.batches)),
        "image_size": opts.image_size,
        "quick": opts.quick,
        "threads": opts.threads or "default",
    }
    md = report.write(args.out, env, arguments, sections)
    print(md)
    print(f"[bench] wrote {args.out / 'results.md'} and results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
