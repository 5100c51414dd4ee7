"""The paper's tasks over HTTP, beside the completions route: `POST /v1/qa`, `/v1/extract` and
`/v1/classify` answer the records `biogpt qa|extract|classify` write for the same documents (or
PubTator / BioC when asked), their rows decoded in the engine's shared batch.

A request is JSON (`protocol.TaskRequest`: documents as the commands read JSONL records) or a
literature file as the body (PubMed XML, BioC XML or JSON, PubTator; the format told by its
content, as `--input-format auto` tells it), its options then in the query string.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from .errors import BioGptError, InputError, PromptTooLong
from .inputs import Prompt, read_records
from .protocol import TaskRequest
from .server import busy, error, usage_of, watch
from .serving import Cancelled, Engine, Work
from .tasks import own_task
from .writers import DocumentWriter

COMMANDS = ("qa", "extract", "classify")
MEDIA = {"pubtator": "text/plain; charset=utf-8", "bioc-xml": "application/xml", "bioc-json": "application/json"}


def add_task_routes(app: FastAPI, engine: Engine, name: str, task: str | None) -> None:
    """The three routes. `task`: serve --task, for a checkpoint whose config does not name its own."""
    for command in COMMANDS:
        app.post(f"/v1/{command}")(_route(command, engine, name, task))


def _route(command: str, engine: Engine, name: str, default: str | None) -> Any:
    async def answer(request: Request) -> Any:
        arrived = time.perf_counter()
        try:
            body, raw = await _body(request)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            return error(400, f"{where}: {first.get('msg')}" if where else first.get("msg"), param=where)
        except ValueError as e:
            return error(400, str(e))
        if body.model not in (None, name):
            return error(404, f"model {body.model!r} is not served here (this server serves {name!r})",
                         param="model")
        s = {"task": body.task or own_task(command, default), "model": name, "max_new_tokens": body.max_tokens,
             "constrained": body.constrained, "relations": body.relations}
        try:
            prompts = await asyncio.to_thread(_documents, body, raw)
            work = await asyncio.to_thread(engine.prepare_task, command, prompts, s)
        except PromptTooLong as e:
            return error(400, e.hinted("shorten it or lower max_tokens"), param="documents")
        except BioGptError as e:
            return error(400, _named(str(e), raw is None), param="documents")
        if engine.turns.full():
            return busy(engine)
        return await _answered(command, engine, work, body, request, arrived, name)
    answer.__name__ = command
    return answer


async def _body(request: Request) -> tuple[TaskRequest, bytes | None]:
    """The request's settings, and the literature file it carries (None: its documents are in its
    JSON). A file's settings are in the query string (`?constrained=true&format=pubtator`); a BioC
    JSON collection is told from a request by its own fields (`source`, `date`, `key`)."""
    raw = await request.body()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("", "application/json"):
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"invalid JSON body: {e}") from None
        if not (isinstance(data, dict) and {"source", "date", "key"} & set(data)):
            body = TaskRequest.model_validate(data)
            if not body.documents:
                raise ValueError("documents: give at least one document")
            return body, None
    query = dict(request.query_params)
    if "relations" in query:
        query["relations"] = [r.strip() for r in query["relations"].split(",")]
    return TaskRequest.model_validate(query), raw


def _documents(body: TaskRequest, raw: bytes | None) -> list[Prompt]:
    """The documents as the task commands read them: JSON ones as JSONL records (BioC JSON
    documents as a collection), a literature file as `--input-format auto` reads it."""
    if raw is None and any("passages" in d for d in body.documents or ()):
        raw = json.dumps({"source": "request", "documents": body.documents}).encode()
    if raw is None:
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in body.documents or ()).encode()
        return list(read_records(io.BytesIO(lines), "documents", "jsonl", text_field=None))
    prompts = list(read_records(io.BytesIO(raw), "documents.json" if raw.lstrip()[:1] == b"{" else "request body",
                                "auto", text_field=None))
    if not prompts:
        raise InputError("request body: no documents in it")
    return prompts


def _named(message: str, documents: bool) -> str:
    """A record's error in the request's terms: JSON document i is `documents[i]`, not `line i+1`;
    a file's records are the request body's."""
    if documents:
        return re.sub(r"^(documents: )?line (\d+): ", lambda m: f"documents[{int(m[2]) - 1}]: ", message)
    return message if message.startswith("request body") else f"request body: {message}"


async def _answered(command: str, engine: Engine, work: Work, body: TaskRequest, request: Request,
                    arrived: float, name: str) -> Any:
    """Decode the request's rows with the others', then its records, in the documents' order."""
    cancelled = threading.Event()
    watcher = asyncio.ensure_future(watch(request, cancelled, f"{command} request"))
    try:
        done = await engine.finished(work, cancelled, arrived)
    except Cancelled:
        return error(499, "the client went away")
    except BioGptError as e:
        return error(400, str(e), param="documents")
    finally:
        watcher.cancel()
    items = [(job.item, d) for job, d in zip(work.jobs, done, strict=True)]
    usage = usage_of(work.jobs, sum(len(d.ids) for d in done))
    request.state.tokens = usage["total_tokens"]
    if body.format != "json":
        writer = DocumentWriter(body.format, work.plan.identity["task"], work.plan.record)
        text = await asyncio.to_thread(writer.whole, items)
        return Response(text, media_type=MEDIA[body.format])
    records = await asyncio.to_thread(lambda: [work.plan.record(p, d) for p, d in items])
    return JSONResponse({"object": "list", "model": name, "task": work.plan.identity["task"], "data": records,
                         "usage": usage})
