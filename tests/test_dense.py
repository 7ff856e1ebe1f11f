"""Dense features: `embed --keep-aspect` (bucketed batches, ragged patches with grids) and
`embed --layers` (intermediate blocks), against each image run alone and against transformers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES
from PIL import Image, ImageOps
from test_cli_embed import run_cli

import dinoreg
from dinoreg.embedding.results import Interrupted
from dinoreg.embedding.run import embed_recipe
from dinoreg.errors import OutputError, UsageError
from dinoreg.inputs.buckets import header_size, plan, plan_sizes, read_sizes
from dinoreg.inputs.decode import load_image
from dinoreg.inputs.recipe import Recipe, aspect_size, preprocess
from dinoreg.output.reader import inspect_output

TOL = 1e-5
RECIPE = Recipe.for_size(224, keep_aspect=True)  # max side 448


def _rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """Real photos plus generated images of other aspects; the names sort in input order."""
    d = tmp_path_factory.mktemp("photos")
    for p in sorted(EXAMPLES.glob("*.jpg")):
        shutil.copy(p, d / p.name)
    _rgb(100, 300, 1).save(d / "tall.png")  # long side capped at 448
    _rgb(60, 30, 2).save(d / "tiny_wide.png")  # enlarged to 448x224
    _rgb(320, 200, 3).convert("L").save(d / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    _rgb(300, 200, 4).save(d / "turned.jpg", exif=exif, quality=95)
    _rgb(400, 600, 5).save(d / "upright.jpg", quality=95)  # same grid as turned.jpg
    (d / "zbroken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return sorted(str(p) for p in d.iterdir())


@pytest.fixture(scope="module")
def model(tiny_dir):
    return dinoreg.load_model(str(tiny_dir.path))


def _displayed(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).size


def _grid(path: str) -> tuple[int, int]:
    w, h = aspect_size(*_displayed(path), 224, 448)
    return h // 14, w // 14


def _alone(model, path: str):
    x = preprocess(load_image(path, RECIPE), RECIPE)[None]
    with torch.inference_mode():
        return model.forward_features(x)


# -- planning ---------------------------------------------------------------------------------


def test_header_size_applies_exif_orientation_and_refuses_odd_files(photos, tmp_path):
    by_name = {Path(p).name: p for p in photos}
    assert header_size(by_name["turned.jpg"]) == (200, 300)
    assert header_size(by_name["tall.png"]) == (100, 300)
    assert header_size(by_name["zbroken.jpg"]) is None
    assert header_size(str(tmp_path)) is None
    os.mkfifo(tmp_path / "fifo.jpg")
    assert header_size(str(tmp_path / "fifo.jpg")) is None  # returns at once, never blocks
    for p in photos[:-1]:
        assert header_size(p) == _displayed(p)
    many = photos * 6  # more than one probe's worth, so the rest can go to the pool
    alone = read_sizes(many, threads=1)
    assert np.array_equal(read_sizes(many, threads=3, slow_s=0.0), alone)
    assert alone[-1].tolist() == [0, 0] and alone[0].tolist() == list(_displayed(photos[0]))


def test_plan_orders_by_grid_and_makes_full_batches():
    rng = np.random.default_rng(0)
    choices = np.array([[224, 224], [336, 224], [224, 336], [0, 0], [448, 112]], np.int32)
    sizes = choices[rng.integers(0, len(choices), 200)]
    p = plan_sizes(sizes, RECIPE)
    keys = [(s[0] == 0, s[1] // 14, s[0] // 14, i) for i, s in enumerate(p.sizes)]
    assert p.order.tolist() == sorted(range(200), key=lambda i: keys[i])
    batches = list(p.batches(7))
    assert len(batches) == p.num_batches(7) and sorted(i for b in batches for i in b) == list(
        range(200)
    )
    buckets = [b.tolist() for b in p.buckets()]
    assert [i for b in buckets for i in b] == p.order.tolist()
    unknown = np.flatnonzero(sizes[:, 0] == 0).tolist()
    assert buckets[-1] == unknown and p.unsized
    for bucket in buckets[:-1]:
        mine = [b for b in batches if b[0] in bucket]
        assert [len(b) for b in mine[:-1]] == [7] * (len(mine) - 1)  # full but for the last
        assert len({tuple(p.sizes[i]) for b in mine for i in b}) == 1  # one grid per batch
    assert [len(b) for b in batches if b[0] in unknown] == [1] * len(unknown)
    # A resumed run plans only what is left; when the earlier run committed whole batches, the
    # rest continues with exactly the batches of an uninterrupted run.
    done = {i for b in batches[:5] for i in b}
    left = [i for i in range(200) if i not in done]
    resumed = plan_sizes(sizes[left], RECIPE)
    assert [[left[i] for i in b] for b in resumed.batches(7)] == batches[5:]


def test_examples_bucket_into_few_batches():
    paths = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))
    p = plan(paths, RECIPE)
    grids = sorted({tuple(g) for g in p.grids.tolist()})
    assert grids == [(16, 16), (16, 24), (19, 16)]
    assert p.num_batches(4) == 4 and p.num_batches(16) == 3  # the minimum is 2 and 1


def test_recipe_keep_aspect_fields_and_errors():
    r = Recipe.for_size(224, keep_aspect=True, max_size=500)
    assert (r.crop, r.resize, r.max_size, r.grid) == (False, 224, 500, None)
    assert Recipe.from_dict(r.to_dict()) == r and r.to_dict()["keep_aspect"] is True
    assert r.target_size(1000, 100) == (500 // 14 * 14, 56)
    x = preprocess(_rgb(300, 200, 0), r, size=(98, 70))
    assert x.shape == (3, 70, 98)
    with pytest.raises(ValueError):
        preprocess(_rgb(300, 200, 0), Recipe(), size=(98, 70))
    for kwargs in (
        {"keep_aspect": True, "max_size": 100},
        {"max_size": 448},
        {"keep_aspect": True, "crop": False},
        {"keep_aspect": True, "crop": True},
    ):
        with pytest.raises(UsageError):
            embed_recipe(224, **kwargs)


# -- keep-aspect runs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aspect_runs(photos, tiny_dir, tmp_path_factory):
    """One keep-aspect run per format (batch size 2, a decode worker), with its progress."""
    d = tmp_path_factory.mktemp("aspect")
    runs = {}
    for fmt, out in (("h5", d / "a.h5"), ("npy", d / "a")):
        events = []
        summary = dinoreg.embed(
            photos,
            out,
            str(tiny_dir.path),
            keep_aspect=True,
            batch_size=2,
            workers=1,
            format=fmt,
            progress=events.append,
        )
        runs[fmt] = (out, summary, events)
    return runs


def test_keep_aspect_rows_equal_each_image_alone(aspect_runs, photos, model):
    out, summary, _ = aspect_runs["h5"]
    good = [p for p in photos if not p.endswith("zbroken.jpg")]
    assert summary.rows == len(good) and [p for p, _ in summary.failures] == [photos[-1]]
    rows = list(dinoreg.read(out))
    # Grouped by grid: a stable sort on (grid, input index).
    assert [r.path for r in rows] == sorted(good, key=lambda p: (_grid(p), photos.index(p)))
    assert len({_grid(p) for p in good}) >= 6
    for row in rows:
        ref = _alone(model, row.path)
        assert row.patches.shape[:2] == _grid(row.path) == ref.grid
        assert np.abs(row.cls - ref.cls[0].numpy()).max() <= TOL
        assert np.abs(row.registers - ref.registers[0].numpy()).max() <= TOL
        assert np.abs(row.patches - ref.patches[0].numpy()).max() <= TOL


def test_keep_aspect_batches_hold_one_grid_and_are_full(aspect_runs, photos):
    out, _, events = aspect_runs["npy"]
    rows = list(dinoreg.read(out))
    grids = [r.patches.shape[:2] for r in rows]
    sizes, done = [], 0
    for e in events:
        sizes.append(e.rows - done)
        done = e.rows
    assert sum(sizes) == len(rows) and [len(e.new_failures) for e in events][-1] == 1
    assert sizes[-1] == 0  # the unreadable header comes last, alone
    start, batches = 0, []
    for n in sizes[:-1]:
        batches.append(grids[start : start + n])
        start += n
    for i, batch in enumerate(batches):
        assert len(set(batch)) == 1
        last_of_bucket = i + 1 == len(batches) or batches[i + 1][0] != batch[0]
        assert len(batch) == 2 or last_of_bucket
    assert len(batches) == len({g for g in grids}) + sum(
        (grids.count(g) - 1) // 2 for g in set(grids)
    )


def test_ragged_layout_round_trips_in_h5_and_npy(aspect_runs, capsys, monkeypatch):
    h5_out, npy_out = aspect_runs["h5"][0], aspect_runs["npy"][0]
    a, b = list(dinoreg.read(h5_out)), list(dinoreg.read(npy_out))
    assert [r.path for r in a] == [r.path for r in b]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.patches, y.patches) and np.array_equal(x.cls, y.cls)
    n, total = len(a), sum(r.patches.shape[0] * r.patches.shape[1] for r in a)
    offsets = np.load(npy_out / "patches_offsets.npy", mmap_mode="r")
    grids = np.load(npy_out / "grids.npy", mmap_mode="r")
    patches = np.load(npy_out / "patches.npy", mmap_mode="r")
    assert patches.shape == (total, 32) and offsets.shape == (n + 1,) and grids.dtype == np.int32
    assert offsets[0] == 0 and np.array_equal(np.diff(offsets), grids[:, 0] * grids[:, 1])
    assert np.array_equal(patches[offsets[1] : offsets[2]], b[1].patches.reshape(-1, 32))
    for path in (h5_out, npy_out):
        info = inspect_output(path)
        assert info.complete and info.rows == n
        assert info.datasets["patches"][0] == (total, 32)
        assert info.datasets["patches_offsets"][0] == (n + 1,)
        assert info.datasets["grids"] == ((n, 2), "int32")
        assert info.meta["keep_aspect"] is True and info.meta["grid"] is None
        assert info.meta["recipe"]["max_size"] == 448 and info.meta["layers"] is None
        code, stdout, _ = run_cli(capsys, monkeypatch, "info", path, "--json")
        assert code == 0 and json.loads(stdout)["datasets"]["grids"] == [[n, 2], "int32"]


def test_keep_aspect_resume_continues_the_uninterrupted_order(
    aspect_runs, photos, tiny_dir, tmp_path
):
    full_out = aspect_runs["h5"][0]
    out = tmp_path / "r.h5"
    good = [p for p in photos if not p.endswith("zbroken.jpg")]
    batches = list(plan(photos, RECIPE).batches(2))
    grid = {p: _grid(p) for p in good}
    # Stop right after a batch followed by another of the same grid: the resumed run has to
    # continue in the middle of a bucket.
    stop = next(
        k + 1
        for k in range(len(batches) - 1)
        if grid[photos[batches[k][0]]] == grid[photos[batches[k + 1][0]]]
    )
    seen = []

    def interrupt(event):
        seen.append(event)
        if len(seen) == stop:
            raise KeyboardInterrupt

    kw = {"keep_aspect": True, "batch_size": 2, "workers": 0}
    with pytest.raises(Interrupted) as stopped:
        dinoreg.embed(photos, out, str(tiny_dir.path), progress=interrupt, **kw)
    committed = sum(len(b) for b in batches[:stop])
    assert stopped.value.summary.rows == committed and not inspect_output(out).complete
    with pytest.raises(OutputError, match="keep_aspect"):
        dinoreg.embed(photos, out, str(tiny_dir.path), resume=True, workers=0)
    with pytest.raises(OutputError, match="recipe"):  # max_size lives in the recipe
        dinoreg.embed(photos, out, str(tiny_dir.path), resume=True, **kw, max_size=560)
    summary = dinoreg.embed(photos, out, str(tiny_dir.path), resume=True, **kw)
    assert summary.resumed == committed and summary.complete
    want, got = list(dinoreg.read(full_out)), list(dinoreg.read(out))
    assert [r.path for r in got] == [r.path for r in want]
    for x, y in zip(got, want, strict=True):
        assert np.array_equal(x.cls, y.cls) and np.array_equal(x.registers, y.registers)
        assert np.array_equal(x.patches, y.patches)
    assert inspect_output(out).failures == inspect_output(full_out).failures


def test_cli_keep_aspect_with_max_size(capsys, monkeypatch, photos, tiny_dir, tmp_path):
    out = tmp_path / "cli.h5"
    flags = ["--keep-aspect", "--image-size", "112", "--max-size", "200", "-b", "3", "-q"]
    code, _, err = run_cli(
        capsys, monkeypatch, "embed", *photos, "-o", out, "-m", tiny_dir.path, *flags
    )
    assert code == 3 and "zbroken.jpg" in err  # the broken file is skipped, as always
    rows = list(dinoreg.read(out))
    assert len(rows) == len(photos) - 1
    for row in rows:
        w, h = aspect_size(*_displayed(row.path), 112, 200)
        assert row.patches.shape[:2] == (h // 14, w // 14) and max(w, h) <= 196
    code, stdout, _ = run_cli(capsys, monkeypatch, "info", out)
    assert code == 0 and "keep_aspect yes" in " ".join(stdout.split())


# -- layers -----------------------------------------------------------------------------------


def _hf_states(tiny_dir, x: torch.Tensor, norm: bool) -> list[torch.Tensor]:
    with torch.no_grad():
        states = tiny_dir.hf(pixel_values=x, output_hidden_states=True).hidden_states
        return [tiny_dir.hf.layernorm(s) if norm else s for s in states[1:]]  # per block


@pytest.mark.parametrize("norm", [True, False], ids=["final-norm", "no-final-norm"])
def test_layers_match_transformers_hidden_states(capsys, monkeypatch, tmp_path, tiny_dir, norm):
    out = tmp_path / "layers.h5"
    flags = [] if norm else ["--no-final-norm"]
    args = [
        "embed",
        EXAMPLES,
        "-o",
        out,
        "-m",
        tiny_dir.path,
        "--layers",
        "-2,1",
        *flags,
        "-j",
        "0",
    ]
    code, _, _ = run_cli(capsys, monkeypatch, *args)
    assert code == 0
    import h5py

    recipe = Recipe.for_size(224)
    with h5py.File(out) as f:
        assert "cls" not in f and "patches" not in f
        assert sorted(f["layers"]) == ["0", "1"]
        assert f["layers/0/patches"].shape == (7, 16, 16, 32)
        assert json.loads(f.attrs["layers"]) == [0, 1] and bool(f.attrs["final_norm"]) == norm
        paths = [p.decode() for p in f["paths"][:]]
        for i, path in enumerate(paths):
            x = preprocess(load_image(path, recipe), recipe)[None]
            ref = _hf_states(tiny_dir, x, norm)
            for block in (0, 1):
                ours = np.concatenate(
                    [
                        f[f"layers/{block}/cls"][i][None],
                        f[f"layers/{block}/registers"][i],
                        f[f"layers/{block}/patches"][i].reshape(-1, 32),
                    ]
                )
                assert np.abs(ours - ref[block][0].numpy()).max() <= TOL


def test_layers_with_keep_aspect_are_ragged_per_layer(photos, tiny_dir, tmp_path):
    out = tmp_path / "la"
    good = [p for p in photos if not p.endswith("zbroken.jpg")][-5:]
    dinoreg.embed(
        good,
        out,
        str(tiny_dir.path),
        keep_aspect=True,
        layers=[-1],
        tokens=["patches"],
        workers=0,
        format="npy",
    )
    names = sorted(os.listdir(out))
    assert "layers.1.patches.npy" in names and "layers.1.patches_offsets.npy" in names
    assert "grids.npy" in names and "patches.npy" not in names and "cls.npy" not in names
    patches = np.load(out / "layers.1.patches.npy")
    offsets = np.load(out / "layers.1.patches_offsets.npy")
    grids = np.load(out / "grids.npy")
    paths = (out / "paths.txt").read_text().splitlines()
    for i, path in enumerate(paths):
        x = preprocess(load_image(path, RECIPE), RECIPE)[None]
        ref = _hf_states(tiny_dir, x, True)[1][0, 5:]  # final-normed patches of the last block
        assert tuple(grids[i]) == (x.shape[2] // 14, x.shape[3] // 14)
        assert np.abs(patches[offsets[i] : offsets[i + 1]] - ref.numpy()).max() <= TOL
    rows = list(dinoreg.read(out))  # the deepest stored layer by default
    assert [r.path for r in rows] == paths
    assert rows[0].patches.shape == (*grids[0], 32) and rows[0].cls is None
    assert [r.path for r in dinoreg.read(out, layer=-1)] == paths
    assert np.array_equal(next(iter(dinoreg.read(out, layer=1))).patches, rows[0].patches)
    with pytest.raises(OutputError, match="holds layers 1, not 0"):
        next(iter(dinoreg.read(out, layer=0)))


# -- flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--keep-aspect", "--max-size", "200"], "--max-size"),
        (["--max-size", "448"], "--keep-aspect"),
        (["--keep-aspect", "--no-crop"], "--no-crop"),
        (["--no-final-norm"], "--layers"),
        (["--layers", "2"], "2 blocks"),
        (["--layers", "-3,0"], "2 blocks"),
        (["--layers", "a,b"], "--layers"),
        (["--layers", "1,,2"], "--layers"),
        (["--keep-aspect", "--image-size", "100"], "multiple of 14"),
    ],
)
def test_flag_errors_exit_2(capsys, monkeypatch, tmp_path, tiny_dir, flags, words):
    out = tmp_path / "bad.h5"
    code, stdout, err = run_cli(
        capsys, monkeypatch, "embed", EXAMPLES, "-o", out, "-m", tiny_dir.path, *flags
    )
    assert code == 2 and stdout == ""
    assert words in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "bad.h5.partial").exists()
