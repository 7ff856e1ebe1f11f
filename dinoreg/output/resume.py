"""What a resumed run must share with the run it continues: the settings that change the numbers
(`meta.RESUME_KEYS`, weights by hash), the datasets, and the input list (by identity)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dinoreg.errors import OutputError
from dinoreg.output.identity import InputList, describe_difference
from dinoreg.output.layout import DatasetSpec
from dinoreg.output.meta import resume_differences


def check_same_run(
    path: Path,
    old_meta: Mapping[str, Any],
    new_meta: Mapping[str, Any],
    old_specs: Sequence[DatasetSpec] | None = None,
    new_specs: Sequence[DatasetSpec] | None = None,
) -> None:
    """OutputError naming every difference (one line) if the settings differ."""
    diffs = resume_differences(old_meta, new_meta, old_specs, new_specs)
    if diffs:
        params = tuple(dict.fromkeys(p for p, _ in diffs))
        raise OutputError(
            f"{path} was started with other settings ({'; '.join(d for _, d in diffs)}); "
            "use the same settings or pass overwrite=True.",
            params=(*params, "overwrite"),
        )


def check_same_inputs(
    path: Path, recorded: InputList | Mapping[str, Any], given: InputList
) -> None:
    """OutputError if `given` does not cover the same inputs (by identity) as the recorded run.

    `recorded` is the staged input list, or for a finished output only its digest (then the
    message can give counts, not examples).
    """
    new = given.digest()
    if isinstance(recorded, InputList):
        if recorded.digest() == new:
            return
        how = describe_difference(recorded.identities, given.identities)
    else:
        if {"count": recorded.get("count"), "sha256": recorded.get("sha256")} == new:
            return
        how = f"{new['count']} inputs now, {recorded.get('count')} recorded, not the same ones"
    raise OutputError(
        f"{path} was started with other inputs ({how}); give the same inputs, or pass "
        "overwrite=True, or choose another out.",
        params=("overwrite", "out"),
    )


def check_finished_run(
    path: Path,
    old_meta: Mapping[str, Any],
    new_meta: Mapping[str, Any],
    datasets: Sequence[DatasetSpec],
    given: InputList | None,
) -> None:
    """A resume that finds `path` complete: OutputError unless it is the same run."""
    new_specs = [s.to_json() for s in datasets]
    old_specs = old_meta.get("datasets", new_specs)  # older outputs did not record them
    if old_specs != new_specs:
        specs = [DatasetSpec.from_json(s) for s in old_specs]
        check_same_run(path, old_meta, new_meta, specs, datasets)
    check_same_run(path, old_meta, new_meta)
    if given is not None and isinstance(old_meta.get("inputs"), Mapping):
        check_same_inputs(path, old_meta["inputs"], given)
