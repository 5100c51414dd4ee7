"""`biogpt serve`: an OpenAI-compatible completions and embeddings server over the batch engine
(the `serve` extra: FastAPI, uvicorn, sse-starlette; the core never imports this).

A thin layer: each request becomes a plan (plans.py) whose rows join the batch `batch.run` is
decoding in a worker thread at its next step (requests of any settings share it; one of another
`n` waits for the model), or texts pooled by `scoring.embed`. A generation holds the model only while it runs: a
streamed response's events wait in a buffer for its client, and a client that stops reading is
dropped once the buffer is full, so no client holds up another. A client that goes away, streamed
or not, cancels its generation at the next token (one log line). Limits (`Limits`) refuse what
would exhaust the server before any work. Every bad request is a 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import logging
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from .errors import BioGptError, InputError, NothingToEmbed, PromptTooLong
from .generation import GenerationOptions
from .inputs import Prompt
from .limits import DEFAULT_LIMITS, Limits
from .memory import check_rows_fit
from .metrics import CONTENT_TYPE, Metrics
from .plans import generate_plan, logprob_entries
from .scoring import embed
from .streaming import TextEvent
from .turns import Member, Turns

log = logging.getLogger("biogpt.serve")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with no choices and the request's usage


class CompletionRequest(BaseModel):
    """The fields of OpenAI's /v1/completions this server honours; any other field is refused."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)  # 0 only with echo: the prompt's log-probabilities alone
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    logprobs: int | None = Field(None, ge=0, le=5)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # fields this server does not implement, which clients send at the values that change nothing
    # (LangChain: both penalties at 0, with every request): taken there, refused otherwise
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        """The first field set to a value this server cannot honour."""
        inert = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "best_of": (1, self.n),
                 "suffix": ("",)}
        return next((f for f, values in inert.items() if getattr(self, f) not in (None, *values)), None)


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings. Token arrays are typed here only to be refused with a hint: clients
    send them as tiktoken's ids (LangChain's OpenAIEmbeddings does by default), not BioGPT's."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class Cancelled(Exception):
    """The client went away: the engine stops at the next event."""


class Collector:
    """A renderer for batch.run that hands each event to `sink` (in the run's thread)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def begin(self, prompts: Any) -> None:
        pass

    def add(self, prompt: Prompt) -> None:
        pass

    def event(self, ev: Any) -> None:
        self.sink(ev)


def create_app(lm: Any, tok: Any, name: str, api_key: str | None = None, origins: Sequence[str] = (),
               hosts: Sequence[str] | None = None, limits: Limits = DEFAULT_LIMITS) -> FastAPI:
    """The app; `origins`: web pages (scheme://host:port, or *) whose scripts may call it (CORS);
    `hosts`: the Host header names it answers (None: any), a guard against DNS rebinding for a
    server on a loopback address."""
    app = FastAPI(title="biogpt-cli", docs_url=None, redoc_url=None)
    turns = Turns(limits.waiting, limits.rows)
    metrics = Metrics(running=lambda: float(turns.lock.locked()), waiting=lambda: turns.waiting)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its location is a character offset, not a field
            return error(400, f"invalid JSON body: {first.get('ctx', {}).get('error', 'cannot parse it')}")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if loc[:1] in (["prompt"], ["stop"], ["input"]) and len(loc) > 1:  # `str | list[...]`: the first failed
            return error(400, f"{loc[0]}: a string or a list of strings", param=loc[0])
        where = ".".join(loc)
        return error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid JSON body",
                     param=where or None)

    @app.exception_handler(HTTPException)
    async def unknown(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405: OpenAI's shape too
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        host = host_name(request.headers.get("host", ""))
        if hosts is not None and host not in hosts:
            return error(403, f"Host {host!r} is not this server's name (a guard against DNS rebinding; serve "
                         "--allow-host NAME admits it)", "permission_error")
        given = request.headers.get("authorization", "").encode()
        if api_key and request.url.path != "/health" and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            return error(401, "a valid API key is needed: Authorization: Bearer KEY", "authentication_error")
        if request.method == "POST":
            size = request.headers.get("content-length")
            if size is None or not size.isdigit():
                return error(411, "a request body needs a Content-Length")
            if int(size) > limits.body_bytes:
                return error(413, f"a request body of {size} bytes is over this server's {limits.body_bytes} (serve "
                             "--max-body-bytes)")
        return await call_next(request)

    @app.middleware("http")
    async def access(request: Request, call_next: Any) -> Any:
        """Outside the guard: every answer is counted by status, and logged in one line (method,
        path, status, tokens, seconds to the response's start)."""
        start = time.perf_counter()
        response = await call_next(request)
        metrics.answers.labels(str(response.status_code)).inc()
        tokens = getattr(request.state, "tokens", None)
        log.info("%s %s %d%s %.2f s", request.method, request.url.path, response.status_code,
                 f" {tokens} tokens" if tokens is not None else "", time.perf_counter() - start)
        return response

    @app.get("/metrics")
    async def exposition() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    if origins:  # added last, so outermost: a browser's preflight is answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.post("/v1/chat/completions")
    async def chat() -> JSONResponse:  # what many clients try first
        return error(404, "POST /v1/chat/completions: BioGPT continues text and has no chat format: POST "
                     "/v1/completions with a prompt")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": name}

    served = {"id": name, "object": "model", "created": 0, "owned_by": "biogpt-cli"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served]}

    def not_served(model: str | None) -> JSONResponse | None:
        """A 404 for a request naming another model (None: it named none, or this one)."""
        if model in (None, name):
            return None
        return error(404, f"model {model!r} is not served here (this server serves {name!r})", param="model")

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Any:  # the client's models.retrieve()
        return not_served(model) or served

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        arrived = request.state.arrived = time.perf_counter()
        if refused := not_served(body.model):
            return refused
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or not all(p.strip() for p in prompts):
            return error(400, "prompt: every prompt needs some text", param="prompt")
        if field := body.unsupported():
            return error(400, f"{field}: not supported by this server (leave it out, or give the value that "
                         "changes nothing)", param=field)
        if body.stream_options is not None and not body.stream:
            return error(400, "stream_options: only with stream: true", param="stream_options")
        if body.echo and body.stream:
            return error(400, "echo: not with stream: true (echo scores the prompt: send it unstreamed)",
                         param="echo")
        if body.max_tokens == 0 and not body.echo:
            return error(400, "max_tokens: 0 generates nothing: give at least 1, or echo: true to score the prompt",
                         param="max_tokens")
        if len(prompts) * body.n > limits.rows:
            return error(400, f"prompt x n: {len(prompts)} x {body.n} rows, over this server's {limits.rows} a request "
                         "(serve --max-rows)", param="n")
        sample = body.temperature > 0
        # max_tokens 0 (echo alone) decodes nothing: the plan still checks the prompts
        settings = {"max_new_tokens": body.max_tokens or 1, "sample": sample, "temperature": body.temperature or None,
                    "top_p": body.top_p if sample else None, "top_k": 0 if sample else None,
                    "num_return_sequences": body.n if sample else 1, "logprobs": body.logprobs,
                    "seed": body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little"),
                    "stop": [body.stop] if isinstance(body.stop, str) else body.stop or []}
        try:
            plan = generate_plan(lm, tok, settings, lambda m: None)
            # each job carries its request's settings: requests of different settings share a batch
            jobs = [dataclasses.replace(plan.job(Prompt(i + 1, p)), opts=plan.opts, stop=plan.stop, seed=plan.seed)
                    for i, p in enumerate(prompts)]
            plan.opts.validate()
            check_rows_fit(lm.config, len(prompts) * body.n, max(len(j.ids) for j in jobs) + body.max_tokens,
                           what="prompt x n", dtype_bytes=next(lm.parameters()).element_size(),
                           device=next(lm.parameters()).device)
        except PromptTooLong as e:
            return error(400, e.hinted("shorten it or lower max_tokens"), param="prompt")
        except BioGptError as e:
            return error(400, str(e), param="prompt")
        if turns.full():
            return busy()
        copies = 1 if sample else body.n  # greedy: n identical choices, as OpenAI gives at temperature 0
        # a request joins the running run of its kind (rows per prompt: n when sampling) at its next step
        request.state.share = f"rows={plan.opts.num_return_sequences}"
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(stream(plan, jobs, copies, meta, request, usage), ping=15)
        if body.echo:
            echoed = [await asyncio.to_thread(echo, job.ids, body.logprobs) for job in jobs]
            if body.max_tokens == 0:
                choices = [dict(e, index=i * body.n + k, finish_reason="length") for i, e in enumerate(echoed)
                           for k in range(body.n)]
                return {**meta, "choices": choices, "usage": usage_of(jobs, 0)}
        choices: list[dict[str, Any]] = []
        cancelled = threading.Event()
        watcher = asyncio.ensure_future(watch(request, cancelled, meta["id"]))
        try:
            await generate(plan, jobs, lambda ev: ev.done and choices.append(choice(plan, ev, jobs)), cancelled,
                           arrived, request.state.share)
        except Cancelled:
            return error(499, "the client went away")
        finally:
            watcher.cancel()
        choices = [dict(c, index=(c["index"] * copies + k)) for c in sorted(choices, key=lambda c: c["index"])
                   for k in range(copies)]
        if body.echo:
            k = 1 if sample else body.n
            choices = [joined(echoed[c["index"] // k], c) for c in choices]
        usage = usage_of(jobs, sum(len(c.pop("_ids")) for c in choices))
        request.state.tokens = usage["total_tokens"]
        return {**meta, "choices": choices, "usage": usage}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Any:
        if refused := not_served(body.model):
            return refused
        texts = [body.input] if isinstance(body.input, str) else body.input
        if texts and not all(isinstance(t, str) for t in texts):
            return error(400, "input: token ids are another tokenizer's (tiktoken's, from most clients): send "
                         "the texts (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))", param="input")
        width = lm.config.hidden_size
        if body.dimensions not in (None, width):
            return error(400, f"dimensions: this model's embeddings have {width}", param="dimensions")
        if not texts:
            return error(400, "input: give some text", param="input")
        blank = next((i for i, t in enumerate(texts) if not t.strip()), None)
        if blank is not None:
            return error(400, f"input[{blank}]: every input needs some text", param="input")
        if turns.full():
            return busy()
        try:
            async with turns.turn():
                ids, vectors = await asyncio.to_thread(embed_texts, texts)
        except InputError as e:
            return error(400, str(e), param="input")
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(struct.pack(f"<{width}f", *v.tolist())).decode()
                 if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        used = sum(map(len, ids))
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": used, "total_tokens": used}}

    def embed_texts(texts: list[str]) -> tuple[list[list[int]], Any]:
        """Their ids and unit vectors, in the worker thread (tokenizing a thousand texts would
        stall the event loop); a text too long or left with no token is named by its index."""
        ids = [tok.encode(t) for t in texts]
        limit = lm.config.max_position_embeddings
        long = next((i for i, s in enumerate(ids) if len(s) > limit), None)
        if long is not None:
            raise InputError(f"input[{long}]: {len(ids[long])} tokens exceed the model's {limit} positions")
        try:
            return ids, embed(lm, ids, normalize=True)
        except NothingToEmbed as e:
            raise InputError(f"input[{e.index}]: {e.reason}") from None

    async def generate(plan: Any, jobs: list[Any], sink: Any, cancelled: threading.Event, arrived: float,
                       key: str) -> None:
        """A request's generation: its rows join the running run of its `key` at the next step, or
        start one once the model is free (a cancelled request never starts); its tokens and
        latencies go to the metrics."""
        first, new = [], [0]

        def counted(ev: Any) -> None:
            if ev.text and not first:
                first.append(time.perf_counter())
            new[0] += 0 if ev.done is None else len(ev.done.ids)
            sink(ev)

        for job in jobs:  # a request's rows end with its client
            job.gone = cancelled
        metrics.prompt_tokens.inc(sum(len(j.ids) for j in jobs))
        me = Member(jobs, counted, cancelled, key)
        await turns.take_turn(me, lambda key: asyncio.to_thread(run_kind, key))
        if me.error is not None:
            raise me.error
        if cancelled.is_set():
            raise Cancelled
        end = time.perf_counter()
        metrics.generated((first[0] if first else end) - arrived, end - arrived, new[0])

    def run_kind(key: str) -> None:
        """The run of `key` (in its own thread): batches over the requests of that key, until no
        request of the key waits."""
        while turns.waits(key):
            run_batch_of(key, int(key.split("=")[1]))

    def run_batch_of(key: str, k: int) -> None:
        """One batch fed by every request of `key` as it arrives (its rows join at the next step),
        each event routed to its request as if it ran alone; it ends when no row runs and nobody
        waits."""
        from .batch import run as run_batch

        owners: dict[int, tuple[Member, int]] = {}  # the batch's prompt index -> request, its own index
        left: dict[int, int] = {}  # the sequences each request taken still runs
        taken: list[Member] = []

        def source() -> Any:
            while True:
                m = turns.next_member(key)
                if m is None:
                    yield None  # nobody now: the batch goes on, and asks again at its next step
                    continue
                taken.append(m)
                left[id(m)] = len(m.jobs) * k
                for i, job in enumerate(m.jobs):
                    owners[len(owners)] = (m, i)
                    metrics.rows.inc(k)
                    yield job

        def route(ev: Any) -> None:
            m, local = owners[ev.row // k]
            done = None if ev.done is None else dataclasses.replace(ev.done, prompt_index=local)
            if not m.cancelled.is_set():
                try:
                    m.sink(TextEvent(local * k + ev.row % k, ev.text, done, ev.confidence))
                except Cancelled:  # dropped (a stream nobody reads): its rows end at the next step
                    m.cancelled.set()
            if done is not None:
                metrics.rows.dec()
                left[id(m)] -= 1
                if not left[id(m)]:
                    turns.finish(m)

        try:  # the jobs carry their own settings: these say only how many rows each prompt has
            run_batch(lm, tok, source(), GenerationOptions(num_return_sequences=k, do_sample=k > 1),
                      Collector(route), batch_size=max(1, limits.rows // k))
        except Exception as e:  # noqa: BLE001 -- each request of the batch reports it, and those waiting
            while (m := turns.next_member(key)) is not None:
                taken.append(m)
                left[id(m)] = 1
            for m in taken:
                if left[id(m)]:
                    m.error = e
                    turns.finish(m)
        finally:
            metrics.rows.set(0)

    def busy() -> JSONResponse:
        response = error(429, f"{turns.waiting} requests are waiting for the model already (serve --max-waiting): "
                         "try again shortly", "rate_limit_error")
        response.headers["Retry-After"] = "1"
        return response

    def echo(ids: list[int], k: int | None) -> dict[str, Any]:
        """A prompt as `echo` gives it: its text and, with logprobs, each token's log-probability
        given the ones before it (`biogpt score`'s values; the leading </s> has none, as OpenAI's
        first token)."""
        text = tok.decode(ids, skip_special_tokens=True)
        if k is None:
            return {"text": text, "logprobs": None}
        first = {"token": tok.convert_ids_to_tokens(ids[:1])[0], "logprob": None, "top": None}
        with torch.no_grad():
            entries = [first, *logprob_entries(lm, tok, ids[:1], ids[1:], k)]
        return {"text": text, "logprobs": legacy_logprobs(entries)}

    def choice(plan: Any, ev: Any, jobs: list[Any]) -> dict[str, Any]:
        done = ev.done
        record = plan.record(jobs[done.prompt_index].item, done)
        return {"text": done.text, "index": ev.row, "finish_reason": finish_reason(done),
                "logprobs": legacy_logprobs(record.get("logprobs")), "_ids": done.ids}

    async def stream(plan: Any, jobs: list[Any], copies: int, meta: dict[str, Any], request: Request,
                     usage: bool) -> AsyncIterator[dict[str, str]]:
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        dropped = False

        def sink(ev: Any) -> None:  # in the worker thread, where a finished choice's logprobs are computed
            nonlocal dropped
            if queue.qsize() >= limits.buffered:  # the client is not reading: drop it, free the model
                dropped = True
                log.info("%s: the client did not keep up with the stream; dropped", meta["id"])
                raise Cancelled
            logprobs = None if ev.done is None else choice(plan, ev, jobs)["logprobs"]
            loop.call_soon_threadsafe(queue.put_nowait, (ev, logprobs))

        task = asyncio.ensure_future(generate(plan, jobs, sink, cancelled, request.state.arrived,
                                              request.state.share))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            used = 0
            while (item := await queue.get()) is not None:
                ev, logprobs = item
                finish = None if ev.done is None else finish_reason(ev.done)
                used += 0 if ev.done is None else len(ev.done.ids) * copies
                for k in range(copies):
                    if ev.text or finish:  # a choice's logprobs, all its tokens', come with its last chunk
                        chunk = {"text": ev.text, "index": ev.row * copies + k, "logprobs": logprobs,
                                 "finish_reason": finish}
                        yield {"data": json.dumps({**meta, "choices": [chunk]})}
            failure = task.exception()
            if dropped:
                yield {"data": json.dumps({"error": {"message": "dropped: the client did not keep up with the "
                                                     "stream", "type": "server_error"}})}
            elif failure is not None and not isinstance(failure, Cancelled):
                yield {"data": json.dumps({"error": {"message": str(failure), "type": "server_error"}})}
            elif usage:
                yield {"data": json.dumps({**meta, "choices": [], "usage": usage_of(jobs, used)})}
            yield {"data": "[DONE]"}
        finally:
            if not task.done():
                log.info("%s: the client went away; its generation is cancelled", meta["id"])
            cancelled.set()  # a client that went away stops the engine at its next event
            await asyncio.wait([task])
            task.exception()  # retrieved: asyncio logs no traceback for it

    async def watch(request: Request, cancelled: threading.Event, rid: str) -> None:
        """Cancel a non-streamed request whose client hangs up: once its body is read, the next
        message the server gets for it is the disconnect."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("%s: the client went away; its generation is cancelled", rid)
        cancelled.set()

    return app


def host_name(header: str) -> str:
    """The name in a Host header: `[::1]:8000` is `::1`, `localhost:8000` is `localhost`."""
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def usage_of(jobs: list[Any], completion: int) -> dict[str, int]:
    """OpenAI's `usage` of a completions request: its prompts' tokens and the new ones."""
    prompt = sum(len(j.ids) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(done: Any) -> str:
    """OpenAI's reasons: "length", or "stop" for </s> and stop strings alike."""
    return "length" if done.finish_reason == "length" else "stop"


def legacy_logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Our per-token entries in the completions API's logprobs shape."""
    if entries is None:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else {t["token"]: t["logprob"] for t in e["top"]}
                             for e in entries],
            "text_offset": []}


def joined(echoed: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
    """A generated choice after its echoed prompt: texts and logprobs one after the other."""
    logprobs = None
    if echoed["logprobs"] is not None and choice["logprobs"] is not None:
        logprobs = {key: echoed["logprobs"][key] + choice["logprobs"][key] for key in echoed["logprobs"]}
    return {**choice, "text": echoed["text"] + choice["text"], "logprobs": logprobs}


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use or an address this machine
    lacks is one error line at once, not uvicorn's log line and exit 3 after the load."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(lm: Any, tok: Any, name: str, sock: socket.socket, api_key: str | None, origins: Sequence[str] = (),
          hosts: Sequence[str] | None = None, limits: Limits = DEFAULT_LIMITS, quiet: bool = False) -> None:
    import uvicorn

    if not quiet:  # one line per cancelled or dropped request
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(lm, tok, name, api_key, origins, hosts, limits)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])

