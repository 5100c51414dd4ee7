"""Constraints: a finite automaton over token ids that a row carries through decoding.

At each step a row's automaton says which tokens it allows; the engine masks every other one
(generation.py: after the penalties and bans, before the sampling warpers and the choice), then
advances the automaton with the token chosen. A row whose automaton allows only `</s>` ends.

A `Grammar` is what the tasks and `--choices` need: a fixed `head`, then one or more `items`
joined by `sep` (each item a sequence of pieces: fixed words, one of several phrases, a span
copied from the row's own source), then a `tail` and `</s>`. It is matched lazily, as the set of
places the tokens so far may have reached (a subset construction done one step at a time), so an
ambiguity, such as a span that could end here or go on, is carried until a token settles it, and
a source of any length is ready at once: nothing is built before the first step.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

State = Hashable


class Constraint(Protocol):
    """What the engine needs of an automaton: a start, the tokens a state allows (None: every
    token), and the state a token leads to."""

    def start(self) -> State: ...
    def allowed(self, state: State) -> Sequence[int] | None: ...
    def advance(self, state: State, token: int) -> State: ...


# -- pieces: the sub-automata an item is made of ---------------------------------------------
@dataclass(frozen=True)
class OneOf:
    """One of a few token sequences (a single one: fixed words). Its state is the prefix so far."""

    options: tuple[tuple[int, ...], ...]
    nexts: dict[tuple[int, ...], frozenset[int]] = field(init=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        nexts: dict[tuple[int, ...], set[int]] = {}
        for option in self.options:
            for i in range(len(option)):
                nexts.setdefault(option[:i], set()).add(option[i])
        object.__setattr__(self, "nexts", {k: frozenset(v) for k, v in nexts.items()})

    def first(self) -> Any:
        return ()

    def tokens(self, sub: Any) -> Iterable[int]:
        return self.nexts.get(sub, ())

    def step(self, sub: Any, token: int) -> list[Any]:
        return [(*sub, token)] if token in self.nexts.get(sub, ()) else []

    def complete(self, sub: Any) -> bool:
        return sub in self.options


def words(ids: Sequence[int]) -> OneOf:
    """Fixed words."""
    return OneOf((tuple(ids),))


class Span:
    """Any run of whole `words` (each a tuple of token ids) of at most `max_words`, containing none
    of the `barred` words (those the template uses to tell its parts apart). `bare[w]`: how word
    w is spelled in a span, which it then ends (a word Moses kept with its sentence's period,
    `tremor.`, is `tremor`, and no entity runs on past it). Its state: (word, its tokens so far,
    words so far)."""

    def __init__(self, words: Sequence[tuple[int, ...]], bare: dict[int, tuple[int, ...]] | None = None,
                 barred: Iterable[Sequence[int]] = (), max_words: int = 16) -> None:
        bare, bar = bare or {}, {tuple(w) for w in barred}
        self.words = [bare.get(i, w) for i, w in enumerate(words)]
        self.last = [i in bare for i in range(len(words))]
        self.open = [bool(w) and w not in bar for w in words]
        self.max_words = max_words
        self.at: dict[int, list[int]] = {}  # a first token -> the words that begin with it
        for i, w in enumerate(self.words):
            if self.open[i]:
                self.at.setdefault(w[0], []).append(i)

    def first(self) -> Any:
        return None

    def _next(self, sub: Any) -> dict[int, list[tuple]]:
        """Where a started span may go: on through its word, or into the next one."""
        w, i, count = sub
        if i < len(self.words[w]):
            return {self.words[w][i]: [(w, i + 1, count)]}
        v = w + 1
        if self.last[w] or count >= self.max_words or v >= len(self.words) or not self.open[v]:
            return {}
        return {self.words[v][0]: [(v, 1, count + 1)]}

    def tokens(self, sub: Any) -> Iterable[int]:
        return self.at.keys() if sub is None else self._next(sub).keys()

    def step(self, sub: Any, token: int) -> list[Any]:
        if sub is None:
            return [(w, 1, 1) for w in self.at.get(token, ())]
        return self._next(sub).get(token, [])

    def complete(self, sub: Any) -> bool:
        return sub is not None and sub[1] == len(self.words[sub[0]])


Piece = OneOf | Span
HEAD, ITEM, SEP, TAIL, FINAL = range(5)


@dataclass(frozen=True, eq=False)
class Grammar:
    """`head item (sep item)* tail </s>`; with `unique`, no item is written twice (by its
    tokens), and without `sep` there is exactly one item. `name` is what records say of it."""

    name: str
    eos: int
    items: tuple[Piece, ...]
    head: tuple[Piece, ...] = ()
    sep: tuple[Piece, ...] = ()
    tail: tuple[Piece, ...] = ()
    unique: bool = False

    def _parts(self, part: int) -> tuple[Piece, ...]:
        return (self.head, self.items, self.sep, self.tail)[part]

    def start(self) -> State:
        return self._closure([self._enter(HEAD, frozenset())])

    def allowed(self, state: State) -> tuple[int, ...]:
        """The tokens that lead somewhere: with `unique`, a token that would finish an item
        already written is left out, so a row is never cornered into ending early."""
        sure, check = set(), set()
        for part, i, sub, _, _ in state:
            if part == FINAL:
                sure.add(self.eos)
                continue
            last = self.unique and part == ITEM and i == len(self.items) - 1
            (check if last else sure).update(self._parts(part)[i].tokens(sub))
        sure.update(t for t in check - sure if self.allowed(self.advance(state, t)))  # looks ahead to the item's end
        return tuple(sorted(sure))

    def advance(self, state: State, token: int) -> State:
        moved = []
        for part, i, sub, item, done in state:
            if part != FINAL:
                for nxt in self._parts(part)[i].step(sub, token):
                    moved.append((part, i, nxt, (*item, token) if part == ITEM else item, done))
        return self._closure(moved)

    def _closure(self, states: list[tuple]) -> frozenset:
        """The states with every place a complete piece or part hands on to; those that can take
        no token (a span at the source's end) are dropped."""
        seen: set[tuple] = set()
        while states:
            s = states.pop()
            if s in seen:
                continue
            seen.add(s)
            part, i, sub, item, done = s
            if part == FINAL:
                continue
            pieces = self._parts(part)
            if i == len(pieces):
                states.extend(self._after(part, item, done))
            elif pieces[i].complete(sub):
                states.append((part, i + 1, pieces[i + 1].first() if i + 1 < len(pieces) else None, item, done))
        return frozenset(s for s in seen if s[0] == FINAL or (
            s[1] < len(self._parts(s[0])) and any(True for _ in self._parts(s[0])[s[1]].tokens(s[2]))))

    def _enter(self, part: int, done: frozenset) -> tuple:
        if part == FINAL:
            return (FINAL, 0, None, (), frozenset())
        pieces = self._parts(part)
        return (part, 0, pieces[0].first() if pieces else None, (), done)

    def _after(self, part: int, item: tuple, done: frozenset) -> list[tuple]:
        """Where a finished part leads: head -> an item; an item -> sep or tail; sep -> an item."""
        if part in (HEAD, SEP):
            return [self._enter(ITEM, done)]
        if part == TAIL:
            return [self._enter(FINAL, done)]
        if self.unique and item in done:
            return []
        done = done | {item} if self.unique else done
        return [self._enter(SEP, done)] * bool(self.sep) + [self._enter(TAIL, done)]


# -- the rows of a batch -----------------------------------------------------------------------
class RowStates:
    """The constraint and state of each row of a batch, and the mask of what they allow now."""

    def __init__(self, constraints: Sequence[Constraint | None]) -> None:
        self.constraints = list(constraints)
        self.states = [c.start() if c is not None else None for c in self.constraints]

    def __bool__(self) -> bool:
        return any(c is not None for c in self.constraints)

    def set(self, row: int, constraint: Constraint | None) -> None:
        """Row `row` starts over with `constraint` (a prompt took its place, or it is new)."""
        while row >= len(self.constraints):
            self.constraints.append(None)
            self.states.append(None)
        self.constraints[row] = constraint
        self.states[row] = constraint.start() if constraint is not None else None

    def advance(self, row: int, token: int) -> None:
        if self.constraints[row] is not None:
            self.states[row] = self.constraints[row].advance(self.states[row], token)

    def follow(self, parents: Sequence[int], tokens: Sequence[int]) -> None:
        """Beam search: row r continues row `parents[r]` with `tokens[r]`."""
        before = self.states
        self.constraints = [self.constraints[p] for p in parents]
        self.states = [c.advance(before[p], t) if c is not None else None
                       for c, p, t in zip(self.constraints, parents, tokens, strict=True)]

    def mask(self, vocab: int, device: torch.device) -> torch.Tensor | None:
        """[rows, vocab] bool, True where a row may take the token (None when no row is held),
        made on the device from token indices: the step waits for nothing."""
        if not self:
            return None
        rows, tokens, free = [], [], []
        for r, (c, s) in enumerate(zip(self.constraints, self.states, strict=True)):
            allowed = c.allowed(s) if c is not None else None
            if allowed is None:
                free.append(r)
            else:
                rows.extend([r] * len(allowed))
                tokens.extend(allowed)
        mask = torch.zeros(len(self.states), vocab, dtype=torch.bool, device=device)
        if free:
            mask[torch.tensor(free).to(device, non_blocking=True)] = True
        if rows:
            index = torch.tensor([rows, tokens]).to(device, non_blocking=True)
            mask[index[0], index[1]] = True
        return mask


def constrain(scores: torch.Tensor, allowed: torch.Tensor, eos: int) -> torch.Tensor:
    """`scores` with what `allowed` forbids at -inf; a row left with nothing ends (`</s>`)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    dead = torch.isneginf(scores).all(-1)
    scores[:, eos] = torch.where(dead, torch.zeros_like(scores[:, eos]), scores[:, eos])
    return scores
