"""Decoding gives the reference generate()'s tokens; processors behave on hand-made scores."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from biogpt_cli.drafts import DraftStats
from biogpt_cli.errors import InputError
from biogpt_cli.generation import GenerationOptions, _draw, generate, prompt_generator, stream_tokens
from biogpt_cli.plans import generation_options
from biogpt_cli.processors import bad_words, min_p, no_repeat_ngram, repetition_penalty, top_k, top_p
from tests.conftest import make_reference
from tests.test_model import ours_from

PROMPTS = [[2, 40, 41, 42], [2, 100, 7, 7, 9, 12, 60, 61], [2, 150]]


def reference_rows(ref, prompt, opts: GenerationOptions):
    kwargs = dict(max_new_tokens=opts.max_new_tokens, min_new_tokens=opts.min_new_tokens or None,
                  num_beams=opts.num_beams, length_penalty=opts.length_penalty,
                  early_stopping=opts.early_stopping, num_return_sequences=opts.num_return_sequences,
                  repetition_penalty=opts.repetition_penalty, no_repeat_ngram_size=opts.no_repeat_ngram_size,
                  do_sample=False, bad_words_ids=opts.bad_words_ids or None)
    with torch.no_grad():
        ids = torch.tensor([prompt], device=ref.device)
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out.tolist()


def our_rows(seqs, prompt, width, eos=2, pad=1):
    rows = [prompt + s.ids + ([eos] if s.finish_reason == "eos" else []) for s in seqs]
    return [r + [pad] * (width - len(r)) for r in rows]


CASES = [
    GenerationOptions(max_new_tokens=12),
    GenerationOptions(max_new_tokens=12, repetition_penalty=1.3),
    GenerationOptions(max_new_tokens=12, no_repeat_ngram_size=2),
    GenerationOptions(max_new_tokens=10, min_new_tokens=6),
    GenerationOptions(max_new_tokens=10, bad_words_ids=[[50], [60, 61]]),
    GenerationOptions(max_new_tokens=10, num_beams=3),
    GenerationOptions(max_new_tokens=10, num_beams=5, num_return_sequences=3),
    GenerationOptions(max_new_tokens=10, num_beams=5, length_penalty=0.6, early_stopping=True),
    GenerationOptions(max_new_tokens=10, num_beams=3, length_penalty=2.0, early_stopping="never"),
    GenerationOptions(max_new_tokens=10, num_beams=3, length_penalty=0.0),
    GenerationOptions(max_new_tokens=10, num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.5),
    GenerationOptions(max_new_tokens=10, num_beams=3, min_new_tokens=5, num_return_sequences=2),
]


@pytest.mark.parametrize("opts", CASES, ids=lambda o: f"beams{o.num_beams}-rp{o.repetition_penalty}-"
                         f"ng{o.no_repeat_ngram_size}-lp{o.length_penalty}-min{o.min_new_tokens}-"
                         f"n{o.num_return_sequences}-bw{len(o.bad_words_ids)}-es{o.early_stopping}")
@pytest.mark.parametrize("which", ["plain", "eos"])
def test_tokens_equal_reference_generate(tiny_ref, eos_ref, opts, which):
    ref = tiny_ref[0] if which == "plain" else eos_ref
    ours = ours_from(ref)
    results = generate(ours, PROMPTS, opts)
    for prompt, seqs in zip(PROMPTS, results, strict=True):
        expected = reference_rows(ref, prompt, opts)
        assert our_rows(seqs, prompt, len(expected[0])) == expected


def test_eos_paths_are_exercised(eos_ref):
    results = generate(ours_from(eos_ref), PROMPTS, GenerationOptions(max_new_tokens=10, num_beams=3))
    assert any(s.finish_reason == "eos" for row in results for s in row)


@pytest.mark.parametrize("opts", [GenerationOptions(max_new_tokens=9),
                                  GenerationOptions(max_new_tokens=9, num_beams=4, num_return_sequences=2),
                                  GenerationOptions(max_new_tokens=9, no_repeat_ngram_size=2, repetition_penalty=1.2),
                                  GenerationOptions(max_new_tokens=9, do_sample=True, num_return_sequences=2),
                                  GenerationOptions(max_new_tokens=9, do_sample=True, num_beams=3,
                                                    num_return_sequences=2)])
def test_batch_equals_single(eos_ref, opts):
    ours = ours_from(eos_ref)
    streams = [prompt_generator(7, i) for i in range(len(PROMPTS))] if opts.do_sample else None  # one per prompt
    together = generate(ours, PROMPTS, opts, streams)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(ours, [prompt], opts, [prompt_generator(7, i)] if opts.do_sample else None)
        assert [s.ids for s in alone[0]] == [s.ids for s in together[i]]
    if opts.do_sample:  # and the streams really are the prompts' own: another seed draws differently
        other = generate(ours, PROMPTS, opts, [prompt_generator(8, i) for i in range(len(PROMPTS))])
        assert [[s.ids for s in row] for row in other] != [[s.ids for s in row] for row in together]


def test_several_samples_per_prompt_decode_slots_prompts_at_a_time(eos_ref, monkeypatch):
    """With k samples per prompt and `slots`, a batch holds `slots` prompts (k rows each), not every
    prompt of the input, and each prompt's samples are those it gets alone."""
    from biogpt_cli import generation

    ours, opts = ours_from(eos_ref), GenerationOptions(max_new_tokens=6, do_sample=True, num_return_sequences=2)
    prompts = PROMPTS * 3
    sizes, init = [], generation.Frame.__init__
    monkeypatch.setattr(generation.Frame, "__init__",
                        lambda self, m, p, *a: sizes.append(len(p)) or init(self, m, p, *a))
    got: dict[int, list[int]] = {}
    for seq, tok, reason in generation.stream_tokens(ours, iter(prompts), opts, lambda i: prompt_generator(1, i),
                                                     slots=2):
        if reason is None:
            got.setdefault(seq, []).append(tok)
    assert sizes == [2, 2, 2, 2, 1]
    assert any(got.get(2 * i) != got.get(2 * i + 1) for i in range(len(prompts))), "a prompt's samples are copies"
    for i, prompt in enumerate(prompts):
        alone = generate(ours, [prompt], opts, [prompt_generator(1, i)])[0]
        assert [got.get(2 * i + j, []) for j in range(2)] == [s.ids for s in alone], f"prompt {i}"


def test_sampling_is_reproducible_with_a_seed(tiny_ref):
    ours = ours_from(tiny_ref[0])
    opts = GenerationOptions(max_new_tokens=15, do_sample=True, top_k=20, top_p=0.9, temperature=0.8)
    runs = [generate(ours, PROMPTS, opts, torch.Generator().manual_seed(42)) for _ in range(2)]
    other = generate(ours, PROMPTS, opts, torch.Generator().manual_seed(43))
    ids = [[[s.ids for s in row] for row in run] for run in (*runs, other)]
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_sampling_equals_reference_with_same_seed(tiny_ref):
    ref = tiny_ref[0]
    ours = ours_from(ref)
    prompt = PROMPTS[1]
    opts = GenerationOptions(max_new_tokens=12, do_sample=True, top_k=30, top_p=0.95, temperature=0.9, min_p=0.01)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=True, top_k=30, top_p=0.95,
                                temperature=0.9, min_p=0.01).tolist()
    got = generate(ours, [prompt], opts, torch.Generator().manual_seed(7))[0]
    assert our_rows(got, prompt, len(expected[0])) == expected


@pytest.mark.parametrize("k", [1, 4])
def test_draws_are_torch_multinomials_own(k):
    """The sync-free draw takes the tokens torch.multinomial takes from the same stream: from one
    shared stream, and from each row's own, where a finished row draws nothing."""
    probs = torch.randn(3, 1000).mul(3).softmax(-1)
    for seed in range(5):
        shared = torch.multinomial(probs, k, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(_draw(probs, k, torch.Generator().manual_seed(seed)), shared)
        streams = [torch.Generator().manual_seed(seed + r) for r in range(3)]
        got = _draw(probs, k, streams, alive=[True, False, True])
        for r in (0, 2):
            alone = torch.multinomial(probs[r:r + 1], k, generator=torch.Generator().manual_seed(seed + r))
            assert torch.equal(got[r:r + 1], alone)
        assert torch.equal(got[1], probs[1].topk(k).indices)  # the likeliest, drawn from nothing
        untouched = torch.Generator().manual_seed(seed + 1).get_state()
        assert torch.equal(streams[1].get_state(), untouched)


def hand_scores():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    return probs.log()


def kept(scores):
    return (scores[0] > -math.inf).nonzero().flatten().tolist()


def test_filters_on_hand_made_distributions():
    empty = torch.zeros(1, 0, dtype=torch.long)
    assert kept(top_k(2)(empty, hand_scores())) == [0, 1]
    assert kept(top_p(0.7)(empty, hand_scores())) == [0, 1]  # 0.5 + 0.2 reaches 0.7
    assert kept(top_p(0.71)(empty, hand_scores())) == [0, 1, 2]
    assert kept(top_p(0.01)(empty, hand_scores())) == [0]  # always at least one token
    assert kept(min_p(0.3)(empty, hand_scores())) == [0, 1, 2]  # p >= 0.15
    assert kept(min_p(1.0)(empty, hand_scores())) == [0]


def test_penalties_on_hand_made_scores():
    scores = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    history = torch.tensor([[0, 1, 4]])  # 4 is the padding sentinel (vocab size): ignored
    out = repetition_penalty(2.0)(history, scores.clone())
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    history = torch.tensor([[4, 1, 2, 3, 1, 2]])  # the bigram "1 2" occurred; after "... 2"? no: ends in 2
    out = no_repeat_ngram(2)(torch.tensor([[1, 2, 3, 1]]), scores.clone())
    assert kept(out) == [0, 1, 3]  # "1 2" seen before, so 2 may not follow 1 again


def test_bans_on_the_device_equal_a_scan_of_each_row():
    """n-gram and word bans, computed for all rows at once, equal a plain scan of each row's
    tokens (left padding, short rows and one-token bans included)."""
    vocab, gen = 6, torch.Generator().manual_seed(0)
    for _ in range(200):
        rows, width = 5, int(torch.randint(1, 12, (1,), generator=gen))
        history = torch.randint(0, vocab, (rows, width), generator=gen)
        for r in range(rows):  # each row padded on the left, as the batch holds it
            history[r, :int(torch.randint(0, width + 1, (1,), generator=gen))] = vocab
        rows_tokens = [[t for t in row if t != vocab] for row in history.tolist()]
        for n in (1, 2, 3):
            got = no_repeat_ngram(n)(history, torch.zeros(rows, vocab)).isinf().tolist()
            for toks, bans in zip(rows_tokens, got, strict=True):
                tail = toks[len(toks) - n + 1:] if n > 1 else []
                expected = {toks[i + n - 1] for i in range(len(toks) - n + 1) if toks[i:i + n - 1] == tail}
                assert {t for t in range(vocab) if bans[t]} == expected
        sequences = [[3], [1, 2], [0, 4, 5], [2, 2, 2, 2]]
        got = bad_words(sequences)(history, torch.zeros(rows, vocab)).isinf().tolist()
        for toks, bans in zip(rows_tokens, got, strict=True):
            expected = {s[-1] for s in sequences if len(toks) >= len(s) - 1 and toks[len(toks) - len(s) + 1:] == s[:-1]}
            assert {t for t in range(vocab) if bans[t]} == expected


@pytest.mark.parametrize("bad,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=-0.1), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"), (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "cannot exceed"), (dict(num_return_sequences=2), "needs sampling"),
])
def test_nonsense_options_are_rejected(bad, match):
    with pytest.raises(InputError, match=match):
        GenerationOptions(**bad).validate()


@pytest.mark.parametrize("bad,match", [
    (dict(bad_words_ids=[[5], [10**6]]), r"bad_words_ids: token ids must be in 0\.\."),
    (dict(bad_words_ids=[[-1]]), "bad_words_ids"), (dict(bad_words_ids=[[]]), "needs a token"),
    (dict(logprobs=10**6), "logprobs must be at most"),
])
def test_ids_the_model_lacks_are_refused_before_any_row_runs(tiny_ref, bad, match):
    """Out of range they would fail mid-batch (on a GPU: a device-side assert, the end of the
    process's CUDA context)."""
    ours = ours_from(tiny_ref[0])
    with pytest.raises(InputError, match=match):
        generate(ours, [[2, 40]], GenerationOptions(max_new_tokens=2, **bad))


def test_a_given_zero_is_a_value_not_a_default():
    """Settings from the CLI or the server: length penalty 0 and top-p 0 (only the likeliest token)
    are the reference's to honour, temperature 0 its to refuse; none may quietly become 1."""
    opts = generation_options({"max_new_tokens": 5, "sample": True, "length_penalty": 0.0, "top_p": 0.0})
    assert (opts.length_penalty, opts.top_p, opts.temperature) == (0.0, 0.0, 1.0)
    opts.validate()
    with pytest.raises(InputError, match="temperature"):
        generation_options({"max_new_tokens": 5, "sample": True, "temperature": 0.0}).validate()


def test_position_limit_is_reported(tiny_ref):
    ours = ours_from(tiny_ref[0])
    with pytest.raises(InputError, match="exceeds the model's 64 positions"):
        generate(ours, [[2] + [10] * 60], GenerationOptions(max_new_tokens=10))


@pytest.mark.parametrize("opts", [GenerationOptions(max_new_tokens=10), GenerationOptions(max_new_tokens=10,
                                  min_new_tokens=4), GenerationOptions(max_new_tokens=9, repetition_penalty=1.3,
                                  no_repeat_ngram_size=2), GenerationOptions(max_new_tokens=9, do_sample=True)],
                         ids=["greedy", "min-new", "penalties", "sampling"])
def test_continuous_batching_equals_each_prompt_alone(eos_ref, monkeypatch, opts):
    """More prompts than rows: finished rows take the next prompts (prefilled together when they
    join at the same step), and every prompt's tokens are those it gets alone."""
    from biogpt_cli import generation

    ours = ours_from(eos_ref)
    prompts = [[2, *range(40 + n, 40 + 2 * n)] for n in (20, 1, 7, 3, 2, 5, 1, 2, 1, 14, 9, 4, 6, 1, 8, 3, 1, 2)]
    admitted, moves, widths = [], [], []
    admit, reframe, step = generation.Frame.admit, generation.Frame._reframe, generation.Frame.step
    monkeypatch.setattr(generation.Frame, "admit",
                        lambda self, r, p, *a: admitted.append(r) or admit(self, r, p, *a))
    monkeypatch.setattr(generation.Frame, "_reframe", lambda self, start: moves.append(start) or reframe(self, start))
    monkeypatch.setattr(generation.Frame, "step", lambda self, *a: widths.append(self.length) or step(self, *a))
    streams = (lambda i: prompt_generator(3, i)) if opts.do_sample else None
    got: dict[int, list[int]] = {}
    for seq, tok, reason in generation.stream_tokens(ours, iter(prompts), opts, streams, slots=3):
        if reason is None:
            got.setdefault(seq, []).append(tok)
    for i, prompt in enumerate(prompts):
        alone = generate(ours, [prompt], opts, [prompt_generator(3, i)] if opts.do_sample else None)[0][0]
        assert got.get(i, []) == alone.ids, f"prompt {i}"
    assert len(admitted) >= 3, "no row was reused"
    assert any(len(rows) > 1 for rows in admitted), "no prompts were prefilled together"
    # the window dropped the columns of finished prompts and opened columns for a longer prompt
    assert min(moves) < 0 < max(moves), moves
    assert max(widths) <= max(map(len, prompts)) + opts.max_new_tokens  # not the 64 columns the model allows


MIXED = [GenerationOptions(max_new_tokens=10), GenerationOptions(max_new_tokens=6, min_new_tokens=5),
         GenerationOptions(max_new_tokens=9, do_sample=True, temperature=0.7, top_k=20),
         GenerationOptions(max_new_tokens=9, repetition_penalty=1.3, no_repeat_ngram_size=2),
         GenerationOptions(max_new_tokens=12, do_sample=True, top_p=0.8, min_p=0.05),
         GenerationOptions(max_new_tokens=8, bad_words_ids=[[45], [41, 42]]),
         GenerationOptions(max_new_tokens=3, do_sample=True, top_k=0)]


def own_settings(n: int) -> list[GenerationOptions]:
    """`n` prompts' options, each its own object: the ones that differ only in length share a pass."""
    return [replace(m, max_new_tokens=m.max_new_tokens + i % 2) for i, m in enumerate(MIXED * n)][:n]


@pytest.mark.parametrize("slots", [None, 3], ids=["one batch", "continuous"])
def test_rows_of_different_settings_share_a_batch_and_equal_each_alone(eos_ref, slots):
    """Greedy and sampled rows, each with its own length, penalties, bans and warpers, decode in
    one batch (and, with fewer rows than prompts, take freed rows mid-run): every prompt's tokens
    are those it gets alone with its own settings."""
    from biogpt_cli import generation

    ours = ours_from(eos_ref)
    mixed_rows_equal_each_alone(ours, slots, "cpu")
    with pytest.raises(InputError, match="rows sharing a batch"):
        list(generation.stream_tokens(ours, iter([[2, 40]]), GenerationOptions(),
                                      per_prompt=lambda i: GenerationOptions(num_beams=2)))


def mixed_rows_equal_each_alone(ours, slots: int | None, device: str) -> None:
    prompts = [[2, *range(40 + n, 40 + 2 * n)] for n in (1, 7, 3, 12, 2, 5, 9, 4, 6, 1, 8)]
    settings = own_settings(len(prompts))
    got: dict[int, list[int]] = {}
    for seq, tok, reason in stream_tokens(ours, iter(prompts), GenerationOptions(max_new_tokens=1),
                                          lambda i: prompt_generator(5, i, device), slots=slots,
                                          per_prompt=settings.__getitem__):
        if reason is None:
            got.setdefault(seq, []).append(tok)
    for i, (prompt, opts) in enumerate(zip(prompts, settings, strict=True)):
        alone = generate(ours, [prompt], opts, [prompt_generator(5, i, device)] if opts.do_sample else None)[0][0]
        assert got.get(i, []) == alone.ids, f"prompt {i}: {opts}"


def test_prompts_that_arrive_while_a_batch_runs_join_it(eos_ref, monkeypatch):
    """A live source (None: no prompt now) has its prompts join the running batch at the next step,
    in new rows up to `slots`, then in freed ones; each prompt's tokens are those it gets alone."""
    from biogpt_cli import generation

    ours = ours_from(eos_ref)
    prompts = [[2, *range(40 + n, 40 + 2 * n)] for n in (3, 7, 1, 12, 2, 5, 9)]
    settings = own_settings(len(prompts))
    added, steps, moved = [], [0], []
    add_rows, step, extend = generation.Frame.add_rows, generation.Frame.step, generation.Frame.extend

    def adding(self, n):  # on the CPU the cache has room for every slot: a join copies no row
        added.append(steps[0])
        before = self.cache.k.data_ptr()
        rows = add_rows(self, n)
        moved.append(self.cache.k.data_ptr() != before)
        return rows
    monkeypatch.setattr(generation.Frame, "add_rows", adding)
    monkeypatch.setattr(generation.Frame, "step",
                        lambda self, *a: steps.__setitem__(0, steps[0] + 1) or step(self, *a))
    monkeypatch.setattr(generation.Frame, "extend",  # a row alone may feed a draft with its token
                        lambda self, *a: steps.__setitem__(0, steps[0] + 1) or extend(self, *a))

    def arriving():  # one prompt now and then, nothing in between
        for p in prompts:
            yield p
            yield None
            yield None
    got: dict[int, list[int]] = {}
    for seq, tok, reason in generation.stream_tokens(ours, arriving(), GenerationOptions(max_new_tokens=1),
                                                     lambda i: prompt_generator(9, i), slots=4,
                                                     per_prompt=settings.__getitem__):
        if reason is None:
            got.setdefault(seq, []).append(tok)
    assert added and added[0] > 0, "no prompt joined a running batch"
    assert not any(moved), "a join reallocated the cache"
    for i, (prompt, opts) in enumerate(zip(prompts, settings, strict=True)):
        alone = generate(ours, [prompt], opts, [prompt_generator(9, i)] if opts.do_sample else None)[0][0]
        assert got.get(i, []) == alone.ids, f"prompt {i}"


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")  # the default length, on purpose
def test_model_generate_and_tokenizer_call_work_as_the_reference(tmp_path):
    """A script written against transformers runs unchanged: tokenizer(texts, padding=True,
    return_tensors="pt") then model.generate(**enc, ...) give the reference's tensors, eos and
    padding included, for greedy, beams, penalties, max_length, global-seed sampling (beam sampling
    too) and no mask."""
    import transformers

    from biogpt_cli import BioGptForCausalLM, BioGptTokenizer

    ref = make_reference(tmp_path, seed=5)
    with torch.no_grad():
        ref.biogpt.embed_tokens.weight[2] *= 3  # rows end at different steps: padding after </s> shows
    ref.save_pretrained(tmp_path)
    ours, tok, ref_tok = (BioGptForCausalLM.from_pretrained(tmp_path), BioGptTokenizer.from_folder(tmp_path),
                          transformers.BioGptTokenizer.from_pretrained(tmp_path))
    texts = ["the cat sat on the mat", "of", "and the dog"]
    assert tok("the cat") == ref_tok("the cat")
    for kwargs in ({"padding": True}, {"padding": "max_length", "truncation": True, "max_length": 6},
                   {"padding": "longest", "truncation": True, "max_length": 4}):  # right padding, as the reference
        assert tok(texts, return_tensors="pt", **kwargs).input_ids.tolist() == \
            ref_tok(texts, return_tensors="pt", **kwargs).input_ids.tolist(), kwargs
    tok.padding_side = ref_tok.padding_side = "left"
    enc, ref_enc = tok(texts, padding=True, return_tensors="pt"), ref_tok(texts, padding=True, return_tensors="pt")
    assert all(torch.equal(enc[k], ref_enc[k]) for k in ("input_ids", "attention_mask"))
    cases = [{}, {"max_new_tokens": 3}, {"max_length": 15}, {"repetition_penalty": 1.3, "max_new_tokens": 10},
             {"min_length": 24, "max_length": 40, "num_beams": 5, "early_stopping": True},  # the model card's call
             {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8}]
    for kwargs in cases:
        expected = ref.generate(**ref_enc, **kwargs)
        got = ours.generate(**enc, **kwargs)
        assert torch.equal(got, expected), kwargs
    assert (expected[:, -1] == 1).any() and (expected == 2).sum() > len(texts)  # padded after an early </s>
    for kwargs in ({}, {"num_beams": 3, "num_return_sequences": 2, "top_k": 20, "temperature": 0.7},  # beam sampling
                   {"num_beams": 2, "min_p": 0.5}):
        torch.manual_seed(3)
        expected = ref.generate(**ref_enc, do_sample=True, max_new_tokens=8, **kwargs)
        torch.manual_seed(3)
        assert torch.equal(ours.generate(**enc, do_sample=True, max_new_tokens=8, **kwargs), expected), kwargs
        torch.manual_seed(3)  # top_p leaves fewer candidates than the 8 drawn: the rest come at no chance, alike
        expected = ref.generate(**ref_enc, do_sample=True, num_beams=4, top_p=0.01, max_new_tokens=5)
        torch.manual_seed(3)
        assert torch.equal(ours.generate(**enc, do_sample=True, num_beams=4, top_p=0.01, max_new_tokens=5), expected)
    no_mask = ref.generate(ref_enc.input_ids, max_new_tokens=5)  # <pad> marks the padding
    assert torch.equal(ours.generate(enc.input_ids, max_new_tokens=5), no_mask)
    got = ours.generate(**enc, max_new_tokens=6)
    assert tok.batch_decode(got, skip_special_tokens=True) == ref_tok.batch_decode(got, skip_special_tokens=True)
    with pytest.raises(ValueError, match="does not take foo"):
        ours.generate(**enc, foo=1)
    with pytest.raises(InputError, match=r"64 positions \(shorten it, or lower max_length or max_new_tokens\)"):
        ours.generate(**enc, max_length=1024)


@pytest.mark.parametrize("static", [False, True], ids=["growing cache", "static cache"])
def test_a_long_prompt_joining_rows_that_have_far_to_go_waits_for_room(eos_ref, monkeypatch, static):
    """Rows share one column frame: a prompt longer than it, with few new tokens, must not push
    the frame so far right that a live row's remaining tokens run past the model's positions. It
    waits until they fit; every prompt still gets its tokens alone."""
    from biogpt_cli import frame, graphs

    if static:  # the frame of the token history is shared on a GPU too
        monkeypatch.setattr(frame, "graphs_enabled", lambda device: True)
        monkeypatch.setattr(graphs, "graphs_enabled", lambda device: False)
    ours = ours_from(eos_ref)
    limit = ours.config.max_position_embeddings
    long_prompt = [2, *[40 + i % 50 for i in range(limit - 20)]]
    prompts = [[2, 40, 41], long_prompt]
    settings = [GenerationOptions(max_new_tokens=50, min_new_tokens=50),
                GenerationOptions(max_new_tokens=3, min_new_tokens=3)]

    def arriving():
        yield prompts[0]
        for _ in range(3):
            yield None
        yield prompts[1]
    got: dict[int, list[int]] = {}
    for seq, tok, reason in stream_tokens(ours, arriving(), GenerationOptions(max_new_tokens=1), slots=4,
                                          per_prompt=settings.__getitem__):
        if reason is None:
            got.setdefault(seq, []).append(tok)
    for i, (prompt, opts) in enumerate(zip(prompts, settings, strict=True)):
        assert got.get(i, []) == generate(ours, [prompt], opts)[0][0].ids, f"prompt {i}"


@pytest.mark.parametrize("opts", [GenerationOptions(max_new_tokens=40),
                                  GenerationOptions(max_new_tokens=40, repetition_penalty=1.3),
                                  GenerationOptions(max_new_tokens=40, no_repeat_ngram_size=3),
                                  GenerationOptions(max_new_tokens=30, min_new_tokens=20),
                                  GenerationOptions(max_new_tokens=30, bad_words_ids=[[50], [60, 61]]),
                                  GenerationOptions(max_new_tokens=30, stop_token_ids=[45])],
                         ids=["greedy", "repetition", "no-repeat-ngram", "min-tokens", "bad-words", "stop-tokens"])
def test_a_row_alone_guesses_from_its_own_text_with_the_same_tokens(tiny_ref, monkeypatch, opts):
    """A greedy row decoding alone feeds a guess from its own text (prompt lookup) with each token
    and keeps what it would have chosen: the same tokens, reasons and logits (for logprobs) as one
    token a pass, under every processor; a tiny random model repeats itself, so guesses are kept."""

    ours = ours_from(tiny_ref[0])
    stats = DraftStats()

    def run(speculate: str = "auto") -> list:
        out = []
        for prompt in [*PROMPTS, [2, 40, 41, 42, 40, 41, 42, 40, 41]]:
            events, logits = [], []
            for _, tok, reason in stream_tokens(ours, [prompt], replace(opts, speculate=speculate), stats=stats,
                                                observe=lambda q, t, x, seen=logits: seen.append(float(x[t]))):
                events.append((tok, reason))
            out.append((events, logits))
        return out

    guessed = run()
    drafted, kept = stats.drafted, stats.kept
    alone = run("off")
    assert [e for e, _ in guessed] == [e for e, _ in alone] and stats.drafted == drafted
    for (_, a), (_, b) in zip(guessed, alone, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    assert drafted and (kept or opts.no_repeat_ngram_size)
