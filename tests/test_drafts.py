"""Speculation (drafts.py): drafted tokens fed with a row's own change how many forward passes a
text takes, never its tokens, its finish reasons, its logits or what a stop check sees."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from biogpt_cli import drafts, output
from biogpt_cli.constraints import Grammar, OneOf, fixed
from biogpt_cli.drafts import DraftStats
from biogpt_cli.generation import GenerationOptions, prompt_generator, stream_tokens
from tests.test_generation import PROMPTS
from tests.test_model import ours_from

MORE = [[2, 40, 41, 42, 40, 41, 42, 40, 41], [2, 77, 78, 79, 80, 77, 78], [2, 5, 6, 5, 6, 5, 6, 5]]


def decode(ours, prompts, opts, stats=None, slots=None, seed=None, constraint=None, first=0):
    """Every sequence's (token, reason) events, its logits at each chosen token, and each list of
    new tokens a stop check was shown (prompt j sampling from stream `first + j`)."""
    events, logits, shown = {}, {}, []

    def stop(seq, ids):
        shown.append((seq, list(ids)))
        return False
    for seq, tok, reason in stream_tokens(ours, iter(prompts), opts, None if seed is None else
                                          (lambda i: prompt_generator(seed, first + i)), stop, slots=slots,
                                          observe=lambda q, t, x: logits.setdefault(q, []).append(float(x[t])),
                                          constraint_of=None if constraint is None else lambda j: constraint,
                                          stats=stats):
        events.setdefault(seq, []).append((tok, reason))
    return events, logits, shown


def same(a, b):
    """Equal events and stop checks; logits equal to float rounding (a pass of several tokens
    sums in another order)."""
    assert a[0] == b[0] and a[2] == b[2]
    for seq, values in b[1].items():
        assert torch.allclose(torch.tensor(a[1][seq]), torch.tensor(values), atol=1e-4), seq


@pytest.mark.parametrize("opts", [GenerationOptions(max_new_tokens=30, do_sample=True),
                                  GenerationOptions(max_new_tokens=30, do_sample=True, temperature=0.2),
                                  GenerationOptions(max_new_tokens=30, do_sample=True, temperature=0.6, top_k=20),
                                  GenerationOptions(max_new_tokens=30, do_sample=True, top_p=0.8,
                                                    repetition_penalty=1.2),
                                  GenerationOptions(max_new_tokens=30, do_sample=True, min_p=0.05,
                                                    no_repeat_ngram_size=3, bad_words_ids=[[50]])],
                         ids=["plain", "cool", "temperature-top-k", "top-p-repetition", "min-p-bans"])
def test_sampled_rows_draw_the_same_tokens_with_drafts(tiny_ref, opts):
    """A sampled row checks a draft by drawing each position from its own stream as it would one
    token a pass: a drafted token is kept with its probability, and on a miss the row has what it
    drew instead. So a seeded run is the same token for token, whatever the drafts."""
    ours, stats = ours_from(tiny_ref[0]), DraftStats()
    for prompt in PROMPTS + MORE:
        on = decode(ours, [prompt], replace(opts, speculate="ngram"), stats, seed=3)
        same(on, decode(ours, [prompt], replace(opts, speculate="off"), seed=3))
    assert stats.drafted and (stats.kept or opts.temperature > 0.5)  # a random model's hot draws seldom repeat


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_rows_of_a_batch_each_draft_their_own_under_continuous_batching(tiny_ref, sample):
    """With `ngram` every row drafts from its own text; the batch keeps the drafts up to the first
    token some row would not have taken, and every row still gets its tokens alone."""
    ours, stats = ours_from(tiny_ref[0]), DraftStats()
    prompts = PROMPTS + MORE
    opts = GenerationOptions(max_new_tokens=24, do_sample=sample, temperature=0.2 if sample else 1.0)
    seed = 4 if sample else None
    on = decode(ours, prompts, replace(opts, speculate="ngram"), stats, slots=3, seed=seed)
    same(on, decode(ours, prompts, replace(opts, speculate="off"), slots=3, seed=seed))
    for i, prompt in enumerate(prompts):
        alone = decode(ours, [prompt], replace(opts, speculate="off"), seed=seed, first=i)
        assert on[0][i] == alone[0][0], i
    assert stats.drafted and (sample or stats.kept and stats.tokens > stats.passes)  # sampled: kept, alone above


def test_a_sampled_constrained_row_fast_forwards_its_forced_words(eos_ref):
    """Forced words go in one pass under sampling too: each is drawn (certain: nothing else is
    allowed), so the stream, and every later token, is as one token a pass."""
    ours, stats = ours_from(eos_ref), DraftStats()
    g = Grammar("t", 2, items=(OneOf(((50,), (51, 52, 53), (54,))),), head=(fixed([40, 41, 42, 43]),),
                sep=(fixed([44, 45]),), tail=(fixed([46, 47, 48]),), unique=True, limit=24)
    opts = GenerationOptions(max_new_tokens=24, do_sample=True, temperature=1.5)
    on = decode(ours, PROMPTS * 2, opts, stats, slots=4, seed=8, constraint=g)
    same(on, decode(ours, PROMPTS * 2, replace(opts, speculate="off"), slots=4, seed=8, constraint=g))
    assert stats.kept >= 3 * len(PROMPTS) * 2 and stats.tokens > stats.passes


def test_wrong_drafts_are_never_taken_shown_or_checked(tiny_ref, monkeypatch):
    """Drafts that follow a row's own text for a while and then go wrong (here: its true
    continuation with every second token changed): the tokens after the miss are forgotten, the
    row takes its own choice, and no stop check ever sees a drafted token the row did not take."""
    ours, stats = ours_from(tiny_ref[0]), DraftStats()
    prompts = PROMPTS + MORE
    opts = GenerationOptions(max_new_tokens=20, stop_token_ids=[45])
    truth = {tuple(p): [t for t, r in decode(ours, [p], replace(opts, speculate="off"))[0][0] if r is None]
             for p in prompts}

    def draft(self, text, most, patient):
        for p, new in truth.items():
            if tuple(text[:len(p)]) == p:
                ahead = new[len(text) - len(p):][:most]
                return [t if i % 2 == 0 else (t + 1) % 150 for i, t in enumerate(ahead)]
        raise AssertionError("a row drafted from a text no prompt begins")
    monkeypatch.setattr(drafts.Lookup, "draft", draft)
    on = decode(ours, prompts, replace(opts, speculate="ngram", draft_tokens=5), stats, slots=2)
    same(on, decode(ours, prompts, replace(opts, speculate="off"), slots=2))
    assert stats.drafted > stats.kept > 0


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_a_quantized_copy_drafts_and_the_model_decides(tiny_ref, precision):
    """Self-drafting: the same checkpoint quantized drafts greedily with its own cache (fed only
    what is new each time); the model keeps what it would have chosen, greedy or sampled, alone or
    after a constrained run of forced words."""
    ours, stats = ours_from(tiny_ref[0]), DraftStats()
    drafts.attach(ours, precision, ours_from(tiny_ref[0], quantize=precision))
    for opts in (GenerationOptions(max_new_tokens=40, repetition_penalty=1.2),
                 GenerationOptions(max_new_tokens=30, do_sample=True, temperature=0.3)):
        for prompt in PROMPTS + MORE:
            on = decode(ours, [prompt], replace(opts, speculate=precision, draft_tokens=4), stats, seed=6)
            same(on, decode(ours, [prompt], replace(opts, speculate="off"), seed=6))
    assert stats.drafted and stats.kept  # how often says nothing here: random weights, near-flat logits


def test_off_drafts_nothing_and_auto_drafts_alone(tiny_ref):
    """`off` feeds one token a pass; `auto` drafts from the text only for a row decoding alone (a
    draft in a batch is kept only as far as every row agrees)."""
    ours = ours_from(tiny_ref[0])
    for setting, prompts, drafted in (("off", MORE[:1], False), ("auto", MORE[:1], True), ("auto", MORE, False)):
        stats = DraftStats()
        decode(ours, prompts, GenerationOptions(max_new_tokens=30, speculate=setting), stats)
        assert bool(stats.drafted) == drafted, setting


def test_the_flags_the_verbose_line_and_the_manifest(cli, tiny_ref, tmp_path):
    """--speculate and --draft-tokens: `-v` says tokens per forward pass and what was kept, the
    manifest records the setting, a resume may change it (the records are the same), and a bad
    value is one line."""
    src = tmp_path / "in.txt"
    src.write_text("aspirin aspirin aspirin\nthe the the\n", encoding="utf-8")
    outs = {}
    for setting in ("off", "ngram"):
        out = tmp_path / f"{setting}.jsonl"
        code, _, err = cli("generate", "-m", tiny_ref[1], "-i", src, "-o", out, "-n", "12", "--speculate", setting,
                           "--draft-tokens", "4", "-v")
        assert code == 0, err
        assert "tokens per forward pass" in err and ("nothing drafted" in err) == (setting == "off"), err
        outs[setting] = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
        run = json.loads(output.manifest_path(out).read_text())["run"]
        assert run["speculation"] == {"speculate": setting, "draft_tokens": 4}
    assert outs["off"] == outs["ngram"]
    out = tmp_path / "off.jsonl"
    out.write_text(out.read_text(encoding="utf-8").splitlines(keepends=True)[0], encoding="utf-8")
    code, _, err = cli("generate", "-m", tiny_ref[1], "-i", src, "-o", out, "-n", "12", "--resume")
    assert code == 0 and "already done" in err, err
    assert [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()] == outs["off"]
    code, out, err = cli("generate", "-m", tiny_ref[1], "aspirin aspirin", "-n", "12", "--speculate", "int8", "-v")
    assert code == 0 and "tokens per forward pass" in err and "nothing drafted" not in err, err
    code, off_out, _ = cli("generate", "-m", tiny_ref[1], "aspirin aspirin", "-n", "12", "--speculate", "off")
    assert out == off_out
    for bad in (("--speculate", "int9"), ("--draft-tokens", "0"), ("--draft-tokens", "17")):
        code, _, err = cli("generate", "-m", tiny_ref[1], "x", *bad)
        assert code == 2 and bad[0] in err, err


def test_a_sampled_draft_is_kept_with_the_models_probability(tiny_ref, monkeypatch):
    """The sampling rule, statistically: a drafted token (here the model's own likeliest) is kept as
    often as the model, after its processors, gives it probability, over many seeded rows: the
    count within 4 standard deviations of the sum of those probabilities."""
    ours, prompt, temperature = ours_from(tiny_ref[0]), [2, 40, 41, 42], 0.08  # a random model's logits are flat
    proposed: list[int] = []

    def likeliest(self, text, most, patient):
        with torch.no_grad():
            proposed.append(int(ours(torch.tensor([list(text)])).logits[0, -1].argmax()))
        return proposed[-1:][:most]
    monkeypatch.setattr(drafts.Lookup, "draft", likeliest)
    opts = GenerationOptions(max_new_tokens=3, do_sample=True, temperature=temperature, top_k=0, speculate="ngram")
    kept, expected, variance = 0, 0.0, 0.0
    for seed in range(300):
        proposed.clear()
        new = [t for _, t, r in stream_tokens(ours, [prompt], opts, lambda j, s=seed: prompt_generator(s, j))
               if r is None]
        if len(new) < 2 or not proposed:
            continue
        with torch.no_grad():
            probs = torch.softmax(ours(torch.tensor([prompt + new[:1]])).logits[0, -1] / temperature, -1)
        p = probs[proposed[0]].item()
        kept, expected, variance = kept + (new[1] == proposed[0]), expected + p, variance + p * (1 - p)
    assert expected > 30 and variance > 10, (expected, variance)
    assert abs(kept - expected) < 4 * variance ** 0.5, (kept, expected, variance)
