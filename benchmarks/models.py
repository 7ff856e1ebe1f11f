"""The model pair every model section compares: transformers' reference and ours, same weights.

The reference is built from a config with a published model's real shape, given random weights
at realistic scales, written with `save_pretrained`, and loaded by `dinoreg.load_model` from that
directory, so both hold exactly the same numbers.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The published backbones (config.py's table); giant and large are too slow for a 2-core run.
SHAPES: dict[str, dict[str, int]] = {
    "small": {"dim": 384, "depth": 12, "heads": 6},
    "base": {"dim": 768, "depth": 12, "heads": 12},
    "large": {"dim": 1024, "depth": 24, "heads": 16},
}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass
class Pair:
    size: str
    ours: torch.nn.Module  # dinoreg RegistersViT, fp32, eval
    hf: torch.nn.Module  # Dinov2WithRegistersModel, fp32, eval, attn_implementation="sdpa"
    path: Path


def build_pair(size: str, workdir: Path, seed: int = 0) -> Pair:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    import dinoreg

    shape = SHAPES[size]
    cfg = Dinov2WithRegistersConfig(
        hidden_size=shape["dim"],
        num_hidden_layers=shape["depth"],
        num_attention_heads=shape["heads"],
        mlp_ratio=4,
        num_register_tokens=4,
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    hf = Dinov2WithRegistersModel(cfg)
    randomize(hf, seed)
    hf.eval().requires_grad_(False)
    path = workdir / f"hf-{size}"
    hf.save_pretrained(path)
    ours = dinoreg.load_model(str(path))
    return Pair(size, ours, hf, path)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers' own init for the matrices (std 0.02), plus non-trivial norms, layer scales,
    biases and tokens, so that no part of the computation is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif "lambda1" in name:
                p.copy_(0.3 + 0.1 * noise)
            elif any(t in name for t in ("cls_token", "register_tokens", "position_embeddings")):
                p.copy_(0.5 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)


def as_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy in another dtype (the fp32 original stays for the other modes)."""
    return copy.deepcopy(model).to(dtype)


def pixels(batch: int, image_size: int = 224, seed: int = 0) -> torch.Tensor:
    """Normalised photos from examples/images (centre-cropped), cycled to fill the batch; random
    pixels where there are none."""
    files = sorted(EXAMPLES.glob("*.jpg")) if EXAMPLES.is_dir() else []
    if not files:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, image_size, image_size, generator=g)
    from PIL import Image

    images = []
    for f in files[: min(batch, len(files))]:
        with Image.open(f) as im:
            im = im.convert("RGB")
            scale = image_size / min(im.size)
            im = im.resize(
                (
                    max(image_size, round(im.width * scale)),
                    max(image_size, round(im.height * scale)),
                ),
                Image.Resampling.BICUBIC,
            )
            left, top = (im.width - image_size) // 2, (im.height - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
            arr = (np.asarray(im, np.float32) / 255.0 - MEAN) / STD
        images.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    stack = torch.stack(images)
    reps = -(-batch // len(images))
    return stack.repeat(reps, 1, 1, 1)[:batch].contiguous()


def ours_sequence(out) -> torch.Tensor:
    """Our TokenOutput as one (B, T, D) sequence, transformers' order [CLS, registers, patches]."""
    b, d = out.cls.shape
    return torch.cat([out.cls[:, None], out.registers, out.patches.reshape(b, -1, d)], dim=1)


def temp_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dinoreg-bench-")
