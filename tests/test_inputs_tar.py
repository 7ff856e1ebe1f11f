"""Tar shards as inputs (issue 12 §3): brace ranges, members named `x.tar/key.jpg`, read in place
through the file decoder, identity by the tar's real path, damaged and unreadable tars reported."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import EXAMPLES

import dinoreg
from dinoreg.cli import main
from dinoreg.embedding.results import Interrupted
from dinoreg.errors import UsageError
from dinoreg.inputs import tars
from dinoreg.inputs.braces import expand_braces
from dinoreg.inputs.buckets import read_sizes
from dinoreg.inputs.decode import ImageDecodeError, load_image
from dinoreg.inputs.discover import discover, find_inputs
from dinoreg.inputs.recipe import Recipe
from dinoreg.output.identity import identity

KW = {"batch_size": 2, "workers": 0}
PHOTOS = sorted(EXAMPLES.glob("*.jpg"))  # 7 photos: 4 in shard 0, 3 in shard 1


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def shard_members(photos: list[Path]) -> list[tuple[str, bytes]]:
    """webdataset layout: key.jpg beside key.json and key.txt, plus one unrelated member."""
    members: list[tuple[str, bytes]] = [("README.md", b"not an image")]
    for photo in photos:
        key = photo.stem
        members.append((f"{key}.jpg", photo.read_bytes()))
        members.append((f"{key}.json", json.dumps({"key": key}).encode()))
        members.append((f"{key}.txt", f"a caption for {key}".encode()))
    return members


@pytest.fixture
def shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """shards/00000.tar and 00001.tar holding the examples; cwd is tmp_path."""
    monkeypatch.chdir(tmp_path)
    write_tar(tmp_path / "shards" / "00000.tar", shard_members(PHOTOS[:4]))
    write_tar(tmp_path / "shards" / "00001.tar", shard_members(PHOTOS[4:]))
    return tmp_path / "shards"


def member_paths(tar: str, photos: list[Path]) -> list[str]:
    return [f"{tar}/{p.stem}.jpg" for p in photos]


def test_brace_expansion_keeps_zero_padding_and_nests() -> None:
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{a,b{1..2}}.tar") == ["a.tar", "b1.tar", "b2.tar"]
    assert expand_braces("{3..1}{x,y}") == ["3x", "3y", "2x", "2y", "1x", "1y"]
    assert expand_braces("{0..6..3}") == ["0", "3", "6"]
    assert expand_braces("{-05..05..5}") == ["-05", "000", "005"]
    assert expand_braces("keep{a}{b..}") == ["keep{a}{b..}"]  # neither a list nor a range
    with pytest.raises(UsageError) as err:
        expand_braces("{0..99999}{0..99}")
    assert err.value.params == ("inputs",)


def test_brace_arguments_expand_but_stdin_lines_stay_literal(shards: Path) -> None:
    found = find_inputs(["shards/{00000..00002}.tar"])
    assert found.paths == sorted(
        member_paths("shards/00000.tar", PHOTOS[:4]) + member_paths("shards/00001.tar", PHOTOS[4:])
    )
    assert found.missing == [("shards/00002.tar", "no such file")]
    stdin = io.StringIO("shards/{00000..00001}.tar\nshards/00001.tar\n")
    found = find_inputs(["-"], stdin=stdin)
    assert found.paths == member_paths("shards/00001.tar", PHOTOS[4:])  # a .tar line is read
    assert found.missing == [("shards/{00000..00001}.tar", "no such file")]


def test_tar_yields_its_image_members_only_sorted(tmp_path: Path) -> None:
    tar = write_tar(
        tmp_path / "mixed.tar",
        [
            ("z.JPG", PHOTOS[0].read_bytes()),
            ("z.json", b"{}"),
            ("sub/a.png", b"png bytes: decoding judges them"),
            ("notes.txt", b"text"),
            ("archive.tar", b"a tar inside a tar is a member like any other, not an image"),
        ],
    )
    assert discover([str(tar)]) == [f"{tar}/sub/a.png", f"{tar}/z.JPG"]


def test_walking_a_directory_does_not_open_tars(shards: Path) -> None:
    shutil.copy(PHOTOS[0], shards / "loose.jpg")
    assert discover(["shards"]) == ["shards/loose.jpg"]
    # A glob is what the shell would have expanded: the tars it matches are read.
    assert len(discover(["shards/*.tar"])) == len(PHOTOS)


def test_a_respelled_tar_is_one_input_and_member_names_are_not_resolved(shards: Path) -> None:
    got = discover(["shards/00001.tar", "./shards/00001.tar", "shards/00001.tar/flower.jpg"])
    assert got == member_paths("shards/00001.tar", PHOTOS[4:])
    first = "shards/00001.tar/rocket.jpg"
    assert identity(first) == identity("./shards/../shards/00001.tar/rocket.jpg")
    assert identity(first) == f"{(shards / '00001.tar').resolve()}/rocket.jpg"
    # `..` in a member name belongs to the member: it must not collide with a file on disk.
    assert identity("shards/00001.tar/../00000.tar") != identity("shards/00000.tar")


def test_a_member_decodes_exactly_like_its_file(shards: Path) -> None:
    recipe = Recipe()
    for photo in PHOTOS[4:]:
        member = f"shards/00001.tar/{photo.stem}.jpg"
        as_member = np.asarray(load_image(member, recipe))
        assert np.array_equal(as_member, np.asarray(load_image(str(photo), recipe)))
    members = member_paths("shards/00001.tar", PHOTOS[4:])
    assert np.array_equal(read_sizes(members), read_sizes([str(p) for p in PHOTOS[4:]]))


def test_broken_members_fail_with_the_reasons_files_get(tmp_path: Path) -> None:
    data = (EXAMPLES / "coffee.jpg").read_bytes()
    broken = {"empty.jpg": b"", "cut.jpg": data[: len(data) // 2], "noise.png": b"\x89PNG" * 50}
    tar = write_tar(tmp_path / "b.tar", list(broken.items()))
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageDecodeError) as as_file:
            load_image(str(tmp_path / name), Recipe())
        with pytest.raises(ImageDecodeError) as as_member:
            load_image(f"{tar}/{name}", Recipe())
        assert as_member.value.reason == as_file.value.reason
        assert as_member.value.path == f"{tar}/{name}"
    with pytest.raises(ImageDecodeError, match="no such member in the tar"):
        load_image(f"{tar}/absent.jpg", Recipe())
    assert read_sizes([f"{tar}/cut.jpg", f"{tar}/absent.jpg"]).tolist() == [[600, 400], [0, 0]]


def test_truncated_tar_keeps_its_intact_members_and_names_the_damage(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", shard_members(PHOTOS[:4])).read_bytes()
    cut_at = whole.index(PHOTOS[2].read_bytes()[:4096]) + 1000  # inside the third photo
    tar = tmp_path / "cut.tar"
    tar.write_bytes(whole[:cut_at])
    found = find_inputs([str(tar)])
    assert found.paths == sorted(member_paths(str(tar), PHOTOS[:2]))
    reason = f"truncated tar after member 7 ({PHOTOS[1].stem}.txt)"  # README + 2 x 3 members
    assert found.missing == [(str(tar), reason)]
    with pytest.raises(ImageDecodeError) as err:  # the run fails it by decoding it
        load_image(str(tar), Recipe())
    assert err.value.reason == reason
    assert tar in [Path(p) for p in discover([str(tar)])]
    # Cut right after the last member, only the end-of-archive block says members may be lost.
    with tarfile.open(tmp_path / "whole.tar") as complete:
        last = complete.getmembers()[-1]
    tar.write_bytes(whole[: last.offset_data + -(-last.size // 512) * 512])
    assert find_inputs([str(tar)]).missing[0][1].startswith("truncated tar after member 13")


def test_unreadable_tars_are_failed_inputs_not_crashes(tmp_path: Path) -> None:
    (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "empty.tar").write_bytes(b"")
    write_tar(tmp_path / "texts.tar", [("a.txt", b"no images here")])
    shutil.copy(PHOTOS[0], tmp_path / "ok.jpg")
    names = [str(tmp_path / n) for n in ("noise.tar", "empty.tar", "texts.tar", "ok.jpg")]
    found = find_inputs(names)
    assert found.paths == [names[3]]
    assert found.missing[0][0] == names[0]
    assert found.missing[0][1].startswith("not a tar archive")
    assert found.missing[1] == (names[1], "empty file (0 bytes)")
    for name, reason in found.missing:
        with pytest.raises(ImageDecodeError) as err:
            load_image(name, Recipe())
        assert err.value.reason == reason


def test_the_index_is_compact_cached_and_follows_a_rewritten_tar(shards: Path) -> None:
    tar = str(shards / "00000.tar")
    index = tars.load_index(tar)
    assert tars.load_index("./shards/00000.tar") is index  # one scan per file per process
    assert index.offsets.dtype == np.int64 and isinstance(index.names, bytes)
    assert index.nbytes < 4 * 24 + 200  # four members: names and three int64 each
    write_tar(shards / "00000.tar", shard_members(PHOTOS[:1]))
    assert tars.load_index(tar).member_names() == [f"{PHOTOS[0].stem}.jpg"]


def _by_name(out: Path) -> dict:
    return {row.path.rsplit("/", 1)[-1]: row for row in dinoreg.read(out)}


def test_embedding_tars_equals_embedding_the_files(shards: Path, tmp_path: Path, tiny_dir) -> None:
    model = str(tiny_dir.path)
    files = dinoreg.embed([str(p) for p in PHOTOS], tmp_path / "files.h5", model, **KW)
    from_tars = dinoreg.embed(
        "shards/{00000..00001}.tar", tmp_path / "tars.h5", model, batch_size=3, workers=2
    )
    assert files.rows == from_tars.rows == len(PHOTOS) and not from_tars.failures
    paths = [row.path for row in dinoreg.read(tmp_path / "tars.h5")]
    assert paths == sorted(
        member_paths("shards/00000.tar", PHOTOS[:4]) + member_paths("shards/00001.tar", PHOTOS[4:])
    )
    expected, got = _by_name(tmp_path / "files.h5"), _by_name(tmp_path / "tars.h5")
    for name, row in expected.items():
        for token in ("cls", "registers", "patches"):
            assert np.array_equal(getattr(row, token), getattr(got[name], token)), (name, token)


def test_cli_reads_brace_ranges_and_reports_a_truncated_shard(
    shards: Path, tmp_path: Path, tiny_dir, capsys, monkeypatch
) -> None:
    whole = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(whole[: whole.index(PHOTOS[5].read_bytes()[:4096]) + 99])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    args = ["embed", "shards/{00000..00001}.tar", "--out", "o.h5", "-m", str(tiny_dir.path)]
    with pytest.raises(SystemExit) as done:
        main([*args, "--batch-size", "2", "--workers", "0"])
    assert done.value.code == 3
    err = capsys.readouterr().err
    with h5py.File(tmp_path / "o.h5") as f:
        paths = [p.decode() for p in f["paths"][:]]
        failed = [p.decode() for p in f["failed/paths"][:]]
        reasons = [r.decode() for r in f["failed/reasons"][:]]
    intact = member_paths("shards/00000.tar", PHOTOS[:4]) + member_paths(
        "shards/00001.tar", PHOTOS[4:5]
    )
    assert paths == sorted(intact)
    assert failed == ["shards/00001.tar"]
    assert reasons == [f"truncated tar after member 4 ({PHOTOS[4].stem}.txt)"]
    assert "shards/00001.tar" in err


def test_resume_with_the_tar_respelled_adds_no_rows(shards: Path, tmp_path: Path, tiny_dir) -> None:
    model, out = str(tiny_dir.path), tmp_path / "o.h5"

    def stop(event) -> None:
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        dinoreg.embed("shards/00000.tar", out, model, progress=stop, **KW)
    assert info.value.summary.rows == 2
    summary = dinoreg.embed("./shards/00000.tar", out, model, resume=True, **KW)
    assert (summary.mode_used, summary.resumed, summary.rows) == ("continued", 2, 2)
    paths = [row.path for row in dinoreg.read(out)]
    assert len(paths) == 4 and len({p.rsplit("/", 1)[-1] for p in paths}) == 4
