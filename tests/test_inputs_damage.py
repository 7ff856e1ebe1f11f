"""Damaged files that a lenient decoder would turn into distorted rows: each must fail instead."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoreg.inputs.buckets import header_size, plan
from dinoreg.inputs.dataset import ImageDataset
from dinoreg.inputs.decode import ImageDecodeError, load_image
from dinoreg.inputs.recipe import Recipe


def _jpeg(size: tuple[int, int], **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def claims_12000(body: bytes | None = None) -> bytes:
    """A valid 64x48 JPEG whose frame header is patched to say 12000x12000, then `body` (the
    small image's own scan data when None) and an end-of-image marker."""
    data = _jpeg((64, 48), quality=90)
    patched = bytearray(data)
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", patched, sof + 5, 12000, 12000)
    sos = data.index(b"\xff\xda")
    scan_start = sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]
    if body is None:
        return bytes(patched)
    return bytes(patched[:scan_start]) + body + b"\xff\xd9"


@pytest.mark.parametrize(
    "body", [None, b"\0" * 5000, bytes(range(0, 250)) * 40], ids=["own-scan", "zeros", "garbage"]
)
@pytest.mark.parametrize("exact", [False, True], ids=["draft", "exact"])
def test_jpeg_header_claiming_more_than_its_data_fails(
    tmp_path: Path, body: bytes | None, exact: bool
) -> None:
    path = tmp_path / "claims.jpg"
    path.write_bytes(claims_12000(body))
    with pytest.raises(ImageDecodeError, match="corrupt JPEG data") as info:
        load_image(str(path), Recipe(exact_decode=exact))
    assert "12000x12000" in info.value.reason
    assert ImageDataset([str(path)], Recipe())[0].pixels is None


@pytest.mark.parametrize("progressive", [False, True])
def test_flat_large_jpegs_with_tiny_data_still_decode(tmp_path: Path, progressive: bool) -> None:
    # The least data a valid file can have: one colour, optimised tables, lowest quality.
    path = tmp_path / "flat.jpg"
    data = _jpeg((3000, 2000), quality=1, optimize=True, progressive=progressive)
    path.write_bytes(data)
    assert load_image(str(path), Recipe()).size == (1500, 1000)  # drafted at 1/2
    assert load_image(str(path), Recipe(exact_decode=True)).size == (3000, 2000)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_late_exif(width: int, height: int, orientation: int) -> bytes:
    """A PNG whose eXIf chunk (EXIF orientation) comes after the image data."""
    buf = io.BytesIO()
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    Image.fromarray(arr).save(buf, "PNG")
    data = buf.getvalue()
    iend = data.rindex(b"IEND") - 4
    exif = Image.Exif()
    exif[0x0112] = orientation
    raw = exif.tobytes()[len(b"Exif\x00\x00") :]
    return data[:iend] + _png_chunk(b"eXIf", raw) + data[iend:]


def test_png_exif_after_the_image_data_is_planned_as_displayed(tmp_path: Path) -> None:
    path = tmp_path / "late-exif.png"
    path.write_bytes(png_with_late_exif(120, 40, orientation=6))  # displayed 40 wide, 120 high
    assert load_image(str(path), Recipe()).size == (40, 120)
    assert header_size(str(path)) == (40, 120)
    recipe = Recipe.for_size(28, keep_aspect=True)
    p = plan([str(path)], recipe)
    pixels = ImageDataset([str(path)], recipe, sizes=p.sizes)[0].pixels
    assert pixels is not None and tuple(pixels.shape) == (56, 14, 3)  # tall, as displayed


def test_decode_that_disagrees_with_its_plan_fails_rather_than_squashing(tmp_path: Path) -> None:
    path = tmp_path / "turned.png"
    Image.new("RGB", (120, 40), "red").save(path)
    recipe = Recipe.for_size(28, keep_aspect=True)
    wrong = np.array([[28, 84]], np.int32)  # a plan for the image turned a quarter
    sample = ImageDataset([str(path)], recipe, sizes=wrong)[0]
    assert sample.pixels is None and "planned" in sample.error
    right = ImageDataset([str(path)], recipe, sizes=np.array([[84, 28]], np.int32))[0]
    assert isinstance(right.pixels, torch.Tensor) and tuple(right.pixels.shape) == (28, 84, 3)
