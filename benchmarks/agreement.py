"""How far the fast input routes move the model's input and features from the exact recipe.

    python benchmarks/agreement.py                  # the generated large photos, ViT-S shape
    python benchmarks/agreement.py --images DIR     # your own large JPEGs

Routes, each compared with the exact recipe (full-size decode, Pillow resize and crop: what
transformers' processor computes, bit for bit):

- default: what `embed` does. JPEGs with a short side of at least twice the resize target are
  decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) and then resized in torch's uint8
  kernel;
- reduced decode, Pillow resize: the same decode resized by Pillow (the default before the
  torch kernel), which isolates what the kernel adds.

Pixels are compared in normalised units (one 8-bit level is about 0.0175); features through a
ViT-S/14-shaped model with random weights (seeded; real weights cannot be downloaded where this
runs), fp32: cosine similarity of the CLS token and of each patch token. Writes
`--out`/agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script from a plain clone
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import photos
from benchmarks.common import environment


@dataclass(frozen=True)
class AgreementOptions:
    """What to measure on."""

    out: Path = Path("bench-out")
    images: Path | None = None
    model: str = "small"


@dataclass(frozen=True)
class RouteAgreement:
    """One route against the exact recipe, over the whole photo set."""

    route: str
    pixel_max: float
    pixel_mean: float
    cls_cos_min: float
    patch_cos_min: float
    patch_cos_mean: float


def routes() -> dict[str, Callable[[str], Any]]:
    """Route name -> path -> the (3, 224, 224) float32 input the model sees."""
    from PIL import Image

    from dinoreg.inputs.decode import load_image
    from dinoreg.inputs.recipe import REDUCED_SCALE, Recipe, normalise, preprocess, resize

    recipe, exact = Recipe(), Recipe(exact_decode=True)

    def pillow_resized(path: str) -> Any:
        image: Image.Image = load_image(path, recipe)
        image.info.pop(REDUCED_SCALE, None)  # unmarked: `resize` takes Pillow's kernel
        return normalise(resize(image, recipe), recipe)

    return {
        "exact": lambda p: preprocess(load_image(p, exact), exact),
        "default (reduced decode, torch resize)": lambda p: preprocess(
            load_image(p, recipe), recipe
        ),
        "reduced decode, Pillow resize": pillow_resized,
    }


def measure(opts: AgreementOptions) -> tuple[dict[str, Any], list[RouteAgreement]]:
    import torch

    from dinoreg.model import VARIANTS, RegistersViT

    photo_set = photos.check_folder(opts.images) if opts.images else photos.large_photos(opts.out)
    paths = [str(p) for p in photo_set.paths]
    torch.manual_seed(0)
    model = RegistersViT(VARIANTS[opts.model].config).eval().requires_grad_(False)
    inputs = {name: torch.stack([fn(p) for p in paths]) for name, fn in routes().items()}
    with torch.inference_mode():
        tokens = {name: model.features(x).tokens for name, x in inputs.items()}
    ref_pixels, ref = inputs.pop("exact"), tokens.pop("exact")
    cosine = torch.nn.functional.cosine_similarity
    results = []
    for name, pixels in inputs.items():
        diff = (pixels - ref_pixels).abs()
        got = tokens[name]
        cls = cosine(got.cls, ref.cls, dim=-1)
        patch = cosine(got.patches.flatten(1, 2), ref.patches.flatten(1, 2), dim=-1)
        results.append(
            RouteAgreement(
                name,
                diff.max().item(),
                diff.mean().item(),
                cls.min().item(),
                patch.min().item(),
                patch.mean().item(),
            )
        )
    return photo_set.describe(), results


def markdown(photo_set: dict[str, Any], results: list[RouteAgreement], model: str) -> str:
    rows = [
        "| route | pixel max | pixel mean | CLS cos min | patch cos min | patch cos mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows += [
        f"| {r.route} | {r.pixel_max:.3f} | {r.pixel_mean:.5f} | {r.cls_cos_min:.6f} | "
        f"{r.patch_cos_min:.5f} | {r.patch_cos_mean:.6f} |"
        for r in results
    ]
    return "\n".join(
        [
            "# Input routes against the exact recipe",
            "",
            f"{photo_set['count']} JPEGs, {photo_set['megapixels_min']}-"
            f"{photo_set['megapixels_max']} MP ({photo_set['origin']}); model `{model}` shape, "
            "random weights (seed 0), fp32. Pixels in normalised units (one 8-bit level is "
            "about 0.0175).",
            "",
            *rows,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--images", type=Path, default=None, help="large JPEGs of your own")
    parser.add_argument("--model", default="small", help="model shape (random weights)")
    a = parser.parse_args(argv)
    opts = AgreementOptions(a.out, a.images, a.model)
    photo_set, results = measure(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "environment": environment(),
        "photos": photo_set,
        "model": opts.model,
        "routes": [asdict(r) for r in results],
    }
    (opts.out / "agreement.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(photo_set, results, opts.model)
    (opts.out / "agreement.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
