"""Where a task's source words stand in the document's text, so that an entity copied from the
source (grammars.py) is known by its character offsets, not found again by a search.

The model reads Moses tokens of a lowercased source (`tasks.py`: title and abstract joined, or
the abstract alone); each is aligned to the document's text as given (title, one space, abstract:
how PubTator counts offsets; or a record's `text`), comparing case-folded characters. Moses escapes
`&"'<>|[]` and spells a hyphen `@-@`, both undone here; whitespace and the control characters it
drops are passed over. A word that matches nowhere at the place reached (a `.` the task inserted after
the title, a character Moses changed) is left without offsets, and the next word is looked for a
little further on. A word Moses kept with a sentence's period (`tremor.`) is aligned as the word
without it when the text has none there (the title's end).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b]")  # what Moses drops (it reads \t-\r and \x1c-\x1f as spaces)
RESYNC = 32  # characters a word may be looked for past the place reached, after one that was not found
HYPHEN = "@-@"  # Moses' aggressive hyphen split


def document_text(fields: Mapping[str, Any]) -> str:
    """A record's text as offsets count in it: title, a space, abstract (PubTator's way); a record
    with `text` and no abstract: the text (the task sources read it so)."""
    if "text" in fields and "abstract" not in fields:
        return str(fields.get("text") or "")
    return f"{fields.get('title') or ''} {fields.get('abstract') or ''}"


@dataclass(frozen=True)
class Word:
    """A source word: its Moses text (escapes undone), its BPE ids, and the characters of the
    document it is (`at`; None when it could not be aligned). A word kept with a sentence's period
    has `bare` set: `at` then covers the word without the period."""

    text: str
    ids: tuple[int, ...]
    at: tuple[int, int] | None
    bare: bool = False
    glued: bool = False  # no space between it and the word before (both aligned)


def _folded(text: str, begin: int, end: int) -> tuple[str, list[int]]:
    """`text[begin:end]` case-folded character by character, with each folded character's index,
    less the ASCII control characters Moses removes (a word it joins across one still aligns)."""
    whole = text[begin:end].casefold()
    if len(whole) == end - begin and not _CONTROL.search(whole):  # most texts: one character each
        return whole, list(range(begin, end))
    out, index = [], []
    for k in range(begin, end):
        if _CONTROL.match(text[k]):
            continue
        f = text[k].casefold()
        out.append(f)
        index.extend([k] * len(f))
    return "".join(out), index


def _skippable(c: str) -> bool:
    return c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp")


def align(pieces: Sequence[tuple[str, Sequence[int]]], text: str, begin: int = 0, end: int | None = None,
          unescape: Any = lambda s: s) -> list[Word]:
    """The `pieces` (Moses token, BPE ids) of a source taken from `text[begin:end]`, each with the
    characters of `text` it is. `unescape` undoes Moses' escapes (the tokenizer's `unescape`)."""
    folded, index = _folded(text, begin, len(text) if end is None else end)
    index.append(index[-1] + 1 if index else begin)
    cursor, missed, words = 0, 0, []
    for raw, ids in pieces:
        word = "-" if raw == HYPHEN else unescape(raw) if "&" in raw else raw
        target = word.casefold()
        spaced = cursor
        while spaced < len(folded) and _skippable(folded[spaced]):
            spaced += 1
        found, bare = _find(folded, target, spaced, missed), False
        if found is None and len(word) > 1 and word.endswith("."):
            found, bare = _find(folded, target[:-1], spaced, missed), True
        if found is None:
            words.append(Word(word, tuple(ids), None))
            missed += len(word)
            continue
        stop = found + len(target) - bare
        at = (index[found], index[stop - 1] + 1)
        glued = bool(words) and words[-1].at is not None and found == cursor and not missed
        if word.endswith(".") and len(word) > 1 and not bare:  # the period is in the text: the entity is without it
            at, bare = (at[0], at[1] - 1), True
        words.append(Word(word, tuple(ids), at, bare, glued))
        cursor, missed = stop, 0
    return words


def _find(folded: str, target: str, at: int, missed: int) -> int | None:
    """Where `target` stands: at `at`, or (after a word that was not found) a little further on."""
    if folded.startswith(target, at):
        return at
    if missed and target:
        k = folded.find(target, at, at + missed + RESYNC + len(target))
        if k >= 0:
            return k
    return None
