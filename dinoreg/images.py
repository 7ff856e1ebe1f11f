"""Image files to model batches: safe decoding, then a Dataset and collate for DataLoader.

Discovery (`dinoreg.discovery`) and recipes (`dinoreg.preprocess`) are re-exported here, so
callers need one import: `from dinoreg.images import discover, Recipe, ImageDataset, ...`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

import numpy as np
import torch
import torch.utils.data
from PIL import Image, ImageOps, UnidentifiedImageError

from dinoreg.discovery import IMAGE_SUFFIXES, discover
from dinoreg.errors import InputError
from dinoreg.preprocess import Recipe, preprocess, resized_size, to_rgb

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "Batch",
    "ImageDataset",
    "ImageDecodeError",
    "Recipe",
    "Sample",
    "collate",
    "discover",
    "load_image",
    "open_formats",
    "preprocess",
]

# Pillow refuses outright above 2 * Image.MAX_IMAGE_PIXELS; we fail at the same size, but as a
# clean per-file error instead of a warning followed by an exception.
MAX_PIXELS = 178_956_970


# --------------------------------------------------------------------------- decoding


class ImageDecodeError(InputError):
    """One input that cannot be decoded; `reason` is short enough for a failure table."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"Cannot read image {path}: {reason}; fix the file or leave it out.")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Default exception pickling replays args=(message,), which this __init__ rejects.
        return (type(self), (self.path, self.reason))


def load_image(path: str, recipe: Recipe, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `path` fully to RGB: first frame, EXIF orientation applied, alpha on background.

    Large JPEGs decode at reduced size unless `recipe.exact_decode`; raises ImageDecodeError.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageDecodeError(
            path, "dangling symlink" if os.path.islink(path) else "no such file"
        ) from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot stat ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError(path, "is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO would block the worker
        raise ImageDecodeError(path, "not a regular file")
    if info.st_size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; Pillow reads it lazily
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot open ({exc.strerror or exc})") from None
    with handle:
        image = _decode(handle, path, recipe, max_pixels)
    try:
        return to_rgb(_orient(image), recipe.background)
    except Exception as exc:
        raise ImageDecodeError(path, f"cannot convert mode {image.mode} to RGB ({exc})") from exc


def _decode(handle: BinaryIO, path: str, recipe: Recipe, max_pixels: int) -> Image.Image:
    kind = "image"
    with warnings.catch_warnings():
        # The size check below reports bombs itself, and warnings about damaged metadata do
        # not stop a usable image; in workers they would only clutter the terminal.
        warnings.simplefilter("ignore")
        try:
            image = Image.open(handle, formats=open_formats())
            kind = image.format or kind
            _check_size(image.size, path, recipe, max_pixels)
            if not recipe.exact_decode:
                _draft(image, recipe)
            image.load()  # decode everything now, so damage surfaces here and not later
        except ImageDecodeError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(path, f"image too large ({exc})") from exc
        except UnidentifiedImageError:
            raise ImageDecodeError(path, "not an image (unrecognised format)") from None
        except MemoryError:
            raise ImageDecodeError(path, "out of memory while decoding") from None
        except Exception as exc:  # Pillow raises many types on corrupt data; none may stop a run
            raise ImageDecodeError(path, _damage_reason(exc, kind)) from exc
    return image


@lru_cache(maxsize=1)
def open_formats() -> tuple[str, ...]:
    """The formats Pillow may open for us (every reader except EPS)."""
    Image.init()
    # EPS decoding runs Ghostscript, an external interpreter: untrusted files never reach it.
    return tuple(name for name in Image.OPEN if name != "EPS")


def _check_size(size: tuple[int, int], path: str, recipe: Recipe, max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageDecodeError(
            path,
            f"image too large ({width * height} pixels, decompression bomb limit {max_pixels})",
        )
    new_w, new_h = resized_size(max(width, 1), max(height, 1), recipe)
    # The resize must not allocate more than a decode may: a 1x100000 strip resized to a
    # 256 short side would need 25.6e9 pixels.
    if new_w * new_h > MAX_PIXELS:
        raise ImageDecodeError(
            path, f"extreme aspect ratio ({width}x{height}); resizing needs {new_w * new_h} pixels"
        )


def _draft(image: Image.Image, recipe: Recipe) -> None:
    if image.format not in ("JPEG", "MPO"):  # only libjpeg decodes at 1/2, 1/4 or 1/8 scale
        return
    width, height = image.size
    for scale in (8, 4, 2):
        if min(width, height) // scale >= recipe.decode_short_side:
            # Pillow picks the largest scale s with size // request >= s; asking for size // s
            # yields exactly s, so the short side stays >= twice the resize target.
            image.draft("RGB", (width // scale, height // scale))
            return


def _orient(image: Image.Image) -> Image.Image:
    # Broken EXIF must not cost the image: it is then used as stored.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _damage_reason(exc: Exception, kind: str) -> str:
    message = str(exc)
    if isinstance(exc, EOFError) or "truncated" in message.lower():
        return f"truncated {kind} file"
    if len(message) > 80:
        message = message[:77] + "..."
    return f"corrupt {kind} data ({type(exc).__name__}: {message})"


# --------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Sample:
    """One dataset item: pixels on success, or the reason it failed."""

    index: int
    pixels: torch.Tensor | None
    error: str | None


@dataclass
class Batch:
    """Decoded images stacked in batch order, plus the inputs that failed and why."""

    indices: list[int]
    pixels: torch.Tensor | None  # (B, 3, H, W) float32; None when every input failed
    failures: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        """Pin the pixels in page-locked memory (called by DataLoader(pin_memory=True))."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class ImageDataset(torch.utils.data.Dataset):
    """Preprocessed images by index; a bad file yields a Sample with `error`, never an exception.

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
    ) -> None:
        encoded = [os.fsencode(p) for p in paths]
        # One bytes blob plus offsets instead of a list of str: forked workers that touch list
        # items copy their pages (refcounts), so memory would grow with the number of inputs.
        self._blob = b"".join(encoded)
        self._offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        self.recipe = recipe
        self.max_pixels = max_pixels
        if sizes is not None:
            sizes = np.asarray(sizes, dtype=np.int32)
            if not recipe.keep_aspect or sizes.shape != (len(encoded), 2):
                raise ValueError("sizes must be (N, 2), for a keep-aspect recipe only")
        self.sizes = sizes

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
        path = self.path(index)
        try:
            image = load_image(path, self.recipe, max_pixels=self.max_pixels)
            pixels = preprocess(image, self.recipe, size=self.planned_size(index))
        except ImageDecodeError as exc:
            return Sample(index=index, pixels=None, error=exc.reason)
        return Sample(index=index, pixels=pixels, error=None)


def collate(samples: list[Sample]) -> Batch:
    """Stack successful samples into one tensor; failed ones become (index, reason) pairs."""
    good = [s for s in samples if s.pixels is not None]
    failures = [(s.index, s.error or "unknown error") for s in samples if s.pixels is None]
    pixels = torch.stack([s.pixels for s in good]) if good else None
    return Batch(indices=[s.index for s in good], pixels=pixels, failures=failures)
