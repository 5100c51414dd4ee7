"""The engine behind `biogpt serve`: one object that owns the model, who has it (turns.py) and the
metrics. A request made ready (`Work`: its plan, tokenized prompts and settings) has its rows
join the batch `batch.run` decodes in a worker thread at its next step, whatever its neighbours'
settings; its events go to its own sink as if it ran alone. The HTTP layer (server.py) only
checks requests, feeds this and renders its events; tests drive it directly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .batch import Job
from .drafts import SELF, draft_model
from .errors import InputError, NothingToEmbed, PromptTooLong
from .generation import GenerationOptions
from .inputs import Prompt
from .limits import DEFAULT_LIMITS, Limits
from .memory import check_batch_fits, check_rows_fit
from .metrics import Metrics
from .plans import Plan, generate_plan, logprob_entries, task_plan
from .scoring import embed
from .streaming import TextEvent, TextStream
from .turns import Member, Turns

log = logging.getLogger("biogpt.serve")


class Cancelled(Exception):
    """The client went away: the engine stops its rows at the next step."""


@dataclass
class Work:
    """A completions request made ready: its plan, one job per prompt (carrying the request's
    settings), the rows each prompt decodes (`k`), the copies of each choice (greedy n) and the
    choices a prompt returns (`n`: the best of its `k` samples by cumulative log-probability)."""

    plan: Plan
    jobs: list[Job]
    k: int
    copies: int
    n: int

    @property
    def key(self) -> str:
        """The run it may join: greedy and sampled rows share one of the same rows per prompt;
        beam search runs fixed batches of one setting (every option, and the stop strings)."""
        opts = self.plan.opts
        if opts.num_beams == 1:
            return f"rows={self.k}"
        return "beams:" + json.dumps([vars(opts), self.plan.stop], sort_keys=True, default=str)

    def best(self, choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each prompt's `n` choices: all of them, or the best of its `k` by cumulative logprob."""
        if self.n == self.k * self.copies:
            return choices

        def total(c: dict[str, Any]) -> float:
            return sum(c["logprobs"]["token_logprobs"]) if c["logprobs"] else 0.0
        ranked = [sorted(choices[i:i + self.k], key=total, reverse=True)[:self.n]
                  for i in range(0, len(choices), self.k)]
        return [dict(c, index=i) for i, c in enumerate(c for group in ranked for c in group)]


class Collector:
    """A renderer for batch.run that hands each event to `sink` (in the run's thread), its row
    counted over the whole run (beam search numbers each fixed batch's rows from 0)."""

    def __init__(self, sink: Callable[[TextEvent], None], k: int) -> None:
        self.sink, self.k, self.added, self.base = sink, k, 0, 0

    def begin(self, prompts: Any) -> None:
        self.base = self.added

    def add(self, prompt: Prompt) -> None:
        self.added += 1

    def event(self, ev: TextEvent) -> None:
        self.sink(dataclasses.replace(ev, row=ev.row + self.base * self.k))


class Engine:
    def __init__(self, lm: Any, tok: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.lm, self.tok, self.limits = lm, tok, limits
        check_batch_fits(lm, limits.rows)
        if limits.speculate in SELF:  # its quantized copy, loaded before the first request
            draft_model(lm, limits.speculate)
        self.turns = Turns(limits.waiting, limits.rows, limits.fair_wait)
        self.metrics = Metrics(running=lambda: float(self.turns.running), waiting=lambda: self.turns.waiting,
                               capacity=limits.rows)

    def prepare(self, prompts: list[str], s: dict[str, Any], n: int) -> Work:
        """Tokenize and check a request (a worker thread's job: long prompts would stall the event
        loop); BioGptError for a prompt or size the model cannot take. `max_new_tokens` None: up
        to the model's positions after the longest prompt."""
        lm = self.lm
        if s["max_new_tokens"] is None:
            limit = lm.config.max_position_embeddings
            longest = max(len(self.tok.encode(p)) for p in prompts)
            if longest >= limit:
                raise PromptTooLong(longest, 1, limit)
            s = {**s, "max_new_tokens": limit - longest}
        if s.get("ignore_eos"):
            s = {**s, "min_new_tokens": s["max_new_tokens"]}
        if s.get("seed") is None:
            s = {**s, "seed": int.from_bytes(os.urandom(4), "little")}
        plan = generate_plan(lm, self.tok, {**s, **self.speculation}, lambda m: None)
        jobs = [dataclasses.replace(plan.job(Prompt(i, p)), opts=plan.opts, stop=plan.stop, seed=plan.seed)
                for i, p in enumerate(prompts)]
        plan.opts.validate(lm.config.vocab_size)
        check_rows_fit(lm.config, len(prompts) * n, max(len(j.ids) for j in jobs) + s["max_new_tokens"],
                       what="prompt x n", dtype_bytes=next(lm.parameters()).element_size(),
                       device=next(lm.parameters()).device)
        k = plan.opts.num_return_sequences
        copies = 1 if plan.opts.do_sample or plan.opts.num_beams > 1 else n
        return Work(plan, jobs, k, copies, n)

    def prepare_task(self, command: str, prompts: list[Prompt], s: dict[str, Any]) -> Work:
        """A task request made ready as `biogpt qa|extract|classify` reads its records (plans.py):
        its jobs join the greedy rows of the running batch. BioGptError naming the document."""
        plan = task_plan(self.lm, self.tok, {**s, "command": command, **self.speculation}, lambda m: None)
        jobs = []
        for p in prompts:
            if plan.blank(p):
                raise InputError(f"{p.where}nothing to read")
            try:
                jobs.append(dataclasses.replace(plan.job(p), opts=plan.opts, stop=(), seed=0))
            except InputError as e:
                raise InputError(f"{p.where}{e}") from None
        p = next(self.lm.parameters())
        check_rows_fit(self.lm.config, len(jobs), max(len(j.ids) for j in jobs) + plan.opts.max_new_tokens,
                       what="documents", dtype_bytes=p.element_size(), device=p.device)
        return Work(plan, jobs, 1, 1, 1)

    @property
    def speculation(self) -> dict[str, Any]:
        """How every request's rows speculate (`serve --speculate`, `--draft-tokens`)."""
        return {"speculate": self.limits.speculate, "draft_tokens": self.limits.draft_tokens}

    async def finished(self, work: Work, cancelled: threading.Event, arrived: float) -> list[Any]:
        """`generate` for a request of one row a prompt (the tasks): each prompt's finished
        completion, in the prompts' order."""
        done: dict[int, Any] = {}
        await self.generate(work, lambda ev: ev.done and done.__setitem__(ev.done.prompt_index, ev.done),
                            cancelled, arrived)
        return [done[i] for i in range(len(work.jobs))]

    async def generate(self, work: Work, sink: Callable[[TextEvent], None], cancelled: threading.Event,
                       arrived: float) -> None:
        """A request's generation: its rows join the running run of its key at the next step, or
        start one once the model is free (a cancelled request never starts); `Cancelled` when its
        client went away. Its tokens and latencies go to the metrics."""
        first, new, longest = [], [0], [0]

        def counted(ev: TextEvent) -> None:
            if ev.text and not first:
                first.append(time.perf_counter())
            if ev.done is not None:
                new[0] += len(ev.done.ids)
                longest[0] = max(longest[0], len(ev.done.ids))
            sink(ev)

        for job in work.jobs:  # a request's rows end with its client
            job.gone = cancelled
        self.metrics.prompt_tokens.inc(sum(len(j.ids) for j in work.jobs))
        me = Member(work.jobs, counted, cancelled, work.key)  # a run it starts decodes as its plan says
        await self.turns.take_turn(me, lambda key: asyncio.to_thread(self._run_kind, key, work.plan))
        if me.error is not None:
            raise me.error
        if cancelled.is_set():
            self.metrics.cancelled.inc()
            raise Cancelled
        end = time.perf_counter()
        self.metrics.generated((first[0] if first else end) - arrived, end - arrived, new[0], longest[0])

    def choice(self, work: Work, ev: TextEvent) -> dict[str, Any]:
        """A finished row as a completions choice (`_ids`: its new tokens, for the usage), its
        logprobs still by token: `named` gives them their text, off the decoding thread."""
        done = ev.done
        record = work.plan.record(work.jobs[done.prompt_index].item, done)
        return {"text": done.text, "index": ev.row, "finish_reason": "length" if done.finish_reason == "length"
                else "stop", "logprobs": record.get("logprobs"), "_ids": done.ids,
                "_prompt": work.jobs[done.prompt_index].ids}

    def named(self, choice: dict[str, Any]) -> dict[str, Any]:
        """The choice with its logprobs in the completions API's shape: each token's text piece."""
        entries, prompt = choice["logprobs"], choice.pop("_prompt")
        pieces = text_pieces(self.tok, prompt, choice["_ids"], choice["text"]) if entries else []
        return {**choice, "logprobs": legacy_logprobs(self.tok, entries, pieces)}

    def echo(self, ids: list[int], k: int | None) -> dict[str, Any]:
        """A prompt as `echo` gives it: its text and, with logprobs, each token's log-probability
        given the ones before it (`biogpt score`'s values; the leading </s> has none, as OpenAI's
        first token)."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        if k is None:
            return {"text": text, "logprobs": None}
        first = {"token": self.tok.convert_ids_to_tokens(ids[:1])[0], "logprob": None, "top": None}
        with torch.no_grad():
            entries = [first, *logprob_entries(self.lm, self.tok, ids[:1], ids[1:], k)]
        return {"text": text, "logprobs": legacy_logprobs(self.tok, entries, text_pieces(self.tok, [], ids, text))}

    def embed_texts(self, texts: list[str]) -> tuple[list[list[int]], torch.Tensor]:
        """Their ids and unit vectors (in a worker thread); a text too long or left with no token
        is named by its index."""
        ids = [self.tok.encode(t) for t in texts]
        limit = self.lm.config.max_position_embeddings
        long = next((i for i, s in enumerate(ids) if len(s) > limit), None)
        if long is not None:
            raise InputError(f"input[{long}]: {len(ids[long])} tokens exceed the model's {limit} positions")
        try:
            return ids, embed(self.lm, ids, normalize=True)
        except NothingToEmbed as e:
            raise InputError(f"input[{e.index}]: {e.reason}") from None

    def _run_kind(self, key: str, kind: Plan) -> None:
        """The run of `key` (in its own thread; `kind`: the plan of a request of that key, which
        all decode alike): batches over the requests of that key, until none waits."""
        while self.turns.waits(key):
            self._run_batch_of(key, kind)

    def _run_batch_of(self, key: str, kind: Plan) -> None:
        """One batch fed by every request of `key` as it arrives (its rows join at the next step),
        each event routed to its request as if it ran alone; it ends when no row runs and nobody
        waits. A request is forgotten as soon as its rows end. If the batch fails, the requests
        being admitted then (no event yet) get the error, and the others start over in a fresh
        batch, their events already handed on not handed again."""
        from .batch import run as run_batch

        turns, metrics = self.turns, self.metrics
        beams, k = kind.opts.num_beams > 1, kind.opts.num_return_sequences
        owners: dict[int, list] = {}  # the batch's prompt index -> [request, its own index, rows still running]
        left: dict[Member, int] = {}  # the rows each request taken still runs
        fresh: set[Member] = set()  # taken, and no event of theirs yet
        indices = itertools.count()

        def source() -> Any:
            while True:
                m = turns.next_member(key)
                if m is None and beams:
                    return  # a beam batch is fixed: those waiting now
                if m is None:
                    yield None  # nobody now: the batch goes on, and asks again at its next step
                    continue
                left[m] = len(m.jobs) * k
                fresh.add(m)
                if m.joined is None:  # its first batch (one that starts over was counted then)
                    m.joined = time.monotonic()
                    metrics.queued.observe(m.joined - m.since)
                for i, job in enumerate(m.jobs):
                    owners[next(indices)] = [m, i, k]
                    metrics.rows.inc(k)
                    yield job

        def route(ev: TextEvent) -> None:
            owner = owners[ev.row // k]
            m, local = owner[0], owner[1]
            fresh.discard(m)
            row = local * k + ev.row % k
            done = None if ev.done is None else dataclasses.replace(ev.done, prompt_index=local)
            m.delivered[row] = m.delivered.get(row, 0) + 1
            if not m.cancelled.is_set() and m.delivered[row] > m.skip.get(row, 0):
                try:
                    m.sink(TextEvent(row, ev.text, done, ev.confidence))
                except Cancelled:  # dropped (a stream nobody reads): its rows end at the next step
                    m.cancelled.set()
            if done is not None:
                metrics.rows.dec()
                owner[2] -= 1
                if not owner[2]:
                    del owners[ev.row // k]
                left[m] -= 1
                if not left[m]:
                    del left[m]
                    turns.finish(m)

        # greedy and sampled jobs carry their own settings: the run's say only how many rows each
        # prompt has; a beam run's are its requests' own (they are alike)
        opts = kind.opts if beams else GenerationOptions(num_return_sequences=k, do_sample=k > 1)
        try:
            run_batch(self.lm, self.tok, source(), opts, Collector(route, k), stop=kind.stop if beams else (),
                      batch_size=max(1, self.limits.rows // opts.rows_per_prompt))
        except Exception as e:  # noqa: BLE001 -- answered to the requests it concerns; the server goes on
            blamed = set(fresh) or set(left)  # being admitted; else a step failed, and everyone with it
            log.error("a batch failed (%s: %s): %d request(s) get the error, %d start over", type(e).__name__,
                      str(e).splitlines()[0] if str(e) else "", len(blamed), len(left) - len(blamed))
            for m in list(left):
                if m in blamed:
                    m.error = e
                    turns.finish(m)
                else:
                    m.skip = dict(m.delivered)
                    m.delivered = {}
                    metrics.restarted.inc()
                    turns.retry(m)
        finally:
            metrics.rows.set(0)


def text_pieces(tok: Any, prompt: list[int], ids: list[int], text: str) -> list[str]:
    """The text each of `ids` adds to `text` (the choice's text, cut at a stop string if one cut
    it), as OpenAI's logprobs tokens are: their concatenation is `text`. Each token's share is
    where the text of the tokens through it stops agreeing with `text` (decoded after the
    prompt's last words: Moses spaces a word by its neighbours), read from one incremental
    decoding of the sequence: a window of words a token, not the whole text."""
    stream, ends, at = TextStream(tok, prompt[-8:]), [], 0
    for token in ids:
        stream.add(token)
        at = max(at, len(os.path.commonprefix([stream.so_far(), text])))
        ends.append(at)
    if ends:
        ends[-1] = len(text)
    return [text[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def legacy_logprobs(tok: Any, entries: list[dict[str, Any]] | None, pieces: list[str]) -> dict[str, Any] | None:
    """Our per-token entries in the completions API's logprobs shape: `tokens` the text pieces
    they add, `text_offset` where each starts in the text, the alternatives by their text."""
    if entries is None:
        return None
    starts = [sum(map(len, pieces[:i])) for i in range(len(pieces))]
    return {"tokens": pieces, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else {tok.decode([t["id"]]): t["logprob"] for t in e["top"]}
                             for e in entries],
            "text_offset": starts}
