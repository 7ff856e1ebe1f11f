"""Pictures of search results and near-duplicate groups: thumbnails in rows, labelled."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinoreg.inputs.decode import ImageDecodeError, load_image
from dinoreg.inputs.recipe import Recipe
from dinoreg.viz.draw import SHEET_BACKGROUND, SHEET_LABEL, SHEET_PAD, SHEET_TEXT, write_png

THUMB = 160  # px, the long side of each thumbnail
_DECODE = Recipe(image_size=224, resize=2 * THUMB)  # reduced-size JPEG decoding is plenty here


def thumbnail(path: str) -> np.ndarray:
    """A THUMB x THUMB RGB tile: the image fitted inside, grey where it cannot be read."""
    tile = Image.new("RGB", (THUMB, THUMB), (128, 128, 128))
    try:
        image = load_image(path, _DECODE)
    except ImageDecodeError:
        return np.asarray(tile)
    image.thumbnail((THUMB, THUMB))
    tile.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
    return np.asarray(tile)


def rows_sheet(rows: Sequence[Sequence[tuple[str, str]]]) -> Image.Image:
    """One row of labelled thumbnails per entry of `rows`, each a list of (label, image path)."""
    columns = max(len(r) for r in rows)
    cell_w, cell_h = THUMB + SHEET_PAD, THUMB + SHEET_LABEL + SHEET_PAD
    sheet = Image.new(
        "RGB", (columns * cell_w + SHEET_PAD, len(rows) * cell_h + SHEET_PAD), SHEET_BACKGROUND
    )
    for r, row in enumerate(rows):
        for c, (label, path) in enumerate(row):
            x, y = SHEET_PAD + c * cell_w, SHEET_PAD + r * cell_h
            band = Image.new("RGB", (THUMB, SHEET_LABEL), SHEET_BACKGROUND)
            ImageDraw.Draw(band).text((2, 2), label, fill=SHEET_TEXT)
            sheet.paste(band, (x, y))
            sheet.paste(Image.fromarray(thumbnail(path)), (x, y + SHEET_LABEL))
    return sheet


def search_sheet(results: Sequence[tuple[str, Sequence]], out: Path) -> Path:
    """Each query (its image when it is one) beside its neighbours and their scores."""
    rows = []
    for label, hits in results:
        query = [("query", label if not label.startswith("row ") else hits[0].path)]
        rows.append(query + [(f"#{i + 1} {h.score:.4f}", h.path) for i, h in enumerate(hits)])
    return write_png(Path(out), rows_sheet(rows))


def group_sheets(groups: Sequence, out_dir: Path) -> list[Path]:
    """One picture per near-duplicate group, `group-0001.png` for the largest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for g, group in enumerate(groups, start=1):
        row = [(f"{m.score:.4f}", m.path) for m in group.members[:12]]
        written.append(write_png(out_dir / f"group-{g:04d}.png", rows_sheet([row])))
    return written
