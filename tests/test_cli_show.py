"""`dinoreg show` from the shell: files, sizes, a shared PCA, skipped inputs, refusals."""

from __future__ import annotations

import json

from conftest import EXAMPLES
from PIL import Image
from test_cli_embed import run_cli


def test_show_writes_pictures_and_a_shared_pca(capsys, monkeypatch, tmp_path, tiny_dir):
    out = tmp_path / "pics"
    photos = [EXAMPLES / "chelsea.jpg", EXAMPLES / "grace_hopper.jpg"]
    pca = tmp_path / "pca.npz"
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "show",
        *photos,
        "-o",
        out,
        "-m",
        tiny_dir.path,
        "--size",
        "224",
        "--fit-pca",
        pca,
        "--json",
    )
    assert code == 0, err
    docs = [json.loads(line) for line in stdout.splitlines()]
    assert [d["size"] for d in docs] == [[336, 224], [224, 266]]  # aspect kept, multiples of 14
    for doc in docs:
        assert len(doc["files"]) == 6  # pca, mean, 2 heads, norm, sheet
        for f in doc["files"]:
            with Image.open(f) as im:
                if not f.endswith("_sheet.png"):
                    assert list(im.size) == doc["size"]
    assert pca.exists()
    again = tmp_path / "again"
    code, _, _ = run_cli(
        capsys,
        monkeypatch,
        "show",
        photos[0],
        "-o",
        again,
        "-m",
        tiny_dir.path,
        "--size",
        "224",
        "--pca",
        pca,
        "-q",
    )
    assert code == 0
    # the same saved PCA gives the same colours in another run
    assert (again / "chelsea_pca.png").read_bytes() == (out / "chelsea_pca.png").read_bytes()
    code, _, err = run_cli(capsys, monkeypatch, "show", photos[0], "-o", again, "-m", tiny_dir.path)
    assert code == 1 and "already exist" in err


def test_show_skips_a_broken_file(capsys, monkeypatch, tmp_path, tiny_dir):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    code, stdout, err = run_cli(
        capsys,
        monkeypatch,
        "show",
        EXAMPLES / "coffee.jpg",
        bad,
        "-o",
        tmp_path / "o",
        "-m",
        tiny_dir.path,
        "--size",
        "112",
        "--no-heads",
    )
    assert code == 3
    assert len(stdout.splitlines()) == 1 and "bad.png" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "coffee_attn_mean.png",
        "coffee_norm.png",
        "coffee_pca.png",
        "coffee_sheet.png",
    ]
