"""Position tables for any patch grid: the stored square table resized, and a small cache of them.

Every input that is not on the stored 37 x 37 grid (224 px is 16 x 16) needs a resized table;
resizing is a bicubic interpolation of the whole table, so it is made once per grid and reused.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_CACHE_SIZE = 8  # grid sizes kept; inputs of many sizes just recompute


def resize_pos_embed(
    pos_embed: torch.Tensor, grid: int, h: int, w: int, antialias: bool = True
) -> torch.Tensor:
    """(1, 1 + grid*grid, D) -> (1, 1 + h*w, D), CLS row first.

    Resized as the checkpoints expect (`ViTConfig.pos_antialias`): float32, explicit output size,
    bicubic, antialiased for the registers family only; the result keeps the table's dtype.
    """
    cls_pos, table = pos_embed[:, :1], pos_embed[:, 1:]
    d = table.shape[-1]
    table = table.reshape(1, grid, grid, d).permute(0, 3, 1, 2)  # (1, D, g, g)
    with torch.autocast(table.device.type, enabled=False):
        table = F.interpolate(
            table.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=antialias
        ).to(pos_embed.dtype)
    table = table.permute(0, 2, 3, 1).reshape(1, h * w, d)  # (1, h*w, D), row-major
    return torch.cat([cls_pos, table], dim=1)


class PositionTables:
    """Resized tables by (h, w, dtype, device), each tagged with the parameter it was made from.

    The tag is the parameter object, its storage and its version, so replacing the parameter,
    swapping its `.data` or writing into it (load_state_dict, optimisers) all miss the cache.
    Tables that need a gradient, inference tensors (which keep no version) and compiled graphs
    are never cached.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple, tuple[weakref.ref, tuple[int, int], torch.Tensor]] = {}

    def clear(self) -> None:
        self._tables.clear()

    def get(
        self, pos_embed: torch.Tensor, grid: int, h: int, w: int, antialias: bool = True
    ) -> torch.Tensor:
        if h == grid and w == grid:
            return pos_embed
        uncachable = (
            (torch.is_grad_enabled() and pos_embed.requires_grad)
            or pos_embed.is_inference()
            or torch.compiler.is_compiling()
        )
        if uncachable:
            return resize_pos_embed(pos_embed, grid, h, w, antialias)
        key = (h, w, antialias, pos_embed.dtype, pos_embed.device)
        tag = (pos_embed.data_ptr(), pos_embed._version)
        hit = self._tables.get(key)
        if hit is not None and hit[0]() is pos_embed and hit[1] == tag:
            return hit[2]
        # made outside inference mode so the cached table is an ordinary tensor for any caller
        with torch.inference_mode(False), torch.no_grad():
            table = resize_pos_embed(pos_embed, grid, h, w, antialias)
        if len(self._tables) >= _CACHE_SIZE:
            self._tables.pop(next(iter(self._tables)))
        self._tables[key] = (weakref.ref(pos_embed), tag, table)
        return table
