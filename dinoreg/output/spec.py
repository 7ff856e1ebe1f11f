"""What an output is (path, format, datasets) and the checks made before anything is written."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dinoreg.errors import OutputError
from dinoreg.output import layout
from dinoreg.output.checks import check_destination
from dinoreg.output.layout import DatasetSpec
from dinoreg.output.lock import probe_lock
from dinoreg.output.state import Format, infer_format, locate

Mode = Literal["new", "overwrite", "resume"]


@dataclass(frozen=True)
class OutputSpec:
    path: Path
    format: Format
    datasets: tuple[DatasetSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "datasets", tuple(self.datasets))
        if self.format not in ("h5", "npy"):
            raise ValueError(f"format must be 'h5' or 'npy', not {self.format!r}")
        layout.validate_datasets(self.datasets)


def check_output(
    target: OutputSpec | str | os.PathLike[str], mode: Mode, format_flag: str | None = None
) -> None:
    """Refuse early (before any model loads) what `Writer.open` would refuse. Writes nothing."""
    if isinstance(target, OutputSpec):
        path, fmt = target.path, target.format
    else:
        path, fmt = Path(target), infer_format(target, format_flag)
    check_destination(path)  # first: a name too long for its .partial breaks every later stat
    loc = locate(path, fmt)
    check_state(path, mode, loc.state)
    probe_lock(loc.stage, path)
    if fmt == "npy" and loc.stage != path:
        probe_lock(path, path)


def check_state(path: Path, mode: Mode, state: str) -> None:
    if mode not in ("new", "overwrite", "resume"):
        raise ValueError(f"mode must be new, overwrite or resume, not {mode!r}")
    if mode == "new" and state != "missing":
        raise OutputError(
            f"{path} already exists; pass overwrite=True to replace it or resume=True to "
            "continue it.",
            params=("overwrite", "resume"),
        )
    if mode == "resume" and state == "damaged":
        raise OutputError(
            f"{path} has a damaged meta.json; pass overwrite=True to start again.",
            params=("overwrite",),
        )
