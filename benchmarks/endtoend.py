"""End-to-end benchmarks: `dinoreg embed` / `dinoreg classify` against what a user writes with
transformers, each in a fresh subprocess on the same random weights and the same files.

Sections: embed throughput over large real JPEGs (default and exact decoding, fp32 and bf16),
peak RSS at 200 vs 2000 images, and cold start (`--help`, one-image classify vs the transformers
pipeline). Run alone: `python benchmarks/endtoend.py --out bench-out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_IMAGES = HERE.parent.parent / "shared" / "images" / "bench"
EXAMPLES = HERE.parent / "examples" / "images"
SIZES = {"small": (384, 12, 6), "base": (768, 12, 12)}

# What a user writes with transformers: its PIL processor, the model in a loop, h5py appends.
HF_RECIPE = r"""
import sys, time, h5py, numpy as np, torch
from pathlib import Path
from PIL import Image
from transformers import BitImageProcessorPil, Dinov2WithRegistersModel
ckpt, folder, out, batch, dtype = sys.argv[1:6]
batch = int(batch)
processor = BitImageProcessorPil(size={"shortest_edge": 256}, resample=3,
    crop_size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225])
model = Dinov2WithRegistersModel.from_pretrained(ckpt, attn_implementation="sdpa").eval()
paths = sorted(str(p) for p in Path(folder).iterdir())
with h5py.File(out, "w") as f, torch.inference_mode():
    d = model.config.hidden_size
    cls = f.create_dataset("cls", (0, d), maxshape=(None, d), dtype="f4")
    reg = f.create_dataset("registers", (0, 4, d), maxshape=(None, 4, d), dtype="f4")
    pat = f.create_dataset("patches", (0, 256, d), maxshape=(None, 256, d), dtype="f4")
    for i in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[i:i + batch]]
        x = processor(images, return_tensors="pt")["pixel_values"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            h = model(pixel_values=x).last_hidden_state.float().numpy()
        n = len(images)
        for ds, part in ((cls, h[:, 0]), (reg, h[:, 1:5]), (pat, h[:, 5:])):
            ds.resize(ds.shape[0] + n, axis=0)
            ds[-n:] = part
"""

HF_PIPELINE = r"""
import sys
from transformers import pipeline
clf = pipeline("image-classification", model=sys.argv[1], device="cpu")
for r in clf(sys.argv[2], top_k=5):
    print(r["label"], r["score"])
"""


def make_checkpoint(size: str, folder: Path, classifier: bool = False) -> Path:
    """Random weights with a real model's shapes, saved as a transformers checkpoint."""
    import torch
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersForImageClassification,
        Dinov2WithRegistersModel,
    )

    dim, depth, heads = SIZES[size]
    cfg = Dinov2WithRegistersConfig(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        image_size=518,
        patch_size=14,
        num_register_tokens=4,
        num_labels=1000 if classifier else 2,
    )
    torch.manual_seed(0)
    cls = Dinov2WithRegistersForImageClassification if classifier else Dinov2WithRegistersModel
    model = cls(cfg)
    path = folder / f"{size}{'-cls' if classifier else ''}"
    model.save_pretrained(path)
    if classifier:  # the pipeline needs an image processor next to the weights
        from transformers import BitImageProcessorPil

        BitImageProcessorPil(
            size={"shortest_edge": 256},
            resample=3,
            crop_size={"height": 224, "width": 224},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ).save_pretrained(path)
    return path


def image_folder(folder: Path, sources: list[Path], count: int) -> Path:
    """`count` copies of the source photos, cycled, under distinct names. Copies, not symlinks:
    inputs are de-duplicated by their real path."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = sources[i % len(sources)]
        dst = folder / f"{i:05d}{src.suffix.lower()}"
        try:
            os.link(src, dst)  # a hard link is a distinct path at no cost
        except OSError:
            shutil.copyfile(src, dst)
    return folder


def timed(args: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (MiB) of one command run in a fresh process."""
    probe = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:], capture_output=True)\n"
        "dt = time.perf_counter() - t\n"
        "if r.returncode not in (0, 3): sys.stderr.write(r.stderr.decode()); sys.exit(1)\n"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env
    )
    if res.returncode:
        raise RuntimeError(f"{args[:3]} failed:\n{res.stderr[-2000:]}")
    seconds, rss_kib = res.stdout.split()
    return float(seconds), int(rss_kib) // 1024


def dinoreg_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dinoreg", *args]


def embed_section(work: Path, count: int, batch: int, sizes: list[str]) -> list[dict]:
    sources = sorted(BENCH_IMAGES.glob("*.jpg"))
    if not sources:
        raise SystemExit(f"no benchmark photos in {BENCH_IMAGES}")
    folder = image_folder(work / "large", sources, count)
    rows = []
    for size in sizes:
        ckpt = make_checkpoint(size, work)
        for dtype in ("float32", "bfloat16"):
            out = work / f"hf-{size}-{dtype}.h5"
            hf_s, hf_rss = timed(
                [
                    sys.executable,
                    "-c",
                    HF_RECIPE,
                    str(ckpt),
                    str(folder),
                    str(out),
                    str(batch),
                    dtype,
                ]
            )
            for exact in (False, True):
                out = work / f"dr-{size}-{dtype}-{exact}.h5"
                args = [
                    "embed",
                    str(folder),
                    "-o",
                    str(out),
                    "-m",
                    str(ckpt),
                    "-q",
                    "--batch-size",
                    str(batch),
                    "--dtype",
                    dtype,
                ]
                dr_s, dr_rss = timed(dinoreg_cmd(*args, *(["--exact-decode"] if exact else [])))
                rows.append(
                    {
                        "model": size,
                        "dtype": dtype,
                        "decode": "exact" if exact else "reduced",
                        "images": count,
                        "dinoreg_img_s": round(count / dr_s, 2),
                        "transformers_img_s": round(count / hf_s, 2),
                        "ratio": round(hf_s / dr_s, 2),
                        "dinoreg_rss_mib": dr_rss,
                        "transformers_rss_mib": hf_rss,
                    }
                )
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def rss_section(work: Path, counts: tuple[int, ...], batch: int) -> list[dict]:
    """Peak RSS of the whole embed (all tokens) at growing input counts: it must stay flat."""
    ckpt = make_checkpoint("small", work) if not (work / "small").exists() else work / "small"
    sources = sorted(EXAMPLES.glob("*.jpg"))
    rows = []
    for n in counts:
        folder = image_folder(work / f"rss{n}", sources, n)
        out = work / f"rss{n}.h5"
        seconds, rss = timed(
            dinoreg_cmd(
                "embed",
                str(folder),
                "-o",
                str(out),
                "-m",
                str(ckpt),
                "-q",
                "--batch-size",
                str(batch),
                "--dtype",
                "bfloat16",
            )
        )
        rows.append(
            {
                "images": n,
                "peak_rss_mib": rss,
                "seconds": round(seconds, 1),
                "file_mib": round(out.stat().st_size / 2**20, 1),
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def coldstart_section(work: Path, repeats: int) -> list[dict]:
    ckpt = make_checkpoint("small", work, classifier=True)
    one = EXAMPLES / "coffee.jpg"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = {
        "dinoreg --help": dinoreg_cmd("--help"),
        "dinoreg classify one.jpg": dinoreg_cmd(
            "classify", str(one), "-m", str(ckpt), "--workers", "0"
        ),
        "transformers pipeline one.jpg": [sys.executable, "-c", HF_PIPELINE, str(ckpt), str(one)],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    rows = []
    for name, cmd in cases.items():
        times = [timed(cmd, env)[0] for _ in range(repeats)]
        rows.append({"command": name, "median_s": round(statistics.median(times), 3)})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def run(out: Path, quick: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {
            "embed": embed_section(work, 32 if quick else 128, 16, ["small"]),
            "rss": rss_section(work, (50, 200) if quick else (200, 2000), 32),
            "coldstart": coldstart_section(work, 2 if quick else 3),
        }
    (out / "endtoend.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    print(json.dumps(run(args.out, args.quick), indent=1))
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
