"""Decoding JPEGs where the model runs (`decode="gpu"`), exercised on CPU tensors.

No GPU here: the device path runs with `run_batches(_tensor_decoder=...)` on the CPU, through
torchvision's CPU `decode_jpeg` where torchvision loads, and through a Pillow stand-in for the
decode call itself otherwise. Everything around that call (what workers hand over, orientation,
resize, crop, fallbacks, row order, batch boundaries) is the code a CUDA run executes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLES
from PIL import Image

from dinoreg.batches import run_batches
from dinoreg.errors import UsageError
from dinoreg.inputs import gpu_decode
from dinoreg.inputs.dataset import ImageDataset
from dinoreg.inputs.decode import MAX_PIXELS
from dinoreg.inputs.recipe import Recipe, resize
from dinoreg.runtime import ComputeOptions

CPU = torch.device("cpu")
PHOTOS = sorted(str(p) for p in EXAMPLES.glob("*.jpg"))


def pil_decoder(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Stand-in for `decode_jpeg`: full-size RGB, no EXIF turn, raises on a bad file."""
    out = []
    for item in data:
        with Image.open(io.BytesIO(item.numpy().tobytes())) as image:
            rgb = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
        out.append(rgb.permute(2, 0, 1).contiguous().to(device))
    return out


DECODERS = {"pillow": pil_decoder}
if gpu_decode._torchvision_problem() is None:
    DECODERS["torchvision"] = gpu_decode.decode_jpegs


@pytest.fixture(params=list(DECODERS), ids=list(DECODERS))
def decoder(request):
    return DECODERS[request.param]


def _big_jpegs(tmp_path: Path) -> list[str]:
    """2000x1500 JPEGs (quality 90) from the example photos, one EXIF-rotated."""
    paths = []
    for i, name in enumerate(("chelsea.jpg", "coffee.jpg", "rocket.jpg")):
        with Image.open(EXAMPLES / name) as image:
            big = image.convert("RGB").resize((2000, 1500), Image.Resampling.BICUBIC)
        path = tmp_path / f"big{i}.jpg"
        exif = Image.Exif()
        if i == 1:
            exif[0x0112] = 6  # stored sideways; the image the model sees is 1500x2000
        big.save(path, quality=90, exif=exif)
        paths.append(str(path))
    return paths


def _features(paths, recipe, model, batch_size=3, workers=0, decoder=None):
    out, seen = [], []

    def compute(pixels: torch.Tensor):
        seen.append(len(pixels))
        with torch.inference_mode():
            return model.forward_features(pixels)

    options = ComputeOptions(batch_size=batch_size, workers=workers, decode="cpu")
    for result in run_batches(paths, recipe, options, compute, CPU, _tensor_decoder=decoder):
        out.append(result)
    return out, seen


def _cosines(a, b) -> tuple[float, float]:
    cls = torch.nn.functional.cosine_similarity(a.cls, b.cls, dim=-1)
    pa, pb = a.patches.flatten(1, 2), b.patches.flatten(1, 2)
    patch = torch.nn.functional.cosine_similarity(pa, pb, dim=-1)
    return cls.min().item(), patch.min().item()


@pytest.mark.parametrize("keep_aspect", [False, True], ids=["crop", "keep-aspect"])
def test_features_agree_with_the_pil_path(tmp_path, tiny_dir, decoder, keep_aspect) -> None:
    import dinoreg

    model = dinoreg.load_model(str(tiny_dir.path))
    paths = PHOTOS + _big_jpegs(tmp_path)
    recipe = Recipe.for_size(224, keep_aspect=keep_aspect)
    # every one of them takes the device path (none falls back to the workers' decode)
    assert all(gpu_decode.read_encoded(p, 0, recipe, MAX_PIXELS) for p in paths)
    ref, ref_seen = _features(paths, recipe, model)
    got, got_seen = _features(paths, recipe, model, decoder=decoder)
    assert got_seen == ref_seen
    assert [r.paths for r in got] == [r.paths for r in ref]
    cls_min, patch_min = 1.0, 1.0
    for a, b in zip(ref, got, strict=True):
        c, p = _cosines(a.outputs, b.outputs)
        cls_min, patch_min = min(cls_min, c), min(patch_min, p)
    print(
        f"[{decoder.__name__}, keep_aspect={keep_aspect}] CLS cos min {cls_min:.7f}, "
        f"patch cos min {patch_min:.7f}"
    )
    assert cls_min >= 0.999 and patch_min >= 0.99


def _odd_files(tmp_path: Path) -> dict[str, str]:
    """One of each file the device path must hand back to the CPU path, and two good JPEGs."""
    with Image.open(EXAMPLES / "coffee.jpg") as image:
        rgb = image.convert("RGB")
    files = {}
    for name, save in {
        "good0.jpg": lambda p: rgb.save(p, quality=90),
        "png.png": lambda p: rgb.save(p),
        "cmyk.jpg": lambda p: rgb.convert("CMYK").save(p, quality=90),
        "progressive.jpg": lambda p: rgb.save(p, quality=90, progressive=True),
        "good1.jpg": lambda p: rgb.rotate(90, expand=True).save(p, quality=85),
        "gray.jpg": lambda p: rgb.convert("L").save(p, quality=90),
    }.items():
        save(tmp_path / name)
        files[name] = str(tmp_path / name)
    data = (tmp_path / "good0.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    files["truncated.jpg"] = str(tmp_path / "truncated.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    files["empty.jpg"] = str(tmp_path / "empty.jpg")
    (tmp_path / "text.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg\xff\xd9")
    files["text.jpg"] = str(tmp_path / "text.jpg")
    return files


def test_workers_hand_over_only_plain_jpegs(tmp_path: Path) -> None:
    files = _odd_files(tmp_path)
    recipe = Recipe()
    handed = {
        name: gpu_decode.read_encoded(path, 0, recipe, MAX_PIXELS) is not None
        for name, path in files.items()
    }
    assert handed == {
        "good0.jpg": True,
        "png.png": False,
        "cmyk.jpg": False,
        "progressive.jpg": False,
        "good1.jpg": True,
        "gray.jpg": True,
        "truncated.jpg": False,
        "empty.jpg": False,
        "text.jpg": False,
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_fallbacks_and_failures_match_the_cpu_path(tmp_path, decoder, workers) -> None:
    paths = list(_odd_files(tmp_path).values()) * 2  # failures in several batches
    recipe = Recipe.for_size(28)
    seen = {"cpu": [], "device": []}

    def run(key, tensor_decoder):
        def compute(pixels):
            seen[key].append(len(pixels))
            return pixels.clone()

        options = ComputeOptions(batch_size=4, workers=workers, decode="cpu")
        return list(
            run_batches(paths, recipe, options, compute, CPU, _tensor_decoder=tensor_decoder)
        )

    ref, got = run("cpu", None), run("device", decoder)
    assert seen["device"] == seen["cpu"]
    assert [(r.paths, r.failures) for r in got] == [(r.paths, r.failures) for r in ref]
    assert {Path(p).name for r in ref for p, _ in r.failures} == {
        "truncated.jpg",
        "empty.jpg",
        "text.jpg",
    }
    for a, b in zip(ref, got, strict=True):
        for path, x, y in zip(
            a.paths, a.outputs if a.paths else [], b.outputs if b.paths else [], strict=True
        ):
            diff = (x.float() - y.float()).abs()
            if path.endswith((".png", "cmyk.jpg", "progressive.jpg")):
                assert diff.max() == 0, path  # decoded by the workers in both runs
            else:
                assert diff.mean() < 3, path


def test_a_refused_image_costs_only_itself(tmp_path: Path) -> None:
    paths = PHOTOS[:5]
    refused = {len(Path(paths[2]).read_bytes())}
    calls = []

    def picky(data, device):
        calls.append(len(data))
        if any(len(d) in refused for d in data):
            raise RuntimeError("nvjpeg refuses one image")
        return pil_decoder(data, device)

    recipe = Recipe.for_size(56)
    dataset = ImageDataset(paths, recipe, encoded=True)
    items = [dataset[i].encoded for i in range(len(paths))]
    out = gpu_decode.finish_encoded(items, CPU, recipe, picky)
    assert calls == [5, 1, 1, 1, 1, 1]  # the batch, then one by one
    assert [o is None for o in out] == [False, False, True, False, False]

    def compute(pixels):
        return pixels.clone()

    options = ComputeOptions(batch_size=5, workers=0, decode="cpu")
    ref = list(run_batches(paths, recipe, options, compute, CPU))
    got = list(run_batches(paths, recipe, options, compute, CPU, _tensor_decoder=picky))
    assert got[0].paths == ref[0].paths and not got[0].failures
    assert torch.equal(got[0].outputs[2], ref[0].outputs[2])  # decoded on the CPU instead


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_exif_transpose(orientation: int) -> None:
    g = torch.Generator().manual_seed(orientation)
    chw = torch.randint(0, 256, (3, 5, 7), generator=g, dtype=torch.uint8)
    image = Image.fromarray(chw.permute(1, 2, 0).numpy())
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    from PIL import ImageOps

    expected = ImageOps.exif_transpose(Image.open(buffer))
    got = gpu_decode.orient(chw, orientation).permute(1, 2, 0).numpy()
    assert (got == np.asarray(expected)).all()


def test_tensor_resize_and_crop_round_like_pillow() -> None:
    with Image.open(EXAMPLES / "astronaut.jpg") as image:
        rgb = image.convert("RGB").crop((0, 0, 401, 333))  # odd sizes: crop rounding matters
    recipe = Recipe()
    ref = torch.from_numpy(np.asarray(resize(rgb, recipe)).copy())
    chw = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    from dinoreg.inputs.recipe import resized_size

    got = gpu_decode.crop(
        gpu_decode.resize_tensor(chw, resized_size(401, 333, recipe), recipe), recipe
    )
    diff = (got.float() - ref.float()).abs()
    assert got.shape == ref.shape == (224, 224, 3)
    print(f"tensor resize vs Pillow: max {diff.max():.0f} levels, mean {diff.mean():.4f}")
    # Pillow resizes in two passes through uint8 with fixed-point weights; torch in one float pass
    assert diff.max() <= 4 and diff.mean() < 0.25


def test_decode_gpu_without_cuda_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as info:
        ComputeOptions(decode="gpu")
    assert "decode" in info.value.params and "CUDA" in str(info.value)
    with pytest.raises(UsageError, match="needs CUDA"):
        ComputeOptions(decode="gpu", device="cpu")
    with pytest.raises(UsageError, match="Unknown decode"):
        ComputeOptions(decode="nvjpeg")
    with pytest.raises(UsageError, match="needs CUDA"):
        gpu_decode.choose_decoder("gpu", CPU, Recipe(), PHOTOS)


def test_decode_gpu_without_torchvision_names_the_extra(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_decode.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"pip install 'dinoreg\[gpu\]'"):
        ComputeOptions(decode="gpu", device="cuda")
    monkeypatch.setattr(gpu_decode, "_torchvision_problem", lambda: "ImportError: none")
    cuda = torch.device("cuda")
    with pytest.raises(UsageError, match=r"pip install 'dinoreg\[gpu\]'"):
        gpu_decode.choose_decoder("gpu", cuda, Recipe(), PHOTOS)
    assert gpu_decode.choose_decoder("auto", cuda, Recipe(), PHOTOS) is None


def test_auto_decodes_on_the_device_only_for_jpegs_on_cuda(monkeypatch) -> None:
    monkeypatch.setattr(gpu_decode, "_torchvision_problem", lambda: None)
    cuda = torch.device("cuda")
    assert gpu_decode.choose_decoder("auto", CPU, Recipe(), PHOTOS) is None
    assert gpu_decode.choose_decoder("auto", cuda, Recipe(), PHOTOS) is gpu_decode.decode_jpegs
    assert gpu_decode.choose_decoder("auto", cuda, Recipe(), ["a.png", "b.png", "c.jpg"]) is None
    assert gpu_decode.choose_decoder("cpu", cuda, Recipe(), PHOTOS) is None
    lanczos = Recipe(interpolation="lanczos")
    assert gpu_decode.choose_decoder("auto", cuda, lanczos, PHOTOS) is None
    with pytest.raises(UsageError, match="bicubic or bilinear"):
        gpu_decode.choose_decoder("gpu", cuda, lanczos, PHOTOS)


# ----------------------------------------------------------------- decode="auto" measures


def _times(cpu_ms: float, device_ms: float, model_ms: float, workers: int):
    from dinoreg.inputs.calibrate import DecodeTimes

    return DecodeTimes(
        cpu=cpu_ms / 1e3, device=device_ms / 1e3, model=model_ms / 1e3, workers=workers
    )


def test_auto_prefers_the_device_only_where_the_workers_cannot_keep_up() -> None:
    # large photos, ViT-S: 15 workers at 13 ms each feed 1,150 img/s, the model wants 12,000
    assert _times(13.0, 0.3, 0.08, 15).prefers_device()
    # 500x375 JPEGs, ViT-L: the workers keep up (0.23 ms/img) with a model at 0.48 ms/img,
    # so decoding on the device would only add its own time to the model's
    assert not _times(3.7, 0.12, 0.48, 16).prefers_device()
    # no workers: the main process decodes between batches, the device decode is cheaper
    assert _times(3.7, 0.5, 2.0, 0).prefers_device()
    # a win inside the margin keeps the reference path
    t = _times(13.0, 0.3, 0.5, 15)
    assert t.device_path < t.cpu_path and not t.prefers_device()
    assert "decode auto: the device" in _times(13.0, 0.3, 0.08, 15).describe()


def test_measure_decode_times_both_paths_and_the_model(tmp_path, tiny_dir) -> None:
    import dinoreg
    from dinoreg.inputs import calibrate

    model = dinoreg.load_model(str(tiny_dir.path))
    paths = _big_jpegs(tmp_path) + PHOTOS
    calls = []

    def compute(pixels: torch.Tensor):
        calls.append(tuple(pixels.shape))
        with torch.inference_mode():
            return model.forward_features(pixels)

    measured = calibrate.measure_decode(paths, Recipe(), pil_decoder, CPU, compute, workers=3)
    assert measured is not None and measured.workers == 3
    assert measured.cpu > 0 and measured.device > 0 and measured.model > 0
    assert calls and all(shape[1:] == (3, 224, 224) for shape in calls)
    # nothing the device decodes: no measurement, the CPU path
    png = tmp_path / "a.png"
    Image.open(PHOTOS[0]).save(png)
    assert calibrate.measure_decode([str(png)], Recipe(), pil_decoder, CPU, compute, 3) is None


def test_sample_is_spread_over_the_run_and_only_jpegs() -> None:
    from dinoreg.inputs.calibrate import sample_jpegs

    paths = [f"{i:03d}.jpg" if i % 3 else f"{i:03d}.png" for i in range(300)]
    sample = sample_jpegs(paths, 10)
    assert len(sample) == 10 and all(p.endswith(".jpg") for p in sample)
    assert sample[0] == "001.jpg" and int(sample[-1][:3]) > 250
    assert sample_jpegs(paths[:4], 10) == ["001.jpg", "002.jpg"]


@pytest.mark.parametrize("device_wins", [True, False], ids=["device", "cpu"])
def test_auto_runs_the_path_it_measured_faster_with_the_same_rows(
    monkeypatch, tmp_path, device_wins: bool
) -> None:
    from dinoreg import batches
    from dinoreg.batches import StageTimes

    fast = _times(13.0, 0.3, 0.08, 15) if device_wins else _times(3.7, 0.12, 0.48, 16)
    monkeypatch.setattr(batches, "measure_decode", lambda *args: fast)
    paths = _big_jpegs(tmp_path) + PHOTOS
    used = []

    def counting_decoder(data, device):
        used.append(len(data))
        return pil_decoder(data, device)

    def compute(pixels: torch.Tensor):
        return pixels.sum(dim=(1, 2, 3))

    def run(decode: str, decoder=None):
        times = StageTimes()
        options = ComputeOptions(batch_size=4, workers=0, decode=decode)
        results = list(
            run_batches(paths, Recipe(), options, compute, CPU, times, _tensor_decoder=decoder)
        )
        return results, times

    ref, ref_times = run("cpu")
    got, times = run("auto", counting_decoder)
    assert times.decode == ("device" if device_wins else "cpu") and ref_times.decode == "cpu"
    assert bool(used) == device_wins
    assert times.decode_choice == fast.describe()
    assert [r.paths for r in got] == [r.paths for r in ref]
