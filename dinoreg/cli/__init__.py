"""The `dinoreg` command: parse flags, build configs, call the library, render results.

stdout carries results only; progress, warnings and summaries go to stderr. Known errors become
one-line messages in `app.main` and nowhere else. Nothing heavy (torch) is imported before a
command runs.
"""

from dinoreg.cli import classify, embed, info, merge, models, neighbours, show  # noqa: F401  (each registers its commands)
from dinoreg.cli.app import app, main

__all__ = ["app", "main"]
