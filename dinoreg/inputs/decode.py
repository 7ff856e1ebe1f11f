"""Safe decoding of one image file to RGB: size limits, reduced-size JPEG decoding, EXIF
orientation, and one short reason for every file that cannot be used.

A tar member (`shard.tar/key.jpg`, `tars.py`) goes through the same decoder from a view of its
bytes in the tar, so it fails for the same reasons, in the same words, as the file would."""

from __future__ import annotations

import contextlib
import math
import os
import stat
import struct
import warnings
from functools import lru_cache
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from dinoreg.errors import InputError
from dinoreg.inputs import tars
from dinoreg.inputs.names import is_tar_name
from dinoreg.inputs.recipe import REDUCED_SCALE, Recipe, resized_size, to_rgb

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
    `path` may name a tar member, `shard.tar/key.jpg`.
    """
    member = tars.split_member(path)
    if member is not None:
        try:
            handle = tars.open_member(*member)
        except tars.TarError as exc:
            raise ImageDecodeError(path, exc.reason) from None
        with handle:
            image = _decode(handle, path, recipe, max_pixels)
        return _finish(image, path, recipe)
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
    if is_tar_name(path):
        # Discovery reads a tar by member; one that reaches decoding is unreadable or damaged,
        # and this is where the run learns why (the same words discovery found).
        raise ImageDecodeError(path, tars.tar_problem(path))
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; Pillow reads it lazily
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot open ({exc.strerror or exc})") from None
    with handle:
        image = _decode(handle, path, recipe, max_pixels)
    return _finish(image, path, recipe)


def _finish(image: Image.Image, path: str, recipe: Recipe) -> Image.Image:
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
            if image.format in ("JPEG", "MPO"):
                _check_jpeg_data(handle, path)
            scale = 1 if recipe.exact_decode else _draft(image, recipe)
            image.load()  # decode everything now, so damage surfaces here and not later
            if scale > 1:
                image.info[REDUCED_SCALE] = scale  # `recipe.resize` may then take the fast kernel
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


# Fewest bits one 8x8 block of one component can take, by frame type (SOFn marker). Baseline
# and extended Huffman: a DC code and at least one AC code (an end-of-block), a bit or more
# each. Progressive Huffman: the first DC scan still codes every block. Arithmetic coding has
# no such floor, so those frames are not checked.
_MIN_BLOCK_BITS = {0xC0: 2, 0xC1: 2, 0xC2: 1}
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _check_jpeg_data(handle: BinaryIO, path: str) -> None:
    """Refuse a JPEG whose data is too short for the frame its header claims.

    libjpeg reports missing or garbled scan data only as warnings, which Pillow drops: it fills
    the rest of the frame with grey (or the last block's colour) and the decode "succeeds". A
    file cut short without an end marker already fails in Pillow; this catches the rest of that
    class (a damaged header claiming 12000x12000 over a few KB, data lost mid-file) by counting
    the blocks the header promises against the bytes that could hold them.
    """
    start = handle.tell()
    try:
        layout = _jpeg_layout(handle)
        if layout is None:
            return
        marker, width, height, sampling, data_start = layout
        # The end of the stream, not fstat: a tar member's view ends before its tar does.
        available = handle.seek(0, os.SEEK_END) - data_start
    except (OSError, ValueError, struct.error):
        return  # an unparsable header is Pillow's to judge; this check only ever adds failures
    finally:
        handle.seek(start)
    h_max = max(h for h, _ in sampling)
    v_max = max(v for _, v in sampling)
    blocks = sum(
        math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
        for h, v in sampling
    )
    needed = blocks * _MIN_BLOCK_BITS[marker] // 8
    if available < needed:
        raise ImageDecodeError(
            path,
            f"corrupt JPEG data (header says {width}x{height}, which needs at least "
            f"{needed} bytes of image data; the file holds {max(available, 0)})",
        )


def _jpeg_layout(
    handle: BinaryIO,
) -> tuple[int, int, int, list[tuple[int, int]], int] | None:
    """(SOF marker, width, height, [(h, v) sampling per component], offset of the first scan's
    data) from the markers before the first scan; None when there is nothing to check."""
    handle.seek(0)
    if handle.read(2) != b"\xff\xd8":
        return None
    frame = None
    while True:
        if handle.read(1) != b"\xff":
            return None
        byte = b"\xff"
        while byte == b"\xff":  # fill bytes may pad any marker
            byte = handle.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers with no segment
            continue
        (length,) = struct.unpack(">H", handle.read(2))
        if marker == 0xDA:  # start of scan: the entropy-coded data follows its header
            handle.seek(length - 2, os.SEEK_CUR)
            if frame is None or frame[0] not in _MIN_BLOCK_BITS or not frame[1] or not frame[2]:
                return None  # no frame, arithmetic coding, or a height set later (DNL)
            return (*frame, handle.tell())
        segment = handle.read(length - 2)
        if marker in _SOF_MARKERS and frame is None:
            height, width, count = struct.unpack(">HHB", segment[1:6])
            sampling = [(b >> 4, b & 15) for b in segment[7 : 6 + 3 * count : 3]]
            if len(sampling) != count or not all(h and v for h, v in sampling):
                return None
            frame = (marker, width, height, sampling)


def _draft(image: Image.Image, recipe: Recipe) -> int:
    """Ask libjpeg for the smallest DCT scale that keeps twice the resize target; the scale."""
    if image.format not in ("JPEG", "MPO"):  # only libjpeg decodes at 1/2, 1/4 or 1/8 scale
        return 1
    width, height = image.size
    for scale in (8, 4, 2):
        if min(width, height) // scale >= recipe.decode_short_side:
            # Pillow picks the largest scale s with size // request >= s; asking for size // s
            # yields exactly s, so the short side stays >= twice the resize target.
            image.draft("RGB", (width // scale, height // scale))
            return scale
    return 1


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
