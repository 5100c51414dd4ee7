"""`biogpt mcp`: the model as tools for assistants, over the Model Context Protocol (the `mcp`
extra: the official SDK; the core never imports this).

Tools run on the server's engine (serving.py), so their rows share its batch and its limits as
completions do: `generate` and `score` on any model, and on a task checkpoint the task commands'
records (`answer_question`, `extract_relations` with the source offsets of every entity,
`classify_document`). Over stdio for a desktop assistant, or streamable HTTP behind the same API
key and Host checks as `biogpt serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import ValidationError
from typing_extensions import NotRequired, TypedDict  # pydantic's schemas need it before Python 3.12

from .errors import BioGptError
from .inputs import Prompt
from .limits import DEFAULT_LIMITS, Limits
from .protocol import CompletionRequest, settings
from .scoring import sequence_nll
from .serving import Engine, Work
from .tasks import answered, own_task

INSTRUCTIONS = ("BioGPT, a language model trained on PubMed abstracts, running locally. It continues "
                "biomedical text and scores it; a fine-tuned checkpoint also answers the paper's tasks, its "
                "entities copied from the document with their character offsets.")


class Generated(TypedDict):
    text: str  # the continuation, without the prompt
    finish_reason: str  # "stop" (</s> or a stop string) or "length"
    tokens: int


class Scored(TypedDict):
    tokens: int
    mean_nll: float | None  # nats a token (None for a text of one token: nothing is predicted)
    perplexity: float | None


class Relation(TypedDict):
    head: str
    relation: str
    tail: str
    head_spans: NotRequired[list[list[int]]]  # [start, end) of each place the entity is copied from
    tail_spans: NotRequired[list[list[int]]]
    grounded: NotRequired[bool]  # false: an entity the document does not contain (unconstrained only)


class Relations(TypedDict):
    relations: list[Relation] | None  # None: the answer did not parse
    text: str  # the model's answer as written


class Answer(TypedDict):
    answer: str | None  # yes, no or maybe
    text: str


class Labels(TypedDict):
    labels: list[str] | None  # Hallmarks of Cancer
    text: str


def build(lm: Any, tok: Any, name: str, task: str | None = None,
          limits: Limits = DEFAULT_LIMITS) -> tuple[MCPServer, Engine]:
    """The tools for `lm` (served as `name`), and the engine they run on: the task tools only for
    what a task checkpoint answers (`task`: its task when its config does not name it)."""
    engine = Engine(lm, tok, limits)
    server = MCPServer(name="biogpt", instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool()
    async def generate(prompt: str, max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                       stop: list[str] | None = None) -> Generated:
        """Continue biomedical text (BioGPT is not a chat model: give the start of a sentence, e.g.
        "Aspirin inhibits"). temperature 0 is greedy, as `biogpt generate`."""
        body = _request(CompletionRequest, prompt=prompt, max_tokens=max_tokens, temperature=temperature, seed=seed,
                        stop=stop)
        work = await _ready(engine.prepare, [prompt], settings(body), 1)
        done = (await _decoded(engine, work))[0]
        return {"text": done.text, "finish_reason": "length" if done.finish_reason == "length" else "stop",
                "tokens": len(done.ids)}

    @server.tool()
    async def score(text: str) -> Scored:
        """How likely the model finds a text: its tokens, mean negative log-likelihood and perplexity."""
        ids = tok.encode(text)
        if len(ids) > lm.config.max_position_embeddings:
            raise ToolError(f"text: {len(ids)} tokens exceed the model's {lm.config.max_position_embeddings}")
        async with engine.turns.turn():
            n, nll = (await asyncio.to_thread(sequence_nll, lm, [ids]))[0]
        finite = not math.isnan(nll)
        return {"tokens": n, "mean_nll": nll if finite else None, "perplexity": math.exp(nll) if finite else None}

    tools = {"qa": _answer_question, "extract": _extract_relations, "classify": _classify}
    for t in answered(lm.config, task, name):
        server.tool()(tools[t.command](engine, name, task))
    return server, engine


def _answer_question(engine: Engine, name: str, task: str | None) -> Any:
    async def answer_question(question: str, context: str, constrained: bool = True) -> Answer:
        """PubMedQA: does the abstract `context` answer `question` yes, no or maybe? `constrained`
        keeps the answer to those three (`biogpt qa --constrained`)."""
        record = await _task(engine, "qa", {"question": question, "context": context}, constrained, name, task)
        return {"answer": record["answer"], "text": record["text"]}
    return answer_question


def _extract_relations(engine: Engine, name: str, task: str | None) -> Any:
    async def extract_relations(abstract: str, title: str = "", constrained: bool = True) -> Relations:
        """Relations (head, relation, tail) the checkpoint's task extracts from a PubMed abstract
        (BC5CDR: chemical-disease; DDI: drug-drug; KD-DTI: drug-target). `constrained` copies each
        entity from the text, with the [start, end) offsets of each place it occurs in
        title + " " + abstract (`biogpt extract --constrained`)."""
        record = await _task(engine, "extract", {"title": title, "abstract": abstract}, constrained, name, task)
        return {"relations": record["relations"], "text": record["text"]}
    return extract_relations


def _classify(engine: Engine, name: str, task: str | None) -> Any:
    async def classify_document(text: str, constrained: bool = True) -> Labels:
        """The Hallmarks of Cancer a text shows (HoC); `constrained` keeps to the ten labels."""
        record = await _task(engine, "classify", {"text": text}, constrained, name, task)
        return {"labels": record["labels"], "text": record["text"]}
    return classify_document


async def _task(engine: Engine, command: str, fields: dict[str, Any], constrained: bool, name: str,
                task: str | None) -> dict[str, Any]:
    """One document through the task command's plan: its record."""
    s = {"task": own_task(command, task), "model": name, "max_new_tokens": 0, "constrained": constrained,
         "relations": None}
    prompt = Prompt(0, "", None, fields)
    work = await _ready(engine.prepare_task, command, [prompt], s)
    done = (await _decoded(engine, work))[0]
    return await asyncio.to_thread(work.plan.record, prompt, done)


def _request(model: type, **fields: Any) -> Any:
    try:
        return model(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:  # the field, and what is wrong with it
        first = e.errors()[0]
        raise ToolError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


async def _ready(prepare: Any, *args: Any) -> Work:
    """A request made ready off the event loop; what the model cannot take is a tool error naming it."""
    try:
        return await asyncio.to_thread(prepare, *args)
    except BioGptError as e:
        raise ToolError(str(e)) from None


async def _decoded(engine: Engine, work: Work) -> list[Any]:
    """Each prompt's finished completion, its rows decoded in the engine's shared batch."""
    try:
        return await engine.finished(work, threading.Event(), time.perf_counter())
    except BioGptError as e:
        raise ToolError(str(e)) from None


def http_app(server: MCPServer, engine: Engine, api_key: str | None, hosts: Sequence[str] | None,
             limits: Limits) -> Any:
    """Streamable HTTP at /mcp, behind `biogpt serve`'s API key, Host and body-size checks (which
    stand in for the SDK's own Host check)."""
    from fastapi import FastAPI
    from mcp.server.transport_security import TransportSecuritySettings

    from .server import guard

    inner = server.streamable_http_app(streamable_http_path="/mcp", transport_security=TransportSecuritySettings(
        enable_dns_rebinding_protection=False))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:  # a mounted app's own start is not run for it
        async with inner.router.lifespan_context(inner):
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    guard(app, engine, api_key, hosts, limits)
    app.mount("/", inner)
    return app
