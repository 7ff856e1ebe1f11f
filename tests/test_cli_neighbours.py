"""`dinoreg search`, `dedup` and `index` from the shell, on real photos and planted copies."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import EXAMPLES
from PIL import Image
from test_cli_embed import run_cli

import dinoreg

PLANTED = ("chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def feats(tmp_path_factory, tiny_dir):
    """The example photos and, for three of them, a re-encode at quality 60, a 10% smaller
    copy and a 5% crop; embedded with the tiny test model."""
    folder = tmp_path_factory.mktemp("dups")
    for path in EXAMPLES.glob("*.jpg"):
        shutil.copy(path, folder / path.name)
    for name in PLANTED:
        with Image.open(EXAMPLES / f"{name}.jpg") as im:
            im = im.convert("RGB")
            im.save(folder / f"{name}-q60.jpg", quality=60)
            small = im.resize((im.width * 9 // 10, im.height * 9 // 10), Image.Resampling.BICUBIC)
            small.save(folder / f"{name}-small.jpg", quality=92)
            dx, dy = im.width // 40, im.height // 40
            im.crop((dx, dy, im.width - dx, im.height - dy)).save(folder / f"{name}-crop.jpg")
    out = folder.parent / "dups.h5"
    dinoreg.embed([str(folder)], out, model=str(tiny_dir.path), workers=0)
    return out


def stem(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".jpg")


def test_dedup_groups_each_planted_copy_with_its_original_and_nothing_else(
    capsys, monkeypatch, feats
):
    # Random 32-wide test weights put distinct photos as close as 0.9992 (their CLS tokens
    # share most of their direction) and the copies at >= 0.99998, so the cut sits between.
    code, out, _ = run_cli(capsys, monkeypatch, "dedup", feats, "--threshold", "0.9995")
    assert code == 0
    groups: dict[str, set[str]] = {}
    for line in out.splitlines():
        group, path, score = line.split("\t")
        groups.setdefault(group, set()).add(stem(path))
        assert float(score) >= 0.9995
    want = [{n, f"{n}-q60", f"{n}-small", f"{n}-crop"} for n in PLANTED]
    assert sorted(groups.values(), key=sorted) == sorted(want, key=sorted)


def test_search_row_finds_itself_first_and_image_queries_match(capsys, monkeypatch, feats):
    code, out, _ = run_cli(capsys, monkeypatch, "search", feats, "--row", "4", "-k", "3")
    first = out.splitlines()[0].split("\t")
    with dinoreg.read(feats) as rows:
        row4 = [r.path for r in rows][4]
    assert code == 0 and first[:3] == ["row 4", "1", row4] and float(first[3]) == 1.0
    query = EXAMPLES / "coffee.jpg"
    code, out, err = run_cli(
        capsys, monkeypatch, "search", feats, query, "/no/such.jpg", "-k", "4", "--json"
    )
    assert code == 3 and "skipped /no/such.jpg: no such file" in err  # the rest answered
    (doc,) = [json.loads(line) for line in out.splitlines()]
    assert {stem(h["path"]) for h in doc["hits"]} == {
        "coffee",
        "coffee-q60",
        "coffee-small",
        "coffee-crop",
    }
    assert doc["hits"][0]["score"] > 0.99999


def test_bad_inputs_are_one_line_each(capsys, monkeypatch, feats, tmp_path, tiny_dir):
    code, out, err = run_cli(capsys, monkeypatch, "search", feats, "--row", "0", "-k", "100")
    assert code == 0 and "fewer than -k 100" in err and len(out.splitlines()) == 16
    for threshold in ("0", "1.5", "-0.2"):
        code, _, err = run_cli(capsys, monkeypatch, "dedup", feats, "--threshold", threshold)
        assert code == 2 and "--threshold" in err and "Traceback" not in err
    not_ours = tmp_path / "x.h5"
    not_ours.write_bytes(b"not hdf5")
    code, _, err = run_cli(capsys, monkeypatch, "search", not_ours, "--row", "0")
    assert code != 0 and err.count("\n") == 1 and str(not_ours) in err
    patches_only = tmp_path / "p.h5"
    dinoreg.embed(
        [str(EXAMPLES)], patches_only, model=str(tiny_dir.path), tokens="patches", workers=0
    )
    code, _, err = run_cli(capsys, monkeypatch, "search", patches_only, "--row", "0")
    assert code != 0 and "cls" in err and err.count("\n") == 1
    code, out, _ = run_cli(
        capsys, monkeypatch, "search", patches_only, "--row", "0", "--tokens", "patches-mean"
    )
    assert code == 0 and out.splitlines()[0].split("\t")[1:3][0] == "1"
    code, _, err = run_cli(capsys, monkeypatch, "search", feats)
    assert code == 2 and "give a query" in err
