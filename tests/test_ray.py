"""The Ray Data adapter on a local 2-CPU Ray: rows equal a local `dinoreg.embed`, bad images
become error rows, a killed actor loses nothing, shards resume, and nothing else imports Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import EXAMPLES

TOL = 1e-5
TOKENS = ("cls", "registers", "patches")

# Ray starts a local cluster (~20 s): its own CI step, `python -m pytest -q -m ray`
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'dinoreg[ray]')")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The example photos plus one corrupt JPEG."""
    root = tmp_path_factory.mktemp("ray-images")
    for src in sorted(EXAMPLES.glob("*.jpg")):
        shutil.copy(src, root / src.name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    return root


@pytest.fixture(scope="module")
def local(images, tiny_dir, tmp_path_factory) -> dict:
    """What a local `dinoreg.embed` writes for the same inputs, fp32."""
    import dinoreg

    out = tmp_path_factory.mktemp("ray-local") / "local.h5"
    dinoreg.embed(str(images), out, str(tiny_dir.path), device="cpu", dtype="float32", batch_size=4)
    return read_h5([out])


def read_h5(files: list[Path]) -> dict:
    """Rows and failures of one output or of a run's shards (ordered by global index)."""
    rows: dict = {"paths": [], "index": [], **{t: [] for t in TOKENS}, "failed": {}}
    for file in files:
        with h5py.File(file, "r") as f:
            assert f.attrs["complete"]
            rows["paths"] += [p.decode() for p in f["paths"][:]]
            if "index" in f:
                rows["index"] += list(f["index"][:])
            for t in TOKENS:
                rows[t].append(f[t][:])
            reasons = [r.decode() for r in f["failed/reasons"][:]]
            rows["failed"].update(
                zip([p.decode() for p in f["failed/paths"][:]], reasons, strict=True)
            )
    for t in TOKENS:
        rows[t] = np.concatenate(rows[t])
    return rows


def assert_same(got: dict, want: dict) -> float:
    assert got["paths"] == want["paths"]
    assert got["failed"] == want["failed"]
    diff = max(float(np.abs(got[t] - want[t]).max()) for t in TOKENS)
    assert diff <= TOL, diff
    return diff


def run_kwargs(tiny_dir) -> dict:
    return dict(model=str(tiny_dir.path), device="cpu", dtype="float32", cpus_per_actor=1.0)


def test_shards_equal_local_embed(ray, images, local, tiny_dir, tmp_path):
    from dinoreg.ray import embed_with_ray

    out = tmp_path / "out"
    summary = embed_with_ray(
        str(images), out, shards=3, num_actors=2, batch_size=2, **run_kwargs(tiny_dir)
    )
    assert [p.name for p in summary.shards] == [f"feats-0000{i}-of-00003.h5" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == [".lock"] + [p.name for p in summary.shards]
    got = read_h5(summary.shards)
    assert_same(got, local)
    assert got["index"] == [i for i in range(8) if i != 1]  # broken.jpg sorts second
    assert list(got["failed"]) == [str(images / "broken.jpg")]
    assert summary.rows == 7 and summary.num_actors == 2

    # `dinoreg merge` joins the Ray shards into the output a local run writes
    from dinoreg.output.shards import merge

    merged = merge(summary.shards, tmp_path / "merged.h5")
    assert merged.rows == 7 and merged.failures == 1
    from dinoreg import read

    with read(tmp_path / "merged.h5") as rows:
        rows = list(rows)
    assert [r.path for r in rows] == local["paths"]
    diffs = [float(np.abs(r.cls - c).max()) for r, c in zip(rows, local["cls"], strict=True)]
    assert max(diffs) <= TOL

    with h5py.File(summary.shards[0], "r") as f:
        meta = {k: f.attrs[k] for k in ("shard", "num_shards", "start", "stop", "complete")}
        assert list(f["failed/index"][:]) == [1]
        assert len(f.attrs["weights_sha256"]) == 64
    assert meta == {"shard": 0, "num_shards": 3, "start": 0, "stop": 2, "complete": True}

    # a driver killed after shard 1 was written: resume redoes only what is missing
    from dinoreg.errors import OutputError

    summary.shards[2].unlink()
    (out / (summary.shards[0].name + ".tmp")).write_bytes(b"half")
    with pytest.raises(OutputError, match="resume"):
        embed_with_ray(str(images), out, shards=3, **run_kwargs(tiny_dir))
    again = embed_with_ray(
        str(images), out, shards=3, resume=True, num_actors=1, **run_kwargs(tiny_dir)
    )
    assert again.skipped_shards == 2 and again.rows == 3
    assert not list(out.glob("*.tmp"))
    assert_same(read_h5(again.shards), local)
    with pytest.raises(OutputError, match="other settings"):
        embed_with_ray(
            str(images), out, shards=3, resume=True, **{**run_kwargs(tiny_dir), "image_size": 112}
        )


def test_embedder_on_read_binary_files(ray, images, local, tiny_dir):
    from dinoreg.ray import Embedder

    files = sorted(str(p) for p in images.iterdir())
    ds = ray.data.read_binary_files(files, include_paths=True)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model": str(tiny_dir.path), "device": "cpu", "dtype": "float32"},
        batch_size=3,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),  # the other CPU reads the files
        num_cpus=1,
    )
    rows = {r["path"]: r for r in ds.take_all()}
    assert sorted(rows) == files
    bad = rows.pop(str(images / "broken.jpg"))
    assert bad["error"] == local["failed"][str(images / "broken.jpg")]
    assert all(np.isnan(bad[t]).all() for t in TOKENS)
    assert all(r["error"] == "" and "bytes" not in r for r in rows.values())
    got = {
        "paths": sorted(rows),
        "failed": local["failed"],
        **{t: np.stack([rows[p][t] for p in sorted(rows)]) for t in TOKENS},
    }
    assert_same(got, local)


def _map_workers() -> list[int]:
    """Live Ray actor processes running our Embedder (their process title names it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read()
        except OSError:
            continue
        if title.startswith(b"ray::") and b"Embedder" in title:
            pids.append(int(entry))
    return pids


class KillOne:
    """A progress callback that SIGKILLs one actor mid-run, then watches for its replacement."""

    def __init__(self) -> None:
        self.killed: int | None = None
        self.before: set[int] = set()  # actor processes alive at the kill
        self.after: set[int] = set()  # actor processes started since (the replacement)

    def __call__(self, p) -> None:
        if self.killed is not None:
            self.after.update(set(_map_workers()) - self.before)
        # The driver has some rows but far from all: the pool is mid-run right now.
        elif 4 <= p.done < p.total - 8 and (pids := _map_workers()):
            os.kill(pids[0], signal.SIGKILL)
            self.killed = pids[0]
            self.before = set(pids)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds actor processes through /proc")
def test_killed_actor_loses_no_rows(ray, images, local, tiny_dir, tmp_path):
    from dinoreg.ray import embed_with_ray

    # 4 copies of each input, so there is a run to interrupt
    many = tmp_path / "many"
    many.mkdir()
    for copy in range(4):
        for src in sorted(images.iterdir()):
            shutil.copy(src, many / f"{copy}-{src.name}")
    total = len(list(many.iterdir()))
    for attempt in range(4):
        kill_one = KillOne()
        summary = embed_with_ray(
            str(many),
            tmp_path / "out",
            shards=2,
            num_actors=2,
            batch_size=1,
            overwrite=attempt > 0,
            progress=kill_one,
            **run_kwargs(tiny_dir),
        )
        if kill_one.killed and kill_one.after:
            break
    assert kill_one.killed, "no kill landed mid-run in 4 attempts"
    assert kill_one.after, "the killed actor was not replaced"
    got = read_h5(summary.shards)
    assert got["index"] == sorted(got["index"]) and len(got["paths"]) + len(got["failed"]) == total
    assert len(got["failed"]) == 4
    # every copy's rows equal the local rows of its original
    names = [Path(p).name.split("-", 1)[1] for p in got["paths"]]
    reference = {Path(p).name: i for i, p in enumerate(local["paths"])}
    order = [reference[n] for n in names]
    for t in TOKENS:
        assert float(np.abs(got[t] - local[t][order]).max()) <= TOL


def test_cli_and_package_do_not_import_ray():
    code = (
        "import sys, dinoreg, dinoreg.cli, dinoreg.ray, dinoreg.distributed.shards; "
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_cli_embed_on_ray_then_merge(ray, images, local, tiny_dir, tmp_path, capsys, monkeypatch):
    import io
    import sys

    from dinoreg import read
    from dinoreg.cli.app import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    args = ["embed", str(images), "-o", str(tmp_path / "shards"), "-m", str(tiny_dir.path)]
    args += ["--ray", "local", "--shards", "2", "--merge", str(tmp_path / "all.h5"), "-b", "2"]
    args += ["--device", "cpu", "--dtype", "fp32"]
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert done.value.code == 3, err  # broken.jpg skipped, named
    assert "skipped" in err and "broken.jpg" in err and "merged into" in err
    with read(tmp_path / "all.h5") as rows:
        rows = list(rows)
    assert [r.path for r in rows] == local["paths"]
    diffs = [float(np.abs(r.cls - c).max()) for r, c in zip(rows, local["cls"], strict=True)]
    assert max(diffs) <= TOL
