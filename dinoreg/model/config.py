"""The registers-ViT configuration, its bounds, and the table of known variants and aliases."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

FfnKind = Literal["mlp", "swiglu"]
HeadKind = Literal["none", "linear", "linear4"]
Family = Literal["dinov2_with_registers", "dinov2"]

REGISTERS_FAMILY: Family = "dinov2_with_registers"
PLAIN_FAMILY: Family = "dinov2"

# Bounds on every integer field, checked before anything is allocated. They are far above the
# published models (dim 1536, 40 blocks, 37 x 37 positions) and far below what a typo or a hostile
# config.json could ask for: the widest allowed model still fits in memory, an int of 1e9 does not.
LIMITS: dict[str, tuple[int, int]] = {
    "dim": (1, 8192),
    "depth": (1, 256),
    "heads": (1, 8192),
    "patch_size": (1, 64),
    "num_registers": (0, 64),
    "ffn_hidden": (1, 16 * 8192),
    "pos_grid": (1, 256),
    "num_labels": (0, 100_000),
}
MAX_MLP_RATIO = 16.0


class ConfigError(ValueError):
    """One configuration value out of its bounds; `key` is the name the source used for it."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        super().__init__(f"{key} is {value!r}, but it must be {rule}")
        self.key, self.value, self.rule = key, value, rule


def check_int(key: str, value: Any, lo: int, hi: int) -> int:
    """`value` if it is an integer (bools and floats are not) within [lo, hi], else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(key, value, f"an integer from {lo} to {hi}")
    return value


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
    family: Family = REGISTERS_FAMILY

    def __post_init__(self) -> None:
        # the one place shapes are checked: every loader builds a ViTConfig before any tensor
        names = {f.name for f in fields(self)}
        for key, (lo, hi) in LIMITS.items():
            if key in names:
                check_int(key, getattr(self, key), lo, hi)
        if self.dim % self.heads:
            raise ConfigError("heads", self.heads, f"a divisor of dim {self.dim}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError("layer_norm_eps", eps, "a number between 0 and 1")
        if self.ffn not in ("mlp", "swiglu"):
            raise ConfigError("ffn", self.ffn, "'mlp' or 'swiglu'")
        if self.family not in (REGISTERS_FAMILY, PLAIN_FAMILY):
            raise ConfigError("family", self.family, f"{REGISTERS_FAMILY!r} or {PLAIN_FAMILY!r}")
        if (self.head == "none") != (self.num_labels == 0):
            raise ValueError("a head needs num_labels > 0, and num_labels needs a head")

    @property
    def pos_antialias(self) -> bool:
        """Whether the position grid is resized with antialiasing. The register checkpoints were
        made for it (original, HF and timm agree); transformers' plain `Dinov2Model` resizes the
        same explicit size without it, and plain checkpoints follow transformers here."""
        return self.family == REGISTERS_FAMILY

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def head_in_features(self) -> int:
        """Width of the linear head's input: [CLS, mean patch] or [4 x CLS, mean patch]."""
        return {"none": 0, "linear": 2 * self.dim, "linear4": 5 * self.dim}[self.head]

    def with_head(self, head: HeadKind, num_labels: int) -> ViTConfig:
        return replace(self, head=head, num_labels=num_labels)


def check_mlp_ratio(key: str, value: Any) -> float:
    """An MLP ratio in (0, MAX_MLP_RATIO], else ConfigError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not 0 < value <= MAX_MLP_RATIO:
        raise ConfigError(key, value, f"a number above 0 and at most {MAX_MLP_RATIO:g}")
    return float(value)


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

    @property
    def family(self) -> Family:
        return self.config.family


def _backbone(dim: int, depth: int, heads: int, ffn: FfnKind) -> ViTConfig:
    hidden = swiglu_hidden(dim) if ffn == "swiglu" else 4 * dim
    return ViTConfig(dim=dim, depth=depth, heads=heads, ffn=ffn, ffn_hidden=hidden)


def plain(cfg: ViTConfig) -> ViTConfig:
    """The same shape without registers: the DINOv2 release before "Vision Transformers Need
    Registers"."""
    return replace(cfg, num_registers=0, family=PLAIN_FAMILY)


_SIZES: dict[str, ViTConfig] = {
    "small": _backbone(384, 12, 6, "mlp"),
    "base": _backbone(768, 12, 12, "mlp"),
    "large": _backbone(1024, 24, 16, "mlp"),
    "giant": _backbone(1536, 40, 24, "swiglu"),
}

HF_ORG = "facebook"


def _variants() -> dict[str, Variant]:
    """Both families: registers (bare size aliases) first, then plain DINOv2 (`dinov2-` aliases);
    each size has a backbone and the hub's 1-layer ImageNet-1k classifier."""
    table: dict[str, Variant] = {}
    families = (("", "dinov2-with-registers", False), ("dinov2-", "dinov2", True))
    for alias_prefix, repo_stem, no_registers in families:
        for size, cfg in _SIZES.items():
            backbone = plain(cfg) if no_registers else cfg
            tokens = "CLS, patches" if no_registers else "CLS, registers, patches"
            alias = f"{alias_prefix}{size}"
            table[alias] = Variant(
                alias, f"{HF_ORG}/{repo_stem}-{size}", backbone, f"features ({tokens})"
            )
            table[f"{alias}-imagenet1k"] = Variant(
                f"{alias}-imagenet1k",
                f"{HF_ORG}/{repo_stem}-{size}-imagenet1k-1-layer",
                backbone.with_head("linear", 1000),
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
