"""GPU benchmarks (run where CUDA is available): forward throughput of dinoreg vs transformers on
identical random weights with the real shapes, as a fraction of the card's matmul peak measured
in the same run; a batch-size sweep; bf16 vs fp16; torch.compile on/off; and `dinoreg.embed` end
to end over real JPEGs against forward-only throughput, with the time split per stage.

`python benchmarks/gpu.py --out bench-out [--images DIR]`

`embed` and `aspect` read 1.3-4.9 MP JPEGs generated from examples/images (`benchmarks/photos.py`,
cached under `--out`/photos) unless `--images DIR` names a folder of large JPEGs; either is
checked before the first measurement. `gpu.json` is rewritten after every section, so an
interrupted run keeps the sections it finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # run as a script: this checkout's dinoreg and helpers

from benchmarks import photos  # noqa: E402
from benchmarks.endtoend import SIZES, make_checkpoint  # noqa: E402

# torch is imported inside the functions: `main` checks the photos first, in well under a second.
DTYPES = ("bfloat16", "float16")


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def matmul_peak(dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """TFLOP/s of a large square matmul, the ceiling the forward is compared with."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def flops_per_image(dim: int, depth: int, tokens: int = 261, patches: int = 256) -> float:
    """Multiply-adds x 2 of one 224x224 forward: projections, attention, MLP, patch embedding."""
    per_block = 24 * tokens * dim**2 + 4 * tokens**2 * dim
    return depth * per_block + 2 * patches * 3 * 14 * 14 * dim


def throughput(fn, x: torch.Tensor, seconds: float = 3.0) -> float:
    """Images/s of fn(x), after warm-up, over about `seconds` (synchronised where x is on CUDA,
    so that `gpubox.py`'s CPU smoke run can use it too)."""
    import torch

    def sync() -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    for _ in range(3):
        fn(x)
    sync()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn(x)
        n += 1
    sync()
    return n * x.shape[0] / (time.perf_counter() - t)


def forward_section(work: Path, peaks: dict[str, float], batches: list[int]) -> list[dict]:
    import torch
    from transformers import Dinov2WithRegistersModel

    import dinoreg

    rows = []
    for size in ("small", "base", "large"):
        ckpt = make_checkpoint(size, work)
        dim, depth, _ = SIZES[size]
        gflop = flops_per_image(dim, depth) / 1e9
        ours = dinoreg.load_model(str(ckpt), device="cuda")
        theirs = Dinov2WithRegistersModel.from_pretrained(ckpt, attn_implementation="sdpa")
        theirs = theirs.cuda().eval()
        for dtype_name in ("bfloat16", "float16"):
            dtype = getattr(torch, dtype_name)
            for batch in batches if dtype_name == "bfloat16" else [max(batches)]:
                x = torch.randn(batch, 3, 224, 224, device="cuda")

                def run_ours(x, dtype=dtype, model=ours):
                    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                        return model.forward_features(x)

                def run_theirs(x, dtype=dtype, model=theirs):
                    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                        return model(pixel_values=x).last_hidden_state

                a, b = throughput(run_ours, x), throughput(run_theirs, x)
                row = {
                    "model": size,
                    "dtype": dtype_name,
                    "batch": batch,
                    "dinoreg_img_s": round(a),
                    "transformers_img_s": round(b),
                    "ratio": round(a / b, 3),
                    "dinoreg_tflops": round(a * gflop / 1e3, 1),
                    "peak_fraction": round(a * gflop / 1e3 / peaks[dtype_name], 3),
                }
                rows.append(row)
                log(row)
        del ours, theirs
        torch.cuda.empty_cache()
    return rows


def compile_section(work: Path, peaks: dict[str, float], batch: int) -> list[dict]:
    import torch

    import dinoreg

    rows = []
    ckpt = work / "large"
    gflop = flops_per_image(*SIZES["large"][:2]) / 1e9
    for compiled in (False, True):
        model = dinoreg.load_model(str(ckpt), device="cuda")
        fn = torch.compile(model.forward_features) if compiled else model.forward_features
        x = torch.randn(batch, 3, 224, 224, device="cuda")

        def run(x, fn=fn):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return fn(x)

        t = time.perf_counter()
        run(x)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        ips = throughput(run, x)
        rows.append(
            {
                "model": "large",
                "batch": batch,
                "compile": compiled,
                "img_s": round(ips),
                "first_call_s": round(first, 1),
                "peak_fraction": round(ips * gflop / 1e3 / peaks["bfloat16"], 3),
            }
        )
        log(rows[-1])
    return rows


def embed_section(
    work: Path, images: Path, count: int, batch: int, workers: int, decodes: list[str]
) -> list[dict]:
    import dinoreg

    folder = work / "jpegs"
    folder.mkdir()
    sources = photos.jpegs(images)
    for i in range(count):
        shutil.copyfile(sources[i % len(sources)], folder / f"{i:05d}.jpg")
    rows = []
    for size in ("small", "large"):
        ckpt = work / size
        for exact in [d == "exact" for d in decodes]:
            out = work / f"{size}-{exact}.h5"
            s = dinoreg.embed(
                folder,
                out,
                model=str(ckpt),
                device="cuda",
                dtype="bfloat16",
                batch_size=batch,
                workers=workers,
                exact_decode=exact,
                tokens=["cls", "registers", "patches"],
            )
            loop = sum(s.times.get(k, 0.0) for k in ("wait_input", "forward", "write"))
            rows.append(
                {
                    "model": size,
                    "decode": "exact" if exact else "reduced",
                    "images": count,
                    "img_s_total": round(s.rows / s.seconds, 1),
                    "img_s_loop": round(s.rows / loop, 1),
                    "times": s.times,
                    "workers": workers,
                    "batch": batch,
                }
            )
            log(rows[-1])
    return rows


def aspect_section(work: Path, images: Path) -> dict:
    """--keep-aspect on the GPU: mixed grids, bf16, pinned memory; rows checked for sanity."""
    import numpy as np

    import dinoreg

    out = work / "aspect.h5"
    s = dinoreg.embed(
        photos.jpegs(images),
        out,
        model=str(work / "small"),
        device="cuda",
        dtype="bfloat16",
        keep_aspect=True,
        image_size=448,
        batch_size=8,
        workers=8,
    )
    rows = list(dinoreg.read(out))
    ok = all(np.isfinite(r.patches).all() and r.patches.shape[0] * 14 >= 448 for r in rows)
    result = {
        "rows": s.rows,
        "grids": sorted({r.patches.shape[:2] for r in rows}),
        "finite": ok,
        "seconds": round(s.seconds, 1),
    }
    log(result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument(
        "--images", type=Path, default=None, help="large JPEGs (default: generated, photos.py)"
    )
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--sections", default="forward,compile,embed")
    parser.add_argument("--decodes", default="reduced,exact")
    args = parser.parse_args()
    sections = args.sections.split(",")
    images = None
    if "embed" in sections or "aspect" in sections:  # before any measuring: fail in a second
        large = photos.check_folder(args.images) if args.images else photos.large_photos(args.out)
        images = large.folder
        log(large.describe())
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to measure")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if images is not None:
        results["photos"] = large.describe()

    def save() -> None:  # after every section: an interrupted run keeps what it finished
        (args.out / "gpu.json").write_text(json.dumps(results, indent=1))

    results["peak_tflops"] = peaks = {k: round(matmul_peak(getattr(torch, k)), 1) for k in DTYPES}
    log(peaks)
    save()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "forward" in sections:
            results["forward"] = forward_section(work, peaks, [32, 64, 128, 256, 512])
            save()
        else:
            make_checkpoint("small", work)
            make_checkpoint("large", work)
        if "compile" in sections:
            results["compile"] = compile_section(work, peaks, 256)
            save()
        if images is not None and "embed" in sections:
            results["embed"] = embed_section(
                work, images, args.count, 256, args.workers, args.decodes.split(",")
            )
            save()
        if images is not None and "aspect" in sections:
            results["aspect"] = aspect_section(work, images)
            save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
