"""`biogpt serve`: a local OpenAI-compatible completions and embeddings server (server.py; the `serve`
extra); `biogpt mcp`: the model as tools for assistants (assistants.py; the `mcp` extra)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

import typer

from ..errors import missing_extra
from ..hub import DEFAULT_MODEL
from ..limits import Limits
from ..memory import batch_rows
from .common import (
    DebugOpt,
    DeviceOpt,
    DraftTokensOpt,
    DTypeOpt,
    ModelOpt,
    QuantizeOpt,
    RevisionOpt,
    SpeculateOpt,
    UsageError,
    check_decode_memory,
    check_precision,
    command,
    device_or_usage_error,
    load,
    stderr,
)

HostOpt = Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")]
PortOpt = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]
ApiKeyOpt = Annotated[str | None, typer.Option(envvar="BIOGPT_API_KEY", help="Require Bearer KEY on requests.")]
AllowHostOpt = Annotated[list[str] | None, typer.Option(
    help="On a loopback address, a Host name besides localhost to answer (repeatable; * for any: behind a reverse "
         "proxy).")]
TaskOpt = Annotated[Literal["bc5cdr", "ddi", "kd-dti", "pubmedqa", "hoc"] | None, typer.Option(
    help="The task a task checkpoint answers when its config does not name it.")]


@command
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    api_key: ApiKeyOpt = None,
    allow_origin: Annotated[list[str] | None, typer.Option(
        help="A web page's origin (http://host:port, or *) whose scripts may call this server (repeatable).")]
    = None,
    allow_host: AllowHostOpt = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body.")] = Limits.body_bytes,
    max_rows: Annotated[int, typer.Option(min=1, help="Prompts x n of one request, at most.")] = Limits.rows,
    max_waiting: Annotated[int, typer.Option(min=0, help="Requests waiting for the model; more get a 429.")]
    = Limits.waiting,
    served_model_name: Annotated[list[str] | None, typer.Option(
        help="The name requests give the model (repeatable: aliases; default: -m as given).")] = None,
    replicas: Annotated[int | None, typer.Option(min=1, help="Run N copies on Ray Serve behind this address (the "
                                                 "ray extra).")] = None,
    cpus_per_replica: Annotated[float, typer.Option(min=0.1, help="With --replicas: CPUs each.")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(min=0, help="With --replicas: GPUs each.")] = 0.0,
    address: Annotated[str | None, typer.Option(help="With --replicas: a Ray cluster's address (default: a "
                                                "local Ray, or $RAY_ADDRESS).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No access log, nor notes of cancelled requests.")]
    = False,
    task: TaskOpt = None,
    webui: Annotated[bool, typer.Option(help="The page at / (a playground; a task checkpoint's task).")] = True,
    speculate: SpeculateOpt = "auto",
    draft_tokens: DraftTokensOpt = 8,
    dtype: DTypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    debug: DebugOpt = False,
) -> None:
    """An OpenAI-compatible HTTP server.

    Serve /v1/completions, /v1/embeddings, /v1/models and /health, OpenAI-style, for any OpenAI client;
    on a task checkpoint also /v1/qa, /v1/extract and /v1/classify (docs/serving.md).
    As OpenAI's API does, a request samples at temperature 1 unless it says otherwise (`biogpt
    generate` is greedy): send temperature 0 for generate's text. A request's "model" must name
    the served model (-m, or a --served-model-name), or be left out."""
    try:
        from ..server import listen
        from ..server import serve as run_server
    except ImportError:
        raise missing_extra("biogpt serve", "serve") from None
    torch_device = device_or_usage_error(device)
    check_precision(quantize, dtype, torch_device)
    if replicas is None and (address or gpus_per_replica or cpus_per_replica != 1.0):
        raise UsageError("--address, --cpus-per-replica and --gpus-per-replica go with --replicas N")
    sock = listen(host, port)
    hosts = _hosts(host, port, api_key, allow_host)
    limits = Limits(body_bytes=max_body_bytes, rows=max_rows, waiting=max_waiting, speculate=speculate,
                    draft_tokens=draft_tokens)
    names = served_model_name or [model]
    if replicas is not None:  # each replica loads the model and checks its batch fits, where it runs
        sock.close()  # Ray Serve's proxy takes the address: it was free a moment ago
        weights = {"path_or_id": model, "revision": revision, "dtype": dtype, "quantize": quantize,
                   "device": "cuda" if gpus_per_replica else device}
        spec = {"load": weights, "names": names, "api_key": api_key, "origins": list(allow_origin or ()),
                "hosts": hosts, "limits": limits, "threads": max(1, int(cpus_per_replica)), "task": task,
                "webui": webui}
        return _serve_replicas(spec, replicas, cpus_per_replica, gpus_per_replica, host, port, address)
    # the batch that requests share may hold --max-rows rows, each at the model's full length
    check_decode_memory(model, revision, batch_rows(max_rows, torch_device), 1 << 30, "serve --max-rows", dtype,
                        torch_device)
    lm, tok = load(model, revision, dtype, torch_device, quantize)
    stderr.print(f"serving {model} on http://{host}:{port}/v1 (Ctrl-C stops)")
    run_server(lm, tok, names, sock, api_key, allow_origin or (), hosts, limits, quiet, task, webui)


def _serve_replicas(spec: dict, replicas: int, cpus: float, gpus: float, host: str, port: int,
                    address: str | None) -> None:
    """The deployment on Ray Serve (fleet.py), until Ctrl-C or SIGTERM: either stops the fleet, and a
    Ray this command started with it (its agents included)."""
    import time

    from .. import fleet

    fleet.ray_serve()  # the extra is there, or one line saying how to add it
    stop = fleet.start(spec, replicas, cpus, gpus, host, port, address)
    try:
        stderr.print(f"serving {spec['load']['path_or_id']} on http://{host}:{port}/v1 from {replicas} Ray Serve "
                     "replicas (Ctrl-C stops)")
        while True:
            time.sleep(1)
    finally:
        stop()


@command
def mcp(
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    task: TaskOpt = None,
    http: Annotated[bool, typer.Option("--http", help="Streamable HTTP at /mcp instead of stdio.")] = False,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    api_key: ApiKeyOpt = None,
    allow_host: AllowHostOpt = None,
    speculate: SpeculateOpt = "auto",
    draft_tokens: DraftTokensOpt = 8,
    dtype: DTypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    debug: DebugOpt = False,
) -> None:
    """Tools for assistants, over the Model Context Protocol.

    generate and score; on a task checkpoint answer_question, extract_relations (with offsets) or
    classify_document. Over stdio (an assistant starts it), or with --http at /mcp behind the same
    key and Host checks as serve (docs/serving.md)."""
    try:
        from ..assistants import build, http_app
    except ImportError:
        raise missing_extra("biogpt mcp", "mcp") from None
    torch_device = device_or_usage_error(device)
    check_precision(quantize, dtype, torch_device)
    if not http and (allow_host or host != "127.0.0.1" or port != 8000):
        raise UsageError("--host, --port and --allow-host go with --http (stdio has no network)")
    sock, hosts = None, None
    if http:
        from ..server import listen

        sock, hosts = listen(host, port), _hosts(host, port, api_key, allow_host)
    lm, tok = load(model, revision, dtype, torch_device, quantize)
    limits = Limits(speculate=speculate, draft_tokens=draft_tokens)
    server, engine = build(lm, tok, model, task, limits)
    if sock is None:
        server.run("stdio")
        return
    import uvicorn

    stderr.print(f"MCP tools for {model} on http://{host}:{port}/mcp (Ctrl-C stops)")
    uvicorn.Server(uvicorn.Config(http_app(server, engine, api_key, hosts, limits), log_level="warning")).run(
        sockets=[sock])


def _hosts(host: str, port: int, api_key: str | None, allow_host: list[str] | None) -> tuple[str, ...] | None:
    """The Host names a server on `host` answers (None: any), with a warning for an open one without a key."""
    from ..server import LOOPBACK_HOSTS

    if not api_key and not _loopback(host):
        stderr.print(f"warning: listening on {host} without --api-key: anyone who can reach port {port} can use "
                     "this server")
    return None if not _loopback(host) or "*" in (allow_host or ()) else (*LOOPBACK_HOSTS, *(allow_host or ()))


def _loopback(host: str) -> bool:
    """Whether `host` is this machine only (127.0.0.1, ::1, localhost)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False
