"""Constraints: a finite automaton over token ids that a row carries through decoding.

At each step a row's automaton says which tokens it allows; the engine masks every other one
(generation.py: after the penalties and bans, before the sampling warpers and the choice), then
advances the automaton with the token chosen. A row whose automaton allows only `</s>` ends.

A `Grammar` is what the tasks and `--choices` need: a fixed `head`, then one or more `items`
joined by `sep` (each item a sequence of pieces: fixed words, one of several phrases, a span
copied from the row's own source), then a `tail` and `</s>`. It is matched lazily, as the set of
places the tokens so far may have reached (a subset construction done one step at a time), so an
ambiguity, such as a span that could end here or go on, is carried until a token settles it, and
a source of any length is ready at once.

A grammar never corners a row: a token is allowed only if the place it leads to can still reach
`</s>` after a complete answer, within the row's `limit` of new tokens, without writing an item
twice where items are `unique` (`Grammar.viable`, memoised).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
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
# Each piece has a `first()` place, `step(sub, token)` (the places a token leads to), `complete(sub)`
# and `ranked(sub)`: the tokens that lead somewhere the piece can still complete, each with the
# fewest tokens it then needs, fewest first. `shortest(sub)`: the fewest tokens to complete it.
NEVER = 1 << 30  # the length of a completion that does not exist


@dataclass(frozen=True)
class OneOf:
    """One of a few token sequences (a single one: fixed words). Its place is the prefix so far."""

    options: tuple[tuple[int, ...], ...]
    short: dict[tuple[int, ...], int] = field(init=False, compare=False, hash=False)
    nexts: dict[tuple[int, ...], tuple[tuple[int, int], ...]] = field(init=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        short: dict[tuple[int, ...], int] = {}
        for option in self.options:
            for i in range(len(option) + 1):
                short[option[:i]] = min(short.get(option[:i], NEVER), len(option) - i)
        nexts: dict[tuple[int, ...], set[int]] = {}
        for option in self.options:
            for i in range(len(option)):
                nexts.setdefault(option[:i], set()).add(option[i])
        object.__setattr__(self, "short", short)
        object.__setattr__(self, "nexts", {k: tuple(sorted((short[(*k, t)], t) for t in v)) for k, v in nexts.items()})

    def first(self) -> Any:
        return ()

    def ranked(self, sub: Any) -> Sequence[tuple[int, int]]:
        return self.nexts.get(sub, ())

    def step(self, sub: Any, token: int) -> list[Any]:
        return [(*sub, token)] if (*sub, token) in self.short else []

    def complete(self, sub: Any) -> bool:
        return sub in self.options

    def shortest(self, sub: Any) -> int:
        return self.short.get(sub, NEVER)


def fixed(ids: Sequence[int]) -> OneOf:
    """Fixed words."""
    return OneOf((tuple(ids),))


class Span:
    """A run of consecutive source `words` (each a tuple of token ids) of at most `max_words`: it
    starts on a word that `start` allows, ends on one that `end` allows with its brackets closed
    (`depth`: +1 for a word that opens one, -1 for one that closes it; never below 0 inside), and
    holds only words that `inner` allows. A `last` word ends any span it is in (a word Moses kept
    with its sentence's period, spelled without it); `cut[v]` >= 0 bars a span that holds words
    `cut[v]` to `v` (a phrase that would change how the answer parses). Its place: (word, its
    tokens so far, words so far, open brackets)."""

    def __init__(self, words: Sequence[tuple[int, ...]], inner: Sequence[bool], start: Sequence[bool],
                 end: Sequence[bool], depth: Sequence[int] = (), last: Sequence[bool] = (),
                 max_words: int = 16, cut: Sequence[int] = ()) -> None:
        n = len(words)
        self.words, self.inner, self.end, self.max_words = list(words), list(inner), list(end), max_words
        self.depth, self.last, self.cut = list(depth) or [0] * n, list(last) or [False] * n, list(cut) or [-1] * n
        self._finish: dict[tuple[int, int, int], int] = {}
        starts: dict[int, list[int]] = {}  # a first token -> the words a span may start on with it
        for w in range(n):
            opens = start[w] and inner[w] and self.words[w] and self.depth[w] >= 0
            if opens and self.finish(w, 1, self.depth[w]) < NEVER:
                starts.setdefault(self.words[w][0], []).append(w)
        self.at = starts
        self._first = tuple(sorted((min(len(self.words[w]) - 1 + self.finish(w, 1, self.depth[w]) for w in ws), t)
                                   for t, ws in starts.items()))

    def finish(self, w: int, count: int, depth: int) -> int:
        """The fewest tokens after word `w` (the span's `count`th word, `depth` brackets open) to a
        word the span may end on; NEVER when it cannot end."""
        key = (w, count, depth)
        if key not in self._finish:
            best = 0 if self.end[w] and depth == 0 else NEVER
            v = self._onto(w, count, depth)
            if best and v is not None:
                best = min(best, len(self.words[v]) + self.finish(v, count + 1, depth + self.depth[v]))
            self._finish[key] = best
        return self._finish[key]

    def _onto(self, w: int, count: int, depth: int) -> int | None:
        """The word a span may go on into after word `w`, if any."""
        v = w + 1
        if self.last[w] or count >= self.max_words or v >= len(self.words) or not self.inner[v] \
                or not self.words[v] or depth + self.depth[v] < 0 or self.cut[v] > w - count:
            return None
        return v

    def first(self) -> Any:
        return None

    def ranked(self, sub: Any) -> Sequence[tuple[int, int]]:
        if sub is None:
            return self._first
        w, i, count, depth = sub
        if i < len(self.words[w]):
            return ((len(self.words[w]) - i - 1 + self.finish(w, count, depth), self.words[w][i]),)
        v = self._onto(w, count, depth)
        if v is None or (rest := self.finish(v, count + 1, depth + self.depth[v])) >= NEVER:
            return ()
        return ((len(self.words[v]) - 1 + rest, self.words[v][0]),)

    def step(self, sub: Any, token: int) -> list[Any]:
        if sub is None:
            return [(w, 1, 1, self.depth[w]) for w in self.at.get(token, ())]
        w, i, count, depth = sub
        if i < len(self.words[w]):
            return [(w, i + 1, count, depth)] if self.words[w][i] == token else []
        v = self._onto(w, count, depth)
        if v is None or self.words[v][0] != token:
            return []
        return [(v, 1, count + 1, depth + self.depth[v])] if self.finish(v, count + 1, depth + self.depth[v]) < NEVER \
            else []

    def complete(self, sub: Any) -> bool:
        return sub is not None and sub[1] == len(self.words[sub[0]]) and sub[3] == 0 and self.end[sub[0]]

    def shortest(self, sub: Any) -> int:
        if sub is None:
            return self._first[0][0] + 1 if self._first else NEVER
        w, i, count, depth = sub
        return len(self.words[w]) - i + self.finish(w, count, depth)

    def occurrences(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """Every (first word, last word) of the source that a span of these token ids copies."""
        found = []
        for w in self.at.get(ids[0], ()) if ids else ():
            subs = [(w, 1, 1, self.depth[w])]
            for t in ids[1:]:
                subs = [nxt for sub in subs for nxt in self.step(sub, t)]
            found.extend((w, sub[0]) for sub in subs if self.complete(sub))
        return found


Piece = OneOf | Span
HEAD, ITEM, SEP, TAIL, FINAL = range(5)
Place = tuple  # (part, piece index, piece place, the item's tokens so far, the items written, trail)


@dataclass(frozen=True, eq=False)
class Grammar:
    """`head item (sep item)* tail </s>`; with `unique`, no item is written twice (by its
    tokens), and without `sep` there is exactly one item. `limit`: the new tokens a row has,
    `</s>` included (None: no limit). `name` is what records say of it.

    A state is (tokens taken, the set of places they may have reached)."""

    name: str
    eos: int
    items: tuple[Piece, ...]
    head: tuple[Piece, ...] = ()
    sep: tuple[Piece, ...] = ()
    tail: tuple[Piece, ...] = ()
    unique: bool = False
    limit: int | None = None
    _after: dict[tuple[int, int], int] = field(init=False, default_factory=dict)
    _viable: dict[tuple[Place, int], bool] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        least = [sum(p.shortest(p.first()) for p in self._parts(part)) for part in (HEAD, ITEM, SEP, TAIL)]
        rest = {HEAD: least[ITEM] + least[TAIL] + 1, ITEM: least[TAIL] + 1,  # + 1: the `</s>`
                SEP: least[ITEM] + least[TAIL] + 1, TAIL: 1}
        for part, after in rest.items():  # after piece i of a part: the parts' later pieces, then the rest
            pieces = self._parts(part)
            for i in range(len(pieces)):
                self._after[part, i] = sum(p.shortest(p.first()) for p in pieces[i + 1:]) + after

    def _parts(self, part: int) -> tuple[Piece, ...]:
        return (self.head, self.items, self.sep, self.tail)[part]

    def start(self, trace: bool = False) -> State:
        """With `trace`, each place also keeps the span pieces' tokens so far (`spans`)."""
        return 0, self._closure([self._enter(HEAD, frozenset(), ((), ()) if trace else None)])

    def allowed(self, state: State) -> tuple[int, ...]:
        """The tokens whose next state can still end the answer (`viable`)."""
        taken, places = state
        left = (NEVER if self.limit is None else self.limit - taken) - 1  # what a token leaves
        found: set[int] = set()
        for place in places:
            part, i, sub = place[:3]
            if part == FINAL:
                if left >= 0:
                    found.add(self.eos)
                continue
            pending, after = self._pending(place), self._after[part, i]
            for need, t in self._parts(part)[i].ranked(sub):
                if need + after > left:
                    break
                if t not in found and (t not in pending or any(self.viable(p, left) for p in self._moved(place, t))):
                    found.add(t)
        return tuple(sorted(found))

    def viable(self, place: Place, left: int) -> bool:
        """Whether `place` can still reach the end of a complete answer in `left` tokens: the
        fewest tokens its pieces need fit, and (with `unique`) some way there is not an item
        already written. Only the tokens that follow an item written before need a look ahead."""
        part, i, sub = place[:3]
        if part == FINAL:
            return left >= 1
        after = self._after[part, i]
        if self._parts(part)[i].shortest(sub) + after > left:
            return False
        pending = self._pending(place)
        if not pending:
            return True
        key = (place[:5], left)
        if key not in self._viable:
            self._viable[key] = any(
                t not in pending or any(self.viable(p, left - 1) for p in self._moved(place, t))
                for need, t in self._parts(part)[i].ranked(sub) if need + after <= left - 1)
        return self._viable[key]

    def _pending(self, place: Place) -> Any:
        """The tokens after which a place must look ahead: in an item, the next tokens of items
        written before that begin as it does; after a `sep`, every token (a new item must differ)."""
        part, _, _, item, done = place[:5]
        if not self.unique or not done:
            return ()
        if part == SEP:
            return _ALL
        if part != ITEM:
            return ()
        n = len(item)
        return {d[n] for d in done if len(d) > n and d[:n] == item}

    def advance(self, state: State, token: int) -> State:
        taken, places = state
        return taken + 1, self._closure([p for place in places if place[0] != FINAL
                                         for p in self._steps(place, token)])

    def _steps(self, place: Place, token: int) -> list[Place]:
        part, i, sub, item, done, trail = place
        if trail is not None:
            trail = (trail[0], (*trail[1], token))
        return [(part, i, nxt, (*item, token) if part == ITEM else item, done, trail)
                for nxt in self._parts(part)[i].step(sub, token)]

    def _moved(self, place: Place, token: int) -> frozenset:
        return self._closure(self._steps(place, token))

    def _closure(self, places: list[Place]) -> frozenset:
        """The places with every place a complete piece or part hands on to; those that can take
        no token (a span at the source's end) are dropped."""
        seen: set[Place] = set()
        while places:
            s = places.pop()
            if s in seen:
                continue
            seen.add(s)
            part, i, sub, item, done, trail = s
            if part == FINAL:
                continue
            pieces = self._parts(part)
            if i == len(pieces):
                places.extend(self._next_part(part, item, done, trail))
            elif pieces[i].complete(sub):
                if trail is not None:
                    trail = ((*trail[0], trail[1]), ()) if isinstance(pieces[i], Span) else (trail[0], ())
                places.append((part, i + 1, pieces[i + 1].first() if i + 1 < len(pieces) else None, item, done,
                               trail))
        return frozenset(s for s in seen if s[0] == FINAL or (
            s[1] < len(self._parts(s[0])) and self._parts(s[0])[s[1]].ranked(s[2])))

    def _enter(self, part: int, done: frozenset, trail: Any) -> Place:
        if part == FINAL:
            return (FINAL, 0, None, (), frozenset(), trail)
        pieces = self._parts(part)
        return (part, 0, pieces[0].first() if pieces else None, (), done, trail)

    def _next_part(self, part: int, item: tuple, done: frozenset, trail: Any) -> list[Place]:
        """Where a finished part leads: head -> an item; an item -> sep or tail; sep -> an item."""
        if part in (HEAD, SEP):
            return [self._enter(ITEM, done, trail)]
        if part == TAIL:
            return [self._enter(FINAL, done, trail)]
        if self.unique and item in done:
            return []
        done = done | {item} if self.unique else done
        return [self._enter(SEP, done, trail)] * bool(self.sep) + [self._enter(TAIL, done, trail)]

    def spans(self, tokens: Sequence[int]) -> list[tuple[int, ...]] | None:
        """The tokens of each span piece, in order, in an answer this grammar takes (`</s>` left
        out); None when it does not take it."""
        state = self.start(trace=True)
        for t in tokens:
            state = self.advance(state, t)
        return next((p[5][0] for p in state[1] if p[0] == FINAL), None)


class _Everything:
    """Every token (after a `sep`, any token may begin an item written before)."""

    def __contains__(self, token: object) -> bool:
        return True

    def __bool__(self) -> bool:
        return True


_ALL = _Everything()


# -- the rows of a batch -----------------------------------------------------------------------
class Held:
    """A row's constraint and where it stands in it (no constraint: a free row)."""

    __slots__ = ("constraint", "state")

    def __init__(self, constraint: Constraint | None, state: Any = None) -> None:
        self.constraint = constraint
        self.state = state if state is not None or constraint is None else constraint.start()

    def advance(self, token: int) -> None:
        if self.constraint is not None:
            self.state = self.constraint.advance(self.state, token)

    def after(self, token: int) -> Held:
        """A copy that took `token` (a beam continuing this one)."""
        held = Held(self.constraint, self.state)
        held.advance(token)
        return held

    def allowed(self) -> Sequence[int] | None:
        return self.constraint.allowed(self.state) if self.constraint is not None else None

    def taken(self, tokens: Sequence[int], eos: int) -> list[int]:
        """The longest prefix of `tokens` (`</s>` never) that the constraint takes from here."""
        held, kept = Held(self.constraint, self.state), []
        for t in tokens:
            allowed = held.allowed()
            if t == eos or (allowed is not None and t not in allowed):
                break
            kept.append(t)
            held.advance(t)
        return kept

    def forced(self, most: int, eos: int) -> list[int]:
        """The tokens (at most `most`, `</s>` never) that the constraint allows alone next, one
        after another: the grammar's fixed words, which need no choice."""
        held, run = Held(self.constraint, self.state), []
        while self.constraint is not None and len(run) < most:
            allowed = held.allowed()
            if allowed is None or len(allowed) != 1 or allowed[0] == eos:
                break
            run.append(allowed[0])
            held.advance(allowed[0])
        return run


def allowed_mask(rows: Sequence[Held], vocab: int, device: torch.device) -> torch.Tensor | None:
    """[rows, vocab] bool, True where a row may take the token (None when no row is held), made on
    the device from token indices: the step waits for nothing."""
    if all(h.constraint is None for h in rows):
        return None
    index, tokens, free = [], [], []
    for r, held in enumerate(rows):
        allowed = held.allowed()
        if allowed is None:
            free.append(r)
        else:
            index.extend([r] * len(allowed))
            tokens.extend(allowed)
    mask = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    if free:
        mask[torch.tensor(free).to(device, non_blocking=True)] = True
    if index:
        where = torch.tensor([index, tokens]).to(device, non_blocking=True)
        mask[where[0], where[1]] = True
    return mask


def constrain(scores: torch.Tensor, allowed: torch.Tensor, eos: int) -> torch.Tensor:
    """`scores` with what `allowed` forbids at -inf; a row left with nothing ends (`</s>`)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    dead = torch.isneginf(scores).all(-1)
    scores[:, eos] = torch.where(dead, torch.zeros_like(scores[:, eos]), scores[:, eos])
    return scores
