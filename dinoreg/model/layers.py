"""The layers of the registers ViT, named as in the original checkpoints so they load unrenamed."""

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


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class FusedCpuLinear:
    """bf16 linears on CPU through oneDNN, bias (and for fc1 the erf GELU) in the matmul epilogue.

    ATen's CPU linear copies the broadcast bias into the output before the matmul, and GELU is a
    third pass over the widest activation; in bf16 those passes cost more than the AMX matmul
    (measured: the forward 5-8% faster for the plain linears, 5-20% more for fc1 + GELU). In fp32
    MKL's matmul plus a separate GELU is as fast, so fp32 never comes here.
    The op (`mkldnn::_linear_pointwise`) is internal to torch, so it is checked once against the
    plain ops and left unused where it is missing, fails or disagrees. It has no autograd, so it
    only runs when no gradient is wanted. `enabled = False` turns it off.
    """

    def __init__(self) -> None:
        self.enabled = True
        self.op = None  # the op, once the probe has passed
        self.ok: bool | None = None  # the probe's verdict, once it has run

    def usable(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        if (
            not self.enabled
            or x.device.type != "cpu"
            or x.dtype != torch.bfloat16
            or weight.dtype != torch.bfloat16
            or autocast_enabled("cpu")
            or needs_grad(x, weight)
            or torch.compiler.is_compiling()  # inductor cannot lower this op on plain weights
        ):
            return False
        if self.ok is None:
            self.ok = self._probe()
        return self.ok

    def _probe(self) -> bool:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 5, 24, generator=g).to(torch.bfloat16)
        w = (torch.randn(40, 24, generator=g) / 5).to(torch.bfloat16)
        b = torch.randn(40, generator=g).to(torch.bfloat16)
        try:
            op = torch.ops.mkldnn._linear_pointwise
            with torch.no_grad():
                got = op(x, w, b, "gelu", [], "none").float()
                plain = op(x, w, None, "none", [], "").float()
        except Exception:  # no oneDNN, no such op, no bf16 support: the plain ops it is
            return False
        want = F.linear(x.float(), w.float())
        ok = (
            got.shape == want.shape
            and bool((got - F.gelu(want + b.float())).abs().max() <= 5e-2)  # bf16 of values ~1
            and bool((plain - want).abs().max() <= 5e-2)
        )
        self.op = op if ok else None
        return ok

    def gelu_linear(self, x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
        """gelu(fc(x)), in one pass where usable."""
        if self.usable(x, fc.weight):
            return self.op(x, fc.weight, fc.bias, "gelu", [], "none")
        return F.gelu(fc(x))

    def linear(self, x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
        """fc(x), without the bias copy where usable."""
        if self.usable(x, fc.weight):
            return self.op(x, fc.weight, fc.bias, "none", [], "")
        return fc(x)


fused_cpu = FusedCpuLinear()


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
        self,
        x: torch.Tensor,
        return_attention: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attn_mask`: additive, broadcast over (B, heads, T, T); the SDPA path only (it hides
        padding tokens, see `RegistersViT.attention_padding`)."""
        B, T, D = x.shape
        # rows of qkv: [q | k | v], each split into heads of head_dim; the permuted views go to
        # SDPA as they are (a contiguous copy first is slower on CPU and no faster on GPU)
        qkv = fused_cpu.linear(x, self.qkv).reshape(B, T, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, T, head_dim)
        attn = None
        if self.fused and not return_attention:
            if attn_mask is not None:
                attn_mask = attn_mask.to(q.dtype)  # autocast leaves q in bf16, the mask as made
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            if attn_mask is not None:
                raise ValueError("the explicit attention path takes no mask")
            scores = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # (B, heads, T, T)
            attn = scores.softmax(dim=-1)
            out = (attn @ v.float()).to(v.dtype)
        out = out.transpose(1, 2).reshape(B, T, D)  # heads back into channels
        return fused_cpu.linear(out, self.proj), attn


class Mlp(nn.Module):
    """Linear -> exact (erf) GELU -> Linear."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_hidden)
        self.fc2 = nn.Linear(cfg.ffn_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_cpu.linear(fused_cpu.gelu_linear(x, self.fc1), self.fc2)


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
        self,
        x: torch.Tensor,
        return_attention: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, attn = self.attn(self.norm1(x), return_attention, attn_mask)
        # x + gamma * branch in one pass; the input x is never written (callers keep it)
        x = torch.addcmul(x, a, self.ls1.gamma)
        m = self.mlp(self.norm2(x))
        if needs_grad(x, m, self.ls2.gamma):
            return torch.addcmul(x, m, self.ls2.gamma), attn
        return x.addcmul_(m, self.ls2.gamma), attn  # x is this block's own tensor here
