"""`show --compare`: one sheet per image with a row per model, the outlier rule, the histogram of
norms, refusals, and the CLI end to end."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLES, Tiny, randomize
from PIL import Image
from test_cli_embed import run_cli
from test_plain_dinov2 import make_plain

from dinoreg.errors import OutputError, UsageError
from dinoreg.inputs.recipe import aspect_size
from dinoreg.runtime import ComputeOptions, prepare_model
from dinoreg.viz import norms
from dinoreg.viz.compare import SheetLayout, compare, output_names
from dinoreg.viz.options import ShowOptions

PHOTOS = [str(EXAMPLES / "chelsea.jpg"), str(EXAMPLES / "grace_hopper.jpg")]
SMALL = ShowOptions(size=112, norms_histogram=True)  # 8 x 12 patches: fast on CPU
CPU = ComputeOptions(device="cpu")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Tiny:
    return make_plain(tmp_path_factory.mktemp("plain"), seed=3)


@pytest.fixture(scope="module")
def patch16_dir(tmp_path_factory) -> Tiny:
    """A tiny registers checkpoint with 16-pixel patches (no released model has them)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_register_tokens=4,
        image_size=224,
        patch_size=16,
    )
    model = Dinov2WithRegistersModel(cfg)
    randomize(model, 5)
    path = tmp_path_factory.mktemp("p16") / "patch16"
    model.save_pretrained(path)
    return Tiny(model.eval(), path)


# -- the outlier rule ------------------------------------------------------------------------


def test_outlier_rule_finds_a_planted_second_mode():
    rng = np.random.default_rng(0)
    main = rng.normal(50.0, 6.0, size=4000)  # the ordinary patch tokens
    artifacts = rng.normal(300.0, 40.0, size=100)  # 2.4% high-norm tokens, as in the paper
    stats = norms.norm_stats(np.concatenate([main, artifacts]))
    assert stats.outlier_share == pytest.approx(100 / 4100, abs=1e-9)
    assert main.max() < stats.threshold < artifacts.min()


@pytest.mark.parametrize(
    "sample",
    [
        lambda r: r.normal(50.0, 6.0, size=20000),
        lambda r: 40.0 * np.sqrt(r.chisquare(64, size=20000) / 64),  # norms of random vectors
        lambda r: r.lognormal(3.0, 0.15, size=20000),  # skewed to the right
        lambda r: np.full(500, 7.0),  # a constant map: MAD is 0, the floor holds
    ],
)
def test_outlier_rule_finds_about_nothing_in_one_mode(sample):
    stats = norms.norm_stats(sample(np.random.default_rng(1)))
    assert stats.outlier_share <= 1e-3
    assert stats.threshold >= stats.median * (1 + norms.OUTLIER_MADS * norms.MAD_FLOOR) - 1e-9


def test_histogram_has_its_size_and_one_colour_per_model():
    rng = np.random.default_rng(2)
    a = norms.HistogramSeries("a", rng.normal(50, 5, 300), 80.0, 0.0)
    b = norms.HistogramSeries("b", np.r_[rng.normal(50, 5, 300), [400.0] * 6], 90.0, 6 / 306)
    picture = norms.histogram_picture([a, b])
    assert picture.size == norms.HIST_SIZE and picture.mode == "RGB"
    colours = {tuple(c) for c in np.asarray(picture).reshape(-1, 3)}
    assert norms.PALETTE[0] in colours and norms.PALETTE[1] in colours
    edges = norms.shared_bins([a, b])
    assert edges[0] == min(a.norms.min(), b.norms.min()) and 400.0 < edges[-1] < 410.0
    cut = norms.HistogramSeries("c", np.array([1.0, 2.0]), threshold=30.0)
    assert norms.shared_bins([cut])[-1] > 30.0  # the cut is inside the picture


# -- the library -----------------------------------------------------------------------------


def test_compare_writes_one_sheet_per_image_with_a_row_per_model(tmp_path, tiny_dir, plain_dir):
    models = [str(tiny_dir.path), str(plain_dir.path)]
    seen: list[weakref.ref] = []

    def load(name, compute):
        # one model in memory at a time: the previous one is gone before the next loads
        assert all(ref() is None for ref in seen)
        prepared = prepare_model(name, compute)
        seen.append(weakref.ref(prepared.model))
        return prepared

    out = tmp_path / "out"
    result = compare(models, PHOTOS, out, SMALL, CPU, load=load)

    assert [r.stem for r in result.images] == ["chelsea", "grace_hopper"]
    expected = [n for s in ("chelsea", "grace_hopper") for n in output_names(s, True)]
    assert [f.name for f in result.files] == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # scratch folder gone
    for report in result.images:
        with Image.open(report.path) as original:
            size = aspect_size(*original.size, 112, 224)
        assert report.size == size
        assert [row.model for row in report.rows] == models
        assert len({row.grid for row in report.rows}) == 1  # one grid for every row
        assert report.grid == (size[1] // 14, size[0] // 14)
        assert len(report.labels) == 2
        for label, row in zip(report.labels, report.rows, strict=True):
            assert label.startswith(row.model) and "outlier patches" in label
            assert 0.0 <= row.outlier_share <= 1.0
            assert row.max_norm >= row.outlier_threshold or row.outlier_share == 0.0
        registers, plain = report.rows
        assert registers.registers == 4 and 0.0 < registers.register_attention < 1.0
        assert plain.registers == 0 and plain.register_attention is None
        assert plain.family == "dinov2" and registers.family == "dinov2_with_registers"
        assert "registers n/a" in report.labels[1]
        sheet, histogram = report.files
        with Image.open(sheet) as im:
            assert im.size == SheetLayout(2, size).size and im.mode == "RGB"
        with Image.open(histogram) as im:
            assert im.size == norms.HIST_SIZE


def test_compare_is_deterministic_skips_broken_files_and_never_overwrites(
    tmp_path, tiny_dir, plain_dir
):
    models = [str(tiny_dir.path), str(plain_dir.path)]
    options = ShowOptions(size=56)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    first = compare(models, [PHOTOS[0], str(broken)], tmp_path / "a", options, CPU)
    assert [r.stem for r in first.images] == ["chelsea"]
    assert [path for path, _ in first.failed] == [str(broken)]
    compare(models, PHOTOS[:1], tmp_path / "b", options, CPU)
    name = first.files[0].name
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(OutputError, match="already exist"):
        compare(models, PHOTOS[:1], tmp_path / "a", options, CPU)


def test_compare_refuses_another_patch_size(tmp_path, tiny_dir, patch16_dir):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="patch size") as refused:
        compare([str(tiny_dir.path), str(patch16_dir.path)], PHOTOS[:1], out, SMALL, CPU)
    assert refused.value.params == ("compare",)
    assert list(out.iterdir()) == []  # no sheet, no scratch left behind


@pytest.mark.parametrize(
    ("models", "options", "params"),
    [
        (["small"], SMALL, ("compare",)),
        (["small", "small"], SMALL, ("compare",)),
        (["small", "dinov2-small"], ShowOptions(fit_pca="p.npz"), ("fit_pca", "compare")),
    ],
)
def test_compare_refuses_before_loading(tmp_path, models, options, params):
    def load(name, compute):
        raise AssertionError("nothing may load")

    with pytest.raises(UsageError) as refused:
        compare(models, PHOTOS, tmp_path, options, CPU, load=load)
    assert refused.value.params == params


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_compare_end_to_end(capsys, monkeypatch, tmp_path, tiny_dir, plain_dir):
    out = tmp_path / "figs"
    pair = f"{tiny_dir.path},{plain_dir.path}"
    args = ["show", *PHOTOS, "--compare", pair, "-o", out, "--size", "112", "--norms-histogram"]
    code, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "chelsea_compare.png",
        "chelsea_norm_histogram.png",
        "grace_hopper_compare.png",
        "grace_hopper_norm_histogram.png",
    ]
    lines = [line.split("\t") for line in stdout.splitlines()]
    assert [f[0] for f in lines] == PHOTOS
    for fields in lines:  # path, then (model, outlier_share=, register_attention=) per model
        assert fields[1] == str(tiny_dir.path) and fields[4] == str(plain_dir.path)
        assert fields[2].startswith("outlier_share=") and fields[6] == "register_attention=n/a"

    code, stdout, err = run_cli(capsys, monkeypatch, *args, "--overwrite", "--json", "-q")
    assert code == 0, err
    docs = [json.loads(line) for line in stdout.splitlines()]
    assert [d["path"] for d in docs] == PHOTOS
    for doc in docs:
        registers, plain = doc["models"]
        assert plain["register_attention"] is None and 0 < registers["register_attention"] < 1
        assert all(0 <= m["outlier_share"] <= 1 for m in doc["models"])
        assert [Path(f).name for f in doc["files"]] == output_names(Path(doc["path"]).stem, True)


def test_cli_compare_refusals(capsys, monkeypatch, tmp_path, tiny_dir):
    base = ["show", PHOTOS[0], "-o", tmp_path / "o"]
    code, stdout, err = run_cli(capsys, monkeypatch, *base, "--compare", str(tiny_dir.path))
    assert code == 2 and "two or more models" in err and not stdout
    code, _, err = run_cli(capsys, monkeypatch, *base, "--compare", "small,base", "-m", "small")
    assert code == 2 and "leave out" in err
    assert not (tmp_path / "o").exists()


def test_cli_norms_histogram_without_compare(capsys, monkeypatch, tmp_path, tiny_dir):
    out = tmp_path / "o"
    args = ["show", PHOTOS[0], "-o", out, "-m", tiny_dir.path, "--size", "112", "--no-heads"]
    code, stdout, err = run_cli(capsys, monkeypatch, *args, "--norms-histogram", "--json")
    assert code == 0, err
    (doc,) = [json.loads(line) for line in stdout.splitlines()]
    assert doc["files"][-1].endswith("chelsea_norm_histogram.png")
    assert 0.0 <= doc["outlier_share"] <= 1.0
    with Image.open(out / "chelsea_norm_histogram.png") as im:
        assert im.size == norms.HIST_SIZE
