"""Several devices: one process each, one output equal to the one-process output, and a run
interrupted on several devices resumes with each device continuing its own shard."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import EXAMPLES

import dinoreg
from dinoreg.errors import UsageError
from dinoreg.runtime import device_list


def rows(path):
    with dinoreg.read(path) as got:
        return [(r.path, r.cls, r.patches) for r in got]


def assert_same(a, b):
    assert [r[0] for r in a] == [r[0] for r in b]
    for x, y in zip(a, b, strict=True):
        assert np.abs(x[1] - y[1]).max() <= 1e-5 and np.abs(x[2] - y[2]).max() <= 1e-5


def test_combined_times_sum_seconds_and_list_decodes():
    from dinoreg.embedding.devices import combined_times

    a = {"wait_input": 1.0, "forward": 3.0, "decode": "device", "decode_choice": "x"}
    b = {"wait_input": 0.5, "forward": 2.0, "decode": "cpu", "decode_choice": "x"}
    assert combined_times([a, b]) == {
        "wait_input": 1.5,
        "forward": 5.0,
        "decode": "device; cpu",
        "decode_choice": "x",
    }
    assert combined_times([]) == {}


def test_device_lists():
    assert device_list("cpu,cpu") == ["cpu", "cpu"]
    assert device_list("cpu") == ["cpu"]
    with pytest.raises(UsageError, match="empty entry"):
        device_list("cpu,")
    with pytest.raises(UsageError):
        device_list("cpu,cuda:7")


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_two_processes_write_the_one_process_output(tmp_path, tiny_dir, fmt):
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLES, photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 no")
    common = {"model": str(tiny_dir.path), "workers": 0, "batch_size": 2}
    one = f"{tmp_path}/one.h5" if fmt == "h5" else f"{tmp_path}/one/"
    two = f"{tmp_path}/two.h5" if fmt == "h5" else f"{tmp_path}/two/"
    dinoreg.embed([str(photos)], one, **common)
    summary = dinoreg.embed([str(photos)], two, device="cpu,cpu", **common)
    assert summary.complete and summary.rows == 7 and len(summary.failures) == 1
    # both devices' stage times, summed: what the summary's "waited on input" share is made of
    assert summary.times["forward"] > 0 and summary.times["decode"] == "cpu"
    assert_same(rows(two), rows(one))
    assert dinoreg.inspect_output(two).failures == dinoreg.inspect_output(one).failures
    assert not os.path.exists(str(two).rstrip("/") + ".devices")  # shards merged and removed
    again = dinoreg.embed([str(photos)], two, device="cpu,cpu", resume=True, **common)
    assert again.mode_used == "already-complete" and again.rows == 0


@pytest.mark.slow
def test_an_interrupted_multi_device_run_resumes_per_device(tmp_path, tiny_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(12):  # enough batches that an interrupt lands mid-run
        for path in EXAMPLES.glob("*.jpg"):
            shutil.copy(path, photos / f"{k:02d}-{path.name}")
    out = tmp_path / "f.h5"
    work = tmp_path / "f.h5.devices"
    cmd = [sys.executable, "-m", "dinoreg", "embed", str(photos), "-o", str(out),
           "-m", str(tiny_dir.path), "-j", "0", "-b", "2", "--device", "cpu,cpu"]  # fmt: skip
    for attempt in range(4):
        shutil.rmtree(work, ignore_errors=True)
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        # wait until both devices have committed some rows, then Ctrl-C the whole group
        while time.monotonic() < deadline and proc.poll() is None:
            journals = list(work.glob("*.partial/journal.json"))
            if len(journals) == 2 and all(j.stat().st_size > 0 for j in journals):
                break
            time.sleep(0.05)
        time.sleep(0.3 * attempt)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        if proc.returncode == 130 and not out.exists():
            break
    else:
        pytest.fail("the interrupt never landed while both devices were running")
    assert "interrupted" in err and "--resume" in err, err
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "continued" in done.stderr and not work.exists()
    one = tmp_path / "one.h5"
    dinoreg.embed([str(photos)], one, model=str(tiny_dir.path), workers=0, batch_size=2)
    assert_same(rows(out), rows(one))
