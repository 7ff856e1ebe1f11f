"""search / dedup / index on small outputs written here in the documented h5 and npy formats."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from dinoreg.errors import InputError, OutputError, UsageError
from dinoreg.neighbours import build_index, dedup, open_vectors, search
from dinoreg.neighbours.dedup import _union, all_pairs
from dinoreg.neighbours.exact import exact_topk
from dinoreg.output import layout
from dinoreg.output.hdf5 import encode_attrs

D = 32


def _meta(**extra):
    meta = {
        "model": "facebook/dinov2-with-registers-small",
        "weights_sha256": "ab" * 32,
        "recipe": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406]},
        "depth": 12,
        "tokens": ["cls"],
        "grid": [2, 2],
        "layers": None,
        "complete": True,
    }
    meta.update(extra)
    return meta


def write_h5(path: Path, datasets: dict[str, np.ndarray], paths: list[str], **meta) -> Path:
    with h5py.File(path, "w") as f:
        for name, a in datasets.items():
            f.create_dataset(name, data=a)
        f.create_dataset("paths", data=paths, dtype=h5py.string_dtype("utf-8"))
        g = f.create_group("failed")
        for name in ("paths", "reasons"):
            g.create_dataset(name, (0,), dtype=h5py.string_dtype("utf-8"))
        encode_attrs(f.attrs, _meta(**meta))
    return path


def write_npy(path: Path, datasets: dict[str, np.ndarray], paths: list[str], **meta) -> Path:
    path.mkdir()
    for name, a in datasets.items():
        np.save(path / layout.dataset_file(name), a)
    lines = "".join(layout.encode_field(p) + "\n" for p in paths)
    (path / layout.PATHS).write_text(lines, encoding="utf-8")
    (path / layout.FAILED).write_text("", encoding="utf-8")
    (path / layout.META).write_text(json.dumps(_meta(**meta)), encoding="utf-8")
    return path


WRITERS = {"h5": lambda tmp, d, p, **m: write_h5(tmp / "f.h5", d, p, **m),
           "npy": lambda tmp, d, p, **m: write_npy(tmp / "f", d, p, **m)}  # fmt: skip


def unit(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def planted(n: int = 300, seed: int = 0) -> np.ndarray:
    """Random vectors (pairwise cosine ~0 +- 0.2) with row 200 = row 10 exactly, and rows 50
    and 51 near-copies of row 5 (cosine ~0.99)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D)).astype(np.float32) * 3
    x[200] = x[10]
    x[50] = x[5] + 0.1 * rng.standard_normal(D)
    x[51] = x[5] + 0.1 * rng.standard_normal(D)
    return x


def names(n: int) -> list[str]:
    # Odd names on purpose: a tab, a leading quote and non-ASCII all survive the round trip.
    return [f'img/{i}\t"é.jpg' if i == 7 else f"img/{i}.jpg" for i in range(n)]


@pytest.fixture(params=["h5", "npy"])
def fmt(request) -> str:
    return request.param


def test_row_query_finds_itself_first_even_with_an_earlier_exact_copy(tmp_path, fmt):
    x = planted()
    feats = WRITERS[fmt](tmp_path, {"cls": x}, names(len(x)))
    (res,) = search(feats, [200], k=3, index="none")
    assert [h.row for h in res.hits[:2]] == [200, 10]
    assert res.hits[0].score == 1.0 and res.hits[1].score == pytest.approx(1.0, abs=1e-6)
    assert res.query == 200 and res.method == "exact" and not res.clipped
    (by_path,) = search(feats, ['img/7\t"é.jpg'], k=1, index="none")
    assert by_path.hits[0].row == 7 and by_path.hits[0].path == 'img/7\t"é.jpg'


def test_dedup_groups_exact_and_near_duplicates_and_nothing_else(tmp_path, fmt):
    x = planted()
    feats = WRITERS[fmt](tmp_path, {"cls": x}, names(len(x)))
    groups = dedup(feats, threshold=0.95, index="none")
    assert [[m.row for m in g.members] for g in groups] == [[5, 50, 51], [10, 200]]
    u = unit(x)
    assert [m.score for m in groups[0].members] == pytest.approx(
        [1.0, float(u[5] @ u[50]), float(u[5] @ u[51])], abs=1e-6
    )
    assert groups[1].members[1].score == pytest.approx(1.0, abs=1e-6)
    assert groups[1].members[1].path == "img/200.jpg"
    # threshold 1.0 keeps only the exact copy
    assert [[m.row for m in g.members] for g in dedup(feats, 1.0, index="none")] == [[10, 200]]


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
def test_blocked_search_and_pairs_equal_brute_force(tmp_path, block):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((151, D)).astype(np.float32)
    x[100] = x[3] + 0.3 * rng.standard_normal(D)
    feats = write_npy(tmp_path / "f", {"cls": x}, names(len(x)))
    q = unit(rng.standard_normal((9, D)))
    ref = q @ unit(x).T
    with open_vectors(feats) as v:
        scores, rows = exact_topk(v, q, 10, block_rows=block)
        np.testing.assert_array_equal(rows, np.argsort(-ref, axis=1, kind="stable")[:, :10])
        np.testing.assert_allclose(scores, -np.sort(-ref, axis=1)[:, :10], atol=1e-5)
        pairs = {(int(a), int(b)) for a, b in zip(*_cat(all_pairs(v, 0.3, block)), strict=True)}
    full = unit(x) @ unit(x).T
    want = {(a, b) for a, b in zip(*np.nonzero(full >= 0.3 - 1e-6), strict=True) if a < b}
    assert pairs == want and (3, 100) in want and len(want) > 20


def _cat(chunks):
    chunks = list(chunks)
    return np.concatenate([a for a, _ in chunks]), np.concatenate([b for _, b in chunks])


def test_float16_store_scores_the_stored_values(tmp_path):
    x = planted().astype(np.float16)
    feats = write_h5(tmp_path / "f.h5", {"cls": x}, names(len(x)), store_dtype="float16")
    with open_vectors(feats) as v:
        assert v.store_dtype == "float16"
        np.testing.assert_allclose(v.read(0, len(x)), unit(x.astype(np.float32)), atol=1e-6)
    q = unit(np.random.default_rng(2).standard_normal((1, D)))
    (res,) = search(feats, q, k=5, index="none")
    ref = unit(x.astype(np.float32)) @ q[0]
    assert [h.row for h in res.hits] == list(np.argsort(-ref, kind="stable")[:5])
    assert [h.score for h in res.hits] == pytest.approx(np.sort(ref)[::-1][:5], abs=1e-5)
    assert [[m.row for m in g.members] for g in dedup(feats, index="none")] == [
        [5, 50, 51],
        [10, 200],
    ]


def test_patches_mean_on_regular_and_ragged_layouts(tmp_path, fmt):
    rng = np.random.default_rng(3)
    n = 40
    grid = rng.standard_normal((n, 2, 3, D)).astype(np.float32) + rng.standard_normal((n, 1, 1, D))
    counts = rng.integers(1, 9, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = rng.standard_normal((offsets[-1], D)).astype(np.float32) + 1
    ragged_mean = np.stack([items[a:b].mean(0) for a, b in itertools.pairwise(offsets)])
    cls = rng.standard_normal((n, D)).astype(np.float32)
    cases = {
        "regular": ({"cls": cls, "patches": grid}, grid.reshape(n, -1, D).mean(1)),
        "ragged": (
            {"patches": items, "patches_offsets": offsets, "grids": np.ones((n, 2), np.int32)},
            ragged_mean,
        ),
    }
    for kind, (datasets, mean) in cases.items():
        sub = tmp_path / kind
        sub.mkdir()
        feats = WRITERS[fmt](sub, datasets, names(n))
        with open_vectors(feats, tokens="patches-mean") as v:
            assert v.ragged == (kind == "ragged")
            np.testing.assert_allclose(v.read(0, n), unit(mean), atol=1e-6)
            np.testing.assert_allclose(v.take([17, 3]), unit(mean[[17, 3]]), atol=1e-6)
        (res,) = search(feats, [mean[17]], k=1, tokens="patches-mean", index="none")
        assert res.hits[0].row == 17 and res.hits[0].score == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(OutputError, match="CLS"):
        search(feats, [0], index="none")  # the ragged file stores patches only


def test_layer_selection(tmp_path, fmt):
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 30, D)).astype(np.float32)
    feats = WRITERS[fmt](tmp_path, {"layers/3/cls": a, "layers/11/cls": b}, names(30))
    for layer, want in [(None, b), (-1, b), (11, b), (3, a), (-9, a)]:
        with open_vectors(feats, layer=layer) as v:
            np.testing.assert_allclose(v.read(0, 30), unit(want), atol=1e-6)
    (res,) = search(feats, [a[4]], k=1, layer=3, index="none")
    assert res.hits[0].row == 4
    with pytest.raises(UsageError, match=r"^layer: .* stores layers 3, 11, not 5"):
        search(feats, [0], layer=5)
    root = WRITERS["h5"](tmp_path, {"cls": a}, names(30))
    with pytest.raises(UsageError, match=r"^layer: .*no intermediate layers"):
        dedup(root, layer=-1)


def test_bad_inputs_name_the_parameter(tmp_path):
    x = planted()[:20]
    good = write_h5(tmp_path / "f.h5", {"cls": x}, names(20))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["cls"] = x
    (tmp_path / "emptydir").mkdir()
    part = write_npy(tmp_path / "run.h5.partial", {"cls": x}, names(20), complete=False)
    (part / layout.JOURNAL).write_text("{}")
    unfinished = {
        "h5": write_h5(tmp_path / "inc.h5", {"cls": x}, names(20), complete=False),
        "npy": write_npy(tmp_path / "inc", {"cls": x}, names(20), complete=False),
        "staging": tmp_path / "run.h5",
        "staging dir": part,
    }
    for bad in ["junk.h5", "other.h5", "emptydir", "missing.h5"]:
        with pytest.raises(OutputError, match=r"^feats: "):
            search(tmp_path / bad, [0])
    for what, bad in unfinished.items():
        with pytest.raises(OutputError, match=r"^feats: .*(not complete|not finished|unfinished)"):
            dedup(bad)
        assert what
    no_cls = write_h5(tmp_path / "p.h5", {"patches": np.ones((20, 2, 2, D), np.float32)}, names(20))
    with pytest.raises(OutputError, match="stores no CLS"):
        search(no_cls, [0])
    for k in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match=r"^k must"):
            search(good, [0], k=k)
    for t in (0, 0.0, -0.5, 1.0001, float("nan"), "0.9", None):
        with pytest.raises(UsageError, match=r"^threshold must"):
            dedup(good, threshold=t)
    with pytest.raises(UsageError, match=r"^tokens must"):
        search(good, [0], tokens="registers")
    with pytest.raises(UsageError, match=r"^queries\[1\]: row 20 is out of range"):
        search(good, [0, 20])
    with pytest.raises(UsageError, match=r"^queries\[0\] must be a finite vector of length 32"):
        search(good, [np.ones(D + 1)])
    with pytest.raises(InputError, match=r"^paths: 'nope' is not a row"):
        search(good, ["nope"])
    (res,) = search(good, [3], k=50, index="none")
    assert res.clipped and res.requested_k == 50 and len(res.hits) == 20


def test_index_matches_exact_and_stale_index_is_ignored(tmp_path, fmt):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, D)).astype(np.float32)
    x[300] = x[12] + 0.05 * rng.standard_normal(D)
    feats = WRITERS[fmt](tmp_path, {"cls": x}, names(400))
    info = build_index(feats, nprobe=1000)  # probe every list: the answers must be exact
    assert info.path.name.endswith(".index") and info.rows == 400 and info.size_bytes > 0
    queries = [*list(unit(rng.standard_normal((5, D)))), 12]
    exact = search(feats, queries, k=5, index="none")
    fast = search(feats, queries, k=5)
    assert {r.method for r in fast} == {"index"}
    assert [r.hits[0].row for r in fast] == [r.hits[0].row for r in exact]
    assert [h.row for h in fast[0].hits] == [h.row for h in exact[0].hits]
    assert fast[-1].hits[0].score == 1.0 and fast[-1].hits[1].row == 300
    groups = dedup(feats, threshold=0.9)
    assert [[m.row for m in g.members] for g in groups] == [[12, 300]]
    later = os.stat(info.path).st_mtime + 10
    target = feats / layout.META if fmt == "npy" else feats
    os.utime(target, (later, later))
    assert search(feats, queries, k=5)[0].method == "exact"
    with pytest.raises(UsageError, match=r"^index: .*changed after"):
        search(feats, [0], index=info.path)


def test_union_find_matches_connected_components():
    rng = np.random.default_rng(6)
    n = 500
    parent = np.arange(n, dtype=np.int64)
    edges = rng.integers(0, n, (3, 120, 2))  # several batches, with repeats and competing roots
    for batch in edges:
        _union(parent, batch[:, 0], batch[:, 1])
    label = list(range(n))  # reference: naive relabelling until stable

    def root(i: int) -> int:
        while label[i] != i:
            i = label[i]
        return i

    for a, b in edges.reshape(-1, 2):
        ra, rb = root(int(a)), root(int(b))
        label[max(ra, rb)] = min(ra, rb)
    while not np.array_equal(parent, parent[parent]):
        parent = parent[parent]
    assert list(parent) == [root(i) for i in range(n)]
