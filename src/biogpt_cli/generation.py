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

from .constraints import Constraint, Held, allowed_mask, constrain
from .drafts import MAX_DRAFT, SELF, SPECULATE, Drafter, DraftStats, Lookup, SelfDraft, draft_model, drafts
from .errors import InputError, PromptTooLong
from .frame import Frame
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
    # speculative decoding (drafts.py): the tokens are the same whatever these say
    speculate: str = "auto"
    draft_tokens: int = 8

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
        need(self.speculate in SPECULATE, f"speculate must be one of {', '.join(SPECULATE)}")
        need(1 <= self.draft_tokens <= MAX_DRAFT, f"draft_tokens must be between 1 and {MAX_DRAFT}")
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
                  stats: DraftStats | None = None) -> Iterator[tuple[int, int | None, str | None]]:
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
    j's automaton (constraints.py), or None; each of its rows keeps its own state. Rows speculate
    as their options say (drafts.py): the tokens are the same; `stats` counts what it did."""
    opts.validate(model.config.vocab_size)
    if opts.num_beams != 1:
        raise InputError("stream_tokens does greedy or sampled decoding; use beam_search for beams")
    k = opts.num_return_sequences
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
        run = _Run(model, first, k, own_opts, stream_of, None if per_row else generator,
                   constraint_of or (lambda j: None), should_stop, observe, stats or DraftStats(),
                   model.config.max_position_embeddings if refill else 0, slots if grows else 0)
        try:
            yield from run.decode(queue, slots if refill else 0, grows)
        finally:
            run.frame.close()


@dataclass(eq=False)
class _Row:
    """A row of the batch and the sequence it decodes: all that a prompt taking the row over
    replaces, in one place."""

    seq: int  # its sequence (prompt j's are j * k .. j * k + k - 1)
    opts: GenerationOptions
    draw: torch.Generator | None  # its prompt's own random stream (None: the batch's)
    held: Held  # its constraint, and where it stands in it
    prompt: Sequence[int]
    ids: list[int] = field(default_factory=list)  # its new tokens
    alive: bool = True
    drafter: Drafter = field(default_factory=Lookup)  # its drafts from its text (drafts.py)


class _Run:
    """One batch's rows and their decoding: tokens chosen, taken (events yielded), fed."""

    def __init__(self, model: BioGptForCausalLM, first: Sequence[tuple[int, Sequence[int]]], k: int,
                 own_opts: Callable[[int], GenerationOptions], stream_of: Callable[[int], torch.Generator] | None,
                 generator: torch.Generator | None, constraint_of: Callable[[int], Constraint | None],
                 should_stop: StopCheck | None, observe: Callable[[int, int, torch.Tensor], None] | None,
                 stats: DraftStats, columns: int, room: int) -> None:
        self.model, self.eos, self.pad = model, model.config.eos_token_id, model.config.pad_token_id
        self.own_opts, self.stream_of, self.generator = own_opts, stream_of, generator
        self.constraint_of = constraint_of
        self.should_stop, self.observe, self.stats = should_stop, observe, stats
        own = {j: stream_of(j) for j, _ in first} if stream_of else {}  # a prompt's k rows share its stream
        self.rows = [self._row(j, p, j * k + r, own.get(j)) for j, p in first for r in range(k)]
        self.frame = Frame(model, [p for _, p in first], max(row.opts.max_new_tokens for row in self.rows), k,
                           columns, room)

    def _row(self, j: int, prompt: Sequence[int], seq: int, draw: torch.Generator | None) -> _Row:
        o = self.own_opts(j)
        drafter = SelfDraft(draft_model(self.model, o.speculate), len(prompt) + o.max_new_tokens) \
            if o.speculate in SELF else Lookup()
        return _Row(seq, o, draw, Held(self.constraint_of(j)), prompt, drafter=drafter)

    def decode(self, queue: _Queue, refill: int, grows: bool) -> Generator[tuple[int, int | None, str | None]]:
        """Until no row is alive: the prompts waiting join (`refill`: up to that many rows), then
        the tokens just taken are fed and the next ones taken."""
        tokens = yield from self.take(self.frame.logits[:, None], self.choose(self.frame.logits))
        shown: list[bool] = []  # what the device last saw alive: it changes when a row ends or joins
        while True:
            tokens, joined = yield from self.join(queue, tokens, refill, grows)
            alive = [row.alive for row in self.rows]
            if not any(alive):
                return
            if alive != shown:
                shown, finished = alive, torch.tensor([not a for a in alive], device=tokens.device)
            tokens = yield from self.feed(tokens.masked_fill(finished, self.pad), finished, joined)

    def choose(self, scores: torch.Tensor, length: int | None = None, r: int | None = None) -> torch.Tensor:
        """Each row's next token (`r`: that row's alone) from `scores` after the history's first
        `length` columns, under its options and constraint."""
        part = slice(None) if r is None else slice(r, r + 1)
        rows, frame = self.rows[part], self.frame
        draw = [row.draw for row in rows] if self.stream_of else self.generator
        return _choose(scores, frame.history[part, :length or frame.length], frame.starts[part],
                       [row.opts for row in rows], draw, [row.alive for row in rows], self.eos,
                       allowed_mask([row.held for row in rows], frame.vocab, scores.device))

    def take(self, scores: torch.Tensor, tokens: torch.Tensor, j: int = 0,
             ) -> Generator[tuple[int, int | None, str | None], None, torch.Tensor]:
        """Every live row takes its token (`scores[:, j]`: what it was chosen from); returns `tokens`."""
        for r, tok in enumerate(tokens.tolist()):
            if self.rows[r].alive:
                yield from self._took(self.rows[r], tok, scores[r, j])
        return tokens

    def _took(self, row: _Row, token: int, scores: torch.Tensor) -> Generator[tuple[int, int | None, str | None]]:
        """The row takes `token`: its constraint moves on, its events are yielded, it may end."""
        row.held.advance(token)
        if self.observe is not None:
            self.observe(row.seq, token, scores)
        row.alive = yield from _advance(row.seq, token, row.ids, self.eos, row.opts.max_new_tokens,
                                        self.should_stop, row.opts.stop_token_ids)

    def join(self, queue: _Queue, tokens: torch.Tensor, refill: int, grows: bool,
             ) -> Generator[tuple[int, int | None, str | None], None, tuple[torch.Tensor, bool]]:
        """Continuous batching: waiting prompts take finished rows (or new ones, up to `refill`),
        are prefilled together and take their first token. Returns the tokens to feed next, and
        whether any joined."""
        rows, frame = self.rows, self.frame
        free = [r for r, row in enumerate(rows) if refill and not row.alive]
        keep = frame.window([row.alive for row in rows])
        to_go = max((row.opts.max_new_tokens - len(row.ids) for row in rows if row.alive), default=0)
        joining: list[int] = []
        while free or (grows and len(rows) < refill):
            most = max([to_go, *(rows[r].opts.max_new_tokens for r in joining)])
            group = [rows[r].prompt for r in joining]  # a prompt joins if it fits beside those taken before it
            taken = queue.take_if(lambda j, p, g=group, m=most: frame.fits([*g, p], keep,
                                                                            max(m, self.own_opts(j).max_new_tokens)))
            if taken is None:
                break
            if not free:  # a new row, for a prompt that arrived while the batch runs
                free = list(frame.add_rows(1))
                tokens = torch.cat([tokens, tokens[:1]])
                rows.append(rows[0])
            r, (j, prompt) = free.pop(0), taken
            rows[r] = self._row(j, prompt, j, self.stream_of(j) if self.stream_of else None)
            joining.append(r)
        if not joining:
            return tokens, False
        logits = frame.admit(joining, [rows[r].prompt for r in joining], keep,
                             max(rows[r].opts.max_new_tokens for r in joining), to_go)
        for i, r in enumerate(joining):
            tokens[r] = token = int(self.choose(logits[i:i + 1], r=r)[0])
            yield from self._took(rows[r], token, logits[i])
        return tokens, True

    def feed(self, tokens: torch.Tensor, finished: torch.Tensor, one: bool,
             ) -> Generator[tuple[int, int | None, str | None], None, torch.Tensor]:
        """Feed the tokens just taken (finished rows': <pad>), with the rows' drafts (drafts.py) in
        the same pass unless `one`, and take the next: drafted tokens are kept up to the first a
        row would not have chosen (its own choice then, and the rest forgotten), so the tokens are
        those of one token a pass. Returns the tokens to feed next."""
        frame, rows = self.frame, self.rows
        ahead, certain = drafts(rows, self.eos) if not one and frame.rows is None else ([], False)
        start, n = frame.length, len(ahead[0]) if ahead else 0
        if n:
            extra = torch.tensor(ahead, device=tokens.device).masked_fill(finished[:, None], self.pad)
            scores = frame.extend(torch.cat([tokens[:, None], extra], 1))
        else:
            scores = frame.step(tokens, ~finished)[:, None]
        live, stats = [row for row in rows if row.alive], self.stats
        for j in range(n + 1):
            before = [row.alive for row in rows]
            mine = extra[:, j] if j < n and certain else self.choose(scores[:, j], start + 1 + j)
            yield from self.take(scores, mine, j)
            stats.tokens += sum(before)
            missed = j < n and any(a and t != d[j] for a, t, d in zip(before, mine.tolist(), ahead, strict=True))
            if j == n or missed or not any(row.alive for row in rows):
                break
        if j < n:
            frame.truncate(start + 1 + j)
        kept = j if missed or j == n else j + 1
        stats.passes, stats.drafted, stats.kept = (stats.passes + len(live), stats.drafted + n * len(live),
                                                   stats.kept + kept * len(live))
        for row in live if n and not certain else ():
            row.drafter.taken(kept)
        return mine


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
    batch = Frame(model, prompts, max_new, nb)
    held = [Held(constraint_of(i) if constraint_of else None) for i in range(len(prompts)) for _ in range(nb)]
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
        procs = make_processors(opts, eos, batch.width, allowed_mask(held, batch.vocab, dev))
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
        if any(h.constraint is not None for h in held):
            taken = toks[:, :, step].reshape(-1).tolist()
            held = [held[p].after(t) for p, t in zip(parents.tolist(), taken, strict=True)]
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
