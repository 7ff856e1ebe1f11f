"""CPU fast paths, applied to a loaded model by one explicit call (`apply`), never by default.

Each changes how the work is done, not what is computed; the tests hold each to the plain path:
- bf16 linears through oneDNN with the bias (and fc1's GELU) in the matmul epilogue;
- the token sequence padded to a multiple of 8 in bf16 (hidden from attention by a mask);
- big batches run in slices whose widest activation stays within a few MB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.model.layers import autocast_enabled
from dinoreg.model.vit import RegistersViT

# Slices of a batch stay under glibc's 32 MiB ceiling for reusing freed heap blocks: larger
# buffers are fresh mmap'd memory each time, and faulting those pages in costs as much as the
# GELU and bias passes together.
PASS_BYTES = 28 << 20
# The CPU SDPA kernel with bf16 weights is about a third faster at 264 keys than at 261 (a
# 16 x 16 grid): the whole forward 4-9% faster, padding and mask included. fp32, bf16 autocast
# and GPUs measured no gain.
PAD_TO = 8


def apply(model: RegistersViT, dtype: torch.dtype) -> RegistersViT:
    """Turn on the CPU fast paths that pay off for `dtype` (the dtype of the model's weights)."""
    model.max_pass_bytes = PASS_BYTES
    if dtype == torch.bfloat16:
        model.pad_tokens_to = PAD_TO
        for block in model.blocks:
            attn = block.attn
            attn.qkv, attn.proj = FusedLinear.wrap(attn.qkv), FusedLinear.wrap(attn.proj)
            mlp = block.mlp
            if isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none":
                mlp.fc1, mlp.act = FusedLinear.wrap(mlp.fc1, gelu=True), nn.Identity()
                mlp.fc2 = FusedLinear.wrap(mlp.fc2)
    return model


class FusedLinear(nn.Linear):
    """`nn.Linear` (optionally followed by the exact GELU) through oneDNN's fused bf16 linear.

    ATen's CPU linear copies the broadcast bias into the output before the matmul, and GELU is a
    third pass over the widest activation; in bf16 those passes cost more than the AMX matmul
    (measured: the forward 5-8% faster for the plain linears, 5-20% more for fc1 + GELU). In fp32
    MKL's matmul plus a separate GELU is as fast, so only bf16 inference comes here; anything
    else (fp32, autocast, gradients, torch.compile, other devices) runs the plain ops.
    """

    gelu: bool = False

    @classmethod
    def wrap(cls, linear: nn.Linear, gelu: bool = False) -> FusedLinear:
        """A FusedLinear sharing `linear`'s parameters (state-dict names stay the same)."""
        fused = cls(linear.in_features, linear.out_features, linear.bias is not None, "meta")
        fused.weight, fused.bias = linear.weight, linear.bias
        fused.gelu = gelu
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = fused_op() if self._fusable(x) else None
        if op is not None:
            if self.gelu:
                return op(x, self.weight, self.bias, "gelu", [], "none")
            return op(x, self.weight, self.bias, "none", [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.gelu(y) if self.gelu else y

    def _fusable(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.bfloat16
            and self.weight.dtype == torch.bfloat16
            and not autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.compiler.is_compiling()  # inductor cannot lower the op on plain weights
        )


@functools.cache
def fused_op() -> Callable | None:
    """oneDNN's fused linear, once it has been checked against the plain ops; None where it is
    missing, fails or disagrees (it is internal to torch, so nothing promises it)."""
    try:
        return probe(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):  # no oneDNN build: the plain ops it is
        return None


def probe(op: Callable) -> Callable | None:
    """`op` if it computes linear and linear + GELU like the plain ops on a small bf16 case."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g).to(torch.bfloat16)
    w = (torch.randn(40, 24, generator=g) / 5).to(torch.bfloat16)
    b = torch.randn(40, generator=g).to(torch.bfloat16)
    try:
        with torch.no_grad():
            got = op(x, w, b, "gelu", [], "none").float()
            plain = op(x, w, None, "none", [], "").float()
    except RuntimeError:  # no bf16 support on this CPU
        return None
    want = F.linear(x.float(), w.float())
    ok = (
        got.shape == want.shape
        and bool((got - F.gelu(want + b.float())).abs().max() <= 5e-2)  # bf16 of values ~1
        and bool((plain - want).abs().max() <= 5e-2)
    )
    return op if ok else None
