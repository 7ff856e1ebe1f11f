"""Which inputs a run covers, by identity: the real path, whatever spelling the user gave.

`imgs/a.jpg`, `./imgs/a.jpg` and a symlink to it are one input; so are `a/x.tar/k.jpg` and
`./a/x.tar/k.jpg` (a tar member: the tar's real path + "/" + member, `dinoreg.inputs.tars`).
A run records its input list in the staging directory (`inputs.tsv`: `identity<TAB>path as
given`, one line per input, in the order given) and its count and sha256 in the metadata
(`inputs`). A resumed run must cover the same identities, and matches committed rows by
identity, so respelling an input neither mixes two input lists nor duplicates rows. `paths`
in the output keeps what the user gave.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dinoreg._fs import write_new
from dinoreg.inputs import tars
from dinoreg.output.layout import decode_failure, encode_field

INPUTS = "inputs.tsv"
_SHOWN = 2


def identity(path: str) -> str:
    """The real path: what makes two spellings of an input the same input.

    A tar member is no file: resolving `x.tar/../y.jpg` whole would name the file y.jpg beside
    the tar, so only the tar is resolved and the member name is kept as the tar spells it.
    """
    return tars.identity(path)


@dataclass(frozen=True)
class InputList:
    """The inputs of a run: as given, and their identities (same order)."""

    given: tuple[str, ...]
    identities: tuple[str, ...]

    @classmethod
    def of(cls, paths: Iterable[str]) -> InputList:
        given = tuple(paths)
        return cls(given, tuple(identity(p) for p in given))

    def digest(self) -> dict[str, object]:
        """`{"count", "sha256"}` of the sorted unique identities: what the metadata records."""
        h = hashlib.sha256()
        unique = sorted(set(self.identities))
        for ident in unique:
            h.update(os.fsencode(ident) + b"\0")
        return {"count": len(unique), "sha256": h.hexdigest()}

    def to_bytes(self) -> bytes:
        lines = (f"{encode_field(i)}\t{encode_field(g)}\n" for i, g in self.pairs())
        return "".join(lines).encode("utf-8")

    def pairs(self) -> Iterator[tuple[str, str]]:
        return zip(self.identities, self.given, strict=True)


def write_inputs(directory: Path, inputs: InputList) -> None:
    write_new(directory / INPUTS, inputs.to_bytes())


def read_inputs(directory: Path) -> InputList | None:
    """The recorded input list, or None for an output started without one."""
    try:
        text = (directory / INPUTS).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    pairs = [decode_failure(line) for line in text.split("\n") if line]
    return InputList(tuple(g for _, g in pairs), tuple(i for i, _ in pairs))


def describe_difference(old: Sequence[str], new: Sequence[str]) -> str:
    """`N added (a, b, ...), M removed (c, ...)` between two identity lists."""
    old_set, new_set = set(old), set(new)
    parts = []
    for word, items in (("added", new_set - old_set), ("removed", old_set - new_set)):
        if items:
            shown = ", ".join(sorted(items)[:_SHOWN])
            more = ", ..." if len(items) > _SHOWN else ""
            parts.append(f"{len(items)} {word} ({shown}{more})")
    return ", ".join(parts) or "the same inputs in another order"
