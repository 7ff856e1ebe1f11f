"""The layers of the registers ViT, named as in the original checkpoints so they load unrenamed.

Plain PyTorch: the CPU fast paths (`dinoreg.model.cpu`) are swapped in from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.model.config import ViTConfig

_REDUCED = (torch.bfloat16, torch.float16)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for a device type (torch >= 2.4 spelling, older fallback)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument and means CUDA
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


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
    """LayerNorm computed in float32 whatever the activation dtype, output in the input's dtype.

    For bf16/fp16 activations with same-dtype parameters on CPU and CUDA the native kernel
    already computes in float32 (statistics, normalisation and affine in float, one rounding at
    the end), so it runs directly: on CPU in bf16 that is 6x faster than converting around it.
    Any other mix, and autocast (which would return float32), goes through explicit float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and (
            x.dtype == torch.float32
            or (
                x.dtype in _REDUCED
                and x.device.type in ("cpu", "cuda")
                and not autocast_enabled(x.device.type)
            )
        ):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            out = F.layer_norm(
                x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
            )
        return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    `fused=True` runs `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU);
    `fused=False` runs the explicit softmax(q k^T) v in float32 (`weights`). Both compute the
    same function; the tests hold them to each other.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.fused = True

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        # rows of qkv: [q | k | v], each split into heads of head_dim; the permuted views go to
        # SDPA as they are (a contiguous copy first is slower on CPU and no faster on GPU)
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, T, head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attn_mask` is additive, broadcast over (B, heads, T, T) (it hides padding tokens)."""
        B, T, D = x.shape
        q, k, v = self._qkv(x)
        if self.fused:
            if attn_mask is not None:
                attn_mask = attn_mask.to(q.dtype)  # autocast leaves q in bf16, the mask as made
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            out = (self._softmax(q, k, attn_mask) @ v.float()).to(v.dtype)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # heads back into channels

    def weights(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Softmax attention (B, heads, len(rows), T) of the query tokens `rows`, in float32.

        `rows=slice(0, 1)` is the CLS row alone: the cost of one query, not of T.
        """
        q, k, _ = self._qkv(x)
        return self._softmax(q[:, :, rows], k)

    def _softmax(
        self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        scores = (q.float() @ k.float().transpose(-2, -1)) * self.scale
        if attn_mask is not None:
            scores = scores + attn_mask.float()
        return scores.softmax(dim=-1)


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_hidden)
        self.act: nn.Module = nn.GELU()
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x
