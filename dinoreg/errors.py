"""The errors a user can cause. Each message is one sentence naming the thing and the fix.

Library messages name Python parameters (`batch_size must be at least 1`) and list them in
`params`; the CLI rewrites those names into its flags (`--batch-size`) in one place.
"""

from __future__ import annotations


class DinoregError(Exception):
    """A problem the user can fix; the CLI prints the message alone and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, *, params: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.params = params


class InputError(DinoregError):
    """Bad inputs: nothing matched, unreadable paths, bad stdin."""


class WeightsError(DinoregError):
    """A model name or checkpoint that cannot be resolved, downloaded or loaded."""


class OutputError(DinoregError):
    """An output that exists, is locked by another run, or does not match a resumed run."""


class UsageError(DinoregError):
    """Arguments that contradict each other or are out of range."""

    exit_code = 2
