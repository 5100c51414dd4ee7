"""The static-cache step (graphs.py) gives the tokens of the growing cache. On a GPU the step is
replayed from a CUDA graph (tests/test_cuda.py checks that); here the same computation runs
eagerly, the way a GPU without graphs runs it."""

from __future__ import annotations

import pytest
import torch

from biogpt_cli import GenerationOptions, generate, generation, graphs
from biogpt_cli.batch import Job, run
from biogpt_cli.inputs import Prompt
from biogpt_cli.loading import load_pretrained

PROMPTS = ["the cat and", "of the", "and then the dog", "in"]


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    return load_pretrained(tiny_ref[1])


def test_static_steps_equal_the_growing_cache(tiny):
    model, tok = tiny
    ids = tok.encode("the cat and the dog")
    decoder = graphs.row_decoder(model, len(ids) + 30)
    assert decoder.cache.capacity == min(graphs.BUCKET, model.config.max_position_embeddings)
    for _ in range(2):  # a second prompt on the same decoder starts over
        scores, tokens = decoder.prefill(ids), []
        for _ in range(30):
            token = scores.argmax(-1)
            tokens.append(token.item())
            scores = decoder.step(token)
        assert tokens == generate(model, [ids], GenerationOptions(max_new_tokens=30, min_new_tokens=30))[0][0].ids
    cache = model.new_cache(1, len(ids))
    with torch.no_grad():
        grown = model(torch.tensor([ids]), past_key_values=cache).logits[0, -1]
    assert torch.allclose(decoder.prefill(ids)[0], grown, atol=1e-5)


@pytest.mark.parametrize("opts", [
    GenerationOptions(max_new_tokens=12),
    GenerationOptions(max_new_tokens=12, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5),
    GenerationOptions(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8),
], ids=["greedy", "processors", "sampling"])
def test_single_prompts_take_the_static_path_with_the_same_tokens(tiny, monkeypatch, opts):
    """`generate PROMPT`, one prompt at a time (continuous batching with one slot too): where a
    GPU would take the captured path, every option gives the eager engine's tokens."""
    model, tok = tiny
    jobs = [Job(Prompt(i + 1, p), tok.encode(p)) for i, p in enumerate(PROMPTS)]

    def tokens() -> list[list[int]]:
        done: dict[int, list[int]] = {}
        sink = type("Sink", (), {"begin": lambda self, p: None, "add": lambda self, p: None,
                                 "event": lambda self, ev: ev.done and done.__setitem__(ev.row, ev.done.ids)})()
        run(model, tok, jobs, opts, sink, batch_size=1, seed=3)
        return [done[i] for i in range(len(jobs))]

    expected = tokens()
    monkeypatch.setattr(generation, "graphs_enabled", lambda device: True)
    used = []
    monkeypatch.setattr(generation, "row_decoder", lambda *a: used.append(a) or graphs.row_decoder(*a))
    assert tokens() == expected and used


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

        jobs = (Job(Prompt(i + 1, "the cat"), tok.encode(f"the {'cat ' * (i % 3)}and")) for i in range(n))
        run(model, tok, jobs, GenerationOptions(max_new_tokens=3, do_sample=True), Counting(), batch_size=4, seed=1)
        writer.close()
        assert writer.records == n
        return counted[-1]

    assert alive_at_the_end(600) <= alive_at_the_end(60) + 4
