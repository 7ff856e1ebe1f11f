"""Provenance: checking the caller's meta, and what a resumed run must match.

`meta` is stored as HDF5 root attributes (`h5out.py`) or `meta.json`, plus `created` (set when
the output is first created, kept on resume) and `complete`, which the writer owns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from dinoreg.output.layout import DatasetSpec

# Meta keys that change what a row means; a resumed run must match the stored run on these.
RESUME_KEYS = (
    "model",
    "weights_sha256",
    "recipe",
    "tokens",
    "store_dtype",
    "layers",
    "final_norm",
    "keep_aspect",
)
WRITER_KEYS = ("created", "complete")


def prepare_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-normalised copy (tuples become lists), so stored and new meta compare equal."""
    clash = [k for k in WRITER_KEYS if k in meta]
    if clash:
        raise ValueError(f"meta keys {clash} are set by the writer")
    try:
        doc = json.loads(json.dumps(dict(meta), ensure_ascii=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from None
    if not all(isinstance(k, str) for k in meta):
        raise ValueError("meta keys must be strings")
    return doc


def _show(value: Any) -> str:
    text = "(unset)" if value is _UNSET else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


_UNSET = object()


def resume_differences(
    old_meta: Mapping[str, Any],
    new_meta: Mapping[str, Any],
    old_specs: Sequence[DatasetSpec],
    new_specs: Sequence[DatasetSpec],
) -> list[str]:
    """`key old -> new` for every RESUME_KEYS entry (set in either) or dataset that differs."""
    diffs = []
    for key in RESUME_KEYS:
        old, new = old_meta.get(key, _UNSET), new_meta.get(key, _UNSET)
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            # name the fields that differ (e.g. recipe.max_size), not two long dicts
            for field in sorted(set(old) | set(new)):
                a, b = old.get(field, _UNSET), new.get(field, _UNSET)
                if a != b:
                    diffs.append(f"{key}.{field} {_show(a)} -> {_show(b)}")
        else:
            diffs.append(f"{key} {_show(old)} -> {_show(new)}")
    if tuple(old_specs) != tuple(new_specs):

        def desc(specs: Sequence[DatasetSpec]) -> str:
            return ", ".join(
                f"{s.name}{'[ragged]' if s.ragged else ''}{s.row_shape} {s.dtype}" for s in specs
            )

        diffs.append(f"datasets [{desc(old_specs)}] -> [{desc(new_specs)}]")
    return diffs


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
