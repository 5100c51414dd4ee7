"""`biogpt serve`: an OpenAI-compatible completions and embeddings server (the `serve` extra:
FastAPI, uvicorn, sse-starlette; the core never imports this).

A thin layer over one engine (serving.py): requests are checked here, made ready in a worker
thread, and their rows join the batch the engine is decoding at its next step; events are
rendered as OpenAI's choices and server-sent chunks. A streamed response's events wait in a
buffer for its client, and a client that stops reading is dropped once the buffer is full, so no
client holds up another. A client that goes away, streamed or not, cancels its generation at the
next token (one log line). Limits (`Limits`) refuse what would exhaust the server before any
work. Every bad request is a 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from .errors import BioGptError, InputError, PromptTooLong
from .limits import DEFAULT_LIMITS, Limits
from .metrics import CONTENT_TYPE
from .protocol import (
    OPENAI_FIELDS,
    VLLM_FIELDS,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    in_request_terms,
    problem,
    settings,
)
from .serving import Cancelled, Engine, Work
from .streaming import TextEvent
from .tasks import answered

log = logging.getLogger("biogpt.serve")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def refusal(body: CompletionRequest, limits: Limits) -> JSONResponse | None:
    """The first thing wrong with a completions request that is seen without the model."""
    found = problem(body, limits.rows)
    return error(400, found[1], param=found[0]) if found else None


def create_app(lm: Any, tok: Any, names: str | Sequence[str], api_key: str | None = None, origins: Sequence[str] = (),
               hosts: Sequence[str] | None = None, limits: Limits = DEFAULT_LIMITS, fleet: Any = None,
               task: str | None = None, webui: bool = True) -> FastAPI:
    """The app, serving the model under `names` (the first is the one its answers give); `origins`:
    web pages (scheme://host:port, or *) whose scripts may call it (CORS); `hosts`: the Host
    header names it answers (None: any), a guard against DNS rebinding for a server on a
    loopback address; `fleet`: the replicas this app is one of (fleet.py), whose metrics and
    health /metrics and /health give; `task`: the task the task routes run (task_api.py) on a
    checkpoint whose config does not name its own; `webui`: the page at / (webui/)."""
    from .task_api import add_task_routes  # it answers with this module's helpers

    names = [names] if isinstance(names, str) else list(names)
    app = FastAPI(title="biogpt-cli", docs_url=None, redoc_url=None)
    engine = app.state.engine = Engine(lm, tok, limits)
    guard(app, engine, api_key, hosts, limits)
    if origins:  # added last, so outermost: a browser's preflight is answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    honoured = {"openai": list(OPENAI_FIELDS), "vllm": list(VLLM_FIELDS)}
    tasks = [{"command": t.command, "task": t.name} for t in answered(lm.config, task, names[0])]
    served = [{"id": n, "object": "model", "created": 0, "owned_by": "biogpt-cli", "root": names[0],
               "max_model_len": lm.config.max_position_embeddings, "completion_fields": honoured, "tasks": tasks}
              for n in names]
    name = names[0]

    def not_served(model: str | None) -> JSONResponse | None:
        """A 404 for a request naming another model (None: it named none, or one of these)."""
        if model is None or model in names:
            return None
        return error(404, f"model {model!r} is not served here (this server serves "
                     f"{', '.join(map(repr, names))})", param="model")

    @app.get("/metrics")
    async def exposition() -> Response:
        return Response(await fleet.metrics() if fleet else engine.metrics.text(), media_type=CONTENT_TYPE)

    @app.post("/v1/chat/completions")
    async def chat() -> JSONResponse:  # what many clients try first
        return error(404, "POST /v1/chat/completions: BioGPT continues text and has no chat format: POST "
                     "/v1/completions with a prompt")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, **(await fleet.health() if fleet else {})}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": served}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> Any:  # the client's models.retrieve()
        return not_served(model) or served[names.index(model)]

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Any:  # vLLM's
        if refused := not_served(body.model):
            return refused
        # off the event loop: a long text would stall every other client
        ids = await asyncio.to_thread(tok.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": lm.config.max_position_embeddings, "tokens": ids,
                "token_strs": tok.convert_ids_to_tokens(ids)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Any:  # vLLM's
        if refused := not_served(body.model):
            return refused
        bad = next((t for t in body.tokens if not 0 <= t < lm.config.vocab_size), None)
        if bad is not None:
            return error(400, f"tokens: {bad} is not a token id (0..{lm.config.vocab_size - 1})", param="tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, body.tokens, skip_special_tokens=True)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        request.state.arrived = time.perf_counter()
        if refused := not_served(body.model) or refusal(body, limits):
            return refused
        try:
            s = settings(body)
        except ValueError as e:
            return error(400, str(e), param=str(e).split(":")[0])
        try:
            work = await asyncio.to_thread(engine.prepare, body.prompts, s, body.n)
        except PromptTooLong as e:
            return error(400, e.hinted("shorten it or lower max_tokens"), param="prompt")
        except BioGptError as e:
            param, message = in_request_terms(str(e))
            return error(400, message, param=param)
        if engine.turns.full():
            return busy(engine)
        meta = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            request.state.streamed = True
            return EventSourceResponse(stream(engine, work, meta, request, usage), ping=15)
        return await complete(engine, work, body, meta, request)

    add_task_routes(app, engine, name, task)
    if webui:
        page = Path(__file__).parent / "webui"
        app.get("/", include_in_schema=False)(lambda: FileResponse(page / "index.html"))
        app.mount("/webui", StaticFiles(directory=page), name="webui")

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Any:
        if refused := not_served(body.model) or embedding_refusal(body, lm.config.hidden_size):
            return refused
        texts = [body.input] if isinstance(body.input, str) else body.input
        if engine.turns.full():
            return busy(engine)
        try:
            async with engine.turns.turn():
                ids, vectors = await asyncio.to_thread(engine.embed_texts, texts)
        except InputError as e:
            return error(400, str(e), param="input")
        width = lm.config.hidden_size
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(struct.pack(f"<{width}f", *v.tolist())).decode()
                 if body.encoding_format == "base64" else v.tolist()} for i, v in enumerate(vectors)]
        used = sum(map(len, ids))
        return {"object": "list", "data": data, "model": body.model or name,
                "usage": {"prompt_tokens": used, "total_tokens": used}}

    return app


def guard(app: FastAPI, engine: Engine, api_key: str | None, hosts: Sequence[str] | None, limits: Limits) -> None:
    """Errors in OpenAI's shape, the Host, key and body-size checks, and the access log."""
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its location is a character offset, not a field
            return error(400, f"invalid JSON body: {first.get('ctx', {}).get('error', 'cannot parse it')}")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "extra_forbidden":
            return error(400, f"{'.'.join(loc)}: not supported by this server (leave it out; GET /v1/models lists "
                         "the fields it honours)", param=".".join(loc))
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
        if api_key and not public(request) and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
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
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 -- one line in the log, OpenAI's shape to the client
            log.error("%s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
            response = error(500, f"the server failed on this request ({type(e).__name__}); it goes on serving "
                             "others", "server_error")
        if not getattr(request.state, "streamed", False):  # a stream counts itself when it ends
            engine.metrics.answers.labels(str(response.status_code)).inc()
        tokens = getattr(request.state, "tokens", None)
        log.info("%s %s %d%s %.2f s", request.method, request.url.path, response.status_code,
                 f" {tokens} tokens" if tokens is not None else "", time.perf_counter() - start)
        return response


def public(request: Request) -> bool:
    """What anyone may read without the key: /health, and the page (which asks for the key)."""
    path = request.url.path
    return path == "/health" or (request.method == "GET" and (path == "/" or path.startswith("/webui/")))


def embedding_refusal(body: EmbeddingRequest, width: int) -> JSONResponse | None:
    """The first thing wrong with an embeddings request that is seen without the model."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if texts and not all(isinstance(t, str) for t in texts):
        return error(400, "input: token ids are another tokenizer's (tiktoken's, from most clients): send "
                     "the texts (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))", param="input")
    if body.dimensions not in (None, width):
        return error(400, f"dimensions: this model's embeddings have {width}", param="dimensions")
    if not texts:
        return error(400, "input: give some text", param="input")
    blank = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if blank is not None:
        return error(400, f"input[{blank}]: every input needs some text", param="input")
    return None


def busy(engine: Engine) -> JSONResponse:
    response = error(429, f"{engine.turns.waiting} requests are waiting for the model already (serve "
                     "--max-waiting): try again shortly", "rate_limit_error")
    response.headers["Retry-After"] = "1"
    return response


async def complete(engine: Engine, work: Work, body: CompletionRequest, meta: dict[str, Any],
                   request: Request) -> Any:
    """An unstreamed completion: its choices (after the echoed prompts, with echo) and usage."""
    if body.echo:
        async with engine.turns.turn():  # in the model's turns, counted among those waiting
            echoed = [await asyncio.to_thread(engine.echo, job.ids, body.logprobs) for job in work.jobs]
        if body.max_tokens == 0:
            choices = [dict(e, index=i * body.n + k, finish_reason="length") for i, e in enumerate(echoed)
                       for k in range(body.n)]
            return {**meta, "choices": choices, "usage": usage_of(work.jobs, 0)}
    choices: list[dict[str, Any]] = []
    cancelled = threading.Event()
    watcher = asyncio.ensure_future(watch(request, cancelled, meta["id"]))
    try:
        await engine.generate(work, lambda ev: ev.done and choices.append(engine.choice(work, ev)), cancelled,
                              request.state.arrived)
    except Cancelled:
        return error(499, "the client went away")
    except BioGptError as e:
        return error(400, str(e), param="prompt")
    except Exception as e:  # noqa: BLE001 -- the batch it joined failed (logged once, there)
        return error(500, f"the batch this request joined failed ({type(e).__name__}: {e})", "server_error")
    finally:
        watcher.cancel()
    choices = await asyncio.to_thread(lambda: [engine.named(c) for c in choices])  # logprobs' text, off the loop
    copies = work.copies
    choices = [dict(c, index=(c["index"] * copies + k)) for c in sorted(choices, key=lambda c: c["index"])
               for k in range(copies)]
    choices = work.best(choices)
    if body.logprobs is None:  # asked for only to rank best_of's samples
        choices = [dict(c, logprobs=None) for c in choices]
    if body.echo:
        choices = [joined(echoed[c["index"] // body.n], c) for c in choices]  # n choices a prompt
    usage = usage_of(work.jobs, sum(len(c.pop("_ids")) for c in choices))
    request.state.tokens = usage["total_tokens"]
    return {**meta, "choices": choices, "usage": usage}


async def stream(engine: Engine, work: Work, meta: dict[str, Any], request: Request,
                 usage: bool) -> AsyncIterator[dict[str, str]]:
    """A streamed completion's server-sent events; a client that does not keep up is dropped once
    its buffer is full, and one that goes away cancels its rows."""
    loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    dropped, buffered = False, engine.limits.buffered

    def sink(ev: TextEvent) -> None:  # in the decoding thread: a finished choice's record, its text named later
        nonlocal dropped
        if queue.qsize() >= buffered:  # the client is not reading: drop it, free the model
            dropped = True
            log.info("%s: the client did not keep up with the stream; dropped", meta["id"])
            raise Cancelled
        loop.call_soon_threadsafe(queue.put_nowait, (ev, None if ev.done is None else engine.choice(work, ev)))

    task = asyncio.ensure_future(engine.generate(work, sink, cancelled, request.state.arrived))
    task.add_done_callback(lambda t: t.cancelled() or t.exception() or True)  # retrieved, whoever waits for it
    task.add_done_callback(lambda _: queue.put_nowait(None))
    status, used, copies = "499", 0, work.copies  # 499 until the stream ends: the client went away
    try:
        while (item := await queue.get()) is not None:
            ev, choice = item
            logprobs = None if choice is None else (await asyncio.to_thread(engine.named, choice))["logprobs"]
            finish = None if ev.done is None else "length" if ev.done.finish_reason == "length" else "stop"
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
            status = "500"
            yield {"data": json.dumps({"error": {"message": str(failure), "type": "server_error"}})}
        else:
            status = "200"
            if usage:
                yield {"data": json.dumps({**meta, "choices": [], "usage": usage_of(work.jobs, used)})}
        yield {"data": "[DONE]"}
    finally:
        engine.metrics.answers.labels(status).inc()  # a stream's status is known at its end
        log.info("%s: stream ended %s, %d tokens", meta["id"], status, usage_of(work.jobs, used)["total_tokens"])
        if not task.done():
            log.info("%s: the client went away; its generation is cancelled", meta["id"])
        cancelled.set()  # a client that went away stops the engine at its next event
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([task])


async def watch(request: Request, cancelled: threading.Event, rid: str) -> None:
    """Cancel a non-streamed request whose client hangs up: once its body is read, the next
    message the server gets for it is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    log.info("%s: the client went away; its generation is cancelled", rid)
    cancelled.set()


def host_name(header: str) -> str:
    """The name in a Host header: `[::1]:8000` is `::1`, `localhost:8000` is `localhost`."""
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def usage_of(jobs: list[Any], completion: int) -> dict[str, int]:
    """OpenAI's `usage` of a completions request: its prompts' tokens and the new ones."""
    prompt = sum(len(j.ids) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def joined(echoed: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
    """A generated choice after its echoed prompt: texts and logprobs one after the other."""
    logprobs = None
    if echoed["logprobs"] is not None and choice["logprobs"] is not None:
        shifted = {**choice["logprobs"], "text_offset": [len(echoed["text"]) + o for o in
                                                         choice["logprobs"]["text_offset"]]}
        logprobs = {key: echoed["logprobs"][key] + shifted[key] for key in echoed["logprobs"]}
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


def serve(lm: Any, tok: Any, names: Sequence[str], sock: socket.socket, api_key: str | None,
          origins: Sequence[str] = (), hosts: Sequence[str] | None = None, limits: Limits = DEFAULT_LIMITS,
          quiet: bool = False, task: str | None = None, webui: bool = True) -> None:
    import uvicorn

    if not quiet:  # one line per cancelled or dropped request
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    app = create_app(lm, tok, names, api_key, origins, hosts, limits, task=task, webui=webui)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])

