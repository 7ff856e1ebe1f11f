"""Library parameter names -> the CLI's flags, for error messages (the one table between them)."""

from __future__ import annotations

import re

# Library errors name Python parameters; users typed flags. The one table between the two.
FLAGS = {
    "inputs": "INPUT",
    "out": "--out",
    "out_dir": "--out",
    "model": "--model",
    "head": "--head",
    "format": "--format",
    "tokens": "--tokens",
    "store_dtype": "--store-dtype",
    "image_size": "--image-size",
    "size": "--size",
    "max_size": "--max-size",
    "crop": "--no-crop",
    "keep_aspect": "--keep-aspect",
    "exact_decode": "--exact-decode",
    "layers": "--layers",
    "final_norm": "--no-final-norm",
    "device": "--device",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
    "workers": "--workers",
    "compile": "--compile",
    "decode": "--decode",
    "overwrite": "--overwrite",
    "resume": "--resume",
    "top": "--top-k",
    "pca": "--pca",
    "fit_pca": "--fit-pca",
    "mask": "--mask",
    "shard": "--shard",
    "compare": "--compare",
    "norms_histogram": "--norms-histogram",
    "feats": "FEATS",
    "threshold": "--threshold",
    "k": "-k",
    "layer": "--layer",
    "queries": "QUERY",
    "shards": "SHARD",
}


# flags that set a parameter to False
NEGATED = {"crop": "--no-crop", "final_norm": "--no-final-norm"}
# parameter names that are also plain English words: replaced only where a message clearly
# means the parameter ("pass resume=True", "another out", "with layers")
_WORDS = frozenset({"format", "model", "out", "resume", "overwrite", "size", "mask", "crop", "top"})


def as_flags(message: str, params: tuple[str, ...]) -> str:
    """A library message with its parameter names (and `name=value` spellings) as flags."""
    for name in sorted(params, key=len, reverse=True):
        flag = FLAGS.get(name)
        if flag is None:
            continue
        word = re.escape(name)

        def assigned(m: re.Match, flag: str = flag, name: str = name) -> str:
            value = m.group(1).strip("'\"")
            if value == "False" and name in NEGATED:
                return NEGATED[name]
            return flag if value in ("True", "False", "None") else f"{flag} {value}"

        message = re.sub(rf"(?<![\w-]){word}=('[^']*'|\"[^\"]*\"|[\w./-]+)", assigned, message)
        bare = rf"(?<![\w=-]){word}(?![\w=-])"
        if name in _WORDS:
            after = "|".join(f"(?<={w} )" for w in ("pass", "with", "name", "another"))
            bare = rf"(?:{after}){word}(?![\w=-])"
        message = re.sub(bare, flag, message)
    return message
