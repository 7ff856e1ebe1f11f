"""The approximate index: faiss IVF (inverted lists, float16 vectors), built, saved and loaded.

An index lives beside its output (`feats.h5.index`, `feats.index` for a directory `feats/`) with a
JSON sidecar (`<index>.json`) recording what it was built from: the output's files (size and
mtime), rows, dimension, tokens and layer. It is used only while all of these still match and the
index is not older than the output; otherwise search and dedup go back to exact search. faiss is
an optional extra (`dinoreg[ann]`); without it every search is exact.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoreg.errors import OutputError, UsageError
from dinoreg.neighbours.vectors import Tokens, Vectors, open_vectors

__all__ = ["EXACT_ROWS_LIMIT", "IndexInfo", "build_index", "default_index_path", "find_index"]

FORMAT = 2
# Below this many rows exact search answers a query in well under a second on 2 CPU cores
# (benchmarks/results/search-cpu-2core.md), so an index is not worth building.
EXACT_ROWS_LIMIT = 200_000
# Training points per inverted list: faiss warns under 39; more buys little.
_TRAIN_PER_LIST = 40
_DEFAULT_NPROBE = 32
# dedup compares each inverted list with itself and this many of the nearest other lists: a pair
# above a near-duplicate threshold sits in one list or in two neighbouring ones.
DEDUP_NEIGHBOUR_LISTS = 4


@dataclass(frozen=True)
class IndexInfo:
    path: Path
    feats: Path
    rows: int
    dim: int
    tokens: str
    layer: int | None
    lists: int
    nprobe: int
    build_seconds: float
    size_bytes: int


def default_index_path(feats: str | os.PathLike[str]) -> Path:
    p = Path(feats)
    return p.with_name(p.name.rstrip("/") + ".index")


def _sidecar(index_path: Path) -> Path:
    return index_path.with_name(index_path.name + ".json")


def _faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def build_index(
    feats: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    tokens: Tokens = "cls",
    layer: int | None = None,
    lists: int | None = None,
    nprobe: int = _DEFAULT_NPROBE,
) -> IndexInfo:
    """Build an IVF index of `feats` at `out` (default `<feats>.index`), reading it in blocks."""
    faiss = _faiss()
    if faiss is None:
        raise UsageError("building an index needs faiss: pip install 'dinoreg[ann]'.")
    if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
        raise UsageError(f"nprobe must be a positive integer, not {nprobe!r}.", params=("nprobe",))
    if lists is not None and (isinstance(lists, bool) or not isinstance(lists, int) or lists < 1):
        raise UsageError(f"lists must be a positive integer, not {lists!r}.", params=("lists",))
    path = Path(out) if out is not None else default_index_path(feats)
    t0 = time.perf_counter()
    with open_vectors(feats, tokens, layer) as vecs:
        if vecs.rows == 0:
            raise OutputError(f"feats: {vecs.path} has no rows to index.", params=("feats",))
        # About 4 sqrt(N) lists balances list scanning against centroid comparisons.
        n_lists = lists or max(1, min(int(4 * math.sqrt(vecs.rows)), vecs.rows // _TRAIN_PER_LIST))
        n_lists = min(n_lists, vecs.rows)
        quantizer = faiss.IndexFlatIP(vecs.dim)
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, vecs.dim, n_lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = 1234  # the same file gives the same index
        # Plain float16 vectors (not residuals) so dedup can read the lists back as vectors.
        index.by_residual = False
        index.train(_training_sample(vecs, n_lists * _TRAIN_PER_LIST))
        for _, block in vecs.blocks():
            index.add(block)
        fingerprint = vecs.fingerprint()
        info = IndexInfo(
            path=path,
            feats=vecs.path.resolve(),
            rows=vecs.rows,
            dim=vecs.dim,
            tokens=vecs.tokens,
            layer=vecs.layer,
            lists=n_lists,
            nprobe=min(nprobe, n_lists),
            build_seconds=0.0,
            size_bytes=0,
        )
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)
    side = {
        "format": FORMAT,
        "library": f"faiss {faiss.__version__}",
        "feats": str(info.feats),
        "fingerprint": fingerprint,
        "rows": info.rows,
        "dim": info.dim,
        "tokens": info.tokens,
        "layer": info.layer,
        "lists": info.lists,
        "nprobe": info.nprobe,
    }
    tmp_side = _sidecar(path).with_name(_sidecar(path).name + ".tmp")
    tmp_side.write_text(json.dumps(side, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_side, _sidecar(path))
    return IndexInfo(
        **{
            **info.__dict__,
            "build_seconds": time.perf_counter() - t0,
            "size_bytes": path.stat().st_size,
        }
    )


def _training_sample(vecs: Vectors, want: int) -> np.ndarray:
    """Evenly spaced rows, read block by block so the whole file is never in memory."""
    if vecs.rows <= want:
        return vecs.read(0, vecs.rows)
    step = vecs.rows / want
    picks = np.unique((np.arange(want) * step).astype(np.int64))
    parts = []
    for first, block in vecs.blocks():
        mine = picks[(picks >= first) & (picks < first + len(block))] - first
        parts.append(block[mine])
    return np.concatenate(parts)


def _stale_reason(vecs: Vectors, index_path: Path) -> str | None:
    """Why the index at `index_path` cannot answer for `vecs`, or None when it can."""
    side_path = _sidecar(index_path)
    if not index_path.is_file() or not side_path.is_file():
        return f"{index_path} or its sidecar {side_path.name} is missing"
    try:
        side = json.loads(side_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{side_path} is damaged"
    now = [list(x) for x in vecs.fingerprint()]
    if side.get("format") != FORMAT:
        return f"{index_path} was written by another version of dinoreg"
    if side.get("fingerprint") != now or side.get("rows") != vecs.rows:
        return f"{vecs.path} changed after {index_path} was built"
    newest = max(mtime for _, _, mtime in vecs.fingerprint())
    if index_path.stat().st_mtime_ns < newest:
        return f"{index_path} is older than {vecs.path}"
    if (side.get("tokens"), side.get("layer"), side.get("dim")) != (
        vecs.tokens,
        vecs.layer,
        vecs.dim,
    ):
        return f"{index_path} was built for other tokens or another layer"
    return None


def find_index(vecs: Vectors) -> Path | None:
    """The default index of `vecs` when it exists, is current and matches its tokens and layer."""
    path = default_index_path(vecs.path)
    return path if _stale_reason(vecs, path) is None else None


class LoadedIndex:
    """A faiss index ready to answer for one `Vectors`: k-NN and range search on unit vectors."""

    def __init__(self, faiss: Any, index: Any, nprobe: int) -> None:
        self._faiss, self._index = faiss, index
        index.nprobe = nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self._index.search(np.ascontiguousarray(queries, np.float32), k)
        return scores, rows

    def list_pairs(
        self, threshold: float, neighbours: int = DEDUP_NEIGHBOUR_LISTS
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows a, rows b) scoring >= threshold, list by list against the neighbouring lists.

        Range-searching every row costs a coarse-quantizer pass plus nprobe list scans per row
        (about half an hour for 1M rows on 2 cores); comparing whole lists is a few matmuls each.
        """
        ivf, faiss = self._index, self._faiss
        n_lists, dim = ivf.nlist, ivf.d
        centroids = ivf.quantizer.reconstruct_n(0, n_lists)
        _, near = ivf.quantizer.search(centroids, min(n_lists, neighbours + 1))

        def members(lst: int) -> tuple[np.ndarray, np.ndarray]:
            n = ivf.invlists.list_size(lst)
            ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n).astype(np.int64)
            codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(lst), n * ivf.code_size)
            return ids, np.frombuffer(codes, np.float16).reshape(n, dim).astype(np.float32)

        # One thread: these products are small, and a threaded BLAS next to faiss's still
        # spinning OpenMP threads ran 10x slower than a single thread (measured on 2 cores).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for lst in range(n_lists):
                ids, vecs = members(lst)
                if not len(ids):
                    continue
                others = [members(int(m)) for m in near[lst] if m >= 0 and m != lst]
                all_ids = np.concatenate([ids, *(o[0] for o in others)])
                all_vecs = np.concatenate([vecs, *(o[1] for o in others)])
                scores = torch.from_numpy(vecs) @ torch.from_numpy(all_vecs).T
                ia, ib = torch.nonzero(scores >= threshold, as_tuple=True)
                yield ids[ia.numpy()], all_ids[ib.numpy()]
        finally:
            torch.set_num_threads(threads)


def load_for(vecs: Vectors, index: str | os.PathLike[str]) -> LoadedIndex | None:
    """The index to use for `vecs`: "auto" (the default one if current), "none", or a path."""
    if isinstance(index, str) and index == "none":
        return None
    faiss = _faiss()
    if isinstance(index, str) and index == "auto":
        path = find_index(vecs)
        if path is None or faiss is None:
            return None
    else:
        path = Path(index)
        reason = _stale_reason(vecs, path)
        if reason is not None:
            raise UsageError(f"index: {reason}; rebuild it or use index='auto'.")
        if faiss is None:
            raise UsageError(f"index: reading {path} needs faiss: pip install 'dinoreg[ann]'.")
    side = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    return LoadedIndex(faiss, faiss.read_index(str(path)), int(side["nprobe"]))
