"""Every checkpoint layout and source loads to the same numbers; wrong files fail in one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    hf_tokens,
    make_hf,
    max_diff,
    original_state_dict,
    our_sequence,
    pixels,
    timm_state_dict,
)
from safetensors.torch import save_file

import dinoreg
from dinoreg.errors import WeightsError
from dinoreg.model.files import file_sha256
from dinoreg.model.weights import attach_head

TOL = 1e-5


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """64-wide heads like the published models, so heads can be inferred from bare weights."""
    tmp = tmp_path_factory.mktemp("wide")
    return {sw: make_hf(tmp, dim=128, heads=2, swiglu=sw, seed=7 + sw) for sw in (False, True)}


def _check_against(tiny, model, size=(98, 154)):
    x = pixels(*size)
    ref = hf_tokens(tiny.hf, x).last_hidden_state
    with torch.inference_mode():
        assert max_diff(our_sequence(model.forward_features(x)), ref) <= TOL


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_original_pth_loads_and_matches(wide, tmp_path, swiglu):
    tiny = wide[swiglu]
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original_state_dict(tiny), path)
    model = dinoreg.load_model(str(path))
    assert model.info.layout == "original"
    assert model.cfg.heads == 2 and model.cfg.ffn == ("swiglu" if swiglu else "mlp")
    _check_against(tiny, model)


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_timm_layout_loads_and_matches(wide, tmp_path, swiglu):
    tiny = wide[swiglu]
    path = tmp_path / "model.safetensors"
    save_file(timm_state_dict(original_state_dict(tiny)), path)
    model = dinoreg.load_model(str(path))
    assert model.info.layout == "timm"
    _check_against(tiny, model, (224, 224))
    _check_against(tiny, model, (518, 518))


def test_single_hf_safetensors_without_config(wide, tmp_path):
    tiny = wide[False]
    path = tmp_path / "weights.safetensors"
    shutil.copy(tiny.path / "model.safetensors", path)
    model = dinoreg.load_model(str(path))
    assert model.info.layout == "hf"
    _check_against(tiny, model)


def test_training_checkpoint_with_wrapper_and_block_chunks(wide, tmp_path):
    tiny = wide[False]
    sd = original_state_dict(tiny)
    chunked = {
        k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v
        for k, v in sd.items()
    }
    path = tmp_path / "teacher.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in chunked.items()}}, path)
    _check_against(tiny, dinoreg.load_model(str(path)))


def test_sharded_directory(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(tiny_dir.path / "model.safetensors")
    keys = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": keys[::2],
        "model-00002-of-00002.safetensors": keys[1::2],
    }
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(tiny_dir.path / "config.json", tmp_path / "config.json")
    model = dinoreg.load_model(str(tmp_path))
    assert len(model.info.files) == 2
    _check_against(tiny_dir, model)


def test_sha256_is_recorded(tiny_dir):
    model = dinoreg.load_model(str(tiny_dir.path))
    data = (tiny_dir.path / "model.safetensors").read_bytes()
    assert model.info.sha256 == hashlib.sha256(data).hexdigest()


def _populate_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lay files out as huggingface_hub's cache does: blobs by sha256, snapshot symlinks, a ref."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))


def _run_offline(cache: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_hub_alias_and_repo_id_load_offline_from_the_cache(tiny_dir, tmp_path):
    files = {n: (tiny_dir.path / n).read_bytes() for n in ("config.json", "model.safetensors")}
    _populate_cache(tmp_path, "facebook/dinov2-with-registers-small", files)
    _populate_cache(tmp_path, "someone/tiny-regs", files)
    x_path = tmp_path / "x.pt"
    torch.save(pixels(224, 224), x_path)
    code = f"""
import torch, dinoreg
from dinoreg.model.sources import is_cached
x = torch.load({str(x_path)!r})
a = dinoreg.load_model("small")
b = dinoreg.load_model("someone/tiny-regs")
with torch.inference_mode():
    print(torch.equal(a.forward_features(x).patches, b.forward_features(x).patches))
print(a.info.sha256 == b.info.sha256, "snapshots" in str(a.info.files[0]))
repo = "facebook/dinov2-with-registers-"
print(is_cached(repo + "small"), is_cached(repo + "base"))
"""
    res = _run_offline(tmp_path, code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True", "True", "True", "False"]


def test_uncached_hub_model_offline_is_one_clear_error(tmp_path):
    code = """
import dinoreg
from dinoreg.errors import WeightsError
try:
    dinoreg.load_model("base")
except WeightsError as e:
    print(e)
"""
    res = _run_offline(tmp_path, code)
    assert res.returncode == 0, res.stderr
    assert "facebook/dinov2-with-registers-base" in res.stdout
    assert "not in the local Hugging Face cache" in res.stdout


def test_unknown_alias_lists_the_known_ones():
    with pytest.raises(WeightsError) as err:
        dinoreg.load_model("smal")
    msg = str(err.value)
    assert "'smal'" in msg and "small" in msg and "giant-imagenet1k" in msg


def test_missing_file_is_named():
    with pytest.raises(WeightsError, match="does not exist"):
        dinoreg.load_model("/nonexistent/weights.pth")


def test_missing_keys_are_listed(wide, tmp_path):
    sd = original_state_dict(wide[False])
    del sd["blocks.1.ls2.gamma"], sd["norm.bias"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        dinoreg.load_model(str(path))
    msg = str(err.value)
    assert str(path) in msg and "original checkpoint" in msg
    assert "missing keys blocks.1.ls2.gamma, norm.bias" in msg


def test_wrong_shapes_and_unexpected_keys_are_listed(wide, tmp_path):
    sd = original_state_dict(wide[False])
    sd["blocks.0.ls1.gamma"] = torch.zeros(7)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(sd, path)
    with pytest.raises(WeightsError) as err:
        dinoreg.load_model(str(path))
    msg = str(err.value)
    assert "unexpected keys extra.weight" in msg
    assert "blocks.0.ls1.gamma (7,) vs (128,)" in msg


def test_pth_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a module, not tensors
    with pytest.raises(WeightsError, match="pickled Python objects"):
        dinoreg.load_model(str(path))


def test_corrupt_and_foreign_files(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(WeightsError, match="could not be read"):
        dinoreg.load_model(str(corrupt))
    foreign = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 3, 7, 7)}, foreign)
    with pytest.raises(WeightsError, match="not a DINOv2-with-registers checkpoint"):
        dinoreg.load_model(str(foreign))


def test_empty_directory(tmp_path):
    with pytest.raises(WeightsError, match=r"no \.safetensors"):
        dinoreg.load_model(str(tmp_path))


def test_original_linear_heads(wide, tmp_path):
    tiny = wide[False]
    x = pixels(224, 224)
    g = torch.Generator().manual_seed(0)
    dim = 128
    with torch.no_grad():
        ref = hf_tokens(tiny.hf, x, output_hidden_states=True)
        normed = [tiny.hf.layernorm(h) for h in ref.hidden_states[1:]]
    for layers in (1, 4):
        head = {
            "weight": torch.randn(1000, (1 + layers) * dim, generator=g),
            "bias": torch.randn(1000, generator=g),
        }
        path = tmp_path / f"dinov2_vits14_reg4_linear{'' if layers == 1 else 4}_head.pth"
        torch.save(head, path)
        if layers == 4:
            # a 4-layer head needs 4 blocks
            with pytest.raises(WeightsError, match="4-layer head"):
                dinoreg.load_model(str(tiny.path), head=path)
            continue
        model = dinoreg.load_model(str(tiny.path), head=path)
        feats = torch.cat([normed[-1][:, 0], normed[-1][:, 5:].mean(1)], dim=1)
        with torch.inference_mode():
            assert max_diff(model.logits(x), feats @ head["weight"].T + head["bias"]) <= 1e-4


def test_linear4_head_by_hand(tmp_path):
    tiny = make_hf(tmp_path, dim=64, heads=1, depth=5, seed=11)
    x = pixels(98, 154)
    with torch.no_grad():
        hidden = hf_tokens(tiny.hf, x, output_hidden_states=True).hidden_states
        normed = [tiny.hf.layernorm(h) for h in hidden[1:]]
    g = torch.Generator().manual_seed(1)
    head = {"weight": torch.randn(7, 5 * 64, generator=g), "bias": torch.randn(7, generator=g)}
    path = tmp_path / "linear4_head.pth"
    torch.save(head, path)
    model = dinoreg.load_model(str(tiny.path), head=path)
    assert model.cfg.head == "linear4"
    # CLS of blocks L-4..L-1 in order, then the last block's mean patch (registers excluded)
    feats = torch.cat([normed[i][:, 0] for i in (1, 2, 3, 4)] + [normed[4][:, 5:].mean(1)], dim=1)
    with torch.inference_mode():
        assert max_diff(model.logits(x), feats @ head["weight"].T + head["bias"]) <= 1e-4


def test_head_of_the_wrong_size_is_refused(tiny_dir, tmp_path):
    path = tmp_path / "head.pth"
    torch.save({"weight": torch.zeros(1000, 3 * 32), "bias": torch.zeros(1000)}, path)
    model = dinoreg.load_model(str(tiny_dir.path))
    with pytest.raises(WeightsError, match="fits neither"):
        attach_head(model, path)


def test_file_sha256_uses_blob_names(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    data = b"weights"
    blob = blobs / hashlib.sha256(b"something else").hexdigest()
    blob.write_bytes(data)  # the cache's name is trusted, not re-hashed
    assert file_sha256(blob) == blob.name
    plain = tmp_path / "w.bin"
    plain.write_bytes(data)
    assert file_sha256(plain) == hashlib.sha256(data).hexdigest()
