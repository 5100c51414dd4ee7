"""What a batch command does with each input record, apart from where records come from and go.

A plan is built from a loaded model and plain settings (the command's options, picklable), so the
local command and a Ray worker build the same plan and write the same records: `generate`, the
task commands (`qa`, `extract`, `classify` on a task checkpoint), and `score` and `embed`, which
read each text whole (`FORWARD`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .batch import Job, run
from .errors import InputError, PromptTooLong
from .frame import fit_prompt
from .generation import GenerationOptions
from .inputs import Prompt
from .jsonl import dumps, lines
from .output import LineFn, RecordFn, Renderer, base_record, generation_line, generation_record
from .streaming import Completion

Warn = Callable[[str], None]


def job_of(p: Prompt, ids: list[int]) -> Job:
    """A record's row for the engine: keyed as `--resume` matches it (its id, else its line)."""
    return Job(p.key, ids, p, p.where)


@dataclass
class Plan:
    opts: GenerationOptions
    job: Callable[[Prompt], Job]  # the model input of a record; InputError for a bad one
    record: RecordFn = generation_record  # a finished sequence's JSONL record
    line: LineFn = generation_line  # ... or its plain-text line
    summary: LineFn | None = None  # shown after the live text on a terminal
    stop: tuple[str, ...] = ()
    seed: int | None = None
    blank: Callable[[Prompt], bool] = lambda p: not p.text.strip()
    identity: dict[str, Any] = field(default_factory=dict)  # what defines the run, for its manifest
    unparsed: list[int] = field(default_factory=lambda: [0])  # task outputs that did not parse
    ungrounded: list[int] = field(default_factory=lambda: [0])  # relations naming what their document lacks


def generation_options(s: dict[str, Any]) -> GenerationOptions:
    """`generate`'s decoding settings, with the reference's defaults for what was not given (None);
    a given 0 stays 0, to be honoured (length penalty, top-p) or refused (temperature)."""
    def given(key: str, default: Any) -> Any:
        return default if s.get(key) is None else s[key]

    return GenerationOptions(
        max_new_tokens=s["max_new_tokens"], min_new_tokens=given("min_new_tokens", 0),
        num_beams=given("num_beams", 1), length_penalty=given("length_penalty", 1.0),
        early_stopping="never" if s.get("early_stopping") == "never" else bool(s.get("early_stopping")),
        num_return_sequences=given("num_return_sequences", 1),
        do_sample=bool(s.get("sample")), temperature=given("temperature", 1.0), top_k=given("top_k", 50),
        top_p=given("top_p", 1.0), min_p=s.get("min_p"), repetition_penalty=given("repetition_penalty", 1.0),
        no_repeat_ngram_size=given("no_repeat_ngram_size", 0), frequency_penalty=given("frequency_penalty", 0.0),
        presence_penalty=given("presence_penalty", 0.0), logit_bias=given("logit_bias", {}),
        stop_token_ids=given("stop_token_ids", []), include_stop=bool(s.get("include_stop")),
        speculate=given("speculate", "auto"), draft_tokens=given("draft_tokens", 8))


def speculation(opts: GenerationOptions) -> dict[str, Any]:
    """The manifest's record of speculation: it changes the speed, never a token, so a resume may
    change it (output.NOT_IDENTITY)."""
    return {"speculate": opts.speculate, "draft_tokens": opts.draft_tokens}


def generate_plan(lm: Any, tok: Any, s: dict[str, Any], warn: Warn) -> Plan:
    """`generate`; with `logprobs` K, each record also has every new token's log-probability and
    the K likeliest tokens at its step (the step's own logits; beams, whose steps weigh
    hypotheses, score their winners in one more pass)."""
    from .grammars import fitted_choices

    opts = generation_options(s)
    opts.bad_words_ids = [tok.encode(b, add_special_tokens=False) for b in s.get("ban") or () if b.strip()]
    opts.logprobs = s.get("logprobs")
    constraint, kept = fitted_choices(tok, s["choices"], opts, warn) if s.get("choices") else (None, [])
    beams = opts.num_beams > 1 and opts.logprobs is not None
    inputs: dict[Any, list[int]] = {}  # beams: the prompts whose winners are still to score

    def job(p: Prompt) -> Job:
        full = tok.encode(p.text)
        ids = fit_prompt(full, opts.max_new_tokens, lm.config.max_position_embeddings, s.get("truncate", False))
        if len(ids) < len(full):
            warn(f"warning: {p.where}prompt of {len(full)} tokens cut to {len(ids)} (</s> and its last {len(ids) - 1})")
            # the record keeps the prompt that was used, and says how long the given one was
            used = tok.decode(ids, skip_special_tokens=True)
            p = Prompt(p.line, used, p.id, {**p.fields, "prompt_tokens_given": len(full)})
        if beams:
            inputs[p.key] = ids
        row = job_of(p, ids)
        row.constraint = constraint
        return row

    def record(p: Prompt, done: Completion) -> dict[str, Any]:
        out = generation_record(p, done)
        if constraint is not None:  # which of the texts it is (None: cut short by a stop or -n)
            out.update(constrained="choices", choice=choice_of(tok, kept, done.ids))
        if done.logprobs is not None:
            out["logprobs"] = named_entries(tok, done.ids, done.logprobs)
        elif beams:
            out["logprobs"] = logprob_entries(lm, tok, inputs[p.key], done.ids, opts.logprobs)
        return out

    server_only = ("frequency_penalty", "presence_penalty", "logit_bias", "stop_token_ids", "include_stop")
    options = {k: v for k, v in vars(opts).items()
               if k not in ("bad_words_ids", "logprobs", *speculation(opts)) and (k not in server_only or v)}
    identity = {"command": "generate", "options": options, "speculation": speculation(opts),
                "stop": s.get("stop") or [], "ban": s.get("ban") or [],
                "truncate": s.get("truncate", False), **({"seed": s["seed"]} if opts.do_sample else {}),
                **({"logprobs": s["logprobs"]} if s.get("logprobs") is not None else {}),
                **({"constrained": "choices", "choices": s["choices"]} if constraint is not None else {})}
    return Plan(opts, job, record=record, stop=tuple(s.get("stop") or ()), seed=s.get("seed"), identity=identity)


def choice_of(tok: Any, texts: list[str], ids: list[int]) -> str | None:
    """The choice a constrained continuation wrote (None when it was cut short)."""
    return next((t for t in texts if tok.encode(t, add_special_tokens=False) == list(ids)), None)


def logprob_entries(lm: Any, tok: Any, prompt: list[int], new: list[int], k: int) -> list[dict[str, Any]]:
    """The entries of `new` after `prompt`, from one forward pass (a prompt's own tokens, beams)."""
    from .scoring import top_logprobs

    return named_entries(tok, new, top_logprobs(lm, prompt, new, k))


def named_entries(tok: Any, new: list[int], values: list[tuple[float, list[tuple[int, float]]]],
                  ) -> list[dict[str, Any]]:
    """`[{"token", "id", "logprob", "top": [{"token", "id", "logprob"}, ...]}]` per new token."""
    names = tok.convert_ids_to_tokens
    return [{"token": names([t])[0], "id": t, "logprob": lp,
             "top": [{"token": names([i])[0], "id": i, "logprob": v} for i, v in top]}
            for t, (lp, top) in zip(new, values, strict=True)]


def task_plan(lm: Any, tok: Any, s: dict[str, Any], warn: Warn) -> Plan:
    """A task command on a fine-tuned checkpoint: the release's input, greedy to `</s>` with
    `<pad>` banned, the release's post-processing (tasks.py); with `constrained`, each answer
    follows the task's grammar (grammars.py)."""
    from .grammars import entity_offsets, relation_words, source_words, task_grammar
    from .tasks import build_input, parse, render, source_limit, task_for
    from .writers import mark_ungrounded

    task = task_for(s["command"], s.get("task"), lm.config, s["model"])
    limit = source_limit(task, lm.config)
    # -n 0: until </s> or the positions that the longest possible input (`</s>`, the source at its
    # limit, the prompt tokens) leaves, as the release stops at the model's limit (at least 64: a
    # source limit that leaves less, or a larger -n, shortens the source limit instead)
    positions, prompt = lm.config.max_position_embeddings, len(tok.prompt_ids)
    new = s.get("max_new_tokens") or max(positions - (1 + limit + prompt), 64)
    limit = min(limit, positions - 1 - prompt - new)
    if limit < 2:
        raise InputError(f"-n {new} leaves no room for a source in the model's {positions} positions")
    unparsed, ungrounded = [0], [0]
    constrained = bool(s.get("constrained"))
    relations = relation_words(task, lm.config.relations, s.get("relations")) if constrained else ()
    spans = constrained and task.result == "relations"  # entities copied from the source, with their offsets

    def grammar(p: Prompt) -> tuple[list[int], Any, Any]:
        """The model input, the grammar and the aligned source words of a record (one tokenization)."""
        pieces = tok.encode_words(task.source(p.fields))
        ids = build_input(task, tok, p.fields, limit, pieces)
        words = source_words(task, tok, p.fields, ids, pieces) if spans else ()
        return ids, task_grammar(task, tok, words, relations, limit=new), words

    def job(p: Prompt) -> Job:
        shown = next((p.fields[k] for k in ("question", "title", "text", "abstract")
                      if isinstance(p.fields.get(k), str)), "")
        ids, held, _ = grammar(p) if constrained else (build_input(task, tok, p.fields, limit), None, ())
        row = job_of(Prompt(p.line, shown[:200], p.id, p.fields), ids)
        row.constraint = held
        return row

    def result(done: Completion) -> Any:
        value = parse(task, tok.decode(done.ids))  # learned tokens shown: the release strips their echoes
        unparsed[0] += value is None
        return value

    def record(p: Prompt, done: Completion) -> dict[str, Any]:
        value = result(done)
        if spans and value:  # where each entity was copied from (the grammar is made again: rows keep nothing)
            offsets = entity_offsets(*grammar(p)[1:], done.ids)
            if len(offsets) == len(value):  # else two sentences read alike and parse as one: searched for below
                for r, (head, tail) in zip(value, offsets, strict=True):
                    r.update(head_spans=head, tail_spans=tail)
        if task.result == "relations":  # tied to the document's text, or marked `grounded: false`
            ungrounded[0] += mark_ungrounded(p.fields, value)
        return {**base_record(p, done), task.result: value, **({"constrained": task.name} if constrained else {})}

    opts = GenerationOptions(max_new_tokens=new, bad_words_ids=[[lm.config.pad_token_id]],
                             **{k: s[k] for k in ("speculate", "draft_tokens") if s.get(k) is not None})
    identity = {"command": s["command"], "task": task.name, "source_limit": limit, "max_new_tokens": new,
                "speculation": speculation(opts),
                **({"constrained": task.name, "relations": list(relations)} if constrained else {})}
    return Plan(opts, job,
                record=record,
                line=lambda p, done: render(task, result(done)),
                summary=lambda p, done: f"{task.result}: {json.dumps(result(done), ensure_ascii=False)}",
                blank=lambda p: not p.fields, identity=identity, unparsed=unparsed, ungrounded=ungrounded)


PLANS = {"generate": generate_plan, "qa": task_plan, "extract": task_plan, "classify": task_plan}


class MemoryWriter:
    """A LineWriter that keeps the lines (a Ray worker writes them as one part file)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.records = 0

    def write(self, text: str, records: int = 1) -> None:
        self.lines.append(text)
        self.records += records


def error_record(p: Prompt, message: str) -> str:
    """The record of an input that could not be processed (Ray runs: one bad row fails no others)."""
    return dumps({**p.origin, "error": message})


def generated_records(lm: Any, tok: Any, plan: Plan, items: list[Prompt], batch_size: int | None) -> list[list[str]]:
    """Each item's JSONL lines, in order: an item that cannot be built (too long, bad fields)
    gets one error record instead of failing the others."""
    jobs, errors = [], {}
    for i, p in enumerate(items):
        try:
            jobs.append(plan.job(p))
        except InputError as e:
            errors[i] = error_record(p, str(e))
    writer = MemoryWriter()
    k = plan.opts.num_return_sequences
    run(lm, tok, jobs, plan.opts, Renderer("jsonl", writer, None, k, plan.record, plan.line),
        batch_size=batch_size, stop=plan.stop, seed=plan.seed, live=False)
    done = iter(line + "\n" for _, line in lines("".join(writer.lines)))
    return [[errors[i]] if i in errors else [next(done) for _ in range(k)] for i in range(len(items))]


def text_ids(lm: Any, tok: Any, p: Prompt, truncate: bool, warn: Warn, verb: str = "score") -> list[int]:
    """A text's ids to score (or embed): all of them, or with `truncate` the end of one too long
    for the model."""
    limit = lm.config.max_position_embeddings
    try:
        full = tok.encode(p.text)
        ids = fit_prompt(full, 0, limit, truncate)
    except PromptTooLong as e:  # a text is no prompt: no new tokens to lower
        raise InputError(f"{p.where}{e.tokens} tokens exceed the model's {limit} positions "
                         f"(pass --truncate to {verb} its last {limit - 1})") from None
    except InputError as e:
        raise InputError(f"{p.where}{e}") from None
    if len(ids) < len(full):
        warn(f"warning: {p.where}{len(full)} tokens cut to {len(ids)} (</s> and the text's last {len(ids) - 1})")
    return ids


def score_records(lm: Any, tok: Any, items: list[Prompt], batch_size: int, s: dict[str, Any],
                  warn: Warn) -> list[dict[str, Any]]:
    """`score`'s record per non-blank item, in order: tokens, mean NLL and perplexity (None when the
    text predicts nothing); with `truncate`, an over-long text is scored on its end. Items are
    batched by length (less padding to compute), which changes no value."""
    from .scoring import length_groups, sequence_nll

    ids = [text_ids(lm, tok, p, s.get("truncate", False), warn) for p in items]
    out: list[dict[str, Any]] = [{} for _ in items]
    for group in length_groups(ids, batch_size):
        for i, (count, nll) in zip(group, sequence_nll(lm, [ids[i] for i in group]), strict=True):
            finite = math.isfinite(nll)
            out[i] = {**items[i].origin, "tokens": count, "nll": nll if finite else None,
                      "ppl": math.exp(nll) if finite else None}
    return out


def embed_vectors(lm: Any, tok: Any, items: list[Prompt], batch_size: int, s: dict[str, Any], warn: Warn) -> Any:
    """`embed`'s vector per non-blank item, rows in order (`pool`, `normalize`, `truncate`)."""
    from .errors import NothingToEmbed
    from .scoring import embed

    ids = [text_ids(lm, tok, p, s.get("truncate", False), warn, "embed") for p in items]
    try:
        return embed(lm, ids, s.get("pool", "mean"), normalize=s.get("normalize", False), batch_size=batch_size)
    except NothingToEmbed as e:
        raise InputError(f"{items[e.index].where}{e.reason}") from None


def embed_records(lm: Any, tok: Any, items: list[Prompt], batch_size: int, s: dict[str, Any],
                  warn: Warn) -> list[dict[str, Any]]:
    """`embed`'s JSONL record per non-blank item, in order: its line and id, and the vector (six
    decimals: float32 holds about seven digits)."""
    vectors = embed_vectors(lm, tok, items, batch_size, s, warn)
    return [{**p.origin, "embedding": [round(x, 6) for x in v.tolist()]} for p, v in zip(items, vectors, strict=True)]


# commands that read each text whole in one forward pass: a record per text, no decoding
FORWARD = {"score": score_records, "embed": embed_records}
# the JSONL field a command reads its text from (the first present); the tasks read several fields
TEXT_FIELDS = {"generate": ("prompt",), "score": ("text",), "embed": ("text", "prompt")}
