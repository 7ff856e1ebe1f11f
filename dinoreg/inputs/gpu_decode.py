"""JPEG decoding where the model runs (`ComputeOptions.decode`): workers read the bytes, the
batch loop decodes, orients, resizes and crops them on the device.

Worker side, `read_encoded`: the file's bytes plus what the device needs to finish the image
(stored size, EXIF orientation, target size). Anything it is not sure the device decodes the
way Pillow would (not a JPEG, CMYK, progressive or arithmetic-coded, 12-bit, damaged, oversized,
an unreadable EXIF block) returns None, and the worker decodes that file on the CPU as always,
so every failure keeps the reference path's words.

Device side, `finish_encoded`: one batched decode (`torchvision.io.decode_jpeg`), one image at
a time if the batch call fails, then orientation, resize and crop as `recipe.resize` does them.
An image the decoder still refuses comes back as None; the batch loop decodes it on the CPU.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from dinoreg.errors import UsageError
from dinoreg.inputs import tars
from dinoreg.inputs.decode import _check_jpeg_data, _check_size, _jpeg_layout
from dinoreg.inputs.recipe import TENSOR_INTERPOLATIONS, Recipe, crop_box, resized_size

DECODES = ("auto", "cpu", "gpu")
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
# Baseline and extended sequential Huffman frames: what nvJPEG and libjpeg-turbo both decode.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1})
_ORIENTATION = 0x0112
_INSTALL = "pip install 'dinoreg[gpu]'"

# Decodes a list of 1-D uint8 byte tensors to (3, H, W) uint8 RGB tensors on `device`.
TensorDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


@dataclass(frozen=True)
class Encoded:
    """One JPEG handed over undecoded; `target` is the (W, H) its oriented image resizes to."""

    index: int
    # bytearray, not bytes: torch.frombuffer wants a writable buffer
    data: bytearray = field(repr=False)
    size: tuple[int, int]  # (W, H) as stored, before orientation
    orientation: int  # EXIF orientation, 1 (as stored) to 8
    target: tuple[int, int]


def check_decode(decode: str, device: str) -> None:
    """Refuse a `decode` that cannot work here, before anything runs (`ComputeOptions`)."""
    if decode not in DECODES:
        raise UsageError(f"Unknown decode {decode!r}; use auto, cpu or gpu.", params=("decode",))
    if decode != "gpu":
        return
    if device.split(":")[0] in ("cpu", "mps"):
        raise UsageError(
            f"decode='gpu' needs CUDA, but device is {device!r}; use decode='auto' or "
            "decode='cpu'.",
            params=("decode", "device"),
        )
    if not torch.cuda.is_available():
        raise UsageError(
            "decode='gpu' needs CUDA, but no CUDA GPU is visible; use decode='auto' or "
            "decode='cpu'.",
            params=("decode",),
        )
    if importlib.util.find_spec("torchvision") is None:
        raise UsageError(
            f"decode='gpu' needs torchvision, which is not installed; {_INSTALL}.",
            params=("decode",),
        )


def choose_decoder(
    decode: str, device: torch.device, recipe: Recipe, paths: Sequence[str]
) -> TensorDecoder | None:
    """The device decoder a run uses, or None for the CPU path.

    `auto` decodes on the device only on CUDA, with torchvision importable, an interpolation
    torch reproduces, and mostly JPEG-named inputs (a folder of PNGs would only pay the check).
    """
    if decode == "cpu":
        return None
    if decode == "gpu":
        if device.type != "cuda":
            raise UsageError(
                f"decode='gpu' needs CUDA, but the model runs on {device}; use decode='auto'.",
                params=("decode", "device"),
            )
        if recipe.interpolation not in TENSOR_INTERPOLATIONS:
            raise UsageError(
                f"decode='gpu' resizes with bicubic or bilinear only, not "
                f"{recipe.interpolation!r}; use decode='cpu'.",
                params=("decode", "interpolation"),
            )
        problem = _torchvision_problem()
        if problem:
            raise UsageError(
                f"decode='gpu' cannot load torchvision ({problem}); {_INSTALL}.",
                params=("decode",),
            )
        return decode_jpegs
    if device.type != "cuda" or recipe.interpolation not in TENSOR_INTERPOLATIONS:
        return None
    jpegs = sum(1 for p in paths if p.lower().endswith(JPEG_SUFFIXES))
    if 2 * jpegs < len(paths) or _torchvision_problem():
        return None
    return decode_jpegs


def _torchvision_problem() -> str | None:
    """Why `torchvision.io.decode_jpeg` cannot be used, or None. A torchvision built for another
    torch (a CUDA wheel beside a CPU torch) fails on import with RuntimeError, not ImportError."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched JPEG decode (nvJPEG on CUDA, libjpeg-turbo on CPU) to RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, device=device, mode=ImageReadMode.RGB)


def read_encoded(
    path: str,
    index: int,
    recipe: Recipe,
    max_pixels: int,
    planned: tuple[int, int] | None = None,
) -> Encoded | None:
    """The JPEG at `path` undecoded, for the device to finish; None when the CPU path must
    decode it (see the module doc). Never raises for a bad file: the CPU path words that."""
    try:
        data = _read(path)
    except (OSError, tars.TarError):
        return None
    if data is None or not _ends_complete(data):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=("JPEG",))
            # MPO, CMYK and YCCK, 12-bit samples: not what the device decoder promises.
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if getattr(image, "bits", 8) != 8:
                return None
            layout = _jpeg_layout(io.BytesIO(data))
            if layout is None or layout[0] not in _DEVICE_FRAMES:
                return None  # progressive, arithmetic, lossless, or a header we cannot read
            _check_size(image.size, path, recipe, max_pixels)
            _check_jpeg_data(io.BytesIO(data), path)
            orientation = int(image.getexif().get(_ORIENTATION, 1))
    except Exception:
        return None
    orientation = orientation if 2 <= orientation <= 8 else 1  # as exif_transpose ignores others
    width, height = image.size
    oriented = (height, width) if orientation >= 5 else (width, height)
    if planned is not None:
        from dinoreg.inputs.dataset import fits_plan  # dataset imports this module

        if not fits_plan(oriented, planned):
            return None  # the CPU path words the mismatch
        target = planned
    else:
        target = resized_size(*oriented, recipe)
    return Encoded(index, data, (width, height), orientation, target)


def _read(path: str) -> bytearray | None:
    """The bytes of a file or tar member that starts like a JPEG, else None."""
    member = tars.split_member(path)
    with tars.open_member(*member) if member else open(path, "rb") as handle:
        if handle.read(3) != b"\xff\xd8\xff":
            return None  # read no further: the CPU path reads this file anyway
        handle.seek(0)
        return bytearray(handle.read())


def _ends_complete(data: bytearray) -> bool:
    """Whether an end-of-image marker closes the data (trailing padding allowed). Pillow
    refuses a file cut short; a device decoder may fill the rest in grey, so those go to the
    CPU path."""
    return b"\xff\xd9" in data[-4096:].rstrip(b"\x00\r\n\t ")[-2:]


def finish_encoded(
    items: Sequence[Encoded], device: torch.device, recipe: Recipe, decoder: TensorDecoder
) -> list[torch.Tensor | None]:
    """(H, W, 3) uint8 crops on `device`, as the CPU path makes them, in `items` order; None
    for an image the decoder refused or decoded to another size (decode it on the CPU)."""
    data = [torch.frombuffer(item.data, dtype=torch.uint8) for item in items]
    try:
        images: list[torch.Tensor | None] = list(decoder(data, device))
        if len(images) != len(data):
            raise RuntimeError("decoder returned another number of images")
    except Exception:
        # One bad file fails the whole batched call; retry one by one so it costs only itself.
        images = [_decode_one(decoder, d, device) for d in data]
    out: list[torch.Tensor | None] = []
    for item, image in zip(items, images, strict=True):
        stored = (item.size[1], item.size[0])
        if image is None or image.dim() != 3 or tuple(image.shape) != (3, *stored):
            out.append(None)
            continue
        image = orient(image, item.orientation)
        out.append(crop(resize_tensor(image, item.target, recipe), recipe))
    return out


def _decode_one(decoder: TensorDecoder, data: torch.Tensor, device: torch.device):
    try:
        return decoder([data], device)[0]
    except Exception:
        return None


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) turned as Pillow's `exif_transpose` turns an image of this EXIF orientation."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return image.flip(-1)
    if orientation == 3:  # ROTATE_180
        return image.flip(-2, -1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return image.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270 (Pillow's angles are counter-clockwise)
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:  # TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # ROTATE_90
        return image.rot90(1, dims=(-2, -1))
    return image


def resize_tensor(image: torch.Tensor, size: tuple[int, int], recipe: Recipe) -> torch.Tensor:
    """(3, H, W) uint8 resized to (W, H) `size` with the recipe's antialiased filter."""
    width, height = size
    if tuple(image.shape[-2:]) == (height, width):
        return image
    mode = TENSOR_INTERPOLATIONS[recipe.interpolation]
    pixels = image[None].float()
    pixels = F.interpolate(
        pixels, size=(height, width), mode=mode, antialias=True, align_corners=False
    )
    # Pillow rounds each result to the nearest level and clips; do the same.
    return pixels[0].round_().clamp_(0, 255).to(torch.uint8)


def crop(image: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """(3, H, W) -> the recipe's centre crop as (H, W, 3), where `recipe.resize` puts it."""
    height, width = image.shape[-2:]
    left, top, right, bottom = crop_box(width, height, recipe)
    return image[:, top:bottom, left:right].permute(1, 2, 0).contiguous()
