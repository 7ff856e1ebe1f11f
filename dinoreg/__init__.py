"""dinoreg: DINOv2 features (with or without registers) from images, from Python or the shell.

The API, each name loaded on first use (so `dinoreg --help` never imports torch):

- `load_model(name_or_path, device=None, dtype=None, head=None) -> RegistersViT`: a public
  checkpoint by alias, hub repo id, directory or file; `model.features(pixels)`,
  `model.forward_features(pixels) -> TokenOutput(cls, registers, patches)`.
- `preprocess_image(image_or_path, recipe=None) -> Tensor (1, 3, H, W)`: the checkpoints' own
  preprocessing, ready for the model.
- `embed(inputs, out, model="small", ...) -> RunSummary`: many images to an HDF5 file or a
  directory of .npy files, crash-safe and resumable.
- `read(path, layer=None)`, `inspect_output(path)`: rows and facts of an output.
- `classify(inputs, model="small-imagenet1k", top=5, ...)`: ImageNet-1k top-k, per input.
- `search(feats, queries, k=10)`, `dedup(feats, threshold=0.95)`: nearest rows and near-duplicate
  groups of an output; `merge(shards, out)`: the shards of one run into one output.
- `Recipe`, `ViTConfig`, `RegistersViT`, `TokenOutput`, `DinoregError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("dinoreg.model.weights", "load_model"),
    "preprocess_image": ("dinoreg.inputs.recipe", "preprocess_image"),
    "Recipe": ("dinoreg.inputs.recipe", "Recipe"),
    "embed": ("dinoreg.embedding.run", "embed"),
    "classify": ("dinoreg.classification", "classify"),
    "search": ("dinoreg.neighbours", "search"),
    "dedup": ("dinoreg.neighbours", "dedup"),
    "merge": ("dinoreg.output.shards", "merge"),
    "read": ("dinoreg.output.reader", "read"),
    "inspect_output": ("dinoreg.output.reader", "inspect_output"),
    "RegistersViT": ("dinoreg.model.vit", "RegistersViT"),
    "TokenOutput": ("dinoreg.model.vit", "TokenOutput"),
    "ViTConfig": ("dinoreg.model.config", "ViTConfig"),
    "DinoregError": ("dinoreg.errors", "DinoregError"),
}

__all__ = [
    "DinoregError",
    "Recipe",
    "RegistersViT",
    "TokenOutput",
    "ViTConfig",
    "__version__",
    "classify",
    "dedup",
    "embed",
    "inspect_output",
    "load_model",
    "merge",
    "preprocess_image",
    "read",
    "search",
]

if TYPE_CHECKING:
    from dinoreg.classification import classify
    from dinoreg.embedding.run import embed
    from dinoreg.errors import DinoregError
    from dinoreg.inputs.recipe import Recipe, preprocess_image
    from dinoreg.model.config import ViTConfig
    from dinoreg.model.vit import RegistersViT, TokenOutput
    from dinoreg.model.weights import load_model
    from dinoreg.neighbours import dedup, search
    from dinoreg.output.reader import inspect_output, read
    from dinoreg.output.shards import merge


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dinoreg' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
