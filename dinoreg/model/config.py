"""The registers-ViT configuration and the table of known variants and aliases."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

FfnKind = Literal["mlp", "swiglu"]
HeadKind = Literal["none", "linear", "linear4"]


@dataclass(frozen=True)
class ViTConfig:
    """Shape of one registers ViT; every field is a fact of a checkpoint, not a runtime option."""

    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch_size: int = 14
    num_registers: int = 4
    ffn: FfnKind = "mlp"
    ffn_hidden: int = 1536  # MLP hidden width; for SwiGLU the width of each of the two halves
    pos_grid: int = 37  # side of the stored square position grid (518 / 14 for the checkpoints)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    head: HeadKind = "none"
    num_labels: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if (self.head == "none") != (self.num_labels == 0):
            raise ValueError("a head needs num_labels > 0, and num_labels needs a head")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def head_in_features(self) -> int:
        """Width of the linear head's input: [CLS, mean patch] or [4 x CLS, mean patch]."""
        return {"none": 0, "linear": 2 * self.dim, "linear4": 5 * self.dim}[self.head]

    def with_head(self, head: HeadKind, num_labels: int) -> ViTConfig:
        return replace(self, head=head, num_labels=num_labels)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """Width of each SwiGLU half: two thirds of the MLP width, rounded up to a multiple of 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


@dataclass(frozen=True)
class Variant:
    """A published model: its alias, hub repo and shape."""

    alias: str
    repo_id: str
    config: ViTConfig
    purpose: str


def _backbone(dim: int, depth: int, heads: int, ffn: FfnKind) -> ViTConfig:
    hidden = swiglu_hidden(dim) if ffn == "swiglu" else 4 * dim
    return ViTConfig(dim=dim, depth=depth, heads=heads, ffn=ffn, ffn_hidden=hidden)


_SIZES: dict[str, ViTConfig] = {
    "small": _backbone(384, 12, 6, "mlp"),
    "base": _backbone(768, 12, 12, "mlp"),
    "large": _backbone(1024, 24, 16, "mlp"),
    "giant": _backbone(1536, 40, 24, "swiglu"),
}

HF_ORG = "facebook"


def _variants() -> dict[str, Variant]:
    table: dict[str, Variant] = {}
    for size, cfg in _SIZES.items():
        table[size] = Variant(
            size,
            f"{HF_ORG}/dinov2-with-registers-{size}",
            cfg,
            "features (CLS, registers, patches)",
        )
        table[f"{size}-imagenet1k"] = Variant(
            f"{size}-imagenet1k",
            f"{HF_ORG}/dinov2-with-registers-{size}-imagenet1k-1-layer",
            cfg.with_head("linear", 1000),
            "ImageNet-1k classifier (1-layer linear head)",
        )
    return table


VARIANTS: dict[str, Variant] = _variants()
DEFAULT_MODEL = "small"
DEFAULT_CLASSIFIER = "small-imagenet1k"


def count_parameters(cfg: ViTConfig) -> int:
    """Parameters of the model as published (mask token and full position table included)."""
    d = cfg.dim
    embed = d * 3 * cfg.patch_size**2 + d  # patch projection
    embed += d + d * cfg.num_registers + d  # cls, registers, mask token
    embed += d * (1 + cfg.pos_grid**2)
    attn = 3 * d * d + 3 * d + d * d + d
    if cfg.ffn == "mlp":
        ffn = 2 * d * cfg.ffn_hidden + cfg.ffn_hidden + d
    else:
        ffn = d * 2 * cfg.ffn_hidden + 2 * cfg.ffn_hidden + cfg.ffn_hidden * d + d
    block = attn + ffn + 4 * d + 2 * d  # two norms, two layer scales
    head = cfg.head_in_features * cfg.num_labels + cfg.num_labels
    return embed + cfg.depth * block + 2 * d + head
