"""Everything the CLI prints on stderr, markup-safe: user text (paths, reasons, labels, error
messages) is always printed literally, never read as rich markup."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.text import Text

# markup off: a file named `[bold]x.jpg` or `[/x].jpg` must print as itself
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def say(*parts: str | tuple[str, str]) -> None:
    """One line on stderr from plain strings and (text, style) pairs; nothing is markup."""
    err.print(Text.assemble(*parts))


def error(message: str) -> None:
    say(("error: ", "red"), message)


def warning(message: str) -> None:
    say(("warning: ", "yellow"), message)


def skipped(path: str, reason: str) -> None:
    """The one line that names an input that was skipped, and why."""
    say(("skipped ", "yellow"), path, ": ", reason)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


class ProgressBar:
    """tqdm on stderr, only on a terminal and unless --quiet; skipped inputs named as they come."""

    def __init__(self, what: str, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.what = what
        self.bar = None

    def update(self, event) -> None:
        for path, reason in event.new_failures:
            if self.bar is not None:
                self.bar.write(f"skipped {path}: {reason}", file=sys.stderr)
            else:
                skipped(path, reason)
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=event.total, unit="img", file=sys.stderr, dynamic_ncols=True, desc=self.what
            )
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
