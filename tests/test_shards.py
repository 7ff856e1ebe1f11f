"""Shards and merge: N shard runs joined equal one run; merge refuses what does not belong."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
from conftest import EXAMPLES

import dinoreg
from dinoreg.embedding.shards import Shard, shard_path
from dinoreg.errors import OutputError, UsageError
from dinoreg.output.shards import merge


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The example photos, a broken file, and a small image of another shape."""
    folder = tmp_path_factory.mktemp("photos")
    for path in EXAMPLES.glob("*.jpg"):
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


def rows(path, layer=None):
    with dinoreg.read(path, layer=layer) as got:
        return [(r.path, r.cls, r.registers, r.patches) for r in got]


def same_rows(a, b):
    assert [r[0] for r in a] == [r[0] for r in b]
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x[1:], y[1:], strict=True):
            assert (u is None and v is None) or np.abs(u - v).max() <= 1e-5


def test_shards_are_balanced_contiguous_and_named():
    parts = [Shard(i, 3).bounds(10) for i in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 10)]
    assert shard_path("out/feats.h5", Shard(2, 8)).name == "feats-00002-of-00008.h5"
    assert shard_path("out/feats/", Shard(0, 3)).name == "feats-00000-of-00003"
    assert Shard.parse("1/4") == Shard(1, 4)
    for bad in ("4/4", "-1/3", "a/b", "3"):
        with pytest.raises(UsageError, match="shard"):
            Shard.parse(bad)


@pytest.mark.parametrize("fmt", ["h5", "npy"])
@pytest.mark.parametrize("keep_aspect", [False, True])
def test_three_shards_merged_equal_one_run(tmp_path, tiny_dir, photos, fmt, keep_aspect):
    def name(stem: str) -> str:  # a trailing slash names an npy directory
        return f"{tmp_path}/{stem}.h5" if fmt == "h5" else f"{tmp_path}/{stem}/"

    out = name("feats")
    common = {"model": str(tiny_dir.path), "workers": 0, "batch_size": 2}
    common["keep_aspect"] = keep_aspect
    if keep_aspect:
        common["image_size"] = 56
    one = name("one")
    single = dinoreg.embed([str(photos)], one, **common)
    shards = []
    for i in range(3):
        summary = dinoreg.embed([str(photos)], out, shard=f"{i}/3", **common)
        shards.append(summary.out)
    assert [s.name for s in shards] == [shard_path(out, Shard(i, 3)).name for i in range(3)]
    info = dinoreg.inspect_output(shards[1])
    assert info.meta["shard"] == [1, 3] and info.complete
    merged = name("all")
    done = merge(shards, merged)
    assert done.rows == single.rows == 7 and done.failures == 1
    same_rows(rows(merged), rows(one))
    about = dinoreg.inspect_output(merged)
    assert about.failures == dinoreg.inspect_output(one).failures
    assert "shard" not in about.meta and "index" not in about.datasets


def test_merge_refuses_missing_incomplete_and_mismatched_shards(tmp_path, tiny_dir, photos):
    common = {"model": str(tiny_dir.path), "workers": 0}
    out = tmp_path / "f.h5"
    shards = [dinoreg.embed([str(photos)], out, shard=f"{i}/3", **common).out for i in range(3)]
    target = tmp_path / "all.h5"
    with pytest.raises(OutputError, match=r"missing 1/3"):
        merge([shards[0], shards[2]], target)
    with pytest.raises(OutputError, match="given twice"):
        merge([shards[0], shards[0], shards[1], shards[2]], target)
    other = dinoreg.embed(
        [str(photos)], tmp_path / "g.h5", shard="1/3", store_dtype="float16", **common
    ).out
    with pytest.raises(OutputError, match="store_dtype"):
        merge([shards[0], other, shards[2]], target)
    plain = dinoreg.embed([str(photos)], tmp_path / "plain.h5", **common).out
    with pytest.raises(OutputError, match="not a shard"):
        merge([plain], target)
    # an interrupted shard: its staging directory is there, the file is not
    shards[2].rename(tmp_path / "moved.h5")
    partial = shards[2].with_name(shards[2].name + ".partial")
    partial.mkdir()
    with pytest.raises(OutputError):
        merge(shards, target)
    assert not target.exists()  # nothing written by any refusal


def test_the_cli_shards_and_merges(tmp_path, tiny_dir, photos, capsys, monkeypatch):
    import io

    from dinoreg.cli.app import main

    def cli(*args):
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        with pytest.raises(SystemExit) as done:
            main([str(a) for a in args])
        return done.value.code, *capsys.readouterr()

    # sorted, broken.jpg is the second of 8 inputs: shard 0 skips it (exit 3), shard 1 is clean
    for i, want in [(0, 3), (1, 0)]:
        args = ["-o", tmp_path / "f.h5", "-m", tiny_dir.path, "-j", "0", "--shard", f"{i}/2"]
        code, _, err = cli("embed", photos, *args)
        assert code == want, err
    code, out, err = cli("info", tmp_path / "f-00001-of-00002.h5")
    assert code == 0 and "shard" in out and "1 of 2" in out
    code, _, err = cli(
        "merge",
        tmp_path / "f-00000-of-00002.h5",
        tmp_path / "f-00001-of-00002.h5",
        "-o",
        tmp_path / "all.h5",
    )
    assert code == 0 and "merged 2 shards: 7 rows, 1 skipped" in err
    code, _, err = cli("merge", tmp_path / "f-00000-of-00002.h5", "-o", tmp_path / "x.h5")
    assert code == 1 and "missing 1/2" in err and not (tmp_path / "x.h5").exists()
    code, _, err = cli("embed", photos, "-o", tmp_path / "g.h5", "--shard", "2/2")
    assert code == 2 and "--shard 2/2 does not exist" in err
