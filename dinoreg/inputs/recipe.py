"""Preprocessing recipes: an RGB image becomes a normalised (3, H, W) float32 tensor.

The default recipe is the checkpoints' own processor (transformers' `BitImageProcessor`, PIL
backend): shortest edge to 256 with bicubic, centre crop 224, rescale 1/255, ImageNet mean/std.
`preprocess` reproduces it bit for bit; the tests compare against `BitImageProcessorPil`.

With `keep_aspect` nothing is cropped: the short side goes to `image_size`, the long side is
capped at `max_size`, both rounded to multiples of the patch size (`aspect_size`), so each image
keeps its own patch grid.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinoreg.errors import UsageError
from dinoreg.inputs.modes import to_rgb
from dinoreg.inputs.normalise import normalise

PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The released recipe resizes to 256 before a 224 crop; other crop sizes keep that ratio.
_RESIZE_RATIO = 256 / 224

# `image.info` key the decoder sets on an image it decoded at 1/2, 1/4 or 1/8 scale. Such an image
# is already within the reduced-size tolerance of the exact recipe, so its resize may take torch's
# uint8 kernel: 4x faster than Pillow's, within one 8-bit level of it (Pillow rounds 22-bit
# fixed-point weights, torch 16-bit ones), where the reduced decode alone moves pixels by up to
# 27 levels. Every other image is resized by Pillow, bit for bit the checkpoints' processor.
REDUCED_SCALE = "dinoreg.reduced_scale"
# Interpolations torch resizes as Pillow does (antialiased, a = -0.5 for bicubic); the others
# (box, hamming, lanczos, nearest) always go through Pillow.
TENSOR_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear"}

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _check_image_size(image_size: object) -> int:
    ok = isinstance(image_size, int) and not isinstance(image_size, bool)
    if ok and image_size > 0 and image_size % PATCH_SIZE == 0:
        return image_size
    if ok and image_size > 0:
        lower = max(PATCH_SIZE, image_size // PATCH_SIZE * PATCH_SIZE)
        hint = f"try {lower} or {lower + PATCH_SIZE}"
    else:
        hint = "try 224"
    raise UsageError(
        f"image_size must be a positive multiple of {PATCH_SIZE} (the patch size), "
        f"got {image_size!r}; {hint}.",
        params=("image_size",),
    )


@dataclass(frozen=True)
class Recipe:
    """How a decoded image becomes model input; the defaults are the checkpoints' processor.

    Transparent pixels are composited onto `background` (white, as the HF processor does).
    With `crop=False` the whole image is squeezed to `image_size` square and `resize` equals it.
    With `keep_aspect` the image keeps its aspect (`aspect_size`): `image_size` is the short side,
    `max_size` (default 2 * image_size) caps the long side, and `crop` is always False.
    """

    image_size: int = 224
    resize: int = 256
    crop: bool = True
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    exact_decode: bool = False
    background: tuple[int, int, int] = (255, 255, 255)
    keep_aspect: bool = False
    max_size: int | None = None

    def __post_init__(self) -> None:
        _check_image_size(self.image_size)
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"Unknown interpolation {self.interpolation!r}; use one of "
                f"{', '.join(sorted(INTERPOLATIONS))}.",
                params=("interpolation",),
            )
        # Lists arrive from JSON (resume); store tuples so recipes compare and hash by value.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "background", tuple(int(v) for v in self.background))
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise UsageError(
                "mean and std need three values each, the stds positive (R, G, B).",
                params=("mean", "std"),
            )
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise UsageError(
                "background must be three integers in 0..255 (R, G, B).", params=("background",)
            )
        self._check_aspect()
        if not self.crop:
            # Without a crop there is no intermediate size; recording the square side keeps
            # provenance honest whatever the caller passed.
            object.__setattr__(self, "resize", self.image_size)
        elif not isinstance(self.resize, int) or self.resize < self.image_size:
            raise UsageError(
                f"resize ({self.resize!r}) must be an integer of at least the crop size, "
                f"image_size ({self.image_size}); use Recipe.for_size() to derive it.",
                params=("resize", "image_size"),
            )

    def _check_aspect(self) -> None:
        if not self.keep_aspect:
            if self.max_size is not None:
                raise UsageError(
                    "max_size only applies with keep_aspect; "
                    "set keep_aspect=True or drop max_size.",
                    params=("max_size", "keep_aspect"),
                )
            return
        object.__setattr__(self, "crop", False)  # keep-aspect never crops
        if self.max_size is None:
            object.__setattr__(self, "max_size", 2 * self.image_size)
        ok = isinstance(self.max_size, int) and not isinstance(self.max_size, bool)
        if not ok or self.max_size < self.image_size:
            raise UsageError(
                f"max_size ({self.max_size!r}) must be an integer of at least image_size "
                f"({self.image_size}), which is the short side with keep_aspect.",
                params=("max_size", "image_size", "keep_aspect"),
            )

    @classmethod
    def for_size(
        cls,
        image_size: int = 224,
        *,
        crop: bool = True,
        exact_decode: bool = False,
        keep_aspect: bool = False,
        max_size: int | None = None,
    ) -> Recipe:
        """The released recipe scaled to `image_size`: short side to size*256/224, then crop.

        With `keep_aspect`, `image_size` is the short side, `max_size` caps the long side (default
        twice the short side) and `crop` is ignored: nothing is cropped.
        """
        size = _check_image_size(image_size)
        if keep_aspect:
            return cls(
                image_size=size,
                resize=size,
                crop=False,
                exact_decode=exact_decode,
                keep_aspect=True,
                max_size=max_size,
            )
        resize = round(size * _RESIZE_RATIO) if crop else size
        return cls(
            image_size=size, resize=resize, crop=crop, exact_decode=exact_decode, max_size=max_size
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """Rebuild a recipe from `to_dict` output (derived keys such as `grid` are ignored)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able provenance: every field, plus the patch grid."""
        out = asdict(self)
        for key in ("mean", "std", "background"):
            out[key] = list(out[key])
        out["grid"] = list(self.grid) if self.grid is not None else None
        return out

    @property
    def grid(self) -> tuple[int, int] | None:
        """Patch grid (rows, columns) the model sees; None with `keep_aspect` (one per image)."""
        if self.keep_aspect:
            return None
        return (self.image_size // PATCH_SIZE, self.image_size // PATCH_SIZE)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(W, H) the model sees for an image of this (oriented) size."""
        if self.keep_aspect:
            return aspect_size(width, height, self.image_size, self.max_size or 0)
        return (self.image_size, self.image_size)

    @property
    def decode_short_side(self) -> int:
        """Smallest short side a reduced-size decode may produce: twice the resize target."""
        return 2 * self.resize


def aspect_size(
    width: int, height: int, size: int, max_size: int, patch: int = PATCH_SIZE
) -> tuple[int, int]:
    """(W, H) with the short side near `size`, the long side at most `max_size`, aspect kept
    and both rounded to the nearest multiple of `patch` (at least one patch)."""
    scale = size / min(width, height)
    if max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    cap = max(patch, max_size // patch * patch)  # rounding up must not pass the cap

    def snap(side: float) -> int:
        return min(cap, max(1, math.floor(side / patch + 0.5)) * patch)

    return snap(width * scale), snap(height * scale)


def resized_size(width: int, height: int, recipe: Recipe) -> tuple[int, int]:
    """(width, height) after the resize step, rounded as transformers rounds it."""
    if not recipe.crop:
        return recipe.target_size(width, height)
    short, long = (width, height) if width <= height else (height, width)
    # HF computes int(size * long / short) in floats; integer floor division is the same value
    # for any real image size (it could differ only once size * long exceeds 2**53).
    new_long = recipe.resize * long // short
    return (recipe.resize, new_long) if width <= height else (new_long, recipe.resize)


def resize(image: Image.Image, recipe: Recipe, size: tuple[int, int] | None = None) -> Image.Image:
    """The RGB image the model sees, before normalisation: resized, and centre-cropped if the
    recipe crops. `size` is a keep-aspect (W, H) to resize to (a bucketed batch's plan)."""
    if size is not None and not recipe.keep_aspect:
        raise ValueError("resize: size only applies to keep-aspect recipes")
    image = to_rgb(image, recipe.background)
    width, height = image.size
    new_w, new_h = size if size is not None else resized_size(width, height, recipe)
    box = crop_box(new_w, new_h, recipe)
    if (new_w, new_h) == (width, height):
        return image.crop(box) if recipe.crop else image
    if _takes_fast_resize(image, recipe, (new_w, new_h)):
        mode = TENSOR_INTERPOLATIONS[recipe.interpolation]
        return _torch_resize(image, (new_w, new_h), box, mode)
    image = image.resize((new_w, new_h), INTERPOLATIONS[recipe.interpolation])
    return image.crop(box) if recipe.crop else image


def crop_box(width: int, height: int, recipe: Recipe) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the recipe's centre crop in a resized (W, H) image; the
    whole image when the recipe does not crop."""
    out_w, out_h = (recipe.image_size, recipe.image_size) if recipe.crop else (width, height)
    # Floor of half the excess, as HF does (torchvision rounds instead: one pixel apart).
    left, top = (width - out_w) // 2, (height - out_h) // 2
    return left, top, left + out_w, top + out_h


def _takes_fast_resize(image: Image.Image, recipe: Recipe, size: tuple[int, int]) -> bool:
    reduced = image.info.get(REDUCED_SCALE, 1) > 1 and not recipe.exact_decode
    shrinks = size[0] <= image.width and size[1] <= image.height
    return reduced and shrinks and recipe.interpolation in TENSOR_INTERPOLATIONS


def _torch_resize(
    image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int], mode: str
) -> Image.Image:
    """Antialiased resize in torch's uint8 kernel, then the crop `box`, back as a PIL image."""
    with warnings.catch_warnings():
        # Pillow's buffer is read-only; torch only reads it here.
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.asarray(image))
    # (1, 3, H, W) over (H, W, 3) memory: channels-last, the layout of the uint8 fast path
    nchw = pixels.permute(2, 0, 1).unsqueeze(0)
    resized = torch.nn.functional.interpolate(
        nchw, size=(size[1], size[0]), mode=mode, antialias=True, align_corners=False
    )
    left, top, right, bottom = box
    crop = resized[0, :, top:bottom, left:right].permute(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(crop.numpy()), "RGB")


def preprocess(
    image: Image.Image, recipe: Recipe, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resize, centre-crop and normalise an image into a (3, S, S) float32 tensor.

    With `keep_aspect` the result is (3, H, W): `size` is the (W, H) to resize to (the planned
    size of a bucketed batch, so a batch always stacks); by default it follows the image's size.
    """
    return normalise(resize(image, recipe, size), recipe)


def preprocess_image(
    image_or_path: Image.Image | str | Path, recipe: Recipe | None = None
) -> torch.Tensor:
    """One image as the model's (1, 3, H, W) float32 input, exactly as a run would feed it.

    A path is decoded as runs decode it (`dinoreg.inputs.decode.load_image`: size limits,
    reduced-size JPEG decoding, EXIF orientation; ImageDecodeError when unusable); a PIL image
    is taken as already decoded and oriented. The default recipe is the checkpoints' own.
    """
    recipe = recipe or Recipe()
    if not isinstance(image_or_path, Image.Image):
        from dinoreg.inputs.decode import load_image  # decode imports this module

        image_or_path = load_image(str(image_or_path), recipe)
    return preprocess(image_or_path, recipe)[None]
