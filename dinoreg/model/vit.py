"""The registers ViT: token layout, one forward that returns everything, and the linear heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dinoreg.errors import UsageError
from dinoreg.model.config import ViTConfig
from dinoreg.model.layers import Block, LayerNorm, PatchEmbed
from dinoreg.model.positions import PositionTables


@dataclass
class TokenOutput:
    """Tokens of one layer, split by role."""

    cls: torch.Tensor  # (B, D)
    registers: torch.Tensor  # (B, R, D)
    patches: torch.Tensor  # (B, h, w, D), patch tokens on their grid

    @property
    def grid(self) -> tuple[int, int]:
        return self.patches.shape[1], self.patches.shape[2]

    @staticmethod
    def cat(parts: Sequence[TokenOutput]) -> TokenOutput:
        return TokenOutput(*(torch.cat([getattr(p, f) for p in parts]) for f in _TOKEN_FIELDS))


_TOKEN_FIELDS = ("cls", "registers", "patches")


@dataclass
class Features:
    """What one forward pass gives: what `embed`, `classify` and `show` read from."""

    tokens: TokenOutput  # the last block's tokens through the final norm
    last: TokenOutput  # the last block's tokens before the final norm (where norms show)
    layers: dict[int, TokenOutput] = field(default_factory=dict)  # by absolute block index
    cls_attention: torch.Tensor | None = None  # (B, heads, T): the last block's CLS row

    @property
    def grid(self) -> tuple[int, int]:
        return self.tokens.grid

    @staticmethod
    def cat(parts: Sequence[Features]) -> Features:
        first = parts[0]
        return Features(
            tokens=TokenOutput.cat([p.tokens for p in parts]),
            last=TokenOutput.cat([p.last for p in parts]),
            layers={i: TokenOutput.cat([p.layers[i] for p in parts]) for i in first.layers},
            cls_attention=None
            if first.cls_attention is None
            else torch.cat([p.cls_attention for p in parts]),
        )


class RegistersViT(nn.Module):
    """DINOv2 vision transformer with register tokens ("Vision Transformers Need Registers").

    Two knobs change how a batch is run, never what it computes (`dinoreg.model.cpu` sets them):
    `max_pass_bytes` runs a big batch in slices whose widest activation stays under that size,
    and `pad_tokens_to` pads the sequence to a multiple of it, hidden from attention by a mask.
    """

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
        self.max_pass_bytes: int | None = None
        self.pad_tokens_to = 1
        self._positions = PositionTables()

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(), ...: tables are stale
        self._positions.clear()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:  # weak references do not pickle; the cache is disposable
        state = self.__dict__.copy()
        state["_positions"] = PositionTables()
        return state

    # -- token layout -------------------------------------------------------------------------

    def interpolate_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """Position table for an h x w patch grid: (1, 1 + h*w, D), CLS row first."""
        cfg = self.cfg
        return self._positions.get(self.pos_embed, cfg.pos_grid, h, w, cfg.pos_antialias)

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

    def block_index(self, layer: int) -> int:
        """A block index, negative counting from the end; raises IndexError when out of range."""
        depth = self.cfg.depth
        if not -depth <= layer < depth:
            raise IndexError(f"layer {layer} is out of range for a model of {depth} blocks")
        return layer % depth

    # -- forward ------------------------------------------------------------------------------

    def features(
        self,
        pixels: torch.Tensor,
        layers: Sequence[int] = (),
        norm: bool = True,
        cls_attention: bool = False,
    ) -> Features:
        """The one forward pass: final tokens, the tokens of `layers` (final-normed if `norm`),
        and with `cls_attention` the last block's attention from CLS to every token."""
        self.check_pixels(pixels)
        want = tuple(sorted({self.block_index(i) for i in layers}))
        b = pixels.shape[0]
        n = self.images_per_pass(pixels)
        if n >= b:
            return self._features(pixels, want, norm, cls_attention)
        passes = -(-b // n)
        return Features.cat(
            [self._features(p, want, norm, cls_attention) for p in pixels.split(-(-b // passes))]
        )

    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Refuse what would otherwise run silently wrong: integer images, other shapes, sizes
        that drop a remainder of the patch size."""
        p = self.cfg.patch_size
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise UsageError(
                f"pixels must be a (batch, 3, height, width) tensor, got shape "
                f"{tuple(pixels.shape)}.",
                params=("pixels",),
            )
        if not pixels.is_floating_point():
            raise UsageError(
                f"pixels must be normalised floats (dinoreg.preprocess_image gives them), not "
                f"{str(pixels.dtype).removeprefix('torch.')}.",
                params=("pixels",),
            )
        h, w = pixels.shape[-2:]
        if h % p or w % p:
            raise UsageError(
                f"pixels are {h}x{w} (h x w), not multiples of the patch size {p}; resize or crop "
                f"to {max(p, h // p * p)}x{max(p, w // p * p)} or use dinoreg.preprocess_image.",
                params=("pixels",),
            )

    def images_per_pass(self, pixels: torch.Tensor) -> int:
        """How many images go through the blocks together (all, unless `max_pass_bytes`)."""
        b = pixels.shape[0]
        if self.max_pass_bytes is None:
            return b
        cfg = self.cfg
        h, w = pixels.shape[-2] // cfg.patch_size, pixels.shape[-1] // cfg.patch_size
        tokens = 1 + cfg.num_registers + h * w
        hidden = 2 * cfg.ffn_hidden if cfg.ffn == "swiglu" else cfg.ffn_hidden
        width = max(3 * cfg.dim, hidden)  # the widest activation: qkv or the FFN hidden layer
        itemsize = self.patch_embed.proj.weight.element_size()  # (pos_embed may stay fp32)
        return max(1, self.max_pass_bytes // (tokens * width * itemsize))

    def _features(
        self, pixels: torch.Tensor, want: tuple[int, ...], norm: bool, cls_attention: bool
    ) -> Features:
        x, grid = self.prepare_tokens(pixels)
        t = x.shape[1]
        x, mask = _pad(x, self.pad_tokens_to)
        last = len(self.blocks) - 1
        layers: dict[int, TokenOutput] = {}
        attention = None
        for i, block in enumerate(self.blocks):
            if cls_attention and i == last:
                attention = block.attn.weights(block.norm1(x[:, :t]), rows=slice(0, 1))[:, :, 0]
            x = block(x, mask)
            if i in want:
                layers[i] = self.split_tokens(self.norm(x[:, :t]) if norm else x[:, :t], grid)
        x = x[:, :t]
        return Features(
            tokens=self.split_tokens(self.norm(x), grid),
            last=self.split_tokens(x, grid),
            layers=layers,
            cls_attention=attention,
        )

    def forward_features(self, pixels: torch.Tensor) -> TokenOutput:
        """Final-norm CLS, register and patch tokens for a batch of normalised pixels."""
        return self.features(pixels).tokens

    def forward(self, pixels: torch.Tensor) -> TokenOutput:
        return self.forward_features(pixels)

    def intermediate_layers(
        self, pixels: torch.Tensor, layers: Sequence[int], norm: bool = True
    ) -> list[TokenOutput]:
        """Tokens after each listed block (negative = from the end), optionally final-normed."""
        out = self.features(pixels, layers, norm)
        return [out.layers[self.block_index(layer)] for layer in layers]

    def attention_maps(
        self, pixels: torch.Tensor, layers: Sequence[int] = (-1,)
    ) -> list[torch.Tensor]:
        """Softmax attention (B, heads, T, T) of the listed blocks, tokens in [CLS, regs, patches]
        order (every query row: T times the cost of `features(cls_attention=True)`)."""
        at = {self.block_index(i) for i in layers}
        x, _ = self.prepare_tokens(pixels)
        maps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if i in at:
                maps[i] = block.attn.weights(block.norm1(x))
            x = block(x)
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


def _pad(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tokens padded to a multiple of `multiple`, and the additive mask that hides the padding.

    The padding copies the last token, so its rows stay as finite as the real ones.
    """
    pad = -x.shape[1] % multiple
    if not pad:
        return x, None
    t = x.shape[1]
    x = torch.cat([x, x[:, -1:].expand(-1, pad, -1)], dim=1)
    mask = torch.zeros(1, t + pad, dtype=x.dtype, device=x.device)
    mask[:, t:] = float("-inf")
    return x, mask
