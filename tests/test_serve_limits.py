"""The server under pressure: limits answered with a 4xx at once, a Host guard, and clients that
hang up or stop reading, none of which holds up another client."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
import httpx  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from biogpt_cli import batch  # noqa: E402
from biogpt_cli.limits import Limits  # noqa: E402
from biogpt_cli.loading import load_pretrained  # noqa: E402
from biogpt_cli.server import LOOPBACK_HOSTS, create_app, host_name  # noqa: E402
from biogpt_cli.turns import Turns  # noqa: E402
from tests.conftest import serving  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    return load_pretrained(tiny_ref[1])


def test_requests_beyond_a_limit_get_a_4xx_and_the_next_succeeds(tiny):
    lm, tok = tiny
    with TestClient(create_app(lm, tok, "tiny", limits=Limits(body_bytes=2000, rows=4))) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * 3000, "max_tokens": 2})
        assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": ["the", "of"], "n": 3, "temperature": 1, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt x n: 2 x 3 rows")
        r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 200})
        assert r.status_code == 400 and "positions" in r.json()["error"]["message"]
        r = c.post("/v1/completions", content=b'{"prompt": "the"}', headers={"Content-Length": "",
                                                                              "Content-Type": "application/json"})
        assert r.status_code in (400, 411)
        assert c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 2}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(tiny, slow_generation):
    lm, tok = tiny
    base, stop = serving(create_app(lm, tok, "tiny", limits=Limits(waiting=0)))
    try:
        body = {"prompt": "the cat", "max_tokens": 20, "temperature": 0}
        first = threading.Thread(target=lambda: httpx.post(base + "/v1/completions", json=body, timeout=30))
        first.start()
        time.sleep(0.5)  # the first holds the model now
        r = httpx.post(base + "/v1/completions", json={**body, "max_tokens": 1}, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        first.join(timeout=30)
        assert httpx.post(base + "/v1/completions", json={**body, "max_tokens": 1}, timeout=10).status_code == 200
    finally:
        stop()


def test_a_hung_up_request_stops_generating_and_frees_the_model(tiny, slow_generation, caplog):
    """A non-streamed request whose client hangs up is cancelled at the next token (one log line,
    no traceback), and the next request is answered within a bound on waiting."""
    lm, tok = tiny
    base, stop = serving(create_app(lm, tok, "tiny"))
    caplog.set_level(logging.INFO, logger="biogpt.serve")
    try:
        with pytest.raises(httpx.ReadTimeout):  # 55 tokens at 0.1 s: the client gives up after 1 s
            httpx.post(base + "/v1/completions", json={"prompt": "the cat", "max_tokens": 55, "temperature": 0},
                       timeout=1)
        r = httpx.post(base + "/v1/completions", json={"prompt": "of", "max_tokens": 2, "temperature": 0},
                       timeout=10)  # a bound on waiting: the 55-token generation would outlast it
        assert r.status_code == 200
        assert any("the client went away" in m for m in caplog.messages)
        assert "Traceback" not in caplog.text
    finally:
        stop()


def test_the_host_guard_refuses_other_names():
    assert [host_name(h) for h in ("localhost:8000", "[::1]:8000", "127.0.0.1", "evil.example:80")] == [
        "localhost", "::1", "127.0.0.1", "evil.example"]


def test_the_host_guard_and_the_key(tiny):
    lm, tok = tiny
    app = create_app(lm, tok, "tiny", api_key="sekret", hosts=(*LOOPBACK_HOSTS, "biogpt.lan"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        key = {"Authorization": "Bearer sekret"}
        assert c.get("/v1/models", headers=key).status_code == 200
        assert c.get("/v1/models", headers={**key, "Host": "biogpt.lan:8000"}).status_code == 200
        r = c.get("/v1/models", headers={**key, "Host": "attacker.example"})
        assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]["message"]
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekreT"}).status_code == 401


def test_requests_join_the_running_batch_whatever_their_settings(tiny, slow_generation, monkeypatch):
    """While a long request runs, short ones of other settings (sampled with a seed, another
    length, a stop string) arrive: they join its batch at the next step, finish long before it,
    and each gets the text it gets alone. A request of another `n` waits for a run of its own."""
    from concurrent.futures import ThreadPoolExecutor

    lm, tok = tiny
    runs: list[str] = []
    real = batch.run
    monkeypatch.setattr(batch, "run", lambda model, t, jobs, opts, *a, **k: runs.append(opts.num_return_sequences)
                        or real(model, t, jobs, opts, *a, **k))
    base, stop = serving(create_app(lm, tok, "tiny"))
    asked = [("in the", {"max_tokens": 40, "stop": []}), ("the cat and", {}),
             ("of the", {"temperature": 0.9, "seed": 3, "max_tokens": 4}), ("and then the dog", {"max_tokens": 2}),
             ("a b", {"stop": ["e"]})]

    def ask(prompt: str, settings: dict) -> tuple[list[str], float]:
        body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, **settings}
        answer = httpx.post(base + "/v1/completions", json=body, timeout=60).json()
        return [c["text"] for c in answer["choices"]], time.perf_counter()

    try:
        with ThreadPoolExecutor(6) as pool:
            long = pool.submit(ask, *asked[0])
            time.sleep(0.5)  # the long one runs now; the others arrive while it does
            short = [pool.submit(ask, *a) for a in asked[1:]]
            other_n = pool.submit(ask, "the end", {"temperature": 0.9, "n": 2, "seed": 1})
            done = [f.result() for f in (long, *short)]
            other_n.result()
        together = list(runs)
        alone = [ask(*a)[0] for a in asked]  # now one at a time
    finally:
        stop()
    assert [texts for texts, _ in done] == alone
    assert max(t for _, t in done[1:]) < done[0][1]  # the short ones did not wait for the long one
    assert together == [1, 2], together  # one batch for all five, then the n=2 request's own


def test_turns_count_only_requests_that_wait():
    async def check() -> None:
        turns = Turns(1, 64)
        assert not turns.full()  # an idle model takes a request whatever the limit
        async with turns.turn():
            assert not turns.full()
            waiter = asyncio.ensure_future(turns.turn().__aenter__())
            await asyncio.sleep(0)
            assert turns.full()
            waiter.cancel()
    asyncio.run(check())


def test_metrics_parse_and_move(tiny, caplog):
    from prometheus_client.parser import text_string_to_metric_families

    def read(c: TestClient) -> dict[str, float]:
        text = c.get("/metrics").text
        return {s.name + str(sorted(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    lm, tok = tiny
    caplog.set_level(logging.INFO, logger="biogpt.serve")
    with TestClient(create_app(lm, tok, "tiny")) as c:
        before = read(c)
        assert c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "temperature": 0}).status_code \
            == 200
        assert c.post("/v1/completions", json={"prompt": "the cat", "bogus": 1}).status_code == 400
        after = read(c)
    assert after["biogpt_generation_tokens_total[]"] - before.get("biogpt_generation_tokens_total[]", 0) >= 1
    assert after["biogpt_prompt_tokens_total[]"] > before.get("biogpt_prompt_tokens_total[]", 0)
    assert after["biogpt_time_to_first_token_seconds_count[]"] == 1
    assert after["biogpt_requests_total[('status', '400')]"] == 1
    assert after["biogpt_requests_waiting[]"] == 0 and after["biogpt_batch_rows[]"] == 0
    assert any(m.startswith("POST /v1/completions 200 ") and " tokens " in m for m in caplog.messages)
