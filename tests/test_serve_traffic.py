"""The server under real traffic: mixed lengths and late long prompts, sustained load, other kinds of
request waiting, a request that fails, and metrics that say what happens."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
import httpx  # noqa: E402

from biogpt_cli import GenerationOptions, generate, generation  # noqa: E402
from biogpt_cli.errors import InputError  # noqa: E402
from biogpt_cli.limits import Limits  # noqa: E402
from biogpt_cli.loading import load_pretrained  # noqa: E402
from biogpt_cli.server import create_app  # noqa: E402
from biogpt_cli.serving import Engine  # noqa: E402
from biogpt_cli.streaming import continuation  # noqa: E402
from biogpt_cli.turns import Member  # noqa: E402
from tests.conftest import (
    one_error_line,  # noqa: E402
    serving,  # noqa: E402
)
from tests.conftest import request_settings as settings  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    return load_pretrained(tiny_ref[1])


@pytest.fixture
def slow_steps(monkeypatch):
    """Each decoding step takes 20 ms more a token (a pass of several tokens, that many times):
    time for requests to overlap."""
    step, extend = generation.Frame.step, generation.Frame.extend
    monkeypatch.setattr(generation.Frame, "step", lambda self, *a: time.sleep(0.02) or step(self, *a))
    monkeypatch.setattr(generation.Frame, "extend", lambda self, tokens: time.sleep(0.02 * tokens.shape[1])
                        or extend(self, tokens))


def greedy(lm, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt)
    return continuation(tok, ids, generate(lm, [ids], GenerationOptions(max_new_tokens=n))[0][0].ids)[0]


def ask(base: str, prompt: str, max_tokens: int, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(base + "/v1/completions", json=body, timeout=60)


def test_mixed_lengths_and_a_late_long_prompt_are_all_answered(tiny, slow_steps):
    """A long generation runs; a prompt nearly as long as the model's positions arrives with few
    new tokens, and a short one with many: every request is answered, each with generate's text."""
    lm, tok = tiny
    long_prompt = " ".join(["the cat"] * 11)
    assert len(tok.encode(long_prompt)) > 40  # of the tiny model's 64 positions
    asked = [("the cat", 50), (long_prompt, 3), ("and then", 40)]
    base, stop = serving(create_app(lm, tok, "tiny"))
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(ask, base, *asked[0])
            time.sleep(0.3)
            rest = [pool.submit(ask, base, *a) for a in asked[1:]]
            answers = [f.result() for f in (first, *rest)]
    finally:
        stop()
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert [r.json()["choices"][0]["text"] for r in answers] == [greedy(lm, tok, p, n) for p, n in asked]


def test_finished_requests_are_let_go_while_the_batch_runs(tiny, slow_steps):
    """Under overlapping traffic the batch never ends; a request it finished must not stay in
    memory meanwhile (live request objects counted while a long one still runs). One token a pass:
    alone between the rounds, the long one would draft from its own text and finish sooner."""
    lm, tok = tiny
    engine = Engine(lm, tok, Limits(speculate="off"))
    counts: list[int] = []

    async def one(prompt: str, n: int) -> None:
        work = engine.prepare([prompt], settings(n), 1)
        await engine.generate(work, lambda ev: None, threading.Event(), time.perf_counter())

    async def traffic() -> None:
        long = asyncio.ensure_future(one("the cat", 55))
        await asyncio.sleep(0.1)
        for _ in range(6):
            await asyncio.gather(*(one(f"of {'the ' * i}", 2) for i in range(4)))
            gc.collect()
            counts.append(sum(type(o) is Member for o in gc.get_objects()))
        assert not long.done(), "the long request ended before the short ones: no overlap to test"
        await long

    asyncio.run(traffic())
    assert max(counts) <= 2, counts  # the long request (and at most one more), not 24 finished ones


def test_other_kinds_of_request_wait_a_bounded_time(tiny, slow_steps):
    """Steady n = 1 traffic keeps a batch running; an n = 2 request and an embedding arriving
    meanwhile wait at most the fairness bound plus the running rows' drain, not the whole load."""
    lm, tok = tiny
    engine = Engine(lm, tok, Limits(fair_wait=0.3))
    waited: dict[str, float] = {}

    async def one(prompt: str, n: int, sampled: int = 1) -> None:
        s = settings(n, 0.8 if sampled > 1 else 0, sampled, seed=1)
        work = engine.prepare([prompt], s, sampled)
        await engine.generate(work, lambda ev: None, threading.Event(), time.perf_counter())

    async def load(until: float) -> None:
        while time.monotonic() < until:
            await one("the cat", 6)

    async def timed(name: str, coro) -> None:
        start = time.monotonic()
        await coro
        waited[name] = time.monotonic() - start

    async def embedding() -> None:
        async with engine.turns.turn():
            await asyncio.to_thread(engine.embed_texts, ["the cat"])

    async def traffic() -> None:
        end = time.monotonic() + 4.0
        loads = [asyncio.ensure_future(load(end)) for _ in range(4)]
        await asyncio.sleep(0.3)
        await asyncio.gather(timed("n=2", one("of the", 4, sampled=2)), timed("embedding", embedding()))
        waited["load left"] = end - time.monotonic()
        await asyncio.gather(*loads)

    asyncio.run(traffic())
    # the bound: 0.3 s, then the running rows' last steps (6 tokens at ~20 ms, and each other's turn)
    assert waited["n=2"] < 2.0 and waited["embedding"] < 2.0, waited
    assert waited["load left"] > 1.0, waited  # they were answered while the load still ran


def test_a_request_that_fails_fails_alone(tiny, slow_steps, monkeypatch, caplog):
    """A request whose admission raises gets a 500 in OpenAI's shape; the one decoding beside it
    is answered as if nothing happened, the next request too, and the log has one line for it."""
    lm, tok = tiny
    poison = tok.encode("zebra")[1:]
    admit, start = generation.Frame.admit, generation.Frame.__init__

    def check(prompts):
        if any(list(p[1:]) == poison for p in prompts):
            raise RuntimeError("device-side assert triggered")
    monkeypatch.setattr(generation.Frame, "admit", lambda self, r, p, *a: check(p) or admit(self, r, p, *a))
    monkeypatch.setattr(generation.Frame, "__init__", lambda self, m, p, *a: check(p) or start(self, m, p, *a))
    caplog.set_level(logging.INFO, logger="biogpt.serve")
    base, stop = serving(create_app(lm, tok, "tiny"))
    try:
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(ask, base, "the cat", 40)
            time.sleep(0.3)
            bad = ask(base, "zebra", 5)
            good = long.result()
        after = ask(base, "of the", 4)
        streamed = httpx.post(base + "/v1/completions", json={"prompt": "zebra", "max_tokens": 3, "stream": True},
                              timeout=30)
        metrics = httpx.get(base + "/metrics").text
    finally:
        stop()
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == greedy(lm, tok, "the cat", 40)
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == greedy(lm, tok, "of the", 4)
    assert '"type": "server_error"' in streamed.text
    assert 'biogpt_requests_total{status="500"} 2.0' in metrics  # the stream that ended in an error too
    assert "biogpt_requests_restarted_total 1.0" in metrics  # the long request, once, when "zebra" failed
    assert "Traceback" not in caplog.text and sum("a batch failed" in m for m in caplog.messages) == 2


def test_the_running_gauge_counts_requests_and_per_token_time_counts_steps(tiny, slow_steps):
    lm, tok = tiny
    engine = Engine(lm, tok)
    seen: list[float] = []

    async def one(prompt: str, n: int, k: int = 1) -> None:
        work = engine.prepare([prompt], settings(n, 0.8 if k > 1 else 0, k, seed=1), k)
        await engine.generate(work, lambda ev: None, threading.Event(), time.perf_counter())

    async def traffic() -> None:
        runs = [asyncio.ensure_future(one(p, 30)) for p in ("the cat", "of the", "and", "in the", "a b")]
        await asyncio.sleep(0.4)
        seen.append(engine.turns.running)
        await asyncio.gather(*runs)
        seen.append(engine.turns.running)
        await one("the cat", 10, k=4)

    asyncio.run(traffic())
    assert seen == [5, 0]
    text = engine.metrics.text().decode()
    [total] = [line for line in text.splitlines() if line.startswith("biogpt_time_per_output_token_seconds_sum")]
    [count] = [line for line in text.splitlines() if line.startswith("biogpt_time_per_output_token_seconds_count")]
    assert float(count.split()[-1]) == 6 and float(total.split()[-1]) / 6 > 0.015  # each step took >= 20 ms
    for name in ("biogpt_queue_time_seconds_count", "biogpt_e2e_request_latency_seconds_count"):
        assert f"{name} 6.0" in text
    assert f"biogpt_batch_rows_capacity {float(engine.limits.rows)}" in text


def test_a_streamed_client_that_disconnects_leaves_no_unretrieved_exception(tiny, slow_steps, caplog):
    lm, tok = tiny
    caplog.set_level(logging.DEBUG)
    base, stop = serving(create_app(lm, tok, "tiny"))
    try:
        body = {"prompt": "the cat", "max_tokens": 50, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())
        time.sleep(0.5)
        gc.collect()
        assert ask(base, "of", 2).status_code == 200
        metrics = httpx.get(base + "/metrics").text
    finally:
        stop()
    assert "biogpt_requests_cancelled_total 1.0" in metrics
    assert "never retrieved" not in caplog.text and "Traceback" not in caplog.text


def test_a_server_whose_batch_cannot_fit_is_refused_at_start(tiny, monkeypatch):
    """The cache of a full batch (`--max-rows` rows at the model's positions) is counted when the
    server starts: requests share one batch, so each request's own rows bound nothing."""
    from biogpt_cli import memory

    lm, tok = tiny
    per_row = memory.row_bytes(lm.config, lm.config.max_position_embeddings)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10 * per_row)
    with pytest.raises(InputError, match=r"serve --max-rows: 64 decoding rows .* at most 8 rows fit"):
        Engine(lm, tok)
    Engine(lm, tok, Limits(rows=8))


def test_the_serve_command_refuses_a_batch_that_cannot_fit_before_loading(cli, tiny_ref):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = cli("serve", "-m", tiny_ref[1], "--max-rows", "1000000", "--port", port)
    assert code == 2 and out == "" and "serve --max-rows: 1000000 decoding rows" in one_error_line(err)
