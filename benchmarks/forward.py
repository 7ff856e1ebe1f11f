"""Forward only: images/s of dinoreg and transformers on the same weights, side by side.

For each model size, dtype mode and batch size both models run the same pixels in one process,
timed alternately (median of repeats after warm-up) under `torch.inference_mode`. Modes:

- `fp32`: float32 weights and activations.
- `bf16`: the weights cast to bfloat16 (`model.to(torch.bfloat16)`); both models cast the
  pixels to the weight dtype themselves.
- `bf16-autocast`: float32 weights under `torch.autocast(device, dtype=torch.bfloat16)`.

Achieved GFLOP/s counts the matmul FLOPs of the forward analytically (`common.vit_flops`) and
is given as a fraction of the best square `torch.mm` of the same compute dtype in the same run.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import models
from benchmarks.common import Options, Section, matmul_peak, time_interleaved, vit_flops

MODES = ("fp32", "bf16", "bf16-autocast")
COMPUTE_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "bf16-autocast": "bfloat16"}


def run(opts: Options) -> Section:
    start = time.perf_counter()
    section = Section("forward", f"Forward only ({opts.image_size}x{opts.image_size})")
    device = torch.device("cpu")
    peaks = {d: matmul_peak(d, reps=3 if opts.quick else 6) for d in ("float32", "bfloat16")}
    rows: list[dict[str, Any]] = []
    accuracy: list[dict[str, Any]] = []
    parity: list[dict[str, Any]] = []
    with models.temp_workdir() as tmp:
        for size in opts.sizes:
            pair = models.build_pair(size, Path(tmp))
            cfg = pair.ours.cfg
            grid = opts.image_size // cfg.patch_size
            flops = vit_flops(
                cfg.dim, cfg.depth, cfg.heads, cfg.ffn_hidden, grid, grid,
                patch=cfg.patch_size, registers=cfg.num_registers,
            )  # fmt: skip
            parity.append(_parity(pair, opts))
            accuracy.extend(_accuracy(pair, opts))
            for mode in MODES:
                ours, hf = _models_for(pair, mode)
                for batch in opts.batches:
                    row = _time_one(ours, hf, mode, batch, device, opts, flops, peaks)
                    rows.append({"model": size} | row)
                del ours, hf
                gc.collect()
            del pair
            gc.collect()
    section.data = {
        "matmul_peak_gflops": peaks,
        "flops_per_image": _flops_table(opts),
        "throughput": rows,
        "parity_fp32": parity,
        "bf16_accuracy": accuracy,
        "threads": torch.get_num_threads(),
    }
    section.blocks = [
        _peak_block(peaks),
        _throughput_block(rows),
        _parity_block(parity),
        _accuracy_block(accuracy),
    ]
    section.seconds = time.perf_counter() - start
    return section


def _models_for(pair: models.Pair, mode: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    if mode == "bf16":
        return models.as_dtype(pair.ours, torch.bfloat16), models.as_dtype(pair.hf, torch.bfloat16)
    return pair.ours, pair.hf


@contextlib.contextmanager
def _mode_context(mode: str, device: torch.device) -> Iterator[None]:
    with torch.inference_mode():
        if mode == "bf16-autocast":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield


def _calls(
    ours: torch.nn.Module, hf: torch.nn.Module, x: torch.Tensor
) -> dict[str, Callable[[], object]]:
    return {
        "dinoreg": lambda: ours.forward_features(x),
        "transformers": lambda: hf(pixel_values=x),
    }


def _time_one(
    ours: torch.nn.Module,
    hf: torch.nn.Module,
    mode: str,
    batch: int,
    device: torch.device,
    opts: Options,
    flops: dict[str, int],
    peaks: dict[str, float],
) -> dict[str, Any]:
    x = models.pixels(batch, opts.image_size).to(device)
    if batch == 1:
        warmup, reps = (2, 5) if opts.quick else (3, 15)
    else:
        warmup, reps = (1, 2) if opts.quick else (1, 5)
    with _mode_context(mode, device):
        timings = time_interleaved(_calls(ours, hf, x), warmup, reps)
    ours_ips = batch / timings["dinoreg"].median
    hf_ips = batch / timings["transformers"].median
    peak = peaks[COMPUTE_DTYPE[mode]]
    gflops = flops["total"] * ours_ips / 1e9
    return {
        "mode": mode,
        "batch": batch,
        "dinoreg_img_s": ours_ips,
        "transformers_img_s": hf_ips,
        "ratio": ours_ips / hf_ips,
        "dinoreg_best_img_s": batch / timings["dinoreg"].best,
        "transformers_best_img_s": batch / timings["transformers"].best,
        "dinoreg_gflops": gflops,
        "transformers_gflops": flops["total"] * hf_ips / 1e9,
        "peak_gflops": peak,
        "fraction_of_peak": gflops / peak,
        "dinoreg_timing": timings["dinoreg"].as_dict(),
        "transformers_timing": timings["transformers"].as_dict(),
    }


def _parity(pair: models.Pair, opts: Options) -> dict[str, Any]:
    """Our fp32 output against transformers' on the same photos: the speed rows compare equals."""
    x = models.pixels(4, opts.image_size)
    with torch.inference_mode():
        ours = models.ours_sequence(pair.ours.forward_features(x))
        ref = pair.hf(pixel_values=x).last_hidden_state
    return {
        "model": pair.size,
        "max_abs_diff": (ours.double() - ref.double()).abs().max().item(),
        "ref_max_abs": ref.abs().max().item(),
        "batch": 4,
    }


def _accuracy(pair: models.Pair, opts: Options) -> list[dict[str, Any]]:
    """bf16 against fp32 for CLS and patch tokens, ours and (for scale) transformers'."""
    x = models.pixels(8, opts.image_size)
    out = []
    with torch.inference_mode():
        ref_ours = models.ours_sequence(pair.ours.forward_features(x)).float()
        ref_hf = pair.hf(pixel_values=x).last_hidden_state.float()
    for mode in ("bf16", "bf16-autocast"):
        ours, hf = _models_for(pair, mode)
        with _mode_context(mode, torch.device("cpu")):
            got_ours = models.ours_sequence(ours.forward_features(x)).float()
            got_hf = hf(pixel_values=x).last_hidden_state.float()
        regs = pair.ours.cfg.num_registers
        for impl, got, ref in (("dinoreg", got_ours, ref_ours), ("transformers", got_hf, ref_hf)):
            out.append(
                {"model": pair.size, "mode": mode, "impl": impl}
                | _compare("cls", got[:, 0], ref[:, 0])
                | _compare("patches", got[:, 1 + regs :], ref[:, 1 + regs :])
            )
        del ours, hf
    return out


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (got.double() - ref.double()).abs()
    cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
    return {
        f"{name}_max_abs": diff.max().item(),
        f"{name}_mean_abs": diff.mean().item(),
        f"{name}_ref_mean_abs": ref.abs().mean().item(),
        f"{name}_cos_min": cos.min().item(),
        f"{name}_cos_mean": cos.mean().item(),
    }


def _flops_table(opts: Options) -> dict[str, dict[str, int]]:
    grid = opts.image_size // 14
    return {
        size: vit_flops(s["dim"], s["depth"], s["heads"], 4 * s["dim"], grid, grid)
        for size, s in models.SHAPES.items()
        if size in opts.sizes
    }


# -- markdown ---------------------------------------------------------------------------------


def _peak_block(peaks: dict[str, float]) -> str:
    lines = [
        "Matmul peak (best square 2048^3 `torch.mm`, same process and threads):",
        "",
        "| dtype | GFLOP/s |",
        "| --- | ---: |",
    ]
    lines += [f"| {d} | {p:.0f} |" for d, p in peaks.items()]
    return "\n".join(lines)


def _throughput_block(rows: list[dict[str, Any]]) -> str:
    lines = [
        "Images/s (median of repeats; best in brackets); ratio = dinoreg / transformers; "
        "GFLOP/s of dinoreg and its fraction of the matmul peak of the compute dtype:",
        "",
        "| model | mode | batch | dinoreg img/s | transformers img/s | ratio | dinoreg GFLOP/s "
        "| % of peak |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} "
            f"| {r['dinoreg_img_s']:.1f} ({r['dinoreg_best_img_s']:.1f}) "
            f"| {r['transformers_img_s']:.1f} ({r['transformers_best_img_s']:.1f}) "
            f"| {r['ratio']:.2f}x | {r['dinoreg_gflops']:.0f} "
            f"| {100 * r['fraction_of_peak']:.0f}% |"
        )
    return "\n".join(lines)


def _parity_block(parity: list[dict[str, Any]]) -> str:
    lines = [
        "Same weights, same photos, fp32: max abs difference of the final hidden states",
        "",
        "| model | max abs diff | max abs value |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| {p['model']} | {p['max_abs_diff']:.2e} | {p['ref_max_abs']:.2f} |" for p in parity
    ]
    return "\n".join(lines)


def _accuracy_block(acc: list[dict[str, Any]]) -> str:
    lines = [
        "bf16 against fp32 (8 photos; random weights, so a proxy for the real checkpoints): "
        "max / mean abs difference (mean |fp32 value| for scale) and cosine similarity min / mean",
        "",
        "| model | mode | impl | CLS max / mean abs (scale) | CLS cos min / mean "
        "| patches max / mean abs (scale) | patches cos min / mean |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a in acc:
        lines.append(
            f"| {a['model']} | {a['mode']} | {a['impl']} "
            f"| {a['cls_max_abs']:.3g} / {a['cls_mean_abs']:.3g} ({a['cls_ref_mean_abs']:.3g}) "
            f"| {a['cls_cos_min']:.5f} / {a['cls_cos_mean']:.5f} "
            f"| {a['patches_max_abs']:.3g} / {a['patches_mean_abs']:.3g} "
            f"({a['patches_ref_mean_abs']:.3g}) "
            f"| {a['patches_cos_min']:.5f} / {a['patches_cos_mean']:.5f} |"
        )
    return "\n".join(lines)
