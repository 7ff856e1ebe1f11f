"""What `dinoreg embed` says at the end of a run: one line for people, one JSON object for
scripts, and the command that continues an interrupted run."""

from __future__ import annotations

import shlex
import sys

import typer

from dinoreg.cli import output
from dinoreg.cli.app import Invocation


def summary_line(s) -> str:
    if s.mode_used == "already-complete":
        return f"{s.out} is already complete ({s.resumed} inputs); nothing to do"
    size = output.human_bytes(s.bytes)
    resumed = f", {s.resumed} done by earlier runs" if s.resumed else ""
    earlier = f", {s.failures_before} earlier" if s.failures_before else ""
    verb = "continued" if s.mode_used == "continued" else "embedded"
    line = (
        f"{verb}: {s.rows} images ({len(s.failures)} skipped{earlier}{resumed}) in "
        f"{s.seconds:.1f} s, {s.images_per_s:.1f} images/s -> {s.out} ({size})"
    )
    loop = sum(s.times.get(k, 0.0) for k in ("wait_input", "forward", "write"))
    if loop > 0:
        # the one number that says whether more decode workers (or GPU decoding) would help
        line += f"; the model waited on input {s.times.get('wait_input', 0.0) / loop:.0%}"
    if s.times.get("decode") == "device":
        line += "; JPEGs decoded on the device"
    return line


def summary_doc(s) -> dict:
    """The run summary for scripts (`--json`): one object on stdout."""
    return {
        "output": str(s.out),
        "complete": s.complete,
        "mode": s.mode_used,
        "rows": s.rows,
        "skipped": len(s.failures),
        "skipped_before": s.failures_before,
        "resumed": s.resumed,
        "inputs": s.inputs,
        "seconds": round(s.seconds, 6),
        "images_per_s": round(s.images_per_s, 3),
        "bytes": s.bytes,
        "rows_at": str(s.rows_at) if s.rows_at else None,
        "nonfinite_values": s.nonfinite_values,
        "times": s.times,
    }


def resume_command(ctx: typer.Context) -> str:
    """The command line that continues this run: the same arguments, --resume for --overwrite."""
    given = ctx.obj.args if isinstance(ctx.obj, Invocation) else sys.argv[1:]
    args = [a for a in given if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    text = shlex.join(["dinoreg", *args])
    if "-" in args:
        text += "   (feed the same paths on stdin again)"
    return text
