"""Drafts for speculative decoding: tokens a row will likely take next, fed with its last one in a
single forward pass and kept as far as the row's own choice agrees (generation.py checks them, so
the tokens are those of one token a pass).

Two sources: the words a row's grammar forces (certain: it could take nothing else), and prompt
lookup (`Lookup`: what followed the place where the row's text ended as it ends now).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from .constraints import Held

if TYPE_CHECKING:
    from .generation import GenerationOptions

SPECULATE = ("auto", "off", "ngram")  # --speculate: forced words always, lookup alone (auto) or always, none
MAX_FORCED = 16  # forced words fed in one pass at most (a longer run takes several)
MAX_DRAFT = 16  # --draft-tokens at most


class Row(Protocol):
    """What drafting reads of a row (generation.py's `_Row`)."""

    alive: bool
    opts: GenerationOptions
    held: Held
    prompt: Sequence[int]
    ids: list[int]
    lookup: Lookup


class Lookup:
    """Prompt lookup: the tokens that followed the first place a row's text (prompt and output)
    ended as it ends now (its last 3, 2 or 1 tokens). Under `auto`, a draft none of which was kept
    makes the row draft again only after 2, 4, 8, ... steps (at most 64): a pass of several tokens
    costs more than one (docs/performance.md), so a text that does not repeat itself pays little."""

    def __init__(self) -> None:
        self.misses, self.wait = 0, 0

    def draft(self, text: Sequence[int], most: int, patient: bool) -> list[int]:
        if most < 1:
            return []
        if self.wait and not patient:
            self.wait -= 1
            return []
        return next((list(text[i + n:i + n + most]) for n in (3, 2, 1) if len(text) > n
                     for i in range(len(text) - n) if text[i:i + n] == text[-n:]), [])

    def taken(self, n: int) -> None:
        self.misses = 0 if n else self.misses + 1
        self.wait = min(1 << self.misses, 64) if self.misses else 0


def drafts(rows: Sequence[Row], eos: int) -> tuple[list[list[int]], bool]:
    """Each row's draft, as many tokens for each (the fewest any live row has; a finished row's
    are `eos`, filler), and whether they are all certain (forced words that greedy decoding takes
    whatever the logits say). ([], _) when a live row has none or does not speculate."""
    live = [row for row in rows if row.alive]
    if any(row.opts.speculate == "off" for row in live):
        return [], False
    runs = [_forced(row, eos) for row in live]
    certain = all(runs) and not any(row.opts.do_sample for row in live)
    if not all(runs):
        if len(live) > 1 and not all(row.opts.speculate == "ngram" for row in live):
            return [], False  # under `auto` lookup only for a row decoding alone
        runs = [run or _looked_up(row, eos) for row, run in zip(live, runs, strict=True)]
    most = min(map(len, runs))
    if not most:
        return [], False
    own = iter(runs)
    return [next(own)[:most] if row.alive else [eos] * most for row in rows], certain


def _forced(row: Row, eos: int) -> list[int]:
    """The row's forced words, cut before one a ban could refuse (its processors would then end
    the row instead: such a token is not certain, and lookup may still draft it)."""
    o = row.opts
    if o.no_repeat_ngram_size:
        return []
    banned = {b[-1] for b in o.bad_words_ids}
    run = row.held.forced(min(MAX_FORCED, o.max_new_tokens - len(row.ids)), eos)
    return run[:next((i for i, t in enumerate(run) if t in banned), len(run))]


def _looked_up(row: Row, eos: int) -> list[int]:
    o = row.opts
    most = min(o.draft_tokens, o.max_new_tokens - len(row.ids) - 1)
    found = row.lookup.draft([*row.prompt, *row.ids], most, o.speculate == "ngram")
    return row.held.taken(found, eos)
