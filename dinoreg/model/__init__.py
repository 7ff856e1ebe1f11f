"""Our implementation of the registers ViT and its checkpoint loading. Imports nothing else of
dinoreg but errors."""

from dinoreg.model.config import VARIANTS, ViTConfig
from dinoreg.model.vit import RegistersViT, TokenOutput

__all__ = ["VARIANTS", "RegistersViT", "TokenOutput", "ViTConfig"]
