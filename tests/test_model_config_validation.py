"""Bad configs, bad files and bad names fail fast, before anything is allocated, with one
WeightsError naming the file, the key or value, and the fix."""

from __future__ import annotations

import inspect
import json
import resource
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import original_state_dict
from safetensors.torch import load_file, save_file

import dinoreg
from dinoreg.errors import WeightsError
from dinoreg.model import config as config_module
from dinoreg.model import files, layouts, sources, weights
from dinoreg.model.config import ConfigError, ViTConfig

FAST_S = 5.0  # every failure here takes well under a second; an allocation or a loop would not
MAX_GROWTH = 512 << 20  # peak resident memory may grow this much at most (bytes)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def fails_fast(name: str | Path, *words: str, **kwargs) -> str:
    """Load `name`, expect one WeightsError holding every word; return its message."""
    start, peak = time.monotonic(), _peak_rss()
    with pytest.raises(WeightsError) as err:
        dinoreg.load_model(str(name), **kwargs)
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert elapsed < FAST_S, f"took {elapsed:.1f} s"
    assert _peak_rss() - peak < MAX_GROWTH
    assert "\n" not in msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


@pytest.fixture
def ckpt(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny HF checkpoint (config.json + model.safetensors)."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_dir.path, path)
    return path


def edit_config(path: Path, **changes) -> Path:
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))
    return file


# -- config.json values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,rule",
    [
        ("num_attention_heads", 0, "from 1 to"),
        ("num_attention_heads", 3, "a divisor of hidden_size 32"),
        ("patch_size", 0, "from 1 to 64"),
        ("num_register_tokens", -1, "from 0 to 64"),
        ("mlp_ratio", -1, "above 0"),
        ("mlp_ratio", 0, "above 0"),
        ("mlp_ratio", 1000, "at most 16"),
        ("hidden_size", None, "an integer"),
        ("hidden_size", 1e7, "from 1 to 8192"),
        ("hidden_size", 10_000_000, "from 1 to 8192"),
        ("hidden_size", "32", "an integer"),
        ("hidden_size", 32.0, "an integer"),
        ("num_hidden_layers", 1e9, "from 1 to 256"),
        ("num_hidden_layers", 1_000_000_000, "from 1 to 256"),
        ("num_hidden_layers", 2.5, "an integer"),
        ("num_hidden_layers", True, "an integer"),
        ("image_size", 0, "an integer from"),
        ("layer_norm_eps", -1, "between 0 and 1"),
        ("use_swiglu_ffn", "yes", "true or false"),
        ("model_type", "vit", "'dinov2_with_registers' or 'dinov2'"),
        ("hidden_act", "relu", "'gelu'"),
    ],
)
def test_bad_config_values(ckpt, key, value, rule):
    file = edit_config(ckpt, **{key: value})
    msg = fails_fast(ckpt, f"{file}: {key} is {value!r}, but", rule, "original config.json")
    assert msg.count(". ") == 0  # one sentence


def test_missing_required_key(ckpt):
    file = ckpt / "config.json"
    config = json.loads(file.read_text())
    del config["hidden_size"]
    file.write_text(json.dumps(config))
    fails_fast(ckpt, f"{file}: hidden_size is missing, but it must be present")


def test_config_that_is_a_list(ckpt):
    (ckpt / "config.json").write_text("[1, 2, 3]")
    fails_fast(ckpt, "config.json", "JSON list", "not an object")


def test_config_that_is_not_json(ckpt):
    (ckpt / "config.json").write_text("{hidden_size: 32")
    fails_fast(ckpt, "config.json", "not valid JSON")


def test_in_bounds_config_that_disagrees_with_the_weights_allocates_nothing(ckpt):
    # 8192 wide and 256 deep is inside the bounds but ~800 GB of fp32: only a storage-free
    # skeleton may be built before the shapes are compared
    edit_config(ckpt, hidden_size=8192, num_hidden_layers=256, num_attention_heads=128)
    msg = fails_fast(ckpt, "wrong shapes (file vs model)", "(32,) vs (8192,)", "missing keys")
    assert "dim 8192, 256 blocks" in msg


def test_wrong_shaped_query_weight(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    key = "encoder.layer.1.attention.attention.query.weight"
    sd[key] = torch.zeros(32, 33)
    save_file(sd, ckpt / "model.safetensors")
    fails_fast(ckpt, "block 1", "query, key and value weights", "(32, 33), (32, 32)")


def test_query_with_fewer_rows(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    sd["encoder.layer.0.attention.attention.query.weight"] = torch.zeros(16, 32)
    save_file(sd, ckpt / "model.safetensors")
    fails_fast(ckpt, "block 0", "(16, 32), (32, 32) and (32, 32)", "must be equal")


def test_vitconfig_checks_its_own_bounds():
    for kwargs, key in [
        ({"dim": 0}, "dim"),
        ({"depth": 10**9}, "depth"),
        ({"heads": 5}, "heads"),
        ({"patch_size": 65}, "patch_size"),
        ({"num_registers": -1}, "num_registers"),
        ({"pos_grid": 1000}, "pos_grid"),
        ({"dim": 384.0}, "dim"),
        ({"family": "clip"}, "family"),
    ]:
        with pytest.raises(ConfigError) as err:
            ViTConfig(**kwargs)
        assert err.value.key == key
    with pytest.raises(ConfigError, match="mlp_ratio is 0"):
        config_module.check_mlp_ratio("mlp_ratio", 0)
    with pytest.raises(ConfigError, match="mlp_ratio is nan"):
        config_module.check_mlp_ratio("mlp_ratio", float("nan"))


def test_huge_block_index_in_a_bare_checkpoint(wide_sd, tmp_path):
    sd = dict(wide_sd)
    sd["blocks.999999999.norm1.weight"] = torch.zeros(128)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    fails_fast(path, "original checkpoint", "depth is 1000000000", "from 1 to 256")


@pytest.fixture(scope="module")
def wide_sd(tmp_path_factory):
    from conftest import make_hf

    tiny = make_hf(tmp_path_factory.mktemp("wide-sd"), dim=128, heads=2, seed=4)
    return original_state_dict(tiny)


# -- shard indexes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,words",
    [
        ("{not json", ["not a valid index"]),
        ('{"metadata": {}}', ["no usable weight_map"]),
        ('{"weight_map": ["a"]}', ["no usable weight_map"]),
        ("[]", ["not a valid index", "not a JSON object"]),
    ],
    ids=["malformed", "no-map", "map-is-list", "list"],
)
def test_bad_shard_index(ckpt, text, words):
    index = ckpt / "model.safetensors.index.json"
    index.write_text(text)
    fails_fast(ckpt, str(index), *words)


# -- names and paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "../small", "./nope/", "/abs/missing", "a/../b"])
def test_missing_paths_are_one_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fails_fast(name, name, "does not exist", "not a model name")


def test_near_miss_aliases_are_suggested(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "did you mean small?" in fails_fast("smal", "'smal'")
    assert "did you mean small?" in fails_fast("./smal", "does not exist")
    assert "dinov2-base" in fails_fast("dinov2-bse", "did you mean")
    assert "did you mean" not in fails_fast("zzzz", "Unknown model")


def test_invalid_repo_id_reaching_the_hub_is_a_weights_error():
    # huggingface_hub validates ids before any network; its HFValidationError must not leak
    with pytest.raises(WeightsError, match=r"neither an existing path nor a valid hub repo id"):
        sources._from_hub("x" * 120 + "/y", "x" * 120 + "/y")


def test_exact_alias_wins_over_a_folder_of_that_name(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir.path, tmp_path / "small")
    hub_calls = []

    def fake_hub(name: str, repo_id: str) -> sources.WeightSource:
        hub_calls.append(repo_id)
        return sources.WeightSource(name, (), None, repo_id)

    monkeypatch.setattr(sources, "_from_hub", fake_hub)
    assert sources.resolve("small").repo_id == "facebook/dinov2-with-registers-small"
    assert sources.resolve("dinov2-small").repo_id == "facebook/dinov2-small"
    for as_path in ("./small", "small/", str(tmp_path / "small")):
        source = sources.resolve(as_path)
        assert source.repo_id is None and source.files[0].parent.name == "small", as_path
    assert hub_calls == ["facebook/dinov2-with-registers-small", "facebook/dinov2-small"]
    assert "path" in sources.resolve.__doc__ and "./small" in sources.resolve.__doc__


# -- files that are not checkpoints -------------------------------------------------------------


def _image(path: Path, fmt: str) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(path, fmt)
    return path


def _hdf5(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f["cls"] = np.zeros((2, 3), np.float32)
    return path


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    return path


@pytest.mark.parametrize(
    "make,name,kind",
    [
        (lambda p: _image(p, "JPEG"), "img.jpg", "a JPEG image"),
        (lambda p: _image(p, "JPEG"), "model.safetensors", "a JPEG image"),
        (lambda p: _image(p, "PNG"), "img.png", "a PNG image"),
        (lambda p: _image(p, "GIF"), "img.pth", "a GIF image"),
        (lambda p: _image(p, "WEBP"), "img.webp", "a WebP image"),
        (lambda p: p.write_text("hidden_size = 32\n") and p, "notes.txt", "a text file"),
        (lambda p: p.write_text("résumé ✓\n") and p, "notes.pth", "a text file"),
        (lambda p: p.write_bytes(b"") or p, "empty.pth", "an empty file"),
        (_hdf5, "feats.h5", "an HDF5 file"),
        (lambda p: np.save(p, np.zeros(3)) or p, "a.npy", "a NumPy array file"),
        (_zip, "bundle.zip", "a zip archive"),
    ],
    ids=[
        "jpg",
        "jpeg-as-safetensors",
        "png",
        "gif",
        "webp",
        "text",
        "utf8",
        "empty",
        "h5",
        "npy",
        "zip",
    ],
)
def test_non_checkpoint_files_are_named(tmp_path, make, name, kind):
    path = tmp_path / name
    make(path)
    msg = fails_fast(path, f"{path} is {kind}, not a checkpoint", ".safetensors or .pth")
    assert "pickled" not in msg and "download it again" not in msg


def test_pickled_objects_still_refused_as_such(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    fails_fast(path, "pickled Python objects")


# -- heads and wording --------------------------------------------------------------------------


def test_missing_head_file_says_it_does_not_exist(tiny_dir, tmp_path):
    msg = fails_fast(tiny_dir.path, "does not exist", head=tmp_path / "nope_linear_head.pth")
    assert "nope_linear_head.pth" in msg and "download" not in msg and "corrupt" not in msg


def test_head_that_is_an_image(tiny_dir, tmp_path):
    path = _image(tmp_path / "head.pth", "PNG")
    fails_fast(tiny_dir.path, "a PNG image", head=path)


def test_library_messages_name_no_cli_flags():
    for module in (weights, layouts, config_module):
        source = inspect.getsource(module)
        for flag in ("--model", "--head", "-m "):
            assert flag not in source, (module.__name__, flag)


def test_missing_files_in_read_state_dict(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        files.read_state_dict(tmp_path / "gone.safetensors")
    with pytest.raises(WeightsError, match="is a directory"):
        files.read_state_dict(tmp_path)
