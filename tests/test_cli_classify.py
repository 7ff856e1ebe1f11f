"""`dinoreg classify` and `dinoreg models`: numbers against transformers, TSV/JSON/TTY output,
stdin, broken inputs, and a start-up path free of torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import EXAMPLES, make_hf, reference_pixels
from test_cli_embed import run_cli

from dinoreg.classification import imagenet_labels


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("cls"), num_labels=1000, seed=21)


@pytest.fixture(scope="module")
def reference(classifier):
    """transformers: its PIL processor and its classifier, probabilities per example photo."""
    probs = {}
    for path in sorted(EXAMPLES.glob("*.jpg")):
        x = reference_pixels(path)
        with torch.no_grad():
            probs[str(path)] = classifier.hf(pixel_values=x).logits[0].softmax(-1)
    return probs


def test_tsv_top_k_equals_transformers(capsys, monkeypatch, classifier, reference):
    code, out, err = run_cli(
        capsys, monkeypatch, "classify", EXAMPLES, "-m", classifier.path, "-k", "3"
    )
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert len(lines) == 7 * 3
    names = [label.name for label in imagenet_labels()]
    for path, rank, index, label, prob in lines:
        ref = reference[path]
        top = ref.topk(3)
        assert int(index) == int(top.indices[int(rank) - 1])
        assert label == names[int(index)]  # placeholder LABEL_i names give way to ImageNet's
        assert abs(float(prob) - float(ref[int(index)])) <= 1e-5


def test_json_lines_and_stdin(capsys, monkeypatch, classifier, reference):
    photos = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))[:2]
    code, out, _ = run_cli(
        capsys,
        monkeypatch,
        "classify",
        "-",
        "-m",
        classifier.path,
        "--json",
        stdin="\n".join(photos),
    )
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert [d["path"] for d in docs] == photos
    for doc in docs:
        assert [t["rank"] for t in doc["top"]] == [1, 2, 3, 4, 5]
        assert set(doc["top"][0]) == {"rank", "index", "label", "prob"}
        ref = reference[doc["path"]]
        assert doc["top"][0]["index"] == int(ref.argmax())
        probs = [t["prob"] for t in doc["top"]]
        assert probs == sorted(probs, reverse=True)


def test_table_on_a_terminal(capsys, monkeypatch, classifier):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    code, out, _ = run_cli(
        capsys, monkeypatch, "classify", EXAMPLES / "coffee.jpg", "-m", classifier.path
    )
    assert code == 0
    assert "coffee.jpg" in out and "%" in out and "\t" not in out


def test_a_broken_file_among_good_ones(capsys, monkeypatch, tmp_path, classifier):
    good = tmp_path / "a.jpg"
    good.write_bytes((EXAMPLES / "chelsea.jpg").read_bytes())
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not a jpeg")
    code, out, err = run_cli(
        capsys, monkeypatch, "classify", tmp_path, "-m", classifier.path, "-k", "1"
    )
    assert code == 3
    assert out.splitlines()[0].startswith(f"{good}\t1\t")
    assert len(out.splitlines()) == 1
    assert err.count(str(bad)) == 1 and "Traceback" not in err


def test_checkpoint_labels_win(capsys, monkeypatch, tmp_path):
    tiny = make_hf(tmp_path, num_labels=3, seed=4)
    config = json.loads((tiny.path / "config.json").read_text())
    config["id2label"] = {"0": "cat", "1": "dog", "2": "tea pot"}
    (tiny.path / "config.json").write_text(json.dumps(config))
    code, out, _ = run_cli(
        capsys, monkeypatch, "classify", EXAMPLES / "chelsea.jpg", "-m", tiny.path
    )
    assert code == 0
    assert {line.split("\t")[3] for line in out.splitlines()} == {"cat", "dog", "tea pot"}


def test_original_head_file_on_a_backbone(capsys, monkeypatch, tmp_path, tiny_dir):
    head = {"weight": torch.randn(1000, 64), "bias": torch.randn(1000)}
    path = tmp_path / "dinov2_vits14_reg4_linear_head.pth"
    torch.save(head, path)
    code, out, _ = run_cli(
        capsys,
        monkeypatch,
        "classify",
        EXAMPLES / "rocket.jpg",
        "-m",
        tiny_dir.path,
        "--head",
        path,
        "--json",
        "-k",
        "2",
    )
    assert code == 0
    assert len(json.loads(out)["top"]) == 2


def test_a_backbone_without_a_head_is_refused(capsys, monkeypatch, tiny_dir):
    code, out, err = run_cli(capsys, monkeypatch, "classify", EXAMPLES, "-m", tiny_dir.path)
    assert code == 1 and out == ""
    assert "cannot classify" in err and "--head" in err


def test_models_lists_every_alias(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "models", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    by_alias = {r["alias"]: r for r in rows}
    assert by_alias["small"]["params"] == 22_058_112
    assert by_alias["giant-imagenet1k"]["repo_id"].endswith("giant-imagenet1k-1-layer")
    assert all(r["cached"] in (True, False) for r in rows)


@pytest.mark.parametrize(
    "args", [["--help"], ["classify", "--help"], ["embed", "--help"], ["models", "--help"]]
)
def test_help_imports_no_torch(args):
    code = (
        f"import sys\nfrom dinoreg.cli import main\ntry:\n    main({args!r})\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stderr.strip().splitlines()[-1] == "exit 0 False"
    assert "Usage" in res.stdout


@pytest.mark.parametrize("command", ["embed", "classify"])
def test_help_keeps_square_brackets_that_are_not_markup(command):
    # Rich would read "[gpu]" as a style tag and drop it from the install hint.
    res = subprocess.run(
        [sys.executable, "-m", "dinoreg", command, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert res.returncode == 0 and "pip install 'dinoreg[gpu]'" in res.stdout
