"""The batch engine: model-input jobs in, finished sequences out to a renderer, in input order.

Every command that generates for many inputs (`generate`, `qa`, `extract`, `classify`, the server,
Ray's workers) builds its jobs and its renderer and calls `run`; the skipping of work a resumed
output file already holds, batching and decoding live here once. A job is a row's key, token ids
and options: what it came from (a line, a PubMed citation, a request) is the caller's `item`,
handed to the renderer as it is and never read here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .constraints import Constraint
from .drafts import DraftStats
from .errors import InputError
from .frame import fit_prompt
from .generation import GenerationOptions, prompt_generator
from .streaming import TextEvent, stream_completions


@dataclass
class Job:
    key: Hashable  # what a resumed run matches it on, and what its random stream is seeded from
    ids: list[int]  # the model input
    item: Any = None  # the caller's record of it, for the renderer
    where: str = ""  # how a message names it (`line 3: `)
    # its own settings where they are not the run's (a server's requests share one run): greedy or
    # sampled decoding (the run's k rows per prompt), stop strings, the seed of its random stream
    opts: GenerationOptions | None = None
    stop: Sequence[str] | None = None
    seed: int | None = None
    gone: threading.Event | None = None  # set when its reader went away: its rows end at the next step
    constraint: Constraint | None = None  # the automaton its tokens must follow (constraints.py)


class Renderer(Protocol):
    def begin(self, items: Sequence[Any]) -> None: ...
    def add(self, item: Any) -> None: ...
    def event(self, ev: TextEvent) -> None: ...


@dataclass
class Stats:
    """What `-v` reports: counts and the time spent generating (not loading)."""

    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    first_token: float | None = None  # seconds from the start of the first batch to its first text
    drafts: DraftStats = field(default_factory=DraftStats)  # speculation (none under beam search)

    def summary(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        first = f"first token after {self.first_token:.2f} s, " if self.first_token is not None else ""
        spec = f"\n{self.drafts.line()}" if self.drafts.passes else ""
        return (f"{self.prompts} prompt{'s' * (self.prompts != 1)}, {self.prompt_tokens} prompt tokens, "
                f"{self.new_tokens} new tokens in {self.seconds:.2f} s; {first}{rate:.1f} new tokens/s{spec}")


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Groups of `size`; when reading fails (a bad line), the items before it are still processed."""
    batch: list[Any] = []
    try:
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
    except InputError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def default_batch_size(opts: GenerationOptions, device: torch.device | str = "cpu") -> int:
    """16 prompts at a time on a CPU: a decoding step reads every weight once whatever its rows, so
    16 rows cost little more than 8 while their keys and values
    stay small (continuous batching keeps only the columns a live row reads). 8 prompts when each
    has several rows (beams, or several samples). On a GPU a step's time hardly grows with its rows
    (it is kernel launches at these sizes), so four times as many."""
    per_cpu = 16 if opts.rows_per_prompt == 1 else 8
    return per_cpu * (4 if torch.device(device).type == "cuda" else 1)


def run(model: Any, tokenizer: Any, jobs: Iterable[Job | None], opts: GenerationOptions, renderer: Renderer, *,
        batch_size: int | None = None, stop: Sequence[str] = (), seed: int | None = None,
        done: set[Any] | frozenset[Any] = frozenset(), progress: Callable[[int], None] | None = None,
        confidence: bool = False, live: bool = True) -> Stats:
    """Generate for every job whose key is not in `done`, `batch_size` prompts at a time.

    Greedy and sampled decoding use continuous batching: when a row finishes, the next job takes
    its place, and the results equal each job decoded alone; a live source (a server's) yields None
    when it has no job now, and its jobs join the running batch at its next step. Beam search runs fixed batches, and
    `progress(step)` follows it, since it yields nothing until its winners are known. When
    sampling, each job draws from its own stream, derived from `seed` and its key, so a seeded run
    gives each job the same samples in any batch, next to any neighbours, and after a resume.
    A bad input line stops the reading, but the jobs before it are finished first. Without `live`
    (nobody watches the text as it comes) each sequence's text is decoded once, when it ends.
    """
    device = next(model.parameters()).device
    batch_size = batch_size or default_batch_size(opts, device)
    stats = Stats()
    limit = model.config.max_position_embeddings
    todo = (j for j in jobs if j is None or j.key not in done)  # None: a live source has none now
    groups = batches(todo, batch_size) if opts.num_beams > 1 else iter([todo])
    failure: list[InputError] = []
    k = opts.num_return_sequences
    for group in groups:
        running: dict[int, Job] = {}  # the jobs read and not yet finished, by their index in the run
        ended: dict[int, int] = {}  # their sequences finished so far

        def feed(group: Iterable[Job | None] = group, running: dict[int, Job] = running) -> Iterator[list[int] | None]:
            try:
                for job in group:
                    if job is None:
                        yield None
                        continue
                    try:
                        fit_prompt(job.ids, (job.opts or opts).max_new_tokens, limit)
                    except InputError as e:
                        raise InputError(f"{job.where}{e}") from None
                    running[stats.prompts] = job
                    renderer.add(job.item)
                    stats.prompts += 1
                    stats.prompt_tokens += len(job.ids)
                    yield job.ids
            except InputError as e:  # finish what was read, then report
                failure.append(e)

        def stream(i: int, running: dict[int, Job] = running, base: int = stats.prompts) -> torch.Generator | None:
            job = running[base + i]
            if not (job.opts or opts).do_sample:  # greedy rows draw nothing
                return None
            return prompt_generator(seed if job.seed is None else job.seed, job.key, device)

        def own(i: int, running: dict[int, Job] = running,
                base: int = stats.prompts) -> tuple[GenerationOptions, Sequence[str]]:
            job = running[base + i]
            return job.opts or opts, stop if job.stop is None else job.stop

        def gone(i: int, running: dict[int, Job] = running, base: int = stats.prompts) -> bool:
            event = running[base + i].gone
            return event is not None and event.is_set()

        def constraint(i: int, running: dict[int, Job] = running, base: int = stats.prompts) -> Constraint | None:
            return running[base + i].constraint

        renderer.begin([])
        start, base = time.perf_counter(), stats.prompts
        sampled = opts.do_sample or opts.num_beams == 1  # a job of its own settings may sample

        def first_token(start: float = start) -> None:  # chosen, whether or not its text is shown yet
            if stats.first_token is None:
                stats.first_token = time.perf_counter() - start
        for ev in stream_completions(model, tokenizer, feed(), opts, stop, stream if sampled else None,
                                     progress, slots=batch_size, confidence=confidence, live=live,
                                     per_prompt=own if opts.num_beams == 1 else None,
                                     gone=gone, first_token=first_token, constraint_of=constraint,
                                     drafts=stats.drafts):
            if ev.done is not None:
                stats.new_tokens += len(ev.done.ids) + (ev.done.finish_reason == "eos")
                index = base + ev.done.prompt_index
                ended[index] = ended.get(index, 0) + 1
                if ended[index] == k:
                    del running[index], ended[index]
            renderer.event(ev)
        stats.seconds += time.perf_counter() - start
        if failure:
            raise failure[0]
    return stats
