"""`biogpt serve` through the official openai client and raw HTTP, on a real local server."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="openai (a test dependency) is not installed")
import httpx  # noqa: E402
import torch  # noqa: E402

from biogpt_cli import GenerationOptions, generate  # noqa: E402
from biogpt_cli.loading import load_pretrained  # noqa: E402
from biogpt_cli.scoring import embed  # noqa: E402
from biogpt_cli.server import create_app  # noqa: E402
from biogpt_cli.streaming import continuation  # noqa: E402
from tests.conftest import client  # noqa: E402


def greedy_text(lm, tok, prompt, n):
    ids = tok.encode(prompt)
    return continuation(tok, ids, generate(lm, [ids], GenerationOptions(max_new_tokens=n))[0][0].ids)[0]


def test_greedy_equals_generate_and_streaming_concatenates(server):
    _, lm, tok = server
    c = client(server)
    out = c.completions.create(model="tiny", prompt="the cat and", max_tokens=12, temperature=0)
    assert out.choices[0].text == greedy_text(lm, tok, "the cat and", 12)
    assert out.usage.completion_tokens > 0 and out.usage.prompt_tokens == len(tok.encode("the cat and"))
    chunks = list(c.completions.create(model="tiny", prompt="the cat and", max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == out.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    counted = list(c.completions.create(model="tiny", prompt="the cat and", max_tokens=12, temperature=0, n=2,
                                        stream=True, stream_options={"include_usage": True}))
    last = counted[-1]  # OpenAI's usage chunk: no choices
    assert last.choices == [] and all(ch.usage is None for ch in counted[:-1])
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == \
        (out.usage.prompt_tokens, 2 * out.usage.completion_tokens)
    both = c.completions.create(model="tiny", prompt=["the cat and", "of the"], max_tokens=6, temperature=0)
    assert [ch.text for ch in sorted(both.choices, key=lambda ch: ch.index)] == \
        [greedy_text(lm, tok, p, 6) for p in ("the cat and", "of the")]
    assert [m.id for m in c.models.list().data] == ["tiny", "alias"] and c.models.retrieve("alias").id == "alias"
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        c.models.retrieve("gpt-4")


def test_n_with_a_seed_and_logprobs(server):
    _, lm, tok = server
    c = client(server)
    args = dict(model="tiny", prompt="the cat", max_tokens=8, temperature=0.9, n=3, seed=5)
    first, again = c.completions.create(**args), c.completions.create(**args)
    assert len(first.choices) == 3 and [ch.text for ch in first.choices] == [ch.text for ch in again.choices]
    out = c.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    ids = tok.encode("the cat")
    new = generate(lm, [ids], GenerationOptions(max_new_tokens=5))[0][0].ids
    with torch.no_grad():
        expected = torch.log_softmax(lm(torch.tensor([ids + new])).logits[0, len(ids) - 1:-1].float(), -1)
    got = torch.tensor(lp.token_logprobs)
    assert torch.allclose(got, expected.gather(1, torch.tensor(new)[:, None])[:, 0], atol=1e-4)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    chunks = list(c.completions.create(model="tiny", prompt="the cat", max_tokens=5, temperature=0, logprobs=2,
                                       stream=True))  # all of them with the last chunk
    assert [ch.choices[0].logprobs for ch in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].logprobs.token_logprobs == lp.token_logprobs


def test_ten_concurrent_clients(server):
    _, lm, tok = server
    prompts = [f"the {w}" for w in ("cat", "dog", "end", "of", "and", "in", "a", "b", "c", "d")]

    def ask(p):
        return client(server).completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text

    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [greedy_text(lm, tok, p, 6) for p in prompts]


def test_a_client_that_disconnects_frees_its_slot(server, slow_generation):
    """Slowed to 0.1 s a token, a 55-token stream: after its client hangs up at the first chunk,
    the server cancels it (its metric says so, long before the 55 tokens could be done) and
    answers the next request."""
    base, headers = server[0], {"Authorization": "Bearer sekret"}
    body = {"prompt": "the cat", "max_tokens": 55, "temperature": 0, "stream": True}

    def cancelled() -> float:
        text = httpx.get(base + "/metrics", headers=headers, timeout=300).text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("biogpt_requests_cancelled_total"))

    before = cancelled()
    with httpx.Client(timeout=300) as h, h.stream("POST", base + "/v1/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data"))  # the first chunk, then hang up
    deadline = time.time() + 600  # a safety net only
    while cancelled() == before and time.time() < deadline:
        time.sleep(0.05)
    assert cancelled() == before + 1
    out = httpx.post(base + "/v1/completions", json={"prompt": "of the", "max_tokens": 3, "temperature": 0},
                     headers=headers, timeout=300)
    assert out.status_code == 200


@pytest.mark.parametrize("body, status", [
    ("{not json", 400), ({"prompt": "x", "bogus": 1}, 400), ({"prompt": "x", "max_tokens": "many"}, 400),
    ({"prompt": "x", "max_tokens": 0}, 400), ({"prompt": "x", "top_p": 1.5}, 400), ({"prompt": "x", "n": 0}, 400),
    ({"prompt": "x", "temperature": -1}, 400), ({"prompt": "x " * 200, "max_tokens": 10}, 400),
    ({"prompt": []}, 400), ({"prompt": "   "}, 400), ({}, 400), ({"prompt": "x", "logprobs": 99}, 400),
    ({"prompt": [1, 2]}, 400), ({"prompt": "x", "stop": 3}, 400), ({"prompt": ""}, 400),
    ({"prompt": "x", "suffix": "y"}, 400), ({"prompt": "x", "guided_json": {}}, 400),
    ({"prompt": "x", "logit_bias": {"tok": 5}}, 400), ({"prompt": "x", "logit_bias": {"99999": 5}}, 400),
    ({"prompt": "x", "best_of": 1, "n": 2}, 400), ({"prompt": "x", "use_beam_search": True}, 400),
    ({"prompt": "x", "length_penalty": 2.0}, 400), ({"prompt": "x", "best_of": 3, "stream": True}, 400),
    ({"prompt": "x", "min_tokens": 20}, 400), ({"prompt": "x", "echo": True, "stream": True}, 400),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400),
])
def test_bad_requests_get_400_in_openai_shape(server, body, status):
    base = server[0]
    headers = {"Authorization": "Bearer sekret", "Content-Type": "application/json"}
    r = httpx.post(base + "/v1/completions", content=body if isinstance(body, str) else json.dumps(body),
                   headers=headers, timeout=300)
    assert r.status_code == status and set(r.json()["error"]) >= {"message", "type"}, r.text
    if body == "{not json":
        assert r.json()["error"]["message"].startswith("invalid JSON body: ")
    if isinstance(body, dict) and (body.get("prompt") == [1, 2] or "stop" in body):  # not "prompt.str: ..."
        assert r.json()["error"]["message"].endswith(": a string or a list of strings")
    if body in ({"prompt": ""}, {"prompt": []}):  # not pydantic's "at least 1 item"
        assert r.json()["error"]["message"] == "prompt: every prompt needs some text"
    if isinstance(body, dict) and body.keys() & {"suffix", "bogus", "guided_json"}:  # not pydantic's "Extra inputs"
        assert "not supported by this server" in r.json()["error"]["message"] and r.json()["error"]["param"]
    if isinstance(body, dict) and len(body) == 2 and body.get("prompt") == "x":  # one field wrong: it is named
        assert r.json()["error"]["param"] == next(k for k in body if k != "prompt"), r.text
    if isinstance(body, dict) and body.get("max_tokens") == 10:  # the hint names the request's field, not a CLI flag
        assert "lower max_tokens" in r.json()["error"]["message"] and "--" not in r.json()["error"]["message"]
    assert httpx.get(base + "/health", timeout=300).json()["status"] == "ok"  # and it keeps serving


def test_fields_clients_send_at_their_inert_values_are_taken(server):
    """Clients send these at values that change nothing (LangChain: both penalties, every request): taken."""
    base, headers = server[0], {"Authorization": "Bearer sekret"}
    inert = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "best_of": 1, "echo": False,
             "user": "me", "suffix": ""}
    plain = {"prompt": "the cat", "max_tokens": 4, "temperature": 0}
    answers = [httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=300) for body in
               (plain, {**plain, **inert})]
    assert [r.status_code for r in answers] == [200, 200], answers[1].text
    assert answers[0].json()["choices"] == answers[1].json()["choices"]


def test_embeddings_through_the_openai_client(server):
    """The client asks for base64 unless told otherwise and decodes it; both formats give each text's
    vector alone, scaled to length 1 (OpenAI's are; clients may take dot products for cosines)."""
    _, lm, tok = server
    c = client(server)
    texts = ["the cat and the dog", "of", "in the end of the cat"]
    alone = torch.cat([embed(lm, [tok.encode(t)]) for t in texts])
    out = c.embeddings.create(model="tiny", input=texts)
    got = torch.tensor([d.embedding for d in sorted(out.data, key=lambda d: d.index)])
    assert torch.allclose(got, alone / alone.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(3)) and not torch.allclose(alone.norm(dim=1), torch.ones(3))
    assert out.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts) and out.model == "tiny"
    one = c.embeddings.create(model="tiny", input="of", encoding_format="float", dimensions=32)
    assert torch.allclose(torch.tensor(one.data[0].embedding), got[1], atol=1e-6)


@pytest.mark.parametrize("body, message", [
    ({"input": [[5, 6]]}, "input: token ids are another tokenizer's"), ({"input": [5, 6]}, "input: token ids"),
    ({"input": ""}, "input[0]: every input needs some text"), ({"input": ["of", " "]}, "input[1]: every input"),
    ({"input": []}, "input: give some text"), ({"input": "of", "dimensions": 8}, "dimensions: this model's "
                                                "embeddings have 32"),
    ({"input": ["of", "x " * 70]}, "input[1]: 71 tokens exceed the model's 64 positions"),
    ({"input": ["of", "\x00"]}, "input[1]: nothing to embed"), ({"input": 3}, "input: a string or a list of"),
    ({"input": "of", "encoding_format": "hex"}, "encoding_format: "), ({"input": "of", "pool": "max"}, "pool: "),
])
def test_bad_embedding_requests_get_400_naming_the_input(server, body, message):
    r = httpx.post(server[0] + "/v1/embeddings", json=body, headers={"Authorization": "Bearer sekret"}, timeout=300)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(message), r.text
    assert httpx.get(server[0] + "/health", timeout=300).json()["status"] == "ok"


def test_browser_pages_are_let_in_only_when_named(tiny_ref):
    """--allow-origin: a named page's preflight is answered (before the API key is asked for), and
    its requests carry the CORS header; another page's get none, nor does any page by default."""
    from starlette.testclient import TestClient

    lm, tok = load_pretrained(tiny_ref[1])
    page, other = "http://localhost:3000", "http://evil.example"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with TestClient(create_app(lm, tok, "tiny", api_key="k", origins=[page])) as client:
        r = client.options("/v1/completions", headers={"Origin": page, **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2}, headers={
            "Origin": page, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        r = client.options("/v1/completions", headers={"Origin": other, **preflight})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(lm, tok, "tiny")) as client:
        r = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 2}, headers={"Origin": page})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_api_key_is_checked(server):
    r = httpx.post(server[0] + "/v1/completions", json={"prompt": "x"}, timeout=300)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_unknown_paths_and_methods_answer_in_openai_shape(server):
    base, headers = server[0], {"Authorization": "Bearer sekret"}
    for r, status in ((httpx.get(base + "/v1/nothing", headers=headers), 404),
                      (httpx.get(base + "/v1/completions", headers=headers), 405)):
        assert r.status_code == status and r.json()["error"]["message"].startswith("GET /v1/"), r.text
    r = httpx.post(base + "/v1/chat/completions", headers=headers, json={"messages": []})
    assert r.status_code == 404 and "POST /v1/completions with a prompt" in r.json()["error"]["message"]


def test_the_serve_command_binds_first_then_serves(tiny_ref):
    """`biogpt serve` itself: a port in use is one error line before the model loads (it was
    uvicorn's log line and exit 3, after "serving ..." and the load); a free port serves."""
    import subprocess
    import sys

    serve = [sys.executable, "-m", "biogpt_cli", "serve", "--port"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([*serve, str(port), "-m", "/no/such/model"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and run.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    run = subprocess.run([*serve, str(port), "--host", "0.0.0.0", "-m", "/no/such/model"], capture_output=True,
                         text=True, timeout=600)  # bound, then the load fails: the warning came first
    assert run.returncode == 1 and run.stderr.startswith("warning: listening on 0.0.0.0 without --api-key")
    proc = subprocess.Popen([*serve, str(port), "-m", str(tiny_ref[1]), "--allow-origin", "http://localhost:3000"],
                            stderr=subprocess.DEVNULL)
    try:
        deadline, base = time.time() + 60, f"http://127.0.0.1:{port}"
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        out = httpx.post(base + "/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "temperature": 0},
                         headers={"Origin": "http://localhost:3000"}, timeout=30)
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
        assert out.headers["access-control-allow-origin"] == "http://localhost:3000"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_echo_scores_the_prompt_as_score_does(server):
    """echo with logprobs and max_tokens 0 is how evaluation harnesses get log-likelihoods: the
    prompt's tokens, the first without a value, the others `biogpt score`'s per-token values."""
    from biogpt_cli.scoring import token_logprobs

    base, lm, tok = server
    c = client(server)
    out = c.completions.create(model="tiny", prompt="the cat and the dog", max_tokens=0, echo=True, logprobs=2)
    ids = tok.encode("the cat and the dog")
    with torch.no_grad():
        expected = token_logprobs(lm, [ids])[0].tolist()
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "the cat and the dog" and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5) and len(lp.tokens) == len(ids)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    both = c.completions.create(model="tiny", prompt="the cat", max_tokens=4, echo=True, logprobs=1, temperature=0)
    assert both.choices[0].text == "the cat" + greedy_text(lm, tok, "the cat", 4)
    assert len(both.choices[0].logprobs.tokens) == len(tok.encode("the cat")) + 4
    sampled = c.completions.create(model="tiny", prompt=["the cat", "of the"], max_tokens=3, echo=True,
                                   temperature=1, n=2, seed=5)
    assert [ch.text[:6] for ch in sampled.choices] == ["the ca", "the ca", "of the", "of the"]  # each its prompt


def test_the_engine_serves_requests_of_mixed_settings_without_http(tiny_ref):
    """The engine object alone: two requests of different settings share its batch, each getting
    what `generate` gives it alone; prompts are made ready off the event loop by the app."""
    import asyncio

    from biogpt_cli.serving import Engine
    from tests.conftest import request_settings as settings

    lm, tok = load_pretrained(tiny_ref[1])
    engine = Engine(lm, tok)
    texts: dict[str, dict[int, str]] = {"a": {}, "b": {}}

    async def ask(name, prompt, s):
        work = engine.prepare([prompt], s, 1)
        await engine.generate(work, lambda ev: ev.done and texts[name].setdefault(ev.row, ev.done.text),
                              threading.Event(), time.perf_counter())

    async def both():
        await asyncio.gather(ask("a", "the cat", settings(7)),
                             ask("b", "of the", settings(4, logprobs=2)))

    asyncio.run(both())
    assert texts == {"a": {0: greedy_text(lm, tok, "the cat", 7)}, "b": {0: greedy_text(lm, tok, "of the", 4)}}


def test_prompts_are_tokenized_off_the_event_loop(server, monkeypatch):
    """Completions, /tokenize and /detokenize read text in worker threads: a long one stalls no
    other client."""
    import asyncio

    _, lm, tok = server
    on_loop = []

    def noted(real):
        def call(*a, **k):
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:
                on_loop.append(False)
            return real(*a, **k)
        return call

    monkeypatch.setattr(tok, "encode", noted(tok.encode))
    out = client(server).completions.create(model="tiny", prompt="the cat", max_tokens=2, temperature=0)
    assert out.choices[0].text == greedy_text(lm, tok, "the cat", 2)
    monkeypatch.setattr(tok, "decode", noted(tok.decode))
    base, headers = server[0], {"Authorization": "Bearer sekret"}
    assert httpx.post(base + "/tokenize", json={"prompt": "the cat"}, headers=headers, timeout=300).json()["count"]
    assert httpx.post(base + "/detokenize", json={"tokens": [5, 6]}, headers=headers, timeout=300).status_code == 200
    assert len(on_loop) >= 3 and not any(on_loop)


def test_guided_choice_answers_one_of_the_texts(server):
    """vLLM's `guided_choice`, through the openai client's extra_body: each completion is one of
    the texts, equal to `generate --choices`' greedy answer, beside a free request."""
    from biogpt_cli.grammars import choices

    _, lm, tok = server
    c = client(server)
    texts = ["x", "y z", "zz"]
    for prompt in ("the cat and", "of the", "dna"):
        out = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                   extra_body={"guided_choice": texts})
        ids = tok.encode(prompt)
        want = generate(lm, [ids], GenerationOptions(max_new_tokens=8), constraints=[choices(tok, texts)])[0][0]
        assert out.choices[0].text.strip() in texts and out.choices[0].text == continuation(tok, ids, want.ids)[0]
    sampled = c.completions.create(model="tiny", prompt="the cat", max_tokens=8, n=4, seed=2,
                                   extra_body={"guided_choice": texts})
    assert all(ch.text.strip() in texts for ch in sampled.choices)
    for bad in ([], ["a", " "]):
        with pytest.raises(openai.BadRequestError, match="guided_choice"):
            c.completions.create(model="tiny", prompt="the", max_tokens=4, extra_body={"guided_choice": bad})
    with pytest.raises(openai.BadRequestError, match="raise max_tokens to at least 3"):
        c.completions.create(model="tiny", prompt="the", max_tokens=1, extra_body={"guided_choice": ["a b c"]})
    (stop,) = tok.encode("x", add_special_tokens=False)
    out = c.completions.create(model="tiny", prompt="the", max_tokens=4, temperature=0,
                               extra_body={"guided_choice": ["x", "y z"], "stop_token_ids": [stop]})
    assert out.choices[0].text.strip() == "y z" and out.choices[0].finish_reason == "stop"
    for extra, words in (({"stop_token_ids": [stop]}, "none is left"), ({"ignore_eos": True}, "ignore_eos"),
                         ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"), ({"bad_words": ["x"]}, "bad_words")):
        with pytest.raises(openai.BadRequestError, match=words) as e:
            c.completions.create(model="tiny", prompt="the", max_tokens=4, extra_body={"guided_choice": ["x"], **extra})
        assert "guided_choice" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="<unk>"):
        c.completions.create(model="tiny", prompt="the", max_tokens=4, extra_body={"guided_choice": ["\u200b", "x"]})


def test_logprobs_text_is_named_off_the_decoding_thread(server, monkeypatch):
    """A choice's logprobs pieces are worked out after its rows end, outside the decoding run, so
    a long one holds up no other client's tokens (unstreamed and streamed alike)."""
    from biogpt_cli import serving

    inside, calls = threading.local(), []
    real_run, real_pieces = serving.Engine._run_batch_of, serving.text_pieces

    def run(self, *a):
        inside.yes = True
        try:
            return real_run(self, *a)
        finally:
            inside.yes = False

    monkeypatch.setattr(serving.Engine, "_run_batch_of", run)
    monkeypatch.setattr(serving, "text_pieces", lambda *a: calls.append(getattr(inside, "yes", False))
                        or real_pieces(*a))
    c = client(server)
    out = c.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0, logprobs=1)
    assert "".join(out.choices[0].logprobs.tokens) == out.choices[0].text
    chunks = list(c.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0, logprobs=1,
                                       stream=True))
    assert chunks[-1].choices[0].logprobs.tokens and len(calls) == 2 and not any(calls)


def test_a_beam_request_whose_client_hangs_up_stops(server, monkeypatch):
    """Beam search yields nothing until its winners are known: a client that hangs up on it still
    ends it at the next step (every prompt of its batch unread), not after all its tokens."""
    from biogpt_cli import streaming

    steps, ended, real = [], [], streaming.beam_search

    def search(model, prompts, opts, progress, *a):
        try:
            found = real(model, prompts, opts, lambda n: (steps.append(n), time.sleep(0.5), progress(n)), *a)
        except Exception as e:
            ended.append(type(e).__name__)
            raise
        ended.append("finished")
        return found

    monkeypatch.setattr(streaming, "beam_search", search)
    base, headers = server[0], {"Authorization": "Bearer sekret"}
    body = {"prompt": "the cat", "max_tokens": 50, "min_tokens": 50, "use_beam_search": True, "n": 2,
            "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
        httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=1.0)
    deadline = time.time() + 600  # a safety net only
    while not ended and time.time() < deadline:
        time.sleep(0.1)
    assert ended == ["_Unread"] and len(steps) < 50, (ended, len(steps))
    out = httpx.post(base + "/v1/completions", json={"prompt": "of the", "max_tokens": 3, "temperature": 0},
                     headers=headers, timeout=300)
    assert out.status_code == 200


def test_a_stream_is_logged_with_its_tokens(server, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="biogpt.serve")
    chunks = list(client(server).completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0,
                                                    stream=True))
    assert chunks
    deadline = time.time() + 300  # the line is written as the stream's handler ends, just after its last chunk
    while not any("stream ended 200" in m for m in caplog.messages) and time.time() < deadline:
        time.sleep(0.05)
    line = next(m for m in caplog.messages if "stream ended 200" in m)
    assert line.endswith(" tokens") and int(line.split(", ")[-1].split()[0]) >= 4 + 1


def test_fleet_totals_never_go_back_and_never_count_twice():
    """`serve --replicas`' /metrics: each live replica's series labelled, the deployment's totals
    under names of their own; a replica that dies keeps its counts in the counters' totals (no
    reset for Prometheus to read), while gauges add up the live ones."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    from biogpt_cli.fleet import combined

    def replica(tokens: int, running: int) -> bytes:
        registry = CollectorRegistry()
        Counter("biogpt_prompt_tokens", "Prompt tokens", registry=registry).inc(tokens)
        Gauge("biogpt_running", "Rows running", registry=registry).set(running)
        return generate_latest(registry)

    both = combined({"a": replica(10, 2), "b": replica(5, 1)}).decode()
    assert 'biogpt_prompt_tokens_total{replica="a"} 10.0' in both and "\nbiogpt_fleet_prompt_tokens_total 15.0" in both
    assert "\nbiogpt_prompt_tokens_total " not in both and "\nbiogpt_fleet_running 3.0" in both
    after = combined({"b": replica(6, 1)}, {"a": replica(10, 2)}).decode()  # a died: b answered one more
    assert 'replica="a"' not in after and "\nbiogpt_fleet_prompt_tokens_total 16.0" in after
    assert "\nbiogpt_fleet_running 1.0" in after
