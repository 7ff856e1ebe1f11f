"""PCA of patch features: streaming equals direct, signs, scaling, save/load and refusal."""

from __future__ import annotations

import numpy as np
import pytest

import dinoreg
from dinoreg.errors import InputError, UsageError
from dinoreg.viz.pca import PCA, PCAAccumulator, fit_patches, otsu


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return dinoreg.load_model(str(tiny_dir.path))


def direct_pca(x: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, top-k unit components (rows) and variances from an SVD of all the data at once."""
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:k], s[:k] ** 2 / (len(x) - 1)


def features(n: int = 3000, d: int = 24, seed: int = 0) -> np.ndarray:
    """Anisotropic data far from the origin (a large mean tests the shifted sums)."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(4.0, 0.3, d)
    return rng.normal(size=(n, d)) * scales @ np.linalg.qr(rng.normal(size=(d, d)))[0] + 50.0


def same_up_to_sign(a: np.ndarray, b: np.ndarray) -> float:
    signs = np.sign(np.sum(a * b, axis=1, keepdims=True))
    return float(np.abs(a - signs * b).max())


def test_streaming_equals_direct_pca():
    x = features()
    acc = PCAAccumulator(x.shape[1], sample_cap=500)
    for chunk in np.array_split(x, 11):
        acc.add(chunk)
    pca = acc.fit()
    mean, comps, var = direct_pca(x)
    assert acc.count == len(x)
    np.testing.assert_allclose(pca.mean, mean, atol=1e-9)
    np.testing.assert_allclose(pca.variance, var, rtol=1e-9)
    assert same_up_to_sign(pca.components, comps) < 1e-8
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-12)


def test_streaming_equals_direct_pca_on_model_patches(tiny_model):
    import torch

    g = torch.Generator().manual_seed(3)
    grids = []
    acc = PCAAccumulator(tiny_model.cfg.dim, sample_cap=100)
    with torch.no_grad():
        for size in [(56, 84), (70, 70), (98, 42)]:
            patches = tiny_model.forward_features(torch.randn(1, 3, *size, generator=g)).patches
            grids.append(patches[0].double().numpy())
            acc.add(grids[-1])
    rows = np.concatenate([p.reshape(-1, p.shape[-1]) for p in grids])
    _, comps, var = direct_pca(rows)
    pca = acc.fit()
    np.testing.assert_allclose(pca.variance, var, rtol=1e-8)
    assert same_up_to_sign(pca.components, comps) < 1e-6


def test_sign_and_range_are_deterministic():
    x = features(seed=1)
    # Reordering the rows changes nothing but rounding, so the signs must agree, not flip.
    a, b = fit_patches(x), fit_patches(x[::-1])
    np.testing.assert_allclose(a.components, b.components, atol=1e-9)
    for row in a.components[1:]:  # largest-magnitude loading positive
        assert row[np.argmax(np.abs(row))] > 0
    scores = a.scores(x)
    # The range comes from the float32 sample, hence the tolerance.
    np.testing.assert_allclose(a.lo, np.percentile(scores, 1, axis=0), atol=1e-4)
    np.testing.assert_allclose(a.hi, np.percentile(scores, 99, axis=0), atol=1e-4)
    colors = a.colors(x)
    assert colors.min() == 0.0 and colors.max() == 1.0
    inside = np.mean((colors > 0) & (colors < 1), axis=0)  # 98% of each channel
    assert np.all((inside > 0.97) & (inside < 0.99))


def test_first_component_points_away_from_the_border():
    # A bright square object on a dark background: border patches are background.
    rng = np.random.default_rng(0)
    grid = rng.normal(0, 0.1, size=(12, 16, 8))
    grid[4:8, 5:11, 0] += 3.0
    for flip in (1.0, -1.0):
        pca = fit_patches(grid * flip)
        fg = pca.foreground(grid * flip)
        assert fg[4:8, 5:11].all() and fg.sum() == 24


def test_reservoir_stays_bounded():
    acc = PCAAccumulator(4, sample_cap=64)
    for chunk in np.array_split(features(n=5000, d=4), 50):
        acc.add(chunk)
    assert acc._sample.shape == (64, 4)


def test_save_load_round_trip(tmp_path):
    pca = fit_patches(features(), "tiny", "ab" * 32)
    path = pca.save(tmp_path / "colours.pca")  # any name: no ".npz" is appended
    assert path == tmp_path / "colours.pca" and path.is_file()
    back = PCA.load(path)
    for field in ("mean", "components", "variance", "lo", "hi"):
        np.testing.assert_array_equal(getattr(back, field), getattr(pca, field))
    assert (back.threshold, back.samples) == (pca.threshold, pca.samples)
    assert (back.model_name, back.model_sha, back.dim) == ("tiny", "ab" * 32, 24)


def test_refuses_other_models_and_bad_files(tmp_path):
    pca = fit_patches(features(), "tiny", "ab" * 32)
    pca.check("tiny-by-path", "ab" * 32, 24)  # same weights under another name is fine
    pca.check("", "", 24)  # nothing to compare but the width
    with pytest.raises(UsageError, match="24-dim"):
        pca.check("tiny", "ab" * 32, 32)
    with pytest.raises(UsageError, match="fit_pca"):
        pca.check("other", "cd" * 32, 24)
    with pytest.raises(UsageError, match="does not exist"):
        PCA.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a PCA file"):
        PCA.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(InputError, match="not a PCA file"):
        PCA.load(tmp_path / "other.npz")


def test_otsu_splits_two_classes():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(0, 1, 3000), rng.normal(8, 1, 1000)]
    assert 3.0 < otsu(values) < 5.0
    assert otsu(np.ones(10)) == 1.0
