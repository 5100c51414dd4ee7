"""Token ids to text, as they are generated: emit only text that later tokens cannot change.

Moses detokenization decides the spacing of each word from that word and the words before it,
with one exception: `@-@` (a hyphen Moses split off) glues its neighbours together ("IL @-@ 2"
becomes "IL-2"). So the text of words [0, k) is final once word k is complete and neither word
k - 1 nor word k is `@-@`. A `TextStream` emits the continuation's share of that final text and
holds back any tail that could still grow into a stop string; `continuation` computes the same
text in one go, so the concatenated stream equals it byte for byte.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .constraints import Constraint
from .drafts import DraftStats
from .generation import GeneratedSequence, GenerationOptions, Generators, beam_search, stream_tokens
from .model import BioGptForCausalLM
from .tokenizer import BioGptTokenizer

HYPHEN = "@-@"
OPEN_QUOTE = re.compile(r"""^['"„“`]+$""")  # Moses' IS_OPEN_QUOTE
QUOTISH = re.compile(r"""['"„“`&]""")  # what a word needs to be a quote once unescaped


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _cut(text: str, stop: Sequence[str], keep: bool = False) -> tuple[str, bool]:
    """`text` before the first stop string (through it, with `keep`), and whether one was there;
    a stop string at the first word leaves nothing (not the space before it)."""
    hits = [(i, -len(s), s) for s in stop if s and (i := text.find(s)) >= 0]
    if not hits:
        return text, False
    i, _, found = min(hits)
    head = text[:i] + (found if keep else "")
    return head if head.strip() else "", True


def continuation(tokenizer: BioGptTokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int],
                 stop: Sequence[str] = (), keep: bool = False) -> tuple[str, bool]:
    """The text `new_ids` add to the prompt's decoded text, cut before the first stop string
    (after it, with `keep`).

    `decode(prompt) + text == decode(prompt + new)`, so the text usually starts with a space. Where
    Moses rewrites the end of the prompt (a rare `@-@` join), the text starts where the two differ.
    Returns the text and whether a stop string cut it.
    """
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode([*prompt_ids, *new_ids], skip_special_tokens=True)
    return _cut(full[_common_prefix(prompt, full):], stop, keep)


class _Unread(Exception):
    """Every prompt of a beam batch lost its reader: the search stops."""


class TextStream:
    """Incremental `continuation` for one sequence: `add(token)` returns the newly final text.

    Each token costs a window of words, not the whole text: the final text grows by the Moses
    detokenization of the words since an *anchor*, a word boundary where Moses starts afresh (an
    even count of each quote kind before it: quotes are its only state that reaches further back
    than one word), overlapping the settled words by at least one so that spacing at the seam is
    decided as in the whole text. The prompt itself is read from the last anchor two words before
    its end (`_base`): all texts here begin there, so a long prompt costs what a short one does."""

    def __init__(self, tokenizer: BioGptTokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 keep_stop: bool = False) -> None:
        self.tokenizer, self.prompt_ids, self.stop = tokenizer, list(prompt_ids), tuple(s for s in stop if s)
        self.keep_stop = keep_stop  # the final text keeps the stop string that ended it
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False  # a stop string appeared: the caller should end this sequence
        pieces = tokenizer.words(prompt_ids, skip_special_tokens=True)
        self._words = pieces.split()  # complete words, then the open one (if any) last
        self._open = bool(pieces) and not pieces[-1:].isspace()
        self._quotes = Quotes(tokenizer)
        fresh = self._quotes.fresh_through(self._words, max(len(self._words) - self._open - 2, 0))
        self._base = next(a for a in reversed([0, *fresh]) if self._seam(a))  # where every text here begins
        self._anchors = [self._base]  # settled word counts where Moses starts afresh
        self.prompt_text = tokenizer.detokenize(self._words[self._base:])
        self._settled = self._base  # words whose text is final
        self._final = ""  # their text, from the base on
        self._start: int | None = None  # where the continuation begins in that text, once known

    def add(self, token: int) -> str:
        self.ids.append(token)
        self._append(self.tokenizer.words([token], skip_special_tokens=True))
        words = self._words
        complete = len(words) - self._open
        k = complete - 1  # word k must be complete and known not to join its neighbours
        while k > self._settled and HYPHEN in (words[k], words[k - 1]):
            k -= 1
        if k > self._settled:
            self._final += self._detok_between(self._settled, k)
            self._settled = k
            self._anchors += self._quotes.fresh_through(words, k)
            if self._start is None and _common_prefix(self._final, self.prompt_text) < len(self._final):
                self._start = _common_prefix(self._final, self.prompt_text)
        if self.stop:
            self.stopped = _cut(self._current(), self.stop)[1]
        if self.stopped or self._start is None:
            return ""
        ready = self._final[self._start:]
        ready = ready[: len(ready) - self._stop_prefix(ready)]
        return self._emit(ready)

    def extend(self, token: int) -> None:
        """Take a token without settling any text: for output nobody watches, which `finish`
        decodes once."""
        self.ids.append(token)
        self._append(self.tokenizer.words([token], skip_special_tokens=True))

    def finish(self) -> str:
        """The rest of the text, once the sequence has ended: `continuation`'s text, computed from
        the base on."""
        full = self._whole()
        text, self.stopped = _cut(full[_common_prefix(self.prompt_text, full):], self.stop, self.keep_stop)
        if not text.startswith(self.text):
            raise RuntimeError(f"streamed text {self.text!r} is not a prefix of the final text {text!r}")
        return self._emit(text)

    def _append(self, piece: str) -> None:
        """Add a token's BPE piece (`words` form: a trailing space ends the word) to the words."""
        text = piece.rstrip(" ")
        if text:
            if self._open:
                self._words[-1] += text
            else:
                self._words.append(text)
            self._open = True
        if piece.endswith(" "):
            self._open = False

    def _detok_between(self, j: int, k: int) -> str:
        """The text words [j, k) add to the final text of words [0, j), detokenizing from the
        last anchor before j (the whole text when j is 0)."""
        if j == self._base:
            return self.tokenizer.detokenize(self._words[j:k])
        a = next(a for a in reversed(self._anchors) if a < j and self._seam(a))
        before = self.tokenizer.detokenize(self._words[a:j])
        return self.tokenizer.detokenize(self._words[a:k])[len(before):]

    def _seam(self, a: int) -> bool:
        """Whether a window may start at word `a`: not inside a chain of `@-@` joins (Moses joins
        them pairwise from the left, so a chain's result depends on where it starts), and not at a
        quote (its count would start afresh)."""
        words = self._words
        return a == 0 or (HYPHEN not in (words[a - 1], words[a]) and not OPEN_QUOTE.match(
            self.tokenizer.unescape(words[a])))

    def _whole(self) -> str:
        """The text of every word so far (unsettled ones too), from the base on."""
        return self._final + self._detok_between(self._settled, len(self._words))

    def so_far(self) -> str:
        """The continuation as the tokens so far give it, settled or not (`continuation`'s text)."""
        return self._current()

    def _current(self) -> str:
        """The continuation as the words so far give it, for stop strings."""
        full = self._whole()
        return full[self._start if self._start is not None else _common_prefix(full, self.prompt_text):]

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string starts with."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _emit(self, upto: str) -> str:
        new = upto[len(self.text):] if len(upto) > len(self.text) else ""
        self.text += new
        return new


class Quotes:
    """Moses' quote counting (English), followed word by word: where every count is even, its
    detokenizer is in the state it starts in. Moses joins `@-@` chains before it counts: the word
    before a chain always joins it, the word after joins when the chain is odd, and a quote
    joined so is no quote. `fresh_through(words, k)` needs word k known and not `@-@` (settled
    words end so)."""

    def __init__(self, tokenizer: BioGptTokenizer) -> None:
        self.tokenizer, self.counts, self.seen = tokenizer, {}, 0

    def fresh_through(self, words: Sequence[str], k: int) -> list[int]:
        """Count the words up to `k`; the word counts among them after which the state is fresh."""
        fresh, start = [], self.seen
        self.seen = max(self.seen, k)
        even = not any(c % 2 for c in self.counts.values())
        if not QUOTISH.search(" ".join(words[start:k])):  # no quote among them: the state stays as it is
            return list(range(start + 1, k + 1)) if even else []
        for i in range(start, k):
            token = self.tokenizer.unescape(words[i]) if QUOTISH.search(words[i]) else ""
            if OPEN_QUOTE.match(token) and not self._joined(words, i):
                key = '"' if re.fullmatch("[„“”]+", token) else token
                count = self.counts.get(key, 0)
                possessive = token == "'" and i > 0 and words[i - 1].endswith("s") and count % 2 == 0
                self.counts[key] = count + (not possessive)
                even = not any(c % 2 for c in self.counts.values())
            if even:
                fresh.append(i + 1)
        return fresh

    @staticmethod
    def _joined(words: Sequence[str], i: int) -> bool:
        """Whether Moses' hyphen join makes word i part of a longer token."""
        if i + 1 < len(words) and words[i + 1] == HYPHEN:
            return True
        chain = 0
        while i - chain - 1 >= 0 and words[i - chain - 1] == HYPHEN:
            chain += 1
        return chain % 2 == 1
@dataclass
class Completion:
    """One finished sequence: continuation text, new token ids (without `</s>`) and why it ended."""

    prompt_index: int
    text: str
    ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop"
    # with the options' `logprobs` K: per new token, its log-probability and the K likeliest
    # (id, log-probability) at its step, from the step's own logits (greedy and sampled rows)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


@dataclass
class TextEvent:
    """Newly final text of sequence `row` (prompt `row // num_return_sequences`); `done` on its last event."""

    row: int
    text: str
    done: Completion | None = None
    confidence: float | None = None  # with `confidence=True`: the least probable token behind this text


def _through_stop(tokenizer: BioGptTokenizer, prompt: Sequence[int], ids: Sequence[int],
                  stop: Sequence[str]) -> list[int]:
    """The ids up to the token that completed a stop string, as greedy decoding keeps them."""
    n = next(n for n in range(1, len(ids) + 1) if continuation(tokenizer, prompt, ids[:n], stop)[1])
    return list(ids[:n])


def stream_completions(model: BioGptForCausalLM, tokenizer: BioGptTokenizer,
                       prompts: Iterable[Sequence[int] | None],
                       opts: GenerationOptions, stop: Sequence[str] = (),
                       generator: Generators = None, progress: Callable[[int], None] | None = None,
                       slots: int | None = None, confidence: bool = False, live: bool = True,
                       per_prompt: Callable[[int], tuple[GenerationOptions, Sequence[str]]] | None = None,
                       gone: Callable[[int], bool] | None = None,
                       first_token: Callable[[], None] | None = None,
                       constraint_of: Callable[[int], Constraint | None] | None = None,
                       drafts: DraftStats | None = None) -> Iterator[TextEvent]:
    """Generate for a batch of prompts, yielding text as it becomes final.

    Greedy and sampled sequences stream token by token and stop at a stop string. Beam search
    knows its winners only at the end: each yields its whole text once, cut at a stop string;
    `progress(step)` follows its steps until then. `slots`: continuous batching (`stream_tokens`).
    `confidence`: each event carries the lowest probability among the tokens behind its text.
    Without `live` (output nobody watches as it comes: files, pipes, records) a sequence yields
    only its finished event, its text decoded once; stop strings are still watched token by token.
    `per_prompt(j)`: prompt j's own options and stop strings (see `stream_tokens`). `gone(j)`: prompt
    j's reader went away; its rows end at the next step (reason "stop"). `first_token()` is
    called when the first token is chosen (for `-v`: text that nobody watches comes only at the end).
    `constraint_of(j)`: prompt j's automaton (constraints.py), or None. `drafts` counts what
    speculation did (`stream_tokens`).
    """
    k = opts.num_return_sequences
    if opts.num_beams > 1:
        prompts = list(prompts)

        def step(n: int) -> None:  # beams yield nothing until the end: a batch nobody reads any more stops
            if gone is not None and all(gone(i) for i in range(len(prompts))):
                raise _Unread
            if progress is not None:
                progress(n)
        try:
            winners = beam_search(model, prompts, opts, step, generator, constraint_of)
        except _Unread:
            winners = [[GeneratedSequence(i, [], "stop")] * k for i in range(len(prompts))]
        for i, seqs in enumerate(winners):
            if first_token is not None:  # the winners are known only now
                first_token()
                first_token = None
            for j, seq in enumerate(seqs):
                text, stopped = continuation(tokenizer, prompts[i], seq.ids, stop, opts.include_stop)
                ids = _through_stop(tokenizer, prompts[i], seq.ids, stop) if stopped else seq.ids
                reason = "stop" if stopped else seq.finish_reason
                yield TextEvent(i * k + j, text, Completion(i, text, ids, reason))
        return
    seen: dict[int, Sequence[int]] = {}  # prompts with a row still running
    left: dict[int, int] = {}  # their rows still running
    streams: dict[int, TextStream] = {}
    probs: dict[int, list[float]] = {}
    entries: dict[int, list[tuple[float, list[tuple[int, float]]]]] = {}
    options = (lambda j: per_prompt(j)[0]) if per_prompt else lambda j: opts

    def observe(seq: int, token: int, logits: torch.Tensor) -> None:
        top = options(seq // k).logprobs
        if not confidence and top is None:
            return
        logp = F.log_softmax(logits.float(), -1)
        chosen = logp[token].item()
        if confidence:
            probs.setdefault(seq, []).append(math.exp(chosen))
        if top is not None:
            best = torch.topk(logp, top)
            pairs = list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
            entries.setdefault(seq, []).append((chosen, pairs))

    def least(row: int, text: str) -> float | None:
        if not confidence or not text:
            return None
        pending = probs.pop(row, [])
        return min(pending) if pending else None

    def feed() -> Iterator[Sequence[int] | None]:
        j = 0
        for p in prompts:  # None: a live source has no prompt now (see stream_tokens)
            if p is not None:
                seen[j], left[j], j = p, k, j + 1
            yield p

    def text_stream(row: int) -> TextStream:
        return TextStream(tokenizer, seen[row // k], per_prompt(row // k)[1] if per_prompt else stop,
                          options(row // k).include_stop)

    for row, token, reason in stream_tokens(model, feed(), opts, generator,
                                            should_stop=lambda r, _: streams[r].stopped or bool(gone and gone(r // k)),
                                            slots=slots,
                                            observe=observe if confidence or per_prompt or opts.logprobs is not None
                                            else None, per_prompt=options if per_prompt else None,
                                            constraint_of=constraint_of, stats=drafts):
        s = streams.get(row) or streams.setdefault(row, text_stream(row))
        if first_token is not None:
            first_token()
            first_token = None
        if reason is None and not live and not s.stop:
            s.extend(token)
        elif reason is None:
            text = s.add(token)
            if live:
                yield TextEvent(row, text, confidence=least(row, text))
        else:
            if token is not None and reason == "stop" and options(row // k).include_stop:
                s.extend(token)  # a stop token, kept
            text = s.finish()
            logprobs = entries.pop(row, [])[:len(s.ids)] if options(row // k).logprobs is not None else None
            yield TextEvent(row, text, Completion(row // k, s.text, s.ids, "stop" if s.stopped else reason, logprobs),
                            least(row, text))
            del streams[row]
            probs.pop(row, None)
            left[row // k] -= 1
            if not left[row // k]:
                del seen[row // k], left[row // k]
