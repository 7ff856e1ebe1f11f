"""Decoded images as a torch Dataset, and the collate that stacks them into batches.

With `encoded=True` (`ComputeOptions.decode` on the device) a JPEG the device can decode comes
back undecoded (`gpu_decode.read_encoded`); every other file is decoded here as always.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.utils.data

from dinoreg.inputs.decode import MAX_PIXELS, ImageDecodeError, load_image
from dinoreg.inputs.gpu_decode import Encoded, read_encoded
from dinoreg.inputs.normalise import to_uint8
from dinoreg.inputs.recipe import PATCH_SIZE, Recipe, resize


@dataclass(frozen=True)
class Sample:
    """One dataset item: (H, W, 3) uint8 pixels on success, the undecoded JPEG for the device
    (`encoded`), or the reason it failed."""

    index: int
    pixels: torch.Tensor | None
    error: str | None
    encoded: Encoded | None = None


@dataclass
class Batch:
    """Decoded images stacked in batch order, JPEGs left for the device, and the inputs that
    failed and why. `order` is every input of the piece in sampler order, which is the order
    rows keep once the device has decoded its share."""

    indices: list[int]
    pixels: torch.Tensor | None  # (B, H, W, 3) uint8; None when every input failed
    failures: list[tuple[int, str]]
    encoded: list[Encoded] = field(default_factory=list)
    order: list[int] = field(default_factory=list, compare=False)  # derived from the rest

    def pin_memory(self) -> Batch:
        """Pin the pixels in page-locked memory (called by DataLoader(pin_memory=True))."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class ImageDataset(torch.utils.data.Dataset):
    """Resized, cropped uint8 images by index (normalised later, where the model runs); a bad
    file yields a Sample with `error`, never an exception.

    `sizes` (N, 2) gives keep-aspect recipes the planned (W, H) of each input (`dinoreg.buckets`),
    so every image of a bucketed batch comes out the same size; (0, 0) means unplanned (the size
    then follows the decoded image).
    """

    def __init__(
        self,
        paths: Sequence[str],
        recipe: Recipe,
        *,
        max_pixels: int = MAX_PIXELS,
        sizes: np.ndarray | None = None,
        encoded: bool = False,
    ) -> None:
        names = [os.fsencode(p) for p in paths]
        # One bytes blob plus offsets instead of a list of str: forked workers that touch list
        # items copy their pages (refcounts), so memory would grow with the number of inputs.
        self._blob = b"".join(names)
        self._offsets = np.cumsum([0, *map(len, names)], dtype=np.int64)
        self.recipe = recipe
        self.max_pixels = max_pixels
        if sizes is not None:
            sizes = np.asarray(sizes, dtype=np.int32)
            if not recipe.keep_aspect or sizes.shape != (len(names), 2):
                raise ValueError("sizes must be (N, 2), for a keep-aspect recipe only")
        self.sizes = sizes
        self.encoded = encoded  # hand JPEGs over undecoded, for the device

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def path(self, index: int) -> str:
        """The input path at `index`, as given."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} inputs")
        start, end = self._offsets[index], self._offsets[index + 1]
        return os.fsdecode(self._blob[start:end])

    def planned_size(self, index: int) -> tuple[int, int] | None:
        """The (W, H) planned for `index`, or None (not planned, or its header was unreadable)."""
        if self.sizes is None or not self.sizes[index, 0]:
            return None
        return int(self.sizes[index, 0]), int(self.sizes[index, 1])

    def __getitem__(self, index: int) -> Sample:
        if self.encoded:
            path = self.path(index)
            item = read_encoded(path, index, self.recipe, self.max_pixels, self.planned_size(index))
            if item is not None:
                return Sample(index=index, pixels=None, error=None, encoded=item)
        return self.decoded(index)

    def decoded(self, index: int) -> Sample:
        """The CPU path, the reference: decode, resize and crop here. The batch loop also
        calls it for a JPEG the device refused, so that file fails in the same words."""
        path = self.path(index)
        planned = self.planned_size(index)
        try:
            image = load_image(path, self.recipe, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            return Sample(index=index, pixels=None, error=exc.reason)
        if planned is not None and not fits_plan(image.size, planned):
            # The batch is already fixed to the planned grid: resizing to it would distort.
            error = (
                f"decoded as {image.width}x{image.height}, which does not fit the "
                f"{planned[0]}x{planned[1]} planned from its header (file changed, or metadata "
                "the header pass cannot read)"
            )
            return Sample(index=index, pixels=None, error=error)
        pixels = to_uint8(resize(image, self.recipe, size=planned))
        return Sample(index=index, pixels=pixels, error=None)


def fits_plan(size: tuple[int, int], planned: tuple[int, int]) -> bool:
    """Whether an image of `size` has the aspect of its planned (W, H), up to the rounding of
    each planned side to the patch grid (half a patch, a whole one where the long side is capped)
    and reduced-size JPEG decoding (2%). A quarter turn the plan missed lands far outside."""
    (width, height), (plan_w, plan_h) = size, planned
    aspect = width / height
    low = (plan_w - PATCH_SIZE) / (plan_h + PATCH_SIZE)
    high = (plan_w + PATCH_SIZE) / max(plan_h - PATCH_SIZE, 1e-9)
    return low / 1.02 <= aspect <= high * 1.02


def collate(samples: list[Sample]) -> Batch:
    """Stack decoded samples into one tensor, keep undecoded JPEGs aside; failed ones become
    (index, reason) pairs."""
    good = [s for s in samples if s.pixels is not None]
    encoded = [s.encoded for s in samples if s.encoded is not None]
    failures = [
        (s.index, s.error or "unknown error")
        for s in samples
        if s.pixels is None and s.encoded is None
    ]
    pixels = torch.stack([s.pixels for s in good]) if good else None
    return Batch(
        indices=[s.index for s in good],
        pixels=pixels,
        failures=failures,
        encoded=encoded,
        order=[s.index for s in samples],
    )
