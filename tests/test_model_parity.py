"""Our registers ViT against transformers on the same tiny random weights (fp32, <= 1e-5)."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_tokens, make_hf, max_diff, our_sequence, pixels

import dinoreg

TOL = 1e-5
SIZES = [(224, 224), (518, 518), (98, 154), (224, 308), (560, 560), (70, 42)]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    return {
        (regs, swiglu): make_hf(tmp, registers=regs, swiglu=swiglu, seed=regs + 10 * swiglu)
        for regs, swiglu in [(0, False), (1, False), (4, False), (4, True)]
    }


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "regs,swiglu", [(0, False), (1, False), (4, False), (4, True)], ids=["r0", "r1", "r4", "swiglu"]
)
def test_last_hidden_state_matches_transformers(variants, regs, swiglu, size):
    tiny = variants[(regs, swiglu)]
    ours = dinoreg.load_model(str(tiny.path))
    x = pixels(*size)
    ref = hf_tokens(tiny.hf, x).last_hidden_state
    with torch.inference_mode():
        out = ours.forward_features(x)
    assert out.cls.shape == (2, 32)
    assert out.registers.shape == (2, regs, 32)
    assert out.patches.shape == (2, size[0] // 14, size[1] // 14, 32)
    assert max_diff(our_sequence(out), ref) <= TOL


def test_explicit_attention_matches_sdpa_on_the_same_module(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path))
    x = pixels(224, 308)
    with torch.inference_mode():
        fused = our_sequence(model.use_fused_attention(True).forward_features(x))
        explicit = our_sequence(model.use_fused_attention(False).forward_features(x))
    assert all(not b.attn.fused for b in model.blocks)
    assert max_diff(fused, explicit) <= TOL
    assert not torch.equal(fused, explicit)  # two really different code paths ran


def test_intermediate_layers_match_hidden_states(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path))
    x = pixels(98, 154)
    ref = hf_tokens(tiny_dir.hf, x, output_hidden_states=True).hidden_states
    norm = tiny_dir.hf.layernorm
    with torch.inference_mode():
        raw = model.intermediate_layers(x, [0, -1], norm=False)
        normed = model.intermediate_layers(x, [0, 1], norm=True)
    assert len(ref) == 3  # embeddings + one per block
    assert max_diff(our_sequence(raw[0]), ref[1]) <= TOL
    assert max_diff(our_sequence(raw[1]), ref[2]) <= TOL
    with torch.no_grad():
        assert max_diff(our_sequence(normed[0]), norm(ref[1])) <= TOL
        assert max_diff(our_sequence(normed[1]), norm(ref[2])) <= TOL
    with pytest.raises(IndexError):
        model.intermediate_layers(x, [2])


def test_attention_maps_match_eager_output_attentions(tmp_path):
    tiny = make_hf(tmp_path, attn="eager", seed=3)
    model = dinoreg.load_model(str(tiny.path))
    x = pixels(98, 154)
    ref = hf_tokens(tiny.hf, x, output_attentions=True).attentions
    with torch.inference_mode():
        maps = model.attention_maps(x, [0, -1])
    tokens = 1 + 4 + 7 * 11
    assert maps[0].shape == (2, 2, tokens, tokens)
    assert max_diff(maps[0], ref[0]) <= TOL
    assert max_diff(maps[1], ref[1]) <= TOL
    assert torch.allclose(maps[1].sum(-1), torch.ones(2, 2, tokens))


def test_batch_invariance(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path))
    x = pixels(224, 224, batch=3)
    with torch.inference_mode():
        together = our_sequence(model.forward_features(x))
        alone = torch.cat([our_sequence(model.forward_features(x[i : i + 1])) for i in range(3)])
    assert max_diff(together, alone) <= TOL


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_classifier_logits_match_transformers(tmp_path, swiglu):
    tiny = make_hf(tmp_path, num_labels=10, swiglu=swiglu, seed=5)
    model = dinoreg.load_model(str(tiny.path))
    x = pixels(224, 224, batch=3)
    with torch.no_grad():
        ref = tiny.hf(pixel_values=x).logits
    with torch.inference_mode():
        logits = model.logits(x)
    assert logits.shape == (3, 10)
    assert max_diff(logits, ref) <= TOL
    assert torch.equal(logits.argmax(1), ref.argmax(1))


def test_model_dtype_and_eval_mode(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path), dtype=torch.bfloat16)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.pos_embed.dtype == torch.bfloat16
    with torch.inference_mode():
        out = model.forward_features(pixels(224, 224))
    assert out.cls.dtype == torch.bfloat16
    ref = hf_tokens(tiny_dir.hf, pixels(224, 224)).last_hidden_state
    assert max_diff(our_sequence(out).float(), ref) < 0.1  # bf16 keeps about 3 digits
