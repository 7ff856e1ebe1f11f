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
