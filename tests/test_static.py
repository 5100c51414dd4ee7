"""The static-cache step (graphs.py) gives the tokens of the growing cache. On a GPU the step is
replayed from a CUDA graph (tests/test_cuda.py checks that); here the same computation runs
eagerly, the way a GPU without graphs runs it."""

from __future__ import annotations

import pytest
import torch

from biogpt_cli import GenerationOptions, frame, generate, generation, graphs
from biogpt_cli.batch import Job, run
from biogpt_cli.cli.common import _load
from biogpt_cli.inputs import Prompt
from biogpt_cli.loading import load_pretrained
from biogpt_cli.plans import job_of

PROMPTS = ["the cat and", "of the", "and then the dog", "in"]


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    return load_pretrained(tiny_ref[1])


def test_static_steps_equal_the_growing_cache(tiny):
    """Rows prefilled together into a static cache, then stepped at their own positions (a
    finished row staying put), give each prompt's tokens alone."""
    model, tok = tiny
    prompts = [tok.encode(p) for p in ("the cat and the dog", "of", "and then the dog went")]
    decoder = graphs.static_rows(model, 3, max(map(len, prompts)) + 30)
    assert decoder.rows == 4 and decoder.cache.capacity == min(graphs.BUCKET, model.config.max_position_embeddings)
    alone = [generate(model, [p], GenerationOptions(max_new_tokens=30, min_new_tokens=30))[0][0].ids for p in prompts]
    for _ in range(2):  # the same decoder starts over
        scores, tokens = decoder.prefill(range(3), prompts), [[], [], []]
        for step in range(30):
            token = scores.argmax(-1)
            for r in range(3):
                tokens[r].append(token[r].item())
            live = torch.tensor([1, int(step < 9), 1])  # the second row ends after 10 tokens
            scores = decoder.step(token, live)
        assert tokens[0] == alone[0] and tokens[1][:10] == alone[1][:10] and tokens[2] == alone[2]
    cache = model.new_cache(1, len(prompts[0]))
    with torch.no_grad():
        grown = model(torch.tensor([prompts[0]]), past_key_values=cache).logits[0, -1]
    assert torch.allclose(decoder.prefill([1], prompts[:1])[0], grown, atol=1e-5)


@pytest.mark.parametrize("opts", [
    GenerationOptions(max_new_tokens=12),
    GenerationOptions(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5),
    GenerationOptions(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8),
], ids=["greedy", "processors", "sampling"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_batches_take_the_static_path_with_the_same_tokens(tiny, monkeypatch, opts, batch_size):
    """`generate`, one prompt at a time or a batch with continuous batching: where a GPU would take
    the captured path, every option gives the eager engine's tokens."""
    model, tok = tiny
    jobs = [job_of(Prompt(i + 1, p), tok.encode(p)) for i, p in enumerate(PROMPTS * 2)]

    def tokens() -> list[list[int]]:
        done: dict[int, list[int]] = {}
        sink = type("Sink", (), {"begin": lambda self, p: None, "add": lambda self, p: None,
                                 "event": lambda self, ev: ev.done and done.__setitem__(ev.row, ev.done.ids)})()
        run(model, tok, jobs, opts, sink, batch_size=batch_size, seed=3)
        return [done[i] for i in range(len(jobs))]

    expected = tokens()
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    used = []
    monkeypatch.setattr(frame, "static_rows", lambda *a: used.append(a) or graphs.static_rows(*a))
    assert tokens() == expected and used


class Replay:
    """A stand-in for a captured graph (CPU has none): its replay runs the step and writes its
    logits (`honest`), zeros (`wrong logits`), or raises (`replay`), as captures that compute the
    step, compute something else, or fail would."""

    def __init__(self, rows, fault: str) -> None:
        self.rows, self.fault = rows, fault

    def replay(self) -> None:
        if self.fault == "replay":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        logits = self.rows._forward()
        self.rows.logits = logits if self.fault == "honest" else torch.zeros_like(logits)


@pytest.mark.parametrize("fault", ["capture", "replay", "wrong logits", "honest"])
def test_a_captured_step_checks_itself_and_falls_back_to_eager_once(tiny, monkeypatch, fault):
    """A capture that fails (here: no CUDA at all), a replay that fails, a replay whose logits
    differ from the eager step's: the tokens equal eager decoding's, one warning names what failed
    and --no-graphs (kept for -v), and the model decodes eagerly from then on (every later batch
    too). A replay that agrees passes its check: no warning, the model keeps its graphs."""
    import warnings

    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]
    opts = GenerationOptions(max_new_tokens=10)
    expected = generate(model, prompts, opts)
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(graphs, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(graphs, "UNCAPTURED", [])
    if fault != "capture":
        monkeypatch.setattr(graphs.StaticRows, "_capture", lambda self: setattr(self, "graph", Replay(self, fault)))
    vars(model).pop("_decoders", None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert generate(model, prompts, opts) == expected
            assert generate(model, prompts[:2], opts) == generate(model, prompts[:2], opts) == expected[:2]
        caught = [w for w in caught if issubclass(w.category, graphs.GraphFallback)]
        idle = graphs.decoders(model).idle
        if fault == "honest":
            assert not caught and "_eager" not in vars(model) and idle and all(d.checked for d in idle)
            return
        assert len(caught) == 1 and "--no-graphs" in str(caught[0].message)
        words = {"capture": "CUDA", "replay": "illegal memory access", "wrong logits": "disagreed"}[fault]
        assert words in str(caught[0].message) and "_eager" in vars(model) and words in graphs.UNCAPTURED[0]
        assert idle and not any(d.captured for d in idle)  # kept for -v, and none of them replays
    finally:
        vars(model).pop("_decoders", None)
        vars(model).pop("_eager", None)


def test_the_cli_warns_once_in_one_line(cli, tiny_ref, monkeypatch):
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(graphs, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(graphs.StaticRows, "_capture", lambda self: setattr(self, "graph", Replay(self, "replay")))
    monkeypatch.setattr(graphs, "UNCAPTURED", [])
    try:
        code, out, err = cli("generate", "the cat", "-n", "4", "-m", tiny_ref[1])
    finally:
        _load.cache_clear()  # the model the CLI keeps loaded is eager from now on
    assert code == 0 and out.strip()
    lines = [line for line in err.splitlines() if "captured decode step" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "--no-graphs" in lines[0], err


def test_verbose_says_when_the_step_was_not_captured(cli, tiny_ref, monkeypatch):
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(graphs, "graphs_enabled", lambda device: True)
    monkeypatch.setattr(graphs, "UNCAPTURED", [])
    code, out, err = cli("generate", "the cat", "-n", "4", "-m", tiny_ref[1], "-v")
    assert code == 0 and out.strip()
    assert "decode step not captured (" in err and "decoded eagerly" in err


def test_a_long_run_keeps_only_what_is_still_to_show(tiny, tmp_path):
    """Memory that does not grow with the corpus: at the last event of a run over many prompts,
    the finished ones' prompts, jobs and completions are gone (live objects counted, not bytes)."""
    import gc
    import os

    from biogpt_cli.output import LineWriter, Renderer
    from biogpt_cli.streaming import Completion, TextStream

    model, tok = tiny
    kinds = (Prompt, Job, Completion, TextStream)

    def alive_at_the_end(n: int) -> int:
        writer = LineWriter(os.open(os.devnull, os.O_WRONLY))
        renderer = Renderer("jsonl", writer, None)
        counted = []

        class Counting:
            begin, add = renderer.begin, renderer.add

            def event(self, ev):
                renderer.event(ev)
                if ev.done is not None and renderer.cur == n:
                    gc.collect()
                    counted.append(sum(type(o) in kinds for o in gc.get_objects()))

        jobs = (job_of(Prompt(i + 1, "the cat"), tok.encode(f"the {'cat ' * (i % 3)}and")) for i in range(n))
        run(model, tok, jobs, GenerationOptions(max_new_tokens=3, do_sample=True), Counting(), batch_size=4, seed=1)
        writer.close()
        assert writer.records == n
        return counted[-1]

    assert alive_at_the_end(600) <= alive_at_the_end(60) + 4


def test_rows_that_join_a_running_batch_take_free_static_rows(tiny, monkeypatch):
    """A live source (a server's) on the static path: prompts of different settings join the
    running batch in the static cache's spare rows, and each gets the eager engine's tokens."""
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS * 2]
    settings = [GenerationOptions(max_new_tokens=9), GenerationOptions(max_new_tokens=4, min_new_tokens=3),
                GenerationOptions(max_new_tokens=7, do_sample=True, top_k=10)]

    def tokens() -> dict[int, list[int]]:
        def arriving():
            for p in prompts:
                yield p
                yield None
        return new_tokens(model, arriving(), GenerationOptions(max_new_tokens=1),
                          lambda i: generation.prompt_generator(4, i), slots=4, per_prompt=lambda i: settings[i % 3])

    expected = tokens()
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    used = []
    monkeypatch.setattr(frame, "static_rows", lambda *a: used.append(a) or graphs.static_rows(*a))
    assert tokens() == expected and used


def test_a_prompt_longer_than_the_capacity_widens_it(tiny, monkeypatch):
    """A static batch sized for short prompts takes a long one by widening its cache, rows and
    all: every prompt still gets the eager engine's tokens."""
    model, tok = tiny
    monkeypatch.setattr(graphs, "BUCKET", 16)  # the tiny model's 64 positions: capacities of 16, 32, 48
    prompts = [tok.encode("the cat"), tok.encode("of the"), tok.encode("the cat and the dog " * 4)]
    opts = GenerationOptions(max_new_tokens=8)

    def tokens() -> dict[int, list[int]]:
        return new_tokens(model, iter(prompts), opts, slots=2)

    expected = tokens()
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    widths = []
    monkeypatch.setattr(frame, "resized", lambda m, d, r, n: widths.append(n) or graphs.resized(m, d, r, n))
    assert tokens() == expected
    assert len(prompts[2]) + 8 > 16 and widths, "the long prompt did not widen the cache"


def new_tokens(model, prompts, opts, *args, **kwargs) -> dict[int, list[int]]:
    """Each sequence's new tokens from `stream_tokens`."""
    got: dict[int, list[int]] = {}
    for seq, token, reason in generation.stream_tokens(model, prompts, opts, *args, **kwargs):
        if reason is None:
            got.setdefault(seq, []).append(token)
    return got


def test_a_batch_holds_the_rows_it_uses_and_gives_them_back(tiny, monkeypatch):
    """A server's batch (room for 64 rows) with one prompt decodes over one row, not 64; rows that
    join grow it to the next bucket (1, 2, 4), each prompt with the eager engine's tokens. The
    decoder goes back to the model when the batch ends, is taken again by a batch of its shape,
    and is freed before one of another shape is made."""
    model, tok = tiny
    prompts = [tok.encode(p) for p in PROMPTS]

    def arriving():
        for p in prompts:
            yield p
            yield None
    opts = GenerationOptions(max_new_tokens=10, min_new_tokens=10)
    expected = new_tokens(model, arriving(), opts, slots=64)
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    vars(model).pop("_decoders", None)
    shapes = []
    monkeypatch.setattr(frame, "resized", lambda m, d, r, n: shapes.append(r) or graphs.resized(m, d, r, n))
    try:
        assert new_tokens(model, arriving(), opts, slots=64) == expected
        [kept] = graphs.decoders(model).idle
        assert shapes == [2, 3] and kept.rows == 4  # one row, then two, then four
        taken = graphs.static_rows(model, 3, 20)
        assert taken is kept and not graphs.decoders(model).idle
        graphs.release(model, taken)
        other = graphs.static_rows(model, 1, 20)
        assert other is not kept and not graphs.decoders(model).idle  # the idle one was freed first
    finally:
        vars(model).pop("_decoders", None)


def test_a_model_moved_between_calls_drops_its_decoders(tiny_ref, monkeypatch):
    """Decoders read the weights as they were: after `model.to(torch.bfloat16)` the next
    `generate` makes new ones and gives the eager engine's bfloat16 tokens."""
    model, tok = load_pretrained(tiny_ref[1], kernels=False)
    prompts = [tok.encode(p) for p in PROMPTS]
    opts = GenerationOptions(max_new_tokens=8)
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    generate(model, prompts, opts)
    old = graphs.decoders(model).idle[0]
    model.to(torch.bfloat16)
    got = generate(model, prompts, opts)
    assert graphs.decoders(model).idle[0] is not old and graphs.decoders(model).idle[0].cache.k.dtype == torch.bfloat16
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: False)
    assert got == generate(model, prompts, opts)


def test_two_threads_generating_with_one_model_do_not_share_a_decoder(tiny, monkeypatch):
    import sys
    import threading

    model, tok = tiny
    work = [[tok.encode(p) for p in PROMPTS], [tok.encode(p) for p in reversed(PROMPTS)]]
    opts = GenerationOptions(max_new_tokens=30, min_new_tokens=30)
    expected = [generate(model, w, opts) for w in work]
    interval = sys.getswitchinterval()
    monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
    vars(model).pop("_decoders", None)
    got: list = [None, None]
    start = threading.Barrier(2)

    def one(i: int) -> None:
        start.wait()
        got[i] = [generate(model, work[i], opts) for _ in range(3)]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    try:
        sys.setswitchinterval(1e-6)  # the threads take turns at every step
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        vars(model).pop("_decoders", None)
    assert got == [[expected[0]] * 3, [expected[1]] * 3]
