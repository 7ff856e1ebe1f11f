"""`dedup`: groups of rows whose vectors are at least `threshold` cosine-similar.

Pairs above the threshold are found block against block (each unordered pair of blocks once) or,
when a current index exists, inverted list against neighbouring lists (see `index.py`); they are
merged with a vectorised union-find whose only per-row state is one int64 parent array. Groups
are the connected components, so a chain a~b~c is one group even when a and c score below
`threshold` together.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dinoreg.errors import UsageError
from dinoreg.neighbours.vectors import Tokens, Vectors, open_vectors

__all__ = ["DEFAULT_THRESHOLD", "DupGroup", "DupMember", "all_pairs", "dedup"]

# Near-duplicates of one photo (re-encoded, resized, lightly cropped) score about 0.95 and above
# with DINOv2 CLS tokens; distinct photos of one scene mostly score lower. See the README.
DEFAULT_THRESHOLD = 0.95
# Float32 dot products of identical unit vectors can land a few ulps under 1.0; pairs within this
# of the threshold count, so threshold=1.0 still finds exact duplicates.
_SLACK = 1e-6
DEDUP_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class DupMember:
    row: int
    path: str
    score: float  # cosine similarity to the group's first member (1.0 for the first itself)


@dataclass(frozen=True)
class DupGroup:
    """Near-duplicate rows in row order; the first member is the one the scores refer to."""

    members: list[DupMember]

    @property
    def size(self) -> int:
        return len(self.members)


def dedup(
    feats: str | os.PathLike[str],
    threshold: float = DEFAULT_THRESHOLD,
    tokens: Tokens = "cls",
    layer: int | None = None,
    index: Literal["auto", "none"] | str | os.PathLike[str] = "auto",
) -> list[DupGroup]:
    """Groups of two or more rows of `feats` linked by cosine similarity >= `threshold`.

    Largest groups first (ties: lowest first row); `index` as in `search`.
    """
    bad_type = isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating))
    if bad_type or not (0.0 < float(threshold) <= 1.0):
        raise UsageError(
            f"threshold must be a number in (0, 1], not {threshold!r}.", params=("threshold",)
        )
    from dinoreg.neighbours.index import load_for

    with open_vectors(feats, tokens, layer) as vecs:
        parent = np.arange(vecs.rows, dtype=np.int64)
        ann = load_for(vecs, index)
        if ann is not None:
            for a, b in ann.list_pairs(float(threshold) - _SLACK):
                _union(parent, a, b)
        else:
            for a, b in all_pairs(vecs, float(threshold)):
                _union(parent, a, b)
        return _groups(vecs, parent)


def all_pairs(vecs: Vectors, threshold: float, block_rows: int = DEDUP_BLOCK_ROWS):
    """Yield (rows a, rows b) arrays, a < b, of every pair scoring >= `threshold`, exactly."""
    cut = threshold - _SLACK
    for first_i, bi in vecs.blocks(block_rows):
        ti = torch.from_numpy(bi)
        for first_j, bj in vecs.blocks(block_rows, start=first_i):
            s = ti @ torch.from_numpy(bj).T
            if first_j == first_i:
                # The diagonal block: each pair once, and no row with itself.
                s.masked_fill_(torch.tril(torch.ones_like(s, dtype=torch.bool)), -math.inf)
            ia, ib = torch.nonzero(s >= cut, as_tuple=True)
            if len(ia):
                yield ia.numpy() + first_i, ib.numpy() + first_j


def _roots(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the sets of each pair; a set's root is always its lowest row (parent[x] <= x)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        open_ = ra != rb
        if not open_.any():
            break
        a, b, ra, rb = a[open_], b[open_], ra[open_], rb[open_]
        # Several pairs may compete for one root; the lowest wins and the others go round again.
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
    # Compress the touched paths so later finds stay short.
    if len(a):
        parent[a] = _roots(parent, a)
        parent[b] = _roots(parent, b)


def _groups(vecs: Vectors, parent: np.ndarray) -> list[DupGroup]:
    labels = parent.copy()
    while True:
        up = labels[labels]
        if np.array_equal(up, labels):
            break
        labels = up
    counts = np.bincount(labels, minlength=len(labels)) if len(labels) else labels
    members = np.flatnonzero(counts[labels] >= 2) if len(labels) else labels
    if not len(members):
        return []
    # Stable sort by label keeps members in row order, and the label is the group's first row.
    members = members[np.argsort(labels[members], kind="stable")]
    cuts = np.flatnonzero(np.diff(labels[members])) + 1
    found = np.split(members, cuts)
    found.sort(key=lambda g: (-len(g), int(g[0])))
    wanted = [int(r) for g in found for r in g]
    names = dict(zip(sorted(set(wanted)), vecs.path_of(sorted(set(wanted))), strict=True))
    groups = []
    for g in found:
        v = vecs.take([int(r) for r in g])
        scores = np.clip(v @ v[0], -1.0, 1.0)
        scores[0] = 1.0
        groups.append(
            DupGroup(
                [DupMember(int(r), names[int(r)], float(s)) for r, s in zip(g, scores, strict=True)]
            )
        )
    return groups
