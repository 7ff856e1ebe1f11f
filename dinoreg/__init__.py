"""dinoreg: DINOv2-with-registers features from images.

`load_model` gives our registers ViT on public checkpoints; `embed` writes features of many images
to HDF5 or .npy; `read` reads them back. Heavy modules load on first use, so the CLI starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("dinoreg.model.weights", "load_model"),
    "embed": ("dinoreg.embedding.run", "embed"),
    "read": ("dinoreg.output.reader", "read"),
    "inspect_output": ("dinoreg.output.reader", "inspect_output"),
    "RegistersViT": ("dinoreg.model.vit", "RegistersViT"),
    "TokenOutput": ("dinoreg.model.vit", "TokenOutput"),
    "ViTConfig": ("dinoreg.model.config", "ViTConfig"),
    "DinoregError": ("dinoreg.errors", "DinoregError"),
}

__all__ = [
    "DinoregError",
    "RegistersViT",
    "TokenOutput",
    "ViTConfig",
    "__version__",
    "embed",
    "inspect_output",
    "load_model",
    "read",
]

if TYPE_CHECKING:
    from dinoreg.embedding.run import embed
    from dinoreg.errors import DinoregError
    from dinoreg.model.config import ViTConfig
    from dinoreg.model.vit import RegistersViT, TokenOutput
    from dinoreg.model.weights import load_model
    from dinoreg.output.reader import inspect_output, read


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dinoreg' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
