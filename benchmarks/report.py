"""Write the sections as one markdown report and one JSON file."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import Section


def write(out_dir: Path, env: dict[str, Any], args: dict[str, Any], sections: list[Section]) -> str:
    """Write `results.md` and `results.json` under out_dir; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    md = render(env, args, sections, stamp)
    (out_dir / "results.md").write_text(md)
    payload = {
        "created": stamp,
        "environment": env,
        "arguments": args,
        "sections": {s.name: {"title": s.title, "seconds": s.seconds, **s.data} for s in sections},
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return md


def render(env: dict[str, Any], args: dict[str, Any], sections: list[Section], stamp: str) -> str:
    load = env.get("loadavg_start")
    load_end = env.get("loadavg_end")
    lines = [
        "# dinoreg benchmarks",
        "",
        f"{stamp}; {env['cpu']}, {env['cores']} cores, torch {env['torch']} "
        f"({env['torch_threads']} threads), transformers {env.get('transformers')}, "
        f"Python {env['python']}" + (f"; CUDA: {env['cuda']}" if env.get("cuda") else ""),
        "",
        f"Arguments: {' '.join(f'{k}={v}' for k, v in args.items())}",
    ]
    if load:
        end = f", at the end {load_end[0]:.2f}" if load_end else ""
        lines += [
            "",
            f"1-minute load average at the start {load[0]:.2f}{end} "
            "(other work on the machine makes every number noisier).",
        ]
    for s in sections:
        lines += ["", f"## {s.title}", ""]
        for block in s.blocks:
            lines += [block, ""]
        lines.append(f"_section took {s.seconds:.0f} s_")
    return "\n".join(lines).rstrip() + "\n"
