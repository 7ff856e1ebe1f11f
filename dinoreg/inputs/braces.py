"""Brace expansion of command-line inputs, as a shell does it: `shards/{00000..00099}.tar`.

Quoted arguments (and arguments from programs that start no shell) reach us unexpanded, so we
expand them the way bash would: `{a,b,c}` lists, `{0..99}` / `{00..99}` / `{1..9..2}` numeric
ranges (a zero-padded endpoint pads every number to the wider endpoint), `{a..e}` letter ranges,
nested groups. A group that is neither a list nor a range stays as written, braces included.
"""

from __future__ import annotations

import re

from dinoreg.errors import UsageError

MAX_EXPANSION = 1_000_000  # names one argument may expand to; more is surely a typo
_NUMBERS = re.compile(r"^([+-]?\d+)\.\.([+-]?\d+)(?:\.\.([+-]?\d+))?$")
_LETTERS = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.([+-]?\d+))?$")


def has_braces(text: str) -> bool:
    """Whether `text` could expand at all (a cheap test before `expand_braces`)."""
    return "{" in text and "}" in text


def expand_braces(text: str, limit: int = MAX_EXPANSION) -> list[str]:
    """Every word `text` expands to, in the order bash gives them; `[text]` when nothing does.

    Raises UsageError (naming `inputs`) when the expansion would pass `limit` words.
    """
    return _expand(text, limit)


def _expand(text: str, limit: int) -> list[str]:
    start = text.find("{")
    while start >= 0:
        group = _group(text, start)
        if group is not None:
            end, parts = group
            if len(parts) > 1:
                choices = [word for part in parts for word in _expand(part, limit)]
            else:
                choices = _range(parts[0], limit, text)
            if choices is not None:
                tails = _expand(text[end + 1 :], limit)
                _check_count(len(choices) * len(tails), limit, text)
                head = text[:start]
                return [head + choice + tail for choice in choices for tail in tails]
        # Not an expansion: bash keeps these braces and looks for the next group inside them.
        start = text.find("{", start + 1)
    return [text]


def _group(text: str, start: int) -> tuple[int, list[str]] | None:
    """(index of the matching `}`, the parts between top-level commas), or None if unclosed."""
    depth = 0
    parts: list[str] = []
    last = start + 1
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                parts.append(text[last:i])
                return i, parts
        elif ch == "," and depth == 1:
            parts.append(text[last:i])
            last = i + 1
    return None


def _range(body: str, limit: int, text: str) -> list[str] | None:
    """The words of a `{first..last[..step]}` range, or None when `body` is not one."""
    match = _NUMBERS.match(body)
    if match is not None:
        first, last = int(match[1]), int(match[2])
        values = _steps(first, last, match[3], limit, text)
        padded = [s.lstrip("+-") for s in (match[1], match[2])]
        if any(len(s) > 1 and s.startswith("0") for s in padded):
            # bash pads to the wider endpoint as written, its sign counting as a character
            width = max(len(match[1]), len(match[2]))
            return [f"{v:0{width}d}" for v in values]
        return [str(v) for v in values]
    match = _LETTERS.match(body)
    if match is not None:
        values = _steps(ord(match[1]), ord(match[2]), match[3], limit, text)
        return [chr(v) for v in values]
    return None


def _steps(first: int, last: int, step: str | None, limit: int, text: str) -> range:
    size = abs(int(step)) if step else 1
    size = size or 1  # bash treats a zero step as one
    values = range(first, last + 1, size) if first <= last else range(first, last - 1, -size)
    _check_count(len(values), limit, text)
    return values


def _check_count(count: int, limit: int, text: str) -> None:
    if count > limit:
        raise UsageError(
            f"inputs: {text} expands to {count} names, more than {limit}; "
            "check the brace ranges, or list the inputs on stdin.",
            params=("inputs",),
        )
