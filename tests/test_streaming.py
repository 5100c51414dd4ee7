"""The streamed text equals the text decoded at the end, byte for byte, for hostile token orders."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from biogpt_cli import BioGptTokenizer
from biogpt_cli.generation import GenerationOptions, generate
from biogpt_cli.streaming import TextStream, continuation, stream_completions
from tests.conftest import write_tiny_vocab
from tests.test_model import ours_from

# Pieces whose Moses detokenization depends on context: hyphen joins, quotes (parity), possessive
# apostrophes, currency and brackets (no space after), punctuation (no space before), unfinished
# BPE words, and the special ids that skip_special_tokens drops.
PALETTE = ["@-@</w>", "&quot;</w>", "&apos;</w>", "&apos;s</w>", ",</w>", ".</w>", "(</w>", ")</w>", "$</w>",
           "the</w>", "COVID</w>", "19</w>", "IL</w>", "th", "e</w>", "&amp;</w>", "&#124;</w>", "is</w>",
           "patients</w>", "s</w>", "@</w>", "-</w>", "@", "-", "[</w>", "]</w>", "%</w>", "?</w>"]


@pytest.fixture(scope="module")
def real_tok(real_vocab):
    return BioGptTokenizer.from_folder(real_vocab[0])


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tinyvocab")
    write_tiny_vocab(folder)
    return BioGptTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def word_tok():
    """Whole words as tokens (no merges needed): the words the Moses edge cases below are made of."""
    words = ["a", ",", "b", "c", "d", "x", "(", "y", "z", "he", "said", "&quot;", "q", "r", "IL", "@-@", "2",
             "receptor"]
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *dict.fromkeys(w + "</w>" for w in words)]
    encoder = {t: i for i, t in enumerate(tokens)}
    return BioGptTokenizer(encoder, [])


def palette_ids(tok):
    return [tok.encoder[p] for p in PALETTE if p in tok.encoder] + [0, 1, 3]


def check_stream(tok, prompt, new, stop=()):
    stream = TextStream(tok, prompt, stop)
    pieces = []
    for t in new:
        pieces.append(stream.add(t))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    expected, stopped = continuation(tok, prompt, stream.ids, stop)
    assert "".join(pieces) == expected == stream.text
    assert stream.stopped == stopped
    return expected


STOPS = {"real_tok": ["the", ", ", "COVID-19", "\"", ")", "s"], "tiny_tok": ["a", "-", "@", "th"]}


@pytest.mark.parametrize("vocab", ["real_tok", "tiny_tok"])  # tiny: runs without ../shared too
@settings(max_examples=250, deadline=None)
@given(data=st.data())
def test_stream_equals_final_text(request, vocab, data):
    tok = request.getfixturevalue(vocab)
    ids = palette_ids(tok) + list(range(4, 20))
    prompt = [2] + data.draw(st.lists(st.sampled_from(ids), max_size=6))
    new = data.draw(st.lists(st.sampled_from(ids), max_size=25))
    check_stream(tok, prompt, new, data.draw(st.lists(st.sampled_from(STOPS[vocab]), max_size=2)))


def test_stream_on_real_abstracts(real_tok, corpus_lines):
    for line in corpus_lines[:50]:
        ids = real_tok.encode(line)
        cut = min(8, len(ids) - 1)
        text = check_stream(real_tok, ids[:cut], ids[cut:])
        assert real_tok.decode(ids[:cut], skip_special_tokens=True) + text == real_tok.decode(ids, True)


@pytest.mark.parametrize("prompt,new", [("a ,", "@-@ b c d"), ("x (", "@-@ y z"), ("he said &quot;", "@-@ q r"),
                                        ("IL", "@-@ 2 receptor ,"), ("a", ", @-@ @-@ b c")])
def test_hyphen_joins_that_rewrite_earlier_text(word_tok, prompt, new):
    words = prompt.split() + new.split()
    ids = [2] + [word_tok.encoder[w + "</w>"] for w in words]  # "@-@" as a word: encode() would escape it
    n = len(prompt.split()) + 1
    check_stream(word_tok, ids[:n], ids[n:])
    check_stream(word_tok, ids[:2], ids[2:])


def test_text_is_emitted_before_the_end(tiny_tok):
    stream = TextStream(tiny_tok, tiny_tok.encode("COVID-19 is"))
    emitted = [stream.add(t) for t in tiny_tok.encode("a disease of the lungs .", add_special_tokens=False)]
    assert "".join(emitted) == " a disease of the lungs"  # "." is complete, but a @-@ could follow it
    assert stream.finish() == "."


def test_stop_string_cuts_and_holds_back(tiny_tok):
    prompt = tiny_tok.encode("Aspirin")
    stream = TextStream(tiny_tok, prompt, stop=["in conclusion"])
    out = [stream.add(t) for t in tiny_tok.encode("is used in pain . in conclusion it works",
                                                   add_special_tokens=False) if not stream.stopped]
    assert stream.stopped
    assert "".join(out) + stream.finish() == " is used in pain. "
    assert "".join(out) == " is used in pain."  # " in" was held back: it might have started the stop string


@pytest.mark.parametrize("opts", [GenerationOptions(max_new_tokens=12),
                                  GenerationOptions(max_new_tokens=12, do_sample=True, num_return_sequences=2),
                                  GenerationOptions(max_new_tokens=12, num_beams=3, num_return_sequences=2)])
def test_stream_completions_equal_generate(tiny_ref, tiny_tok, opts):
    model = ours_from(tiny_ref[0])
    prompts = [[2, 40, 41, 42], [2, 100, 7, 7, 9], [2]]
    seed = 3 if opts.do_sample else None
    gen = torch.Generator().manual_seed(seed) if seed else None
    k = opts.num_return_sequences
    text = [""] * (len(prompts) * k)
    done = {}
    for ev in stream_completions(model, tiny_tok, prompts, opts, generator=gen):
        text[ev.row] += ev.text
        if ev.done:
            done[ev.row] = ev.done
    expected = generate(model, prompts, opts, torch.Generator().manual_seed(seed) if seed else None)
    for i, seqs in enumerate(expected):
        for j, seq in enumerate(seqs):
            c = done[i * k + j]
            assert (c.ids, c.finish_reason, c.prompt_index) == (seq.ids, seq.finish_reason, i)
            assert text[i * k + j] == c.text == continuation(tiny_tok, prompts[i], seq.ids)[0]


@pytest.mark.parametrize("vocab", ["real_tok", "tiny_tok"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_long_streams_through_quotes_equal_the_final_text(request, vocab, data):
    """Many words, quotes of every kind opening and closing: the windows the stream detokenizes
    (from the last point where Moses' quote counts are even) give the whole text's spacing."""
    tok = request.getfixturevalue(vocab)
    ids = palette_ids(tok) + list(range(4, 12))
    prompt = [2] + data.draw(st.lists(st.sampled_from(ids), max_size=40))
    new = data.draw(st.lists(st.sampled_from(ids), min_size=40, max_size=120))
    check_stream(tok, prompt, new, data.draw(st.lists(st.sampled_from(STOPS[vocab]), max_size=1)))


@pytest.mark.parametrize("stop", [(), ("zzz",)])
def test_streaming_cost_does_not_grow_with_the_prompt(real_tok, corpus_lines, monkeypatch, stop):
    """Words detokenized per new token stay a window, whatever the prompt's length: a long prompt is
    detokenized once (counting words, not timing)."""
    long = real_tok.encode(" ".join(corpus_lines[:12]))[:700]
    new = real_tok.encode(corpus_lines[20], add_special_tokens=False)[:120]
    words: list[int] = []
    real = real_tok.detokenize
    monkeypatch.setattr(real_tok, "detokenize", lambda w: words.append(len(w)) or real(w))
    stream = TextStream(real_tok, long, stop)
    for t in new:
        stream.add(t)
    prompt_words = len(real_tok.words(long, skip_special_tokens=True).split())
    assert sum(words) < 40 * len(new), (sum(words), prompt_words, len(new))  # the prompt is not read whole


def test_output_nobody_watches_is_decoded_once_per_row(tiny_ref, tiny_tok, monkeypatch):
    """Without `live`, a sequence's text is detokenized when it ends, not token by token; the
    records are the live run's."""
    model = ours_from(tiny_ref[0])
    prompts = [tiny_tok.encode(p) for p in ("the cat and", "of the", "in")]
    opts = GenerationOptions(max_new_tokens=12)
    watched = [ev.done for ev in stream_completions(model, tiny_tok, prompts, opts) if ev.done]
    calls: list[int] = []
    real = tiny_tok.detokenize
    monkeypatch.setattr(tiny_tok, "detokenize", lambda w: calls.append(len(w)) or real(w))
    events = list(stream_completions(model, tiny_tok, prompts, opts, live=False))
    assert [ev.done for ev in events] == watched  # one event per sequence, its finished one
    assert len(calls) <= 2 * len(prompts)  # the prompt's tail and the whole text, once each


def test_a_stop_string_at_the_first_word_leaves_no_text(cli, tiny_ref):
    import json

    code, out, _ = cli("generate", "the cat", "-m", tiny_ref[1], "-n", "6", "--format", "jsonl")
    first = json.loads(out)["text"].split()[0]
    code, out, _ = cli("generate", "the cat", "-m", tiny_ref[1], "-n", "6", "--format", "jsonl", "--stop", first)
    record = json.loads(out)
    assert code == 0 and (record["text"], record["finish_reason"]) == ("", "stop")


@pytest.mark.parametrize("vocab", ["real_tok", "word_tok"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_logprob_text_pieces_equal_their_definition(request, vocab, data):
    """The server's logprobs text pieces, read from one incremental decoding, are those of their
    definition: where the text of the tokens through each stops agreeing with the choice's text."""
    import os

    from biogpt_cli.serving import text_pieces

    tok = request.getfixturevalue(vocab)
    ids = palette_ids(tok) + list(range(4, 20))
    prompt = [2] + data.draw(st.lists(st.sampled_from(ids), max_size=12))
    new = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=40))
    text = continuation(tok, prompt, new)[0]
    text = text[:data.draw(st.integers(0, len(text)))]  # a stop string may have cut it
    ends, at = [], 0
    for i in range(len(new)):
        at = max(at, len(os.path.commonprefix([continuation(tok, prompt[-8:], new[:i + 1])[0], text])))
        ends.append(at)
    ends[-1] = len(text)
    assert text_pieces(tok, prompt, new, text) == [text[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
