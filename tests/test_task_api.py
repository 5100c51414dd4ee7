"""The tasks over HTTP (task_api.py): each endpoint answers the records `biogpt qa|extract|classify`
write for the same documents, JSON or a literature file, in the formats the commands write."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("fastapi")

from biogpt_cli.loading import load_pretrained  # noqa: E402
from biogpt_cli.server import create_app  # noqa: E402
from tests.conftest import serving  # noqa: E402
from tests.test_tasks import EXAMPLES, trained  # noqa: E402, F401  (the fixture)

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def task_server(trained):  # noqa: F811
    lm, tok = load_pretrained(trained)
    base, stop = serving(create_app(lm, tok, ["trained"], api_key=KEY, task="bc5cdr"))
    yield base, trained
    stop()


def post(base, command, payload=None, **kwargs):
    return httpx.post(f"{base}/v1/{command}", json=payload, headers={**AUTH, **kwargs.pop("headers", {})},
                      timeout=120, **kwargs)


def cli_records(cli, args, docs, tmp_path, *extra):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    code, out, err = cli(*args, "-i", tmp_path / "in.jsonl", "--format", "jsonl", *extra)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_each_endpoint_answers_the_commands_records(cli, task_server, tmp_path, constrained):
    """Every example (and one the model never saw), through the endpoint and through the command:
    the same records, offsets of every copied entity included."""
    base, folder = task_server
    extra = ["--constrained"] if constrained else []
    for args, fields, _, _ in EXAMPLES:
        docs = [{**fields, "id": "d1"}, {**{k: f"{v} again" for k, v in fields.items()}, "id": "d2"}]
        task = args[2] if len(args) > 2 else None
        reply = post(base, args[0], {"documents": docs, "constrained": constrained,
                                     **({"task": task} if task else {})})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["data"] == cli_records(cli, [*args, "-m", folder], docs, tmp_path, *extra), args
        assert body["usage"]["completion_tokens"] > 0 and body["task"] == (task or {"qa": "pubmedqa"}.get(
            args[0], "hoc"))
        if constrained and args[0] == "extract":
            spans = [s for r in body["data"][0]["relations"] for s in r["head_spans"] + r["tail_spans"]]
            assert spans


def test_literature_payloads_and_formats(cli, task_server, tmp_path):
    """A PubTator file as the body (options in the query), answered as PubTator and as BioC XML:
    what `extract -i FILE --format pubtator|bioc-xml` writes."""
    base, folder = task_server
    pubtator = "123|t|Aspirin\n123|a|It causes ulcer.\n\n456|t|Warfarin\n456|a|Warfarin with aspirin.\n\n"
    (tmp_path / "docs.pubtator").write_text(pubtator)
    for fmt in ("pubtator", "bioc-xml", "json"):
        reply = httpx.post(f"{base}/v1/extract?constrained=true&format={fmt}", content=pubtator.encode(),
                           headers={**AUTH, "Content-Type": "text/plain"}, timeout=120)
        assert reply.status_code == 200, reply.text
        code, out, err = cli("extract", "-m", folder, "--task", "bc5cdr", "-i", tmp_path / "docs.pubtator",
                             "--constrained", "--format", "jsonl" if fmt == "json" else fmt)
        assert code == 0, err
        if fmt == "json":
            assert reply.json()["data"] == [json.loads(line) for line in out.splitlines()]
        else:
            assert _dated(reply.text) == _dated(out)


def _dated(text):
    """BioC's <date> is the day it was written: the rest must be the same."""
    import re

    return re.sub(r"<date>\d+</date>", "<date/>", text)


def test_bad_task_requests_are_4xx_naming_what(task_server):
    base, _ = task_server
    bad = [
        ("qa", {"documents": [{"question": "q"}]}, 400, "documents[0]"),
        ("qa", {"documents": []}, 400, "documents"),
        ("qa", {"documents": [{}]}, 400, "documents[0]"),
        ("extract", {"documents": [{"text": "x"}], "task": "pubmedqa"}, 400, "pubmedqa"),
        ("qa", {"documents": [{"question": "q", "context": "c"}], "model": "other"}, 404, "other"),
        ("qa", {"documents": [{"question": "q", "context": "c"}], "format": "csv"}, 400, "format"),
        ("qa", {"documents": [{"question": "q", "context": "c"}], "colour": 1}, 400, "colour"),
    ]
    for command, payload, status, named in bad:
        reply = post(base, command, payload)
        assert reply.status_code == status and named in reply.json()["error"]["message"], (payload, reply.text)
    reply = httpx.post(f"{base}/v1/extract", content=b"<PubmedArticleSet><oops", headers={**AUTH,
                       "Content-Type": "application/xml"}, timeout=60)
    assert reply.status_code == 400 and "request body" in reply.json()["error"]["message"], reply.text
    reply = httpx.post(f"{base}/v1/extract", content=b"\n", headers={**AUTH, "Content-Type": "text/plain"}, timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["message"].startswith("request body: "), reply.text
    reply = httpx.post(f"{base}/v1/qa", json={"documents": [{"question": "q", "context": "c"}]}, timeout=60)
    assert reply.status_code == 401  # the key, as for completions
    ok = post(base, "qa", {"documents": [{"question": "is it bad", "context": "it is bad"}]})
    assert ok.status_code == 200 and ok.json()["data"][0]["answer"] == "yes"  # and it goes on serving


def test_a_language_model_says_it_is_not_a_task_checkpoint(server):
    """The routes are there on any model; on one that is not a task checkpoint a 400 says what to serve."""
    reply = httpx.post(f"{server[0]}/v1/qa", json={"documents": [{"question": "q", "context": "c"}]},
                       headers=AUTH, timeout=60)
    assert reply.status_code == 400 and "not a fine-tuned" in reply.json()["error"]["message"], reply.text


def test_the_page_is_served_without_the_key_and_can_be_turned_off(task_server, trained):  # noqa: F811
    """/ and its assets need no key (the page asks for it); the API behind them does; --no-webui
    leaves / a 404. /v1/models says which tasks the checkpoint answers, serve --task's first."""
    base, _ = task_server
    page = httpx.get(base + "/", timeout=30)
    assert page.status_code == 200 and "webui/app.js" in page.text
    assert httpx.get(base + "/webui/app.js", timeout=30).status_code == 200
    assert httpx.get(base + "/v1/models", timeout=30).status_code == 401
    tasks = httpx.get(base + "/v1/models", headers=AUTH, timeout=30).json()["data"][0]["tasks"]
    assert tasks[0] == {"command": "extract", "task": "bc5cdr"} and {t["command"] for t in tasks} == {
        "extract", "qa", "classify"}
    lm, tok = load_pretrained(trained)
    bare, stop = serving(create_app(lm, tok, ["trained"], api_key=KEY, webui=False))
    try:
        assert httpx.get(bare + "/", headers=AUTH, timeout=30).status_code == 404
    finally:
        stop()
