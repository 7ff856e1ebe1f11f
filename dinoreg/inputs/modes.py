"""Any Pillow mode to the 8-bit RGB a recipe works on."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes whose samples do not fit in 8 bits; Pillow's own conversion would clip them at 255.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto `background`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_MODES:
        return Image.fromarray(_wide_to_uint8(np.asarray(image)), "L").convert("RGB")
    has_alpha = "A" in image.getbands() or "a" in image.getbands()
    if has_alpha or image.info.get("transparency") is not None:
        # Same route as HF's convert_to_rgb (RGBA, then alpha_composite), so results match it.
        rgba = image.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(under, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        # Float images are either in [0, 1] or already on the 8-bit scale.
        scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    # Integer modes come from 16-bit files: map 0..65535 onto 0..255 (x / 257, rounded).
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)
