"""The driver side of `dinoreg.ray.embed_with_ray`: which shards to (re)write, the actor pool,
and rows streamed from Ray into shard files.

Ray is handed in by `dinoreg.ray` (the one module that imports it). Rows come back in input
order (`preserve_order`), so one shard file is open at a time and memory stays flat; the driver
checks that order and fails loudly rather than write a row under the wrong index.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dinoreg import __version__
from dinoreg.distributed import shards as sh
from dinoreg.errors import OutputError
from dinoreg.model.files import file_sha256
from dinoreg.model.sources import resolve
from dinoreg.output.lock import acquire_lock
from dinoreg.ray import (
    Embedder,
    EmbedderOptions,
    RayOptions,
    RayProgress,
    RayRunSummary,
)

# Enough blocks that a retried block costs little, few enough that planning stays cheap.
_MAX_BLOCKS = 20_000


def run(
    ray: Any,
    paths: list[str],
    out_dir: Path,
    embedder: EmbedderOptions,
    cluster: RayOptions,
    num_shards: int,
    resume: bool,
    overwrite: bool,
    progress: Callable[[RayProgress], None] | None,
) -> RayRunSummary:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is not a directory; choose another output.")
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire_lock(out_dir, out_dir)  # two drivers never write one output
    try:
        source = resolve(embedder.model)  # hashes only; the actors load the model
        sha = "+".join(file_sha256(f) for f in source.files)
        base = shard_meta(embedder, sha, len(paths))
        ranges = sh.shard_ranges(len(paths), num_shards)
        metas = [
            {
                **base,
                "shard": i,
                "num_shards": num_shards,
                "start": r.start,
                "stop": r.stop,
                "inputs_sha256": sh.inputs_sha256(paths[r.start : r.stop]),
            }
            for i, r in enumerate(ranges)
        ]
        todo = _shards_to_write(out_dir, metas, resume, overwrite)
        summary = RayRunSummary(
            out_dir=out_dir,
            inputs=len(paths),
            shards=[out_dir / sh.shard_name(i, num_shards) for i in range(num_shards)],
            skipped_shards=num_shards - len(todo),
            rows=0,
        )
        if todo:
            _run_pool(
                ray, paths, out_dir, embedder, cluster, [metas[i] for i in todo], summary, progress
            )
        return summary
    finally:
        os.close(lock)


def shard_meta(options: EmbedderOptions, sha256: str, num_inputs: int) -> dict[str, Any]:
    """Provenance shared by every shard of a run (the keys `dinoreg.embedding.rows` records)."""
    recipe = options.recipe
    return {
        "dinoreg_version": __version__,
        "model": options.model,
        "weights_sha256": sha256,
        "image_size": recipe.image_size,
        "keep_aspect": False,
        "grid": list(recipe.grid) if recipe.grid else None,
        "recipe": recipe.to_dict(),
        "compute_dtype": options.dtype,  # as asked: each actor resolves "auto" on its device
        "store_dtype": options.store_dtype,
        "tokens": list(options.tokens),
        "layers": None,
        "final_norm": True,
        "device": options.device,
        "num_inputs": num_inputs,
        "writer": "dinoreg.ray",
    }


def _shards_to_write(
    out_dir: Path, metas: list[dict[str, Any]], resume: bool, overwrite: bool
) -> list[int]:
    existing = sh.our_files(out_dir)
    if overwrite:
        for path in existing:
            path.unlink()
        return list(range(len(metas)))
    for path in existing:
        if path.name.endswith(".tmp"):  # a shard a killed driver left unfinished
            path.unlink()
    finished = {p.name for p in existing if not p.name.endswith(".tmp")}
    wanted = {sh.shard_name(m["shard"], m["num_shards"]) for m in metas}
    if finished and not resume:
        raise OutputError(
            f"{out_dir} already holds shard files; resume to continue that run, or overwrite."
        )
    if finished - wanted:
        raise OutputError(
            f"{out_dir} holds shards of a run with another shard count "
            f"({sorted(finished - wanted)[0]}); use the same shards, or overwrite."
        )
    return [
        i
        for i, meta in enumerate(metas)
        if not (
            sh.shard_name(i, meta["num_shards"]) in finished
            and sh.is_done(out_dir / sh.shard_name(i, meta["num_shards"]), meta)
        )
    ]


def _pool_size(ray: Any, cluster: RayOptions, batches: int) -> tuple[int, float]:
    """(actors, GPUs per actor): as many actors as the cluster fits, never more than batches."""
    resources = ray.cluster_resources()
    gpus = cluster.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if cluster.num_actors is not None:
        size = cluster.num_actors
    elif gpus > 0:
        size = int(resources.get("GPU", 0) // gpus)
    else:
        size = int(resources.get("CPU", 1) // cluster.cpus_per_actor)
    return max(1, min(size, batches)), gpus


def _run_pool(
    ray: Any,
    paths: list[str],
    out_dir: Path,
    embedder: EmbedderOptions,
    cluster: RayOptions,
    metas: list[dict[str, Any]],
    summary: RayRunSummary,
    progress: Callable[[RayProgress], None] | None,
) -> None:
    started = not ray.is_initialized()
    if started:
        if cluster.address is None:
            ray.init(include_dashboard=False)
        else:
            ray.init(address=cluster.address)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    writer: sh.ShardWriter | None = None
    try:
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False  # the library reports progress through its callback
        items = [
            {"index": i, "path": paths[i]} for m in metas for i in range(m["start"], m["stop"])
        ]
        batches = math.ceil(len(items) / embedder.batch_size)
        size, gpus = _pool_size(ray, cluster, batches)
        summary.num_actors = size
        kwargs = asdict(embedder)
        kwargs["recipe"] = embedder.recipe  # the dataclass itself, not asdict's plain dict
        ds = ray.data.from_items(items, override_num_blocks=min(batches, _MAX_BLOCKS))
        with warnings.catch_warnings():
            # Ray 2.60 deprecates extra remote args (removal announced for 2.64, hence the
            # pin) yet has no other way to bound restarts; its default retries forever.
            warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                Embedder,
                fn_constructor_kwargs=kwargs,
                batch_size=embedder.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=size),
                num_cpus=cluster.cpus_per_actor,
                num_gpus=gpus or None,
                # A dead actor restarts and the batch it held is retried; bounded, so an image
                # that kills its process cannot keep a run retrying forever.
                max_restarts=cluster.max_restarts,
                max_task_retries=cluster.max_task_retries,
            )
        pending = iter(metas)
        meta = next(pending)
        expected = meta["start"]
        done = shards_done = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            index = np.asarray(batch["index"], dtype=np.int64)
            pos = 0
            while pos < len(index):
                if meta is None:
                    raise RuntimeError("Ray returned more rows than there are inputs")
                if writer is None:
                    shapes = {t: tuple(batch[t].shape[1:]) for t in embedder.tokens}
                    writer = sh.ShardWriter(out_dir, meta, shapes, embedder.store_dtype)
                end = pos + int(np.searchsorted(index[pos:], meta["stop"]))
                seg = slice(pos, end)
                if not np.array_equal(index[seg], np.arange(expected, expected + end - pos)):
                    raise RuntimeError(f"Ray returned rows out of input order near {expected}")
                errors = batch["error"][seg]
                ok = errors == ""
                writer.add(
                    index[seg][ok],
                    [str(p) for p in batch["path"][seg][ok]],
                    {t: batch[t][seg][ok] for t in embedder.tokens},
                )
                for i, p, e in zip(
                    index[seg][~ok], batch["path"][seg][~ok], errors[~ok], strict=True
                ):
                    writer.fail(int(i), str(p), str(e))
                    summary.failures.append((str(p), str(e)))
                summary.rows += int(ok.sum())
                expected, pos = index[end - 1] + 1 if end > pos else expected, end
                if writer.full:
                    writer.finish()
                    writer, shards_done = None, shards_done + 1
                    meta = next(pending, None)
                    expected = meta["start"] if meta is not None else expected
            done += len(index)
            if progress is not None:
                progress(RayProgress(done, len(items), shards_done))
        if meta is not None:
            raise RuntimeError(f"Ray returned {done} rows for {len(items)} inputs")
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()
