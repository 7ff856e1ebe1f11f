"""The batch loop: exact batch sizes whatever the workers, failures and keep-aspect grids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from dinoreg.batches import run_batches
from dinoreg.inputs.recipe import Recipe
from dinoreg.runtime import ComputeOptions

CPU = torch.device("cpu")


def _inputs(tmp_path: Path, count: int, tall_every: int = 0) -> list[str]:
    """`count` small PNGs in input order; every 5th an empty (failing) file, some tall."""
    paths = []
    for i in range(count):
        path = tmp_path / f"{i:03d}.png"
        if i % 5 == 3:
            path.write_bytes(b"")  # fails in decode, still one of its batch's inputs
        else:
            tall = tall_every and i % tall_every == 0
            Image.new("RGB", (30, 60 if tall else 30), (i, 50, 90)).save(path)
        paths.append(str(path))
    return paths


def _run(paths: list[str], recipe: Recipe, batch_size: int, workers: int):
    seen: list[int] = []  # images the model saw, per call

    def compute(pixels: torch.Tensor) -> int:
        seen.append(len(pixels))
        return len(pixels)

    options = ComputeOptions(batch_size=batch_size, workers=workers)
    results = list(run_batches(paths, recipe, options, compute, CPU))
    return results, seen


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 7, 8, 16])
def test_fixed_size_batches_are_exact(tmp_path: Path, batch_size: int, workers: int) -> None:
    count = 23  # divisible by none of the batch sizes above but 1
    paths = _inputs(tmp_path, count)
    results, seen = _run(paths, Recipe.for_size(28), batch_size, workers)
    # A batch is `batch_size` inputs in input order; failures count but give no row.
    sizes = [len(r.paths) + len(r.failures) for r in results]
    full, rest = divmod(count, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest else [])
    assert all(n <= batch_size for n in seen)
    assert seen == [len(r.paths) for r in results if r.paths]
    flat = [p for r in results for p in sorted([*r.paths, *(f for f, _ in r.failures)])]
    assert flat == paths  # every input once, batches in input order
    assert sum(len(r.failures) for r in results) == sum(1 for i in range(count) if i % 5 == 3)


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("batch_size", [1, 7, 8])
def test_keep_aspect_batches_are_exact_per_grid(
    tmp_path: Path, batch_size: int, workers: int
) -> None:
    paths = _inputs(tmp_path, 31, tall_every=3)
    recipe = Recipe.for_size(28, keep_aspect=True)
    results, seen = _run(paths, recipe, batch_size, workers)
    assert all(n <= batch_size for n in seen)
    sizes = [len(r.paths) + len(r.failures) for r in results]
    # Empty files have no header: they come last, one per batch.
    unsized = sum(1 for i in range(31) if i % 5 == 3)
    assert sizes[len(sizes) - unsized :] == [1] * unsized
    grids = {
        "tall": [i for i in range(31) if i % 5 != 3 and i % 3 == 0],
        "square": [i for i in range(31) if i % 5 != 3 and i % 3 != 0],
    }
    expected = []
    for members in grids.values():
        full, rest = divmod(len(members), batch_size)
        expected.append([batch_size] * full + ([rest] if rest else []))
    head = sizes[: len(sizes) - unsized]
    assert head in (expected[0] + expected[1], expected[1] + expected[0])
