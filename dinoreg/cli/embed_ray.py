"""`dinoreg embed --ray`: the whole job on a Ray cluster, as shard files (and a merge)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import typer

from dinoreg.cli import output
from dinoreg.cli.app import EXIT_SKIPPED
from dinoreg.errors import UsageError


@dataclass(frozen=True)
class RayFlags:
    """The `dinoreg embed` flags that a Ray run uses."""

    image_size: int
    crop: bool
    exact_decode: bool
    keep_aspect: bool
    layers: bool
    tokens: str
    store_dtype: str
    device: str
    dtype: str
    batch_size: int
    overwrite: bool
    resume: bool


def embed_on_ray(
    inputs: list[str],
    out: str,
    model: str,
    flags: RayFlags,
    address: str,
    shards: int,
    merge_to: str | None,
    quiet: bool,
) -> None:
    """Run `embed_with_ray` with the flags of `dinoreg embed`; exit 3 when inputs were skipped."""
    if flags.keep_aspect or flags.layers:
        raise UsageError("--keep-aspect and --layers do not run on Ray yet; drop --ray or them.")
    from dinoreg.embedding.rows import OutputOptions

    try:
        from dinoreg.ray import embed_with_ray
    except ImportError:  # dinoreg.ray imports ray only when asked; this is its own import
        raise UsageError("--ray needs Ray: pip install 'dinoreg[ray]'.") from None
    # Ray Data announces every stage at INFO on stderr; a run's own lines are enough
    logging.getLogger("ray").setLevel(logging.ERROR if quiet else logging.WARNING)
    summary = embed_with_ray(
        inputs,
        Path(out),
        model,
        shards=shards,
        resume=flags.resume,
        overwrite=flags.overwrite,
        image_size=flags.image_size,
        crop=flags.crop,
        exact_decode=flags.exact_decode,
        tokens=OutputOptions(tokens=flags.tokens, store_dtype=flags.store_dtype).tokens,
        store_dtype=flags.store_dtype,
        device=flags.device,
        dtype=flags.dtype,
        batch_size=flags.batch_size,
        address=None if address == "local" else address,
    )
    for path, reason in summary.failures:
        output.skipped(path, reason)
    if merge_to is not None:
        from dinoreg.output.shards import merge

        merge(summary.shards, merge_to)
    if not quiet:
        where = f" -> merged into {merge_to}" if merge_to else ""
        output.say(
            f"embedded on Ray: {summary.rows} images ({len(summary.failures)} skipped), "
            f"{len(summary.shards)} shards in {summary.out_dir}{where}"
        )
    if summary.failures:
        raise typer.Exit(EXIT_SKIPPED)
