"""Recipes, mode conversion and pixel parity with transformers' BitImageProcessorPil."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoreg.errors import UsageError
from dinoreg.inputs.decode import load_image
from dinoreg.inputs.recipe import IMAGENET_MEAN, IMAGENET_STD, Recipe, preprocess, to_rgb

EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "images").glob("*.jpg"))


def hf_processor(image_size: int = 224, *, crop: bool = True):
    """The PIL-backend processor configured as the checkpoints' preprocessor_config.json."""
    transformers = pytest.importorskip("transformers")
    if crop:
        size = {"shortest_edge": round(image_size * 256 / 224)}
    else:
        size = {"height": image_size, "width": image_size}
    return transformers.BitImageProcessorPil(
        do_resize=True,
        size=size,
        resample=3,
        do_center_crop=crop,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def hf_pixels(processor, image: Image.Image) -> torch.Tensor:
    return processor(image, return_tensors="pt")["pixel_values"][0]


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode)


# ----------------------------------------------------------------- parity with transformers


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_real_photos_match_hf_bit_for_bit(path: Path) -> None:
    processor = hf_processor()
    with Image.open(path) as raw:
        expected = hf_pixels(processor, raw)
    ours = preprocess(load_image(str(path), Recipe(exact_decode=True)), Recipe())
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() <= 1e-6


# 640x427 resizes to 383x256, where HF's floor of the crop offset differs from rounding.
SYNTHETIC_SIZES = [(640, 427), (427, 640), (500, 375), (333, 500), (257, 256), (255, 255)]
SYNTHETIC_SIZES += [(224, 224), (31, 17), (17, 31), (1, 1), (3, 301), (1001, 999)]


@pytest.mark.parametrize("size", SYNTHETIC_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_synthetic_sizes_match_hf(size: tuple[int, int]) -> None:
    image = noise(*size)
    expected = hf_pixels(hf_processor(), image)
    assert torch.equal(preprocess(image, Recipe()), expected)


@pytest.mark.parametrize("image_size", [112, 518])
@pytest.mark.parametrize("crop", [True, False])
def test_other_sizes_and_no_crop_match_hf(image_size: int, crop: bool) -> None:
    image = noise(640, 427, seed=1)
    expected = hf_pixels(hf_processor(image_size, crop=crop), image)
    ours = preprocess(image, Recipe.for_size(image_size, crop=crop))
    assert ours.shape == (3, image_size, image_size)
    assert torch.equal(ours, expected)


def hf_composites_alpha(processor) -> bool:
    """Recent transformers composite transparency on white; older ones drop the alpha channel."""
    clear = hf_pixels(processor, Image.new("RGBA", (8, 8), (0, 0, 0, 0)))
    return bool(clear[0, 0, 0] > 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L"])
def test_other_modes_match_hf(mode: str) -> None:
    # HF composites transparency onto white through RGBA; we take the same route.
    processor = hf_processor()
    if "A" in mode and not hf_composites_alpha(processor):
        pytest.skip("this transformers drops alpha instead of compositing it on white")
    image = noise(300, 200, mode, seed=2)
    assert torch.equal(preprocess(image, Recipe()), hf_pixels(processor, image))


def test_palette_with_transparency_matches_hf() -> None:
    if not hf_composites_alpha(hf_processor()):
        pytest.skip("this transformers drops alpha instead of compositing it on white")
    image = noise(120, 90, "L", seed=3).convert("P")
    image.info["transparency"] = 5
    assert torch.equal(preprocess(image, Recipe()), hf_pixels(hf_processor(), image))


def test_normalisation_values() -> None:
    recipe = Recipe()
    out = preprocess(Image.new("RGB", (300, 300), (0, 128, 255)), recipe)
    expected = (np.array([0, 128, 255]) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-6)
    assert out.is_contiguous()


def test_custom_mean_std() -> None:
    recipe = Recipe(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = preprocess(Image.new("RGB", (224, 224), (255, 0, 255)), recipe)
    assert out[:, 0, 0].tolist() == [1.0, -1.0, 1.0]


# ----------------------------------------------------------------- recipes


def test_default_recipe_is_the_released_one() -> None:
    recipe = Recipe()
    assert (recipe.image_size, recipe.resize, recipe.crop) == (224, 256, True)
    assert recipe == Recipe.for_size(224)
    assert recipe.grid == (16, 16)
    assert recipe.decode_short_side == 512


@pytest.mark.parametrize(("size", "resize"), [(14, 16), (224, 256), (448, 512), (518, 592)])
def test_for_size_keeps_the_256_224_ratio(size: int, resize: int) -> None:
    recipe = Recipe.for_size(size)
    assert recipe.resize == resize
    assert recipe.grid == (size // 14, size // 14)


def test_no_crop_recipe_records_the_square_side() -> None:
    assert Recipe.for_size(518, crop=False).resize == 518
    assert Recipe(crop=False).resize == 224  # the default 256 means nothing without a crop


@pytest.mark.parametrize("bad", [230, 0, -14, 13, True, 224.0, "224"])
def test_image_size_must_be_a_positive_multiple_of_14(bad: object) -> None:
    with pytest.raises(UsageError, match="positive multiple of 14"):
        Recipe.for_size(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="positive multiple of 14"):
        Recipe(image_size=bad)  # type: ignore[arg-type]


def test_image_size_error_suggests_neighbours() -> None:
    with pytest.raises(UsageError, match="try 224 or 238"):
        Recipe.for_size(230)


def test_invalid_recipe_fields() -> None:
    with pytest.raises(UsageError, match="interpolation"):
        Recipe(interpolation="cubic")
    with pytest.raises(UsageError, match="at least the crop size"):
        Recipe(image_size=224, resize=200)
    with pytest.raises(UsageError, match="stds positive"):
        Recipe(std=(0.2, 0.0, 0.2))
    with pytest.raises(UsageError, match="background"):
        Recipe(background=(0, 0, 256))


def test_to_dict_is_json_and_round_trips() -> None:
    recipe = Recipe.for_size(518, exact_decode=True)
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["resize"] == 592 and data["grid"] == [37, 37]
    assert data["interpolation"] == "bicubic" and data["mean"] == list(IMAGENET_MEAN)
    assert Recipe.from_dict(data) == recipe
    assert hash(Recipe.from_dict(data)) == hash(recipe)


def test_recipe_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Recipe().image_size = 14  # type: ignore[misc]


# ----------------------------------------------------------------- mode conversion


def rgb_at(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    out = to_rgb(image)
    assert out.mode == "RGB"
    return out.getpixel(xy)


def test_gray_and_bilevel() -> None:
    assert rgb_at(Image.new("L", (2, 2), 77)) == (77, 77, 77)
    assert rgb_at(Image.new("1", (2, 2), 1)) == (255, 255, 255)
    assert rgb_at(Image.new("1", (2, 2), 0)) == (0, 0, 0)


def test_alpha_is_composited_on_the_background() -> None:
    clear = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert rgb_at(clear) == (255, 255, 255)
    assert to_rgb(clear, (0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    assert rgb_at(Image.new("RGBA", (2, 2), (10, 20, 30, 255))) == (10, 20, 30)
    assert rgb_at(Image.new("RGBA", (2, 2), (0, 0, 0, 128))) == (127, 127, 127)
    assert rgb_at(Image.new("LA", (2, 2), (0, 0))) == (255, 255, 255)
    assert rgb_at(Image.new("LA", (2, 2), (40, 255))) == (40, 40, 40)


def test_palette_with_and_without_transparency() -> None:
    palette = [200, 0, 0, 0, 0, 200] + [0] * 762
    opaque = Image.new("P", (2, 2), 0)
    opaque.putpalette(palette)
    assert rgb_at(opaque) == (200, 0, 0)
    clear = Image.new("P", (2, 2), 0)
    clear.putpalette(palette)
    clear.info["transparency"] = 0
    assert rgb_at(clear) == (255, 255, 255)
    clear.putpixel((1, 1), 1)
    assert rgb_at(clear, (1, 1)) == (0, 0, 200)


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(arr)
    assert image.mode == "I;16"
    assert [rgb_at(image, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_int_and_float_modes() -> None:
    wide = Image.fromarray(np.array([[-5, 65535, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert [rgb_at(wide, (x, 0))[0] for x in range(3)] == [0, 255, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [rgb_at(unit, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    byte_scale = Image.fromarray(np.array([[0.0, 100.0, 300.0, np.nan]], dtype=np.float32))
    assert [rgb_at(byte_scale, (x, 0))[0] for x in range(4)] == [0, 100, 255, 0]


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV"])
def test_colour_spaces_come_back_close(mode: str) -> None:
    colour = (200, 60, 20)
    got = rgb_at(Image.new("RGB", (2, 2), colour).convert(mode))
    assert max(abs(a - b) for a, b in zip(got, colour, strict=True)) <= 6


def test_preprocess_accepts_any_mode() -> None:
    out = preprocess(Image.new("I;16", (300, 300), 65535), Recipe())
    white = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), white, atol=1e-6)
