"""The layers of the registers ViT, named as in the original checkpoints so they load unrenamed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.model.config import ViTConfig


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution; a remainder below one patch is dropped."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixels.to(self.proj.weight.dtype))  # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major over the grid


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype, cast back afterwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            out = F.layer_norm(
                x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
            )
        return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    `fused=True` runs `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU);
    `fused=False` runs the explicit softmax(q k^T) v in float32 and is the path that can return the
    attention maps. Both compute the same function.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.fused = True

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        # rows of qkv: [q | k | v], each split into heads of head_dim
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, T, head_dim)
        attn = None
        if self.fused and not return_attention:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # (B, heads, T, T)
            attn = scores.softmax(dim=-1)
            out = (attn @ v.float()).to(v.dtype)
        out = out.transpose(1, 2).reshape(B, T, D)  # heads back into channels
        return self.proj(out), attn


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_hidden)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """Packed SwiGLU of the giant model: w12 holds [gate | value], silu(gate) * value -> w3."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.w12 = nn.Linear(cfg.dim, 2 * cfg.ffn_hidden)
        self.w3 = nn.Linear(cfg.ffn_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.dim)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.mlp: nn.Module = SwiGLU(cfg) if cfg.ffn == "swiglu" else Mlp(cfg)
        self.ls2 = LayerScale(cfg.dim)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, attn = self.attn(self.norm1(x), return_attention)
        x = x + self.ls1(a)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, attn
