"""One image through the model for the pictures: resized at its own aspect, normalised, and the
maps one forward pass gives (final patches, pre-norm patches, the CLS attention row)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dinoreg.inputs.decode import load_image
from dinoreg.inputs.normalise import normalise
from dinoreg.inputs.recipe import PATCH_SIZE, Recipe, aspect_size, resize
from dinoreg.runtime import PreparedModel


def model_identity(model: torch.nn.Module) -> tuple[str, str]:
    """(name, weights sha256) from `load_model`'s provenance; empty for a bare module."""
    info = getattr(model, "info", None)
    return getattr(info, "name", "") or "", getattr(info, "sha256", "") or ""


def recipe_for(size: int, long_side: int) -> Recipe:
    """The keep-aspect recipe of `embed --keep-aspect` at the show's sizes."""
    side = -(-size // PATCH_SIZE) * PATCH_SIZE
    return Recipe.for_size(side, keep_aspect=True, max_size=long_side)


def load_resized(path: str, size: int, long_side: int, with_scale: bool = False):
    """Decode (EXIF-oriented RGB) and resize at the image's aspect, bicubic, no crop; with
    `with_scale`, also how much the short side was enlarged."""
    recipe = recipe_for(size, long_side)
    image = load_image(path, recipe)
    target = aspect_size(*image.size, size, long_side)
    resized = resize(image, recipe, target)
    if with_scale:
        return resized, min(target) / max(1, min(image.size))
    return resized


def to_pixels(image: Image.Image, model: torch.nn.Module) -> torch.Tensor:
    """ImageNet-normalised (1, 3, H, W) on the model's device and dtype."""
    param = next(model.parameters())
    return normalise(image, Recipe())[None].to(param.device, param.dtype)


@dataclass(frozen=True)
class Maps:
    patches: np.ndarray  # (h, w, D) final-norm, what `embed` stores and the PCA is fitted on
    raw: np.ndarray  # (h, w, D) last block before the final norm, where artifacts stand out
    cls_attention: np.ndarray  # (heads, T) CLS row of the last block's attention


def run_maps(prepared: PreparedModel, pixels: torch.Tensor, attention: bool = True) -> Maps:
    # One pass serves all three maps.
    with prepared.inference():
        out = prepared.model.features(pixels, cls_attention=attention)
    cls_row = out.cls_attention[0] if attention else torch.zeros(0)
    return Maps(_numpy(out.tokens.patches[0]), _numpy(out.last.patches[0]), _numpy(cls_row))


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy().astype(np.float64)
