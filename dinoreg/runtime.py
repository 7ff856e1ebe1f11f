"""Where and how the model runs: device and dtype, precision, CPU fast paths, compile, and
`prepare_model`, which every command uses to get its model ready."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dinoreg.errors import UsageError
from dinoreg.inputs.gpu_decode import check_decode
from dinoreg.model import cpu
from dinoreg.model.vit import RegistersViT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ComputeOptions:
    """Where and how the model runs, and how images are fed to it."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    batch_size: int = 16
    workers: int | None = None  # None: chosen from the cores present
    compile: bool = False  # torch.compile the model's forward (worth it on long GPU runs)
    cpu_fast_paths: bool = True  # `dinoreg.model.cpu`; off runs the plain model everywhere
    # auto | cpu | gpu: where JPEGs are decoded (`dinoreg.inputs.gpu_decode`); on CUDA, auto
    # measures both on a sample of the inputs (`dinoreg.inputs.calibrate`), elsewhere the CPU
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(
                f"batch_size must be at least 1, got {self.batch_size}.", params=("batch_size",)
            )
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"workers must be 0 or more, got {self.workers}.", params=("workers",))
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UsageError(
                f"Unknown dtype {self.dtype!r}; use auto, {', '.join(DTYPES)}.", params=("dtype",)
            )
        check_decode(self.decode, self.device)


def device_list(spec: str) -> list[str]:
    """The devices a run uses: `cpu,cpu` or `cuda:0,cuda:2` as listed; `cuda` and `auto` every
    visible GPU; anything else the one device. Each listed device must exist."""
    names = [s.strip() for s in spec.split(",")]
    if len(names) > 1:
        if not all(names):
            raise UsageError(f"device list {spec!r} has an empty entry.", params=("device",))
        for name in names:
            choose_device(name)
        return names
    if spec in ("cuda", "auto") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [spec]


def choose_device(spec: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(
            f"Unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps.", params=("device",)
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(_no_cuda(spec), params=("device",))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {spec} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s).",
                params=("device",),
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(
            "device mps was asked for but MPS is not available; use device cpu.", params=("device",)
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(
            f"Unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps.", params=("device",)
        )
    return device


def _no_cuda(spec: str) -> str:
    if torch.version.cuda is None:
        return (
            f"device {spec} was asked for, but this torch {torch.__version__} was installed "
            "without CUDA; install a CUDA build of torch (see pytorch.org), or use device cpu."
        )
    return f"device {spec} was asked for but no CUDA GPU is visible; use device cpu."


def choose_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA that supports it, else fp16 on CUDA, fp32 elsewhere."""
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return DTYPES[spec]


def compile_model(model: RegistersViT, options: ComputeOptions) -> RegistersViT:
    """With `options.compile`, route the model's one forward (`features`) through torch.compile.

    The instance attribute shadows the method, so every entry point (`forward_features`,
    `intermediate_layers`, `logits`) runs compiled. Each new input shape (a keep-aspect grid, a
    last short batch) compiles once more.
    """
    if options.compile:
        model.features = torch.compile(model.features, dynamic=False)
    return model


def casts_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on CPU runs on bf16 weights rather than autocast: oneDNN then fuses bias and GELU
    into the matmuls and nothing is re-cast per batch (measured ~1.4x autocast's throughput,
    CLS cosine to fp32 >= 0.9999). GPUs use autocast."""
    return device.type == "cpu" and dtype == torch.bfloat16


def set_precision(model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """Put the model in the form `autocast` expects for this device and dtype.

    With bf16 weights the position table stays float32: it is resized in float32 and cast to
    the token dtype only when added. LayerNorm and softmax compute in float32 inside their kernels.
    """
    if casts_weights(device, dtype):
        pos = model.pos_embed.data
        model.to(dtype)
        model.pos_embed.data = pos
    return model


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for reduced dtypes (where weights are not cast); the model keeps norms,
    softmax and positions in float32."""
    if dtype == torch.float32 or casts_weights(device, dtype):
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


@dataclass
class PreparedModel:
    """A model ready to run: on its device, in its precision, fast paths and compile applied."""

    model: RegistersViT
    device: torch.device
    dtype: torch.dtype

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """Inference mode with the autocast this device and dtype need."""
        with torch.inference_mode(), autocast(self.device, self.dtype):
            yield


def prepare_model(
    name_or_path: str, compute: ComputeOptions, head: str | Path | None = None
) -> PreparedModel:
    """Load a model and make it ready the same way for every command (embed, classify, show)."""
    from dinoreg.model.weights import load_model

    device = choose_device(compute.device)
    dtype = choose_dtype(compute.dtype, device)
    model = set_precision(load_model(name_or_path, device=device, head=head), device, dtype)
    if compute.cpu_fast_paths and device.type == "cpu":
        cpu.apply(model, model.patch_embed.proj.weight.dtype)
    return PreparedModel(compile_model(model, compute), device, dtype)
