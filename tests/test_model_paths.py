"""The model's speed paths give the plain path's numbers: batch slicing on CPU, padded bf16
attention, the resized-position cache and its invalidation, copies of the model."""

from __future__ import annotations

import copy
import io

import torch
from conftest import max_diff, our_sequence, pixels

import dinoreg
import dinoreg.model.vit as vit


def test_sliced_batches_equal_one_pass(tiny_dir, monkeypatch):
    model = dinoreg.load_model(str(tiny_dir.path))
    x = pixels(98, 154, batch=5)
    with torch.inference_mode():
        whole = our_sequence(model.forward_features(x))
        monkeypatch.setattr(vit, "_CPU_PASS_BYTES", 1)  # one image per pass
        assert model.images_per_pass(x) == 1
        sliced = our_sequence(model.forward_features(x))
        inter = model.intermediate_layers(x, [0], norm=False)[0]
    assert max_diff(whole, sliced) <= 1e-5
    assert inter.patches.shape == (5, 7, 11, 32)


def test_padded_bf16_attention_equals_unpadded(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path), dtype=torch.bfloat16)
    x = pixels(224, 224).to(torch.bfloat16)  # 261 tokens: padded to 264
    with torch.inference_mode():
        tokens, _ = model.prepare_tokens(x)
        assert model.attention_padding(tokens, set()) == 3
        padded = our_sequence(model.forward_features(x)).float()
        model.use_fused_attention(False)  # the explicit path never pads
        assert model.attention_padding(tokens, set()) == 0
        plain = our_sequence(model.forward_features(x)).float()
    assert max_diff(padded, plain) < 0.1  # bf16 rounding only
    assert torch.isfinite(padded).all()


def test_position_cache_follows_the_weights(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path))
    first = model.interpolate_pos_embed(16, 16)
    assert model.interpolate_pos_embed(16, 16) is first  # cached
    with torch.no_grad():
        model.pos_embed.add_(1.0)  # an in-place write must not be served stale
    second = model.interpolate_pos_embed(16, 16)
    assert second is not first
    assert max_diff(second, model._resize_pos_embed(16, 16)) == 0.0
    model.pos_embed = torch.nn.Parameter(model.pos_embed.detach().clone() * 2)
    assert max_diff(model.interpolate_pos_embed(16, 16), model._resize_pos_embed(16, 16)) == 0.0


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
    out = model.forward_features(pixels(98, 154))
    out.cls.sum().backward()
    assert model.pos_embed.grad is not None and model.blocks[0].mlp.fc1.weight.grad is not None
