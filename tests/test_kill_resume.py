"""Real interruptions of `dinoreg embed` in a subprocess: kill -9 at several moments, SIGINT and
SIGTERM; `--resume` must then end with what an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import EXAMPLES
from PIL import Image

pytestmark = pytest.mark.slow

N_IMAGES = 24
# The child runs the real CLI; a hook only slows each commit down so that a kill can land at a
# chosen moment. The kill itself comes from outside, as SIGKILL.
CHILD = """
import os, sys, time
import dinoreg.output.store as store
delay = float(os.environ.get("SLOW_COMMIT", "0.03"))
slow = os.environ.get("SLOW_POINTS", "append,commit").split(",")
store.crash_hook = lambda point: time.sleep(delay) if point in slow else None
from dinoreg.cli import main
main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    sources = sorted(EXAMPLES.glob("*.jpg"))
    for i in range(N_IMAGES):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        image.rotate(15 * i, expand=False).resize((256 + 7 * i, 256)).save(
            folder / f"img{i:03d}.jpg"
        )
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return folder


def start(
    out: Path, photos: Path, model: Path, *extra: str, delay: float = 0.03, slow: str = ""
) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, "embed", str(photos), "-o", str(out), "-m", str(model)]
    args += ["--batch-size", "2", "--workers", "0", "-q", *extra]
    env = {**os.environ, "SLOW_COMMIT": str(delay), "SLOW_POINTS": slow or "append,commit"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def committed_rows(out: Path) -> int:
    journal = (
        out.with_name(out.name + ".partial") if out.suffix == ".h5" else out
    ) / "journal.json"
    try:
        return json.loads(journal.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > end:
            return
        time.sleep(0.002)


def resume(out: Path, photos: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "dinoreg", "embed", str(photos), "-o", str(out), "-m", str(model)]
    return subprocess.run([*args, "-q", "--resume", *extra], capture_output=True, text=True)


def contents(out: Path) -> dict[str, np.ndarray]:
    with h5py.File(out) as f:
        data = {k: f[k][:] for k in ("cls", "registers", "patches", "paths")}
        data["failed"] = f["failed/paths"][:]
        assert f.attrs["complete"]
    return data


@pytest.fixture(scope="module")
def uninterrupted(photos, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    proc = start(out, photos, tiny_dir.path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # the broken file is skipped
    return contents(out)


def assert_same(out: Path, reference: dict[str, np.ndarray]) -> None:
    got = contents(out)
    assert list(got["paths"]) == list(reference["paths"])
    assert list(got["failed"]) == list(reference["failed"])
    for key in ("cls", "registers", "patches"):
        assert got[key].shape == reference[key].shape
        # batches fall differently after a resume; the values are the same up to float noise
        np.testing.assert_allclose(got[key], reference[key], rtol=0, atol=1e-5)


def phase(out: Path) -> str:
    """Where a killed run stood, from its files: the phase names of the test below."""
    stage = out.with_name(out.name + ".partial")
    rows = committed_rows(out)
    if out.exists():
        return "complete"
    if out.with_name(out.name + ".tmp").exists():
        return "at-the-end"  # every row committed, the conversion under way
    if rows < 1:
        return "before-first-commit" if stage.exists() else "not-started"
    return "half-way" if rows >= N_IMAGES // 2 else "after-first-commit"


# When to kill for each phase, and how slow to make the child there so the kill lands in it.
MOMENTS = {
    "before-first-commit": (lambda out: out.with_name(out.name + ".partial").exists(), "commit"),
    "after-first-commit": (lambda out: committed_rows(out) >= 1, "commit"),
    "half-way": (lambda out: committed_rows(out) >= N_IMAGES // 2, "commit"),
    "at-the-end": (lambda out: out.with_name(out.name + ".tmp").exists(), "h5"),
}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill_9_then_resume_gives_the_uninterrupted_result(
    moment, photos, tiny_dir, tmp_path, uninterrupted
):
    when, slow_point = MOMENTS[moment]
    # Retry with a slower child until the kill lands in the phase this test is named after;
    # never pass by finding it elsewhere.
    for attempt, delay in enumerate((0.05, 0.2, 0.8)):
        out = tmp_path / f"feats{attempt}.h5"
        proc = start(out, photos, tiny_dir.path, delay=delay, slow=slow_point)
        wait_for(lambda out=out: when(out), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if phase(out) == moment:
            break
    else:
        pytest.fail(f"could not kill the run {moment}; it was {phase(out)}")
    rows_before = committed_rows(out)
    res = resume(out, photos, tiny_dir.path)  # resume also starts a run that committed nothing
    assert res.returncode == 3, res.stderr  # the broken file again
    assert "Traceback" not in res.stderr
    assert_same(out, uninterrupted)
    assert not out.with_name(out.name + ".partial").exists()
    if moment == "half-way":
        assert rows_before >= N_IMAGES // 2  # committed work survived the kill


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_commits_exits_130_and_prints_the_resume_command(
    sig, photos, tiny_dir, tmp_path, uninterrupted
):
    # The second writer below takes seconds to start on a busy machine; retry with a slower
    # child until the signal lands while the run is still going (never pass on a finished run).
    for attempt, delay in enumerate((0.25, 0.8, 2.0)):
        out = tmp_path / f"feats{attempt}.h5"
        proc = start(out, photos, tiny_dir.path, delay=delay)
        wait_for(lambda out=out: committed_rows(out) >= 4, proc)
        # a second writer is refused at once while the first holds the output
        second = resume(out, photos, tiny_dir.path)
        assert second.returncode == 1
        assert "another dinoreg process" in second.stderr
        if committed_rows(out) < N_IMAGES - 4:  # batches left: the signal lands mid-run
            break
        proc.kill()
        proc.communicate()
    else:
        pytest.fail("the run always finished before it could be interrupted")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert committed_rows(out) >= 4
    res = resume(out, photos, tiny_dir.path)
    assert res.returncode == 3, res.stderr
    assert_same(out, uninterrupted)


def test_kill_9_of_an_npy_run_then_resume(photos, tiny_dir, tmp_path):
    out = tmp_path / "feats"
    ref = tmp_path / "ref"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dinoreg",
            "embed",
            str(photos),
            "-o",
            f"{ref}/",
            "-m",
            str(tiny_dir.path),
            "-q",
            "--tokens",
            "cls",
        ],
        check=False,
    )
    proc = start(out, photos, tiny_dir.path, "--format", "npy", "--tokens", "cls")
    wait_for(lambda: committed_rows(out) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads((out / "meta.json").read_text()).get("complete")
    res = resume(out, photos, tiny_dir.path, "--format", "npy", "--tokens", "cls")
    assert res.returncode == 3, res.stderr
    np.testing.assert_allclose(np.load(out / "cls.npy"), np.load(ref / "cls.npy"), atol=1e-5)
    assert (out / "paths.txt").read_text() == (ref / "paths.txt").read_text()
    assert not (out / "journal.json").exists()


def test_decode_workers_do_not_keep_a_killed_run_locked(photos, tiny_dir, tmp_path):
    out = tmp_path / "feats.h5"
    proc = start(out, photos, tiny_dir.path, "--workers", "2", delay=0.2)
    wait_for(lambda: committed_rows(out) >= 2, proc)
    proc.send_signal(signal.SIGKILL)  # the main process only: its workers live on a moment
    proc.wait()
    res = resume(out, photos, tiny_dir.path)
    assert "another dinoreg process" not in res.stderr
    assert res.returncode == 3, res.stderr
