"""Issue 10, through `embed`: resume checks inputs by identity and settings by value (weights by
hash), --resume as a safe relaunch, 0-register checkpoints, where an interrupted run's rows are."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
from conftest import EXAMPLES, make_hf

import dinoreg
from dinoreg.embedding.results import Interrupted
from dinoreg.errors import OutputError

KW = {"batch_size": 2, "workers": 0}


@pytest.fixture
def imgs(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for src in sorted(EXAMPLES.glob("*.jpg"))[:5]:
        shutil.copy(src, folder / src.name)
    return folder


def interrupted(inputs, out: Path, model: str, **kw) -> Interrupted:
    def stop(event):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        dinoreg.embed(inputs, out, model, progress=stop, **{**KW, **kw})
    return info.value


def test_resume_with_other_inputs_is_refused(imgs: Path, tmp_path: Path, tiny_dir) -> None:
    out = tmp_path / "o.h5"
    interrupted(imgs, out, str(tiny_dir.path))
    other = tmp_path / "other"
    other.mkdir()
    for p in sorted(imgs.iterdir())[:3]:
        shutil.copy(p, other / p.name)
    with pytest.raises(OutputError, match=r"other inputs \(3 added \(.*\), 5 removed") as err:
        dinoreg.embed(other, out, str(tiny_dir.path), resume=True, **KW)
    assert "\n" not in str(err.value)
    summary = dinoreg.embed(imgs, out, str(tiny_dir.path), resume=True, **KW)
    assert summary.mode_used == "continued" and summary.rows + summary.resumed == 5


def test_resume_with_other_settings_names_each_difference(
    imgs: Path, tmp_path: Path, tiny_dir
) -> None:
    out = tmp_path / "o.h5"
    interrupted(imgs, out, str(tiny_dir.path))
    with pytest.raises(OutputError) as err:
        dinoreg.embed(
            imgs, out, str(tiny_dir.path), resume=True, store_dtype="float16", dtype="bfloat16",
            **KW,
        )  # fmt: skip
    msg = str(err.value)
    assert 'store_dtype "float32" -> "float16"' in msg
    assert 'compute_dtype "float32" -> "bfloat16"' in msg
    assert "datasets (cls 32 float32" in msg  # not eaten as rich markup, not garbled
    assert "[" not in msg and "\n" not in msg
    assert {"store_dtype", "dtype", "overwrite"} <= set(err.value.params)


def test_same_weights_under_another_name_resume(imgs: Path, tmp_path: Path, tiny_dir) -> None:
    out = tmp_path / "o.h5"
    interrupted(imgs, out, str(tiny_dir.path))
    copy = tmp_path / "copy-of-tiny"
    shutil.copytree(tiny_dir.path, copy)  # the identical files under another name
    summary = dinoreg.embed(imgs, out, str(copy), resume=True, **KW)
    assert summary.complete and summary.mode_used == "continued"
    other = make_hf(tmp_path / "other", seed=5)  # other weights, same shapes
    with pytest.raises(OutputError, match="weights_sha256"):
        dinoreg.embed(imgs, out, str(other.path), resume=True, **KW)


def test_another_spelling_of_the_inputs_adds_no_rows(
    imgs: Path, tmp_path: Path, tiny_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    interrupted("imgs", tmp_path / "o.h5", str(tiny_dir.path))
    summary = dinoreg.embed("./imgs", tmp_path / "o.h5", str(tiny_dir.path), resume=True, **KW)
    assert summary.resumed == 2
    paths = [r.path for r in dinoreg.read(tmp_path / "o.h5")]
    assert len(paths) == 5 and len({Path(p).name for p in paths}) == 5


def test_resume_creates_continues_then_does_nothing(imgs: Path, tmp_path: Path, tiny_dir) -> None:
    out = tmp_path / "o.h5"
    model = str(tiny_dir.path)
    stop = interrupted(imgs, out, model)
    partial = tmp_path / "o.h5.partial"
    assert stop.summary.rows_at == partial and not out.exists()
    with pytest.raises(OutputError, match="not complete"):
        dinoreg.read(out)
    s = dinoreg.embed(imgs, out, model, resume=True, **KW)
    assert (s.mode_used, s.rows_at, s.complete) == ("continued", out, True)
    s = dinoreg.embed(imgs, out, model, resume=True, **KW)
    assert (s.mode_used, s.rows, s.resumed) == ("already-complete", 0, 5)
    with pytest.raises(OutputError, match="tokens"):
        dinoreg.embed(imgs, out, model, resume=True, tokens=("cls",), **KW)
    fresh = tmp_path / "fresh.h5"
    s = dinoreg.embed(imgs, fresh, model, resume=True, **KW)
    assert s.mode_used == "created" and s.complete


def test_a_checkpoint_without_registers(imgs: Path, tmp_path: Path) -> None:
    tiny = make_hf(tmp_path / "w", registers=0)
    out = tmp_path / "o.h5"
    summary = dinoreg.embed(imgs, out, str(tiny.path), **KW)
    assert summary.complete
    with h5py.File(out) as f:
        assert "registers" not in f and f["cls"].shape == (5, 32)
    info = dinoreg.inspect_output(out)
    assert info.meta["num_registers"] == 0 and info.meta["stored_tokens"] == ["cls", "patches"]
    rows = list(dinoreg.read(out))
    assert rows[0].registers.shape == (0, 32) and rows[0].patches.shape == (16, 16, 32)
