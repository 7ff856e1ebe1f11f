"""What an embed run reports: progress after each batch, the summary at the end, and the
exception that carries the summary of an interrupted run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Progress:
    """What a progress callback receives after each committed batch."""

    done: int  # inputs handled so far in this run (rows + skipped)
    total: int  # inputs this run handles (resumed inputs excluded)
    rows: int
    new_failures: list[tuple[str, str]]


@dataclass
class RunSummary:
    """The outcome of an embed run."""

    out: Path
    inputs: int  # inputs discovered
    resumed: int  # inputs already committed by an earlier run and skipped
    rows: int  # rows written by this run
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    failures_before: int = 0  # inputs skipped by the earlier runs of a resumed output
    seconds: float = 0.0
    complete: bool = False
    bytes: int = 0
    times: dict[str, float] = field(default_factory=dict)
    # What the run did with `out`: "created" (new output), "continued" (resumed an incomplete
    # one) or "already-complete" (resume found the same run finished; nothing was written).
    mode_used: str = "created"
    # Where the committed rows are: `out` once complete; the staging directory (`<out>.partial`,
    # or the .npy directory itself) while the output is unfinished.
    rows_at: Path | None = None
    # Values the store_dtype cast turned into inf or nan (float16 overflows past +-65504), in the
    # whole output; the CLI warns when it is not 0.
    nonfinite_values: int = 0

    @property
    def images_per_s(self) -> float:
        """Rows written per second (skipped inputs are not images embedded)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0


class Interrupted(Exception):
    """The run stopped on Ctrl-C or SIGTERM after committing every finished batch."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary
