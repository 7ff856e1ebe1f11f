"""Nearest neighbours and near-duplicate groups over an embed output (`.h5` or `.npy` directory).

Vectors are one per row (CLS, the mean of the patch tokens, or either from a stored layer),
L2-normalised, so every score is a cosine similarity. `search` and `dedup` scan the file in blocks
(memory does not grow with the row count) or use an approximate index built by `build_index`.
"""

from __future__ import annotations

from dinoreg.neighbours.dedup import DEFAULT_THRESHOLD, DupGroup, DupMember, dedup
from dinoreg.neighbours.exact import Hit, SearchResult, search
from dinoreg.neighbours.index import IndexInfo, build_index, default_index_path, find_index
from dinoreg.neighbours.vectors import TOKEN_CHOICES, Vectors, open_vectors

__all__ = [
    "DEFAULT_THRESHOLD",
    "TOKEN_CHOICES",
    "DupGroup",
    "DupMember",
    "Hit",
    "IndexInfo",
    "SearchResult",
    "Vectors",
    "build_index",
    "dedup",
    "default_index_path",
    "find_index",
    "open_vectors",
    "search",
]
