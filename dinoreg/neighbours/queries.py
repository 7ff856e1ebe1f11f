"""Query images embedded the way an output's rows were: the model and recipe FEATS records.

A different model is refused (by weight hash), so a query vector is always comparable with the
file's rows; an image that cannot be decoded is reported, and the other queries are answered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dinoreg.errors import UsageError
from dinoreg.inputs.decode import ImageDecodeError, load_image
from dinoreg.inputs.recipe import Recipe, preprocess
from dinoreg.neighbours.vectors import Vectors
from dinoreg.runtime import ComputeOptions, prepare_model


def embed_queries(
    vecs: Vectors, images: Sequence[str], compute: ComputeOptions | None = None
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(the images embedded, their (Q, D) unit vectors, (path, reason) of those that failed)."""
    meta = vecs.meta
    name, sha, recipe_doc = meta.get("model"), meta.get("weights_sha256"), meta.get("recipe")
    if not name or not recipe_doc:
        raise UsageError(
            f"feats: {vecs.path} does not record its model and recipe, so query images cannot "
            "be embedded like its rows; query with rows or stored paths instead.",
            params=("feats",),
        )
    recipe = Recipe.from_dict(recipe_doc)
    prepared = prepare_model(name, compute or ComputeOptions())
    if sha and prepared.model.info.sha256 != sha:
        raise UsageError(
            f"feats: {vecs.path} was made with other weights than {name} gives here "
            f"(sha256 {sha[:12]}... vs {prepared.model.info.sha256[:12]}...); queries would not "
            "be comparable.",
            params=("feats",),
        )
    layer = vecs.layer
    norm = meta.get("final_norm", True) is not False
    kept, vectors, failed = [], [], []
    for path in images:
        try:
            pixels = preprocess(load_image(path, recipe), recipe)[None]
        except ImageDecodeError as exc:
            failed.append((path, exc.reason))
            continue
        with prepared.inference():
            pixels = pixels.to(prepared.device)
            if layer is None:
                tokens = prepared.model.features(pixels).tokens
            else:
                block = prepared.model.block_index(layer)
                tokens = prepared.model.features(pixels, [block], norm=norm).layers[block]
        v = tokens.cls if vecs.tokens == "cls" else tokens.patches.flatten(1, 2).mean(dim=1)
        v = v[0].float().cpu()
        vectors.append((v / v.norm().clamp_min(1e-12)).numpy())
        kept.append(path)
    matrix = np.stack(vectors) if vectors else np.zeros((0, vecs.dim), np.float32)
    return kept, matrix.astype(np.float32), failed
