"""On a CUDA device: the reference's tokens, the batch engine, half precision, the commands, the
server's engine, BioGPT-Large's shape and fine-tuning.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine: `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from biogpt_cli.generation import GenerationOptions, generate, prompt_generator, stream_tokens
from tests.test_generation import CASES, PROMPTS, mixed_rows_equal_each_alone, our_rows, reference_rows
from tests.test_model import ours_from

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def on_cuda(ref):
    """A CUDA copy of a session-shared reference model (the original stays on the CPU)."""
    return copy.deepcopy(ref).to("cuda")


@pytest.mark.parametrize("opts", [CASES[0], CASES[2], CASES[5], CASES[6]],
                         ids=["greedy", "no-repeat-ngram", "beams3", "beams5-n3"])
def test_tokens_equal_reference_on_cuda(eos_ref, opts):
    ref = on_cuda(eos_ref)
    ours = ours_from(ref, device="cuda")
    assert next(ours.parameters()).is_cuda
    for prompt, seqs in zip(PROMPTS, generate(ours, PROMPTS, opts), strict=True):
        expected = reference_rows(ref, prompt, opts)
        assert our_rows(seqs, prompt, len(expected[0])) == expected


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampling"])
def test_continuous_batching_on_cuda_equals_each_prompt_alone(eos_ref, sample):
    ours = ours_from(on_cuda(eos_ref), device="cuda")
    opts = GenerationOptions(max_new_tokens=9, do_sample=sample)
    prompts = [[2, *range(40 + n, 40 + 2 * n)] for n in (1, 7, 3, 12, 2, 5, 9)]
    streams = (lambda i: prompt_generator(3, i, "cuda")) if sample else None
    got: dict[int, list[int]] = {}
    for seq, tok, reason in stream_tokens(ours, iter(prompts), opts, streams, slots=3):
        if reason is None:
            got.setdefault(seq, []).append(tok)
    for i, prompt in enumerate(prompts):
        alone = generate(ours, [prompt], opts, [prompt_generator(3, i, "cuda")] if sample else None)[0][0]
        assert got.get(i, []) == alone.ids, f"prompt {i}"


@pytest.mark.parametrize("slots", [None, 3], ids=["one batch", "continuous"])
def test_rows_of_different_settings_on_cuda_equal_each_alone(eos_ref, slots):
    """Greedy and sampled rows of their own settings share captured steps over the static cache."""
    mixed_rows_equal_each_alone(ours_from(on_cuda(eos_ref), device="cuda"), slots, "cuda")


@pytest.mark.parametrize("opts", [GenerationOptions(max_new_tokens=10),
                                  GenerationOptions(max_new_tokens=8, num_beams=3)],
                         ids=["greedy", "beams"])
def test_constrained_rows_on_cuda_equal_the_cpu(eos_ref, opts):
    """The mask is made on the device (captured steps for greedy rows): each row's tokens, free or
    held by a grammar, equal the CPU's."""
    from biogpt_cli.constraints import Grammar, OneOf, fixed

    g = Grammar("t", 2, items=(OneOf(((40, 41), (41,), (45, 46, 47))),), sep=(fixed([44]),), unique=True)
    grammars = [g if i % 2 else None for i in range(len(PROMPTS))]
    cpu = generate(ours_from(eos_ref), PROMPTS, opts, constraints=grammars)
    cuda = generate(ours_from(on_cuda(eos_ref), device="cuda"), PROMPTS, opts, constraints=grammars)
    assert [[s.ids for s in p] for p in cuda] == [[s.ids for s in p] for p in cpu]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda_stays_close(tiny_ref, dtype):
    ref = on_cuda(tiny_ref[0])
    ids = torch.tensor([PROMPTS[1]], device="cuda")
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours_from(ref, dtype=dtype, device="cuda")(ids).logits
    assert got.dtype == dtype
    assert torch.allclose(got.float(), expected, atol=0.05, rtol=0.05)


def test_commands_run_on_cuda_as_on_the_cpu(cli, tiny_ref, tmp_path):
    """`generate`, `score` and `embed` with --device cuda print what they print on the CPU."""
    folder = tiny_ref[1]
    lines = tmp_path / "in.txt"
    lines.write_text("alpha beta gamma\nbeta\n")
    for command in (["generate", "alpha beta", "-n", "6"],
                    ["generate", "-i", str(lines), "-n", "5", "--num-beams", "3"],
                    ["score", "-i", str(lines), "--format", "jsonl"], ["embed", "-i", str(lines)]):
        outputs = []
        for device in ("cpu", "cuda"):
            code, out, err = cli(*command, "-m", folder, "--device", device)
            assert code == 0, err
            outputs.append(out)
        if command[0] == "generate":
            assert outputs[0] == outputs[1]
        else:  # numbers: equal to float32 rounding between the two devices' kernels
            a, b = ([json.loads(line) for line in out.splitlines()] for out in outputs)
            assert [sorted(r) for r in a] == [sorted(r) for r in b]
            values = [(torch.tensor(x[k], dtype=torch.float64), torch.tensor(y[k], dtype=torch.float64))
                      for x, y in zip(a, b, strict=True) for k in x if isinstance(x[k], (float, list))]
            assert values and all(torch.allclose(u, v, atol=1e-3, rtol=1e-3) for u, v in values)


@pytest.mark.parametrize("opts", [CASES[3], CASES[2]], ids=["greedy", "no-repeat-ngram"])
def test_captured_step_gives_the_reference_tokens(tiny_ref, opts, monkeypatch):
    """One prompt at a time decodes through the captured graph (graphs.py); with graphs off, eagerly:
    both give the reference's tokens."""
    from biogpt_cli import graphs

    ref = on_cuda(tiny_ref[0])
    ours = ours_from(ref, device="cuda")
    before = len(graphs.CAPTURES)
    for prompt in PROMPTS:
        expected = reference_rows(ref, prompt, opts)
        assert our_rows(generate(ours, [prompt], opts)[0], prompt, len(expected[0])) == expected
    assert len(graphs.CAPTURES) > before  # the graph was captured (once per capacity), then replayed
    monkeypatch.setenv("BIOGPT_GRAPHS", "0")
    eager = ours_from(ref, device="cuda")
    for prompt in PROMPTS:
        expected = reference_rows(ref, prompt, opts)
        assert our_rows(generate(eager, [prompt], opts)[0], prompt, len(expected[0])) == expected


def test_sixteen_concurrent_requests_on_cuda_each_equal_generate(tiny_ref):
    """The server's engine on the GPU: 16 requests of different lengths at once share its captured
    steps, and each gets the text `generate` gives it alone."""
    import asyncio
    import threading
    import time

    pytest.importorskip("prometheus_client", reason="the serve extra is not installed")
    from biogpt_cli.loading import load_pretrained
    from biogpt_cli.serving import Engine
    from biogpt_cli.streaming import continuation
    from tests.conftest import request_settings as settings

    lm, tok = load_pretrained(tiny_ref[1], device="cuda")
    engine = Engine(lm, tok)
    prompts = [f"the {'cat ' * (i % 5)}and {'of ' * (i % 3)}" for i in range(16)]
    texts: dict[int, str] = {}

    async def ask(i: int) -> None:
        work = engine.prepare([prompts[i]], settings(4 + i), 1)
        await engine.generate(work, lambda ev: ev.done and texts.setdefault(i, ev.done.text), threading.Event(),
                              time.perf_counter())

    async def together() -> None:
        await asyncio.gather(*(ask(i) for i in range(16)))
    asyncio.run(together())
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        alone = generate(lm, [ids], GenerationOptions(max_new_tokens=4 + i))[0][0].ids
        assert texts[i] == continuation(tok, ids, alone)[0], f"request {i}"


def test_biogpt_large_shape_on_cuda_gives_the_reference_tokens(tmp_path):
    """1600 wide, 25 heads (64 each), 2048 positions: BioGPT-Large's shape (two layers of it)."""
    from tests.conftest import make_reference

    ref = make_reference(tmp_path, seed=3, hidden_size=1600, num_attention_heads=25, intermediate_size=6400,
                         num_hidden_layers=2, max_position_embeddings=2048).to("cuda")
    ours = ours_from(ref, device="cuda")
    opts = GenerationOptions(max_new_tokens=12)
    for prompt in PROMPTS:
        expected = reference_rows(ref, prompt, opts)
        assert our_rows(generate(ours, [prompt], opts)[0], prompt, len(expected[0])) == expected


def test_fine_tuning_on_cuda_runs_and_resumes(tmp_path):
    """bfloat16 autocast on the GPU; an interrupted run resumed (the GPU's random state restored)
    ends where an uninterrupted one does."""
    from biogpt_cli import finetune as ft
    from biogpt_cli.loading import read_safetensors
    from tests.conftest import make_reference
    from tests.test_finetune import small_run

    base = tmp_path / "base"
    make_reference(base, seed=1, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    history = ft.train(small_run(base, tmp_path, "full", "whole", device="cuda"))
    assert history[-1]["loss"] < history[0]["loss"]

    def interrupt(p: ft.Progress) -> None:
        if p.epoch == 3 and not p.epoch_done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ft.train(small_run(base, tmp_path, "full", device="cuda"), on_progress=interrupt)
    ft.train(small_run(base, tmp_path, "full", device="cuda"), resume=True)
    whole, resumed = (read_safetensors(tmp_path / d / "model.safetensors") for d in ("whole", "out"))
    assert all(torch.allclose(whole[k].float(), resumed[k].float(), atol=1e-5) for k in whole)


def test_the_captured_step_passes_its_own_check(eos_ref):
    """Each bucket's first replay agrees with the eager step (graphs.py): no fallback, the model
    keeps its graphs, and the tokens equal the eager path's."""
    import warnings

    from biogpt_cli import graphs

    ours = ours_from(on_cuda(eos_ref), device="cuda")
    opts = GenerationOptions(max_new_tokens=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphs.GraphFallback)
        captured = generate(ours, PROMPTS, opts)
    assert "_eager" not in vars(ours) and all(d.checked for d in graphs.decoders(ours).idle)
    vars(ours)["_eager"] = "test: eager"
    assert generate(ours, PROMPTS, opts) == captured
