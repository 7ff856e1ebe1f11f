"""Search and dedup benchmark on synthetic DINOv2-like vectors.

    python benchmarks/search.py [--rows 1000000] [--out bench-out] [--quick] [--skip-usearch]

Writes clustered 384-d vectors (a shared mean direction, clusters, sub-clusters and noise, so
cosine is ~0.1 between clusters, ~0.55 within one, ~0.78 within a sub-cluster, like CLS tokens of
a varied photo collection) with planted near-duplicates (1%, cosine ~0.98-0.999) and exact copies
(0.1%), as float32 and float16 in both `.npy` directory and `.h5` layouts. Then measures, each step
in its own process so its peak RSS is its own: exact search, faiss IVF index build / size /
queries/s / recall@10 vs exact, usearch HNSW on a prefix for comparison, exact dedup on a prefix
and index dedup on everything. Results go to `<out>/search.json` and `<out>/search.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dinoreg.output import layout
from dinoreg.output.hdf5 import chunk_rows, encode_attrs

DIM = 384
GEN_BLOCK = 50_000
N_QUERIES = 1000


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- data --------------------------------------------------------------------------------------


def generate(data: Path, rows: int, dedup_rows: int) -> dict:
    rng = np.random.default_rng(0)
    n_clusters, n_subs = 2000, 20
    mean = rng.standard_normal(DIM).astype(np.float32)
    mean *= 0.5 / np.linalg.norm(mean)
    centres = rng.standard_normal((n_clusters, DIM)).astype(np.float32) / np.sqrt(DIM)
    subs = centres[:, None] + 0.7 * rng.standard_normal((n_clusters, n_subs, DIM)).astype(
        np.float32
    ) / np.sqrt(DIM)

    def draw(n: int) -> np.ndarray:
        k, j = rng.integers(0, n_clusters, n), rng.integers(0, n_subs, n)
        noise = 0.7 * rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM)
        return (mean + subs[k, j] + noise).astype(np.float32)

    data.mkdir(parents=True)
    targets = {
        "npy-f32": _NpyOut(data / "f32", rows, "float32"),
        "npy-f16": _NpyOut(data / "f16", rows, "float16"),
        "h5-f32": _H5Out(data / "f32.h5", rows, "float32"),
        "h5-f16": _H5Out(data / "f16.h5", rows, "float16"),
        "small": _NpyOut(data / "small", dedup_rows, "float32"),
    }
    planted = []
    for start in range(0, rows, GEN_BLOCK):
        n = min(GEN_BLOCK, rows - start)
        x = draw(n)
        # Copies point back to an earlier row of the same block, so blocks stay independent;
        # in row order, so a copy of a copy still copies the final vector.
        u = rng.random(n)
        for i in np.flatnonzero(u[1:] < 0.011) + 1:
            j = int(rng.integers(0, i))
            sigma = 0.0 if u[i] < 0.001 else float(rng.uniform(0.05, 0.3))
            noise = rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
            x[i] = x[j] + sigma * noise
            planted.append((start + j, start + int(i), sigma))
        names = [f"img/{start + i:07d}.jpg" for i in range(n)]
        for out in targets.values():
            out.write(start, x, names)
    for out in targets.values():
        out.close()
    np.save(data / "queries.npy", draw(N_QUERIES))
    np.save(data / "planted.npy", np.array(planted))
    return {"planted_pairs": len(planted)}


_META = {"model": "synthetic", "dim": DIM, "depth": 12, "tokens": ["cls"], "complete": True}


class _NpyOut:
    def __init__(self, path: Path, rows: int, dtype: str) -> None:
        path.mkdir()
        self.path, self.rows = path, rows
        self.arr = np.lib.format.open_memmap(path / "cls.npy", "w+", dtype, (rows, DIM))
        self.paths = open(path / layout.PATHS, "w", encoding="utf-8")  # noqa: SIM115

    def write(self, start: int, x: np.ndarray, names: list[str]) -> None:
        if start < self.rows:
            n = min(len(x), self.rows - start)
            self.arr[start : start + n] = x[:n]
            self.paths.write("".join(p + "\n" for p in names[:n]))

    def close(self) -> None:
        self.arr.flush()
        del self.arr
        self.paths.close()
        (self.path / layout.FAILED).write_text("")
        (self.path / layout.META).write_text(json.dumps({**_META, "store_dtype": "f"}))


class _H5Out:
    def __init__(self, path: Path, rows: int, dtype: str) -> None:
        self.f = h5py.File(path, "w")
        item = np.dtype(dtype).itemsize
        self.cls = self.f.create_dataset(
            "cls", (rows, DIM), dtype, chunks=(chunk_rows(rows, DIM * item), DIM)
        )
        self.names = self.f.create_dataset("paths", (rows,), h5py.string_dtype("utf-8"))
        for name in ("paths", "reasons"):
            self.f.create_dataset(f"failed/{name}", (0,), h5py.string_dtype("utf-8"))
        encode_attrs(self.f.attrs, {**_META, "store_dtype": dtype})

    def write(self, start: int, x: np.ndarray, names: list[str]) -> None:
        self.cls[start : start + len(x)] = x
        self.names[start : start + len(x)] = names

    def close(self) -> None:
        self.f.close()


FILES = {"npy-f32": "f32", "npy-f16": "f16", "h5-f32": "f32.h5", "h5-f16": "f16.h5"}


# ---- phases (each runs in a child process) -------------------------------------------------------


def phase_exact(data: Path, name: str, n_q: int) -> dict:
    from dinoreg.neighbours import open_vectors
    from dinoreg.neighbours.exact import exact_topk

    q = np.load(data / "queries.npy")[:n_q]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    with open_vectors(data / FILES[name]) as v:
        t = time.perf_counter()
        _, rows = exact_topk(v, q, 10)
        sec = time.perf_counter() - t
        n = v.rows
    np.save(data / f"exact-{name}-{n_q}.npy", rows)
    return {"file": name, "queries": n_q, "seconds": sec, "qps": n_q / sec,
            "rows_per_s": n * n_q / sec, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def phase_build(data: Path, name: str) -> dict:
    from dinoreg.neighbours import build_index

    info = build_index(data / FILES[name])
    return {"file": name, "build_s": info.build_seconds, "size_mib": info.size_bytes / 2**20,
            "lists": info.lists, "nprobe": info.nprobe, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))  # noqa: B905


def phase_ann(data: Path, name: str, n_q: int) -> dict:
    from dinoreg.neighbours import open_vectors
    from dinoreg.neighbours.index import load_for

    q = np.load(data / "queries.npy")[:n_q]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.load(data / f"exact-npy-f32-{n_q}.npy")
    out = []
    with open_vectors(data / FILES[name]) as v:
        ann = load_for(v, "auto")
        assert ann is not None, "no current index"
        for nprobe in (4, 8, 16, 32, 64):
            ann._index.nprobe = nprobe
            t = time.perf_counter()
            _, rows = ann.search(q, 10)
            sec = time.perf_counter() - t
            out.append({"nprobe": nprobe, "qps": n_q / sec, "recall10": _recall(rows, truth)})
    return {"file": name, "runs": out, "peak_rss_mib": peak_rss_mib()}


def phase_compare(data: Path, rows: int, n_q: int) -> dict:
    """faiss IVF and usearch HNSW built the same way on the first `rows` rows."""
    import faiss
    import torch
    import usearch
    from usearch.index import Index

    from dinoreg.neighbours import open_vectors

    with open_vectors(data / "f32") as v:
        x = v.read(0, rows)
    q = np.load(data / "queries.npy")[:n_q]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = torch.topk(torch.from_numpy(q) @ torch.from_numpy(x).T, 10).indices.numpy()
    threads = os.cpu_count() or 1
    res: dict = {"rows": rows, "faiss": {"version": faiss.__version__},
                 "usearch": {"version": usearch.__version__}}  # fmt: skip
    lists = int(4 * np.sqrt(rows))
    t = time.perf_counter()
    sq, ip = faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    ix = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(DIM), DIM, lists, sq, ip)
    ix.by_residual = False  # as dinoreg builds it
    ix.train(x[:: max(1, rows // (40 * lists))])
    ix.add(x)
    res["faiss"]["build_s"] = time.perf_counter() - t
    faiss.write_index(ix, str(data / "cmp.faiss"))
    res["faiss"]["size_mib"] = (data / "cmp.faiss").stat().st_size / 2**20
    res["faiss"]["runs"] = []
    for nprobe in (8, 16, 32, 64):
        ix.nprobe = nprobe
        t = time.perf_counter()
        _, found = ix.search(q, 10)
        qps = n_q / (time.perf_counter() - t)
        run = {"nprobe": nprobe, "qps": qps, "recall10": _recall(found, truth)}
        res["faiss"]["runs"].append(run)
    del ix
    u = Index(ndim=DIM, metric="cos", dtype="f16", connectivity=16, expansion_add=128)
    t = time.perf_counter()
    u.add(np.arange(rows), x, threads=threads)
    res["usearch"]["build_s"] = time.perf_counter() - t
    u.save(str(data / "cmp.usearch"))
    res["usearch"]["size_mib"] = (data / "cmp.usearch").stat().st_size / 2**20
    res["usearch"]["runs"] = []
    for ef in (32, 64, 128):
        u.expansion_search = ef
        t = time.perf_counter()
        found = u.search(q, 10, threads=threads).keys
        qps = n_q / (time.perf_counter() - t)
        res["usearch"]["runs"].append({"ef": ef, "qps": qps, "recall10": _recall(found, truth)})
    return res


def phase_dedup(data: Path, target: str, index: str) -> dict:
    from dinoreg.neighbours import dedup

    path = data / target
    t = time.perf_counter()
    groups = dedup(path, index=index)
    sec = time.perf_counter() - t
    planted = np.load(data / "planted.npy")
    with open_vectors_rows(path) as n:
        rows = n
    want = [(int(a), int(b)) for a, b, _ in planted if b < rows]
    group_of = {m.row: g.members[0].row for g in groups for m in g.members}
    found = sum(1 for a, b in want if a in group_of and group_of.get(a) == group_of.get(b))
    return {"target": target, "index": index, "rows": rows, "seconds": sec, "groups": len(groups),
            "rows_in_groups": len(group_of), "planted_pairs": len(want),
            "planted_found": found, "peak_rss_mib": peak_rss_mib()}  # fmt: skip


class open_vectors_rows:
    def __init__(self, path: Path) -> None:
        from dinoreg.neighbours import open_vectors

        self.v = open_vectors(path)

    def __enter__(self) -> int:
        return self.v.rows

    def __exit__(self, *exc: object) -> None:
        self.v.close()


# ---- driver ------------------------------------------------------------------------------------


def child(args: list[str]) -> dict:
    """Run one phase in a fresh process; its JSON result is the last line of its stdout."""
    cmd = [sys.executable, __file__, "--phase", *args]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"phase {args} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{' '.join(args[:3])}: {time.perf_counter() - t:.1f}s", file=sys.stderr)
    return result


def run_phase(argv: list[str]) -> None:
    name, data, *rest = argv
    data = Path(data)
    if name == "exact":
        out = phase_exact(data, rest[0], int(rest[1]))
    elif name == "build":
        out = phase_build(data, rest[0])
    elif name == "ann":
        out = phase_ann(data, rest[0], int(rest[1]))
    elif name == "compare":
        out = phase_compare(data, int(rest[0]), int(rest[1]))
    elif name == "dedup":
        out = phase_dedup(data, rest[0], rest[1])
    elif name == "baseline":
        import torch  # noqa: F401

        import dinoreg.neighbours  # noqa: F401

        out = {"peak_rss_mib": peak_rss_mib()}
    else:
        raise SystemExit(f"unknown phase {name}")
    # Other work on the machine slows wall time; CPU seconds and the load show how much.
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["process_cpu_s"] = ru.ru_utime + ru.ru_stime
    out["loadavg_1m"] = os.getloadavg()[0]
    print(json.dumps(out))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        run_phase(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--compare-rows", type=int, default=100_000, help="rows for faiss vs usearch")
    ap.add_argument("--dedup-rows", type=int, default=50_000, help="rows for exact dedup")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--quick", action="store_true", help="20k rows: a smoke test")
    ap.add_argument("--skip-usearch", action="store_true")
    ap.add_argument("--reuse-data", action="store_true", help="keep and reuse the generated files")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.compare_rows, args.dedup_rows = 20_000, 10_000, 5_000
    args.compare_rows = min(args.compare_rows, args.rows)
    args.dedup_rows = min(args.dedup_rows, args.rows)
    data = args.out / "search-data"
    stamp = data / "rows.json"
    want = {"rows": args.rows, "dedup_rows": args.dedup_rows}
    t0 = time.perf_counter()
    if args.reuse_data and stamp.exists() and json.loads(stamp.read_text())["want"] == want:
        gen = json.loads(stamp.read_text())["gen"]
    else:
        shutil.rmtree(data, ignore_errors=True)
        args.out.mkdir(parents=True, exist_ok=True)
        gen = generate(data, args.rows, args.dedup_rows)
        gen["seconds"] = time.perf_counter() - t0
        stamp.write_text(json.dumps({"want": want, "gen": gen}))
    print(f"generate: {gen['seconds']:.1f}s", file=sys.stderr)
    d = str(data)
    res: dict = {
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "rows": args.rows, "dim": DIM, "generate": gen,
        "baseline": child(["baseline", d]),
    }  # fmt: skip
    import torch

    res["machine"]["torch"] = torch.__version__

    def save() -> None:
        # After every step, so a run cut short still leaves what it measured.
        res["total_s"] = time.perf_counter() - t0
        (args.out / "search.json").write_text(json.dumps(res, indent=2) + "\n")
        (args.out / "search.md").write_text(markdown(res))

    res["exact"] = []
    for name, q in [("npy-f32", 1), ("npy-f32", 100), ("npy-f32", N_QUERIES), ("npy-f16", 100),
                    ("h5-f32", 100), ("h5-f16", 100)]:  # fmt: skip
        res["exact"].append(child(["exact", d, name, str(q)]))
        save()
    res["build"] = child(["build", d, "npy-f16"])
    res["ann"] = child(["ann", d, "npy-f16", str(N_QUERIES)])
    save()
    res["dedup"] = []
    for target, index in [("small", "none"), ("f16", "auto")]:
        res["dedup"].append(child(["dedup", d, target, index]))
        save()
    if not args.skip_usearch:
        res["compare"] = child(["compare", d, str(args.compare_rows), str(N_QUERIES)])
        save()
    if not args.reuse_data:
        shutil.rmtree(data, ignore_errors=True)
    print(markdown(res))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Search benchmark: {r['rows']:,} x {r['dim']} synthetic vectors",
        "",
        f"{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, torch {m.get('torch')}, "
        f"numpy {m['numpy']}. Process baseline (python + torch + dinoreg.neighbours): "
        f"{r['baseline']['peak_rss_mib']:.0f} MiB peak RSS. Generating the files took "
        f"{r['generate']['seconds']:.0f} s; the whole run {r['total_s']:.0f} s.",
        "",
        "## Exact search (k = 10)",
        "",
        "| file | queries | seconds | queries/s | rows scanned/s | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in r.get("exact", []):
        lines.append(f"| {e['file']} | {e['queries']} | {e['seconds']:.2f} | {e['qps']:.1f} | "
                     f"{e['rows_per_s']:.3g} | {e['peak_rss_mib']:.0f} |")  # fmt: skip
    if "build" not in r:
        return "\n".join(lines) + "\n"
    b = r["build"]
    lines += [
        "",
        f"## faiss IVF index (`dinoreg.neighbours.build_index`, {b['lists']} lists, float16)",
        "",
        f"Build {b['build_s']:.1f} s, {b['size_mib']:.0f} MiB on disk, peak RSS "
        f"{b['peak_rss_mib']:.0f} MiB; default nprobe {b['nprobe']}.",
        "",
        "| nprobe | queries/s | recall@10 vs exact |",
        "| ---: | ---: | ---: |",
    ]
    lines += [f"| {x['nprobe']} | {x['qps']:.0f} | {x['recall10']:.4f} |" for x in r["ann"]["runs"]]
    if "compare" in r:
        c = r["compare"]
        lines += ["", f"## faiss IVF vs usearch HNSW on the first {c['rows']:,} rows", "",
                  "| library | build s | size MiB | setting | queries/s | recall@10 |",
                  "| --- | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
        for lib, key in (("faiss", "nprobe"), ("usearch", "ef")):
            x = c[lib]
            for run in x["runs"]:
                head = f"| {lib} {x['version']} | {x['build_s']:.1f} | {x['size_mib']:.0f} "
                tail = f"| {key} {run[key]} | {run['qps']:.0f} | {run['recall10']:.4f} |"
                lines.append(head + tail)
    lines += ["", "## Dedup (threshold 0.95)", "",
              "| rows | method | seconds | groups | rows in groups | planted pairs found "
              "| peak RSS MiB |",
              "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for x in r.get("dedup", []):
        method = "exact all-pairs" if x["index"] == "none" else "index, list vs neighbour lists"
        lines.append(f"| {x['rows']:,} | {method} | {x['seconds']:.1f} | {x['groups']} | "
                     f"{x['rows_in_groups']} | {x['planted_found']} / {x['planted_pairs']} | "
                     f"{x['peak_rss_mib']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
