"""The CPU fast paths (`dinoreg.model.cpu`) against the plain model, and the model's own
machinery they rely on: batch slicing, token padding, the position cache, copies, gradients."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import max_diff, our_sequence, pixels

import dinoreg
from dinoreg.model import cpu, vit
from dinoreg.model.positions import resize_pos_embed
from dinoreg.runtime import ComputeOptions, prepare_model


def bf16_model(path) -> torch.nn.Module:
    model = dinoreg.load_model(str(path), dtype=torch.bfloat16)
    model.pos_embed.data = model.pos_embed.data.float()  # as `runtime.set_precision` leaves it
    return model


def test_sliced_batches_equal_one_pass(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path))
    x = pixels(98, 154, batch=5)
    with torch.inference_mode():
        whole = model.features(x, [0], norm=False, cls_attention=True)
        model.max_pass_bytes = 1  # one image per pass
        assert model.images_per_pass(x) == 1
        sliced = model.features(x, [0], norm=False, cls_attention=True)
    assert max_diff(our_sequence(whole.tokens), our_sequence(sliced.tokens)) == 0.0
    assert max_diff(our_sequence(whole.layers[0]), our_sequence(sliced.layers[0])) == 0.0
    # the float32 q k^T of another batch size may take another kernel: rounding apart only
    assert max_diff(whole.cls_attention, sliced.cls_attention) <= 1e-6
    assert sliced.layers[0].patches.shape == (5, 7, 11, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_padded_attention_equals_unpadded(tiny_dir, fused, dtype):
    model = (
        bf16_model(tiny_dir.path)
        if dtype == torch.bfloat16
        else dinoreg.load_model(str(tiny_dir.path))
    )
    model.use_fused_attention(fused)
    x = pixels(224, 224, batch=2).to(dtype)  # 1 + 4 registers + 256 patches = 261 tokens
    with torch.inference_mode():
        plain = model.features(x, [1], cls_attention=True)
        model.pad_tokens_to = 8  # padded to 264, the 3 extra hidden by the mask
        padded = model.features(x, [1], cls_attention=True)
    # Not bit-identical: the matmul kernels block 264 rows otherwise than 261, so sums round
    # differently (measured here: 1.1e-6 in float32; in bf16 one rounding step, 2^-7 at ~2).
    # A padding token that leaked into attention moves values by more (the test below).
    bound = 1e-5 if dtype == torch.float32 else 2**-5
    for a, b in [(plain.tokens, padded.tokens), (plain.layers[1], padded.layers[1])]:
        assert max_diff(our_sequence(a).float(), our_sequence(b).float()) <= bound
        assert torch.isfinite(our_sequence(b)).all()
    assert max_diff(plain.cls_attention, padded.cls_attention) <= bound


def test_a_padding_token_that_leaked_would_show(tiny_dir, monkeypatch):
    # the float32 bound above can fail: without its mask, padding moves outputs 1000x past it
    model = dinoreg.load_model(str(tiny_dir.path))
    x = pixels(224, 224, batch=1)
    with torch.inference_mode():
        plain = our_sequence(model.features(x).tokens)
        unmasked = vit._pad

        monkeypatch.setattr(vit, "_pad", lambda tokens, multiple: (unmasked(tokens, 8)[0], None))
        leaked = our_sequence(model.features(x).tokens)
    assert max_diff(plain, leaked) > 1e-3


def test_fused_linear_matches_nn_linear_in_bf16():
    if cpu.fused_op() is None:
        pytest.skip("this torch build has no oneDNN fused linear; the plain ops run instead")
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 10, 64, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        want = linear(x).float()
        want_gelu = F.gelu(linear(x)).float()
        got = cpu.FusedLinear.wrap(linear)(x).float()
        got_gelu = cpu.FusedLinear.wrap(linear, gelu=True)(x).float()
    # one bf16 rounding of outputs of magnitude ~1 apart: at most 2 ulp at 2.0 (2 x 2^-7)
    assert max_diff(got, want) <= 2**-6 and max_diff(got_gelu, want_gelu) <= 2**-6


def test_fused_linear_calls_the_op_with_bias_and_gelu_in_the_epilogue(monkeypatch):
    # on CPUs without bf16 matmuls the real op is refused, so a stand-in records the calls
    calls = []

    def op(x, w, b, attr, scalars, algorithm):
        calls.append((attr, algorithm))
        y = F.linear(x, w, b)
        return F.gelu(y) if attr == "gelu" else y

    monkeypatch.setattr(cpu, "fused_op", lambda: op)
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(2, 16).to(torch.bfloat16)
    with torch.inference_mode():
        cpu.FusedLinear.wrap(linear)(x)
        cpu.FusedLinear.wrap(linear, gelu=True)(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the plain ops
            cpu.FusedLinear.wrap(linear)(x)
    assert calls == [("none", ""), ("gelu", "none")]


def test_fused_linear_falls_back_to_the_plain_ops():
    linear = torch.nn.Linear(8, 4)
    fused = cpu.FusedLinear.wrap(linear, gelu=True)
    assert fused.weight is linear.weight and fused.bias is linear.bias  # shared, not copied
    x = torch.randn(2, 8)
    with torch.no_grad():  # fp32: never fused
        assert max_diff(fused(x), F.gelu(linear(x))) == 0.0
    y = fused(x.requires_grad_(True))  # a gradient is wanted: the plain, differentiable ops
    y.sum().backward()
    assert x.grad is not None


def test_probe_rejects_a_wrong_or_failing_op():
    def wrong(x, w, b, *_):
        return torch.zeros((*x.shape[:-1], w.shape[0]), dtype=x.dtype)

    def failing(*_):
        raise RuntimeError("no bf16 on this CPU")

    assert cpu.probe(wrong) is None and cpu.probe(failing) is None
    assert (
        cpu.probe(
            lambda x, w, b, act, *_: (lambda y: F.gelu(y) if act == "gelu" else y)(
                F.linear(x, w, b)
            )
        )
        is not None
    )


def test_fused_op_is_none_without_onednn(monkeypatch):
    cpu.fused_op.cache_clear()
    monkeypatch.delattr(torch.ops.mkldnn, "_linear_pointwise", raising=False)
    monkeypatch.setattr(torch.ops, "mkldnn", object())
    try:
        assert cpu.fused_op() is None
    finally:
        cpu.fused_op.cache_clear()


def test_cpu_paths_give_the_plain_numbers(tiny_dir):
    x = pixels(224, 224, batch=3)
    for dtype, bound in [("float32", 0.0), ("bfloat16", 0.1)]:
        fast = prepare_model(str(tiny_dir.path), ComputeOptions(device="cpu", dtype=dtype))
        plain = prepare_model(
            str(tiny_dir.path), ComputeOptions(device="cpu", dtype=dtype, cpu_fast_paths=False)
        )
        assert fast.model.max_pass_bytes == cpu.PASS_BYTES and plain.model.max_pass_bytes is None
        with fast.inference():
            a = our_sequence(fast.model.forward_features(x.to(fast.dtype))).float()
        with plain.inference():
            b = our_sequence(plain.model.forward_features(x.to(plain.dtype))).float()
        assert max_diff(a, b) <= bound  # bf16: the fused epilogue rounds once, not twice
        fused = isinstance(fast.model.blocks[0].mlp.fc1, cpu.FusedLinear)
        assert fused == (dtype == "bfloat16")
        assert fast.model.pad_tokens_to == (cpu.PAD_TO if dtype == "bfloat16" else 1)
    # the fused modules keep the checkpoint's names
    assert set(fast.model.state_dict()) == set(plain.model.state_dict())


def test_position_cache_follows_the_weights(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path))
    grid = model.cfg.pos_grid

    def fresh():
        return resize_pos_embed(model.pos_embed, grid, 16, 16)

    first = model.interpolate_pos_embed(16, 16)
    assert model.interpolate_pos_embed(16, 16) is first  # cached
    with torch.no_grad():
        model.pos_embed.add_(1.0)  # an in-place write must not be served stale
    second = model.interpolate_pos_embed(16, 16)
    assert second is not first
    assert max_diff(second, fresh()) == 0.0
    model.pos_embed = torch.nn.Parameter(model.pos_embed.detach().clone() * 2)
    assert max_diff(model.interpolate_pos_embed(16, 16), fresh()) == 0.0
    assert model.interpolate_pos_embed(grid, grid) is model.pos_embed  # the native grid


def test_copies_and_saved_models_compute_the_same(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path))
    x = pixels(98, 154)
    with torch.inference_mode():
        ref = our_sequence(model.forward_features(x))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        with torch.inference_mode():
            assert max_diff(our_sequence(other.forward_features(x)), ref) == 0.0


def test_gradients_flow_when_asked(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path)).requires_grad_(True)
    cpu.apply(model, torch.float32)
    out = model.forward_features(pixels(98, 154))
    out.cls.sum().backward()
    assert model.pos_embed.grad is not None and model.blocks[0].mlp.fc1.weight.grad is not None


@pytest.mark.parametrize(
    ("x", "words"),
    [
        (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), "normalised floats"),
        (torch.zeros(1, 3, 225, 224), "225x224 (h x w), not multiples of the patch size 14"),
        (torch.zeros(3, 224, 224), "(batch, 3, height, width)"),
    ],
)
def test_pixels_that_would_run_silently_wrong_are_refused(tiny_dir, x, words):
    from dinoreg.errors import UsageError

    model = dinoreg.load_model(str(tiny_dir.path))
    with pytest.raises(UsageError, match=re.escape(words)):
        model.forward_features(x)
