"""`dinoreg models`: the known aliases, their hub repos and sizes, whether each is cached."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.text import Text

from dinoreg.cli import output
from dinoreg.cli.app import JsonOpt, app, examples

_COLUMNS = ("alias", "family", "repo_id", "params", "download_bytes", "for", "cached")

_MODELS_EXAMPLES = examples(
    "dinoreg models",
    "dinoreg models --json",
)


@app.command(epilog=_MODELS_EXAMPLES)
def models(json_out: JsonOpt = False) -> None:
    """Known model aliases, their hub repos and sizes, and whether each is cached locally."""
    from dinoreg.model.config import VARIANTS, count_parameters
    from dinoreg.model.sources import is_cached

    rows = []
    for alias, v in VARIANTS.items():
        params = count_parameters(v.config)
        rows.append(
            {
                "alias": alias,
                "family": v.family,
                "repo_id": v.repo_id,
                "params": params,
                "download_bytes": params * 4,
                "for": v.purpose,
                "cached": is_cached(v.repo_id),
            }
        )
    if json_out:
        for row in rows:
            print(json.dumps(row))
        return
    if not sys.stdout.isatty():
        # TSV with a header line, every value whole
        print("\t".join(_COLUMNS))
        for r in rows:
            print("\t".join(str(r[k]) for k in _COLUMNS))
        return
    console = Console(soft_wrap=False)
    alias_w = max(len(r["alias"]) for r in rows)
    repo_w = max(len(r["repo_id"]) for r in rows)
    if alias_w + repo_w + 30 > console.width:
        # too narrow for a table that keeps alias and repo id whole: one block per model
        for r in rows:
            console.print(Text(r["alias"], style="bold"))
            console.print(Text(f"  {r['repo_id']}"), soft_wrap=True)
            console.print(Text(f"  {_details(r)}"), style="dim", soft_wrap=True)
        return
    from rich.table import Table

    table = Table(show_edge=False)
    # what must be copied (alias, repo id) is never cut; the description wraps instead
    table.add_column("alias", no_wrap=True, min_width=alias_w)
    table.add_column("hub repo", no_wrap=True, min_width=repo_w)
    for col in ("params", "download"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("for", overflow="fold", ratio=1)
    table.add_column("cached", no_wrap=True)
    for r in rows:
        table.add_row(
            r["alias"],
            r["repo_id"],
            f"{r['params'] / 1e6:.1f} M",
            output.human_bytes(r["download_bytes"]),
            r["for"],
            "yes" if r["cached"] else "no",
        )
    console.print(table)


def _details(r: dict) -> str:
    cached = "cached" if r["cached"] else "not cached"
    size = f"{r['params'] / 1e6:.1f} M params, {output.human_bytes(r['download_bytes'])}"
    return f"{size}, {r['for']}, {cached}"
