"""The examples the README points to run as written (with a tiny checkpoint for the model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import dinoreg

REPO = Path(__file__).resolve().parent.parent


def test_python_api_example_runs(tmp_path, tiny_dir):
    out = tmp_path / "feats.h5"
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python_api.py"), str(tiny_dir.path), str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"7 rows in {out}"
    assert "cls (1, 32) patches (1, 16, 16, 32)" in done.stdout
    with dinoreg.read(out) as rows:
        assert all(np.isfinite(r.cls).all() for r in rows)


def test_slurm_example_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(REPO / "examples" / "slurm_array.sh")])
    assert done.returncode == 0


def test_search_examples_run(tmp_path, tiny_dir):
    out = tmp_path / "feats.h5"
    script = REPO / "examples" / "search_dedup.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_dir.path), str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0].split("\t")
    assert first[:2] == ["row 0", "1"] and float(first[3]) == 1.0
    import os

    # the `dinoreg` command of the Python running the tests, as a shell user would have it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    shell = subprocess.run(
        ["bash", str(REPO / "examples" / "search_session.sh"), str(tiny_dir.path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert shell.returncode == 0, shell.stderr
    assert "chelsea.jpg" in shell.stdout and '"hits"' in shell.stdout
