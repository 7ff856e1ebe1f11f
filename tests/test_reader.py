"""Reading outputs back: `inspect_output` and `read` on finished and unfinished outputs."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from dinoreg.errors import OutputError
from dinoreg.output.layout import DatasetSpec
from dinoreg.output.reader import inspect_output, read
from dinoreg.output.spec import OutputSpec
from dinoreg.output.writer import Writer

D = 4
GRID_SPECS = (
    DatasetSpec("cls", (D,), "float32"),
    DatasetSpec("patches", (2, 3, D), "float16"),
)


def partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def out_for(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("o.h5" if fmt == "h5" else "o")


def grid_batch(start: int, n: int) -> tuple[list[str], dict[str, np.ndarray]]:
    idx = np.arange(start, start + n, dtype=np.float32)
    cls = np.repeat(idx[:, None], D, axis=1)
    patches = (
        np.arange(6 * D, dtype=np.float32).reshape(1, 2, 3, D) + 100 * idx[:, None, None, None]
    )
    return [f"p{i}" for i in range(start, start + n)], {"cls": cls, "patches": patches}


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_grid_patches_and_missing_tokens(tmp_path: Path, fmt: str) -> None:
    out = out_for(tmp_path, fmt)
    with Writer.open(OutputSpec(out, fmt, GRID_SPECS), {"model": "m"}, "new") as w:
        w.write_batch(*grid_batch(0, 3))
        w.write_batch(*grid_batch(3, 2))
        w.close(complete=True)
    rows = list(read(out))
    assert [r.path for r in rows] == [f"p{i}" for i in range(5)]
    for i, r in enumerate(rows):
        assert r.registers is None and r.cls.tolist() == [float(i)] * D
        assert r.patches.shape == (2, 3, D) and r.patches.dtype == np.float16
        assert np.array_equal(r.patches, grid_batch(i, 1)[1]["patches"][0].astype("f2"))
    info = inspect_output(out)
    assert info.datasets == {"cls": ((5, D), "float32"), "patches": ((5, 2, 3, D), "float16")}
    assert info.meta["model"] == "m" and info.complete and info.failures == []


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_unfinished_output_is_read_up_to_its_journal(tmp_path: Path, fmt: str) -> None:
    out = out_for(tmp_path, fmt)
    spec = OutputSpec(out, fmt, GRID_SPECS)
    with Writer.open(spec, {"model": "m"}, "new") as w:
        w.write_batch(*grid_batch(0, 3), failures=[("bad.jpg", "truncated")])
        # readable while the writer runs and holds the lock; reading takes no lock
        info = inspect_output(out)
        assert (info.complete, info.rows, info.format) == (False, 3, fmt)
        assert info.failures == [("bad.jpg", "truncated")]
        assert info.datasets["patches"] == ((3, 2, 3, D), "float16")
        assert info.meta["complete"] is False and "created" in info.meta
        assert info.being_written and info.staged_at == (out if fmt == "npy" else partial(out))
        with pytest.raises(OutputError, match=r"not complete \(3 rows committed so far") as err:
            read(out)
        assert err.value.params == ("resume", "allow_incomplete")
        assert [r.path for r in read(out, allow_incomplete=True)] == ["p0", "p1", "p2"]
        w.write_batch(*grid_batch(3, 2))
        assert inspect_output(out).rows == 5
    stage = out if fmt == "npy" else tmp_path / "o.h5.partial"
    with open(stage / "cls.npy", "ab") as fh:  # an uncommitted batch in flight
        fh.write(np.ones((7, D), "f4").tobytes())
    info = inspect_output(out)
    assert info.rows == 5 and not info.being_written  # the writer has gone
    assert len(list(read(out, allow_incomplete=True))) == 5
    assert not (tmp_path / "o.h5").exists()


def test_ragged_patches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dinoreg.output.reader._BLOCK_BYTES", 64)  # many small blocks
    specs = (
        DatasetSpec("patches", (D,), "float32", ragged=True),
        DatasetSpec("grids", (2,), "int32"),
    )
    grids = [(1, 1), (2, 3), (3, 1), (1, 4), (2, 2)]
    items = [np.full((h * w, D), i, np.float32) for i, (h, w) in enumerate(grids)]
    for fmt in ("h5", "npy"):
        out = out_for(tmp_path, fmt)
        with Writer.open(OutputSpec(out, fmt, specs), {}, "new") as w:
            w.write_batch(["a", "b"], {"patches": items[:2], "grids": np.array(grids[:2])})
            w.write_batch(["c", "d", "e"], {"patches": items[2:], "grids": np.array(grids[2:])})
            w.close(complete=True)
        rows = list(read(out))
        assert [r.patches.shape for r in rows] == [(h, w, D) for h, w in grids]
        assert all((r.patches == i).all() and r.cls is None for i, r in enumerate(rows))
    # without a grids dataset ragged patches stay (k, D)
    out = tmp_path / "nogrid"
    with Writer.open(OutputSpec(out, "npy", specs[:1]), {}, "new") as w:
        w.write_batch(["a", "b", "c"], {"patches": items[:3]})
        w.close(complete=True)
    assert [r.patches.shape for r in read(out)] == [(1, D), (6, D), (3, D)]


def test_bad_outputs_are_one_sentence_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"")
    cases = {
        "missing.h5": "does not exist",
        "junk.h5": "not an HDF5 file",
        "other.h5": "not a dinoreg output",
        "photos": "not a dinoreg output",
    }
    for name, msg in cases.items():
        with pytest.raises(OutputError, match=msg) as err:
            inspect_output(tmp_path / name)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
        with pytest.raises(OutputError, match=msg):
            list(read(tmp_path / name))


def test_run_killed_before_its_first_commit(tmp_path: Path) -> None:
    stage = tmp_path / "o.h5.partial"
    stage.mkdir()
    (stage / "meta.json").write_text(json.dumps({"model": "m", "complete": False}))
    info = inspect_output(tmp_path / "o.h5")
    assert (info.complete, info.rows, info.datasets, info.format) == (False, 0, {}, "h5")
    assert list(read(tmp_path / "o.h5", allow_incomplete=True)) == []
