"""The registers ViT: token layout, position-embedding resize, token outputs and linear heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dinoreg.model.config import ViTConfig
from dinoreg.model.layers import Block, LayerNorm, PatchEmbed


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

    # -- token layout -------------------------------------------------------------------------

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position table for an h x w patch grid: (1, 1 + h*w, D), CLS row first.

        The stored square grid is resized like the register checkpoints were trained to expect:
        float32, explicit output size, bicubic with antialias; only the native grid skips it.
        """
        g = self.cfg.pos_grid
        if h == g and w == g:
            return self.pos_embed
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
        x = x + self.interpolate_pos_embed(h, w)
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
        x, grid = self.prepare_tokens(pixels)
        states: dict[int, torch.Tensor] = {}
        maps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x, attn = block(x, return_attention=i in maps_at)
            if i in want:
                states[i] = x
            if attn is not None:
                maps[i] = attn
        return x, states, maps, grid

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
