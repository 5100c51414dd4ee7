"""Decoding: greedy, sampling and beam search over a cached forward pass.

Strategies are small functions of `[rows, vocab]` scores, after the logits processors
(`processors.py`) composed in the reference's order, so the same weights and settings give the
reference `generate()`'s tokens. The token history's left padding is the sentinel `vocab_size`
(never a real token), which keeps a padded batch equal to each prompt decoded alone.

Generation yields token ids only; turning them into text is `streaming.py`'s job.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from .constraints import Constraint, RowStates, constrain
from .errors import InputError, PromptTooLong
from .graphs import graphs_enabled, release, resized, static_rows
from .model import BioGptForCausalLM
from .processors import (
    Processor,
    apply_all,
    bad_words,
    frequency_presence,
    logit_bias,
    min_new_tokens,
    min_p,
    no_repeat_ngram,
    repetition_penalty,
    temperature,
    top_k,
    top_p,
)


@dataclass
class GenerationOptions:
    """Decoding settings; the defaults are the reference's (top_k 50 applies only when sampling)."""

    max_new_tokens: int = 50
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] = field(default_factory=list)
    logprobs: int | None = None  # keep each new token's log-probability and the K likeliest at its step
    # OpenAI's and vLLM's: penalties over the new tokens, a bias per token id, tokens that end a
    # sequence as `</s>` does (its text kept with `include_stop`, as the stop strings' then)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop: bool = False

    @property
    def rows_per_prompt(self) -> int:
        """Rows each prompt decodes: its beams, else its sequences."""
        return self.num_beams if self.num_beams > 1 else self.num_return_sequences

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise `InputError` for settings that make no sense, before any work is done; with the
        model's `vocab_size`, also for token ids it lacks (on a GPU an id out of range is a
        device-side assert that ends the process's CUDA context, mid-batch)."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InputError(message)

        need(self.max_new_tokens >= 1, "max_new_tokens must be at least 1")
        need(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be between 0 and max_new_tokens")
        need(self.num_beams >= 1, "num_beams must be at least 1")
        need(self.num_return_sequences >= 1, "num_return_sequences must be at least 1")
        need(self.temperature > 0, "temperature must be greater than 0")
        need(self.top_k >= 0, "top_k must be 0 (off) or more")
        need(0 <= self.top_p <= 1, "top_p must be in [0, 1]")
        need(self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]")
        need(self.repetition_penalty > 0, "repetition_penalty must be greater than 0")
        need(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be 0 (off) or more")
        need(self.early_stopping in (True, False, "never"), "early_stopping must be true, false or 'never'")
        need(self.logprobs is None or self.logprobs >= 0, "logprobs must be 0 or more")
        need(all(ids for ids in self.bad_words_ids), "bad_words_ids: every banned sequence needs a token")
        need(-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2,
             "frequency_penalty and presence_penalty must be in [-2, 2]")
        need(all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias: biases must be in [-100, 100]")
        need(self.num_beams == 1 or not self.stop_token_ids, "stop_token_ids: not with beam search")
        if vocab_size is not None:
            need(all(0 <= i < vocab_size for i in self.logit_bias),
                 f"logit_bias: token ids must be in 0..{vocab_size - 1}")
            need(all(0 <= i < vocab_size for i in self.stop_token_ids),
                 f"stop_token_ids: token ids must be in 0..{vocab_size - 1}")
            need(self.logprobs is None or self.logprobs <= vocab_size,
                 f"logprobs must be at most the vocabulary's {vocab_size} tokens")
            need(all(0 <= i < vocab_size for ids in self.bad_words_ids for i in ids),
                 f"bad_words_ids: token ids must be in 0..{vocab_size - 1}")
        if self.num_beams == 1:
            need(self.do_sample or self.num_return_sequences == 1,
                 "num_return_sequences > 1 needs sampling or num_beams > 1")
        else:
            need(self.num_return_sequences <= self.num_beams,
                 f"num_return_sequences ({self.num_return_sequences}) cannot exceed num_beams ({self.num_beams})")


@dataclass
class GeneratedSequence:
    prompt_index: int
    ids: list[int]  # new tokens, without the final </s>
    finish_reason: str  # "eos" | "length" | "stop"


def make_processors(opts: GenerationOptions, eos: int, prompt_width: int | torch.Tensor,
                    allowed: torch.Tensor | None = None) -> list[Processor]:
    """The reference's order: penalties and bans (after OpenAI's bias and penalties, which the
    reference lacks), then (sampling only) the warpers. The rows' constraints (`allowed`,
    constraints.py) come between: the warpers then keep the likeliest of the tokens a constraint
    allows, never a set it allows none of."""
    procs: list[Processor] = []
    if opts.logit_bias:
        procs.append(logit_bias(opts.logit_bias))
    if opts.frequency_penalty or opts.presence_penalty:
        procs.append(frequency_presence(opts.frequency_penalty, opts.presence_penalty, prompt_width))
    if opts.repetition_penalty != 1.0:
        procs.append(repetition_penalty(opts.repetition_penalty))
    if opts.no_repeat_ngram_size > 0:
        procs.append(no_repeat_ngram(opts.no_repeat_ngram_size))
    if opts.bad_words_ids:
        procs.append(bad_words(opts.bad_words_ids))
    if opts.min_new_tokens > 0:
        procs.append(min_new_tokens(opts.min_new_tokens, eos, prompt_width))
    if allowed is not None:
        procs.append(lambda history, scores: constrain(scores, allowed, eos))
    if opts.do_sample:
        keep = 2 if opts.num_beams > 1 else 1  # beam sampling keeps a token besides </s> to explore, as the reference
        if opts.temperature != 1.0:
            procs.append(temperature(opts.temperature))
        if opts.top_k:
            procs.append(top_k(opts.top_k, keep))
        if opts.top_p < 1.0:
            procs.append(top_p(opts.top_p, keep))
        if opts.min_p is not None:
            procs.append(min_p(opts.min_p, keep))
    return procs


# -- the decoding loop -------------------------------------------------------------------------
def fit_prompt(ids: list[int], max_new_tokens: int, max_positions: int, truncate: bool = False) -> list[int]:
    """`ids` if they leave room for `max_new_tokens` in the position table; with `truncate`, the
    leading `</s>` and the prompt's last tokens (the ones nearest to what comes next)."""
    room = max_positions - max_new_tokens
    if len(ids) <= room:
        return ids
    if not truncate or room < 2:
        raise PromptTooLong(len(ids), max_new_tokens, max_positions)
    return ids[:1] + ids[len(ids) - room + 1:]


MAX_FORCED = 16  # a grammar's fixed words fed in one pass at most (a longer run takes several)
MAX_GUESS = 8  # tokens of a row's own text guessed at once (Guesses)


class _Batch:
    """Left-padded prompts, their history buffer and the cached forward pass.

    The history's columns are shared by all rows; a row's real tokens run from `first[row]` to
    `length`, and its new ones from `starts[row]`. Under continuous batching a new prompt is
    right-aligned at the current length, and the columns before every live row's first are
    dropped (`_reframe`) so that attention reads only what some row still needs. On a GPU the keys
    and values are not in that frame: each row has its own positions in a static cache (`rows`,
    graphs.py), so only the token history moves.
    """

    def __init__(self, model: BioGptForCausalLM, prompts: Sequence[Sequence[int]], max_new: int, repeats: int,
                 columns: int = 0, room: int = 0):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token")
        cfg = model.config
        self.model, self.width, self.vocab = model, max(map(len, prompts)), cfg.vocab_size
        self.inputs_only = cfg.vocab_size - cfg.learned_prompt  # the first learned prompt token: never generated
        fit_prompt([0] * self.width, max_new, cfg.max_position_embeddings)  # raises when it does not fit
        device = next(model.parameters()).device
        b, total = len(prompts), max(columns, self.width + max_new)  # the cache grows only as decoding needs
        self.history = torch.full((b, total), self.vocab, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.history[i, self.width - len(p):self.width] = torch.tensor(p)
        padded = any(len(p) < self.width for p in prompts)
        self.mask = (self.history != self.vocab).long() if padded else None
        if self.mask is not None:
            self.mask[:, self.width:] = 1
        ids = self.history[:, :self.width].clamp(max=self.vocab - 1)  # pad slots: any id, masked out
        # on a GPU: each row at its own position in a static cache, every step one captured graph;
        # its rows are those in use (rounded up), and grow as prompts join (`add_rows`)
        static = repeats == 1 and graphs_enabled(device)
        self.rows = static_rows(model, b, self.width + max_new) if static else None
        if self.rows is not None:
            self.cache, self.logits = None, self._offered(self.rows.prefill(range(b), prompts))
        else:
            self.cache = model.new_cache(b, self.width + max_new, room)
            with torch.no_grad():
                out = model(ids, self._mask(self.width), past_key_values=self.cache, logits_to_keep=1)
            self.logits = self._offered(out.logits[:, -1].float())
        if repeats > 1:  # beams/samples of one prompt share its prefill
            index = torch.arange(b, device=device).repeat_interleave(repeats)
            self.history, self.logits = self.history[index], self.logits[index]
            self.mask = self.mask[index] if self.mask is not None else None
            self.cache.expand(repeats)
        self.length = self.width
        self.first = [self.width - len(p) for p in prompts for _ in range(repeats)]
        self.starts = torch.full((len(self.first),), self.width, device=device)  # processors read it

    def _mask(self, length: int) -> torch.Tensor | None:
        return self.mask[:, :length] if self.mask is not None else None

    def _offered(self, scores: torch.Tensor) -> torch.Tensor:
        """Next-token scores without the model's learned prompt tokens: they are inputs only."""
        if self.inputs_only < self.vocab:
            scores[:, self.inputs_only:] = float("-inf")
        return scores

    def window(self, alive: Sequence[bool]) -> int:
        """The first column a live row still reads (the current length when none is live)."""
        return min((f for f, live in zip(self.first, alive, strict=True) if live), default=self.length)

    def fits(self, prompts: Sequence[Sequence[int]], keep: int, max_new: int) -> bool:
        """Whether `prompts` can take rows now together, keeping the columns from `keep` on: the
        window the longest needs, plus `max_new` tokens, within the model's positions. The rows all
        move on in one frame, so `max_new` counts the tokens every live row still has to go too: a
        long prompt that widened the frame would otherwise push them past the last position."""
        longest = max(map(len, prompts))  # a static cache widens for it (`admit`): each row starts at 0
        return max(self.length - keep, longest) + max_new <= self.model.config.max_position_embeddings

    def close(self) -> None:
        """The batch is over: its static decoder goes back to the model's idle ones."""
        if self.rows is not None:
            release(self.model, self.rows)
            self.rows = None

    def add_rows(self, n: int) -> range:
        """`n` new rows, empty and masked, for prompts that arrive while the batch runs (a static
        decoder grows to the next bucket of rows when they are not there yet)."""
        if self.cache is not None:
            self.cache.add_rows(n)
        elif len(self.first) + n > self.rows.rows:
            self.rows = resized(self.model, self.rows, len(self.first) + n, self.rows.cache.capacity)
        self.history = torch.cat([self.history, self.history.new_full((n, self.history.shape[1]), self.vocab)])
        self.mask = torch.cat([torch.ones_like(self.history[:-n]) if self.mask is None else self.mask,
                               torch.zeros_like(self.history[-n:])])
        self.first += [self.length] * n
        self.starts = torch.cat([self.starts, self.starts[:1].expand(n)])
        return range(len(self.first) - n, len(self.first))

    def admit(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], keep: int, max_new: int,
              to_go: int = 0) -> torch.Tensor:
        """Continuous batching: new prompts take the places of finished (or new) `rows`, each
        right-aligned at the current length (its padding masked, so its positions start at 0 as
        when alone). They are prefilled together, apart from the running rows, as a batch of them
        alone would be. Returns their next-token logits.

        The window is moved first when the longest prompt is longer than it, when the columns
        before `keep` (which no live row reads) are at least half of it, or when the new tokens
        would not fit, for them or for the tokens the live rows still have `to_go`."""
        n = max(map(len, prompts))
        start = min(keep, self.length - n)
        too_long = self.length + max(max_new, to_go) > self.model.config.max_position_embeddings
        if start < 0 or (start > 0 and (2 * start >= self.length or too_long)):
            self._reframe(start)
        end = self.length
        if self.rows is not None and n + max_new > self.rows.cache.capacity:  # its rows start at 0
            self.rows = resized(self.model, self.rows, self.rows.rows, n + max_new)
        logits = self.rows.prefill(rows, prompts) if self.rows is not None else self._prefill(rows, prompts, end)
        logits = self._offered(logits)
        if self.mask is None:
            self.mask = torch.ones_like(self.history)
        for row, p in zip(rows, prompts, strict=True):
            m = len(p)
            self.history[row] = self.vocab
            self.history[row, end - m:end] = torch.tensor(p, device=self.history.device)
            self.mask[row] = 0
            self.mask[row, end - m:] = 1
            self.first[row], self.starts[row] = end - m, end
        return logits

    def _prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], end: int) -> torch.Tensor:
        """The prompts' forward pass together (left-padded, masked), their keys and values copied
        into `rows` so that each ends at column `end`; their next-token logits."""
        n, device = max(map(len, prompts)), self.history.device
        ids = torch.tensor([[p[0]] * (n - len(p)) + list(p) for p in prompts], device=device)  # padding: masked
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=device)
        own = self.model.new_cache(len(prompts), n)
        with torch.no_grad():
            logits = self.model(ids, mask if len(set(map(len, prompts))) > 1 else None, past_key_values=own,
                                logits_to_keep=1).logits[:, -1].float()
        for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
            m = len(p)
            self.cache.k[:, row, :, end - m:end] = own.k[:, i, :, n - m:]
            self.cache.v[:, row, :, end - m:end] = own.v[:, i, :, n - m:]
        return logits

    def _reframe(self, start: int) -> None:
        """Column `start` becomes column 0 (negative: that many padding columns open in front), in
        the cache, the history, the mask and every row's bookkeeping."""
        lo, n = max(start, 0), self.length - start
        if self.cache is not None:  # a static cache has no shared columns: its rows start at 0
            self.cache.reserve(max(-start, 0), self.model.config.max_position_embeddings)
            self.cache.shift(start)
        if self.mask is None:
            self.mask = torch.ones_like(self.history)
        for buf, front, back in ((self.history, self.vocab, self.vocab), (self.mask, 0, 1)):
            buf[:, lo - start:n] = buf[:, lo:self.length].clone()
            buf[:, :lo - start] = front
            buf[:, n:] = back
        self.length = n
        self.first = [f - start for f in self.first]
        self.starts -= start

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` [rows, K] in one forward pass (eager rows only); the scores after each
        of them [rows, K, vocab] in float32."""
        k = tokens.shape[1]
        self.history[:, self.length:self.length + k] = tokens
        self.length += k
        with torch.no_grad():
            out = self.model(tokens, self._mask(self.length), past_key_values=self.cache, logits_to_keep=k)
        scores = out.logits.float()
        if self.inputs_only < self.vocab:
            scores[:, :, self.inputs_only:] = float("-inf")
        return scores

    def truncate(self, length: int) -> None:
        """Forget the columns from `length` on (a guess's tokens the row did not take)."""
        self.length = self.cache.length = length

    def step(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token per row (`live`: the rows still decoding; None: all); return
        next-token scores [rows, vocab] in float32."""
        self.history[:, self.length] = tokens
        self.length += 1
        if self.rows is not None:
            return self._offered(self.rows.step(tokens, torch.ones_like(tokens) if live is None else live.long()))
        with torch.no_grad():
            out = self.model(tokens[:, None], self._mask(self.length), past_key_values=self.cache, logits_to_keep=1)
        return self._offered(out.logits[:, -1].float())


StopCheck = Callable[[int, list[int]], bool]
# One generator for the batch (the reference's way), or one per prompt (a list, or a function of the
# prompt's index): then each prompt's samples depend on its own stream only, never on its neighbours.
Generators = torch.Generator | Sequence[torch.Generator] | Callable[[int], torch.Generator] | None


def prompt_generator(seed: int, key: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A prompt's own random stream, from the run's seed and the prompt's key (its id or line)."""
    digest = hashlib.sha256(f"{seed}:{key!r}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _draw(probs: torch.Tensor, k: int, generator: torch.Generator | list[torch.Generator] | None,
          alive: Sequence[bool] | None = None) -> torch.Tensor:
    """`k` distinct tokens per row ([rows, k]), drawn from one stream or from each row's own (a
    list) as `torch.multinomial` draws them (the largest p / q, q ~ Exp(1)): the same tokens from
    the same stream, without its two host syncs per call. A row that is not `alive` draws nothing,
    so a prompt's stream is the same in any batch."""
    if isinstance(generator, list):
        q = torch.ones_like(probs)
        for r, g in enumerate(generator):
            if alive is None or alive[r]:
                q[r:r + 1].exponential_(1, generator=g)
    else:
        q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).topk(k).indices if k > 1 else (probs / q).argmax(-1, keepdim=True)


_END, _NOW = object(), object()  # what a look at the next prompt finds besides one: the end, or none yet


class _Queue:
    """Numbered prompts, with a look at the next one before taking it. A live source (a server)
    yields None when no prompt is there now: the batch goes on, and asks again at its next step."""

    def __init__(self, prompts: Iterable[Sequence[int] | None]) -> None:
        self.items, self.count, self.next = iter(prompts), 0, None  # next: None until looked at

    def peek(self) -> Any:
        """The next prompt as (index, ids), or `_NOW` (none yet), or `_END`."""
        if self.next is None:
            item = next(self.items, _END)
            self.next = _NOW if item is None else item if item is _END else (self.count, item)
        return self.next

    def take_if(self, fits: Callable[[int, Sequence[int]], bool]) -> tuple[int, Sequence[int]] | None:
        item = self.peek()
        if item is _NOW:
            self.next = None  # ask the source again next time
        if item is _NOW or item is _END or not fits(*item):
            return None
        self.next, self.count = None, self.count + 1
        return item

    def ready(self, n: int) -> list[tuple[int, Sequence[int]]]:
        """Up to `n` prompts, as many as are there now."""
        taken: list[tuple[int, Sequence[int]]] = []
        while len(taken) < n and (item := self.take_if(lambda j, p: True)) is not None:
            taken.append(item)
        return taken


def stream_tokens(model: BioGptForCausalLM, prompts: Iterable[Sequence[int] | None], opts: GenerationOptions,
                  generator: Generators = None, should_stop: StopCheck | None = None,
                  slots: int | None = None, observe: Callable[[int, int, torch.Tensor], None] | None = None,
                  per_prompt: Callable[[int], GenerationOptions] | None = None,
                  constraint_of: Callable[[int], Constraint | None] | None = None,
                  ) -> Iterator[tuple[int, int | None, str | None]]:
    """Greedy or sampled decoding. Yields `(sequence, token, finish_reason)` as tokens are chosen:
    a token with reason None is a new token; a final event per sequence carries the reason ("eos"
    with the </s> token, "length", or "stop" when `should_stop(sequence, new_ids)` said so).
    With `num_return_sequences` k, sequence s belongs to prompt s // k.

    With `slots`, prompts are decoded `slots` at a time (each with its k rows), and for k = 1 with
    continuous batching: when a sequence ends, the next prompt takes its row, so rows do not idle
    while the longest of a batch finishes; every prompt's tokens equal those it gets alone. A live
    source (`prompts` yielding None when it has none now) has its prompts join the running batch
    at the next step, in new rows up to `slots`; the call returns once no row runs and no prompt
    is there.
    `generator` is then a function of the prompt's index, giving the stream its k rows share.
    `per_prompt(j)`: prompt j's own options instead of `opts` (its length, penalties, bans,
    greedy or sampled and how), so that rows of different settings share the batch and its steps;
    each keeps `opts`' k. `observe(sequence, token, logits)` hears each chosen token with its row's
    raw logits at that step (before any processor), to be read at once. `constraint_of(j)`: prompt
    j's automaton (constraints.py), or None; each of its rows keeps its own state."""
    opts.validate(model.config.vocab_size)
    constraint_of = constraint_of or (lambda j: None)
    if opts.num_beams != 1:
        raise InputError("stream_tokens does greedy or sampled decoding; use beam_search for beams")
    eos, k = model.config.eos_token_id, opts.num_return_sequences
    own_opts = _checked(per_prompt, k, model.config.vocab_size) if per_prompt is not None else lambda j: opts
    if slots is None:
        prompts = list(prompts)
        slots = len(prompts)
    queue = _Queue(prompts)
    per_row = generator is not None and not isinstance(generator, torch.Generator)  # each prompt its own stream
    stream_of = (generator if callable(generator) else generator.__getitem__) if per_row else None
    while first := queue.ready(slots):
        # rows are refilled (k = 1) when the batch starts full, or grows up to `slots` when its
        # source is live (more prompts may come while it runs)
        grows = k == 1 and len(first) < slots and queue.peek() is not _END
        refill = k == 1 and (len(first) == slots or grows)
        columns = model.config.max_position_embeddings if refill else 0
        row_opts = [own_opts(j) for j, _ in first for _ in range(k)]
        batch = _Batch(model, [p for _, p in first], max(o.max_new_tokens for o in row_opts), k, columns,
                       slots if grows else 0)
        try:
            seq_of = [j * k + r for j, _ in first for r in range(k)]  # row -> sequence index
            own = {j: stream_of(j) for j, _ in first} if per_row else {}  # a prompt's k rows share its stream
            draw = [own[s // k] for s in seq_of] if per_row else generator
            alive, new_ids, scores = [True] * len(seq_of), [[] for _ in seq_of], batch.logits
            held = RowStates([constraint_of(j) for j, _ in first for _ in range(k)])
            guesses = Guesses()
            shown: list[bool] = []  # `alive` as the device last saw it: it changes when a row ends or joins
            while True:
                tokens = _choose(scores, batch.history[:, :batch.length], batch.starts, row_opts, draw, alive, eos,
                                 held.mask(batch.vocab, scores.device))
                for r, tok in enumerate(tokens.tolist()):
                    if alive[r]:
                        held.advance(r, tok)
                        if observe is not None:
                            observe(seq_of[r], tok, scores[r])
                        alive[r] = yield from _advance(seq_of[r], tok, new_ids[r], eos, row_opts[r].max_new_tokens,
                                                       should_stop, row_opts[r].stop_token_ids)
                free = [r for r, live in enumerate(alive) if refill and not live]
                joining: list[tuple[int, int, Sequence[int]]] = []  # (row, prompt index, prompt)
                keep = batch.window(alive)
                to_go = max((o.max_new_tokens - len(ids) for o, ids, live in zip(row_opts, new_ids, alive, strict=True)
                             if live), default=0)  # what the live rows still need of the frame
                while free or (grows and len(alive) < slots):
                    group = [q for _, _, q in joining]  # a prompt joins if it fits beside those taken before it
                    most = max([to_go, *(row_opts[r].max_new_tokens for r, _, _ in joining)])
                    taken = queue.take_if(lambda j, p, b=batch, w=keep, g=group, m=most:
                                          b.fits([*g, p], w, max(m, own_opts(j).max_new_tokens)))
                    if taken is None:
                        break
                    if not free:  # a new row, for a prompt that arrived while the batch runs
                        free = list(batch.add_rows(1))
                        scores, tokens = torch.cat([scores, scores[:1]]), torch.cat([tokens, tokens[:1]])
                        alive.append(False)
                        new_ids.append([])
                        seq_of.append(-1)
                        row_opts.append(row_opts[0])
                        if per_row:
                            draw.append(None)
                    r = free.pop(0)
                    j, prompt = taken
                    row_opts[r], seq_of[r], new_ids[r] = own_opts(j), j, []
                    held.set(r, constraint_of(j))
                    if per_row:
                        draw[r] = stream_of(j)
                    joining.append((r, j, prompt))
                if joining:  # the prompts taken now are prefilled together, then each chooses its first token
                    rows = [r for r, _, _ in joining]
                    scores[rows] = batch.admit(rows, [p for _, _, p in joining], keep,
                                               max(row_opts[r].max_new_tokens for r in rows), to_go)
                allowed = held.mask(batch.vocab, scores.device) if joining else None
                for r, j, _ in joining:
                    one = slice(r, r + 1)
                    tok = int(_choose(scores[one], batch.history[one, :batch.length], batch.starts[one], row_opts[one],
                                      draw[one] if per_row else draw, [True], eos,
                                      allowed[one] if allowed is not None else None)[0])
                    held.advance(r, tok)
                    if observe is not None:
                        observe(j, tok, scores[r])
                    alive[r] = yield from _advance(j, tok, new_ids[r], eos, row_opts[r].max_new_tokens, should_stop,
                                                   row_opts[r].stop_token_ids)
                    tokens[r] = tok
                if not any(alive):
                    break
                if alive != shown:
                    shown, finished = list(alive), torch.tensor([not a for a in alive], device=tokens.device)
                pad = model.config.pad_token_id  # finished rows are fed <pad>, as the reference feeds them
                if joining or batch.rows is not None:  # the captured step feeds one token a row
                    scores = batch.step(tokens.masked_fill(finished, pad), ~finished)
                    continue
                scores = yield from _fed(batch, tokens.masked_fill(finished, pad), finished, pad, held, alive,
                                         new_ids, row_opts, seq_of, eos, observe, should_stop, draw, guesses)
                if not any(alive):
                    break
        finally:
            batch.close()


def _fed(batch: _Batch, tokens: torch.Tensor, finished: torch.Tensor, pad: int, held: RowStates, alive: list[bool],
        new_ids: list[list[int]], row_opts: Sequence[GenerationOptions], seq_of: Sequence[int], eos: int,
        observe: Callable[[int, int, torch.Tensor], None] | None, should_stop: StopCheck | None, draw: Any,
        guesses: Guesses) -> Generator[tuple[int, int | None, str | None], None, torch.Tensor]:
    """Feed this step's tokens (finished rows': <pad>) and return the next scores. Where every live
    row's grammar forces its next tokens, they go in the same pass (`_forced`); where one greedy row
    decodes alone, a guess from its own text goes with it and the longest prefix of it that the row
    would have chosen is kept (`Guesses`). Either way the tokens are those of one token a pass."""
    ahead = _forced(held, alive, new_ids, row_opts, eos)
    guess = [] if ahead else guesses.guess(batch, held, alive, new_ids, row_opts, eos)
    if not ahead and not guess:
        return batch.step(tokens, ~finished)
    start, extra = batch.length, torch.tensor(ahead or [guess], device=tokens.device)
    scores_at = batch.extend(torch.cat([tokens[:, None], extra.masked_fill(finished[:, None], pad)], 1))
    for j in range(extra.shape[1]):
        if guess:  # the row's own choice after what it has taken: the draft's token, or the guess ends
            mine = _choose(scores_at[:, j], batch.history[:, :start + 1 + j], batch.starts, row_opts, draw, alive,
                           eos, held.mask(batch.vocab, scores_at.device))
            if int(mine[0]) != guess[j]:
                batch.truncate(start + 1 + j)
                guesses.taken(j)
                return scores_at[:, j]
        for r, tok in enumerate(extra[:, j].tolist()):
            if alive[r]:
                held.advance(r, tok)
                if observe is not None:
                    observe(seq_of[r], tok, scores_at[r, j])
                alive[r] = yield from _advance(seq_of[r], tok, new_ids[r], eos, row_opts[r].max_new_tokens,
                                               should_stop, row_opts[r].stop_token_ids)
        if not any(alive):
            break
    if guess:
        guesses.taken(len(guess))
    return scores_at[:, -1]


class Guesses:
    """Prompt lookup for a greedy row decoding alone: the tokens that followed the first place its
    text (prompt and output) ended as it ends now (its last 3, 2 or 1 tokens), at most `MAX_GUESS`,
    cut where its grammar would not take them. A guess no token of which was kept makes the row
    guess again only after 2, 4, 8, ... steps (at most 64): a pass of several tokens costs more
    than one (docs/performance.md), and a row whose text does not repeat itself pays nothing for long."""

    def __init__(self) -> None:
        self.misses, self.wait = 0, 0

    def guess(self, batch: _Batch, held: RowStates, alive: Sequence[bool], new_ids: Sequence[list[int]],
              row_opts: Sequence[GenerationOptions], eos: int) -> list[int]:
        o = row_opts[0]
        room = min(MAX_GUESS, o.max_new_tokens - len(new_ids[0]) - 1)
        if len(alive) != 1 or not alive[0] or o.do_sample or room < 1 or MAX_GUESS == 0:
            return []
        if self.wait:
            self.wait -= 1
            return []
        text = batch.history[0, batch.first[0]:batch.length].tolist()
        found = next((text[i + n:i + n + room] for n in (3, 2, 1) if len(text) > n
                      for i in range(len(text) - n) if text[i:i + n] == text[-n:]), [])
        c, state, kept = held.constraints[0], held.states[0], []
        for t in found:
            if t == eos or (c is not None and (allowed := c.allowed(state)) is not None and t not in allowed):
                break
            kept.append(t)
            state = c.advance(state, t) if c is not None else state
        return kept

    def taken(self, n: int) -> None:
        self.misses = 0 if n else self.misses + 1
        self.wait = min(1 << self.misses, 64) if self.misses else 0


def _forced(held: RowStates, alive: Sequence[bool], new_ids: Sequence[list[int]],
            row_opts: Sequence[GenerationOptions], eos: int) -> list[list[int]]:
    """The tokens every live row's grammar forces next (as many for each: the fewest), which greedy
    decoding would choose whatever the logits say; [] when a row has none, samples, or could have
    one banned (an n-gram ban, a bad word ending with it). Finished rows get `eos` as filler."""
    most, runs = MAX_FORCED, {}
    for r, live in enumerate(alive):
        if not live:
            continue
        o = row_opts[r]
        if o.do_sample or o.no_repeat_ngram_size:
            return []
        banned = {b[-1] for b in o.bad_words_ids}
        run = held.forced(r, min(most, o.max_new_tokens - len(new_ids[r])), eos)
        run = run[:next((i for i, t in enumerate(run) if t in banned), len(run))]
        if not run:
            return []
        most, runs[r] = min(most, len(run)), run
    return [runs[r][:most] if r in runs else [eos] * most for r in range(len(alive))]


def _checked(per_prompt: Callable[[int], GenerationOptions], k: int,
             vocab_size: int) -> Callable[[int], GenerationOptions]:
    """`per_prompt`, each prompt's options validated once: greedy or sampled, with the run's k."""
    def get(j: int) -> GenerationOptions:
        o = per_prompt(j)
        if o.num_beams != 1 or o.num_return_sequences != k:
            raise InputError(f"prompt {j}: rows sharing a batch decode greedily or by sampling, {k} per prompt")
        o.validate(vocab_size)
        return o
    return get


def _choose(scores: torch.Tensor, history: torch.Tensor, starts: torch.Tensor, row_opts: Sequence[GenerationOptions],
            draw: Any, alive: list[bool], eos: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row, under its own options and within what its constraint
    `allowed`: rows whose options process and choose alike are handled together (all at once when
    they share them), each as it would be alone."""
    groups: dict[tuple, list[int]] = {}
    for r, o in enumerate(row_opts):
        groups.setdefault(_choosing(o), []).append(r)
    if len(groups) == 1:
        return _pick(row_opts[0], scores, history, starts, draw, alive, eos, allowed)
    tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    for rows in groups.values():
        index = torch.tensor(rows, device=scores.device)
        mine = [draw[r] for r in rows] if isinstance(draw, list) else draw
        tokens[index] = _pick(row_opts[rows[0]], scores[index], history[index], starts[index], mine,
                              [alive[r] for r in rows], eos, allowed[index] if allowed is not None else None)
    return tokens


def _choosing(o: GenerationOptions) -> tuple:
    """What of a row's options its processors and its choice read (not its length, stops, seed or
    logprobs): requests that differ only there share one pass over their rows."""
    return (o.do_sample, o.temperature, o.top_k, o.top_p, o.min_p, o.repetition_penalty, o.no_repeat_ngram_size,
            o.min_new_tokens, tuple(map(tuple, o.bad_words_ids)), o.frequency_penalty, o.presence_penalty,
            tuple(sorted(o.logit_bias.items())))


def _pick(o: GenerationOptions, scores: torch.Tensor, history: torch.Tensor, starts: torch.Tensor, draw: Any,
          alive: list[bool], eos: int, allowed: torch.Tensor | None) -> torch.Tensor:
    scores = apply_all(make_processors(o, eos, starts, allowed), history, scores)
    return _draw(scores.softmax(-1), 1, draw, alive)[:, 0] if o.do_sample else scores.argmax(-1)


def _advance(seq: int, tok: int, new_ids: list[int], eos: int, max_new: int, should_stop: StopCheck | None,
             stops: Sequence[int] = ()) -> Generator[tuple[int, int | None, str | None], None, bool]:
    """One chosen token of a sequence: yields its events, returns whether it goes on. The token's
    event is consumed before `should_stop` is asked (a caller's text stream decides it). `</s>`
    and the `stops` tokens end it with their token (reason "eos", "stop")."""
    if tok == eos or tok in stops:
        yield seq, tok, "eos" if tok == eos else "stop"
        return False
    new_ids.append(tok)
    yield seq, tok, None
    if should_stop is not None and should_stop(seq, new_ids):
        yield seq, None, "stop"
        return False
    if len(new_ids) == max_new:
        yield seq, None, "length"
        return False
    return True


def beam_search(model: BioGptForCausalLM, prompts: Sequence[Sequence[int]], opts: GenerationOptions,
                progress: Callable[[int], None] | None = None, generator: Generators = None,
                constraint_of: Callable[[int], Constraint | None] | None = None) -> list[list[GeneratedSequence]]:
    """The reference's vectorised beam search: 2*beams candidates per step, finished hypotheses
    scored as sum(log p) / new_length ** length_penalty, the same early-stopping heuristic.
    With `do_sample` the candidates are drawn (without replacement, from the warped scores) instead
    of taken best first, as the reference's beam sampling does: from `generator` (one stream for
    the batch, as the reference draws from torch's), or from each prompt's own (a list, or a
    function of the prompt's index), which makes a prompt's result the same in any batch.
    `progress(step)` is called after each step (the winners are known only at the end).
    `constraint_of(i)`: prompt i's automaton, or None; each beam carries its own state."""
    opts.validate(model.config.vocab_size)
    eos, nb, max_new = model.config.eos_token_id, opts.num_beams, opts.max_new_tokens
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = [generator(i) if callable(generator) else generator[i] for i in range(len(prompts))]
    batch = _Batch(model, prompts, max_new, nb)
    held = RowStates([constraint_of(i) if constraint_of else None for i in range(len(prompts)) for _ in range(nb)])
    b, v, width, total = len(prompts), batch.vocab, batch.width, batch.width + max_new
    keep = 2 * nb
    dev = batch.history.device
    # the running beams' tokens, and the beam each continued, per step: a hypothesis is read back
    # through them at the end, so no step copies whole histories
    toks = torch.zeros(b, nb, max_new, dtype=torch.long, device=dev)
    back = torch.zeros_like(toks)
    reads = (opts.repetition_penalty != 1.0 or opts.no_repeat_ngram_size > 0 or bool(opts.bad_words_ids)
             or bool(opts.frequency_penalty or opts.presence_penalty))
    seqs = batch.history.view(b, nb, total).clone() if reads else None  # for processors that read tokens
    run_scores = torch.zeros(b, nb, device=dev)
    run_scores[:, 1:] = -1e9
    fin_scores = torch.full((b, nb), -1e9, device=dev)
    fin_len, fin_parent, fin_token = (torch.zeros(b, nb, dtype=torch.long, device=dev) for _ in range(3))
    finished = torch.zeros(b, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    top_mask = torch.arange(keep, device=dev) < nb
    offsets = (torch.arange(b, device=dev) * nb)[:, None]
    slots = list(range(b * nb))  # slots[r]: the cache row (and batch row) that holds beam row r
    scores = batch.logits
    cur = width
    while True:
        step = cur - width
        history = seqs.view(b * nb, total)[:, :cur] if reads else toks.new_zeros(1, 1).expand(b * nb, cur)
        procs = make_processors(opts, eos, batch.width, held.mask(batch.vocab, dev))
        logp = apply_all(procs, history, F.log_softmax(scores, -1))
        logp = (logp.view(b, nb, v) + run_scores[:, :, None]).view(b, nb * v)
        if opts.do_sample:
            top_idx = _draw(logp.softmax(-1), keep, generator)
            top_lp, order = logp.gather(1, top_idx).sort(-1, descending=True)
            top_idx = top_idx.gather(1, order)
        else:
            top_lp, top_idx = torch.topk(logp, keep)
        beam_of, tokens = top_idx // v, top_idx % v
        hits = (tokens == eos) | (cur + 1 >= total)
        # the best `nb` unfinished candidates keep running
        run_lp = top_lp + hits.float() * -1e9
        nxt = torch.topk(run_lp, nb).indices
        chosen, run_scores = beam_of.gather(1, nxt), run_lp.gather(1, nxt)
        toks[:, :, step], back[:, :, step] = tokens.gather(1, nxt), chosen
        if reads:
            seqs = seqs.gather(1, chosen[:, :, None].expand(-1, -1, total))
            seqs[:, :, cur] = toks[:, :, step]
        parents = (chosen + offsets).view(-1)
        # finished candidates among the top `nb` compete with earlier ones for the `nb` slots
        fin_lp = top_lp / ((cur + 1 - width) ** opts.length_penalty)
        fin_lp = fin_lp + (finished.all(-1, keepdim=True) & (opts.early_stopping is True)).float() * -1e9
        fin_lp = fin_lp + (~improvable).float() * -1e9 + (~(hits & top_mask)).float() * -1e9
        merged = torch.topk(torch.cat((fin_scores, fin_lp), 1), nb).indices
        fin_scores = torch.cat((fin_scores, fin_lp), 1).gather(1, merged)
        fin_len = torch.cat((fin_len, torch.full((b, keep), step + 1, device=dev)), 1).gather(1, merged)
        fin_parent = torch.cat((fin_parent, beam_of), 1).gather(1, merged)
        fin_token = torch.cat((fin_token, tokens), 1).gather(1, merged)
        finished = torch.cat((finished, hits & top_mask), 1).gather(1, merged)
        cur += 1
        if progress is not None:
            progress(cur - width)
        never = opts.early_stopping == "never" and opts.length_penalty > 0
        best_len = total - width if never else cur - width  # the reference's optimistic bound
        best_running = run_scores[:, :1] / (best_len ** opts.length_penalty)
        worst_finished = torch.where(finished, fin_scores.min(1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        all_done = bool(finished.all()) and opts.early_stopping is True
        if not improvable.any() or all_done or bool(hits.all()):
            break
        if held:
            held.follow(parents.tolist(), toks[:, :, step].reshape(-1).tolist())
        slots = batch.cache.inherit(slots, parents.tolist(), start=width)
        where = torch.tensor(slots, device=dev)
        tokens = toks[:, :, step].reshape(-1)
        scores = batch.step(torch.empty_like(tokens).index_copy_(0, where, tokens))[where]
    return _read_back(toks.tolist(), back.tolist(), fin_len.tolist(), fin_parent.tolist(), fin_token.tolist(),
                      opts.num_return_sequences, eos)


def _read_back(toks: list, back: list, length: list, parent: list, token: list, k: int,
               eos: int) -> list[list[GeneratedSequence]]:
    """Each prompt's `k` best finished hypotheses, their tokens read back through the beams each
    step continued: hypothesis j ends with `token` after running beam `parent` of the step before."""
    results = []
    for i in range(len(length)):
        row = []
        for j in range(k):
            ids, beam = [token[i][j]] if length[i][j] else [], parent[i][j]
            for step in range(length[i][j] - 2, -1, -1):
                ids.append(toks[i][beam][step])
                beam = back[i][beam][step]
            ids.reverse()
            reason = "eos" if ids and ids[-1] == eos else "length"
            row.append(GeneratedSequence(i, ids[:-1] if reason == "eos" else ids, reason))
        results.append(row)
    return results


def generate(model: BioGptForCausalLM, prompts: Sequence[Sequence[int]], opts: GenerationOptions,
             generator: Generators = None, should_stop: StopCheck | None = None,
             constraints: Sequence[Constraint | None] | None = None) -> list[list[GeneratedSequence]]:
    """All strategies, final results: one list of sequences per prompt (`constraints`: one
    automaton or None per prompt)."""
    opts.validate(model.config.vocab_size)
    constraint_of = constraints.__getitem__ if constraints is not None else None
    if opts.num_beams > 1:
        return beam_search(model, prompts, opts, generator=generator, constraint_of=constraint_of)
    k = opts.num_return_sequences
    ids: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    for row, tok, reason in stream_tokens(model, prompts, opts, generator, should_stop, constraint_of=constraint_of):
        if reason is None:
            ids.setdefault(row, []).append(tok)
        else:
            reasons[row] = reason
    return [[GeneratedSequence(i, ids.get(i * k + j, []), reasons[i * k + j]) for j in range(k)]
            for i in range(len(prompts))]


def generate_padded(model: BioGptForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    *, max_length: int | None = None, min_length: int | None = None, pad_token_id: int | None = None,
                    use_cache: bool = True, generator: Generators = None, **options: Any) -> torch.Tensor:
    """The reference `generate()`'s tensor: each input row as given (left-padded, its attention
    mask saying where: without one, `<pad>` marks padding), then its new tokens, the `</s>` that
    ended them, and `pad_token_id` up to the longest row; `num_return_sequences` rows per input.
    `options` are `GenerationOptions` fields; 20 new tokens unless `max_new_tokens` or
    `max_length` say otherwise, as in the reference, and `min_length` counts the input too (the
    model card's call). `use_cache` is accepted: the cache is always on."""
    unknown = sorted(set(options) - {f.name for f in fields(GenerationOptions)})
    if unknown:
        raise ValueError(f"generate() does not take {', '.join(unknown)}")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    config, width = model.config, ids.shape[1]
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    if attention_mask is None:  # the reference's rule: padding is <pad>, unless <pad> is also </s>
        attention_mask = ids.ne(pad) if pad != config.eos_token_id else torch.ones_like(ids)
    if max_length is not None and "max_new_tokens" not in options:
        if max_length <= width:
            raise ValueError(f"max_length {max_length} leaves no room after the {width} input positions: "
                             "set max_new_tokens")
        options["max_new_tokens"] = max_length - width
    if min_length is not None and "min_new_tokens" not in options:
        options["min_new_tokens"] = max(min_length - width, 0)
    opts = GenerationOptions(**{"max_new_tokens": 20, **options})
    prompts = [row[keep.bool()].tolist() for row, keep in zip(ids.cpu(), attention_mask.cpu(), strict=True)]
    try:
        results = generate(model, prompts, opts, generator)
    except PromptTooLong as e:  # in this call's words, not the CLI's
        e.args = (e.hinted("shorten it, or lower max_length or max_new_tokens"),)
        raise
    tails = [s.ids + [config.eos_token_id] * (s.finish_reason == "eos") for seqs in results for s in seqs]
    out = torch.full((len(tails), width + max(map(len, tails), default=0)), pad, dtype=ids.dtype)
    out[:, :width] = ids.cpu().repeat_interleave(opts.num_return_sequences, 0)
    for row, tail in zip(out, tails, strict=True):
        row[width:width + len(tail)] = torch.tensor(tail, dtype=ids.dtype)
    return out.to(ids.device)
