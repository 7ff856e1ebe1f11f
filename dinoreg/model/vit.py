"""The registers ViT: token layout, position-embedding resize, token outputs and linear heads."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.model.config import ViTConfig
from dinoreg.model.layers import Block, LayerNorm, PatchEmbed, needs_grad

_CPU_PASS_BYTES = 28 << 20  # under glibc's 32 MiB ceiling for reusing freed heap blocks
_PAD_TO = 8  # CPU bf16 attention: sequence length rounded up to a multiple of this
_POS_CACHE_SIZE = 8  # grid sizes kept; inputs of many sizes just recompute


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


@dataclass
class TokenOutput:
    """Tokens of one layer, split by role."""

    cls: torch.Tensor  # (B, D)
    registers: torch.Tensor  # (B, R, D)
    patches: torch.Tensor  # (B, h, w, D), patch tokens on their grid

    @property
    def grid(self) -> tuple[int, int]:
        return self.patches.shape[1], self.patches.shape[2]


class RegistersViT(nn.Module):
    """DINOv2 vision transformer with register tokens ("Vision Transformers Need Registers")."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm(d, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.head_in_features, cfg.num_labels) if cfg.num_labels else None
        # resized position tables by (h, w, dtype, device), each tagged with the pos_embed it was
        # made from (the object, its storage and version): replacing the parameter, swapping its
        # .data or writing into it (load_state_dict, optimisers) all miss; .to() clears it
        self._pos_cache: dict[tuple, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(), ...: tables are stale
        self._pos_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:  # weak references do not pickle; the cache is disposable
        state = self.__dict__.copy()
        state["_pos_cache"] = {}
        return state

    # -- token layout -------------------------------------------------------------------------

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position table for an h x w patch grid: (1, 1 + h*w, D), CLS row first.

        The stored square grid is resized like the register checkpoints were trained to expect:
        float32, explicit output size, bicubic with antialias; only the native grid skips it.
        """
        g = self.cfg.pos_grid
        if h == g and w == g:
            return self.pos_embed
        pos = self.pos_embed
        if needs_grad(pos) or pos.is_inference() or _compiling():
            return self._resize_pos_embed(h, w)  # (inference tensors keep no version to check)
        key = (h, w, pos.dtype, pos.device)
        hit = self._pos_cache.get(key)
        if hit is not None and hit[0]() is pos and hit[1] == (pos.data_ptr(), pos._version):
            return hit[2]
        # made outside inference mode so the cached table is an ordinary tensor for any caller
        with torch.inference_mode(False), torch.no_grad():
            table = self._resize_pos_embed(h, w)
        if len(self._pos_cache) >= _POS_CACHE_SIZE:
            self._pos_cache.pop(next(iter(self._pos_cache)))
        self._pos_cache[key] = (weakref.ref(pos), (pos.data_ptr(), pos._version), table)
        return table

    def _resize_pos_embed(self, h: int, w: int) -> torch.Tensor:
        g = self.cfg.pos_grid
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = grid.shape[-1]
        grid = grid.reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, D, g, g)
        with torch.autocast(grid.device.type, enabled=False):
            grid = F.interpolate(
                grid.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True
            ).to(self.pos_embed.dtype)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, d)  # (1, h*w, D), row-major
        return torch.cat([cls_pos, grid], dim=1)

    def prepare_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixels (B, 3, H, W) -> tokens [CLS, R registers, h*w patches] (B, 1 + R + h*w, D).

        Position embeddings go on CLS and patches; registers are inserted afterwards and carry none.
        """
        b = pixels.shape[0]
        h, w = pixels.shape[-2] // self.cfg.patch_size, pixels.shape[-1] // self.cfg.patch_size
        x = self.patch_embed(pixels)  # (B, h*w, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # (B, 1 + h*w, D)
        # the table is resized in float32 and meets the tokens in their dtype (bf16 weights
        # keep pos_embed in float32 for exactly this)
        x = x + self.interpolate_pos_embed(h, w).to(x.dtype)
        regs = self.register_tokens.expand(b, -1, -1)  # (B, R, D)
        x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)  # (B, 1 + R + h*w, D)
        return x, (h, w)

    def split_tokens(self, x: torch.Tensor, grid: tuple[int, int]) -> TokenOutput:
        """Tokens (B, 1 + R + h*w, D) -> TokenOutput with patches on their (h, w) grid."""
        r = self.cfg.num_registers
        b, _, d = x.shape
        patches = x[:, 1 + r :].reshape(b, grid[0], grid[1], d)  # (B, h, w, D)
        return TokenOutput(cls=x[:, 0], registers=x[:, 1 : 1 + r], patches=patches)

    # -- forward ------------------------------------------------------------------------------

    def block_index(self, layer: int) -> int:
        """A block index, negative counting from the end; raises IndexError when out of range."""
        depth = self.cfg.depth
        if not -depth <= layer < depth:
            raise IndexError(f"layer {layer} is out of range for a model of {depth} blocks")
        return layer % depth

    def run_blocks(
        self,
        pixels: torch.Tensor,
        collect: Sequence[int] = (),
        attention_at: Sequence[int] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor], tuple[int, int]]:
        """Run the transformer; return the last block's tokens (pre-norm), the tokens after each
        block listed in `collect`, the attention maps (B, heads, T, T) of blocks in `attention_at`,
        and the patch grid."""
        want = {self.block_index(i) for i in collect}
        maps_at = {self.block_index(i) for i in attention_at}
        b = pixels.shape[0]
        n = self.images_per_pass(pixels)
        if n >= b:
            return self._run_blocks(pixels, want, maps_at)
        passes = -(-b // n)
        parts = [self._run_blocks(p, want, maps_at) for p in pixels.split(-(-b // passes))]
        x = torch.cat([p[0] for p in parts])
        states = {i: torch.cat([p[1][i] for p in parts]) for i in want}
        maps = {i: torch.cat([p[2][i] for p in parts]) for i in maps_at}
        return x, states, maps, parts[0][3]

    def images_per_pass(self, pixels: torch.Tensor) -> int:
        """How many images go through the blocks together.

        On CPU a big batch runs in slices whose widest activation (qkv or the MLP hidden layer)
        stays within a few MB: larger buffers are fresh mmap'd memory for the allocator each
        time, and faulting those pages in costs as much as the GELU and bias passes together.
        Elsewhere (CUDA's caching allocator) the whole batch goes at once.
        """
        b = pixels.shape[0]
        if pixels.device.type != "cpu":
            return b
        cfg = self.cfg
        h, w = pixels.shape[-2] // cfg.patch_size, pixels.shape[-1] // cfg.patch_size
        tokens = 1 + cfg.num_registers + h * w
        hidden = 2 * cfg.ffn_hidden if cfg.ffn == "swiglu" else cfg.ffn_hidden
        width = max(3 * cfg.dim, hidden)
        itemsize = self.patch_embed.proj.weight.element_size()  # (pos_embed may stay fp32)
        return max(1, _CPU_PASS_BYTES // (tokens * width * itemsize))

    def _run_blocks(
        self, pixels: torch.Tensor, want: set[int], maps_at: set[int]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor], tuple[int, int]]:
        x, grid = self.prepare_tokens(pixels)
        t = x.shape[1]
        pad = self.attention_padding(x, maps_at)
        mask = None
        if pad:
            # copies of the last token, so the padding rows stay as finite as the real ones; the
            # mask keeps every real row from attending to them
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1)], dim=1)
            mask = torch.zeros(1, t + pad, dtype=x.dtype, device=x.device)
            mask[:, t:] = float("-inf")
        states: dict[int, torch.Tensor] = {}
        maps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x, attn = block(x, return_attention=i in maps_at, attn_mask=mask)
            if i in want:
                states[i] = x[:, :t] if pad else x
            if attn is not None:
                maps[i] = attn
        return (x[:, :t] if pad else x), states, maps, grid

    def attention_padding(self, x: torch.Tensor, maps_at: set[int]) -> int:
        """Tokens of padding that make the sequence a multiple of 8 for the CPU SDPA kernel.

        With bf16 weights that kernel is about a third faster at 264 keys than at 261 (a 16 x 16
        grid), the whole forward 4-9% faster, padding and mask included. fp32, bf16 autocast
        (fp32 tokens) and GPUs measured no gain; attention maps come from the explicit path,
        which never pads.
        """
        if x.device.type != "cpu" or maps_at or not all(b.attn.fused for b in self.blocks):
            return 0
        return -x.shape[1] % _PAD_TO if x.dtype == torch.bfloat16 else 0

    def forward_features(self, pixels: torch.Tensor) -> TokenOutput:
        """Final-norm CLS, register and patch tokens for a batch of normalised pixels."""
        x, _, _, grid = self.run_blocks(pixels)
        return self.split_tokens(self.norm(x), grid)

    def forward(self, pixels: torch.Tensor) -> TokenOutput:
        return self.forward_features(pixels)

    def intermediate_layers(
        self, pixels: torch.Tensor, layers: Sequence[int], norm: bool = True
    ) -> list[TokenOutput]:
        """Tokens after each listed block (negative = from the end), optionally final-normed."""
        _, states, _, grid = self.run_blocks(pixels, collect=layers)
        out = []
        for layer in layers:
            x = states[self.block_index(layer)]
            out.append(self.split_tokens(self.norm(x) if norm else x, grid))
        return out

    def attention_maps(
        self, pixels: torch.Tensor, layers: Sequence[int] = (-1,)
    ) -> list[torch.Tensor]:
        """Softmax attention (B, heads, T, T) of the listed blocks, tokens in [CLS, regs, patches]
        order."""
        _, _, maps, _ = self.run_blocks(pixels, attention_at=layers)
        return [maps[self.block_index(layer)] for layer in layers]

    # -- heads --------------------------------------------------------------------------------

    def head_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The linear head's input: [CLS, mean patch] (1-layer) or the CLS tokens of the last four
        blocks then the last block's mean patch (4-layer); registers never enter the mean."""
        if self.cfg.head == "linear4":
            outs = self.intermediate_layers(pixels, [-4, -3, -2, -1], norm=True)
            parts = [o.cls for o in outs] + [outs[-1].patches.flatten(1, 2).mean(dim=1)]
        elif self.cfg.head == "linear":
            out = self.forward_features(pixels)
            parts = [out.cls, out.patches.flatten(1, 2).mean(dim=1)]
        else:
            raise RuntimeError("this model has no classification head")
        return torch.cat(parts, dim=1)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class scores (B, num_labels) from the linear head."""
        if self.head is None:
            raise RuntimeError("this model has no classification head")
        return self.head(self.head_features(pixels))

    def use_fused_attention(self, fused: bool = True) -> RegistersViT:
        """Switch every block between SDPA (fused) and the explicit attention path."""
        for block in self.blocks:
            block.attn.fused = fused
        return self
