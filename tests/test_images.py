"""Decoding (modes, orientation, reduced-size JPEG, broken files), the dataset and batching."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoreg.errors import InputError
from dinoreg.inputs.dataset import Batch, ImageDataset, Sample, collate
from dinoreg.inputs.decode import ImageDecodeError, load_image
from dinoreg.inputs.recipe import REDUCED_SCALE, Recipe, preprocess, resize

EXAMPLES = Path(__file__).parent.parent / "examples" / "images"


def touch_image(path: Path, size: tuple[int, int] = (8, 8)) -> Path:
    Image.new("RGB", size, (200, 10, 10)).save(path)  # format from the suffix
    return path


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


# ----------------------------------------------------------------- decoding


def test_load_image_returns_loaded_rgb() -> None:
    image = load_image(str(EXAMPLES / "chelsea.jpg"), Recipe())
    assert image.mode == "RGB" and image.size == (451, 300)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Left half red, right half blue, stored with "rotate 90 CW to display" (orientation 6).
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:] = (0, 0, 255)
    stored = Image.fromarray(arr)
    exif = stored.getexif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(stored, exif=exif.tobytes(), quality=95))
    image = load_image(str(path), Recipe())
    assert image.size == (40, 80)
    top, bottom = image.getpixel((20, 5)), image.getpixel((20, 75))
    assert top[0] > 200 and top[2] < 50  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_broken_exif_falls_back_to_the_stored_image(tmp_path: Path) -> None:
    path = tmp_path / "bad-exif.jpg"
    path.write_bytes(
        jpeg_bytes(Image.new("RGB", (30, 20), "green"), exif=b"Exif\x00\x00MM\x00*junk")
    )
    assert load_image(str(path), Recipe()).size == (30, 20)


def test_first_frame_of_animated_gif(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_image(str(path), Recipe()).getpixel((8, 8)) == (255, 0, 0)


def test_files_in_other_modes(tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(wide)
    assert load_image(str(wide), Recipe()).getpixel((0, 0)) == (255, 255, 255)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(clear)
    assert load_image(str(clear), Recipe()).getpixel((0, 0)) == (255, 255, 255)
    black = Recipe(background=(0, 0, 0))
    assert load_image(str(clear), black).getpixel((0, 0)) == (0, 0, 0)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(cmyk, quality=95)
    red = load_image(str(cmyk), Recipe()).getpixel((10, 10))
    assert red[0] > 230 and red[1] < 25 and red[2] < 25
    gray = tmp_path / "gray.jpg"
    Image.new("L", (20, 20), 90).save(gray)
    assert abs(load_image(str(gray), Recipe()).getpixel((10, 10))[0] - 90) <= 1


@pytest.mark.parametrize(
    ("size", "decoded"),
    [
        ((1100, 1030), (138, 129)),  # 1030 // 8 >= 128: scale 1/8, rounded up
        ((1100, 1000), (275, 250)),  # 1000 // 8 < 128: scale 1/4
        ((300, 255), (300, 255)),  # 255 // 2 < 128: decoded as is
    ],
)
def test_reduced_size_decode_keeps_twice_the_resize_target(
    tmp_path: Path, size: tuple[int, int], decoded: tuple[int, int]
) -> None:
    recipe = Recipe.for_size(56)  # resize 64, so the short side must stay >= 128
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(Image.new("RGB", size, "gray")))
    image = load_image(str(path), recipe)
    assert image.size == decoded and min(image.size) >= recipe.decode_short_side
    exact = Recipe.for_size(56, exact_decode=True)
    assert load_image(str(path), exact).size == size


def test_reduced_size_decode_stays_close_to_exact(tmp_path: Path) -> None:
    path = big_astronaut(tmp_path, (1536, 1536))
    draft = preprocess(load_image(str(path), Recipe()), Recipe())
    exact = preprocess(load_image(str(path), Recipe(exact_decode=True)), Recipe())
    diff = (draft - exact).abs()
    assert 0 < diff.mean().item() < 0.05


def big_astronaut(tmp_path: Path, size: tuple[int, int] = (1536, 1152)) -> Path:
    with Image.open(EXAMPLES / "astronaut.jpg") as photo:
        big = photo.resize(size, Image.Resampling.BICUBIC)
    path = tmp_path / "astronaut-big.jpg"
    path.write_bytes(jpeg_bytes(big, quality=95))
    return path


def pillow_only(image: Image.Image) -> Image.Image:
    """The same decoded pixels without the reduced-size mark, so `resize` takes Pillow."""
    plain = image.copy()
    plain.info.pop(REDUCED_SCALE, None)
    return plain


@pytest.mark.parametrize(
    "recipe",
    [Recipe(), Recipe.for_size(112), Recipe(crop=False), Recipe(interpolation="bilinear")],
    ids=["default", "112", "no-crop", "bilinear"],
)
def test_a_reduced_size_decode_resizes_within_one_level_of_pillow(
    tmp_path: Path, recipe: Recipe
) -> None:
    image = load_image(str(big_astronaut(tmp_path)), recipe)
    assert image.info[REDUCED_SCALE] > 1  # decoded at reduced size: the torch kernel applies
    fast = np.asarray(resize(image, recipe), dtype=np.int16)
    slow = np.asarray(resize(pillow_only(image), recipe), dtype=np.int16)
    assert fast.shape == slow.shape == (recipe.image_size, recipe.image_size, 3)
    diff = np.abs(fast - slow)
    assert diff.max() == 1 and (diff > 0).mean() < 0.01  # one level, on under 1% of values


def test_a_keep_aspect_plan_gets_the_same_size_from_the_fast_resize(tmp_path: Path) -> None:
    recipe = Recipe.for_size(224, keep_aspect=True)
    image = load_image(str(big_astronaut(tmp_path, (2048, 1536))), recipe)
    fast = np.asarray(resize(image, recipe, size=(294, 224)), dtype=np.int16)
    slow = np.asarray(resize(pillow_only(image), recipe, size=(294, 224)), dtype=np.int16)
    assert fast.shape == slow.shape == (224, 294, 3)
    assert np.abs(fast - slow).max() <= 1


def test_exact_decode_and_small_images_keep_pillows_resize(tmp_path: Path) -> None:
    path = big_astronaut(tmp_path)
    exact = load_image(str(path), Recipe(exact_decode=True))
    assert REDUCED_SCALE not in exact.info
    small = load_image(str(EXAMPLES / "chelsea.jpg"), Recipe())  # 451x300: decoded as is
    assert REDUCED_SCALE not in small.info
    # a marked image under an exact recipe still goes through Pillow, bit for bit
    marked = load_image(str(path), Recipe())
    ours = resize(marked, Recipe(exact_decode=True))
    assert np.array_equal(np.asarray(ours), np.asarray(resize(pillow_only(marked), Recipe())))


# ----------------------------------------------------------------- broken files


def broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, words the reason must contain)."""
    photo = (EXAMPLES / "chelsea.jpg").read_bytes()
    files = {
        "zero": ("zero.jpg", b"", "empty file"),
        "truncated": ("cut.jpg", photo[: len(photo) // 2], "truncated JPEG"),
        "random": ("noise.jpg", np.random.default_rng(0).bytes(3000), "not an image"),
        "text": ("readme.png", b"just some text\n", "not an image"),
        "postscript": ("page.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "not an"),
    }
    out = {}
    for name, (filename, data, words) in files.items():
        (tmp_path / filename).write_bytes(data)
        out[name] = (tmp_path / filename, words)
    (tmp_path / "folder.jpg").mkdir()
    out["directory"] = (tmp_path / "folder.jpg", "is a directory")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out["dangling"] = (tmp_path / "dangling.jpg", "dangling symlink")
    out["missing"] = (tmp_path / "missing.jpg", "no such file")
    return out


def test_broken_files_fail_with_a_reason_and_never_raise(tmp_path: Path) -> None:
    cases = broken_files(tmp_path)
    good = str(EXAMPLES / "coffee.jpg")
    paths = [good, *(str(path) for path, _ in cases.values())]
    dataset = ImageDataset(paths, Recipe())
    assert dataset[0].error is None and dataset[0].pixels.shape == (224, 224, 3)
    assert dataset[0].pixels.dtype == torch.uint8  # normalised where the model runs
    for i, (name, (path, words)) in enumerate(cases.items(), start=1):
        sample = dataset[i]
        assert sample.pixels is None, name
        assert words in sample.error, (name, sample.error)
        with pytest.raises(ImageDecodeError) as info:
            load_image(str(path), Recipe())
        assert info.value.reason == sample.error and str(path) in str(info.value)


def test_decompression_bomb_is_a_clean_failure(tmp_path: Path) -> None:
    path = touch_image(tmp_path / "bomb.png", size=(100, 50))
    with pytest.raises(ImageDecodeError, match=r"image too large \(5000 pixels.*limit 4999\)"):
        load_image(str(path), Recipe(), max_pixels=4999)
    sample = ImageDataset([str(path)], Recipe(), max_pixels=4999)[0]
    assert sample.error.startswith("image too large")
    assert ImageDataset([str(path)], Recipe(), max_pixels=5000)[0].error is None


def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path: Path) -> None:
    path = touch_image(tmp_path / "strip.png", size=(4000, 1))
    with pytest.raises(ImageDecodeError, match="extreme aspect ratio"):
        load_image(str(path), Recipe())  # 256 x 1_024_000 after the resize


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode; directories cover the open failure")
    path = touch_image(tmp_path / "locked.jpg")
    path.chmod(0)
    try:
        assert ImageDataset([str(path)], Recipe())[0].error == "permission denied"
    finally:
        path.chmod(0o644)


def test_decode_error_is_an_input_error_and_pickles() -> None:
    err = ImageDecodeError("a.jpg", "truncated JPEG file")
    assert isinstance(err, InputError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, str(again)) == (err.path, err.reason, str(err))


# ----------------------------------------------------------------- dataset and batching


def test_dataset_paths_round_trip_any_filename() -> None:
    names = ["a.jpg", "dir/ü.png", "caf\udce9.jpg", ""]  # \udce9: a non-UTF-8 byte on disk
    dataset = ImageDataset(names, Recipe())
    assert len(dataset) == 4 and [dataset.path(i) for i in range(4)] == names
    with pytest.raises(IndexError):
        dataset.path(4)


def test_collate_mixes_successes_and_failures() -> None:
    pixels = torch.zeros(14, 14, 3, dtype=torch.uint8)
    batch = collate(
        [
            Sample(index=4, pixels=pixels, error=None),
            Sample(index=5, pixels=None, error="truncated JPEG file"),
            Sample(index=6, pixels=pixels + 1, error=None),
        ]
    )
    assert batch.indices == [4, 6]
    assert batch.pixels.shape == (2, 14, 14, 3) and batch.pixels[1].eq(1).all()
    assert batch.failures == [(5, "truncated JPEG file")]


def test_collate_all_failed() -> None:
    batch = collate([Sample(0, None, "empty file (0 bytes)"), Sample(1, None, "no such file")])
    assert batch == Batch(
        indices=[], pixels=None, failures=[(0, "empty file (0 bytes)"), (1, "no such file")]
    )
    assert batch.pin_memory() is batch


def test_dataloader_with_workers(tmp_path: Path) -> None:
    (tmp_path / "zero.jpg").write_bytes(b"")
    paths = [str(EXAMPLES / "chelsea.jpg"), str(tmp_path / "zero.jpg"), str(EXAMPLES / "china.jpg")]
    loader = torch.utils.data.DataLoader(
        ImageDataset(paths, Recipe()), batch_size=2, num_workers=2, collate_fn=collate
    )
    batches = list(loader)
    assert [b.indices for b in batches] == [[0], [2]]
    assert batches[0].failures == [(1, "empty file (0 bytes)")]
    assert batches[1].pixels.shape == (1, 224, 224, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_through_the_dataloader() -> None:
    paths = [str(EXAMPLES / "chelsea.jpg"), str(EXAMPLES / "china.jpg")]
    loader = torch.utils.data.DataLoader(
        ImageDataset(paths, Recipe()), batch_size=2, collate_fn=collate, pin_memory=True
    )
    (batch,) = list(loader)
    assert isinstance(batch, Batch) and batch.pixels.is_pinned()
