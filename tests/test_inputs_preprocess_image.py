"""`preprocess_image`: the model input for one image, the same pixels a run feeds the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from dinoreg.errors import UsageError
from dinoreg.inputs.dataset import ImageDataset, collate
from dinoreg.inputs.decode import ImageDecodeError
from dinoreg.inputs.normalise import normalise_batch
from dinoreg.inputs.recipe import Recipe, preprocess_image

EXAMPLES = Path(__file__).parent.parent / "examples" / "images"


@pytest.mark.parametrize(
    "recipe", [Recipe(), Recipe.for_size(112, crop=False)], ids=["default", "no-crop"]
)
def test_equals_the_dataloader_pixels(recipe: Recipe) -> None:
    path = EXAMPLES / "chelsea.jpg"
    loader = torch.utils.data.DataLoader(
        ImageDataset([str(path)], recipe), batch_size=1, collate_fn=collate
    )
    (batch,) = list(loader)
    ours = preprocess_image(path, recipe)
    assert ours.shape == (1, 3, recipe.image_size, recipe.image_size)
    # the loader hands over uint8; normalised where the model runs, the numbers are the same
    assert batch.pixels.dtype == torch.uint8
    assert ours.dtype == torch.float32 and torch.equal(ours, normalise_batch(batch.pixels, recipe))
    assert torch.equal(preprocess_image(str(path), recipe), ours)


def test_takes_a_pil_image_and_the_default_recipe() -> None:
    with Image.open(EXAMPLES / "chelsea.jpg") as image:
        rgb = image.convert("RGB")
    exact = Recipe(exact_decode=True)
    assert torch.equal(preprocess_image(rgb), preprocess_image(EXAMPLES / "chelsea.jpg", exact))


def test_bad_file_raises_the_decode_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        preprocess_image(tmp_path / "empty.jpg")


def test_recipe_errors_name_parameters() -> None:
    with pytest.raises(UsageError) as info:
        Recipe.for_size(225)
    assert str(info.value).startswith("image_size must be") and info.value.params == ("image_size",)
    with pytest.raises(UsageError) as info:
        Recipe.for_size(224, max_size=448)
    assert "--" not in str(info.value) and set(info.value.params) == {"max_size", "keep_aspect"}
    with pytest.raises(UsageError) as info:
        Recipe.for_size(224, keep_aspect=True, max_size=200)
    assert "max_size (200)" in str(info.value) and "max_size" in info.value.params


def test_normalising_a_batch_equals_normalising_each_image_exactly() -> None:
    from dinoreg.inputs.normalise import normalise

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (3, 17, 29, 3), generator=g, dtype=torch.uint8)
    batch[0, 0, :, 0] = torch.arange(29, dtype=torch.uint8) * 8 + 31  # levels across the range
    for recipe in (Recipe(), Recipe(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))):
        got = normalise_batch(batch, recipe)
        assert got.shape == (3, 3, 17, 29) and got.dtype == torch.float32
        for i in range(3):
            want = normalise(Image.fromarray(batch[i].numpy()), recipe)
            assert torch.equal(got[i], want)


def test_the_gather_path_of_other_devices_equals_the_cpu_path() -> None:
    from dinoreg.inputs.normalise import normalise_gather

    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (2, 9, 11, 3), generator=g, dtype=torch.uint8)
    for recipe in (Recipe(), Recipe(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))):
        assert torch.equal(normalise_gather(batch, recipe), normalise_batch(batch, recipe))
