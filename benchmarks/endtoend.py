"""End-to-end sections of `benchmarks/run.py`: `dinoreg embed` / `dinoreg classify` against what
a user writes with transformers, each in a fresh subprocess on the same random weights and files.

Sections: embed throughput over large real JPEGs (default and exact decoding, fp32 and bf16),
peak RSS at 200 vs 2000 images, and one-image classify vs the transformers pipeline.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import photos
from benchmarks.common import Options, Section

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples" / "images"
SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}  # dim, depth, heads

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


def recipe_args(folder: Path, out: Path, ckpt: Path, batch: int, dtype: str) -> list[str]:
    """The transformers recipe (`HF_RECIPE`) over `folder` into `out`, as a command line."""
    return [sys.executable, "-c", HF_RECIPE, str(ckpt), str(folder), str(out), str(batch), dtype]


def embed_args(
    folder: Path, out: Path, ckpt: Path, batch: int, dtype: str, *extra: str
) -> list[str]:
    """`dinoreg embed FOLDER -o OUT` as the benchmarks run it: quiet, this batch and dtype."""
    return dinoreg_cmd(
        "embed", str(folder), "-o", str(out), "-m", str(ckpt), "-q",
        "--batch-size", str(batch), "--dtype", dtype, *extra,
    )  # fmt: skip


def run_embed(opts: Options) -> Section:
    """dinoreg embed vs the transformers recipe over large JPEGs: fp32/bf16, both decodings."""
    start = time.perf_counter()
    # Checked (or generated) already by run.py before any section ran; here it is a cache hit.
    large = large_set(opts)
    sources = list(large.paths)
    count, batch = (32 if opts.quick else 64), 16
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = image_folder(work / "large", sources, count)
        ckpt = make_checkpoint("small", work)
        for dtype in ("float32", "bfloat16"):
            out = work / f"hf-{dtype}.h5"
            hf_s, hf_rss = timed(recipe_args(folder, out, ckpt, batch, dtype))
            for exact in (False, True):
                out = work / f"dr-{dtype}-{exact}.h5"
                extra = ["--exact-decode"] if exact else []
                dr_s, dr_rss = timed(embed_args(folder, out, ckpt, batch, dtype, *extra))
                rows.append(
                    {
                        "dtype": dtype,
                        "decode": "exact" if exact else "reduced",
                        "images": count,
                        "dinoreg_img_s": count / dr_s,
                        "transformers_img_s": count / hf_s,
                        "ratio": hf_s / dr_s,
                        "dinoreg_rss_mib": dr_rss,
                        "transformers_rss_mib": hf_rss,
                    }
                )
                print(f"[bench] embed {rows[-1]}", file=sys.stderr, flush=True)
    table = [
        "| dtype | decode | dinoreg img/s | transformers recipe img/s | ratio "
        "| peak RSS MiB (ours / theirs) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ] + [
        f"| {r['dtype']} | {r['decode']} | {r['dinoreg_img_s']:.2f} | "
        f"{r['transformers_img_s']:.2f} | {r['ratio']:.2f}x | "
        f"{r['dinoreg_rss_mib']} / {r['transformers_rss_mib']} |"
        for r in rows
    ]
    note = (
        f"{count} copies of {len(sources)} 1.3-4.9 MP JPEGs ({large.origin}), ViT-S/14 shapes with "
        f"random weights, batch {batch}, all tokens written to HDF5; each side is one fresh "
        "process timed from start to exit (imports and model loading included). The "
        "transformers recipe is its PIL image processor, the model in a loop (autocast for "
        "bf16) and h5py appends."
    )
    return Section(
        "embed",
        "End to end: embed large JPEGs",
        ["\n".join(table), note],
        {"rows": rows, "photos": large.describe()},
        time.perf_counter() - start,
    )


def large_set(opts: Options) -> photos.PhotoSet:
    """The large JPEGs `embed` reads: `--images` if given, else the generated set."""
    if opts.images is not None:
        return photos.check_folder(opts.images)
    return photos.large_photos(opts.out)


def run_memory(opts: Options) -> Section:
    """Peak RSS of a whole embed (all tokens) at two input counts: it must stay flat."""
    start = time.perf_counter()
    counts = (50, 200) if opts.quick else (200, 2000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = make_checkpoint("small", work)
        sources = sorted(EXAMPLES.glob("*.jpg"))
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
                    "32",
                    "--dtype",
                    "bfloat16",
                )
            )
            rows.append(
                {
                    "images": n,
                    "peak_rss_mib": rss,
                    "seconds": seconds,
                    "file_mib": out.stat().st_size / 2**20,
                }
            )
            print(f"[bench] memory {rows[-1]}", file=sys.stderr, flush=True)
    ratio = rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"]
    table = ["| images | peak RSS MiB | output MiB | seconds |", "| ---: | ---: | ---: | ---: |"]
    table += [
        f"| {r['images']} | {r['peak_rss_mib']} | {r['file_mib']:.0f} | {r['seconds']:.1f} |"
        for r in rows
    ]
    note = (
        f"RSS at {counts[1]} / at {counts[0]} images: {ratio:.3f}x (the largest process: the "
        "main one; decode workers are smaller). ViT-S/14 shapes, bf16, all tokens, HDF5."
    )
    return Section(
        "memory",
        "Memory: peak RSS as inputs grow",
        ["\n".join(table), note],
        {"rows": rows, "ratio": ratio},
        time.perf_counter() - start,
    )


def run_classify_start(opts: Options) -> Section:
    """One image, end to end: `dinoreg classify` vs transformers' image-classification pipeline."""
    start = time.perf_counter()
    repeats = 2 if opts.quick else 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint("small", Path(tmp), classifier=True)
        one = EXAMPLES / "coffee.jpg"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cases = {
            "dinoreg classify one.jpg": dinoreg_cmd(
                "classify", str(one), "-m", str(ckpt), "--workers", "0"
            ),
            "transformers pipeline one.jpg": [
                sys.executable,
                "-c",
                HF_PIPELINE,
                str(ckpt),
                str(one),
            ],
        }
        for name, cmd in cases.items():
            timed(cmd, env)  # page cache
            times = [timed(cmd, env)[0] for _ in range(repeats)]
            rows.append({"command": name, "median_s": statistics.median(times), "times_s": times})
            print(f"[bench] classify {rows[-1]}", file=sys.stderr, flush=True)
    ratio = rows[0]["median_s"] / rows[1]["median_s"]
    table = ["| command | median s |", "| --- | ---: |"]
    table += [f"| `{r['command']}` | {r['median_s']:.2f} |" for r in rows]
    note = (
        f"dinoreg / transformers wall time: {ratio:.2f}x. ViT-S/14 classifier shapes, random "
        "weights from a local directory, a fresh process each, imports included."
    )
    return Section(
        "classify",
        "Cold start: classify one image",
        ["\n".join(table), note],
        {"rows": rows, "ratio": ratio},
        time.perf_counter() - start,
    )
