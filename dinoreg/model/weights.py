"""Model name -> weight files -> a loaded, strictly checked RegistersViT.

A name is an alias (`small`, `base-imagenet1k`, `dinov2-small`, ...), a hub repo id, a local
directory (`config.json` + safetensors, sharded too) or a single `.safetensors` / `.pth` file in
the HF, original or timm layout, of DINOv2 with registers or plain DINOv2. Hub files go through
huggingface_hub into the standard HF cache, so transformers and dinoreg share downloads, and
`HF_HUB_OFFLINE=1` serves them from that cache.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dinoreg.errors import UsageError, WeightsError
from dinoreg.model import layouts
from dinoreg.model.config import ConfigError, ViTConfig
from dinoreg.model.files import file_sha256, read_state_dict, short_error
from dinoreg.model.sources import WeightSource, resolve
from dinoreg.model.vit import RegistersViT


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of a loaded model, recorded in output files."""

    name: str
    layout: str
    sha256: str
    files: tuple[str, ...]
    labels: tuple[str, ...] | None  # class names from the checkpoint, when it has real ones
    family: str = "dinov2_with_registers"  # or "dinov2": which release the weights belong to
    replaced_head: bool = False  # `head` replaced the checkpoint's own classifier


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
            f"({short_error(exc)}); use an unmodified DINOv2 checkpoint (with or without "
            "registers)."
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
        raise WeightsError(
            f"{source.config_file} is not valid JSON ({short_error(exc)})."
        ) from None
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
    replaced = head is not None and model.head is not None
    if head is not None:
        attach_head(model, Path(head))
        info = ModelInfo(
            info.name,
            info.layout,
            info.sha256 + "+" + file_sha256(Path(head)),
            (*info.files, str(head)),
            None,
            info.family,
            replaced,
        )
    model.info = info
    model.eval().requires_grad_(False)
    try:
        return model.to(device=device, dtype=dtype)
    except (AssertionError, RuntimeError) as exc:  # torch built without that device, or no GPU
        raise UsageError(
            f"cannot put the model on device {device!r} ({short_error(exc)}); use a device this "
            "torch build has (cpu, or install the CUDA build of torch for cuda).",
            params=("device",),
        ) from None
