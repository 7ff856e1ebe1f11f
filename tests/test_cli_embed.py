"""`dinoreg embed` end to end: files written, values against the reference, refusals, exit codes."""

from __future__ import annotations

import io
import json
import shutil
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import EXAMPLES, reference_pixels
from PIL import Image

from dinoreg.cli import main
from dinoreg.output.reader import read


def run_cli(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """Run the CLI in-process like a shell would: exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return done.value.code, out, err


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Features by transformers: its PIL image processor, then its model, on the examples."""
    feats = {}
    for path in sorted(EXAMPLES.glob("*.jpg")):
        x = reference_pixels(path)
        with torch.no_grad():
            feats[path.name] = tiny_dir.hf(pixel_values=x).last_hidden_state[0].numpy()
    return feats


def _rows(out) -> dict[str, object]:
    return {r.path.rsplit("/", 1)[-1]: r for r in read(out)}


def test_embed_h5_equals_the_reference(capsys, monkeypatch, tmp_path, tiny_dir, reference):
    out = tmp_path / "feats.h5"
    code, stdout, _ = run_cli(
        capsys, monkeypatch, "embed", EXAMPLES, "--out", out, "-m", tiny_dir.path
    )
    assert code == 0 and stdout == ""
    with h5py.File(out) as f:
        assert f["cls"].shape == (7, 32)
        assert f["registers"].shape == (7, 4, 32)
        assert f["patches"].shape == (7, 16, 16, 32)
        paths = [p.decode() for p in f["paths"][:]]
        assert paths == sorted(str(p) for p in EXAMPLES.glob("*.jpg"))
        assert f.attrs["complete"]
        assert json.loads(f.attrs["recipe"])["resize"] == 256
        assert f.attrs["weights_sha256"]
    rows = _rows(out)
    for name, ref in reference.items():
        row = rows[name]
        assert np.abs(row.cls - ref[0]).max() <= 1e-5
        assert np.abs(row.registers - ref[1:5]).max() <= 1e-5
        assert np.abs(row.patches.reshape(-1, 32) - ref[5:]).max() <= 1e-5


def test_embed_npy_tokens_and_float16(capsys, monkeypatch, tmp_path, tiny_dir, reference):
    out = tmp_path / "feats"
    code, _, _ = run_cli(
        capsys,
        monkeypatch,
        "embed",
        EXAMPLES,
        "--out",
        f"{out}/",
        "-m",
        tiny_dir.path,
        "--tokens",
        "cls,patches",
        "--store-dtype",
        "float16",
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "cls.npy", "failed.tsv", "meta.json", "paths.txt", "patches.npy"]
    )
    cls = np.load(out / "cls.npy", mmap_mode="r")
    patches = np.load(out / "patches.npy", mmap_mode="r")
    assert cls.dtype == np.float16 and cls.shape == (7, 32)
    assert patches.shape == (7, 16, 16, 32)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] is True and meta["tokens"] == ["cls", "patches"]
    names = (out / "paths.txt").read_text().splitlines()
    for i, name in enumerate(names):
        ref = reference[name.rsplit("/", 1)[-1]]
        assert np.abs(cls[i].astype(np.float32) - ref[0]).max() <= 2e-3 * max(
            1, np.abs(ref[0]).max()
        )


def _odd_files(folder):
    """Every PIL mode a user meets, and the broken files they also meet."""
    folder.mkdir()
    base = Image.open(EXAMPLES / "chelsea.jpg")
    base.convert("L").save(folder / "gray.png")
    base.convert("LA").save(folder / "gray_alpha.png")
    base.convert("P").save(folder / "palette.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(
        folder / "i16.png"
    )
    base.convert("1").save(folder / "bilevel.png")
    base.save(folder / "UPPER.JPG")
    frames = [base.convert("P"), base.rotate(90).convert("P")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "empty.jpg").write_bytes(b"")
    data = (EXAMPLES / "coffee.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "noise.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (folder / "notes.txt").write_text("not an image, and not picked up by directory walks")
    (folder / "text.webp").write_text("not an image either")
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / ".hidden.jpg").write_bytes((EXAMPLES / "coffee.jpg").read_bytes())
    return 9, 5  # good images, broken ones


def test_odd_and_broken_files_are_skipped_and_recorded(capsys, monkeypatch, tmp_path, tiny_dir):
    good, _ = _odd_files(tmp_path / "odd")
    out = tmp_path / "odd.h5"
    code, stdout, err = run_cli(
        capsys, monkeypatch, "embed", tmp_path / "odd", "-o", out, "-m", tiny_dir.path
    )
    assert code == 3
    assert stdout == ""
    with h5py.File(out) as f:
        assert f["cls"].shape[0] == good
        failed = [p.decode().rsplit("/", 1)[-1] for p in f["failed/paths"][:]]
        reasons = [r.decode() for r in f["failed/reasons"][:]]
        assert np.isfinite(f["patches"][:]).all()
    assert sorted(failed) == [
        "dangling.jpg",
        "empty.jpg",
        "noise.png",
        "text.webp",
        "truncated.jpg",
    ]
    assert all(reasons)
    for name in failed:
        assert err.count(name) == 1  # named once on stderr
    assert ".hidden" not in err


def test_paths_on_stdin_and_exit_codes(capsys, monkeypatch, tmp_path, tiny_dir):
    photos = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))[:3]
    out = tmp_path / "stdin.h5"
    code, _, _ = run_cli(
        capsys,
        monkeypatch,
        "embed",
        "-",
        "-o",
        out,
        "-m",
        tiny_dir.path,
        "-q",
        stdin="\n".join(photos) + "\n\n",
    )
    assert code == 0
    with h5py.File(out) as f:
        assert [p.decode() for p in f["paths"][:]] == photos


def test_existing_output_is_refused_before_the_model_loads(capsys, monkeypatch, tmp_path, tiny_dir):
    out = tmp_path / "x.h5"
    out.write_bytes(b"precious")
    code, _, err = run_cli(capsys, monkeypatch, "embed", EXAMPLES, "-o", out, "-m", "no/such-model")
    assert code == 1
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert out.read_bytes() == b"precious"
    code, _, _ = run_cli(
        capsys, monkeypatch, "embed", EXAMPLES, "-o", out, "-m", tiny_dir.path, "--overwrite"
    )
    assert code == 0
    with h5py.File(out) as f:
        assert f["cls"].shape == (7, 32)


@pytest.mark.parametrize(
    "args,code,words",
    [
        (["embed", "/nonexistent-dir", "-o", "{tmp}/a.h5"], 1, "No images found"),
        (["embed", "{ex}", "-o", "{tmp}/a.txt"], 2, "cannot tell the output format"),
        (["embed", "{ex}", "-o", "{tmp}/a.h5", "--tokens", "cls,bogus"], 2, "--tokens"),
        (["embed", "{ex}", "-o", "{tmp}/a.h5", "--image-size", "100"], 2, "multiple of 14"),
        # --resume creates a missing output: it gets as far as the (uncached) default model
        (["embed", "{ex}", "-o", "{tmp}/a.h5", "--resume"], 1, "could not be downloaded"),
        (["embed", "{ex}", "-o", "{tmp}/a.h5", "--resume", "--overwrite"], 2, "contradict"),
        (["embed", "{ex}", "-o", "{tmp}/a.h5", "--device", "cuda"], 2, "installed without CUDA"),
        (["embed", "{ex}", "-o", "{tmp}/a.h5", "--batch-size", "0"], 2, "'--batch-size'"),
        (["embed", "{ex}"], 2, "--out"),
        (["embed", "{ex}", "-o", "{tmp}/a.h5", "-m", "huge"], 1, "Unknown model 'huge'"),
    ],
)
def test_usage_and_input_errors(capsys, monkeypatch, tmp_path, args, code, words):
    args = [a.format(tmp=tmp_path, ex=EXAMPLES) for a in args]
    got, stdout, err = run_cli(capsys, monkeypatch, *args)
    assert got == code, err
    assert words in err
    assert "Traceback" not in err and stdout == ""
    assert not (tmp_path / "a.h5").exists()


def test_resume_refuses_a_different_recipe(capsys, monkeypatch, tmp_path, tiny_dir):
    stage = tmp_path / "r.h5.partial"
    out = tmp_path / "r.h5"
    # an interrupted run: a staging directory with a journal
    from dinoreg.embedding.rows import OutputOptions, dataset_specs
    from dinoreg.output.spec import OutputSpec
    from dinoreg.output.writer import Writer

    spec = OutputSpec(out, "h5", dataset_specs(32, 4, (16, 16), OutputOptions()))
    meta = {
        "model": str(tiny_dir.path),
        "recipe": {"image_size": 224},
        "tokens": list(OutputOptions().tokens),
    }
    w = Writer.open(spec, meta, "new")
    w.close(complete=False)
    assert stage.exists()
    code, _, err = run_cli(
        capsys, monkeypatch, "embed", EXAMPLES, "-o", out, "-m", tiny_dir.path, "--resume"
    )
    assert code == 1
    assert "recipe" in err


def test_info_describes_complete_and_json(capsys, monkeypatch, tmp_path, tiny_dir):
    out = tmp_path / "i.h5"
    run_cli(capsys, monkeypatch, "embed", EXAMPLES, "-o", out, "-m", tiny_dir.path, "-q")
    code, stdout, _ = run_cli(capsys, monkeypatch, "info", out)
    assert (
        code == 0 and "complete" in stdout and "patches" in stdout and "(7, 16, 16, 32)" in stdout
    )
    code, stdout, _ = run_cli(capsys, monkeypatch, "info", out, "--json")
    doc = json.loads(stdout)
    assert doc["rows"] == 7 and doc["complete"] is True
    code, _, err = run_cli(capsys, monkeypatch, "info", tmp_path / "nothing.h5")
    assert code == 1 and "Traceback" not in err


def test_python_api_returns_the_summary(tmp_path, tiny_dir):
    import dinoreg

    shutil.copytree(EXAMPLES, tmp_path / "imgs")
    summary = dinoreg.embed(
        tmp_path / "imgs", tmp_path / "api.h5", model=str(tiny_dir.path), workers=0
    )
    assert summary.rows == 7 and summary.complete and not summary.failures
    assert summary.bytes == (tmp_path / "api.h5").stat().st_size
    rows = list(dinoreg.read(tmp_path / "api.h5"))
    assert len(rows) == 7 and rows[0].patches.shape == (16, 16, 32)


def test_workers_share_a_batch_and_batches_stay_whole(tmp_path, tiny_dir):
    """Two workers each decode half of a batch; the loop puts the halves back together."""
    import dinoreg
    from dinoreg.batches import chunk_size

    assert chunk_size(4, 2) == 2 and chunk_size(256, 15) == 18 and chunk_size(16, 1) == 16
    events = []
    one = dinoreg.embed(EXAMPLES, tmp_path / "a.h5", model=str(tiny_dir.path), workers=0)
    two = dinoreg.embed(
        EXAMPLES,
        tmp_path / "b.h5",
        model=str(tiny_dir.path),
        workers=2,
        batch_size=4,
        progress=events.append,
    )
    assert [e.rows for e in events] == [4, 7]  # whole batches of 4, then the rest
    assert one.rows == two.rows == 7
    a, b = _rows(tmp_path / "a.h5"), _rows(tmp_path / "b.h5")
    for name in a:
        assert np.abs(a[name].patches - b[name].patches).max() <= 1e-5
