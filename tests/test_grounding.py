"""Grounded answers: a constrained answer always completes its template, parses, and names only
whole words of its document, each with the offsets it was copied from (grounding.py, grammars.py,
constraints.py), through the engine, the CLI and the literature writers."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
import torch

from biogpt_cli import BioGptConfig, BioGptForCausalLM, BioGptTokenizer
from biogpt_cli.generation import GenerationOptions, generate
from biogpt_cli.grammars import entity_offsets, source_words, task_grammar
from biogpt_cli.grounding import align, document_text
from biogpt_cli.literature import documents
from biogpt_cli.tasks import TASKS, build_input, parse
from tests.conftest import TINY
from tests.fixtures import ROOT, shared_dir

N = 9  # learned prompt tokens
EOS = 2
RELATIONS = ("advise", "effect", "mechanism", "int")
HARD = [  # sources that once broke the promises, or might
    {"title": "Lidocaine-induced cardiac asystole", "abstract": "Intravenous lidocaine caused asystole. then "
     "levodopa-induced dyskinesia rose with bevacizumab/irinotecan and 100,000/uL platelets at 4 mg/kg."},
    {"title": "TNF-α and IL-1β", "abstract": "α-synuclein (α-syn) and 5-FU with Ca(2+) and [3H]dopamine; "
     "indomethacin (IDM), then 5 %."},
    {"title": "", "abstract": "See https://example.org/a?b=1 and 50\u00a0mg of aspirin\u2028daily, “evidence” "
     "which flows…] to tremor."},
    {"title": "Aspirin", "abstract": "Aspirin causes tremor. then clonidine helps."},
    {"title": "Ends with an entity", "abstract": "It was caused by haloperidol"},
    {"title": "Control\x0c characters\x1b here", "abstract": "A \u00adsoft hyphen, a zero\u200bwidth space; "
     "insulin's effect on glucose."},
    {"title": "", "abstract": "aspirin"},
    {"title": "Aspirin.", "abstract": ""},
    {"title": "", "abstract": ". , ; ( ) %"},
    {"text": "warfarin and heparin (UFH) raise INR."},
]


@pytest.fixture(scope="module")
def tok(real_vocab):
    tok = BioGptTokenizer.from_folder(real_vocab[0])
    tok.add_prompt_tokens(N)
    return tok


@pytest.fixture(scope="module")
def sources(corpus_lines):
    """The hard cases, PubMed abstracts of the dev corpus, and one long enough to be cut at 640 tokens."""
    lines = [line for line in corpus_lines if len(line) > 200]
    picked = [{"title": "", "abstract": line} for line in lines[:24]]
    return [*HARD, *picked, {"title": "A long one", "abstract": " ".join(lines[:12])}]


def _norm(text: str) -> str:
    """Text as the model reads it: case-folded, without spacing or the control characters Moses drops."""
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf")).casefold()


def walk(g, rng: random.Random, repeat: float = 0.0, sep: int = -1) -> list[int]:
    """A random answer the grammar allows; with probability `repeat` each token copies the first
    item's token at the same place when it may (a model that repeats itself; `sep` parts items)."""
    state, out, item, first = g.start(), [], [], None
    while True:
        allowed = g.allowed(state)
        if not allowed:  # only where no answer can be made at all (the engine then ends the row)
            assert not out, f"cornered after {out}"
            return out
        echo = first[len(item)] if first is not None and len(item) < len(first) else None
        t = echo if echo in allowed and rng.random() < repeat else rng.choice(allowed)
        if t == EOS:
            return out
        out.append(t)
        item.append(t)
        if t == sep:
            first, item = (first or item[:-1]), []
        state = g.advance(state, t)


def check_answer(task, g, words, doc: str, text: str, out: list[int], limit: int) -> None:
    """A complete template within the limit, parsed; each entity sliced from its offsets."""
    assert len(out) + 1 <= limit and text.endswith("."), (text, limit)
    result = parse(task, text)
    assert result is not None, text
    if task.result != "relations":
        return
    offsets = entity_offsets(g, words, out)
    assert len(offsets) == len(result), (text, offsets)
    for rel, (heads, tails) in zip(result, offsets, strict=True):
        for name, spans in ((rel["head"], heads), (rel["tail"], tails)):
            assert spans, (name, text)
            for start, end in spans:
                piece = doc[start:end]
                assert _norm(piece) == _norm(name), (piece, name)
                assert piece[0].isalnum() and (piece[-1].isalnum() or piece[-1] in ")]}"), piece


@pytest.mark.parametrize("name", ["bc5cdr", "ddi", "kd-dti"])
def test_random_walks_always_finish_parse_and_slice_to_their_entities(tok, sources, name):
    """Hundreds of random walks a task over every source, at several limits and with a tendency
    to repeat the first relation: each ends with `</s>` after a complete template within its
    limit, parses to as many relations as it wrote, and every entity's offsets slice to it."""
    (sep,) = tok.encode(";", add_special_tokens=False)
    task, rng, walks = TASKS[name], random.Random(name), 0
    for fields in sources:
        ids = build_input(task, tok, fields, 640)
        words, doc = source_words(task, tok, fields, ids), document_text(fields)
        for limit in (24, 60, 374):
            g = task_grammar(task, tok, words, RELATIONS, limit=limit)
            for _ in range(12):
                out = walk(g, rng, rng.choice((0.0, 0.9)), sep)
                walks += 1
                if not out:  # no word of this source can be an entity, or no room for one
                    assert not any(w.at and w.text[0].isalnum() for w in words) or limit < 40, fields
                    continue
                check_answer(task, g, words, doc, tok.decode(out), out, limit)
    assert walks >= 1000


def test_hoc_and_qa_walks_finish(tok):
    rng = random.Random(0)
    for name in ("hoc", "pubmedqa"):
        for limit in (None, 14, 40):
            g = task_grammar(TASKS[name], tok, limit=limit)
            for _ in range(100):
                out = walk(g, rng)
                check_answer(TASKS[name], g, [], "", tok.decode(out), out, limit or 10**6)


def test_a_repeated_relation_is_never_a_dead_end(tok):
    """The case that cut answers short: after `... aspirin and tremor exists ; the relation
    between aspirin and tremor`, nothing could follow. The grammar never lets it get there."""
    fields = {"title": "", "abstract": "Aspirin causes tremor. then clonidine helps."}
    task = TASKS["bc5cdr"]
    ids = build_input(task, tok, fields, 640)
    g = task_grammar(task, tok, source_words(task, tok, fields, ids))
    state = g.start()
    for t in tok.encode("the relation between aspirin and tremor exists ; the relation between aspirin and",
                        add_special_tokens=False):
        assert t in g.allowed(state)
        state = g.advance(state, t)
    assert tok.encode("tremor", add_special_tokens=False)[0] not in g.allowed(state)
    assert g.allowed(state)


@pytest.mark.parametrize(("text", "entity", "ok"), [
    ("levodopa-induced dyskinesia", "levodopa", True), ("bevacizumab/irinotecan", "irinotecan", True),
    ("given 100,000/uL platelets", "100,000/", False), ("given 100,000/uL platelets", "100,000/uL", True),
    ("indomethacin (IDM), then", "indomethacin (IDM)", True), ("indomethacin (IDM), then", "IDM", True),
    ("indomethacin (IDM), then", "indomethacin (IDM", False), ("with Ca(2+) ions", "Ca(2+)", True),
    ("with Ca(2+) ions", "Ca", False), ("with Ca(2+) ions", "2", False), ("it was 5 % more", "5 %", False),
    ("insulin's effect", "insulin", True), ("a tremor. then b", "tremor", True), ("a (b) c", ") c", False),
    ("x: y", ": y", False), ("a > b", "> b", False),
])
def test_entities_are_whole_words_of_the_text(tok, text, entity, ok):
    task, fields = TASKS["ddi"], {"title": "", "abstract": text}
    ids = build_input(task, tok, fields, 640)
    g = task_grammar(task, tok, source_words(task, tok, fields, ids), RELATIONS)
    state = g.start()
    for t in tok.encode("the interaction between " + entity.lower() + " and", add_special_tokens=False):
        if t not in g.allowed(state):
            assert not ok, entity
            return
        state = g.advance(state, t)
    assert ok, entity


def test_words_align_to_the_text_as_given(tok):
    """Moses' escapes and hyphens undone, case kept from the text, words it cannot match left out."""
    text = "Evidence \"which\" flows…] in TNF-α & IL-6 | ΟΔΟΣ İstanbul\x1bz"
    words = align(tok.encode_words(text.lower()), text, unescape=tok.unescape)
    found = {w.text: text[w.at[0]:w.at[1]] for w in words if w.at}
    assert found['"'] == '"' and found["tnf"] == "TNF" and found["&"] == "&" and found["|"] == "|"
    assert found["οδος"] == "ΟΔΟΣ" and found["…"] == "…" and found["stanbulz"] == "stanbul\x1bz"
    assert all(_norm(text[w.at[0]:w.at[1]]) == w.text.casefold() for w in words if w.at and len(w.text) > 1)
    task, fields = TASKS["bc5cdr"], {"title": "Lithium and tremor", "abstract": "It helps."}  # `tremor.`: its `.`
    words = source_words(task, tok, fields, build_input(task, tok, fields, 640))  # is the task's, not the text's
    assert all(w.at for w in words) and words[2].text == "tremor." and words[2].bare and words[2].at == (12, 18)


def test_a_model_that_repeats_its_first_relation_still_ends_with_a_period(tok):
    """A model whose logits favour one relation's tokens (and `;`) above all: constrained, it
    writes that relation once, then others, and every answer ends `.` then `</s>`."""
    task, fields = TASKS["bc5cdr"], {"title": "Lithium and tremor", "abstract": "Lithium causes tremor and "
                                     "ataxia. then clonidine causes hypotension."}
    config = BioGptConfig(**{**TINY, "vocab_size": tok.vocab_size, "max_position_embeddings": 128,
                             "learned_prompt": N})
    torch.manual_seed(0)
    model = BioGptForCausalLM(config).eval()
    ids = build_input(task, tok, fields, 60)
    favoured = tok.encode("the relation between lithium and tremor exists ;", add_special_tokens=False)
    for limit in (30, 64):
        g = task_grammar(task, tok, source_words(task, tok, fields, ids), limit=limit)
        opts = GenerationOptions(max_new_tokens=limit, logit_bias={t: 50.0 for t in favoured})
        out = generate(model, [ids], opts, constraints=[g])[0][0]
        text = tok.decode(out.ids)
        assert out.finish_reason == "eos" and text.endswith("."), text
        assert text.startswith("the relation between lithium and tremor exists"), text
        assert parse(task, text) is not None


# -- the CLI and the literature writers ----------------------------------------------------------
@pytest.fixture(scope="module")
def cdr_model(tmp_path_factory, real_vocab):
    """A random BC5CDR checkpoint on the real vocabulary (its answers are the grammar's, chosen at random)."""
    folder = tmp_path_factory.mktemp("cdr")
    vocab = json.loads((real_vocab[1] / "vocab.json").read_text())
    vocab.update({f"learned{k}</w>": len(vocab) + k - 1 for k in range(1, N + 1)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_bytes((real_vocab[1] / "merges.txt").read_bytes())
    config = BioGptConfig(**{**TINY, "vocab_size": len(vocab), "max_position_embeddings": 1024, "learned_prompt": N,
                             "task": "bc5cdr", "max_source_positions": 640})
    torch.manual_seed(5)
    model = BioGptForCausalLM(config)
    with torch.no_grad():  # `;` likelier than most: answers of several relations
        semi = json.loads((real_vocab[1] / "vocab.json").read_text())[";</w>"]
        model.biogpt.embed_tokens.weight[semi] *= 4
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "output_projection.weight"}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def _read(path, fmt):
    with open(path, "rb") as f:
        return list(documents(f, str(path), fmt))


@pytest.mark.skipif(shared_dir() is None, reason="needs ../shared/vocab (the real BPE merges)")
def test_cdr_documents_through_the_cli_are_grounded_in_every_format(cli, cdr_model, tmp_path):
    """The three CDR sample documents, `extract --constrained`: every JSONL relation has offsets
    that slice to its entities; PubTator and BioC XML outputs, read back by our own readers, tie
    every relation to mentions at those offsets, none `grounded: false`."""
    sample = ROOT / "tests" / "data" / "CDR_sample.test.CID.3docs.PubTator"
    code, _, err = cli("extract", "-m", cdr_model, "-i", sample, "--constrained", "-o", tmp_path / "r.jsonl", "-q")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    docs = {d["id"]: d for d in _read(sample, "pubtator")}
    assert len(records) == 3 and sum(len(r["relations"]) for r in records) >= 3
    for r in records:
        text = document_text(docs[r["id"]])
        for rel in r["relations"]:
            assert "grounded" not in rel
            for name, spans in ((rel["head"], rel["head_spans"]), (rel["tail"], rel["tail_spans"])):
                assert spans and all(_norm(text[s:e]) == _norm(name) for s, e in spans), (name, spans)
    for fmt, suffix in (("pubtator", "pubtator"), ("bioc", "xml")):
        out = tmp_path / f"r.{suffix}"
        code, _, err = cli("extract", "-m", cdr_model, "-i", sample, "--constrained", "-o", out, "-q")
        assert code == 0, err
        back = {d["id"]: d for d in _read(out, fmt)}
        for r in records:
            doc = back[r["id"]]
            text = document_text(doc)
            for a in doc["annotations"]:  # every mention, the input's and those added, slices to its text
                for loc in a["locations"]:
                    assert text[loc["offset"]:loc["offset"] + loc["length"]] == a["text"]
            if fmt == "bioc":
                assert len(doc["relations"]) >= len(r["relations"])
                assert not any((rel.get("infons") or {}).get("grounded") for rel in doc["relations"])
