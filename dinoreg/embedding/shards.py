"""Shards: one deterministic, balanced part of a run's inputs, for job arrays and many devices.

Shard I of N takes a contiguous block of the sorted, de-duplicated input list, so every host that
lists the same inputs takes the same part, the parts differ in size by at most one input, and
shards written in shard order are already in global input order (`dinoreg merge` relies on it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dinoreg.errors import UsageError

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise UsageError(
                f"shard {self.index}/{self.count} does not exist: use I/N with 0 <= I < N.",
                params=("shard",),
            )

    @classmethod
    def parse(cls, spec: str | tuple[int, int] | Shard) -> Shard:
        """`"2/8"`, `(2, 8)` or a Shard."""
        if isinstance(spec, Shard):
            return spec
        if isinstance(spec, tuple) and len(spec) == 2:
            return cls(int(spec[0]), int(spec[1]))
        m = _SPEC.fullmatch(str(spec))
        if m is None:
            raise UsageError(
                f"shard takes I/N (shard I of N, from 0), like 0/8; got {spec!r}.",
                params=("shard",),
            )
        return cls(int(m.group(1)), int(m.group(2)))

    def bounds(self, total: int) -> tuple[int, int]:
        """[first, stop) of this shard in a list of `total` inputs."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    def label(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"


def shard_path(out: str | Path, shard: Shard) -> Path:
    """`feats.h5` -> `feats-00002-of-00008.h5`; a directory `feats/` -> `feats-00002-of-00008/`."""
    path = Path(out)
    if path.suffix and not str(out).endswith(("/", "\\")):
        return path.with_name(f"{path.stem}-{shard.label()}{path.suffix}")
    return path.with_name(f"{path.name}-{shard.label()}")
