"""What an embed run stores: its options, the datasets (names, shapes), provenance, and the
model's outputs turned into rows for the writer.

Datasets by option:
- default: `cls` (N, D), `registers` (N, R, D), `patches` (N, h, w, D), final-normed;
- `layers`: the same tokens under `layers/<block>/` for each requested block (absolute index,
  e.g. `layers/11/cls`), final-normed unless `final_norm=False`; the root datasets are then not
  written (the final output equals `layers=(-1,)`);
- `keep_aspect`: every `patches` dataset is ragged, (total patches, D) plus `patches_offsets`
  (N + 1,) (row i = items offsets[i]:offsets[i + 1]), and `grids` (N, 2) int32 holds each row's
  patch grid (h, w), row-major like the patches.

A checkpoint with no registers stores no `registers` dataset (a dataset needs a positive row
shape); its metadata says `num_registers: 0` and `stored_tokens` lists what is there, and
`read` gives such rows an empty (0, D) `registers`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from dinoreg import __version__
from dinoreg.embedding.transfer import PendingRows, to_host
from dinoreg.errors import UsageError
from dinoreg.inputs.recipe import Recipe
from dinoreg.model.vit import RegistersViT
from dinoreg.output.layout import DatasetSpec
from dinoreg.runtime import PreparedModel

TOKENS = ("cls", "registers", "patches")
GRIDS = "grids"
Mode = Literal["new", "overwrite", "resume"]


@dataclass(frozen=True)
class OutputOptions:
    """What is stored and how."""

    tokens: tuple[str, ...] | str = TOKENS  # a string is split on commas
    store_dtype: str = "float32"
    format: str | None = None  # None: from the output path
    mode: Mode = "new"
    layers: tuple[int, ...] | None = None  # blocks to store (negative: from the end)
    final_norm: bool = True  # apply the final LayerNorm to the stored blocks

    def __post_init__(self) -> None:
        # "cls" or "cls,patches" is a list of names, not of characters; any case
        given = self.tokens.split(",") if isinstance(self.tokens, str) else self.tokens
        tokens = tuple(str(t).strip().lower() for t in given)
        object.__setattr__(self, "tokens", tokens)
        twice = sorted({t for t in tokens if tokens.count(t) > 1})
        if twice:
            raise UsageError(
                f"tokens names {', '.join(twice)} more than once; list each token once.",
                params=("tokens",),
            )
        unknown = [t for t in self.tokens if t not in TOKENS]
        if unknown or not self.tokens:
            raise UsageError(
                f"tokens takes a subset of {','.join(TOKENS)}; "
                f"got {','.join(self.tokens) or 'nothing'}.",
                params=("tokens",),
            )
        if self.store_dtype not in ("float32", "float16"):
            raise UsageError(
                f"store_dtype must be float32 or float16, not {self.store_dtype!r}.",
                params=("store_dtype",),
            )
        if self.layers is not None:
            layers = tuple(self.layers)
            ints = all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
            if not layers or not ints:
                raise UsageError(
                    f"layers takes block indices like (-1,) or (-4, -3, -2, -1); got "
                    f"{self.layers!r}.",
                    params=("layers",),
                )
            object.__setattr__(self, "layers", layers)
        elif not self.final_norm:
            raise UsageError(
                "final_norm=False only applies with layers (the default tokens are always "
                "final-normed); pass layers or drop final_norm=False.",
                params=("final_norm", "layers"),
            )


def resolve_layers(layers: Sequence[int], model: RegistersViT) -> tuple[int, ...]:
    """Absolute block indices (`model.block_index`), ascending and unique; UsageError names the
    model's depth."""
    depth = model.cfg.depth
    try:
        return tuple(sorted({model.block_index(layer) for layer in layers}))
    except IndexError:
        bad = next(layer for layer in layers if not -depth <= layer < depth)
        raise UsageError(
            f"layers {bad} is out of range for this model, which has {depth} blocks "
            f"(use 0..{depth - 1} or -{depth}..-1).",
            params=("layers",),
        ) from None


def stored_tokens(output: OutputOptions, registers: int) -> tuple[str, ...]:
    """The tokens that get datasets: all asked for, but registers only if the model has some."""
    return tuple(t for t in output.tokens if t != "registers" or registers > 0)


def dataset_specs(
    dim: int, registers: int, grid: tuple[int, int] | None, output: OutputOptions
) -> tuple[DatasetSpec, ...]:
    """The datasets of an output; `grid` None means keep-aspect (ragged patches plus `grids`).

    `output.layers` must already be absolute (`resolve_layers`).
    """
    ragged = grid is None
    shapes = {
        "cls": (dim,),
        "registers": (registers, dim),
        "patches": (dim,) if grid is None else (*grid, dim),
    }
    prefixes = [f"layers/{i}/" for i in output.layers] if output.layers is not None else [""]
    specs = [
        DatasetSpec(prefix + t, shapes[t], output.store_dtype, ragged=ragged and t == "patches")
        for prefix in prefixes
        for t in stored_tokens(output, registers)
    ]
    if ragged:
        specs.append(DatasetSpec(GRIDS, (2,), "int32"))
    return tuple(specs)


def provenance(prepared: PreparedModel, recipe: Recipe, output: OutputOptions) -> dict:
    """What an output records about how its rows were made (checked again on resume)."""
    model = prepared.model
    info = model.info
    return {
        "dinoreg_version": __version__,
        "model": info.name,
        "weights_sha256": info.sha256,
        "weights_layout": info.layout,
        "dim": model.cfg.dim,
        "depth": model.cfg.depth,
        "num_registers": model.cfg.num_registers,
        "family": model.cfg.family,
        "image_size": recipe.image_size,
        "keep_aspect": recipe.keep_aspect,
        "grid": list(recipe.grid) if recipe.grid is not None else None,
        "recipe": recipe.to_dict(),
        "compute_dtype": str(prepared.dtype).removeprefix("torch."),
        "store_dtype": output.store_dtype,
        "tokens": list(output.tokens),
        "stored_tokens": list(stored_tokens(output, model.cfg.num_registers)),
        "layers": list(output.layers) if output.layers is not None else None,
        "final_norm": output.final_norm,
        "device": prepared.device.type,
    }


def make_forward(
    prepared: PreparedModel, output: OutputOptions, keep_aspect: bool
) -> Callable[[torch.Tensor], PendingRows]:
    """pixels (B, 3, H, W) on the device -> the rows for `write_batch`, in the store dtype, on
    their way to the host (`PendingRows.result()` waits for them)."""
    model = prepared.model
    tokens = stored_tokens(output, model.cfg.num_registers)

    def forward(pixels: torch.Tensor) -> PendingRows:
        with prepared.inference():
            if output.layers is None:
                outs = [("", model.features(pixels).tokens)]
            else:
                out = model.features(pixels, output.layers, norm=output.final_norm)
                outs = [(f"layers/{i}/", out.layers[i]) for i in output.layers]
            rows = {prefix + t: getattr(out, t) for prefix, out in outs for t in tokens}
            if not keep_aspect:
                return to_host(rows, output.store_dtype)
            # ragged patches: (h * w, D) per row, and each row's grid beside them
            ragged = tuple(prefix + "patches" for prefix, _ in outs if "patches" in tokens)
            grid = np.asarray(outs[0][1].grid, np.int32)
            extra = {GRIDS: np.tile(grid, (pixels.shape[0], 1))}
            return to_host(rows, output.store_dtype, ragged, extra)

    return forward
