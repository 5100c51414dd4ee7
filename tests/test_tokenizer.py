"""Tokenizer parity with the reference, on the real vocabulary in both file layouts."""

from __future__ import annotations

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from biogpt_cli import BioGptTokenizer, VocabularyError
from biogpt_cli.tokenizer import _parse_merges

HARD = [
    "COVID-19 is", "α-helix and β-sheet; Δψ, γδ T cells", "5 ± 0.3 µg/mL at 37 °C",
    '"quoted" and \'single\' it\'s the patients\' data', "[brackets] (parens) {braces}",
    "A & B | C < D > E", "see https://pubmed.ncbi.nlm.nih.gov/123456/?term=x&y=2",
    "tab\tseparated\tvalues", "runs   of    spaces", "non\u00a0breaking\u00a0space", "café naïve Ångström",
    "中文 日本語 한국어", "emoji 😀🧬 DNA", "literal <unk> and </s> and <s> and <pad>", "@-@ a @-@ b", "",
    "   ", "x--y -- z", "IL-2/IL-15 receptor", "p < 0.05, n = 12", "Fig. 3A-C.", "e.g. i.e. et al.",
    "'''", '""', "&amp; &lt; &gt;", "trailing space ", "\u200bzero width", "\ufeffbom",
]


@pytest.fixture(scope="module")
def tokenizers(real_vocab):
    fairseq, hub = real_vocab
    ref = transformers.BioGptTokenizer(str(hub / "vocab.json"), str(hub / "merges.txt"))
    ours = [BioGptTokenizer.from_folder(fairseq), BioGptTokenizer.from_folder(hub)]
    return ref, ours


def test_corpus_ids_equal_reference(tokenizers, corpus_lines):
    ref, ours = tokenizers
    for line in corpus_lines:
        expected = ref(line)["input_ids"]
        for tok in ours:
            assert tok.encode(line) == expected, line


@pytest.mark.parametrize("text", HARD)
def test_hard_strings_equal_reference(tokenizers, text):
    ref, ours = tokenizers
    expected = ref(text)["input_ids"]
    for tok in ours:
        ids = tok.encode(text)
        assert ids == expected
        assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_decode_corpus_equals_reference(tokenizers, corpus_lines):
    ref, (tok, _) = tokenizers
    for line in corpus_lines[:200]:
        ids = ref(line)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_unknown_ids_decode_like_reference(tokenizers):
    ref, (tok, _) = tokenizers
    ids = [2, 5, 10**6, 3, 0, 1]
    assert tok.decode(ids) == ref.decode(ids)


def test_save_vocabulary_round_trip(tokenizers, tmp_path, corpus_lines):
    _, (tok, _) = tokenizers
    tok.save_vocabulary(tmp_path)
    again = BioGptTokenizer.from_folder(tmp_path)
    assert again.encoder == tok.encoder and again.bpe_ranks == tok.bpe_ranks
    assert [again.encode(x) for x in corpus_lines[:20]] == [tok.encode(x) for x in corpus_lines[:20]]


def test_vocab_json_equals_fairseq_derivation(tokenizers):
    _, (fairseq, hub) = tokenizers
    assert fairseq.encoder == hub.encoder


def test_missing_or_broken_vocab_files(tmp_path):
    with pytest.raises(VocabularyError, match="no tokenizer files"):
        BioGptTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("a b\n")
    with pytest.raises(VocabularyError, match="vocab.json: invalid JSON"):
        BioGptTokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("text", ["", "a b", "a b 5\r\n c\td\n", "\u00a0x y z\n#version: 0.2\n"])
def test_merges_split_like_str_split(tmp_path, text):
    """The reference splits each line with `str.split()`: any Unicode whitespace, fields past two ignored."""
    (tmp_path / "merges.txt").write_text(text, encoding="utf-8")
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n") if text else []
    assert _parse_merges(tmp_path / "merges.txt") == [" ".join(line.split()[:2]) for line in lines]


@pytest.mark.parametrize("text, line", [("a b\n\nc d\n", 2), ("a b\nc\n", 2), ("\n", 1), ("a b\n x", 2)])
def test_bad_merge_line_is_named(tmp_path, text, line):
    (tmp_path / "merges.txt").write_text(text, encoding="utf-8")
    with pytest.raises(VocabularyError, match=f"line {line} is not a BPE merge"):
        _parse_merges(tmp_path / "merges.txt")


# Arbitrary Unicode, weighted towards what Moses and BPE treat specially.
TRICKY = st.sampled_from(list("-–—'\"`´‘’“”.,;:!?()[]{}<>&|@#$%^*_+=~/\\ \t\u00a0\u200b\ufeffαβμ±°µ中😀") +
                         ["<unk>", "</s>", "<s>", "<pad>", "@-@", "&amp;", "&#124;", "...", "e.g.", "Dr.", "U.S."])
TEXT = st.lists(st.one_of(st.text(max_size=8), TRICKY, st.sampled_from(["IL", "2", "cells", "the", "COVID", "19"])),
                max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=TEXT)
def test_any_unicode_encodes_like_reference(tokenizers, text):
    ref, ours = tokenizers
    expected = ref(text)["input_ids"]
    for tok in ours:
        assert tok.encode(text) == expected


@settings(max_examples=200, deadline=None)
@given(text=TEXT)
def test_decode_then_encode_round_trip_like_reference(tokenizers, text):
    ref, (tok, _) = tokenizers
    ids = ref(text)["input_ids"]
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == ref.decode(ids, skip_special_tokens=True)
    assert tok.encode(decoded) == ref(decoded)["input_ids"]
