"""Tiny random checkpoints in every supported layout, and transformers as the reference."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
warnings.filterwarnings("ignore", message=".*torchvision.*")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"


@dataclass(frozen=True)
class Tiny:
    """A tiny transformers model and where its checkpoint was written."""

    hf: torch.nn.Module  # Dinov2WithRegistersModel or ...ForImageClassification, eval, fp32
    path: Path  # save_pretrained directory


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere: norms, LayerScale and positions included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "lambda1" in name:
                p.copy_(0.5 + 0.3 * noise)
            elif any(t in name for t in ("cls_token", "register_tokens", "position_embeddings")):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.08 * noise)


def make_hf(
    tmp: Path,
    *,
    dim: int = 32,
    depth: int = 2,
    heads: int = 2,
    registers: int = 4,
    swiglu: bool = False,
    num_labels: int = 0,
    image_size: int = 518,
    seed: int = 0,
    attn: str = "sdpa",
) -> Tiny:
    """A tiny random transformers checkpoint written with save_pretrained."""
    from transformers import (
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersForImageClassification,
        Dinov2WithRegistersModel,
    )

    cfg = Dinov2WithRegistersConfig(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_register_tokens=registers,
        use_swiglu_ffn=swiglu,
        image_size=image_size,
        patch_size=14,
        num_labels=max(num_labels, 1) if num_labels else 2,
        attn_implementation=attn,
    )
    cls = Dinov2WithRegistersForImageClassification if num_labels else Dinov2WithRegistersModel
    model = cls(cfg)
    randomize(model, seed)
    model.eval()
    path = tmp / f"hf-{dim}-{depth}-{registers}-{'swiglu' if swiglu else 'mlp'}-{num_labels}-{seed}"
    model.save_pretrained(path)
    return Tiny(model, path)


def hf_backbone(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "dinov2_with_registers", model)


def hf_tokens(model: torch.nn.Module, pixels: torch.Tensor, **kw):
    with torch.no_grad():
        return hf_backbone(model)(pixel_values=pixels, **kw)


def original_state_dict(tiny: Tiny) -> dict[str, torch.Tensor]:
    """The original release's keys, written out independently of dinoreg's converter from the
    on-disk (4.x-named) transformers checkpoint."""
    from safetensors.torch import load_file

    saved = load_file(tiny.path / "model.safetensors")
    sd = {k.removeprefix("dinov2_with_registers."): v for k, v in saved.items()}
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "mask_token": sd["embeddings.mask_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if sd["embeddings.register_tokens"].shape[1]:
        out["register_tokens"] = sd["embeddings.register_tokens"]
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in sd:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"norm1.{kind}"] = sd[src + f"norm1.{kind}"]
            out[dst + f"norm2.{kind}"] = sd[src + f"norm2.{kind}"]
            out[dst + f"attn.qkv.{kind}"] = torch.cat(
                [sd[src + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            out[dst + f"attn.proj.{kind}"] = sd[src + f"attention.output.dense.{kind}"]
            if src + "mlp.fc1.weight" in sd:
                out[dst + f"mlp.fc1.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
                out[dst + f"mlp.fc2.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
            else:
                out[dst + f"mlp.w12.{kind}"] = sd[src + f"mlp.weights_in.{kind}"]
                out[dst + f"mlp.w3.{kind}"] = sd[src + f"mlp.weights_out.{kind}"]
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
        i += 1
    return {k: v.clone() for k, v in out.items()}


def timm_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What timm's DINOv2 conversion makes of an original state dict (see model-spec §4)."""
    out = {}
    for k, v in original.items():
        if k == "mask_token":
            continue
        if k == "register_tokens":
            k = "reg_token"
        elif k == "cls_token":
            v = v + original["pos_embed"][:, :1]
        elif k == "pos_embed":
            v = v[:, 1:]
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v.clone()
    return out


def reference_pixels(path: Path) -> torch.Tensor:
    """(1, 3, 224, 224): the checkpoints' processor as transformers runs it (its PIL backend)."""
    from PIL import Image
    from transformers import BitImageProcessorPil

    processor = BitImageProcessorPil(
        size={"shortest_edge": 256},
        resample=3,
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    with Image.open(path) as image:
        return processor(image, return_tensors="pt")["pixel_values"]


def pixels(*size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def our_sequence(out) -> torch.Tensor:
    """[CLS, registers, patches] as one (B, T, D) sequence, HF's token order."""
    b, d = out.cls.shape
    return torch.cat([out.cls[:, None], out.registers, out.patches.reshape(b, -1, d)], dim=1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Tiny:
    """The default tiny backbone (dim 32, 2 blocks, 4 registers) shared by many tests."""
    return make_hf(tmp_path_factory.mktemp("tiny"))
