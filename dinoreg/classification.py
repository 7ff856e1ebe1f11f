"""ImageNet-1k top-k predictions from a model with a linear head, streamed batch by batch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TextIO

import torch

from dinoreg.batches import run_batches
from dinoreg.errors import UsageError, WeightsError
from dinoreg.inputs.discover import as_input_list, find_inputs
from dinoreg.inputs.recipe import Recipe
from dinoreg.runtime import ComputeOptions, prepare_model


@dataclass(frozen=True)
class Label:
    """One class: its index, WordNet id (when known) and human name."""

    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Prediction:
    rank: int
    index: int
    label: str
    prob: float


@dataclass(frozen=True)
class Classified:
    """The top-k classes of one image."""

    path: str
    top: tuple[Prediction, ...]


@dataclass(frozen=True)
class Skipped:
    """An input that could not be classified, and why."""

    path: str
    reason: str


@functools.cache
def imagenet_labels() -> tuple[Label, ...]:
    """The 1000 ImageNet-1k classes shipped with dinoreg (index, WordNet id, label)."""
    text = resources.files("dinoreg").joinpath("data/imagenet-1k-classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return tuple(Label(int(i), wnid, name) for i, wnid, name in rows)


def label_names(checkpoint_labels: Sequence[str] | None, num_labels: int) -> list[str]:
    """Class names: the checkpoint's own when it has real ones, else ImageNet's for 1000 classes."""
    if checkpoint_labels is not None and len(checkpoint_labels) == num_labels:
        return list(checkpoint_labels)
    if num_labels == 1000:
        return [label.name for label in imagenet_labels()]
    return [f"class_{i}" for i in range(num_labels)]


def top_k(logits: torch.Tensor, names: Sequence[str], k: int) -> list[tuple[Prediction, ...]]:
    """Softmax probabilities of the k best classes per row, best first."""
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        tuple(
            Prediction(rank + 1, int(i), names[int(i)], float(p))
            for rank, (p, i) in enumerate(zip(row_p.tolist(), row_i.tolist(), strict=True))
        )
        for row_p, row_i in zip(values, indices, strict=True)
    ]


def classify(
    inputs: Sequence[str] | str,
    model: str = "small-imagenet1k",
    *,
    head: str | None = None,
    top: int = 5,
    recipe: Recipe | None = None,
    compute: ComputeOptions | None = None,
    stdin: TextIO | None = None,
    notice: Callable[[str], None] | None = None,
) -> Iterator[Classified | Skipped]:
    """Classify images, yielding one result per input in input order as batches finish.

    `notice` receives one-line remarks worth showing a person (a `head` that replaces the
    checkpoint's own classifier)."""
    if top < 1:
        raise UsageError(f"top must be at least 1, got {top}.", params=("top",))
    recipe = recipe or Recipe()
    compute = compute or ComputeOptions()
    found = find_inputs(as_input_list(inputs), stdin=stdin)
    paths = found.paths
    prepared = prepare_model(model, compute, head=head)
    net = prepared.model
    if net.head is None:
        raise WeightsError(
            f"Model {model} cannot classify (it has no linear layer on top); use an "
            "-imagenet1k model (e.g. small-imagenet1k) or add a *_linear_head.pth file as head.",
            params=("head",),
        )
    names = label_names(net.info.labels, net.cfg.num_labels)
    if notice is not None and net.info.replaced_head:
        notice(f"{head} replaces the classifier that {model} comes with.")

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        with prepared.inference():
            return net.logits(pixels).float().cpu()

    # inputs that do not exist are named first, before any model runs on the rest
    yield from (Skipped(name, reason) for name, reason in found.missing)
    order = {p: i for i, p in enumerate(paths)}
    for result in run_batches(paths, recipe, compute, forward, prepared.device):
        # rows and failures come back separately; put them back in input order
        ranked = top_k(result.outputs, names, top) if result.outputs is not None else []
        items: list[Classified | Skipped] = [
            Classified(p, preds) for p, preds in zip(result.paths, ranked, strict=True)
        ]
        items += [Skipped(p, reason) for p, reason in result.failures]
        yield from sorted(items, key=lambda item: order[item.path])
