"""Embed images inside your own Ray Data pipeline with dinoreg's `Embedder`.

    pip install 'dinoreg[ray]'
    python examples/ray_cluster.py examples/images --out feats.parquet           # local Ray
    python examples/ray_cluster.py s3://bucket/images/ --out s3://bucket/feats/ --address auto

Read from any source Ray reads (local paths, S3, GCS, ...), embed on an actor pool (one model per
actor, on a GPU when the cluster has them), and write wherever you like; here Parquet, one row per
image with `path`, `error` ("" when the image was used) and the CLS token. Rows whose `error` is
set hold NaN features. For dinoreg's own shard files and resume, use `dinoreg.ray.embed_with_ray`
(or `dinoreg embed --ray`) instead.
"""

from __future__ import annotations

import argparse

import ray
from ray.data.expressions import col

from dinoreg.inputs.recipe import Recipe
from dinoreg.ray import Embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a directory, file, glob or bucket prefix Ray can read")
    parser.add_argument("--out", required=True, help="where Ray writes the Parquet files")
    parser.add_argument("--address", default=None, help="'auto', 'ray://host:10001', or local")
    parser.add_argument("--model", default="small")
    parser.add_argument("--actors", type=int, default=None, help="default: GPUs, else CPUs - 1")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    ray.init(address=args.address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    # Without GPUs leave one CPU for the read tasks, or actors hold every CPU and reads starve.
    actors = args.actors or gpus or max(1, int(ray.cluster_resources()["CPU"]) - 1)

    images = ray.data.read_binary_files(
        args.source,
        include_paths=True,
        file_extensions=["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"],
    )
    features = images.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model": args.model,
            "recipe": Recipe.for_size(224),  # the checkpoints' own preprocessing
            "tokens": ("cls",),
            "store_dtype": "float16",
            "batch_size": args.batch_size,
        },
        batch_size=args.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else None,
    )
    features.write_parquet(args.out)

    # Bad images are rows with a reason, never a failed job: list them from what was written.
    written = ray.data.read_parquet(args.out).select_columns(["path", "error"])
    for row in written.filter(expr=col("error") != "").take_all():
        print(f"skipped {row['path']}: {row['error']}")
    ray.shutdown()


if __name__ == "__main__":
    main()
