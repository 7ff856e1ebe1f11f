"""The output writer: round trips, modes, locking, resume, and real kill -9 crash tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from dinoreg.errors import OutputError, UsageError
from dinoreg.output import hdf5, layout, store
from dinoreg.output.layout import DatasetSpec
from dinoreg.output.reader import inspect_output, read
from dinoreg.output.spec import OutputSpec, check_output
from dinoreg.output.state import infer_format
from dinoreg.output.writer import Writer

REPO = Path(__file__).resolve().parent.parent
D = 8
SPECS = (
    DatasetSpec("cls", (D,), "float32"),
    DatasetSpec("registers", (2, D), "float16"),
    DatasetSpec("patches", (D,), "float16", ragged=True),
    DatasetSpec("grids", (2,), "int32"),
    DatasetSpec("layers/-1/cls", (D,), "float32"),
)
META = {
    "dinoreg_version": "0.1.0",
    "model": "tiny",
    "weights_sha256": "ab" * 32,
    "recipe": {"resize": 28, "crop": None, "mean": [0.5, 0.5, 0.5]},
    "tokens": ["cls", "registers", "patches"],
    "store_dtype": "float16",
    "image_size": 28,
    "grid": [2, 2],
    "keep_aspect": True,
}
ODD = ["tab\there.jpg", "new\nline.jpg", '"quoted".jpg', "back\\slash.jpg", "ünï 画像 ☃.png"]
ODD += ["bad-\udcff-bytes.jpg", "", " spaced .jpg"]
PATHS = [f"img/{i:03d}.jpg" for i in range(22)]
PATHS[1:1] = ODD


def row(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    h, w = 1 + i % 3, 1 + i % 2
    return {
        "cls": rng.standard_normal(D),
        "registers": rng.standard_normal((2, D)),
        "patches": rng.standard_normal((h * w, D)),
        "grids": np.array([h, w]),
        "layers/-1/cls": rng.standard_normal(D),
    }


def fails(i: int) -> bool:
    return i % 7 == 3


def batches(paths: list[str], size: int = 4):
    """Deterministic (paths, arrays, failures) batches; a row's content depends on its path."""
    for start in range(0, len(paths), size):
        chunk = paths[start : start + size]
        ok = [p for p in chunk if not fails(PATHS.index(p))]
        rows = [row(PATHS.index(p)) for p in ok]
        arrays = {
            s.name: [r[s.name] for r in rows]
            if s.ragged
            else np.stack([r[s.name] for r in rows]).reshape(len(rows), *s.row_shape)
            for s in SPECS
        }
        failures = [(p, f"cannot decode:\t{p!r}\n") for p in chunk if fails(PATHS.index(p))]
        yield ok, arrays, failures


def spec_for(out: Path, fmt: str) -> OutputSpec:
    return OutputSpec(out, fmt, SPECS)  # type: ignore[arg-type]


def out_path(tmp_path: Path, fmt: str, name: str = "out") -> Path:
    return tmp_path / (f"{name}.h5" if fmt == "h5" else name)


def write_run(out: Path, fmt: str, mode: str = "new", size: int = 4) -> None:
    with Writer.open(spec_for(out, fmt), META, mode) as w:
        todo = [p for p in PATHS if p not in w.committed_inputs]
        for batch in batches(todo, size):
            w.write_batch(*batch)
        w.close(complete=True)


def assert_same_output(a: Path, b: Path, fmt: str) -> None:
    """Equal data, paths, failures and provenance (bar creation time); same layout on disk."""
    if fmt == "npy":
        assert sorted(os.listdir(a)) == sorted(os.listdir(b))
        for name in os.listdir(a):
            if name == "meta.json":
                ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
                assert {**ma, "created": 0, "run_id": 0} == {**mb, "created": 0, "run_id": 0}
            else:
                assert (a / name).read_bytes() == (b / name).read_bytes(), name
        return
    with h5py.File(a) as fa, h5py.File(b) as fb:
        items_a, items_b = h5_items(fa), h5_items(fb)
        assert list(items_a) == list(items_b)
        for name, da in items_a.items():
            db = items_b[name]
            if isinstance(da, h5py.Dataset):
                assert (da.shape, da.dtype, da.chunks) == (db.shape, db.dtype, db.chunks), name
                assert np.array_equal(da[()], db[()]), name
        same = {"created": 0, "run_id": 0}
        assert {**fa.attrs, **same} == {**fb.attrs, **same}
    assert not staging_path(a, fmt).exists() and not staging_path(b, fmt).exists()


def h5_items(f: h5py.File) -> dict[str, object]:
    items: dict[str, object] = {}

    def visit(name: str, obj: object) -> None:
        items[name] = obj

    f.visititems(visit)
    return items


def staging_path(out: Path, fmt: str) -> Path:
    return out if fmt == "npy" else out.with_name(out.name + ".partial")


def expected_rows() -> list[tuple[str, dict[str, np.ndarray]]]:
    return [(p, row(i)) for i, p in enumerate(PATHS) if not fails(i)]


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_round_trip(tmp_path: Path, fmt: str) -> None:
    out = out_path(tmp_path, fmt)
    write_run(out, fmt)
    want = expected_rows()
    info = inspect_output(out)
    assert (info.format, info.complete, info.rows) == (fmt, True, len(want))
    assert info.failures == [
        (p, f"cannot decode:\t{p!r}\n") for i, p in enumerate(PATHS) if fails(i)
    ]
    total = sum(len(r["patches"]) for _, r in want)
    assert info.datasets == {
        "cls": ((len(want), D), "float32"),
        "registers": ((len(want), 2, D), "float16"),
        "patches": ((total, D), "float16"),
        "patches_offsets": ((len(want) + 1,), "int64"),
        "grids": ((len(want), 2), "int32"),
        "layers/-1/cls": ((len(want), D), "float32"),
    }
    meta = {k: v for k, v in info.meta.items() if k not in ("created", "run_id")}
    datasets = [s.to_json() for s in SPECS]
    assert meta == {**META, "complete": True, "datasets": datasets, "nonfinite_values": 0}
    got = list(read(out))
    assert [r.path for r in got] == [p for p, _ in want]
    for r, (_, values) in zip(got, want, strict=True):
        assert r.cls.dtype == np.float32 and np.array_equal(r.cls, values["cls"].astype("f4"))
        assert np.array_equal(r.registers, values["registers"].astype("f2"))
        h, w = values["grids"]
        assert np.array_equal(r.patches, values["patches"].astype("f2").reshape(h, w, D))


def test_npy_layout_loads_with_mmap(tmp_path: Path) -> None:
    out = tmp_path / "feats"
    write_run(out, "npy")
    want = expected_rows()
    # the lock file stays: unlinking it while held would let two writers both hold "the" lock
    assert sorted(os.listdir(out)) == [
        ".lock",
        "cls.npy",
        "failed.tsv",
        "grids.npy",
        "layers.-1.cls.npy",
        "meta.json",
        "patches.npy",
        "patches_offsets.npy",
        "paths.txt",
        "registers.npy",
    ]
    cls = np.load(out / "cls.npy", mmap_mode="r")
    assert isinstance(cls, np.memmap) and cls.shape == (len(want), D) and cls.dtype == "<f4"
    assert np.array_equal(cls, np.stack([r["cls"] for _, r in want]).astype("f4"))
    layer = np.load(out / "layers.-1.cls.npy", mmap_mode="r")
    assert np.array_equal(layer, np.stack([r["layers/-1/cls"] for _, r in want]).astype("f4"))
    offsets = np.load(out / "patches_offsets.npy")
    patches = np.load(out / "patches.npy", mmap_mode="r")
    assert offsets[0] == 0 and offsets[-1] == len(patches)
    assert np.array_equal(patches[offsets[5] : offsets[6]], want[5][1]["patches"].astype("f2"))
    lines = (out / "paths.txt").read_text(encoding="utf-8").split("\n")[:-1]
    decoded = [json.loads(line) if line.startswith('"') else line for line in lines]
    assert decoded == [p for p, _ in want]
    assert "ünï 画像 ☃.png" in lines  # readable as is when no escaping is needed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is True and meta["recipe"] == META["recipe"]


def test_h5_layout(tmp_path: Path) -> None:
    out = tmp_path / "feats.h5"
    write_run(out, "h5")
    want = expected_rows()
    with h5py.File(out) as f:
        assert f["cls"].shape == (len(want), D) and f["cls"].dtype == "<f4"
        assert f["registers"].dtype == "<f2" and f["layers/-1/cls"].shape == (len(want), D)
        assert f["cls"].chunks == (len(want), D)  # small rows: one chunk holds them all
        assert f["cls"].compression is None
        assert f["paths"].dtype == h5py.string_dtype("utf-8")
        paths = list(f["paths"].asstr(errors="surrogateescape")[:])
        assert paths == [p for p, _ in want]
        assert len(f["failed/paths"]) == len(f["failed/reasons"]) == len(PATHS) - len(want)
        assert f.attrs["complete"] is True or f.attrs["complete"] == np.True_
        assert json.loads(f.attrs["recipe"]) == META["recipe"]
        assert json.loads(f.attrs["json_attrs"]) == ["recipe", "tokens", "grid", "datasets"]
        assert f.attrs["model"] == "tiny" and f.attrs["image_size"] == 28


def test_h5_chunks_and_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks force the streaming copy and the reader through many block boundaries.
    monkeypatch.setattr(hdf5, "BLOCK_BYTES", 3 * 1024)
    monkeypatch.setattr("dinoreg.output.reader._BLOCK_BYTES", 700)
    specs = (DatasetSpec("cls", (64,), "float32"), DatasetSpec("patches", (512, 640), "float32"))
    out = tmp_path / "big.h5"
    rng = np.random.default_rng(0)
    cls, patches = rng.standard_normal((40, 64)), rng.standard_normal((3, 512, 640))
    with Writer.open(OutputSpec(out, "h5", specs), {}, "new") as w:
        w.write_batch([f"{i}" for i in range(3)], {"cls": cls[:3], "patches": patches})
        w.write_batch(
            [f"{i}" for i in range(3, 40)], {"cls": cls[3:], "patches": np.zeros((37, 512, 640))}
        )
        w.close(complete=True)
    with h5py.File(out) as f:
        assert f["cls"].chunks == (40, 64)
        assert f["patches"].chunks == (1, 512, 640)  # a row over 1 MiB is a chunk of its own
        assert np.array_equal(f["cls"][()], cls.astype("f4"))
        assert np.array_equal(f["patches"][:3], patches.astype("f4"))
    rows = list(read(out))
    assert [r.path for r in rows] == [str(i) for i in range(40)]
    assert np.array_equal(np.stack([r.cls for r in rows]), cls.astype("f4"))
    assert rows[0].registers is None


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_failures_only_and_empty_output(tmp_path: Path, fmt: str) -> None:
    out = out_path(tmp_path, fmt)
    with Writer.open(spec_for(out, fmt), META, "new") as w:
        w.write_batch([], {}, [("a.jpg", "broken")])
        w.write_batch([], {})  # nothing at all: a no-op
        assert (w.rows, w.failures, set(w.committed_inputs)) == (0, 1, {"a.jpg"})
        w.close(complete=True)
    info = inspect_output(out)
    assert info.rows == 0 and info.failures == [("a.jpg", "broken")] and info.complete
    assert info.datasets["cls"] == ((0, D), "float32")
    assert info.datasets["patches_offsets"] == ((1,), "int64")
    assert list(read(out)) == []
    if fmt == "npy":
        assert np.load(out / "registers.npy", mmap_mode="r").shape == (0, 2, D)


def test_bad_batches_are_programming_errors(tmp_path: Path) -> None:
    with Writer.open(spec_for(tmp_path / "o.h5", "h5"), META, "new") as w:
        paths, arrays, _ = next(batches(PATHS[:2]))
        with pytest.raises(ValueError, match="cls"):
            w.write_batch(paths, {**arrays, "cls": np.zeros((2, D + 1))})
        with pytest.raises(ValueError, match="patches"):
            w.write_batch(paths, {**arrays, "patches": [np.zeros((2, 3))] * 2})
        with pytest.raises(ValueError, match="unknown"):
            w.write_batch(paths, {**arrays, "extra": np.zeros((2, 1))})
        w.write_batch(paths, arrays)
        with pytest.raises(ValueError, match="twice"):
            w.write_batch(paths, arrays)
        assert w.rows == 2
    with pytest.raises(ValueError, match="reserved"):
        DatasetSpec("paths", (1,), "float32")
    with pytest.raises(ValueError):
        DatasetSpec("a.b", (1,), "float32")
    with pytest.raises(ValueError, match="collide"):
        OutputSpec(Path("x.h5"), "h5", (DatasetSpec("p", (1,), "float32", True),) * 2)
    with pytest.raises(ValueError, match="inside"):
        OutputSpec(Path("x.h5"), "h5", (SPECS[0], DatasetSpec("cls/x", (1,), "float32")))
    with pytest.raises(ValueError, match="set by the writer"):
        Writer.open(spec_for(tmp_path / "p.h5", "h5"), {"complete": True}, "new")


# --- formats and modes --------------------------------------------------------------------------


def test_infer_format(tmp_path: Path) -> None:
    assert infer_format("feats.h5") == "h5" and infer_format("x/F.HDF5") == "h5"
    assert infer_format("feats/") == "npy" and infer_format(tmp_path) == "npy"
    assert infer_format("feats", "npy") == "npy" and infer_format("feats.h5", "npy") == "npy"
    # usage errors (exit 2): the arguments do not name an output dinoreg can write
    with pytest.raises(UsageError, match=r"format=.npy."):
        infer_format("feats.bin")
    with pytest.raises(UsageError, match="directory"):
        infer_format(tmp_path, "h5")


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_modes(tmp_path: Path, fmt: str) -> None:
    out = out_path(tmp_path, fmt)
    check_output(out, "new", fmt)
    check_output(out, "resume", fmt)  # resume of a missing output creates it
    assert not out.exists()  # the checks write nothing
    write_run(out, fmt)
    with pytest.raises(OutputError, match="already exists; pass overwrite=True") as err:
        check_output(out, "new", fmt)
    assert err.value.params == ("overwrite", "resume")
    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):
        Writer.open(spec_for(out, fmt), META, "new")
    assert not (fmt == "h5" and (staging_path(out, fmt) / ".lock").exists())  # nothing left
    # overwrite keeps the old output until the new one is complete
    with Writer.open(spec_for(out, fmt), META, "overwrite") as w:
        w.write_batch(*next(batches(PATHS[:4])))
    info = inspect_output(out)
    assert info.complete and info.rows == len(expected_rows())  # still the old one
    assert info.staged_at == out.with_name(out.name + ".partial")
    with pytest.raises(OutputError, match="already exists"):
        Writer.open(spec_for(out, fmt), META, "new")
    write_run(out, fmt, "resume")
    write_run(ref := out_path(tmp_path, fmt, "ref"), fmt)
    assert_same_output(out, ref, fmt)


def test_npy_directory_rules(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    write_run(empty, "npy")  # an empty directory is a fine place for a new output
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    for mode in ("new", "overwrite", "resume"):
        with pytest.raises(OutputError, match="not a dinoreg output"):
            Writer.open(spec_for(foreign, "npy"), META, mode)  # type: ignore[arg-type]
    write_run(empty, "npy", "overwrite")
    (empty / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
        write_run(empty, "npy", "overwrite")  # never deletes or hides what it did not write
    assert (empty / "notes.txt").read_text() == "mine" and inspect_output(empty).complete
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        check_output(tmp_path / "file", "new", "npy")


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_resume_refuses_other_options(tmp_path: Path, fmt: str) -> None:
    out = out_path(tmp_path, fmt)
    with Writer.open(spec_for(out, fmt), META, "new") as w:
        w.write_batch(*next(batches(PATHS[:4])))
    other = {**META, "weights_sha256": "cd" * 32, "recipe": {**META["recipe"], "resize": 32}}
    del other["keep_aspect"]
    with pytest.raises(OutputError) as err:
        Writer.open(spec_for(out, fmt), other, "resume")
    msg = str(err.value)
    assert f'"{"ab" * 32}" -> "cdcd' in msg and "recipe.resize 28 -> 32" in msg
    assert "keep_aspect true -> (unset)" in msg and "overwrite=True" in msg
    assert "dinoreg_version" not in msg and "\n" not in msg
    assert set(err.value.params) == {"model", "image_size", "keep_aspect", "overwrite"}
    specs = (*SPECS[:-1], DatasetSpec("layers/-1/cls", (D,), "float16"))
    with pytest.raises(OutputError, match="datasets"):
        Writer.open(OutputSpec(out, fmt, specs), META, "resume")  # type: ignore[arg-type]
    # other provenance may change; creation time is kept
    created = inspect_output(out).meta["created"]
    with Writer.open(spec_for(out, fmt), {**META, "dinoreg_version": "0.2"}, "resume") as w:
        assert w.rows == 3
    assert inspect_output(out).meta["created"] == created
    assert inspect_output(out).meta["dinoreg_version"] == "0.2"


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_second_writer_is_refused(tmp_path: Path, fmt: str) -> None:
    out = out_path(tmp_path, fmt)
    spec = spec_for(out, fmt)
    with Writer.open(spec, META, "new") as w:
        w.write_batch(*next(batches(PATHS[:4])))
        for mode in ("resume", "overwrite"):
            with pytest.raises(
                OutputError, match=f"another dinoreg process \\(pid {os.getpid()}\\)"
            ):
                check_output(spec, mode)  # type: ignore[arg-type]
            with pytest.raises(OutputError, match="being written by another"):
                Writer.open(spec, META, mode)  # type: ignore[arg-type]
        assert w.rows == 3 and inspect_output(out).rows == 3  # the loser touched nothing
    write_run(out, fmt, "resume")


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_ctrl_c_leaves_a_resumable_output(tmp_path: Path, fmt: str) -> None:
    out = out_path(tmp_path, fmt)
    with pytest.raises(KeyboardInterrupt), Writer.open(spec_for(out, fmt), META, "new") as w:
        for i, batch in enumerate(batches(PATHS)):
            w.write_batch(*batch)
            if i == 2:
                raise KeyboardInterrupt
    info = inspect_output(out)
    assert not info.complete and info.rows == 10 and len(info.failures) == 2
    with Writer.open(spec_for(out, fmt), META, "resume") as w:
        assert set(w.committed_inputs) == set(PATHS[:12])
    write_run(out, fmt, "resume", size=5)  # other batch sizes give the same file
    write_run(ref := out_path(tmp_path, fmt, "ref"), fmt)
    assert_same_output(out, ref, fmt)


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_garbage_past_the_journal_is_cut(tmp_path: Path, fmt: str) -> None:
    out = out_path(tmp_path, fmt)
    with Writer.open(spec_for(out, fmt), META, "new") as w:
        for batch in list(batches(PATHS))[:2]:
            w.write_batch(*batch)
    stage = staging_path(out, fmt)
    for name in os.listdir(stage):
        if name.endswith((".npy", ".txt", ".tsv")):
            with open(stage / name, "ab") as fh:
                fh.write(b"\x00garbage of a batch in flight\n")
    assert inspect_output(out).rows == 7  # readers stop at the journal
    assert [r.path for r in read(out, allow_incomplete=True)] == [p for p, _ in expected_rows()][:7]
    write_run(out, fmt, "resume")
    write_run(ref := out_path(tmp_path, fmt, "ref"), fmt)
    assert_same_output(out, ref, fmt)


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_a_failed_write_loses_only_its_batch(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = out_path(tmp_path, fmt)
    real = store.pwrite_all
    calls = Counter[str]()

    def flaky(fd: int, data: memoryview, offset: int) -> None:
        calls["n"] += 1
        if calls["n"] == 24:  # part-way through the third batch
            raise OSError(28, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(store, "pwrite_all", flaky)
    all_batches = list(batches(PATHS))
    with Writer.open(spec_for(out, fmt), META, "new") as w:
        w.write_batch(*all_batches[0])
        w.write_batch(*all_batches[1])
        with pytest.raises(OutputError, match=r"No space left on device.*resume=True"):
            w.write_batch(*all_batches[2])
        assert w.rows == 7 and inspect_output(out).rows == 7
        for batch in all_batches[2:]:  # the disk has room again: carry on in the same process
            w.write_batch(*batch)
        w.close(complete=True)
    write_run(ref := out_path(tmp_path, fmt, "ref"), fmt)
    assert_same_output(out, ref, fmt)


def test_staging_headers_are_valid_npy(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with Writer.open(spec_for(out, "npy"), META, "new") as w:
        w.write_batch(*next(batches(PATHS[:4])))
        arr = np.load(out / "registers.npy", mmap_mode="r")
        assert arr.shape == (0, 2, D)  # placeholder until finished; the journal has the count
        with open(out / "registers.npy", "rb") as fh:
            assert len(fh.read(512).split(b"\n")[0]) + 1 == 256
        assert json.loads((out / "journal.json").read_text())["rows"] == 3
    assert layout.header_length("<f4", (37, 37, 1536)) % 64 == 0


def test_damaged_journal_is_reported(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with Writer.open(spec_for(out, "npy"), META, "new") as w:
        w.write_batch(*next(batches(PATHS[:4])))
    (out / "journal.json").write_text("{")
    with pytest.raises(OutputError, match="damaged"):
        Writer.open(spec_for(out, "npy"), META, "resume")
    with pytest.raises(OutputError, match="damaged"):
        inspect_output(out)


def test_leftover_staging_beside_a_complete_h5(tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    write_run(out, "h5")
    stage = staging_path(out, "h5")
    stage.mkdir()  # as if killed half-way through deleting it: no journal left
    (stage / "cls.npy").write_bytes(b"half")
    (stage / "meta.json").write_text("{}")
    assert inspect_output(out).complete
    with Writer.open(spec_for(out, "h5"), META, "resume") as w:
        assert w.mode_used == "already-complete" and w.pending(PATHS) == []
    assert not stage.exists()


# --- real kills ---------------------------------------------------------------------------------


def child_main(args: list[str]) -> None:
    """Run in a subprocess: write PATHS, and SIGKILL ourselves at the nth `point`."""
    out, fmt, point, nth = Path(args[0]), args[1], args[2], int(args[3])
    pause = float(args[4]) if len(args) > 4 else 0.0
    seen: Counter[str] = Counter()

    def hook(name: str) -> None:
        seen[name] += 1
        if name == point and seen[name] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # what the CLI's handler does

    store.crash_hook = hook
    signal.signal(signal.SIGTERM, on_sigterm)
    w = Writer.open(spec_for(out, fmt), META, "new")
    try:
        for batch in batches(PATHS):
            w.write_batch(*batch)
            if point == "hold":
                print("ready", flush=True)
                time.sleep(60)
            time.sleep(pause)
    except KeyboardInterrupt:
        w.close(complete=False)
        sys.exit(130)
    w.close(complete=True)


def start_child(out: Path, fmt: str, point: str, nth: int = 1, pause: float = 0.0):
    code = "import sys, test_writers as t; t.child_main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    args = [sys.executable, "-c", code, str(out), fmt, point, str(nth), str(pause)]
    stdout = subprocess.PIPE if point == "hold" else subprocess.DEVNULL
    return subprocess.Popen(args, env=env, stdout=stdout, text=True)


def journal_rows(out: Path, fmt: str) -> int:
    try:
        return json.loads((staging_path(out, fmt) / "journal.json").read_text())["rows"]
    except (OSError, ValueError):
        return 0


KILLS = [
    ("npy", "append", 25, 7),  # mid-append of the third batch: two batches committed
    ("h5", "append", 3, 0),  # mid-append of the first batch
    ("npy", "commit", 3, 7),  # data fsynced, journal not yet replaced
    ("h5", "commit", 5, 14),
    ("npy", "finalise", 1, 26),  # headers rewritten, meta.json not yet
    ("npy", "finalise-meta", 1, 26),  # meta.json says complete, journal still there
    ("h5", "h5", 3, 26),  # mid-conversion: a partial .h5.tmp
    ("h5", "h5-replaced", 1, 26),  # the .h5 is in place, the staging dir not yet removed
]


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "point", "nth", "rows"), KILLS)
def test_kill_9_then_resume(tmp_path: Path, fmt: str, point: str, nth: int, rows: int) -> None:
    out = out_path(tmp_path, fmt)
    child = start_child(out, fmt, point, nth)
    assert child.wait(timeout=60) == -signal.SIGKILL
    stage = staging_path(out, fmt)
    if point in ("append", "commit"):
        journal = json.loads((stage / "journal.json").read_text())
        grown = [f for f, n in journal["lengths"].items() if (stage / f).stat().st_size > n]
        assert grown  # the batch in flight left bytes past the journal
    if point == "h5":
        assert out.with_name(out.name + ".tmp").exists()
    if point == "h5-replaced":
        assert out.exists() and stage.exists()
        with Writer.open(spec_for(out, fmt), META, "resume") as w:
            assert w.mode_used == "already-complete"
        assert not stage.exists()
    else:
        info = inspect_output(out)
        assert not info.complete and info.rows == rows
        write_run(out, fmt, "resume")
    assert not out.with_name(out.name + ".tmp").exists()
    write_run(ref := out_path(tmp_path, fmt, "ref"), fmt)
    assert_same_output(out, ref, fmt)


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "sig"), [("npy", signal.SIGKILL), ("h5", signal.SIGTERM)])
def test_kill_at_a_random_moment(tmp_path: Path, fmt: str, sig: int) -> None:
    # SIGKILL dies at once; SIGTERM goes through the handler the child installs (as the CLI
    # does), which exits 130 after closing the writer. Retry slower until the signal lands
    # mid-run; a child that finished first proves nothing.
    want = -sig if sig == signal.SIGKILL else 130
    for attempt, pause in enumerate((0.03, 0.15, 0.6)):
        out = out_path(tmp_path, fmt, f"out{attempt}")
        child = start_child(out, fmt, "none", 0, pause=pause)
        deadline = time.monotonic() + 30
        while journal_rows(out, fmt) < 7 and time.monotonic() < deadline:
            time.sleep(0.002)
        child.send_signal(sig)
        if child.wait(timeout=30) == want:
            break
    else:
        pytest.fail(f"the signal never landed mid-run (last exit code {child.returncode})")
    assert inspect_output(out).rows >= 7 and not inspect_output(out).complete
    write_run(out, fmt, "resume")
    write_run(ref := out_path(tmp_path, fmt, "ref"), fmt)
    assert_same_output(out, ref, fmt)


@pytest.mark.slow
def test_lock_held_by_another_process_dies_with_it(tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    child = start_child(out, "h5", "hold")
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with pytest.raises(OutputError, match=f"another dinoreg process \\(pid {child.pid}\\)"):
            Writer.open(spec_for(out, "h5"), META, "resume")
        with pytest.raises(OutputError, match="being written"):
            check_output(out, "overwrite")
    finally:
        child.kill()
        child.communicate()
    write_run(out, "h5", "resume")  # kill -9 released the lock
    write_run(ref := tmp_path / "ref.h5", "h5")
    assert_same_output(out, ref, "h5")
