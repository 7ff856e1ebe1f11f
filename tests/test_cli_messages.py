"""What the CLI prints and returns around the results: user text printed literally, parameter
names turned into flags, dtype spellings, closed pipes, the model table, signal handlers."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import h5py
import pytest
from conftest import EXAMPLES, make_hf
from test_cli_embed import run_cli

import dinoreg
from dinoreg.cli.flags import as_flags


def test_a_path_that_looks_like_markup_is_reported_as_itself(
    capsys, monkeypatch, tmp_path, tiny_dir
):
    photos = tmp_path / "photos"
    (photos / "[").mkdir(parents=True)
    shutil.copy(EXAMPLES / "chelsea.jpg", photos / "[bold]draft.jpg")
    (photos / "[" / "x].jpg").write_bytes(b"not an image")  # the path reads [/x].jpg
    out = tmp_path / "f.h5"
    code, _, err = run_cli(
        capsys, monkeypatch, "embed", photos, "-o", out, "-m", tiny_dir.path, "-j", "0"
    )
    assert code == 3, err
    assert f"skipped {photos}/[/x].jpg: not an image" in err
    with h5py.File(out) as f:
        assert f.attrs["complete"]
        assert [p.decode() for p in f["paths"]] == [f"{photos}/[bold]draft.jpg"]


def test_dtype_spellings_and_token_case(capsys, monkeypatch, tmp_path, tiny_dir):
    out = tmp_path / "f.h5"
    args = ["embed", EXAMPLES / "chelsea.jpg", "-o", out, "-m", tiny_dir.path, "-j", "0"]
    code, _, err = run_cli(
        capsys, monkeypatch, *args, "--dtype", "BF16", "--store-dtype", "fp16", "--tokens", "CLS"
    )
    assert code == 0, err
    with h5py.File(out) as f:
        assert f.attrs["compute_dtype"] == "bfloat16"
        assert f["cls"].dtype == "float16" and "patches" not in f
    code, _, err = run_cli(capsys, monkeypatch, *args, "--overwrite", "--dtype", "fp64")
    assert code == 2 and "'fp64' is not one of auto, float32, bfloat16, float16" in err


def test_library_parameter_names_become_flags():
    message = "batch_size must be at least 1; pass overwrite=True or resume=True, not head."
    assert as_flags(message, ("batch_size", "overwrite", "resume")) == (
        "--batch-size must be at least 1; pass --overwrite or --resume, not head."
    )
    # names only where the error lists them, whole words only, and English words left alone
    message = "cannot tell the output format of a.txt; pass format='npy' or choose another out."
    assert as_flags(message, ("out", "format")) == (
        "cannot tell the output format of a.txt; pass --format npy or choose another --out."
    )
    assert as_flags("drop crop=False or keep_aspect", ("crop", "keep_aspect")) == (
        "drop --no-crop or --keep-aspect"
    )


def test_a_closed_pipe_ends_quietly_with_exit_0(tmp_path):
    classifier = make_hf(tmp_path, num_labels=1000, seed=3)
    cmd = [sys.executable, "-m", "dinoreg", "classify", str(EXAMPLES), "-m", str(classifier.path)]
    shell = " ".join(f"'{c}'" for c in cmd) + ' -j 0 | head -1; echo "rc=${PIPESTATUS[0]}"'
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and lines[1] == "rc=0", (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and "Broken pipe" not in done.stderr


def test_models_never_cut_what_must_be_copied(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "models")
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split("\t") == [
        "alias",
        "family",
        "repo_id",
        "params",
        "download_bytes",
        "for",
        "cached",
    ]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert rows["small"][2] == "facebook/dinov2-with-registers-small"
    assert rows["dinov2-small"][1:3] == ["dinov2", "facebook/dinov2-small"]
    code, out, _ = run_cli(capsys, monkeypatch, "models", "--json")
    assert json.loads(out.splitlines()[0])["repo_id"] == "facebook/dinov2-with-registers-small"


def test_the_cli_restores_the_sigterm_handler(capsys, monkeypatch):
    def mine(signum, frame) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        run_cli(capsys, monkeypatch, "models", "--json")
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_embed_json_summary_and_resume_lines(capsys, monkeypatch, tmp_path, tiny_dir):
    out = tmp_path / "f.h5"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 no")
    args = ["embed", EXAMPLES / "chelsea.jpg", broken, "-o", out, "-m", tiny_dir.path, "-j", "0"]
    code, stdout, err = run_cli(capsys, monkeypatch, *args, "--resume", "--json")
    doc = json.loads(stdout)
    assert code == 3 and doc["mode"] == "created" and doc["complete"] is True
    assert (doc["rows"], doc["skipped"], doc["output"]) == (1, 1, str(out))
    assert doc["images_per_s"] == pytest.approx(doc["rows"] / doc["seconds"], rel=0.01)
    code, stdout, err = run_cli(capsys, monkeypatch, *args, "--resume")
    assert code == 3 and stdout == "" and "already complete" in err  # the skip stays reported


def test_tokens_are_names_not_characters_and_once_each(tmp_path, tiny_dir):
    import dinoreg
    from dinoreg.errors import UsageError

    out = tmp_path / "f.h5"
    dinoreg.embed(
        [str(EXAMPLES / "chelsea.jpg")], out, model=str(tiny_dir.path), tokens="cls", workers=0
    )
    with h5py.File(out) as f:
        assert "cls" in f and "patches" not in f
    with pytest.raises(UsageError, match="cls more than once"):
        dinoreg.embed(
            [str(EXAMPLES)], tmp_path / "g.h5", model=str(tiny_dir.path), tokens="cls,CLS"
        )


def test_info_reads_as_text_for_people(capsys, monkeypatch, tmp_path, tiny_dir):
    out = tmp_path / "f.h5"
    args = ["embed", EXAMPLES / "chelsea.jpg", "-o", out, "-m", tiny_dir.path, "-j", "0", "-q"]
    assert run_cli(capsys, monkeypatch, *args)[0] == 0
    code, stdout, _ = run_cli(capsys, monkeypatch, "info", out)
    lines = stdout.splitlines()
    assert code == 0 and lines[0] == f"{out}  (h5, complete)"
    values = [line for line in lines[1:] if not line.startswith(" ") and line != "datasets"]
    starts = {line.index(line.split()[1]) for line in values}
    assert len(starts) == 1  # every value in one column, whatever the key's length
    assert "None" not in stdout and "['" not in stdout  # no Python reprs
    assert any(line.split() == ["grid", "16x16", "patches", "(h", "x", "w)"] for line in lines)
    assert any(line.split()[:2] == ["paths", "(1)"] for line in lines)


def test_file_names_that_are_not_utf8_print_under_a_strict_encoding(tmp_path, tiny_dir):
    import os
    import subprocess

    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1, not UTF-8
    shutil.copy(EXAMPLES / "chelsea.jpg", folder / name)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    out = tmp_path / "f.h5"
    for args in (["embed", str(folder), "-o", str(out), "-m", str(tiny_dir.path), "-j", "0"],
                 ["info", str(out)],
                 ["show", str(folder), "-o", str(tmp_path / "pics"), "-m", str(tiny_dir.path),
                  "--size", "112"]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "dinoreg", *args], capture_output=True, env=env
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        assert b"Traceback" not in done.stderr
    assert b"caf\xe9.jpg" in done.stdout  # show's line: the name's own bytes


def test_usage_mistakes_are_exit_2(capsys, monkeypatch, tmp_path, tiny_dir):
    model = ["-m", tiny_dir.path]
    for args in (
        ["embed", EXAMPLES, "-o", tmp_path / "x.txt", *model],
        ["embed", EXAMPLES, "-o", tmp_path / "x.npy", *model],
        ["show", EXAMPLES / "chelsea.jpg", "-o", tmp_path / "s", "--pca", tmp_path / "no.npz"],
        ["show", EXAMPLES / "chelsea.jpg", "-o", tmp_path / "s", "--size", "100", *model],
    ):
        code, _, err = run_cli(capsys, monkeypatch, *args)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_load_model_on_a_missing_device_is_a_dinoreg_error(tiny_dir):
    import torch

    from dinoreg.errors import DinoregError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DinoregError, match="device 'cuda'"):
        dinoreg.load_model(str(tiny_dir.path), device="cuda")


def test_a_head_that_replaces_a_classifier_is_said(capsys, monkeypatch, tmp_path):
    import torch

    classifier = make_hf(tmp_path, num_labels=1000, seed=8)
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.zeros(7, 64), "bias": torch.zeros(7)}, head)
    code, _, err = run_cli(
        capsys, monkeypatch, "classify", EXAMPLES / "chelsea.jpg", "-m", classifier.path,
        "--head", head, "-j", "0", "-k", "1",
    )  # fmt: skip
    assert code == 0 and f"{head} replaces the classifier that" in err


@pytest.mark.parametrize("columns", [80, 200])
def test_models_on_a_terminal_keep_every_alias_and_repo_whole(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run_cli(capsys, monkeypatch, "models")
    assert code == 0
    for alias, repo in [
        ("small-imagenet1k", "facebook/dinov2-with-registers-small-imagenet1k-1-layer"),
        ("dinov2-giant-imagenet1k", "facebook/dinov2-giant-imagenet1k-1-layer"),
    ]:
        assert alias in out and repo in out  # never cut, on narrow and wide terminals
    assert "…" not in out
