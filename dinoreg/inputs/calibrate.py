"""`decode="auto"` on a device that can decode JPEGs: measure both paths on a sample of the
run's own inputs and keep the device decoder only where it makes the whole run faster.

The CPU path decodes in the workers while the model runs, so per image it costs the larger of
the model's time and one worker's decode time spread over the workers. The device path adds its
decode to the model's time on the same device. Which wins depends on the photos (a 500x375 JPEG
decodes 10x faster than a 12 MP one), the model (ViT-S leaves the device idle, ViT-g does not)
and the cores, so a rule cannot know it; a sample of a few dozen images measures it in well
under a second.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dinoreg.inputs.dataset import ImageDataset
from dinoreg.inputs.gpu_decode import JPEG_SUFFIXES, TensorDecoder, finish_encoded, read_encoded
from dinoreg.inputs.normalise import normalise_batch
from dinoreg.inputs.recipe import Recipe

SAMPLE = 24  # JPEGs measured on the device path (and as the model's batch)
CPU_SAMPLE = 8  # of those, decoded on one core for the CPU path
# The device path must win by this margin: the CPU path is the reference, and a sample
# measures with some noise.
MARGIN = 0.9


@dataclass(frozen=True)
class DecodeTimes:
    """Seconds per image measured on a sample of the run's inputs."""

    cpu: float  # decode + resize + crop on one core: what one worker pays
    device: float  # the device decoder with its resize and crop
    model: float  # the forward pass (what `compute` does), at the sample's batch size
    workers: int  # decode workers of the run (0: the main process decodes)

    @property
    def cpu_path(self) -> float:
        """Seconds per image with the workers decoding while the model runs."""
        if self.workers == 0:
            return self.model + self.cpu
        return max(self.model, self.cpu / self.workers)

    @property
    def device_path(self) -> float:
        """Seconds per image with the device decoding, then running the model."""
        return self.model + self.device

    def prefers_device(self) -> bool:
        """Whether decoding on the device makes the run faster, by a clear margin."""
        return self.device_path < MARGIN * self.cpu_path

    def describe(self) -> str:
        """One line for logs: the measured costs and the choice."""
        where = "the device" if self.prefers_device() else "the CPU"
        return (
            f"decode auto: {where} (per image: device decode {self.device * 1e3:.2f} ms + model "
            f"{self.model * 1e3:.2f} ms, against {self.workers} workers x "
            f"{self.cpu * 1e3:.2f} ms beside the model)"
        )


def sample_jpegs(paths: Sequence[str], count: int = SAMPLE) -> list[str]:
    """Up to `count` JPEG-named inputs spread evenly over the run (the same ones every time)."""
    jpegs = [p for p in paths if p.lower().endswith(JPEG_SUFFIXES)]
    if len(jpegs) <= count:
        return jpegs
    step = len(jpegs) / count
    return [jpegs[int(i * step)] for i in range(count)]


def measure_decode(
    paths: Sequence[str],
    recipe: Recipe,
    decoder: TensorDecoder,
    device: torch.device,
    compute: Callable[[torch.Tensor], object],
    workers: int,
) -> DecodeTimes | None:
    """Both decode paths and the model, timed on a sample of `paths`; None when the sample has
    nothing the device decodes (then the CPU path it is)."""
    sample = sample_jpegs(paths)
    dataset = ImageDataset(sample, recipe)
    items = [read_encoded(p, i, recipe, dataset.max_pixels) for i, p in enumerate(sample)]
    items = [item for item in items if item is not None]
    if not items:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's cost: workers run torch on one thread
    try:
        tick = time.perf_counter()
        decoded = [dataset.decoded(i) for i in range(min(CPU_SAMPLE, len(sample)))]
        cpu = (time.perf_counter() - tick) / len(decoded)
    finally:
        torch.set_num_threads(threads)
    finish_encoded(items[:1], device, recipe, decoder)  # the decoder's one-time start-up
    device_s = _timed(lambda: finish_encoded(items, device, recipe, decoder), device)
    pixels = _model_batch([s.pixels for s in decoded if s.pixels is not None], len(items))
    model = 0.0
    if pixels is not None:
        batch = normalise_batch(pixels.to(device), recipe)
        compute(batch)  # warm-up: kernels chosen, caches filled
        model = _timed(lambda: compute(batch), device) / len(batch)
    return DecodeTimes(cpu=cpu, device=device_s / len(items), model=model, workers=workers)


def _model_batch(crops: list[torch.Tensor], size: int) -> torch.Tensor | None:
    """`size` crops of the most common shape (keep-aspect crops differ), repeated as needed."""
    if not crops:
        return None
    shape, _ = Counter(tuple(c.shape) for c in crops).most_common(1)[0]
    same = [c for c in crops if tuple(c.shape) == shape]
    return torch.stack([same[i % len(same)] for i in range(max(size, len(same)))])


def _timed(call: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of `call`, waiting for the device to finish its work."""
    _synchronize(device)
    tick = time.perf_counter()
    call()
    _synchronize(device)
    return time.perf_counter() - tick


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
