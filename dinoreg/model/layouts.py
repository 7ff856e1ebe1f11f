"""Checkpoint layouts (HF, original, timm): detect one from its keys and convert it to ours.

Each converter is a pure `state_dict -> state_dict` function; our names are the original release's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch

from dinoreg.model.config import (
    LIMITS,
    PLAIN_FAMILY,
    REGISTERS_FAMILY,
    ConfigError,
    Family,
    ViTConfig,
    check_int,
    check_mlp_ratio,
    swiglu_hidden,
)

Layout = Literal["hf", "original", "timm"]
StateDict = dict[str, torch.Tensor]

HF_PREFIX = "dinov2_with_registers."
# transformers' classifiers keep the backbone under the model type's prefix
HF_PREFIXES = (HF_PREFIX, "dinov2.")
HF_MODEL_TYPES: dict[str, Family] = {
    "dinov2_with_registers": REGISTERS_FAMILY,
    "dinov2": PLAIN_FAMILY,
}
# wrappers that training scripts and older exports put around the weights
_NESTING_KEYS = ("model", "state_dict", "teacher", "module")
_STRIP_PREFIXES = ("module.", "backbone.")


def unwrap(obj: Any) -> StateDict:
    """The tensor dict inside a loaded checkpoint, with common wrappers and prefixes removed."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [obj[k] for k in _NESTING_KEYS if k in obj and isinstance(obj[k], Mapping)]
        if not inner:
            break
        obj = inner[0]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a dict of tensors, found {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: Mapping[str, torch.Tensor]) -> Layout | None:
    """Which published layout these keys follow, or None when it is none of them."""
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd):
        return "hf"
    if "patch_embed.proj.weight" in sd and "pos_embed" in sd:
        rows = sd["pos_embed"].shape[1]
        # timm folds the CLS position into cls_token, so its table is a bare square grid
        if "reg_token" in sd or math.isqrt(rows) ** 2 == rows:
            return "timm"
        return "original"
    return None


def detect_family(sd: Mapping[str, torch.Tensor], layout: Layout) -> Family:
    """Which release weights without a config come from: only the register models store the
    register tokens, in every layout (a register model trained with zero of them is
    indistinguishable and follows the plain release's position resize)."""
    names = {"hf": "embeddings.register_tokens", "original": "register_tokens", "timm": "reg_token"}
    key = names[layout]
    if any(k == key or k.endswith("." + key) for k in sd):
        return REGISTERS_FAMILY
    return PLAIN_FAMILY


def _strip_hf_prefix(key: str) -> str:
    for prefix in HF_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


# -- HF -> ours -------------------------------------------------------------------------------

_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.(?:weights_out|down_proj)\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
# q, k, v (4.x on-disk names, then 5.x in-memory names) are stacked into one qkv projection
_HF_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
)
_HF_GATE_UP = re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(gate|up)_proj\.(weight|bias)$")
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def hf_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Transformers' layout (with or without the classifier's backbone prefix) -> ours.

    Raises KeyError for a missing attention part, ValueError when q, k, v disagree in shape."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    gate_up: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in sd.items():
        key = _strip_hf_prefix(key)
        if key == "embeddings.mask_token":
            continue  # pre-training only
        if m := _HF_QKV.match(key):
            part = _QKV_ORDER[m.group(2) or m.group(3)]
            qkv.setdefault((m.group(1), m.group(4)), {})[part] = value
            continue
        if m := _HF_GATE_UP.match(key):
            gate_up.setdefault((m.group(1), m.group(3)), {})[m.group(2) == "up"] = value
            continue
        for pattern, repl in _HF_RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value  # left for the strict check to report
    for (layer, kind), parts in qkv.items():
        if len(parts) != 3:
            missing = {"query", "key", "value"} - {k for k, v in _QKV_ORDER.items() if v in parts}
            raise KeyError(f"block {layer} lacks the attention {kind} of {sorted(missing)[0]}")
        shapes = [tuple(parts[i].shape) for i in range(3)]
        if len(set(shapes)) > 1:
            # stacking would fail inside torch, or succeed into a qkv that names none of them
            raise ValueError(
                f"block {layer}'s attention query, key and value {kind}s have shapes "
                f"{shapes[0]}, {shapes[1]} and {shapes[2]}, which must be equal"
            )
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]])
    for (layer, kind), parts in gate_up.items():
        if len(parts) == 2:  # the gate is the first, SiLU-activated half of the packed w12
            out[f"blocks.{layer}.mlp.w12.{kind}"] = torch.cat([parts[False], parts[True]])
    return out


# config.json key -> (our field, default when absent); None: required
_HF_INT_KEYS: dict[str, tuple[str, int | None]] = {
    "hidden_size": ("dim", None),
    "num_hidden_layers": ("depth", None),
    "num_attention_heads": ("heads", None),
    "patch_size": ("patch_size", 14),
    "num_register_tokens": ("num_registers", 4),
}


class _Missing:
    def __repr__(self) -> str:
        return "missing"


def _hf_int(config: Mapping[str, Any], key: str) -> int:
    field, default = _HF_INT_KEYS[key]
    if key not in config:
        if default is None:
            raise ConfigError(key, _Missing(), "present")
        return default
    return check_int(key, config[key], *LIMITS[field])


def _hf_flag(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def hf_config(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> ViTConfig:
    """ViTConfig from a transformers `config.json` (plus the converted weights for the head).

    Every value is checked against the bounds before use; a bad one raises ConfigError naming
    the config.json key."""
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError("model_type", model_type, " or ".join(map(repr, HF_MODEL_TYPES)))
    family = HF_MODEL_TYPES[model_type]
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConfigError("hidden_act", config["hidden_act"], "'gelu'")
    dim = _hf_int(config, "hidden_size")
    depth = _hf_int(config, "num_hidden_layers")
    heads = _hf_int(config, "num_attention_heads")
    if dim % heads:
        raise ConfigError("num_attention_heads", heads, f"a divisor of hidden_size {dim}")
    patch = _hf_int(config, "patch_size")
    # transformers' plain Dinov2Config has no registers at all, whatever the file says
    registers = _hf_int(config, "num_register_tokens") if family == REGISTERS_FAMILY else 0
    ratio = check_mlp_ratio("mlp_ratio", config.get("mlp_ratio", 4))
    image_size = config.get("image_size", 518)
    grid_lo, grid_hi = LIMITS["pos_grid"]
    check_int("image_size", image_size, grid_lo * patch, grid_hi * patch + patch - 1)
    eps = config.get("layer_norm_eps", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ConfigError("layer_norm_eps", eps, "a number between 0 and 1")
    swiglu = _hf_flag(config, "use_swiglu_ffn", False)
    head = sd.get("head.weight")
    try:
        return ViTConfig(
            dim=dim,
            depth=depth,
            heads=heads,
            patch_size=patch,
            num_registers=registers,
            ffn="swiglu" if swiglu else "mlp",
            ffn_hidden=swiglu_hidden(dim, ratio) if swiglu else int(dim * ratio),
            pos_grid=image_size // patch,
            layer_norm_eps=float(eps),
            qkv_bias=_hf_flag(config, "qkv_bias", True),
            head="linear" if head is not None else "none",
            num_labels=int(head.shape[0]) if head is not None else 0,
            family=family,
        )
    except ConfigError as exc:
        # only derived values reach here (the hidden width, the head); name their source
        source = {"ffn_hidden": "mlp_ratio", "num_labels": "classifier.weight"}
        raise ConfigError(source.get(exc.key, exc.key), exc.value, exc.rule) from None


# -- original and timm -> ours ----------------------------------------------------------------

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def original_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The original release's layout is ours; drop the mask token and flatten block chunks."""
    out: StateDict = {}
    for key, value in sd.items():
        if key == "mask_token":
            continue
        out[_CHUNKED_BLOCK.sub(r"blocks.\1.", key)] = value
    return out


def timm_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """timm's layout -> ours. timm folded the CLS position into cls_token and dropped its row:
    a zero CLS position row gives exactly the same sum."""
    out: StateDict = {}
    swiglu = _timm_is_swiglu(sd)
    for key, value in sd.items():
        if key == "reg_token":
            key = "register_tokens"
        elif key == "pos_embed":
            value = torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], dim=1)
        elif swiglu:
            key = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", key)
            key = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key)
        out[key] = value
    return out


def _timm_is_swiglu(sd: Mapping[str, torch.Tensor]) -> bool:
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def infer_config(sd: Mapping[str, torch.Tensor], family: Family = REGISTERS_FAMILY) -> ViTConfig:
    """ViTConfig from our-layout weights alone. Heads are not stored in the weights: every
    published size uses 64-wide heads, so heads = dim / 64. Raises ConfigError when the shapes
    are out of bounds (a key `blocks.999999.` asks for that many blocks)."""
    dim = sd["cls_token"].shape[-1]
    blocks = [int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))]
    if not blocks:
        raise KeyError("it has no blocks.N keys")
    depth = 1 + max(blocks)
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[
        1 if swiglu else 0
    ]
    rows = sd["pos_embed"].shape[1] - 1
    head = sd.get("head.weight")
    return ViTConfig(
        dim=dim,
        depth=depth,
        heads=max(1, dim // 64),
        patch_size=sd["patch_embed.proj.weight"].shape[-1],
        num_registers=sd["register_tokens"].shape[1] if "register_tokens" in sd else 0,
        ffn="swiglu" if swiglu else "mlp",
        ffn_hidden=hidden,
        pos_grid=math.isqrt(rows),
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        head="linear" if head is not None else "none",
        num_labels=int(head.shape[0]) if head is not None else 0,
        family=family,
    )


def to_ours(sd: Mapping[str, torch.Tensor], layout: Layout) -> StateDict:
    """Convert a detected layout to our parameter names."""
    converters = {"hf": hf_to_ours, "original": original_to_ours, "timm": timm_to_ours}
    out = converters[layout](sd)
    if "register_tokens" not in out and "cls_token" in out:
        # a model trained without registers has no such key; ours holds a zero-length one
        out["register_tokens"] = out["cls_token"].new_zeros(1, 0, out["cls_token"].shape[-1])
    return out
