"""Which names count as images and as tar shards: one suffix list for files and tar members."""

from __future__ import annotations

import os

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
TAR_SUFFIX = ".tar"


def is_image_name(path: str) -> bool:
    """Whether `path` ends in an image suffix, in any case."""
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def is_tar_name(path: str) -> bool:
    """Whether `path` ends in `.tar`, in any case (compressed tars cannot be read by member)."""
    return path.lower().endswith(TAR_SUFFIX)
