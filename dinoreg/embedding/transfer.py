"""A batch's rows on their way from the device to the host, without stopping the device.

The forward pass casts each token to the store dtype where it ran (float16 halves the bytes
over PCIe and spares the writer a cast) and queues a copy into page-locked memory behind it; the
writer's thread waits for that copy, so the main thread goes straight on to the next batch. On
the CPU the same code runs with plain memory and nothing to wait for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

STORE_TORCH = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class PendingRows:
    """Rows in the store dtype, copied (or being copied) to host tensors; `result()` waits."""

    host: dict[str, torch.Tensor]  # dataset name -> (B, ...) rows in the store dtype
    made_nonfinite: torch.Tensor  # host int64: values the store-dtype cast made inf or nan
    ready: torch.cuda.Event | None = None  # recorded after the copies, on CUDA
    ragged: tuple[str, ...] = ()  # datasets whose rows are (h * w, D) items, one per row
    extra: dict[str, np.ndarray] | None = None  # rows already on the host (keep-aspect grids)

    def result(self) -> tuple[dict[str, Any], int]:
        """({dataset name: rows}, values the cast made non-finite), once the copies are done."""
        if self.ready is not None:
            self.ready.synchronize()
        arrays: dict[str, Any] = {}
        for name, tensor in self.host.items():
            a = tensor.numpy()
            if name in self.ragged:
                a = list(a.reshape(a.shape[0], -1, a.shape[-1]))
            arrays[name] = a
        arrays.update(self.extra or {})
        return arrays, int(self.made_nonfinite.item())


def to_host(
    tokens: dict[str, torch.Tensor],
    store_dtype: str,
    ragged: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
) -> PendingRows:
    """Cast `tokens` to `store_dtype` on their device and queue their copy to the host."""
    dtype = STORE_TORCH[store_dtype]
    device = next(iter(tokens.values())).device if tokens else torch.device("cpu")
    cast = {name: t.to(dtype) for name, t in tokens.items()}
    made = torch.zeros((), dtype=torch.int64, device=device)
    if dtype != torch.float32:
        # Counted where the cast ran, the same count the writer's numpy cast gives: values
        # finite before and inf after (float16 overflows past +-65504).
        for name, t in tokens.items():
            made += (~torch.isfinite(cast[name])).sum() - (~torch.isfinite(t)).sum()
    if device.type == "cpu":
        return PendingRows(cast, made, None, ragged, extra)
    if device.type != "cuda":  # MPS and others: a plain blocking copy
        return PendingRows({n: t.cpu() for n, t in cast.items()}, made.cpu(), None, ragged, extra)
    host = {}
    for name, t in cast.items():
        buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host[name] = buffer.copy_(t, non_blocking=True)
    made_host = torch.empty((), dtype=torch.int64, pin_memory=True).copy_(made, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return PendingRows(host, made_host, ready, ragged, extra)
