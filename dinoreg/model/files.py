"""Reading checkpoint files: safetensors or `.pth` (weights only), their hash, and what a file
that is not a checkpoint actually is (for the error message)."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch

from dinoreg.errors import WeightsError
from dinoreg.model import layouts

# leading bytes of files people pass by mistake; none of them can hold a checkpoint
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
)


def describe_file(path: Path) -> str | None:
    """What a file that failed to load as weights really is ("a JPEG image", "a zip archive",
    "a text file"), from its first bytes; None when it looks like none of the usual suspects."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "an HEIF/AVIF image"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"  # torch's own format is a zip too; the caller tells them apart
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not just a character cut at the 4 KiB boundary
                return None
        return "a text file"
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one weight file; pickles only through torch.load(weights_only=True)."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(f"Weight file {path} {what}; check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = describe_file(path)
        if kind == "a zip archive" and isinstance(exc, pickle.UnpicklingError):
            kind = None  # torch's zip format, refused by weights_only below
        if kind is not None:
            raise WeightsError(
                f"{path} is {kind}, not a checkpoint; give a .safetensors or .pth weight file, "
                "a model directory or a model name as the model."
            ) from None
        if isinstance(exc, pickle.UnpicklingError):
            raise WeightsError(
                f"{path} holds pickled Python objects, which dinoreg refuses to load for "
                "safety; save its state_dict (tensors only) or convert it to .safetensors."
            ) from None
        raise WeightsError(
            f"{path} could not be read as a weight file ({short_error(exc)}); it may be corrupt or "
            "incomplete, so download it again."
        ) from None
    try:
        return layouts.unwrap(obj)
    except TypeError as exc:
        raise WeightsError(f"{path} is not a state dict ({exc}); give a weight file.") from None


def file_sha256(path: Path) -> str:
    """sha256 of a file; free for HF-cache blobs, which are named by it."""
    real = path.resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text[:160]
