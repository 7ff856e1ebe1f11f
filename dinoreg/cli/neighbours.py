"""`dinoreg search`, `dinoreg dedup` and `dinoreg index`: what people do with the features next."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from dinoreg.cli import output
from dinoreg.cli.app import EXIT_SKIPPED, DeviceOpt, JsonOpt, QuietOpt, app, examples

FeatsArg = Annotated[
    Path, typer.Argument(metavar="FEATS", help="An output of dinoreg embed (x.h5 or a directory).")
]
TokensOpt = Annotated[
    str,
    typer.Option(
        "--tokens", metavar="WHICH", help="What is compared: cls, or patches-mean (the mean patch)."
    ),
]
LayerOpt = Annotated[
    int | None,
    typer.Option("--layer", metavar="N", help="A block stored with embed --layers."),
]
IndexOpt = Annotated[
    str,
    typer.Option(
        "--index",
        metavar="auto|none|PATH",
        help="auto: FEATS.index when current; none: exact; or an index file.",
    ),
]

_SEARCH_EXAMPLES = examples(
    "dinoreg search feats.h5 query.jpg -k 5",
    "dinoreg search feats.h5 --row 17 --json",
    "find new/ -name '*.jpg' | dinoreg search feats.h5 - > neighbours.tsv",
)


@app.command(epilog=_SEARCH_EXAMPLES)
def search(
    feats: FeatsArg,
    queries: Annotated[
        list[str] | None,
        typer.Argument(metavar="QUERY", help="Image files (embedded like FEATS), or - for stdin."),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", metavar="K", help="Neighbours per query.")] = 10,
    rows: Annotated[
        list[int] | None, typer.Option("--row", metavar="N", help="Query with row N of FEATS.")
    ] = None,
    paths: Annotated[
        list[str] | None,
        typer.Option("--path", metavar="P", help="Query with the row FEATS holds for path P."),
    ] = None,
    tokens: TokensOpt = "cls",
    layer: LayerOpt = None,
    index: IndexOpt = "auto",
    sheet: Annotated[
        Path | None,
        typer.Option("--sheet", metavar="PNG", help="Draw each query beside its neighbours."),
    ] = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """The k nearest rows of FEATS for each query (cosine similarity)."""
    from dinoreg.errors import UsageError
    from dinoreg.inputs.discover import read_stdin_paths
    from dinoreg.neighbours import open_vectors
    from dinoreg.neighbours import search as run_search
    from dinoreg.neighbours.queries import embed_queries
    from dinoreg.runtime import ComputeOptions

    images = list(queries or [])
    if "-" in images:
        images = [q for q in images if q != "-"] + read_stdin_paths(sys.stdin)
    asked: list[int | str] = [*(rows or []), *(paths or [])]
    if not images and not asked:
        raise UsageError("give a query: image files, - for stdin, --row N or --path P.")
    labels: list[str] = [f"row {r}" for r in rows or []] + list(paths or [])
    failed: list[tuple[str, str]] = []
    with open_vectors(feats, tokens, layer) as vecs:
        queries_in: list = list(asked)
        if images:
            kept, matrix, failed = embed_queries(vecs, images, ComputeOptions(device=device))
            queries_in += list(matrix)
            labels += kept
    for path, reason in failed:
        output.skipped(path, reason)
    results = run_search(feats, queries_in, k=k, tokens=tokens, layer=layer, index=index)
    if results and results[0].clipped:
        output.warning(f"{feats} has only {len(results[0].hits)} rows; fewer than -k {k}.")
    table = sys.stdout.isatty() and not json_out
    for label, result in zip(labels, results, strict=True):
        if json_out:
            hits = [
                {"rank": i + 1, "row": h.row, "path": h.path, "score": round(h.score, 6)}
                for i, h in enumerate(result.hits)
            ]
            doc = {"query": label, "method": result.method, "hits": hits}
            print(json.dumps(doc, ensure_ascii=False), flush=True)
        elif table:
            _print_hits(label, result)
        else:
            for i, h in enumerate(result.hits):
                print(f"{_field(label)}\t{i + 1}\t{_field(h.path)}\t{h.score:.6f}")
    if sheet is not None:
        from dinoreg.viz.neighbours import search_sheet

        search_sheet([(label, r.hits) for label, r in zip(labels, results, strict=True)], sheet)
    if failed:
        raise typer.Exit(EXIT_SKIPPED)


def _field(text: str) -> str:
    from dinoreg.output.layout import encode_field

    return encode_field(text)


def _print_hits(label: str, result) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(label), title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("path", overflow="fold")  # wrapped, never cut
    for i, h in enumerate(result.hits):
        table.add_row(str(i + 1), f"{h.score:.4f}", Text(h.path))
    Console().print(table)


_DEDUP_EXAMPLES = examples(
    "dinoreg dedup feats.h5",
    "dinoreg dedup feats.h5 --threshold 0.99 --sheet dups/",
)


@app.command(epilog=_DEDUP_EXAMPLES)
def dedup(
    feats: FeatsArg,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold", metavar="T", help="Cosine similarity in (0, 1] (default 0.95)."
        ),
    ] = None,
    tokens: TokensOpt = "cls",
    layer: LayerOpt = None,
    index: IndexOpt = "auto",
    sheet: Annotated[
        Path | None,
        typer.Option("--sheet", metavar="DIR", help="One picture per group, largest first."),
    ] = None,
    max_sheets: Annotated[
        int, typer.Option("--max-sheets", metavar="N", min=1, help="At most N pictures.")
    ] = 50,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Groups of near-duplicate rows: group, path, score to the group's first member."""
    from dinoreg.neighbours import DEFAULT_THRESHOLD
    from dinoreg.neighbours import dedup as run_dedup

    cut = DEFAULT_THRESHOLD if threshold is None else threshold
    groups = run_dedup(feats, threshold=cut, tokens=tokens, layer=layer, index=index)
    for g, group in enumerate(groups, start=1):
        if json_out:
            members = [
                {"row": m.row, "path": m.path, "score": round(m.score, 6)} for m in group.members
            ]
            print(json.dumps({"group": g, "members": members}, ensure_ascii=False))
        else:
            for m in group.members:
                print(f"{g}\t{_field(m.path)}\t{m.score:.6f}")
    if sheet is not None:
        from dinoreg.viz.neighbours import group_sheets

        group_sheets(groups[:max_sheets], sheet)
    if not quiet:
        dups = sum(g.size - 1 for g in groups)
        output.say(
            f"{len(groups)} groups of near-duplicates ({dups} rows beyond the first of each), "
            f"threshold {cut}"
        )


@app.command(
    epilog=examples("dinoreg index feats.h5", "dinoreg index feats.h5 --tokens patches-mean")
)
def index(
    feats: FeatsArg,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", metavar="PATH", help="Default: FEATS.index.")
    ] = None,
    tokens: TokensOpt = "cls",
    layer: LayerOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """An approximate index (faiss) that search and dedup use for large files."""
    from dinoreg.neighbours import build_index

    info = build_index(feats, out, tokens=tokens, layer=layer)
    if not quiet:
        output.say(
            f"indexed {info.rows} rows ({info.lists} lists) in {info.build_seconds:.1f} s -> "
            f"{info.path} ({output.human_bytes(info.size_bytes)})"
        )
