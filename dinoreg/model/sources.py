"""Model name -> weight files: aliases, hub repo ids (through the HF cache), local paths.

A name is an alias (`small`, `base-imagenet1k`, `dinov2-small`, ...), a hub repo id, a local
directory (`config.json` + safetensors, sharded too) or a single weight file. Hub files go through
huggingface_hub into the standard HF cache, so transformers and dinoreg share downloads, and
`HF_HUB_OFFLINE=1` serves them from that cache.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dinoreg.errors import WeightsError
from dinoreg.model.config import VARIANTS
from dinoreg.model.files import short_error

# the hub's rule: org/name, each part starting and ending with a letter or digit
_REPO_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights were found."""

    name: str  # as the user gave it
    files: tuple[Path, ...]
    config_file: Path | None
    repo_id: str | None = None


def known_aliases() -> list[str]:
    return list(VARIANTS)


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(Path(name).name, known_aliases(), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _looks_like_path(name: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return any(s in name for s in seps) or name.startswith((".", "~"))


def resolve(name: str) -> WeightSource:
    """Find the weight files for a model name, downloading them into the HF cache if needed.

    A name spelled exactly like a known alias (`small`, `dinov2-base`, ...; aliases never hold a
    path separator) is always that alias, even when a file or folder of that name sits in the
    working directory; write it as a path (`./small`, `small/` or absolute) to load the folder.
    Anything else is an existing directory or file, then a hub repo id (`org/name`).
    """
    if name in VARIANTS:
        return _from_hub(name, VARIANTS[name].repo_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return _local_dir(name, path)
    if path.is_file():
        sibling = path.parent / "config.json"
        return WeightSource(name, (path,), sibling if sibling.is_file() else None)
    repo_like = _REPO_ID.match(name) and ".." not in name and "--" not in name
    if repo_like and path.suffix.lower() not in _WEIGHT_SUFFIXES:
        return _from_hub(name, name)
    if path.suffix.lower() in _WEIGHT_SUFFIXES or _looks_like_path(name):
        raise WeightsError(
            f"Model path {name} does not exist and is not a model name{_did_you_mean(name)}; "
            "check the path."
        )
    raise WeightsError(
        f"Unknown model {name!r}{_did_you_mean(name)}; use one of {', '.join(known_aliases())}, "
        "a hub repo id (org/name), a local directory or a .safetensors/.pth file."
    )


def _shard_names(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` lists, or one WeightsError."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        reason = short_error(exc) if not isinstance(exc, AttributeError) else "not a JSON object"
        raise WeightsError(
            f"Shard index {index} is not a valid index ({reason}); download it again or delete it."
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(
            f"Shard index {index} has no usable weight_map (tensor name -> shard file); "
            "download it again or delete it."
        )
    return sorted(set(weight_map.values()))


def _local_dir(name: str, path: Path) -> WeightSource:
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        shards = _shard_names(index[0])
        files = tuple(path / s for s in shards)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(
                f"Model directory {path} is missing shards {', '.join(missing)}; download it again."
            )
    else:
        files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        raise WeightsError(
            f"Model directory {path} has no .safetensors weights; "
            "give a directory saved with save_pretrained or a weight file."
        )
    config = path / "config.json"
    return WeightSource(name, files, config if config.is_file() else None)


def _from_hub(name: str, repo_id: str) -> WeightSource:
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        snapshot = huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except (RepositoryNotFoundError, GatedRepoError):
        raise WeightsError(
            f"Hub repository {repo_id} was not found or is not accessible; check the name "
            f"(known aliases: {', '.join(known_aliases())})."
        ) from None
    except HFValidationError:
        raise WeightsError(
            f"Model {name} is neither an existing path nor a valid hub repo id or model name"
            f"{_did_you_mean(name)}; check the spelling."
        ) from None
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"Weights for {repo_id} are not in the local Hugging Face cache and could not be "
            "downloaded (offline or no network); connect once, or give a local directory or "
            "weight file as the model."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise WeightsError(
            f"Downloading {repo_id} failed ({exc.__class__.__name__}); check the network, "
            "or set HF_HUB_OFFLINE=1 to use the cache only."
        ) from None
    source = _local_dir(name, Path(snapshot))
    return WeightSource(name, source.files, source.config_file, repo_id)


def is_cached(repo_id: str) -> bool:
    """Whether a repo's weights are already in the local HF cache (no network)."""
    import huggingface_hub

    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True
        )
    except Exception:
        return False
    return any(Path(snapshot).glob("*.safetensors"))
