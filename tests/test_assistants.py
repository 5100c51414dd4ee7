"""`biogpt mcp` (assistants.py), driven by the official SDK's own client: over stdio as an assistant
starts it, and over streamable HTTP behind serve's key and Host checks. The tools give the task
commands' records and generate's text for the same inputs."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("mcp")

from mcp import ClientSession, StdioServerParameters  # noqa: E402
from mcp.client.stdio import stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.shared._httpx_utils import create_mcp_http_client  # noqa: E402

from biogpt_cli import GenerationOptions, generate  # noqa: E402
from biogpt_cli.loading import load_pretrained  # noqa: E402
from biogpt_cli.scoring import sequence_nll  # noqa: E402
from biogpt_cli.streaming import continuation  # noqa: E402
from tests.test_tasks import EXAMPLES, trained  # noqa: E402, F401  (the fixture)

COMMAND = [sys.executable, "-m", "biogpt_cli", "mcp"]


async def over_stdio(args, calls):
    """The tools listed, and each call's result, in one session with `biogpt mcp ARGS`."""
    params = StdioServerParameters(command=COMMAND[0], args=[*COMMAND[1:], *map(str, args)], env=dict(os.environ))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = await session.list_tools()
        return {t.name: t for t in tools.tools}, [await session.call_tool(name, arguments) for name, arguments in calls]


def test_the_tools_over_stdio_give_the_commands_records(cli, trained, tmp_path):  # noqa: F811
    """Each task tool answers what its command writes (offsets of copied entities included),
    generate is `biogpt generate`'s text, score the model's NLL; bad input is a tool error
    naming it, and the session goes on."""
    qa, _, bc5cdr, _, hoc = EXAMPLES
    calls = [("answer_question", qa[1]), ("extract_relations", bc5cdr[1]), ("classify_document", hoc[1]),
             ("generate", {"prompt": "the cat", "max_tokens": 6}), ("score", {"text": "it is bad"}),
             ("score", {"text": "word " * 400}), ("generate", {"prompt": "the cat", "max_tokens": -1}),
             ("answer_question", {"question": "is it bad", "context": "it is bad", "constrained": False})]
    tools, results = asyncio.run(over_stdio(["-m", trained, "--task", "bc5cdr"], calls))
    assert {"generate", "score", "answer_question", "extract_relations", "classify_document"} <= set(tools)
    assert tools["extract_relations"].output_schema and "abstract" in tools["extract_relations"].input_schema[
        "properties"]
    got = [r.structured_content for r in results]
    for (args, fields, _, _), value in zip((qa, bc5cdr, hoc), got, strict=False):
        (tmp_path / "in.jsonl").write_text(json.dumps(fields) + "\n")
        code, out, err = cli(*args, "-m", trained, "-i", tmp_path / "in.jsonl", "--format", "jsonl", "--constrained")
        record = json.loads(out)
        key = {"qa": "answer", "extract": "relations", "classify": "labels"}[args[0]]
        assert code == 0 and value == {key: record[key], "text": record["text"]}, (value, record)
    assert got[1]["relations"][0]["head_spans"]  # where "aspirin" was copied from
    lm, tok = load_pretrained(trained)
    ids = tok.encode("the cat")
    new = generate(lm, [ids], GenerationOptions(max_new_tokens=6))[0][0].ids
    assert got[3]["text"] == continuation(tok, ids, new)[0]
    n, nll = sequence_nll(lm, [tok.encode("it is bad")])[0]
    assert got[4]["tokens"] == n and math.isclose(got[4]["mean_nll"], nll, rel_tol=1e-4)
    assert results[5].is_error and "exceed" in results[5].content[0].text
    assert results[6].is_error and "max_tokens" in results[6].content[0].text
    assert not results[7].is_error and got[7]["answer"] == "yes"


def test_a_language_model_offers_no_task_tools(tiny_ref):
    tools, results = asyncio.run(over_stdio(["-m", tiny_ref[1]], [("generate", {"prompt": "x", "max_tokens": 2})]))
    assert set(tools) == {"generate", "score"} and not results[0].is_error


def test_streamable_http_sits_behind_the_key_and_host_checks(trained):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([*COMMAND, "-m", str(trained), "--http", "--port", str(port), "--api-key", "k"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.time() + 120
        while True:
            try:
                status = httpx.post(url, json={}, timeout=5).status_code
                break
            except httpx.TransportError:
                assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()
                time.sleep(0.3)
        assert status == 401
        wrong = httpx.post(url, json={}, headers={"Authorization": "Bearer k", "Host": "evil.example"}, timeout=5)
        assert wrong.status_code == 403

        async def call() -> object:
            client = create_mcp_http_client(headers={"Authorization": "Bearer k"})
            async with client, streamable_http_client(url, http_client=client) as (read, write), \
                    ClientSession(read, write) as session:
                await session.initialize()
                return await session.call_tool("answer_question", {"question": "is it bad", "context": "it is bad"})
        result = asyncio.run(call())
        assert not result.is_error and result.structured_content["answer"] == "yes"
    finally:
        server.terminate()
        server.wait(30)
