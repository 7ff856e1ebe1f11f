"""Benchmark photos made from what the repository ships, so a plain clone can run every benchmark.

Two sets, generated deterministically and cached under `bench-out/photos/`:

- `large`: 12 JPEGs of 1.3 to 4.9 MP (the sizes of typical wallpapers and camera exports, two
  of them progressive, quality 90). Each is a shipped photo from `examples/images` upscaled to
  the target size and blended with a second photo, a smooth colour gradient and film-like grain,
  so that the decoder sees photo-like entropy (0.05 to 0.5 bytes per pixel, like real photos),
  not the flat areas of a plain upscale, which decode unrealistically fast.
- `dataset`: ImageNet-sized JPEGs (500x375 or 375x500, quality 90): the large set and the
  shipped photos re-encoded, the size most training and evaluation sets have.
- `square224` (`square_photos`, made only by `embedrate.py`): the same re-encoded at 224x224,
  the model's input size.

`python benchmarks/photos.py [--out bench-out]` makes both and prints where they are.
`check_folder` validates a folder given with `--images` before any measuring starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "images"
# Bump when the synthesis changes: the cache is keyed on it, so stale photos are remade.
VERSION = 1

# (width, height, grain sigma in 8-bit levels, progressive): the pixel counts of a real 1.3-4.9 MP
# wallpaper set; grain spans flat skies (0.05 bytes/pixel) to foliage and sand (0.5 bytes/pixel).
LARGE_SHAPES: tuple[tuple[int, int, float, bool], ...] = (
    (2560, 1600, 1.0, False),
    (1920, 1200, 6.0, False),
    (1680, 1050, 6.0, False),
    (1600, 1203, 1.0, True),
    (2560, 1600, 1.5, False),
    (1280, 1024, 2.5, True),
    (2560, 1600, 2.0, False),
    (1920, 1200, 6.0, False),
    (1920, 1280, 4.0, False),
    (2560, 1600, 3.0, False),
    (2560, 1920, 2.0, False),
    (1600, 2560, 1.5, False),  # one portrait: EXIF-free rotation of the usual case
)
DATASET_SIZE = (500, 375)  # ImageNet's most common size (landscape; portrait sources flip it)
QUALITY = 90


@dataclass(frozen=True)
class PhotoSet:
    """A folder of benchmark JPEGs and where they came from."""

    name: str  # "large", "dataset" or "square224"
    folder: Path
    paths: tuple[Path, ...]
    origin: str  # "generated from examples/images (v1)" or the folder given

    def describe(self) -> dict[str, object]:
        sizes = [Image.open(p).size for p in self.paths]
        mp = [w * h / 1e6 for w, h in sizes]
        nbytes = [p.stat().st_size for p in self.paths]
        return {
            "name": self.name,
            "folder": str(self.folder),
            "origin": self.origin,
            "count": len(self.paths),
            "megapixels_min": round(min(mp), 2),
            "megapixels_max": round(max(mp), 2),
            "megapixels_mean": round(sum(mp) / len(mp), 2),
            "bytes_per_pixel_mean": round(sum(nbytes) / sum(w * h for w, h in sizes), 3),
        }


def sets_line(described: Iterable[dict[str, object]]) -> str:
    """One report line naming the photo sets (`PhotoSet.describe()` of each)."""
    return "Photo sets: " + "; ".join(
        f"`{p['name']}` {p['count']} JPEGs, {p['megapixels_min']}-{p['megapixels_max']} "
        f"MP (mean {p['megapixels_mean']}), {p['bytes_per_pixel_mean']} bytes/pixel, "
        f"{p['origin']}"
        for p in described
    )


def sources() -> list[Path]:
    """The shipped photos (public domain / CC, examples/images/CREDITS.md)."""
    found = sorted(EXAMPLES.glob("*.jpg"))
    if not found:
        raise SystemExit(f"no shipped photos in {EXAMPLES}: is this a complete checkout?")
    return found


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _cover(image: Image.Image, width: int, height: int) -> np.ndarray:
    """The image scaled to cover width x height (bicubic) and centre-cropped, as float32."""
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    big = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return np.asarray(big.crop((left, top, left + width, top + height)), dtype=np.float32)


def synthesise(index: int, width: int, height: int, grain: float) -> Image.Image:
    """One photo-like RGB image, the same for the same arguments on any machine."""
    photos = sources()
    rng = np.random.default_rng(1000 + index)
    base = _cover(_rgb(photos[index % len(photos)]), width, height)
    # A second photo, mirrored, at low weight: edges at other positions and scales than the
    # base's, so that blocks the upscale left smooth still carry some structure.
    other = _rgb(photos[(index + 3) % len(photos)]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mix = 0.75 * base + 0.25 * _cover(other, width, height)
    # A smooth colour gradient (sky, vignette): low frequencies that JPEG codes cheaply.
    y = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :, None]
    tint = rng.uniform(-20, 20, size=(1, 1, 3)).astype(np.float32)
    mix += tint * y + 0.5 * tint[..., ::-1] * x - 12.0 * (x * x + y * y)
    # Grain: what makes a camera photo's file, and its entropy decoding, larger than an upscale.
    mix += rng.normal(0.0, grain, size=(height, width, 1)).astype(np.float32)  # luminance
    mix += rng.normal(0.0, grain / 2, size=(height, width, 3)).astype(np.float32)  # chroma
    return Image.fromarray(np.clip(mix + 0.5, 0, 255).astype(np.uint8), "RGB")


def _cache_ok(folder: Path, manifest: dict[str, object]) -> bool:
    path = folder / "manifest.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return saved == manifest and all((folder / f).is_file() for f in manifest["files"])  # type: ignore[union-attr]


def large_photos(out: Path) -> PhotoSet:
    """The generated 1.3-4.9 MP set under `out/photos/large-v{VERSION}`, made once and cached."""
    folder = out / "photos" / f"large-v{VERSION}"
    names = [f"large{i:02d}-{w}x{h}.jpg" for i, (w, h, _, _) in enumerate(LARGE_SHAPES)]
    manifest = {
        "version": VERSION,
        "shapes": [list(s) for s in LARGE_SHAPES],
        "quality": QUALITY,
        "sources": [p.name for p in sources()],
        "files": names,
    }
    if not _cache_ok(folder, manifest):
        folder.mkdir(parents=True, exist_ok=True)
        for i, ((w, h, grain, progressive), name) in enumerate(
            zip(LARGE_SHAPES, names, strict=True)
        ):
            image = synthesise(i, w, h, grain)
            image.save(folder / name, quality=QUALITY, progressive=progressive, optimize=False)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    origin = f"generated from examples/images (v{VERSION})"
    return PhotoSet("large", folder, tuple(folder / n for n in names), origin)


def dataset_photos(out: Path, large: PhotoSet) -> PhotoSet:
    """ImageNet-size re-encodes (500x375, quality 90) of `large` and of the shipped photos."""
    return _reencoded(out, large, "dataset", "ds", DATASET_SIZE)


def square_photos(out: Path, large: PhotoSet, side: int = 224) -> PhotoSet:
    """`side` x `side` re-encodes (scaled to cover, centre-cropped, quality 90) of `large` and of
    the shipped photos: inputs already at the model's size, where decode and resize cost least."""
    return _reencoded(out, large, f"square{side}", "sq", (side, side))


def _reencoded(
    out: Path, large: PhotoSet, name: str, prefix: str, size: tuple[int, int]
) -> PhotoSet:
    """`large` and the shipped photos scaled to cover `size` (flipped for portrait sources),
    centre-cropped and saved at quality 90 under `out/photos/{name}-v{VERSION}`, made once."""
    inputs = [*large.paths, *sources()]
    # One cache per source folder: the generated set, or a digest of the folder given.
    given = large.folder.resolve() != (out / "photos" / f"large-v{VERSION}").resolve()
    tag = hashlib.sha1(str(large.folder.resolve()).encode()).hexdigest()[:8] if given else ""
    folder = out / "photos" / f"{name}-v{VERSION}{'-' + tag if tag else ''}"
    names = [f"{prefix}{i:02d}-{p.stem}.jpg" for i, p in enumerate(inputs)]
    manifest = {
        "version": VERSION,
        "size": list(size),
        "quality": QUALITY,
        "inputs": [str(p) for p in inputs],
        "files": names,
    }
    if not _cache_ok(folder, manifest):
        folder.mkdir(parents=True, exist_ok=True)
        for src, file in zip(inputs, names, strict=True):
            image = _rgb(src)
            w, h = size if image.width >= image.height else size[::-1]
            small = Image.fromarray(_cover(image, w, h).astype(np.uint8), "RGB")
            small.save(folder / file, quality=QUALITY)
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    origin = f"{size[0]}x{size[1]} of {large.name}"
    return PhotoSet(name, folder, tuple(folder / n for n in names), origin)


def jpegs(folder: Path) -> list[Path]:
    """The JPEG files of a folder (.jpg or .jpeg, any case), sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


def check_folder(folder: Path, *, min_count: int = 1) -> PhotoSet:
    """A folder passed with `--images`, checked in well under a second (headers only), so that a
    wrong path fails before minutes of measuring instead of after them."""
    if not folder.is_dir():
        raise SystemExit(f"--images {folder}: not a directory")
    paths = jpegs(folder)
    if len(paths) < min_count:
        raise SystemExit(f"--images {folder}: {len(paths)} JPEG files, need at least {min_count}")
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                if im.format != "JPEG":
                    bad.append(f"{p.name} ({im.format})")
        except (OSError, ValueError) as exc:
            bad.append(f"{p.name} ({exc})")
    if bad:
        raise SystemExit(f"--images {folder}: not readable as JPEG: {', '.join(bad[:5])}")
    return PhotoSet("large", folder, tuple(paths), str(folder.resolve()))


def photo_sets(out: Path, images: Path | None) -> tuple[PhotoSet, PhotoSet]:
    """(large, dataset): `images` if given (checked), else the generated set; dataset from it."""
    large = check_folder(images) if images is not None else large_photos(out)
    return large, dataset_photos(out, large)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--images", type=Path, default=None, help="large JPEGs to use instead")
    args = p.parse_args(argv)
    for s in photo_sets(args.out, args.images):
        print(json.dumps(s.describe()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
