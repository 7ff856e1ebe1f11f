"""`dinoreg info`: what an output file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dinoreg.cli.app import JsonOpt, app, examples

_INFO_EXAMPLES = examples(
    "dinoreg info feats.h5",
    "dinoreg info feats/ --json",
)


@app.command(epilog=_INFO_EXAMPLES)
def info(
    file: Annotated[
        Path, typer.Argument(help="An output of `dinoreg embed` (.h5 or .npy directory).")
    ],
    json_out: JsonOpt = False,
) -> None:
    """What an output holds: datasets and shapes, model, recipe, complete or not, failures."""
    from dinoreg.output.reader import inspect_output

    about = inspect_output(file)
    if json_out:
        from dataclasses import asdict

        print(json.dumps(asdict(about), ensure_ascii=False, default=str))
        return
    print("\n".join(_lines(about)))


_KEYS = (
    "model",
    "family",
    "weights_sha256",
    "image_size",
    "keep_aspect",
    "grid",
    "layers",
    "final_norm",
    "compute_dtype",
    "store_dtype",
    "tokens",
    "stored_tokens",
    "nonfinite_values",
    "dinoreg_version",
    "created",
)


def _lines(about) -> list[str]:
    if about.being_written:
        state = "being written by another process"
    elif about.complete:
        state = "complete"
    else:
        state = "INCOMPLETE: continue it with dinoreg embed ... --resume"
    rows = [("rows", str(about.rows)), ("failures", str(len(about.failures)))]
    if isinstance(about.meta.get("shard"), list):
        i, n = about.meta["shard"]
        first = about.meta.get("shard_first", 0)
        total = (about.meta.get("inputs_all") or {}).get("count", "?")
        rows.append(("shard", f"{i} of {n} (inputs from {first} of {total}; dinoreg merge)"))
    if about.staged_at is not None:
        rows.append(("staged rows", str(about.staged_at)))
    meta = about.meta
    rows += [(key, _show(meta[key])) for key in _KEYS if key in meta]
    if meta.get("grid"):
        h, w = meta["grid"]
        rows[[k for k, _ in rows].index("grid")] = ("grid", f"{h}x{w} patches (h x w)")
    if meta.get("num_registers") == 0:
        rows.append(("registers", "none: the model has no register tokens, nothing stored"))
    if "recipe" in meta:
        rows.append(("recipe", _show(meta["recipe"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{about.path}  ({about.format}, {state})"]
    lines += [f"{key:<{width}}  {value}" for key, value in rows]
    lines.append("datasets")
    names = [*about.datasets, "paths"]
    name_w = max(len(n) for n in names)
    for name, (shape, dt) in about.datasets.items():
        lines.append(f"  {name:<{name_w}}  {_shape(shape):<20} {dt}")
    lines.append(f"  {'paths':<{name_w}}  {_shape((about.rows,)):<20} utf-8")
    for path, reason in about.failures[:20]:
        lines.append(f"  failed: {path}: {reason}")
    if len(about.failures) > 20:
        lines.append(f"  ... and {len(about.failures) - 20} more failures")
    return lines


def _shape(shape) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _show(value) -> str:
    """A metadata value as a person reads it: lists comma-separated, None as -, no reprs."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_show(v)}" for k, v in value.items())
    return str(value)
