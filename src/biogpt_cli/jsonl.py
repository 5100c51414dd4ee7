"""JSONL: one record a line, written so that no reader can split a record, read so that only `\n`
(with a `\r` before it dropped) ends a line.

`json.dumps` escapes `\n` and `\r` inside strings but leaves U+2028, U+2029 and U+0085 as they are
when it writes UTF-8, and `str.splitlines()` breaks at those too: a record holding one became two
unparseable lines. The writer escapes them (`\u2028` is the same JSON string), and every reader of
the package splits with `lines` below, never `splitlines()`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def dumps(record: Any) -> str:
    """One JSONL line, `\n` included: UTF-8 text as it is, except the characters other readers
    take for line breaks, escaped."""
    return json.dumps(record, ensure_ascii=False).translate(_BREAKS) + "\n"


def loads(text: str) -> Any:
    """`json.loads` for a user's file: a document nested too deeply for Python's parser is a
    `json.JSONDecodeError` like any other bad JSON, not a `RecursionError`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None


def lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of `text`, split at `\n` only; a `\r` ending a line is dropped, a lone
    `\r` or any other character stays in its line. No empty last line after a final `\n`."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    for n, line in enumerate(parts, 1):
        yield n, line.removesuffix("\r")
