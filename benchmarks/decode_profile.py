"""Section 5 of `pipeline.py`: where the ms of decode + preprocess go on the large photos, and
measured alternatives (smaller draft, reducing_gap, one-pass resize-and-crop, Pillow against
torch resize, copies), each compared with the exact decode."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from benchmarks import photos
from benchmarks.pipeline_common import PipelineOptions, Report, interleaved_cost


def _profile_image(path: str, recipe: Any) -> dict[str, Callable[[], object]]:
    """Callables for each sub-step of load_image + preprocess on one file (inputs precomputed)."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from dinoreg.inputs.decode import _draft
    from dinoreg.inputs.normalise import normalise_table
    from dinoreg.inputs.recipe import REDUCED_SCALE, resize, resized_size, to_rgb

    def opened() -> Image.Image:
        return Image.open(path)

    def drafted() -> Image.Image:
        im = Image.open(path)
        _draft(im, recipe)
        return im

    loaded = drafted()
    loaded.load()
    reduced = loaded.copy()
    reduced.info[REDUCED_SCALE] = 2  # what load_image marks: recipe.resize takes torch's kernel
    w, h = resized_size(*loaded.size, recipe)
    big = loaded.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - 224) // 2, (h - 224) // 2
    crop = big.crop((left, top, left + 224, top + 224))
    arr = np.asarray(crop)
    table = normalise_table(recipe.mean, recipe.std)
    out = np.empty((3, 224, 224), np.float32)

    def lut() -> None:
        for c in range(3):
            np.take(table[c], arr[:, :, c], out=out[c], mode="clip")

    return {
        "open + header": opened,
        "draft (choose DCT scale)": lambda: _draft(opened(), recipe),
        "decode at draft scale": lambda: drafted().load(),
        "exif_transpose": lambda: ImageOps.exif_transpose(loaded, in_place=True),
        "to_rgb": lambda: to_rgb(loaded),
        "resize (Pillow bicubic to 256 short side)": lambda: loaded.resize(
            (w, h), Image.Resampling.BICUBIC
        ),
        "resize + crop (torch uint8 kernel, reduced-size decodes)": lambda: resize(reduced, recipe),
        "crop 224": lambda: big.crop((left, top, left + 224, top + 224)).load(),
        "np.asarray (PIL -> numpy copy)": lambda: np.asarray(crop),
        "normalise lookup (3 np.take)": lut,
        "torch.from_numpy": lambda: torch.from_numpy(out),
    }


DEFAULT_ROUTE = "library default (draft >= 2x256, torch resize + crop)"


def pillow_resize(image: Any, recipe: Any) -> Any:
    """The library's resize with the torch kernel turned off: Pillow resize, then crop."""
    from dinoreg.inputs.recipe import REDUCED_SCALE, resize

    plain = image.copy()
    plain.info.pop(REDUCED_SCALE, None)
    return resize(plain, recipe)


def one_pass(image: Any, recipe: Any, reducing_gap: float | None = None) -> Any:
    """Resize and crop in one resample: only the 224x224 output is computed, from the source box
    that the library's resize-then-crop maps onto it (same filter, same geometry)."""
    from PIL import Image

    from dinoreg.inputs.recipe import resized_size

    w, h = resized_size(*image.size, recipe)
    sx, sy = image.width / w, image.height / h
    left, top = (w - recipe.image_size) // 2, (h - recipe.image_size) // 2
    box = (left * sx, top * sy, (left + recipe.image_size) * sx, (top + recipe.image_size) * sy)
    size = (recipe.image_size, recipe.image_size)
    return image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=reducing_gap)


def run_profile(large: photos.PhotoSet, opts: PipelineOptions, report: Report) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from dinoreg.inputs.decode import load_image
    from dinoreg.inputs.recipe import Recipe, resize, resized_size

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    recipe, exact = Recipe(), Recipe(exact_decode=True)
    files = [str(p) for p in large.paths][: 4 if opts.quick else None]
    reps = 2 if opts.quick else opts.reps + 2
    # (a) where the ms go: each sub-step over all files
    profiles = [_profile_image(f, recipe) for f in files]
    step_costs = interleaved_cost(
        {s: ((lambda s=s: [p[s]() for p in profiles]), len(files)) for s in profiles[0]}, reps
    )
    per_step = {k: asdict(c) for k, c in step_costs.items()}
    print(f"[pipeline] profile: {per_step}", file=sys.stderr, flush=True)

    # (b) alternatives, each against the exact decode (full resolution, what transformers does)
    def draft_to(path: str, short: int) -> Image.Image:
        """Open with the largest DCT scale whose short side stays >= `short`."""
        im = Image.open(path)
        w, h = im.size
        for scale in (8, 4, 2):
            if min(w, h) // scale >= short:
                im.draft("RGB", (w // scale, h // scale))
                break
        im.load()
        return im.convert("RGB")

    variants: dict[str, Callable[[str], Image.Image]] = {
        DEFAULT_ROUTE: lambda f: resize(load_image(f, recipe), recipe),
        "default draft, Pillow resize + crop (before)": lambda f: pillow_resize(
            load_image(f, recipe), recipe
        ),
        "exact decode (full size, resize, crop)": lambda f: resize(load_image(f, exact), exact),
        "draft >= 256 (one DCT scale further)": lambda f: resize(draft_to(f, 256), recipe),
        "default draft, reducing_gap=2.0": lambda f: _resize_gap(
            load_image(f, recipe), recipe, 2.0
        ),
        "exact decode, reducing_gap=2.0": lambda f: _resize_gap(load_image(f, exact), exact, 2.0),
        "exact decode, one-pass resize+crop": lambda f: one_pass(load_image(f, exact), exact),
        "default draft, one-pass resize+crop (box=)": lambda f: one_pass(
            load_image(f, recipe), recipe
        ),
        "draft >= 256, one-pass resize+crop": lambda f: one_pass(draft_to(f, 256), recipe),
        "draft >= 256, reducing_gap=2.0, one-pass": lambda f: one_pass(
            draft_to(f, 256), recipe, 2.0
        ),
    }
    reference = {
        f: np.asarray(variants["exact decode (full size, resize, crop)"](f)) for f in files
    }
    default = {f: np.asarray(variants[DEFAULT_ROUTE](f)) for f in files}
    costs = interleaved_cost(
        {
            name: ((lambda fn=fn: [fn(f) for f in files]), len(files))
            for name, fn in variants.items()
        },
        reps,
    )
    alternatives: dict[str, Any] = {}
    for name, fn in variants.items():
        diffs = [
            np.abs(np.asarray(fn(f)).astype(np.int16) - reference[f].astype(np.int16))
            for f in files
        ]
        vs_default = [
            np.abs(np.asarray(fn(f)).astype(np.int16) - default[f].astype(np.int16)) for f in files
        ]
        alternatives[name] = {
            "ms_per_image": asdict(costs[name]),
            "mean_abs_vs_exact": float(np.mean([d.mean() for d in diffs])),
            "p99_abs_vs_exact": float(np.mean([np.percentile(d, 99) for d in diffs])),
            "max_abs_vs_exact": int(max(d.max() for d in diffs)),
            "mean_abs_vs_default": float(np.mean([d.mean() for d in vs_default])),
        }
    # (c) copies: PIL -> numpy, and the normalise itself
    crops = [resize(load_image(f, recipe), recipe) for f in files]
    copies = {
        "np.asarray(image)": lambda: [np.asarray(c) for c in crops],
        "np.frombuffer(image.tobytes())": lambda: [
            np.frombuffer(c.tobytes(), np.uint8).reshape(224, 224, 3) for c in crops
        ],
        "recipe.normalise (asarray + lookup)": lambda: [_normalise(c, recipe) for c in crops],
        "torch arithmetic on uint8 (no table)": lambda: [
            _torch_normalise(c, recipe) for c in crops
        ],
    }
    copy_ms = {
        k: asdict(c)
        for k, c in interleaved_cost(
            {k: (f, len(files)) for k, f in copies.items()}, reps * 10
        ).items()
    }
    torch.set_num_threads(threads)
    sizes = [resized_size(*Image.open(f).size, recipe) for f in files]
    report.sections["profile"] = {
        "steps_ms_per_image": per_step,
        "alternatives": alternatives,
        "copies_ms_per_image": copy_ms,
        "resized_pixels_mean": float(np.mean([w * h for w, h in sizes])),
    }
    rows = ["| step (default recipe) | CPU ms/image | wall ms/image |", "| --- | ---: | ---: |"]
    rows += [f"| {k} | {v['cpu']:.3f} | {v['wall']:.3f} |" for k, v in per_step.items()]
    alt = [
        "| route | CPU ms/image | wall ms/image | CPU vs default "
        "| mean abs diff to exact (8-bit levels) | p99 | max | mean abs diff to default |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = alternatives[DEFAULT_ROUTE]["ms_per_image"]["cpu"]
    for name, a in alternatives.items():
        t = a["ms_per_image"]
        alt.append(
            f"| {name} | {t['cpu']:.2f} | {t['wall']:.2f} | {t['cpu'] / base:.2f}x | "
            f"{a['mean_abs_vs_exact']:.3f} | {a['p99_abs_vs_exact']:.1f} | "
            f"{a['max_abs_vs_exact']} | {a['mean_abs_vs_default']:.3f} |"
        )
    cp = ["| PIL -> tensor (224x224) | CPU ms/image | wall ms/image |", "| --- | ---: | ---: |"]
    cp += [f"| {k} | {v['cpu']:.3f} | {v['wall']:.3f} |" for k, v in copy_ms.items()]
    report.markdown["profile"] = "\n".join(
        [
            f"## Profile: decode + preprocess on the `{large.name}` set (one core)",
            "",
            *rows,
            "",
            "Each sub-step timed alone over the set (so the sum differs a little from the "
            "stage totals); the default recipe drafts JPEGs to the largest DCT scale whose short "
            "side stays >= 512.",
            "",
            "### Alternatives, timed interleaved, output (224x224 uint8, before normalising) "
            "compared with the exact decode",
            "",
            *alt,
            "",
            *cp,
        ]
    )


def _resize_gap(image: Any, recipe: Any, gap: float) -> Any:
    from PIL import Image

    from dinoreg.inputs.recipe import resized_size

    w, h = resized_size(*image.size, recipe)
    big = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=gap)
    left, top = (w - recipe.image_size) // 2, (h - recipe.image_size) // 2
    return big.crop((left, top, left + recipe.image_size, top + recipe.image_size))


def _normalise(image: Any, recipe: Any) -> Any:
    from dinoreg.inputs.recipe import normalise

    return normalise(image, recipe)


def _torch_normalise(image: Any, recipe: Any) -> Any:
    import numpy as np
    import torch

    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(recipe.mean).view(3, 1, 1)
    std = torch.tensor(recipe.std).view(3, 1, 1)
    return x.sub_(mean).div_(std)
