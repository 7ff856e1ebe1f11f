"""`search`: the k nearest rows of an output for each query, by cosine similarity.

Exact search multiplies a chunk of queries with one block of rows at a time (torch matmul, on
all the threads torch is allowed) and keeps a running top-k, so memory depends on the block and
query chunk sizes, never on the number of rows. An approximate index (see `index.py`) answers
instead when one was built for the same file, tokens and layer and is not older than the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from dinoreg.errors import UsageError
from dinoreg.neighbours.vectors import Tokens, Vectors, open_vectors

__all__ = ["Hit", "Query", "SearchResult", "exact_topk", "search"]

# A query: a vector (D,) embedded elsewhere, a row index of FEATS, or a path stored in FEATS.
Query = np.ndarray | int | str
# Scores held at once per block are (query chunk x block rows) float32: 512 x 32768 is 64 MiB.
QUERY_CHUNK = 512
SEARCH_BLOCK_ROWS = 32768


@dataclass(frozen=True)
class Hit:
    row: int
    path: str
    score: float


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query, best first. `clipped`: FEATS has fewer rows than `requested_k`."""

    query: int | str | None  # the row or path asked for; None for a vector query
    hits: list[Hit]
    requested_k: int
    clipped: bool
    method: Literal["exact", "index"]


def search(
    feats: str | os.PathLike[str],
    queries: np.ndarray | Sequence[Query],
    k: int = 10,
    tokens: Tokens = "cls",
    layer: int | None = None,
    index: Literal["auto", "none"] | str | os.PathLike[str] = "auto",
) -> list[SearchResult]:
    """Top-`k` rows of `feats` for each query, in query order; a row query finds itself first.

    `queries`: a (Q, D) array, or a sequence of (D,) vectors, row indices and stored paths.
    `index`: "auto" uses `<feats>.index` when it is current, "none" forces exact, or a path.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k must be a positive integer, not {k!r}.", params=("k",))
    from dinoreg.neighbours.index import load_for

    with open_vectors(feats, tokens, layer) as vecs:
        matrix, asked, self_rows = _resolve_queries(vecs, queries)
        top = min(int(k), vecs.rows)
        ann = load_for(vecs, index)
        if ann is not None and top:
            scores, rows = ann.search(matrix, top)
            method: Literal["exact", "index"] = "index"
        else:
            scores, rows = exact_topk(vecs, matrix, top)
            method = "exact"
        return _results(vecs, scores, rows, asked, self_rows, int(k), top, method)


def exact_topk(
    vecs: Vectors, queries: np.ndarray, k: int, block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows), each (Q, k), best first, over all rows of `vecs` by blocked matmul."""
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    n_q = len(q)
    best_s = torch.full((n_q, k), -float("inf"))
    best_r = torch.full((n_q, k), -1, dtype=torch.int64)
    if k == 0 or n_q == 0:
        return best_s.numpy(), best_r.numpy()
    step = block_rows or SEARCH_BLOCK_ROWS
    for first, block in vecs.blocks(step):
        b = torch.from_numpy(block)
        for lo in range(0, n_q, QUERY_CHUNK):
            hi = min(n_q, lo + QUERY_CHUNK)
            s = q[lo:hi] @ b.T
            kk = min(k, s.shape[1])
            bs, br = torch.topk(s, kk, dim=1)
            cand_s = torch.cat([best_s[lo:hi], bs], dim=1)
            cand_r = torch.cat([best_r[lo:hi], br + first], dim=1)
            # Stable sort on (score desc) keeps the earlier row first among equal scores.
            order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s[lo:hi] = torch.gather(cand_s, 1, order)
            best_r[lo:hi] = torch.gather(cand_r, 1, order)
    return best_s.numpy(), best_r.numpy()


def _resolve_queries(
    vecs: Vectors, queries: np.ndarray | Sequence[Query]
) -> tuple[np.ndarray, list[int | str | None], list[int | None]]:
    """(Q, D) query matrix, what each query was, and the row each row/path query stands for."""
    if isinstance(queries, np.ndarray) and queries.ndim == 2:
        items: list[Query] = list(queries)
    elif isinstance(queries, (str, bytes, np.ndarray)):
        raise UsageError(
            "queries must be a (Q, D) array or a list of vectors, rows and paths.",
            params=("queries",),
        )
    else:
        items = list(queries)
    asked: list[int | str | None] = []
    self_rows: list[int | None] = []
    vectors: dict[int, np.ndarray] = {}
    path_slots: dict[int, str] = {}
    for i, item in enumerate(items):
        if isinstance(item, (bool, np.bool_)):
            raise UsageError(
                f"queries[{i}] is a boolean, not a vector, row or path.", params=("queries",)
            )
        if isinstance(item, (int, np.integer)):
            row = int(item)
            if not 0 <= row < vecs.rows:
                raise UsageError(
                    f"queries[{i}]: row {row} is out of range; {vecs.path} has rows "
                    f"0..{vecs.rows - 1}."
                )
            asked.append(row)
            self_rows.append(row)
        elif isinstance(item, (str, Path)):
            asked.append(str(item))
            self_rows.append(None)
            path_slots[i] = str(item)
        else:
            v = np.asarray(item, np.float32)
            if v.shape != (vecs.dim,) or not np.isfinite(v).all():
                raise UsageError(
                    f"queries[{i}] must be a finite vector of length {vecs.dim} (the dimension "
                    f"of {vecs.path}), not shape {v.shape}."
                )
            vectors[i] = v / max(float(np.linalg.norm(v)), 1e-12)
            asked.append(None)
            self_rows.append(None)
    if path_slots:
        found = vecs.find_paths(list(path_slots.values()))
        for slot, row in zip(path_slots, found, strict=True):
            self_rows[slot] = row
    matrix = np.zeros((len(items), vecs.dim), np.float32)
    for i in range(len(items)):
        row = self_rows[i]
        matrix[i] = vectors[i] if row is None else vecs.read(row, row + 1)[0]
    return matrix, asked, self_rows


def _results(
    vecs: Vectors,
    scores: np.ndarray,
    rows: np.ndarray,
    asked: list[int | str | None],
    self_rows: list[int | None],
    k: int,
    top: int,
    method: Literal["exact", "index"],
) -> list[SearchResult]:
    picked: list[list[tuple[int, float]]] = []
    for i in range(len(asked)):
        pairs = [(int(r), float(s)) for r, s in zip(rows[i], scores[i], strict=True) if r >= 0]
        own = self_rows[i]
        if own is not None:
            # A row is its own nearest neighbour by definition; exact duplicates (or float
            # rounding) must not push it off the top or below 1.0.
            pairs = [(own, 1.0), *[p for p in pairs if p[0] != own][: top - 1]]
        picked.append([(r, min(1.0, max(-1.0, s))) for r, s in pairs])
    all_rows = sorted({r for pairs in picked for r, _ in pairs})
    names = dict(zip(all_rows, vecs.path_of(all_rows), strict=True))
    return [
        SearchResult(
            query=asked[i],
            hits=[Hit(r, names[r], s) for r, s in pairs],
            requested_k=k,
            clipped=top < k,
            method=method,
        )
        for i, pairs in enumerate(picked)
    ]
