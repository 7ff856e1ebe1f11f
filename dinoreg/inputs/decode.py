"""Safe decoding of one image file to RGB: size limits, reduced-size JPEG decoding, EXIF
orientation, and one short reason for every file that cannot be used."""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from functools import lru_cache
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from dinoreg.errors import InputError
from dinoreg.inputs.recipe import Recipe, resized_size, to_rgb

# Pillow refuses outright above 2 * Image.MAX_IMAGE_PIXELS; we fail at the same size, but as a
# clean per-file error instead of a warning followed by an exception.
MAX_PIXELS = 178_956_970


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
        if not os.access(path, os.R_OK | os.X_OK):  # discovery lists folders it could not read
            raise ImageDecodeError(path, "cannot list directory (permission denied)")
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
