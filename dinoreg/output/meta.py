"""Provenance: checking the caller's meta, and what a resumed run must match.

`meta` is stored as HDF5 root attributes (`hdf5.py`) or `meta.json`, plus the keys the writer
owns: `created` (set when the output is first created, kept on resume), `run_id` (one per
creation; tells a finished output from the staging directory of a run replacing it), `inputs`
(count and sha256 of the input identities, `identity.py`), `nonfinite_values` (values the store
dtype cast turned into inf or nan) and `complete`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from dinoreg.output.layout import DatasetSpec

# Meta keys that change the numbers a row holds; a resumed run must match the stored run on
# these. Weights are compared by hash (`weights_sha256`): the same file under another name is the
# same model. `model` (the name) only counts when either side has no hash.
RESUME_KEYS = (
    "weights_sha256",
    "recipe",
    "compute_dtype",
    "store_dtype",
    "tokens",
    "layers",
    "final_norm",
    "keep_aspect",
)
# The Python parameter that sets each key, for the error's `params` (the CLI maps them to flags).
PARAMS = {
    "model": "model",
    "weights_sha256": "model",
    "recipe": "image_size",
    "compute_dtype": "dtype",
    "store_dtype": "store_dtype",
    "tokens": "tokens",
    "layers": "layers",
    "final_norm": "final_norm",
    "keep_aspect": "keep_aspect",
}
WRITER_KEYS = ("created", "complete", "run_id", "inputs", "nonfinite_values")


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


_UNSET = object()


def _show(value: Any) -> str:
    text = "(unset)" if value is _UNSET else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _specs(specs: Sequence[DatasetSpec]) -> str:
    # No square brackets: the CLI renders messages with rich, which would eat `[...]` as markup.
    shown = (
        f"{s.name} {'x'.join(map(str, s.row_shape))} {s.dtype}{' ragged' if s.ragged else ''}"
        for s in specs
    )
    return "(" + ", ".join(shown) + ")"


def resume_differences(
    old_meta: Mapping[str, Any],
    new_meta: Mapping[str, Any],
    old_specs: Sequence[DatasetSpec] | None = None,
    new_specs: Sequence[DatasetSpec] | None = None,
) -> list[tuple[str, str]]:
    """(parameter, `key old -> new`) for every setting that changes the numbers and differs.

    Keys set on neither side are equal; a key set on one side only is a difference.
    """
    diffs: list[tuple[str, str]] = []
    keys = list(RESUME_KEYS)
    if "weights_sha256" not in old_meta or "weights_sha256" not in new_meta:
        keys.insert(0, "model")  # no hash to go by: the name is all we have
    for key in keys:
        old, new = old_meta.get(key, _UNSET), new_meta.get(key, _UNSET)
        if old == new:
            continue
        param = PARAMS.get(key, key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            # name the fields that differ (e.g. recipe.max_size), not two long dicts
            for field in sorted(set(old) | set(new)):
                a, b = old.get(field, _UNSET), new.get(field, _UNSET)
                if a != b:
                    sub = field if key == "recipe" and field in _RECIPE_PARAMS else param
                    diffs.append((sub, f"{key}.{field} {_show(a)} -> {_show(b)}"))
        else:
            diffs.append((param, f"{key} {_show(old)} -> {_show(new)}"))
    if old_specs is not None and new_specs is not None and tuple(old_specs) != tuple(new_specs):
        diffs.append(("tokens", f"datasets {_specs(old_specs)} -> {_specs(new_specs)}"))
    return diffs


_RECIPE_PARAMS = ("image_size", "max_size", "keep_aspect", "crop")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
