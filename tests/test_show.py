"""`show`: files, sizes, determinism, shared PCA round trip and refusals, colour maps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, make_hf
from PIL import Image

import dinoreg
from dinoreg.errors import OutputError, UsageError
from dinoreg.inputs.recipe import aspect_size
from dinoreg.runtime import PreparedModel
from dinoreg.viz import draw
from dinoreg.viz.maps import run_maps, to_pixels
from dinoreg.viz.options import ShowOptions
from dinoreg.viz.show import output_names, show, unique_stems

# One landscape, one portrait (512 x 600); both are small, so a run takes about a second.
PHOTOS = [str(EXAMPLES / "chelsea.jpg"), str(EXAMPLES / "grace_hopper.jpg")]


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return prepared(dinoreg.load_model(str(tiny_dir.path)))


def prepared(model) -> PreparedModel:
    return PreparedModel(model, torch.device("cpu"), torch.float32)


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def srgb_lightness(table: np.ndarray) -> np.ndarray:
    """CIE L* of sRGB uint8 colours."""
    v = table / 255.0
    linear = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    y = linear @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(y > 216 / 24389, 116 * np.cbrt(y) - 16, y * 24389 / 27)


@pytest.mark.parametrize("name", draw.COLORMAPS)
def test_colour_maps_are_tables_monotonic_in_lightness(name):
    table = draw.colormap(name)
    assert table.shape == (256, 3) and table.dtype == np.uint8
    lightness = srgb_lightness(table)
    assert np.all(np.diff(lightness) >= 0)
    assert lightness[-1] - lightness[0] > 70
    with pytest.raises(UsageError, match="viridis"):
        draw.colormap("jet")


@pytest.mark.parametrize(
    ("size", "want"),
    [
        ((451, 300), (672, 448)),  # short side to 448, long side to the nearest multiple of 14
        ((512, 600), (448, 532)),
        ((512, 512), (448, 448)),
        ((4000, 500), (896, 112)),  # long side capped at 2 * size; the short one follows
        ((20, 10), (896, 448)),  # small images are enlarged
        ((10000, 3), (896, 14)),  # never below one patch
    ],
)
def test_aspect_size(size, want):
    assert aspect_size(*size, 448, 896) == want


def test_stems_are_unique():
    paths = ["a/cat.jpg", "b/cat.png", "c/Cat.jpg", "d/cat-2.jpg", "e/dog.jpg"]
    assert unique_stems(paths) == ["cat", "cat-2", "Cat-3", "cat-2-2", "dog"]


def test_single_pass_equals_the_public_methods(tiny_model):
    x = torch.randn(1, 3, 42, 70, generator=torch.Generator().manual_seed(0))
    maps = run_maps(tiny_model, x)
    model = tiny_model.model
    with torch.no_grad():
        final = model.forward_features(x).patches[0].numpy()
        raw = model.intermediate_layers(x, [-1], norm=False)[0].patches[0].numpy()
        attn = model.attention_maps(x, [-1])[0][0, :, 0].numpy()
    np.testing.assert_allclose(maps.patches, final, atol=1e-6)
    np.testing.assert_allclose(maps.raw, raw, atol=1e-6)
    np.testing.assert_allclose(maps.cls_attention, attn, atol=1e-6)


def test_show_writes_every_picture_at_the_image_size(tiny_model, tmp_path):
    twin = tmp_path / "other" / "chelsea.jpg"  # same stem as an input: must not collide
    twin.parent.mkdir()
    shutil.copy(PHOTOS[0], twin)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    inputs = [*PHOTOS, str(twin), str(broken)]
    result = show(tiny_model, inputs, tmp_path / "out", ShowOptions(mask=True))

    assert [r.stem for r in result.images] == ["chelsea", "grace_hopper", "chelsea-2"]
    assert result.failed == ((str(broken), result.failed[0][1]),)
    heads = tiny_model.model.cfg.heads
    expected = [n for r in result.images for n in output_names(r.stem, heads)]
    assert [f.name for f in result.files] == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(expected)
    assert "chelsea_attn_head1.png" in expected and "chelsea_sheet.png" in expected
    for report in result.images:
        with Image.open(report.path) as original:
            size = aspect_size(*original.size, 448, 896)
        assert report.size == size and report.grid == (size[1] // 14, size[0] // 14)
        _, _, sheet_size = draw.sheet_layout(4 + heads, size)
        for f in report.files:
            with Image.open(f) as im:
                assert im.mode == "RGB"
                want = sheet_size if f.name.endswith("_sheet.png") else size
                assert im.size == want, f.name
                assert not im.info, f.name  # no metadata chunks (time, text, dpi)
        assert 0.0 < report.register_attention < 1.0
        assert len(report.register_attention_heads) == heads
        assert report.max_norm >= report.median_norm > 0
        assert 0.0 <= report.foreground <= 1.0
    # The twin is the same picture, so it must draw the same files.
    for a, b in zip(result.images[0].files, result.images[2].files, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_show_is_deterministic_and_never_overwrites(tiny_model, tmp_path):
    options = ShowOptions(size=224, upsample="bilinear")
    show(tiny_model, PHOTOS, tmp_path / "a", options)
    show(tiny_model, PHOTOS, tmp_path / "b", options)
    first = pngs(tmp_path / "a")
    assert first == pngs(tmp_path / "b") and len(first) == 2 * (4 + tiny_model.model.cfg.heads)
    with pytest.raises(OutputError, match="overwrite=True"):
        show(tiny_model, PHOTOS, tmp_path / "a", options)
    show(tiny_model, PHOTOS[:1], tmp_path / "a", ShowOptions(size=224, overwrite=True))
    assert pngs(tmp_path / "a")["chelsea_pca.png"] != first["chelsea_pca.png"]  # nearest now


def test_fit_pca_then_apply_gives_the_same_colours(tiny_model, tmp_path):
    saved = tmp_path / "shared.npz"
    fitted = show(tiny_model, PHOTOS, tmp_path / "fit", ShowOptions(size=224, fit_pca=saved))
    assert fitted.pca_file == saved and saved.is_file()
    applied = show(tiny_model, PHOTOS[::-1], tmp_path / "apply", ShowOptions(size=224, pca=saved))
    assert applied.pca_file is None
    one, two = pngs(tmp_path / "fit"), pngs(tmp_path / "apply")
    assert one == two  # order of inputs and fit-vs-apply change nothing
    with pytest.raises(OutputError, match=r"shared\.npz"):  # the PCA file is an output too
        show(tiny_model, PHOTOS, tmp_path / "again", ShowOptions(size=224, fit_pca=saved))
    # A per-image PCA picks other colours than the shared one.
    alone = show(tiny_model, PHOTOS, tmp_path / "alone", ShowOptions(size=224))
    assert alone.files[0].read_bytes() != one["chelsea_pca.png"]


def test_refuses_a_pca_of_another_model(tiny_model, tmp_path):
    saved = tmp_path / "shared.npz"
    show(tiny_model, PHOTOS[:1], tmp_path / "fit", ShowOptions(size=112, fit_pca=saved))
    other_seed = prepared(dinoreg.load_model(str(make_hf(tmp_path, seed=5).path)))
    other_dim = prepared(dinoreg.load_model(str(make_hf(tmp_path, dim=48).path)))
    for other, message in [(other_seed, "weights"), (other_dim, "32-dim")]:
        with pytest.raises(UsageError, match=message):
            show(other, PHOTOS[:1], tmp_path / "x", ShowOptions(size=112, pca=saved))
        assert not (tmp_path / "x").exists()  # refused before anything was written


def test_options_are_checked():
    with pytest.raises(UsageError, match="not both"):
        ShowOptions(pca="a.npz", fit_pca="b.npz")
    with pytest.raises(UsageError, match="at least size"):
        ShowOptions(size=518, max_size=448)
    with pytest.raises(UsageError, match="colour map"):
        ShowOptions(attention_cmap="rainbow")
    assert ShowOptions(size=518).long_side == 1036


def test_pixels_and_overlays_line_up():
    # A map that is 1 on one patch must light exactly that patch's 14 x 14 pixels.
    grid = np.zeros((3, 5))
    grid[1, 3] = 1.0
    up = draw.upsample(grid, (70, 42))
    assert up.shape == (42, 70)
    assert np.array_equal(np.argwhere(up == 1.0)[[0, -1]], [[14, 42], [27, 55]])
    image = Image.new("RGB", (70, 42), (255, 0, 0))
    model = torch.nn.Linear(1, 1)  # only its device and dtype are used
    pixels = to_pixels(image, model)
    assert pixels.shape == (1, 3, 42, 70)
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor([2.2489, -2.0357, -1.8044]), atol=1e-4)
