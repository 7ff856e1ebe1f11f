"""Reduced precision and torch.compile through the real embed path, against fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import EXAMPLES

import dinoreg
from dinoreg.runtime import set_precision


def _patches(path):
    return np.stack([r.patches for r in dinoreg.read(path)])


def test_bf16_on_cpu_runs_bf16_weights_with_a_float32_position_table(tiny_dir, tmp_path):
    model = set_precision(
        dinoreg.load_model(str(tiny_dir.path)), torch.device("cpu"), torch.bfloat16
    )
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.pos_embed.dtype == torch.float32  # resized in float32, cast when added
    dinoreg.embed(EXAMPLES, tmp_path / "f32.h5", model=str(tiny_dir.path), workers=0)
    dinoreg.embed(
        EXAMPLES, tmp_path / "bf16.h5", model=str(tiny_dir.path), workers=0, dtype="bfloat16"
    )
    a, b = _patches(tmp_path / "f32.h5"), _patches(tmp_path / "bf16.h5")
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999
    with h5py_file(tmp_path / "bf16.h5") as f:
        assert f.attrs["compute_dtype"] == "bfloat16" and f["patches"].dtype == np.float32


@pytest.mark.slow
def test_compile_gives_the_eager_numbers(tiny_dir, tmp_path):
    # four images in one batch: one input shape, so one compilation (each shape costs ~30 s)
    images = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))[:4]
    common = {"model": str(tiny_dir.path), "workers": 0, "batch_size": 4}
    dinoreg.embed(images, tmp_path / "eager.h5", **common)
    dinoreg.embed(images, tmp_path / "compiled.h5", compile=True, **common)
    assert (
        np.abs(_patches(tmp_path / "eager.h5") - _patches(tmp_path / "compiled.h5")).max() <= 1e-5
    )


def h5py_file(path):
    import h5py

    return h5py.File(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_path_that_cuda_runs_matches_float32(tiny_dir, dtype):
    # CUDA runs fp32 weights under autocast; the same path on CPU, against plain float32
    from conftest import our_sequence, pixels

    model = dinoreg.load_model(str(tiny_dir.path))
    x = pixels(98, 154, batch=2)
    with torch.inference_mode():
        want = our_sequence(model.features(x).tokens)
    # what PreparedModel.inference() enters on CUDA (on CPU, bf16 runs bf16 weights instead)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        out = model.features(x, [0], cls_attention=True)
        got = our_sequence(out.tokens).float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1)
    assert cos.min() > 0.999
    assert out.tokens.cls.dtype == torch.float32  # the final LayerNorm computes in float32
    assert torch.isfinite(out.cls_attention).all()
