"""Rows from the device to the host: the store-dtype cast where the model ran, and its count of
values pushed past float16's range, equal to what the writer's numpy cast gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES

from dinoreg import embed, inspect_output, read
from dinoreg.embedding.transfer import to_host

EDGES = [1.0, -2.5, 65504.0, 65519.0, 65520.0, -7e4, 1e6, np.inf, -np.inf, np.nan, 1e-8, 6.1e-5]


def test_float16_cast_equals_numpy_bit_for_bit_and_counts_only_new_overflows() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [np.array(EDGES, np.float32), rng.normal(0, 3e4, 500).astype(np.float32)]
    )
    tokens = {"cls": torch.from_numpy(values.reshape(-1, 4)), "x": torch.ones(2, 3)}
    arrays, made = to_host(tokens, "float16").result()
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    assert arrays["cls"].dtype == np.float16
    assert np.array_equal(arrays["cls"].reshape(-1).view(np.uint16), want.view(np.uint16))
    newly = np.count_nonzero(~np.isfinite(want)) - np.count_nonzero(~np.isfinite(values))
    assert made == newly > 3  # 65520, -7e4, 1e6 and the large normals; not inf or nan given
    assert np.array_equal(arrays["x"], np.ones((2, 3), np.float16))


def test_float32_rows_are_the_model_outputs_and_ragged_rows_split() -> None:
    patches = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    grids = np.array([[2, 3], [2, 3]], np.int32)
    arrays, made = to_host(
        {"patches": patches, "cls": patches[:, 0, 0]}, "float32", ("patches",), {"grids": grids}
    ).result()
    assert made == 0 and arrays["grids"] is grids
    assert isinstance(arrays["patches"], list) and len(arrays["patches"]) == 2
    assert np.array_equal(arrays["patches"][1], patches[1].reshape(6, 4).numpy())
    assert np.array_equal(arrays["cls"], patches[:, 0, 0].numpy())


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_embed_in_float16_stores_the_cast_of_the_float32_rows(tmp_path: Path, tiny_dir, fmt):
    suffix = ".h5" if fmt == "h5" else "/"
    full = embed(EXAMPLES, str(tmp_path / "f32") + suffix, model=str(tiny_dir.path))
    half = embed(
        EXAMPLES, str(tmp_path / "f16") + suffix, model=str(tiny_dir.path), store_dtype="float16"
    )
    assert full.rows == half.rows == 7 and half.nonfinite_values == 0
    assert inspect_output(half.out).meta["nonfinite_values"] == 0
    with read(full.out) as a, read(half.out) as b:
        for ra, rb in zip(a, b, strict=True):
            assert ra.path == rb.path
            for name in ("cls", "registers", "patches"):
                got, want = getattr(rb, name), getattr(ra, name).astype(np.float16)
                assert got.dtype == np.float16 and np.array_equal(got, want)
