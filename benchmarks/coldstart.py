"""Cold start: wall time of `dinoreg --help` in a fresh process, next to `import torch`.

`dinoreg --help` must not import torch (DESIGN.md), so it should take a fraction of the
`import torch` reference. Each command runs once untimed (page cache), then `reps` times.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import Options, Section, Timing


def run(opts: Options) -> Section:
    start = time.perf_counter()
    section = Section("coldstart", "Cold start")
    reps = 3 if opts.quick else 5
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    help_cmd = _dinoreg_help_command()
    if help_cmd is None:
        notes.append(
            "`dinoreg --help`: skipped: no `dinoreg` on PATH and `dinoreg.cli` is not importable "
            "(install the package, e.g. `pip install -e .`)."
        )
    else:
        rows.append(_measure("dinoreg --help", help_cmd, reps))
        if help_cmd[0] == sys.executable:
            notes.append("`dinoreg` is not on PATH; timed `python -m dinoreg --help` instead.")
        rows.append(
            _measure(
                "dinoreg --help imports torch?",
                [sys.executable, "-c", _IMPORTS_TORCH],
                1,
                capture=True,
            )
        )
    rows.append(_measure("python -c 'import torch'", [sys.executable, "-c", "import torch"], reps))
    rows.append(_measure("python -c 'pass'", [sys.executable, "-c", "pass"], reps))
    section.data = {"commands": rows, "notes": notes}
    section.blocks = [_block(rows), *notes]
    section.seconds = time.perf_counter() - start
    return section


# Runs the CLI's --help in-process and reports whether torch got imported on the way.
_IMPORTS_TORCH = """
import sys
sys.argv = ["dinoreg", "--help"]
try:
    from dinoreg.cli import main
    main()
except SystemExit:
    pass
print("TORCH_IMPORTED=" + str("torch" in sys.modules))
"""


def _dinoreg_help_command() -> list[str] | None:
    exe = shutil.which("dinoreg")
    if exe:
        return [exe, "--help"]
    try:
        found = importlib.util.find_spec("dinoreg.cli") is not None
    except (ImportError, ValueError):
        found = False
    return [sys.executable, "-m", "dinoreg", "--help"] if found else None


def _measure(label: str, cmd: list[str], reps: int, capture: bool = False) -> dict[str, Any]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    row: dict[str, Any] = {"label": label, "command": cmd, "returncode": first.returncode}
    if capture:
        row["torch_imported"] = "TORCH_IMPORTED=True" in first.stdout
        return row
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, check=False)
        times.append(time.perf_counter() - t0)
    row |= Timing(times).as_dict()
    return row


def _block(rows: list[dict[str, Any]]) -> str:
    lines = ["| command | median s | best s | exit code |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        if "torch_imported" in r:
            continue
        lines.append(
            f"| `{r['label']}` | {r['median_s']:.3f} | {r['best_s']:.3f} | {r['returncode']} |"
        )
    checks = [r for r in rows if "torch_imported" in r]
    for r in checks:
        verdict = "yes (DESIGN.md says it must not)" if r["torch_imported"] else "no"
        lines.append("")
        lines.append(f"`dinoreg --help` imports torch: {verdict}.")
    return "\n".join(lines)
