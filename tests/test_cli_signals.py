"""Ctrl-C and SIGTERM to the whole process group (a terminal, timeout, systemd, Slurm): one line,
exit 130, committed work kept, and no traceback from the decode workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import EXAMPLES, make_hf


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    for k in range(40):
        for path in EXAMPLES.glob("*.jpg"):
            shutil.copy(path, folder / f"{k:02d}-{path.name}")
    return folder


def interrupt_when(cmd, ready, sig, cwd) -> tuple[int, str, str]:
    """Run `cmd` in its own session; once `ready()` holds, send `sig` to the whole group."""
    for attempt in range(4):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.05)
        time.sleep(0.2 * attempt)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 130:
            return proc.returncode, out, err
    pytest.fail(f"the signal never landed while the command ran (last exit {proc.returncode})")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_group_stops_embed_in_one_line(many, tiny_dir, tmp_path, sig):
    out = tmp_path / "f.h5"
    committed = tmp_path / "f.h5.partial" / "paths.txt"
    cmd = [sys.executable, "-m", "dinoreg", "embed", str(many), "-o", str(out),
           "-m", str(tiny_dir.path), "-j", "2", "-b", "4"]  # fmt: skip

    def rows_committed() -> bool:
        return committed.exists() and committed.stat().st_size > 0

    code, _, err = interrupt_when(cmd, rows_committed, sig, tmp_path)
    assert code == 130 and "interrupted:" in err and "--resume" in err, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.slow
def test_ctrl_c_in_classify_says_so(many, tmp_path):
    classifier = make_hf(tmp_path, num_labels=1000, seed=4)
    first = tmp_path / "first-line"
    cmd = ["bash", "-c",
           f"'{sys.executable}' -m dinoreg classify '{many}' -m '{classifier.path}' -j 0 "
           f"| (head -1 > '{first}'; cat > /dev/null); exit ${{PIPESTATUS[0]}}"]  # fmt: skip
    code, _, err = interrupt_when(
        cmd, lambda: first.exists() and first.stat().st_size, signal.SIGINT, tmp_path
    )
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err


def test_workers_keep_quiet_only_about_a_reader_that_left(capsys):
    from dinoreg.workers import _quiet_when_the_reader_left

    for error in (ConnectionResetError(104, "reset"), EOFError()):
        _quiet_when_the_reader_left(type(error), error, None)
    assert capsys.readouterr().err == ""
    _quiet_when_the_reader_left(ValueError, ValueError("a real bug"), None)
    assert "a real bug" in capsys.readouterr().err
