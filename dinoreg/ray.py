"""The Ray Data adapter: `Embedder` for `Dataset.map_batches` on an actor pool, and
`embed_with_ray`, which embeds a list of inputs on a Ray cluster into shard files.

Ray is an optional extra (`pip install 'dinoreg[ray]'`) and is imported here only, inside the
functions that need it: `import dinoreg`, the CLI and `Embedder` itself never import it.

    ds = ray.data.read_binary_files(paths, include_paths=True)
    ds = ds.map_batches(
        Embedder, fn_constructor_kwargs={"model": "small", "tokens": ("cls",)},
        batch_size=32, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=4),
        num_gpus=1,
    )

Rows in: `bytes` (the file's contents) and/or `path`; without `bytes` the actor reads `path`
itself. Rows out: every input column except `bytes`, plus `path`, `error` ("" when the image
was used, else the reason it was not) and the requested token columns (`cls` (D,),
`registers` (R, D), `patches` (h, w, D)) in the store dtype; a failed row's features are NaN.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dinoreg.embedding.rows import TOKENS, OutputOptions, make_forward
from dinoreg.embedding.run import embed_recipe
from dinoreg.errors import UsageError
from dinoreg.inputs.decode import MAX_PIXELS, ImageDecodeError, _decode, _orient, load_image
from dinoreg.inputs.discover import as_input_list, discover
from dinoreg.inputs.recipe import Recipe, preprocess, to_rgb
from dinoreg.runtime import ComputeOptions, prepare_model

RAY_PIN = "ray[data]>=2.60,<2.64"  # 2.64 drops max_restarts/max_task_retries in map_batches


def decode_bytes(
    data: bytes, path: str, recipe: Recipe, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """`load_image` for a file already in memory: the same checks, draft decode and EXIF
    orientation, and the same reasons in ImageDecodeError; `path` only names the image."""
    if len(data) == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    image = _decode(io.BytesIO(data), path, recipe, max_pixels)
    try:
        return to_rgb(_orient(image), recipe.background)
    except Exception as exc:
        raise ImageDecodeError(path, f"cannot convert mode {image.mode} to RGB ({exc})") from exc


@dataclass(frozen=True)
class EmbedderOptions:
    """What one actor computes; the same settings give the same rows as `dinoreg.embed`."""

    model: str = "small"
    recipe: Recipe = field(default_factory=Recipe)
    tokens: tuple[str, ...] = TOKENS
    store_dtype: str = "float32"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 16  # images per forward pass; a Ray batch larger than this is split

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        OutputOptions(tokens=self.tokens, store_dtype=self.store_dtype)  # validates both
        ComputeOptions(device=self.device, dtype=self.dtype, batch_size=self.batch_size)
        if self.recipe.keep_aspect:
            # Ragged patch grids do not fit a fixed-shape tensor column.
            raise UsageError("keep_aspect is not supported with Ray yet; use a fixed image size.")


class Embedder:
    """A callable class for `Dataset.map_batches`: one model per actor, loaded in `__init__`."""

    def __init__(
        self,
        model: str = "small",
        *,
        recipe: Recipe | None = None,
        tokens: Sequence[str] = TOKENS,
        store_dtype: str = "float32",
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
    ) -> None:
        self.options = EmbedderOptions(
            model, recipe or Recipe(), tuple(tokens), store_dtype, device, dtype, batch_size
        )
        o = self.options
        compute = ComputeOptions(device=o.device, dtype=o.dtype, batch_size=o.batch_size)
        self.prepared = prepare_model(o.model, compute)
        cfg = self.prepared.model.cfg
        grid = o.recipe.grid or (0, 0)
        shapes = {"cls": (cfg.dim,), "registers": (cfg.num_registers, cfg.dim)}
        shapes["patches"] = (*grid, cfg.dim)
        self.shapes = {t: shapes[t] for t in o.tokens}
        output = OutputOptions(tokens=o.tokens, store_dtype=o.store_dtype)
        self._forward = make_forward(self.prepared, output, keep_aspect=False)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        o = self.options
        if "bytes" not in batch and "path" not in batch:
            raise ValueError("Embedder needs a `bytes` or a `path` column")
        n = len(batch["bytes" if "bytes" in batch else "path"])
        paths = [str(p) for p in batch["path"]] if "path" in batch else [""] * n
        blobs = batch.get("bytes")
        errors = [""] * n
        pixels: dict[int, torch.Tensor] = {}
        for i, path in enumerate(paths):
            try:
                if blobs is not None:
                    image = decode_bytes(bytes(blobs[i]), path, o.recipe)
                else:
                    image = load_image(path, o.recipe)
                pixels[i] = preprocess(image, o.recipe)
            except ImageDecodeError as exc:
                errors[i] = exc.reason
        out = {k: v for k, v in batch.items() if k != "bytes"}
        out["path"] = np.array(paths, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        for token, shape in self.shapes.items():
            out[token] = np.full((n, *shape), np.nan, dtype=o.store_dtype)
        good = sorted(pixels)
        for start in range(0, len(good), o.batch_size):
            rows = good[start : start + o.batch_size]
            stacked = torch.stack([pixels[i] for i in rows]).to(self.prepared.device)
            arrays, _ = self._forward(stacked).result()
            for token in self.shapes:
                out[token][rows] = arrays[token]
        return out


@dataclass(frozen=True)
class RayOptions:
    """How the actor pool is laid out on the cluster."""

    address: str | None = None  # None: a running Ray in this process, else a new local one
    num_actors: int | None = None  # None: as many as the cluster's GPUs (or CPUs) allow
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    max_restarts: int = 8  # times one actor is restarted after its process died
    max_task_retries: int = 3  # times one batch is retried after its actor died

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise UsageError("num_actors must be at least 1.", params=("num_actors",))
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise UsageError(
                "max_restarts and max_task_retries must be 0 or more.",
                params=("max_restarts", "max_task_retries"),
            )
        if self.cpus_per_actor <= 0:
            raise UsageError("cpus_per_actor must be positive.", params=("cpus_per_actor",))


@dataclass
class RayRunSummary:
    """The outcome of `embed_with_ray`."""

    out_dir: Path
    inputs: int
    shards: list[Path]  # every shard file of the output, in shard order
    skipped_shards: int  # complete shards a resumed run kept
    rows: int  # rows written by this run
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    num_actors: int = 0
    seconds: float = 0.0


@dataclass
class RayProgress:
    done: int  # inputs handled so far in this run
    total: int  # inputs this run handles
    shards_done: int


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError(f"Ray is not installed; pip install 'dinoreg[ray]' ({RAY_PIN}).") from None
    return ray


def embed_with_ray(
    inputs: Sequence[str] | str,
    out_dir: str | Path,
    model: str = "small",
    *,
    shards: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    image_size: int = 224,
    crop: bool | None = None,
    exact_decode: bool = False,
    tokens: Sequence[str] = TOKENS,
    store_dtype: str = "float32",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 16,
    address: str | None = None,
    num_actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 1.0,
    max_restarts: int = 8,
    max_task_retries: int = 3,
    progress: Callable[[RayProgress], None] | None = None,
) -> RayRunSummary:
    """Embed inputs on a Ray cluster into `out_dir/feats-0000I-of-0000N.h5` (`shards` files).

    `address`: None uses a Ray already started in this process or starts a local one; "auto"
    joins the cluster this machine belongs to; "ray://host:10001" connects a Ray client. Inputs
    are discovered here and read by the actors, so the workers must see the same paths (a
    shared file system). `resume` keeps shards that are complete and made with the same
    settings and inputs; `overwrite` deletes this output's shard files first.
    """
    from dinoreg.distributed.driver import run

    if overwrite and resume:
        raise UsageError("overwrite and resume contradict each other; pick one.")
    embedder = EmbedderOptions(
        model=model,
        recipe=embed_recipe(image_size, crop=crop, exact_decode=exact_decode),
        tokens=tuple(tokens),
        store_dtype=store_dtype,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
    )
    cluster = RayOptions(
        address, num_actors, gpus_per_actor, cpus_per_actor, max_restarts, max_task_retries
    )
    paths = discover(as_input_list(inputs))
    if not 1 <= shards <= len(paths):
        raise UsageError(
            f"shards must be between 1 and the number of inputs ({len(paths)}), got {shards}.",
            params=("shards",),
        )
    start = time.perf_counter()
    summary = run(
        _ray(), paths, Path(out_dir), embedder, cluster, shards, resume, overwrite, progress
    )
    summary.seconds = time.perf_counter() - start
    return summary
