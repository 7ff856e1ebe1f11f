"""Plain DINOv2 (no registers) in every layout against transformers' Dinov2Model on the same
tiny random weights (fp32, <= 1e-5), and the two families side by side."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Tiny, make_hf, max_diff, our_sequence, pixels, randomize, timm_state_dict
from safetensors.torch import load_file, save_file

import dinoreg
from dinoreg.model.config import PLAIN_FAMILY, REGISTERS_FAMILY, VARIANTS

TOL = 1e-5
SIZES = [(224, 224), (518, 518), (98, 154), (224, 308), (560, 560), (70, 42)]


def make_plain(
    tmp: Path,
    *,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    swiglu: bool = False,
    num_labels: int = 0,
    seed: int = 0,
) -> Tiny:
    """A tiny random transformers Dinov2Model (or ...ForImageClassification), save_pretrained."""
    from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        use_swiglu_ffn=swiglu,
        image_size=518,
        patch_size=14,
        num_labels=num_labels or 2,
        attn_implementation="sdpa",
    )
    model = (Dinov2ForImageClassification if num_labels else Dinov2Model)(cfg)
    randomize(model, seed)
    model.eval()
    path = tmp / f"plain-{dim}-{depth}-{'swiglu' if swiglu else 'mlp'}-{num_labels}-{seed}"
    model.save_pretrained(path)
    return Tiny(model, path)


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "dinov2", model)


def reference(tiny: Tiny, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone(tiny.hf)(pixel_values=x).last_hidden_state


def plain_original_state_dict(tiny: Tiny) -> dict[str, torch.Tensor]:
    """The original `dinov2_vit*14_pretrain.pth` keys, written by hand from the saved HF file
    (no register_tokens: the plain release has none)."""
    sd = load_file(tiny.path / "model.safetensors")
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in sd:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            for norm in ("norm1", "norm2"):
                out[f"{dst}{norm}.{kind}"] = sd[f"{src}{norm}.{kind}"]
            q, k, v = (
                sd[f"{src}attention.attention.{n}.{kind}"] for n in ("query", "key", "value")
            )
            out[f"{dst}attn.qkv.{kind}"] = torch.cat([q, k, v])
            out[f"{dst}attn.proj.{kind}"] = sd[f"{src}attention.output.dense.{kind}"]
            pairs = (("fc1", "fc1"), ("fc2", "fc2"), ("weights_in", "w12"), ("weights_out", "w3"))
            for hf_name, ours in pairs:
                if f"{src}mlp.{hf_name}.{kind}" in sd:
                    out[f"{dst}mlp.{ours}.{kind}"] = sd[f"{src}mlp.{hf_name}.{kind}"]
        out[f"{dst}ls1.gamma"] = sd[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = sd[f"{src}layer_scale2.lambda1"]
        i += 1
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    return {sw: make_plain(tmp, swiglu=sw, seed=3 + sw) for sw in (False, True)}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """64-wide heads, so original and timm files (no config) infer the same heads."""
    tmp = tmp_path_factory.mktemp("plain-wide")
    return {sw: make_plain(tmp, dim=128, heads=2, swiglu=sw, seed=21 + sw) for sw in (False, True)}


# -- HF layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_hf_dinov2_matches_transformers(tinies, swiglu, size):
    tiny = tinies[swiglu]
    model = dinoreg.load_model(str(tiny.path))
    assert model.cfg.num_registers == 0 and model.cfg.family == PLAIN_FAMILY
    assert model.info.family == PLAIN_FAMILY and model.info.layout == "hf"
    assert model.cfg.ffn == ("swiglu" if swiglu else "mlp")
    x = pixels(*size)
    with torch.inference_mode():
        out = model.forward_features(x)
    assert out.registers.shape == (2, 0, 32)
    assert out.patches.shape == (2, size[0] // 14, size[1] // 14, 32)
    assert max_diff(our_sequence(out), reference(tiny, x)) <= TOL


def test_native_grid_needs_no_resize(tinies):
    """At the stored 37 x 37 grid no resize runs, so this holds with vit.py as it is today."""
    tiny = tinies[False]
    model = dinoreg.load_model(str(tiny.path))
    x = pixels(518, 518)
    with torch.inference_mode():
        assert max_diff(our_sequence(model.forward_features(x)), reference(tiny, x)) <= TOL


def test_vit_resizes_plain_positions_like_transformers(tinies):
    """Plain checkpoints resize positions without antialias, as transformers' Dinov2Model."""
    tiny = tinies[False]
    model = dinoreg.load_model(str(tiny.path))
    x = pixels(224, 224)
    with torch.inference_mode():
        assert max_diff(our_sequence(model.forward_features(x)), reference(tiny, x)) <= TOL


def test_registers_family_keeps_antialias(tmp_path):
    """A registers checkpoint with zero registers is still the registers family (its config
    says so) and keeps the antialiased resize, with or without the fixture."""
    tiny = make_hf(tmp_path, registers=0, seed=5)
    model = dinoreg.load_model(str(tiny.path))
    assert model.cfg.family == REGISTERS_FAMILY and model.cfg.pos_antialias
    assert model.info.family == REGISTERS_FAMILY
    x = pixels(98, 154)
    ref = reference(tiny, x)
    with torch.inference_mode():
        assert max_diff(our_sequence(model.forward_features(x)), ref) <= TOL


def test_hf_classifier_logits_match(tmp_path):
    tiny = make_plain(tmp_path, num_labels=7, seed=9)
    model = dinoreg.load_model(str(tiny.path))
    assert model.cfg.head == "linear" and model.cfg.num_labels == 7
    assert model.info.family == PLAIN_FAMILY
    x = pixels(98, 154)
    with torch.no_grad():
        ref = tiny.hf(pixel_values=x).logits
    with torch.inference_mode():
        assert max_diff(model.logits(x), ref) <= TOL
        feats = model.head_features(x)
    assert feats.shape == (2, 64)  # [CLS, mean of the patch tokens]


def test_single_hf_file_without_config_is_plain(wide, tmp_path):
    tiny = wide[False]
    path = tmp_path / "weights.safetensors"
    path.write_bytes((tiny.path / "model.safetensors").read_bytes())
    model = dinoreg.load_model(str(path))
    assert model.info.layout == "hf" and model.info.family == PLAIN_FAMILY
    x = pixels(98, 154)
    with torch.inference_mode():
        assert max_diff(our_sequence(model.forward_features(x)), reference(tiny, x)) <= TOL


# -- original and timm layouts -----------------------------------------------------------------


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_original_and_timm_layouts_match(wide, tmp_path, swiglu):
    tiny = wide[swiglu]
    original = plain_original_state_dict(tiny)
    assert "register_tokens" not in original
    pth = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(original, pth)
    timm = timm_state_dict(original)
    assert "reg_token" not in timm and timm["pos_embed"].shape[1] == 37 * 37
    st = tmp_path / "vit_small_patch14_dinov2.safetensors"
    save_file(timm, st)
    hf = dinoreg.load_model(str(tiny.path))
    loaded = {"original": dinoreg.load_model(str(pth)), "timm": dinoreg.load_model(str(st))}
    for size in [(224, 224), (98, 154), (518, 518)]:
        x = pixels(*size)
        ref = reference(tiny, x)
        with torch.inference_mode():
            want = our_sequence(hf.forward_features(x))
            for layout, model in loaded.items():
                assert model.info.layout == layout and model.info.family == PLAIN_FAMILY
                assert model.cfg == hf.cfg, layout
                got = our_sequence(model.forward_features(x))
                assert max_diff(got, ref) <= TOL, (layout, size)
                assert max_diff(got, want) <= TOL, (layout, size)


def test_registers_original_file_stays_registers(tmp_path):
    from conftest import original_state_dict

    tiny = make_hf(tmp_path, dim=128, heads=2, seed=13)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original_state_dict(tiny), path)
    model = dinoreg.load_model(str(path))
    assert model.info.family == REGISTERS_FAMILY and model.cfg.num_registers == 4


# -- aliases ------------------------------------------------------------------------------------


def test_aliases_of_both_families():
    for size in ("small", "base", "large", "giant"):
        reg, plain = VARIANTS[size], VARIANTS[f"dinov2-{size}"]
        assert reg.repo_id == f"facebook/dinov2-with-registers-{size}"
        assert plain.repo_id == f"facebook/dinov2-{size}"
        assert reg.family == REGISTERS_FAMILY and plain.family == PLAIN_FAMILY
        assert plain.config.num_registers == 0 and reg.config.num_registers == 4
        assert (plain.config.dim, plain.config.depth) == (reg.config.dim, reg.config.depth)
        head = VARIANTS[f"dinov2-{size}-imagenet1k"]
        assert head.repo_id == f"facebook/dinov2-{size}-imagenet1k-1-layer"
        assert head.config.head == "linear" and head.config.num_labels == 1000


def _populate_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """huggingface_hub's cache layout: blobs by sha256, snapshot symlinks, a ref."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))


def test_plain_alias_loads_offline_from_the_cache(tinies, tmp_path):
    tiny = tinies[False]
    files = {n: (tiny.path / n).read_bytes() for n in ("config.json", "model.safetensors")}
    _populate_cache(tmp_path, "facebook/dinov2-small", files)
    code = "import dinoreg; m = dinoreg.load_model('dinov2-small'); print(m.info.family)"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [PLAIN_FAMILY]
