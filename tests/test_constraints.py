"""Constrained decoding: the automata (constraints.py, grammars.py) and the engine's use of them."""

from __future__ import annotations

import json

import pytest
import torch

from biogpt_cli.constraints import Grammar, Held, OneOf, allowed_mask, fixed
from biogpt_cli.generation import GenerationOptions, generate, prompt_generator, stream_tokens
from biogpt_cli.grammars import choices, entity_span, source_words, task_grammar
from biogpt_cli.grounding import align
from biogpt_cli.tasks import HOC_LABELS, TASKS, build_input, parse
from biogpt_cli.tokenizer import BioGptTokenizer
from tests.conftest import make_reference
from tests.fixtures import shared_dir, write_tiny_vocab
from tests.test_model import ours_from

PROMPTS = [[2, 40, 41, 42], [2, 100, 7, 7, 9, 12, 60, 61], [2, 150], [2, 77, 78]]


class Everything:
    """An automaton that allows every token at every step, through the mask like any other."""

    def __init__(self, vocab: int) -> None:
        self.vocab = tuple(range(vocab))

    def start(self):
        return 0

    def allowed(self, state):
        return self.vocab

    def advance(self, state, token):
        return state + 1


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    write_tiny_vocab(folder, 3)
    return BioGptTokenizer.from_folder(folder)


def run(grammar, tok, text: str) -> tuple[bool, bool]:
    """(every token of `text` was allowed in turn, `</s>` is allowed after it)."""
    state = grammar.start()
    for t in tok.encode(text, add_special_tokens=False):
        if t not in grammar.allowed(state):
            return False, False
        state = grammar.advance(state, t)
    return True, 2 in grammar.allowed(state)


# -- the automata ------------------------------------------------------------------------------
def test_relation_grammar_takes_only_spans_of_the_source(tok):
    fields = {"abstract": "Warfarin raises INR with aspirin and heparin."}
    ids = build_input(TASKS["ddi"], tok, fields, 200)
    g = task_grammar(TASKS["ddi"], tok, source_words(TASKS["ddi"], tok, fields, ids), ("effect", "advise"))
    assert run(g, tok, "the interaction between warfarin and aspirin is effect.") == (True, True)
    assert run(g, tok, "the interaction between warfarin and raises inr with aspirin is advise; "
                       "the interaction between heparin and warfarin is effect.") == (True, True)
    assert run(g, tok, "the interaction between warfarin and aspirin is effect") == (True, False)  # no final .
    assert run(g, tok, "the interaction between ibuprofen")[0] is False  # not in the source
    assert run(g, tok, "the interaction between warf and")[0] is False  # not a whole word
    assert run(g, tok, "the interaction between aspirin and heparin and")[0] is False  # `and` joins, never inside
    assert run(g, tok, "the interaction between warfarin and aspirin is mechanism")[0] is False  # not a relation
    written = "the interaction between warfarin and aspirin is effect; the interaction between warfarin and aspirin is"
    ok, _ = run(g, tok, written)
    state = g.start()
    for t in tok.encode(written, add_special_tokens=False):
        state = g.advance(state, t)
    assert ok and tok.encode("effect", add_special_tokens=False)[0] not in g.allowed(state)  # never written twice
    assert run(g, tok, written + " advise.") == (True, True)


def test_bc5cdr_hoc_and_qa_grammars(tok):
    fields = {"title": "Lithium", "abstract": "It causes tremor."}
    ids = build_input(TASKS["bc5cdr"], tok, fields, 200)
    g = task_grammar(TASKS["bc5cdr"], tok, source_words(TASKS["bc5cdr"], tok, fields, ids))
    assert run(g, tok, "the relation between lithium and tremor exists.") == (True, True)
    assert run(g, tok, "the relation between lithium and renal failure")[0] is False
    hoc = task_grammar(TASKS["hoc"], tok)
    assert run(hoc, tok, "the type of this document is empty|resisting cell death.") == (True, True)
    assert run(hoc, tok, "the type of this document is empty|empty")[0] is False
    assert run(hoc, tok, "the type of this document is cancer")[0] is False
    qa = task_grammar(TASKS["pubmedqa"], tok)
    for answer in ("yes", "no", "maybe"):
        assert run(qa, tok, f"the answer to the question given the context is {answer}.") == (True, True)
    assert run(qa, tok, "the answer to the question given the context is perhaps")[0] is False
    assert run(qa, tok, "the answer to the question given the context is yes. yes")[0] is False


def test_a_span_may_end_or_go_on_until_a_token_settles_it(tok):
    """`the cell` and `the cell wall` are both spans: after `cell` the automaton allows both
    ending the span and going on, and a span may stop only at the end of a word."""
    text = "the cell wall"
    span = entity_span(tok, align(tok.encode_words(text), text), ())
    g = Grammar("t", 2, items=(span, fixed(tok.encode("!", add_special_tokens=False))))
    assert run(g, tok, "the cell!") == (True, True) and run(g, tok, "the cell wall!") == (True, True)
    assert run(g, tok, "cell wall!") == (True, True) and run(g, tok, "wall the")[0] is False
    assert run(g, tok, "the ce!")[0] is False


def test_a_source_is_ready_at_once(tok):
    """Nothing is built ahead for a 640-token source: the first step's tokens come at once."""
    import time

    text = " ".join(f"w{i % 97}x{i % 13}" for i in range(160))
    ids = build_input(TASKS["ddi"], tok, {"abstract": text}, 640)
    start = time.perf_counter()
    g = task_grammar(TASKS["ddi"], tok, source_words(TASKS["ddi"], tok, {"abstract": text}, ids), ("effect",))
    state = g.start()
    for t in tok.encode("the interaction between", add_special_tokens=False):
        state = g.advance(state, t)
    assert g.allowed(state) and time.perf_counter() - start < 0.05


def test_choices_are_a_trie(tok):
    g = choices(tok, ["no", "no effect", "yes"])
    assert run(g, tok, "no") == (True, True) and run(g, tok, "no effect") == (True, True)
    assert run(g, tok, "yes") == (True, True) and run(g, tok, "ye")[1] is False


# -- the engine --------------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [GenerationOptions(max_new_tokens=10),
                                  GenerationOptions(max_new_tokens=10, do_sample=True, top_k=20),
                                  GenerationOptions(max_new_tokens=8, num_beams=3, num_return_sequences=2),
                                  GenerationOptions(max_new_tokens=8, num_beams=2, do_sample=True)],
                         ids=["greedy", "sampling", "beams", "beam-sampling"])
def test_a_constraint_allowing_everything_changes_nothing(eos_ref, opts):
    ours = ours_from(eos_ref)
    seeds = [prompt_generator(4, i) for i in range(len(PROMPTS))] if opts.do_sample else None
    free = generate(ours, PROMPTS, opts, seeds)
    seeds = [prompt_generator(4, i) for i in range(len(PROMPTS))] if opts.do_sample else None
    held = generate(ours, PROMPTS, opts, seeds, constraints=[Everything(ours.config.vocab_size)] * len(PROMPTS))
    assert [[s.ids for s in p] for p in held] == [[s.ids for s in p] for p in free]


@pytest.mark.parametrize("opts", [GenerationOptions(max_new_tokens=12),
                                  GenerationOptions(max_new_tokens=12, do_sample=True, top_k=5),
                                  GenerationOptions(max_new_tokens=12, num_beams=3)],
                         ids=["greedy", "sampling", "beams"])
def test_constrained_rows_follow_their_grammar_beside_free_rows(eos_ref, tok, opts):
    """Odd prompts carry a grammar; even ones none. In one batch (and with continuous batching
    for greedy and sampling) the free rows equal themselves alone and the held rows write only
    what their grammar allows, ending at its end."""
    ours = ours_from(eos_ref)
    one = tok.encode("ab", add_special_tokens=False)
    g = Grammar("t", 2, items=(OneOf((tuple(one), (40, 41), (41,))),), sep=(fixed([44]),), unique=True)
    prompts = PROMPTS * 2
    grammars = [g if i % 2 else None for i in range(len(prompts))]
    seeds = [prompt_generator(4, i) for i in range(len(prompts))] if opts.do_sample else None
    together = generate(ours, prompts, opts, seeds, constraints=grammars)
    for i, (p, got) in enumerate(zip(prompts, together, strict=True)):
        if grammars[i] is None:
            alone = generate(ours, [p], opts, [prompt_generator(4, i)] if opts.do_sample else None)[0]
            assert [s.ids for s in got] == [s.ids for s in alone]
        else:
            for s in got:
                state = g.start()
                for t in s.ids:
                    assert t in g.allowed(state)
                    state = g.advance(state, t)
                assert s.finish_reason == "eos" or len(s.ids) == opts.max_new_tokens
    if opts.num_beams == 1:
        got: dict[int, list[int]] = {}
        for seq, t, reason in stream_tokens(ours, iter(prompts), opts, (lambda i: prompt_generator(4, i))
                                            if opts.do_sample else None, slots=3,
                                            constraint_of=grammars.__getitem__):
            if reason is None:
                got.setdefault(seq, []).append(t)
        assert [got.get(i, []) for i in range(len(prompts))] == [p[0].ids for p in together]


@pytest.mark.parametrize("slots", [None, 3], ids=["one batch", "continuous"])
def test_forced_tokens_are_fed_in_one_pass_with_the_same_tokens(eos_ref, monkeypatch, slots):
    """A grammar's fixed words are fed together with the token before them, in one forward pass:
    the same tokens, finish reasons and logits (for logprobs) as one token a pass, in fewer passes,
    with rows of several lengths, a stop token inside a fixed run and continuous batching."""
    from biogpt_cli import generation

    ours = ours_from(eos_ref)
    g = Grammar("t", 2, items=(OneOf(((50,), (51, 52, 53), (54,))),), head=(fixed([40, 41, 42, 43]),),
                sep=(fixed([44, 45]),), tail=(fixed([46, 47, 48]),), unique=True, limit=24)
    prompts = PROMPTS * 2
    passes = {"step": 0, "extend": 0}

    def run(speculate="auto"):
        for name in passes:
            passes[name] = 0
        seen, logits = {}, {}
        for i in range(2):  # the second time a stop token inside the head's run ends some rows there
            opts = GenerationOptions(max_new_tokens=24 - 3 * (i and 2), bad_words_ids=[[1]],
                                     stop_token_ids=[42] if i else [], speculate=speculate)
            for seq, tok, reason in stream_tokens(ours, iter(prompts), opts, slots=slots, constraint_of=lambda j: g,
                                                  observe=lambda q, t, x, i=i: logits.setdefault((i, q), []).append(
                                                      float(x[t]))):  # read at once: the scores are reused
                seen.setdefault((i, seq), []).append((tok, reason))
        return seen, logits

    for name in passes:
        real = getattr(generation.Frame, name)
        monkeypatch.setattr(generation.Frame, name, lambda self, *a, real=real, name=name:
                            passes.__setitem__(name, passes[name] + 1) or real(self, *a))
    fast, fast_logits = run()
    fast_passes = dict(passes)
    slow, slow_logits = run("off")
    assert fast == slow and fast_passes["extend"] and not passes["extend"]
    assert sum(fast_passes.values()) < passes["step"] / 2, (fast_passes, passes)
    for key, values in slow_logits.items():
        assert torch.allclose(torch.tensor(fast_logits[key]), torch.tensor(values), atol=1e-4)
    assert any(reason == "stop" for (i, _), events in slow.items() if i for _, reason in events)


def test_a_row_allowed_only_eos_ends_even_under_min_new_tokens(eos_ref):
    ours = ours_from(eos_ref)
    g = Grammar("t", 2, items=(fixed([40]),))
    out = generate(ours, [[2, 50]], GenerationOptions(max_new_tokens=6, min_new_tokens=4), constraints=[g])[0][0]
    assert out.ids == [40] and out.finish_reason == "eos"


def test_rows_states_follow_beams():
    g = Grammar("t", 2, items=(OneOf(((5, 6), (7,))),))
    rows = [Held(g), Held(g)]
    rows[0].advance(5)
    rows = [rows[p].after(t) for p, t in zip([0, 0], [6, 6], strict=True)]
    assert all(2 in g.allowed(h.state) for h in rows)
    mask = allowed_mask(rows, 10, torch.device("cpu"))
    assert mask.tolist() == [[i == 2 for i in range(10)]] * 2


def test_learned_prompt_tokens_are_never_generated(tmp_path):
    """A task checkpoint whose learned rows are made the likeliest next tokens: the reference
    writes them, ours never does."""
    from biogpt_cli.loading import load_pretrained

    ref = make_reference(tmp_path, seed=2, prompt_tokens=4)
    prompts = [[2, 40 + i, 50] for i in range(6)]
    with torch.no_grad():  # each learned row: a multiple of the row of a token the model picks (tied output)
        firsts = [int(ref(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
        weight = ref.biogpt.embed_tokens.weight
        weight[-4:] = 5 * weight[firsts[:4]]
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "output_projection.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, _ = load_pretrained(tmp_path)
    learned = range(ref.config.vocab_size - 4, ref.config.vocab_size)
    theirs = [ref.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=1)[0, 3:].tolist()
              for p in prompts]
    assert any(t in learned for row in theirs for t in row), "the test model does not favour its learned tokens"
    for opts in (GenerationOptions(max_new_tokens=8), GenerationOptions(max_new_tokens=8, num_beams=3),
                 GenerationOptions(max_new_tokens=8, do_sample=True, top_k=0)):
        for seqs in generate(ours, prompts, opts, [prompt_generator(1, i) for i in range(6)]
                             if opts.do_sample else None):
            assert not any(t in learned for s in seqs for t in s.ids)


# -- generate --choices ------------------------------------------------------------------------
def test_generate_choices(cli, tiny_ref, tmp_path):
    """Each continuation is one of the choices; the record says which. Greedy takes the likeliest
    first token among the choices' (single-token choices: the likeliest choice)."""
    from biogpt_cli.loading import load_pretrained

    folder = tiny_ref[1]
    lines = ["the cell", "a b c", "dna"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    code, out, err = cli("generate", "-m", folder, "-i", tmp_path / "in.txt", "--format", "jsonl",
                         "--choices", "x,y,z", "-n", "4")
    assert code == 0, err
    records = [json.loads(r) for r in out.splitlines()]
    lm, tk = load_pretrained(folder)
    ids = [tk.encode(c, add_special_tokens=False)[0] for c in "xyz"]
    for line, r in zip(lines, records, strict=True):
        assert r["constrained"] == "choices" and r["choice"] in "xyz" and r["text"].strip() == r["choice"]
        with torch.no_grad():
            logits = lm(torch.tensor([tk.encode(line)])).logits[0, -1]
        assert r["choice"] == "xyz"[int(logits[ids].argmax())]
    code, out, err = cli("generate", "-m", folder, "-i", tmp_path / "in.txt", "--format", "jsonl",
                         "--choices", "no effect,yes", "--sample", "--seed", "3", "--num-return-sequences", "3")
    assert code == 0 and all(json.loads(r)["choice"] in ("no effect", "yes") for r in out.splitlines()), err
    code, _, err = cli("generate", "-m", folder, "one", "--choices", "a,,b")
    assert code == 2 and "--choices needs non-empty texts" in err
    code, _, err = cli("generate", "-m", folder, "one", "--choices", "a long choice of many words", "-n", "2")
    assert code == 1 and "raise -n (max_new_tokens) to at least" in err


def test_choices_that_other_options_would_cut_are_left_out_or_refused(cli, tiny_ref):
    """A choice a ban or --min-new-tokens would cut is left out (a note says so); none left, a
    choice the vocabulary cannot spell, or --no-repeat-ngram-size: exit 2 naming both options."""
    folder = tiny_ref[1]
    base = ("generate", "-m", folder, "the cell", "--format", "jsonl", "-n", "4")
    code, out, err = cli(*base, "--choices", "x,y z", "--ban", "z")
    assert code == 0 and json.loads(out)["choice"] == "x" and "'y z' (it holds a banned word (--ban)): left out" in err
    code, out, err = cli(*base, "--choices", "x,y z", "--min-new-tokens", "2")
    assert code == 0 and json.loads(out)["choice"] == "y z", err
    for extra, words in ((("--choices", "y z", "--ban", "z"), "none is left"),
                         (("--choices", "x,y", "--no-repeat-ngram-size", "2"), "--no-repeat-ngram-size"),
                         (("--choices", "\u00ad,x"), "<unk>"), (("--choices", "x y,x", "--ban", "q x"), "--ban")):
        code, _, err = cli(*base, *extra)
        assert code == 2 and "--choices" in err and words in err and err.count("\n") == 1, err


def test_parse_of_a_constrained_answer_is_never_null(tok):
    """Whatever path a grammar's answer takes, the task's parser reads it."""
    text = "the type of this document is " + "|".join(HOC_LABELS[:3]) + "."
    assert run(task_grammar(TASKS["hoc"], tok), tok, text) == (True, True)
    assert parse(TASKS["hoc"], text) == list(HOC_LABELS[:3])


# -- evidence on a model trained to write relations ----------------------------------------------
DRUGS = ["aspirin", "warfarin", "heparin", "insulin", "lithium", "digoxin", "metformin", "ibuprofen", "phenytoin",
         "amiodarone", "cimetidine", "rifampin", "ketoconazole", "theophylline", "methotrexate", "cyclosporine"]
SAYINGS = {"effect": "{a} increases the effect of {b}.", "advise": "{a} should not be given with {b}.",
           "mechanism": "{a} raises the plasma levels of {b}.", "int": "{a} interacts with {b}."}
FILLER = ["patients were studied.", "this was a case report.", "no other drugs were used.", ""]


def ddi_documents(seed: int, n: int, unseen: set | None = None) -> dict:
    """The DDI release's JSON: one drug pair a document, said in one of four ways among filler."""
    import random

    rng, out = random.Random(seed), {}
    while len(out) < n:
        a, b = rng.sample(DRUGS, 2)
        if unseen is not None and (a, b) in unseen:
            continue
        rel = rng.choice(list(SAYINGS))
        text = " ".join(x for x in (rng.choice(FILLER), SAYINGS[rel].format(a=a.capitalize(), b=b),
                                    rng.choice(FILLER)) if x)
        out[f"{seed}-{len(out)}"] = {"abstract": text, "triples": [{"drug": a, "target": b, "interaction": rel}]}
    return out


@pytest.mark.skipif(shared_dir() is None, reason="needs ../shared/vocab (the real BPE merges)")
def test_extract_constrained_writes_only_the_documents_entities(cli, tmp_path):
    """A tiny model fine-tuned (biogpt finetune) on 64 synthetic DDI documents learns the template
    and the relation words but copies names poorly: unconstrained, it names drugs its held-out
    documents do not contain; constrained, every entity is a span of the document, every
    relation one of the training data's (kept in the checkpoint), no answer is null, and the F1 of
    `evaluate` is not lower."""
    from biogpt_cli.tokenizer import BioGptTokenizer

    train = ddi_documents(1, 64)
    test = ddi_documents(2, 20, {(t["drug"], t["target"]) for d in train.values() for t in d["triples"]})
    vocab = shared_dir() / "vocab" / "biogpt"
    full = BioGptTokenizer.from_fairseq_files(vocab / "dict.txt", vocab / "bpecodes")
    texts = [d["abstract"].lower() for d in [*train.values(), *test.values()]] + [
        f"the interaction between {d} and {d} is {r}; ." for d in DRUGS for r in SAYINGS]
    pieces = sorted({p for t in texts for p in full.tokenize(t)})  # the real BPE, a vocabulary of what is used
    encoder = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{p: i + 4 for i, p in enumerate(pieces)}}
    base = tmp_path / "base"
    make_reference(base, seed=1, hidden_size=64, intermediate_size=128, max_position_embeddings=128,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, vocab_size=len(encoder))
    (base / "vocab.json").write_text(json.dumps(encoder))
    (base / "merges.txt").write_bytes((vocab / "bpecodes").read_bytes())
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": k, "abstract": v["abstract"]}) + "\n"
                                               for k, v in test.items()))
    code, _, err = cli("finetune", tmp_path / "train.json", "--task", "ddi", "-m", base, "-o", tmp_path / "ddi",
                       "--epochs", "120", "--lr", "1e-2", "--warmup", "10", "--tokens-per-update", "4096",
                       "--batch-tokens", "2048", "--average", "1", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "ddi" / "config.json").read_text())["relations"] == sorted(SAYINGS)
    f1 = {}
    for how in ("free", "constrained"):
        out = tmp_path / f"{how}.jsonl"
        code, _, err = cli("extract", "-m", tmp_path / "ddi", "-i", tmp_path / "in.jsonl", "-o", out, "-q",
                           *(["--constrained"] if how == "constrained" else []))
        assert code == 0, err
        code, scores, err = cli("evaluate", out, tmp_path / "test.json", "--task", "ddi", "--format", "jsonl")
        f1[how] = json.loads(scores)["f1"]
        records = [json.loads(line) for line in out.read_text().splitlines()]
        if how == "constrained":
            assert all(r["constrained"] == "ddi" and r["relations"] for r in records)
            for r in records:
                words = test[r["id"]]["abstract"].lower().replace(".", " .").split()
                for rel in r["relations"]:
                    assert rel["relation"] in SAYINGS and "grounded" not in rel
                    for name in (rel["head"], rel["tail"]):
                        n = len(name.split())
                        assert any(words[i:i + n] == name.split() for i in range(len(words))), (name, words)
        else:
            named = [name for r in records for rel in r["relations"] or () for name in (rel["head"], rel["tail"])]
            assert any(name not in test[r["id"]]["abstract"].lower() for r in records for name in named)
    assert f1["constrained"] >= f1["free"], f1
