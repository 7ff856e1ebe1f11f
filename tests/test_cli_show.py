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
    sizes = [[d["size"]["width"], d["size"]["height"]] for d in docs]
    assert sizes == [[336, 224], [224, 266]]  # aspect kept, multiples of 14
    assert docs[0]["grid"] == {"rows": 16, "columns": 24}
    for doc in docs:
        assert len(doc["files"]) == 6  # pca, mean, 2 heads, norm, sheet
        for f in doc["files"]:
            with Image.open(f) as im:
                if not f.endswith("_sheet.png"):
                    assert im.size == (doc["size"]["width"], doc["size"]["height"])
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


def test_show_reports_each_image_as_drawn_and_a_rerun_continues(
    capsys, monkeypatch, tmp_path, tiny_dir
):
    import dinoreg.viz.show as viz_show

    out = tmp_path / "pics"
    photos = [EXAMPLES / "chelsea.jpg", EXAMPLES / "grace_hopper.jpg"]
    seen_when_drawing = []
    real_draw = viz_show._draw

    def draw_and_look(*args, **kwargs):
        seen_when_drawing.append(capsys.readouterr().out)  # what stdout had before this image
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(viz_show, "_draw", draw_and_look)
    args = ["show", *photos, "-o", out, "-m", tiny_dir.path, "--size", "112"]
    code, _, _ = run_cli(capsys, monkeypatch, *args)
    assert code == 0
    assert seen_when_drawing[0] == "" and str(photos[0]) in seen_when_drawing[1]  # streamed
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "grace_hopper_sheet.png").unlink()  # as if a run was stopped before this image
    code, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert code == 1 and "--overwrite" in err  # a plain rerun refuses
    code, stdout, err = run_cli(capsys, monkeypatch, *args, "--resume")
    assert code == 0 and stdout.count("\n") == 1 and str(photos[1]) in stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after["chelsea_sheet.png"] == first["chelsea_sheet.png"]  # finished: not redrawn
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_show_warns_when_it_enlarges_a_small_image(capsys, monkeypatch, tmp_path, tiny_dir):
    small = tmp_path / "tiny.png"
    Image.new("RGB", (25, 14), (200, 30, 30)).save(small)
    code, _, err = run_cli(
        capsys, monkeypatch, "show", small, "-o", tmp_path / "o", "-m", tiny_dir.path
    )
    assert code == 0 and "enlarged 32.0x" in err and "tiny.png" in err


def test_a_contact_sheet_stays_within_its_cap():
    import numpy as np

    from dinoreg.viz.draw import contact_sheet

    tiles = [(f"t{i}", np.zeros((896, 1596, 3), np.uint8)) for i in range(10)]
    sheet = contact_sheet(tiles, max_side=4096)
    assert max(sheet.size) <= 4096
