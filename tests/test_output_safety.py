"""Issue 10, output side: overwrite keeps the old output, foreign files, locks, read()'s files,
destination checks, float16 overflow counts (writer level, no model)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

from dinoreg.errors import OutputError
from dinoreg.output import checks, lock
from dinoreg.output.layout import DatasetSpec
from dinoreg.output.reader import inspect_output, read
from dinoreg.output.spec import OutputSpec, check_output
from dinoreg.output.writer import Writer

SPECS = (DatasetSpec("cls", (4,), "float16"),)


def write(out: Path, fmt: str, paths: list[str], value: float, mode: str = "new", done=True):
    w = Writer.open(OutputSpec(out, fmt, SPECS), {"model": "m"}, mode)  # type: ignore[arg-type]
    w.write_batch(paths, {"cls": np.full((len(paths), 4), value)})
    w.close(complete=done)
    return w


def out_for(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("o.h5" if fmt == "h5" else "o")


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_interrupted_overwrite_keeps_the_old_output_readable(tmp_path: Path, fmt: str) -> None:
    out = out_for(tmp_path, fmt)
    write(out, fmt, ["a", "b"], 1.0)
    write(out, fmt, ["x"], 2.0, mode="overwrite", done=False)  # killed mid-way
    assert [r.path for r in read(out)] == ["a", "b"]  # the old output, complete
    info = inspect_output(out)
    assert info.complete and info.staged_at == out.with_name(out.name + ".partial")
    with Writer.open(OutputSpec(out, fmt, SPECS), {"model": "m"}, "resume") as w:
        assert w.mode_used == "continued" and w.committed_inputs == {"x"}
        w.write_batch(["y"], {"cls": np.full((1, 4), 3.0)})
        w.close(complete=True)
    rows = list(read(out))
    assert [r.path for r in rows] == ["x", "y"] and rows[1].cls[0] == 3.0
    assert not out.with_name(out.name + ".partial").exists()
    assert not out.with_name(out.name + ".old").exists()


def test_npy_overwrite_never_touches_foreign_files(tmp_path: Path) -> None:
    out = tmp_path / "o"
    write(out, "npy", ["a"], 1.0)
    (out / "mine.npy").write_bytes(b"user data")
    for mode in ("overwrite",):
        with pytest.raises(OutputError, match=r"did not write \(mine.npy\)") as err:
            write(out, "npy", ["b"], 2.0, mode=mode)
        assert err.value.params == ("out",)
    assert (out / "mine.npy").read_bytes() == b"user data"
    assert [r.path for r in read(out)] == ["a"]


def test_lock_file_survives_completion_and_probe_takes_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o"
    w = Writer.open(OutputSpec(out, "npy", SPECS), {"model": "m"}, "new")
    held = os.fstat(w.lock_fd)
    calls: list[object] = []
    real_fcntl, real_flock = fcntl.fcntl, fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda *a: calls.append(("flock", a[1])) or real_flock(*a))
    monkeypatch.setattr(
        fcntl, "fcntl", lambda fd, cmd, arg=0: calls.append(cmd) or real_fcntl(fd, cmd, arg)
    )
    with pytest.raises(OutputError, match="being written by another dinoreg process"):
        check_output(out, "resume", "npy")
    assert inspect_output(out).being_written
    # probing only queried: no lock was placed (placing one could make a starting writer fail)
    assert calls and all(c == fcntl.F_OFD_GETLK for c in calls)
    w.write_batch(["a"], {"cls": np.zeros((1, 4))})
    w.close(complete=True)
    # the lock file was not unlinked while held: it is the same file, now free
    assert os.path.samestat(held, os.stat(out / ".lock"))
    assert lock.lock_holder(out) is None and not inspect_output(out).being_written


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_read_closes_its_files_when_stopped_early(tmp_path: Path, fmt: str) -> None:
    out = out_for(tmp_path, fmt)
    write(out, fmt, ["a", "b", "c"], 1.0)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    with read(out) as rows:
        assert next(rows).path == "a"
        assert open_fds() > before
    assert open_fds() == before
    rows = read(out)
    for _ in rows:
        break
    rows.close()
    assert open_fds() == before
    read(out).close()  # never iterated
    assert open_fds() == before


def test_incomplete_outputs_are_refused_by_read(tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    write(out, "h5", ["a"], 1.0, done=False)
    with pytest.raises(OutputError, match="not complete") as err:
        read(out)
    assert "allow_incomplete" in err.value.params
    assert [r.path for r in read(out, allow_incomplete=True)] == ["a"]


def test_destination_problems_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {
        tmp_path / "no" / "such" / "o.h5": "does not exist",
        tmp_path / ("n" * 250 + ".h5"): "too long",  # legal, but its .partial sibling is not
    }
    for out, words in cases.items():
        with pytest.raises(OutputError, match=words) as err:
            check_output(out, "new", "h5")
        assert "\n" not in str(err.value) and err.value.params == ("out",)
    real = os.statvfs

    class Fs:
        def __init__(self, flag: int, free: int) -> None:
            st = real(tmp_path)
            self.f_flag, self.f_frsize, self.f_bavail = flag, st.f_frsize, free // st.f_frsize

    monkeypatch.setattr(checks.os, "statvfs", lambda p: Fs(os.ST_RDONLY, 1 << 30))
    with pytest.raises(OutputError, match="read-only"):
        check_output(tmp_path / "o.h5", "new", "h5")
    monkeypatch.setattr(checks.os, "statvfs", lambda p: Fs(0, 1 << 20))
    with pytest.raises(OutputError, match="only 1 MiB free"):
        check_output(tmp_path / "o.h5", "new", "h5")
    monkeypatch.setattr(checks.os, "access", lambda p, m: False)
    monkeypatch.setattr(checks.os, "statvfs", lambda p: Fs(0, 1 << 30))
    with pytest.raises(OutputError, match="no permission"):
        check_output(tmp_path / "o.h5", "new", "h5")


def test_disk_too_full_to_convert_leaves_a_resumable_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o.h5"
    write(out, "h5", ["a"], 1.0, done=False)
    real = os.statvfs
    w = Writer.open(OutputSpec(out, "h5", SPECS), {"model": "m"}, "resume")

    class Full:
        f_flag, f_frsize, f_bavail = 0, 4096, 1

    monkeypatch.setattr(checks.os, "statvfs", lambda p: Full())
    with pytest.raises(OutputError, match="not enough space to convert") as err:
        w.close(complete=True)
    assert err.value.params == ("resume",)
    monkeypatch.setattr(checks.os, "statvfs", real)
    assert not out.exists() and inspect_output(out).rows == 1
    with Writer.open(OutputSpec(out, "h5", SPECS), {"model": "m"}, "resume") as w:
        w.close(complete=True)
    assert [r.path for r in read(out)] == ["a"]


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_float16_overflow_is_counted(tmp_path: Path, fmt: str) -> None:
    out = out_for(tmp_path, fmt)
    w = Writer.open(OutputSpec(out, fmt, SPECS), {"model": "m"}, "new")
    w.write_batch(["a", "b"], {"cls": np.array([[1e5, -1e6, 1.0, np.inf], [1, 2, 3, 4]])})
    w.write_batch(["c"], {"cls": np.array([[7e4, 0, 0, 0]], np.float32)})
    assert w.nonfinite_values == 3  # the inf that was already there is not the cast's doing
    w.close(complete=True)
    assert inspect_output(out).meta["nonfinite_values"] == 3 and w.nonfinite_values == 3
