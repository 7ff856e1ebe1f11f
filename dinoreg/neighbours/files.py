"""An embed output's files opened for search: its arrays (memory-mapped), metadata and the
dataset holding the vectors asked for."""

from __future__ import annotations

import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py

from dinoreg._fs import read_json
from dinoreg.errors import OutputError, UsageError
from dinoreg.neighbours.npymap import MappedNpy
from dinoreg.output import layout
from dinoreg.output.hdf5 import decode_attrs

_LAYER_RE = re.compile(r"layers/(-?\d+)/\w+")


def open_npy(path: Path, stack: ExitStack) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    if (path / layout.JOURNAL).exists():
        raise OutputError(
            f"feats: {path} is an unfinished embed output (a run is writing it or was killed); "
            "finish or resume that run first."
        )
    if not (path / layout.META).is_file():
        raise OutputError(
            f"feats: {path} is a directory but not a dinoreg embed output.", params=("feats",)
        )
    meta = read_json(path / layout.META)
    if meta.get("complete") is not True:
        raise OutputError(
            f"feats: {path} is not complete; finish or resume its embed run first.",
            params=("feats",),
        )
    arrays: dict[str, Any] = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".npy"):
            try:
                arrays[layout.dataset_name(file)] = MappedNpy(path / file, stack)
            except (OSError, ValueError):
                raise OutputError(
                    f"feats: {path / file} is not a readable .npy file.", params=("feats",)
                ) from None
    if not (path / layout.PATHS).is_file():
        raise OutputError(
            f"feats: {path} has no {layout.PATHS}; it is not a complete output.", params=("feats",)
        )
    return arrays, meta, [path / layout.META]


def open_h5(path: Path, stack: ExitStack) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    try:
        f = stack.enter_context(h5py.File(path, "r"))
    except OSError:
        raise OutputError(
            f"feats: {path} is not an HDF5 file or an embed output.", params=("feats",)
        ) from None
    if not isinstance(f.get("paths"), h5py.Dataset):
        raise OutputError(
            f"feats: {path} is an HDF5 file but not a dinoreg embed output.", params=("feats",)
        )
    meta = decode_attrs(f.attrs)
    if meta.get("complete") is not True:
        raise OutputError(
            f"feats: {path} is not complete; finish or resume its embed run first.",
            params=("feats",),
        )
    arrays: dict[str, Any] = {"__file__": f, "paths": f["paths"]}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and name != "paths" and not name.startswith("failed/"):
            arrays[name] = obj

    f.visititems(visit)
    return arrays, meta, [path]


def pick(
    path: Path, arrays: dict[str, Any], meta: dict[str, Any], tokens: str, layer: int | None
) -> tuple[int, str, int | None, dict[str, str]]:
    """(rows, dataset prefix, absolute layer, {role: dataset name}) for the requested vectors."""
    stored = sorted({int(m.group(1)) for n in arrays if (m := _LAYER_RE.fullmatch(n))})
    if layer is None:
        has_root = any(t in arrays for t in ("cls", "registers", "patches"))
        block = None if has_root or not stored else stored[-1]
    else:
        if not stored:
            raise UsageError(
                f"layer: {path} stores no intermediate layers; leave layer unset.",
                params=("layer",),
            )
        depth = meta.get("depth")
        block = int(layer) + depth if layer < 0 and isinstance(depth, int) else int(layer)
        if block not in stored:
            have = ", ".join(map(str, stored))
            raise UsageError(
                f"layer: {path} stores layers {have}, not {layer}; pick one of them.",
                params=("layer",),
            )
    prefix = "" if block is None else f"layers/{block}/"
    where = f"{path}" + (f" layer {block}" if block is not None else "")
    if tokens == "cls":
        name = prefix + "cls"
        if name not in arrays:
            raise OutputError(
                f"feats: {where} stores no CLS tokens; use tokens='patches-mean' if it has "
                "patches, or embed with the cls token."
            )
        picked = {"data": name}
    else:
        name = prefix + "patches"
        if name not in arrays:
            raise OutputError(
                f"feats: {where} stores no patch tokens for tokens='patches-mean'.",
                params=("feats",),
            )
        picked = {"data": name}
        if name + "_offsets" in arrays:
            picked["offsets"] = name + "_offsets"
    if "paths" in arrays:
        rows = len(arrays["paths"])
    else:
        rows = sum(1 for _ in layout.iter_lines(path / layout.PATHS))
    data = arrays[picked["data"]]
    have = len(arrays[picked["offsets"]]) - 1 if "offsets" in picked else data.shape[0]
    if have != rows or data.ndim < 2:
        raise OutputError(
            f"feats: {path}: {name} has {have} rows but there are {rows} paths.", params=("feats",)
        )
    return rows, prefix, block, picked
