"""Drafts for speculative decoding: tokens a row will likely take next, fed with its last one in a
single forward pass and kept as far as the row's own choice agrees (generation.py checks them, so
the tokens are those of one token a pass).

Three sources: the words a row's grammar forces (certain: it could take nothing else), prompt
lookup (`Lookup`: what followed the place where the row's text ended as it ends now), and the same
checkpoint quantized (`SelfDraft`: int8 or int4 weights, a quarter or an eighth of the bytes a
token reads, drafting greedily with a cache of its own).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .constraints import Held
from .errors import InputError

if TYPE_CHECKING:
    from .generation import GenerationOptions

# --speculate: forced words always; then lookup for a row alone (auto) or for every row (ngram),
# a quantized copy for a row alone (int8, int4), or nothing (off)
SPECULATE = ("auto", "off", "ngram", "int8", "int4")
SELF = ("int8", "int4")
MAX_FORCED = 16  # forced words fed in one pass at most (a longer run takes several)
MAX_DRAFT = 16  # --draft-tokens at most


@dataclass
class DraftStats:
    """What speculation did over a run (`-v`): row passes (a forward pass feeding a live row), the
    tokens they took, and of the drafted tokens fed with them, how many were kept."""

    passes: int = 0
    tokens: int = 0
    drafted: int = 0
    kept: int = 0

    def line(self) -> str:
        per = self.tokens / self.passes if self.passes else 0.0
        rate = f"{self.kept / self.drafted:.0%} of {self.drafted} drafted kept" if self.drafted else "nothing drafted"
        return f"{per:.2f} tokens per forward pass ({self.tokens} tokens, {self.passes} row passes); {rate}"


class Row(Protocol):
    """What drafting reads of a row (generation.py's `_Row`)."""

    alive: bool
    opts: GenerationOptions
    held: Held
    prompt: Sequence[int]
    ids: list[int]
    drafter: Drafter


class Drafter(Protocol):
    """A row's source of drafts: `taken(n)` hears how many of its last draft were kept."""

    def draft(self, text: Sequence[int], most: int, patient: bool) -> list[int]: ...
    def taken(self, n: int) -> None: ...


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
        runs = [run or _drafted(row, eos) for row, run in zip(live, runs, strict=True)]
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


def _drafted(row: Row, eos: int) -> list[int]:
    """The row's draft from its text (lookup or its quantized copy), cut where its grammar stops
    taking it."""
    o = row.opts
    most = min(o.draft_tokens, o.max_new_tokens - len(row.ids) - 1)
    found = row.drafter.draft([*row.prompt, *row.ids], most, o.speculate != "auto")
    return row.held.taken(found, eos)


class SelfDraft:
    """Greedy drafts from a quantized copy of the model (`draft_model`), for one row. Its cache
    keeps what it has read of the row's text, so each call feeds only what is new (the row's
    last tokens) before drafting; what the row did not take is overwritten."""

    def __init__(self, model: nn.Module, capacity: int) -> None:
        self.model, self.capacity, self.cache, self.read = model, capacity, None, []

    def draft(self, text: Sequence[int], most: int, patient: bool) -> list[int]:
        if most < 1:
            return []
        if self.cache is None:
            self.cache = self.model.new_cache(1, self.capacity)
        same = next((i for i, (a, b) in enumerate(zip(self.read, text, strict=False)) if a != b),
                    min(len(self.read), len(text)))
        self.cache.length = same = min(same, len(text) - 1)  # at least one token fed: its logits draft
        ids, out = torch.tensor([text[same:]]), []
        with torch.no_grad():
            for _ in range(most):
                logits = self.model(ids, past_key_values=self.cache, logits_to_keep=1).logits[0, -1]
                out.append(int(logits.argmax()))
                ids = torch.tensor([out[-1:]])
        self.read = [*text, *out[:-1]]
        return out

    def taken(self, n: int) -> None:
        pass


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision: its quantized copy}


def attach(model: nn.Module, precision: str, draft: nn.Module) -> None:
    """`draft` is `model`'s quantized copy for self-drafting (a model built in memory has no folder
    to load one from)."""
    _COPIES.setdefault(model, {})[precision] = draft


def draft_model(model: nn.Module, precision: str) -> nn.Module:
    """`model`'s copy with `precision` weights, loaded once from its folder and kept beside it."""
    copies = _COPIES.setdefault(model, {})
    if precision not in copies:
        source = Path(getattr(model, "source", ""))
        if next(model.parameters()).device.type != "cpu":
            raise InputError(f"--speculate {precision}: the quantized drafts run on a CPU; use ngram or auto here")
        if not (source / "config.json").is_file():
            raise InputError(f"--speculate {precision}: the model was not loaded from a folder to quantize")
        from .loading import load_pretrained
        from .memory import check_draft_fits

        check_draft_fits(model.config, precision)
        copies[precision] = load_pretrained(source, quantize=precision, rows=1)[0]
    return copies[precision]
