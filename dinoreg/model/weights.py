"""Model name -> weight files -> a loaded, strictly checked RegistersViT.

A name is an alias (`small`, `base-imagenet1k`, `dinov2-small`, ...), a hub repo id, a local
directory (`config.json` + safetensors, sharded too) or a single `.safetensors` / `.pth` file in
the HF, original or timm layout, of DINOv2 with registers or plain DINOv2. Hub files go through
huggingface_hub into the standard HF cache, so transformers and dinoreg share downloads, and
`HF_HUB_OFFLINE=1` serves them from that cache.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dinoreg.errors import WeightsError
from dinoreg.model import layouts
from dinoreg.model.config import VARIANTS, ConfigError, ViTConfig
from dinoreg.model.vit import RegistersViT

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


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of a loaded model, recorded in output files."""

    name: str
    layout: str
    sha256: str
    files: tuple[str, ...]
    labels: tuple[str, ...] | None  # class names from the checkpoint, when it has real ones
    family: str = "dinov2_with_registers"  # or "dinov2": which release the weights belong to


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
        reason = _short(exc) if not isinstance(exc, AttributeError) else "not a JSON object"
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


# -- reading files ----------------------------------------------------------------------------


# leading bytes of files people pass by mistake; none of them can hold a checkpoint
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
)


def describe_file(path: Path) -> str | None:
    """What a file that failed to load as weights really is ("a JPEG image", "a zip archive",
    "a text file"), from its first bytes; None when it looks like none of the usual suspects."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return "an empty file"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "an HEIF/AVIF image"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive"  # torch's own format is a zip too; the caller tells them apart
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not just a character cut at the 4 KiB boundary
                return None
        return "a text file"
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of one weight file; pickles only through torch.load(weights_only=True)."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(f"Weight file {path} {what}; check the path.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = describe_file(path)
        if kind == "a zip archive" and isinstance(exc, pickle.UnpicklingError):
            kind = None  # torch's zip format, refused by weights_only below
        if kind is not None:
            raise WeightsError(
                f"{path} is {kind}, not a checkpoint; give a .safetensors or .pth weight file, "
                "a model directory or a model name as the model."
            ) from None
        if isinstance(exc, pickle.UnpicklingError):
            raise WeightsError(
                f"{path} holds pickled Python objects, which dinoreg refuses to load for "
                "safety; save its state_dict (tensors only) or convert it to .safetensors."
            ) from None
        raise WeightsError(
            f"{path} could not be read as a weight file ({_short(exc)}); it may be corrupt or "
            "incomplete, so download it again."
        ) from None
    try:
        return layouts.unwrap(obj)
    except TypeError as exc:
        raise WeightsError(f"{path} is not a state dict ({exc}); give a weight file.") from None


def file_sha256(path: Path) -> str:
    """sha256 of a file; free for HF-cache blobs, which are named by it."""
    real = path.resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    return text[:160]


# -- loading ----------------------------------------------------------------------------------


def load_weights(name: str) -> tuple[RegistersViT, ModelInfo]:
    """Build and strictly load the model a name points to (on CPU, in the file's dtype)."""
    source = resolve(name)
    raw: dict[str, torch.Tensor] = {}
    for file in source.files:
        raw.update(read_state_dict(file))
    what = (
        str(source.files[0])
        if len(source.files) == 1
        else f"{source.name} ({len(source.files)} shards)"
    )
    layout = layouts.detect_layout(raw)
    if layout is None:
        sample = ", ".join(sorted(raw)[:4]) or "no tensors"
        raise WeightsError(
            f"{what} is not a DINOv2-with-registers checkpoint (nor a plain DINOv2 one) in the "
            f"HF, original or timm layout (its keys start {sample}); give a backbone weight file."
        )
    try:
        sd = layouts.to_ours(raw, layout)
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"{what} looks like a {layout} checkpoint but {exc.args[0]}.") from None
    hf_config = _read_hf_config(source) if layout == "hf" else None
    try:
        if hf_config is not None:
            cfg = layouts.hf_config(hf_config, sd)
        else:
            cfg = layouts.infer_config(sd, layouts.detect_family(raw, layout))
    except ConfigError as exc:
        if hf_config is not None:
            raise WeightsError(
                f"{source.config_file}: {exc}; correct that value in the file or replace it "
                "with the model's original config.json."
            ) from None
        raise WeightsError(
            f"{what} looks like a {layout} checkpoint but its tensors give {exc}; use an "
            "unmodified DINOv2 checkpoint (with or without registers)."
        ) from None
    except (KeyError, ValueError) as exc:
        raise WeightsError(
            f"{what} looks like a {layout} checkpoint but its configuration is unusable "
            f"({_short(exc)}); use an unmodified DINOv2 checkpoint (with or without registers)."
        ) from None
    # shapes are checked on a skeleton with no storage, so a config that disagrees with the
    # weights fails here instead of allocating what it asks for
    with torch.device("meta"):
        skeleton = RegistersViT(cfg)
    check_keys(skeleton, sd, what, layout, cfg)
    model = RegistersViT(cfg)
    model.load_state_dict(sd, strict=True)
    labels = _labels(hf_config) if hf_config else None
    sha = "+".join(file_sha256(f) for f in source.files)
    files = tuple(str(f) for f in source.files)
    info = ModelInfo(source.name, layout, sha, files, labels, cfg.family)
    return model, info


def _read_hf_config(source: WeightSource) -> dict | None:
    if source.config_file is None:
        return None
    try:
        config = json.loads(source.config_file.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{source.config_file} is not valid JSON ({_short(exc)}).") from None
    if not isinstance(config, dict):
        raise WeightsError(
            f"{source.config_file} holds a JSON {type(config).__name__}, not an object of "
            "settings; replace it with the model's original config.json."
        )
    return config


def _labels(config: Mapping) -> tuple[str, ...] | None:
    id2label = config.get("id2label") or {}
    names = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    if not names or any(n is None for n in names):
        return None
    if all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None  # placeholders, not names
    return tuple(names)


def check_keys(
    model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, layout: str, cfg: ViTConfig
) -> None:
    """Raise one WeightsError listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k} {tuple(sd[k].shape)} vs {expected[k]}"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != expected[k]
    )
    problems = [
        f"{label} {_listing(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes (file vs model)", shapes),
        )
        if keys
    ]
    if problems:
        shape = f"dim {cfg.dim}, {cfg.depth} blocks, {cfg.num_registers} registers"
        raise WeightsError(
            f"{what} looks like a {layout} checkpoint but does not fit a DINOv2 ViT ({shape}): "
            + "; ".join(problems)
            + "; use an unmodified DINOv2 checkpoint (with or without registers)."
        )


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


# -- original linear heads --------------------------------------------------------------------


def attach_head(model: RegistersViT, path: Path) -> RegistersViT:
    """Put an original `*_linear_head.pth` / `*_linear4_head.pth` head on a backbone."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise WeightsError(f"Head file {path} {what}; check the path.")
    sd = read_state_dict(path)
    weight, bias = sd.get("weight"), sd.get("bias")
    if weight is None or bias is None or weight.ndim != 2 or set(sd) != {"weight", "bias"}:
        raise WeightsError(
            f"{path} is not a linear head file (expected only 'weight' and 'bias', found "
            f"{_listing(sorted(sd))}); give a *_linear_head.pth or *_linear4_head.pth file."
        )
    dim = model.cfg.dim
    kinds = {2 * dim: "linear", 5 * dim: "linear4"}
    if weight.shape[1] not in kinds or bias.shape != (weight.shape[0],):
        raise WeightsError(
            f"{path} has a head of input width {weight.shape[1]}, which fits neither the 1-layer "
            f"({2 * dim}) nor the 4-layer ({5 * dim}) head of this dim-{dim} backbone; pick the "
            "head file of the same model size."
        )
    cfg = model.cfg.with_head(kinds[weight.shape[1]], weight.shape[0])
    if cfg.head == "linear4" and cfg.depth < 4:
        raise WeightsError(f"{path} is a 4-layer head but the backbone has {cfg.depth} blocks.")
    model.cfg = cfg
    model.head = torch.nn.Linear(cfg.head_in_features, cfg.num_labels)
    model.head.to(dtype=model.pos_embed.dtype)
    model.head.load_state_dict({"weight": weight, "bias": bias})
    return model


def load_model(
    name_or_path: str = "small",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    head: str | Path | None = None,
) -> RegistersViT:
    """Load a model by alias, hub repo id, directory or file; eval mode, on `device` in `dtype`.

    `head` puts an original linear head file on the backbone. `model.info` records provenance.
    """
    model, info = load_weights(str(name_or_path))
    if head is not None:
        attach_head(model, Path(head))
        info = ModelInfo(
            info.name,
            info.layout,
            info.sha256 + "+" + file_sha256(Path(head)),
            (*info.files, str(head)),
            None,
            info.family,
        )
    model.info = info
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)
