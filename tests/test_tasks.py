"""BioGPT's fine-tuned tasks: checkpoints with learned prompt tokens, inputs built as the release
builds them, the reference's greedy tokens, the release's post-processing, and the paper's metrics."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from biogpt_cli import BioGptConfig, BioGptForCausalLM, BioGptTokenizer, CheckpointError
from biogpt_cli.loading import load_pretrained
from biogpt_cli.tasks import HOC_LABELS, TASKS, build_input, parse
from tests.conftest import TINY, make_reference, one_error_line, write_tiny_vocab
from tests.test_loading import fairseq_folder

N = 9  # learned prompt tokens, as the release's RE and QA checkpoints have
RE_TASK = {"learned_prompt": N, "max_source_positions": 640, "data": "../../data/BC5CDR/relis-bin"}


@pytest.fixture(scope="module")
def task_ref(tmp_path_factory):
    """(reference with N extra embedding rows, its Hub folder whose vocab.json has learned1..N)."""
    folder = tmp_path_factory.mktemp("task-hub")
    return make_reference(folder, seed=3, prompt_tokens=N, max_position_embeddings=128), folder


# -- checkpoints -------------------------------------------------------------------------------
def test_hub_layout_with_learned_prompt_tokens(task_ref):
    ref, folder = task_ref
    model, tok = load_pretrained(folder)
    v = tok.vocab_size - N
    assert model.config.learned_prompt == N and tok.prompt_ids == list(range(v, v + N))
    assert not set(tok.encode("learned1 learned9 learned")) & set(tok.prompt_ids)  # text never encodes to them
    ids = [2, 10, *tok.prompt_ids, 11]
    assert "learned1" not in tok.decode(ids, skip_special_tokens=True)
    assert "learned1 learned2" in tok.decode(ids)  # shown only when asked for special tokens


@pytest.mark.parametrize("name", ["checkpoint.pt", "checkpoint_avg.pt", "checkpoint_last.pt"])
def test_fairseq_task_checkpoint_loads_converts_and_round_trips(task_ref, tmp_path, cli, name):
    ref, folder = task_ref
    src = fairseq_folder(ref, folder, tmp_path / "fairseq", task=RE_TASK, name=name)
    assert len((src / "dict.txt").read_text().splitlines()) + 4 == ref.config.vocab_size - N
    model, tok = load_pretrained(src)
    assert (model.config.task, model.config.learned_prompt, model.config.max_source_positions) == ("bc5cdr", N, 640)
    ids = torch.tensor([[2, 10, 20, *tok.prompt_ids]])
    with torch.no_grad():
        expected = ref(ids).logits
    assert torch.allclose(model(ids).logits, expected, atol=1e-4)
    code, _, err = cli("convert", src, tmp_path / "hub")
    assert code == 0, err
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert (config["task"], config["learned_prompt"], config["max_source_positions"]) == ("bc5cdr", N, 640)
    again, tok2 = load_pretrained(tmp_path / "hub")
    assert tok2.encoder == tok.encoder and tok2.prompt_ids == tok.prompt_ids
    assert torch.allclose(again(ids).logits, expected, atol=1e-4)
    assert transformers.BioGptForCausalLM.from_pretrained(tmp_path / "hub").config.vocab_size == ref.config.vocab_size
    code, out, _ = cli("info", "-m", tmp_path / "hub")
    assert code == 0 and "task: bc5cdr" in out and f"learned prompt tokens: {N}" in out and "source limit: 640" in out


def test_fairseq_prompt_count_must_match_the_embedding(task_ref, tmp_path):
    ref, folder = task_ref
    src = fairseq_folder(ref, folder, tmp_path / "fairseq", task={**RE_TASK, "learned_prompt": 1})
    with pytest.raises(CheckpointError, match="says 1 learned prompt tokens, but its embedding has"):
        load_pretrained(src)


def test_extra_embedding_rows_are_taken_as_the_learned_prompt(task_ref, tmp_path, cli):
    """A Hub task checkpoint (BioGPT-Large-PubMedQA: 57,726 rows for 57,717 tokens) whose
    vocabulary lacks the learned tokens: the extra rows are the prompt, and the task command says so."""
    ref, folder = task_ref
    for f in ("config.json", "model.safetensors", "merges.txt"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    base = write_tiny_vocab(tmp_path)  # the vocabulary without the learned tokens
    model, tok = load_pretrained(tmp_path)
    assert model.config.learned_prompt == N and tok.prompt_ids == list(range(base, base + N))
    assert "taken as learned prompt tokens learned1..9" in tok.prompt_note
    code, _, err = cli("extract", "-m", tmp_path, "--task", "bc5cdr", "-n", "2", "aspirin")
    assert code == 0 and "taken as learned prompt tokens" in err


def test_learned_tokens_spelled_without_the_word_end_are_recognised(task_ref, tmp_path):
    ref, folder = task_ref
    for f in ("config.json", "model.safetensors", "merges.txt"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    vocab = json.loads((folder / "vocab.json").read_text())
    (tmp_path / "vocab.json").write_text(json.dumps({k.replace("</w>", "") if k.startswith("learned") else k: v
                                                     for k, v in vocab.items()}))
    model, tok = load_pretrained(tmp_path)
    assert tok.prompt_ids == list(range(len(vocab) - N, len(vocab))) and tok.prompt_note is None


# -- inputs ------------------------------------------------------------------------------------
def test_inputs_follow_the_release_on_the_real_vocabulary(real_vocab):
    tok = BioGptTokenizer.from_folder(real_vocab[0])
    tok.add_prompt_tokens(N)
    assert tok.prompt_ids == list(range(42384, 42393))
    doc = {"title": "Cisplatin and NPC", "abstract": "Cisplatin caused nephrotoxicity in rats."}
    joined = "cisplatin and npc. cisplatin caused nephrotoxicity in rats."  # title + ". " + abstract, lowercased
    expected = [2, *tok.encode(joined, add_special_tokens=False), *range(42384, 42393)]
    assert build_input(TASKS["bc5cdr"], tok, doc, 640) == expected
    assert build_input(TASKS["kd-dti"], tok, {**doc, "title": "Cisplatin?"}, 640)[1:4] == \
        tok.encode("cisplatin? cisplatin", add_special_tokens=False)[:3]  # no ". " after a title ending in \W
    assert build_input(TASKS["ddi"], tok, doc, 640)[1:-N] == tok.encode(doc["abstract"].lower(), False)
    qa = {"question": "Is it?", "context": ["A  b.", "C\nd."]}
    assert build_input(TASKS["pubmedqa"], tok, qa, 900)[1:-N] == tok.encode("question: Is it? context: A b. C d. ",
                                                                           False)
    free = build_input(TASKS["pubmedqa"], tok, {**qa, "long_answer": "Yes"}, 900)[1:-N]
    assert free == tok.encode("question: Is it? context: A b. C d. answer: Yes.", False)
    assert build_input(TASKS["hoc"], tok, {"text": "( DCs ) grow"}, 900)[1:-N] == tok.encode("( DCs ) grow.", False)
    long = build_input(TASKS["bc5cdr"], tok, {"text": "word " * 700}, 640)
    assert len(long) == 1 + 640 + N and long[640] == 11475  # 639 source tokens, then `...`


# -- post-processing ---------------------------------------------------------------------------
@pytest.mark.parametrize("task, text, expected", [
    ("pubmedqa", "the answer to the question given the context is yes.", "yes"),
    ("pubmedqa", "learned8 learned9 the answer to the question given the context is no.", "no"),
    ("pubmedqa", "the answer to the question given the context is yes. context: more text", None),
    ("pubmedqa", "nothing like the template", None),
    ("hoc", "the type of this document is resisting cell death|empty.", ["resisting cell death", "empty"]),
    ("hoc", "the type of this document is empty|empty", ["empty"]),
    ("bc5cdr", "the relation between sodium and potassium chloride and renal failure exists; "
               "the relation between lithium and tremor exists; the relation between lithium and tremor exists.",
     [{"head": "sodium and potassium chloride", "relation": "CID", "tail": "renal failure"},
      {"head": "lithium", "relation": "CID", "tail": "tremor"}]),
    ("bc5cdr", "in conclusion , the relation between a and b exists", [{"head": "a", "relation": "CID", "tail": "b"}]),
    ("bc5cdr", "learned9 in conclusion , the relation between a and b exists", None),  # the release: first prefix only
    ("ddi", "the interaction between aspirin and warfarin is effect; the interaction between x and y is advise.",
     [{"head": "aspirin", "relation": "effect", "tail": "warfarin"}, {"head": "x", "relation": "advise", "tail": "y"}]),
    ("kd-dti", "we can conclude that the interaction between imatinib and abl1 is inhibitor.",
     [{"head": "imatinib", "relation": "inhibitor", "tail": "abl1"}]),
    ("ddi", "no relation here", None),
])
def test_parsers(task, text, expected):
    assert parse(TASKS[task], text) == expected


# -- end to end with a model trained to answer -------------------------------------------------
EXAMPLES = [  # (command args, JSONL input, template answer, parsed result)
    (["qa"], {"question": "is it bad", "context": "it is bad"},
     "the answer to the question given the context is yes.", "yes"),
    (["qa"], {"question": "is it good", "context": "it is not"},
     "the answer to the question given the context is no.", "no"),
    (["extract", "--task", "bc5cdr"], {"title": "Aspirin", "abstract": "It causes ulcer."},
     "the relation between aspirin and ulcer exists.", [{"head": "aspirin", "relation": "CID", "tail": "ulcer"}]),
    (["extract", "--task", "ddi"], {"abstract": "Warfarin with aspirin."},
     "the interaction between warfarin and aspirin is effect.",
     [{"head": "warfarin", "relation": "effect", "tail": "aspirin"}]),
    (["classify"], {"text": "cells divide"}, "the type of this document is empty.", ["empty"]),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BioGPT trained in seconds to answer each example's input with its template."""
    folder = tmp_path_factory.mktemp("trained")
    vocab = write_tiny_vocab(folder, N)
    config = BioGptConfig(**{**TINY, "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 256,
                             "vocab_size": vocab, "learned_prompt": N, "hidden_dropout_prob": 0.0,
                             "attention_probs_dropout_prob": 0.0})
    tok = BioGptTokenizer.from_folder(folder)
    torch.manual_seed(0)
    model = BioGptForCausalLM(config)
    rows = []
    for args, fields, answer, _ in EXAMPLES:
        task = TASKS["pubmedqa" if args[0] == "qa" else "hoc" if args[0] == "classify" else args[2]]
        source = build_input(task, tok, fields, 200)
        rows.append((source, tok.encode(answer, add_special_tokens=False) + [2]))
    width = max(len(s) + len(t) for s, t in rows)
    ids = torch.full((len(rows), width), 1)
    labels = torch.full((len(rows), width), -100)
    for i, (s, t) in enumerate(rows):
        ids[i, :len(s) + len(t)] = torch.tensor(s + t)
        labels[i, len(s):len(s) + len(t)] = torch.tensor(t)
    mask = (labels != -100) | (torch.arange(width) < torch.tensor([len(s) for s, _ in rows])[:, None])
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(ids, attention_mask=mask.long(), labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        if loss.item() < 1e-3:
            break
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "output_projection.weight"}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: " ".join(e[0]) + " " + e[2].split()[1])
def test_task_commands_return_the_trained_answers(cli, trained, tmp_path, example):
    args, fields, answer, result = example
    key = {"qa": "answer", "extract": "relations", "classify": "labels"}[args[0]]
    (tmp_path / "in.jsonl").write_text(json.dumps({**fields, "id": "doc1"}) + "\n\n")
    code, out, err = cli(*args, "-m", trained, "-i", tmp_path / "in.jsonl", "--format", "jsonl")
    assert (code, err) == (0, "note: skipped 1 blank line\n"), err
    record = json.loads(out)
    assert record["id"] == "doc1" and record["finish_reason"] == "eos" and record[key] == result
    assert record["text"].strip() == answer


def test_task_output_file_resumes_and_counts_unparsable(cli, task_ref, tmp_path):
    """Random weights answer nonsense: a null result and a note, never a crash; -o resumes."""
    folder = task_ref[1]
    lines = [json.dumps({"question": f"q{i}", "context": f"c{i}", "id": i}) for i in range(3)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    args = ("qa", "-m", folder, "-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "-n", "4")
    code, _, err = cli(*args)
    records = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert code == 0 and [r["id"] for r in records] == [0, 1, 2] and all(r["answer"] is None for r in records)
    assert "3 outputs did not parse as a pubmedqa answer" in err
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["run"]["task"] == "pubmedqa"
    code, _, err = cli(*args, "--resume")
    assert code == 0 and "3 inputs already done" in err and len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


def test_generated_ids_equal_the_reference_greedy(cli, task_ref, tmp_path):
    ref, folder = task_ref
    _, tok = load_pretrained(folder)
    docs = [{"title": "Aspirin", "abstract": "It causes ulcer in some of the patients."}, {"text": "short one"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    code, out, err = cli("extract", "--task", "bc5cdr", "-m", folder, "-i", tmp_path / "in.jsonl",
                         "--format", "jsonl", "-n", "20")
    assert code == 0, err
    for doc, record in zip(docs, map(json.loads, out.splitlines()), strict=True):
        ids = build_input(TASKS["bc5cdr"], tok, doc, 640)
        expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=20, do_sample=False, bad_words_ids=[[1]], pad_token_id=1)
        new = expected[0, len(ids):].tolist()
        assert record["ids"] == (new[:new.index(2)] if 2 in new else new)


# -- bad input ---------------------------------------------------------------------------------
def test_bad_task_inputs(cli, tiny_ref, task_ref, tmp_path):
    plain, fine_tuned = tiny_ref[1], task_ref[1]
    code, _, err = cli("qa", "-m", plain, "--question", "q", "--context", "c")
    assert code == 1 and "language model without learned prompt tokens" in one_error_line(err)
    assert f"make one from the task's data: biogpt finetune TRAIN --task pubmedqa -m {plain} -o FOLDER" in err
    code, _, err = cli("extract", "-m", plain, "some text")
    assert code == 1 and ("needs one: RE-BC5CDR-BioGPT, RE-DDI-BioGPT or RE-DTI-BioGPT from the original release"
                          in one_error_line(err)) and err.count("github.com") == 1
    code, _, err = cli("qa", "-m", fine_tuned, "--question", "q", "--context", "c", "--reasoning-free")
    assert code == 2 and "--reasoning-free reads LONG_ANSWER from a PubMedQA .json file" in one_error_line(err)
    code, _, err = cli("extract", "-m", fine_tuned, "some text")
    assert code == 1 and "pass --task bc5cdr|ddi|kd-dti" in one_error_line(err)
    (tmp_path / "a.jsonl").write_text('{"question": "q"}\n')
    code, _, err = cli("qa", "-m", fine_tuned, "-i", tmp_path / "a.jsonl")
    assert code == 1 and 'line 1: expected a string field "context"' in one_error_line(err)
    (tmp_path / "a.json").write_text('{"question": "q", "context": "c"}\n' * 2)  # JSONL under a .json name
    code, _, err = cli("qa", "-m", fine_tuned, "-i", tmp_path / "a.json")
    assert code == 1 and "not a PubMedQA JSON file" in one_error_line(err) and "--input-format jsonl" in err
    code, out, err = cli("qa", "-m", fine_tuned, "-i", tmp_path / "a.json", "--input-format", "jsonl", "-n", "2",
                         "--format", "jsonl")
    assert code == 0 and [json.loads(x)["line"] for x in out.splitlines()] == [1, 2], err
    code, _, err = cli("qa", "-m", fine_tuned, "--question", "q", "--context", " ")
    assert code == 1 and 'the field "context" is empty' in one_error_line(err)
    code, _, err = cli("extract", "--task", "mesh", "-m", fine_tuned, "x")
    assert code == 2 and "--task" in one_error_line(err)
    code, _, err = cli("extract", "--task", "ddi", "-m", fine_tuned, "-i", tmp_path / "a.jsonl", "--text", "title")
    assert code == 2 and "--text title: extract reads each document as its task does" in one_error_line(err)


def test_wrong_task_for_the_checkpoint(cli, task_ref, tmp_path):
    ref, folder = task_ref
    src = fairseq_folder(ref, folder, tmp_path / "fairseq", task=RE_TASK)
    code, _, err = cli("extract", "--task", "ddi", "-m", src, "x")
    assert code == 1 and "--task ddi does not match" in one_error_line(err) and "bc5cdr" in err
    code, _, err = cli("qa", "-m", src, "--question", "q", "--context", "c")
    assert code == 1 and "fine-tuned for bc5cdr: run it with `biogpt extract`" in one_error_line(err)


# -- evaluate ----------------------------------------------------------------------------------
def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def evaluate(cli, *args):
    code, out, err = cli("evaluate", *map(str, args), "--format", "jsonl")
    assert code == 0, err
    return json.loads(out)


def test_evaluate_pubmedqa(cli, tmp_path):
    gold = tmp_path / "test_ground_truth.json"
    gold.write_text(json.dumps({"1": "yes", "2": "no", "3": "maybe", "4": "yes"}))
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "answer": "yes"}, {"id": "2", "answer": "yes"},
                                               {"id": "3", "answer": "maybe"}])
    scores = evaluate(cli, "--task", "pubmedqa", preds, gold)
    # macro-F1 as sklearn's f1_score(average="macro"): yes 0.5, no 0, maybe 1
    assert scores == {"task": "pubmedqa", "accuracy": 0.5, "macro_f1": 0.5, "correct": 2, "n": 4, "missing": 1,
                      "extra": 0}
    other = write_jsonl(tmp_path / "o.jsonl", [{"id": "91", "answer": "yes"}, {"id": "92", "answer": "no"}])
    code, _, err = cli("evaluate", "--task", "pubmedqa", str(other), str(gold))  # another test set's answers
    assert code == 1 and "none of its records matches one of the 4 gold items" in one_error_line(err)
    write_jsonl(other, [{"id": "1", "answer": "yes"}, {"id": "92", "answer": "no"}])
    code, out, err = cli("evaluate", "--task", "pubmedqa", str(other), str(gold))
    assert code == 0 and "note: 1 prediction with no gold item, not scored" in err
    assert "\naccuracy\t0.2500\nmacro_f1\t" in out and "─" not in out  # into a pipe: plain lines
    gold.write_text("{}")  # nothing to score: an error, not an accuracy of 0
    code, _, err = cli("evaluate", "--task", "pubmedqa", str(preds), str(gold))
    assert code == 1 and "no gold items to score against" in one_error_line(err)
    gold.write_text(json.dumps({"id": "1", "answer": "yes"}))  # a prediction record given as the gold file
    code, _, err = cli("evaluate", "--task", "pubmedqa", str(preds), str(gold))
    assert code == 1 and 'pmid id has the label "1", not yes, no or maybe' in one_error_line(err)


def test_evaluate_hoc(cli, tmp_path):
    gold = tmp_path / "test.tsv"
    gold.write_text("s1\tempty\n\ns3\tinducing angiogenesis|resisting cell death\ns4\tempty\n")
    preds = write_jsonl(tmp_path / "p.jsonl", [{"line": 1, "labels": ["empty"]},
                                               {"line": 3, "labels": ["inducing angiogenesis", "not a label"]}])
    scores = evaluate(cli, "--task", "hoc", preds, gold)
    # tp 2 (empty, angiogenesis), fp 0, fn 2 (cell death, line 4's empty): P 1, R 0.5, F1 2/3
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5 and abs(scores["f1"] - 2 / 3) < 1e-9
    assert (scores["n"], scores["missing"]) == (3, 1)
    write_jsonl(preds, [{"id": "1", "labels": ["empty"]}])  # HoC records join on the line only
    code, _, err = cli("evaluate", "--task", "hoc", str(preds), str(gold))
    assert code == 1 and one_error_line(err).endswith('line 1: a prediction record needs "line"')


def test_evaluate_ddi_hard_match(cli, tmp_path):
    gold = tmp_path / "test.json"
    gold.write_text(json.dumps({
        "10": {"abstract": "...", "triples": [{"drug": "Aspirin", "target": "Warfarin", "interaction": "effect"},
                                              {"drug": "Abc (AB)", "target": "x", "interaction": "advise"}]},
        "11": {"abstract": "...", "triples": [{"drug": "y", "target": "z", "interaction": "int"}]},
        "12": {"abstract": "...", "triples": []},
    }))
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "10", "relations": [{"head": "aspirin", "relation": "effect", "tail": "warfarin"},
                                   {"head": "ab", "relation": "advise", "tail": "x"}]}])
    scores = evaluate(cli, "--task", "ddi", preds, gold)
    # doc 10: under the abbreviation normalisation both triples match: P = R = 1; doc 11 missing: P = R = 0
    assert scores["sample_precision"] == 0.5 and scores["sample_recall"] == 0.5 and scores["f1"] == 0.5
    # corpus: 2 predicted, 3 gold, 2 matched -> P 1, R 2/3
    assert scores["onto_precision"] == 1.0 and abs(scores["onto_recall"] - 2 / 3) < 1e-9
    assert (scores["n"], scores["missing"]) == (2, 1)


def test_evaluate_bc5cdr(cli, tmp_path):
    gold = tmp_path / "gold.PubTator"
    gold.write_text("1|t|Title one\n1|a|Abstract.\n1\tCID\tD001\tD100\n1\tCID\tD002\tD100\n\n"
                    "2|t|Title two\n2|a|Abstract.\n2\tCID\tD003\tD300\n")
    entities = tmp_path / "test.entities.json"
    entities.write_text(json.dumps({"chemical2id": {"aspirin": "D001", "lithium": "D003"},
                                    "disease2id": {"ulcer": "D100", "tremor": "D300"}}))
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "1", "relations": [{"head": "aspirin", "relation": "CID", "tail": "ulcer"},
                                  {"head": "unknown", "relation": "CID", "tail": "ulcer"}]},
        {"id": "2", "relations": [{"head": "lithium", "relation": "CID", "tail": "tremor"}]}])
    scores = evaluate(cli, "--task", "bc5cdr", preds, gold, "--entities", entities)
    # predicted {(1,D001,D100), (1,-1,D100), (2,D003,D300)}; gold 3; tp 2 -> P = R = F1 = 2/3
    assert abs(scores["precision"] - 2 / 3) < 1e-9 and abs(scores["recall"] - 2 / 3) < 1e-9
    assert scores["missing"] == 0 and scores["gold_relations"] == 3
    code, _, err = cli("evaluate", "--task", "bc5cdr", str(preds), str(gold))
    assert code == 1 and "needs --entities" in one_error_line(err)
    # the gold as BioC (JSON: the corpus's relation infons), the predictions as PubTator (identifiers)
    bioc = {"documents": [{"id": pmid, "passages": [{"infons": {"type": "title"}, "offset": 0, "text": "T"}],
                           "relations": [{"id": f"R{i}", "infons": {"relation": "CID", "Chemical": c, "Disease": d}}
                                         for i, (c, d) in enumerate(pairs)]}
                          for pmid, pairs in (("1", [("D001", "D100"), ("D002", "D100")]), ("2", [("D003", "D300")]))]}
    (tmp_path / "gold.json").write_text(json.dumps(bioc))
    (tmp_path / "pred.pubtator").write_text("1|t|T\n1|a|\n1\tCID\tD001\tD100\n1\tCID\tD999\tD100\n\n"
                                            "2|t|T\n2|a|\n2\tCID\tD003\tD300\n")
    again = evaluate(cli, "--task", "bc5cdr", tmp_path / "pred.pubtator", tmp_path / "gold.json")
    assert {k: again[k] for k in ("precision", "recall", "f1")} == {k: scores[k] for k in ("precision", "recall", "f1")}


def test_qa_reads_the_official_pubmedqa_json(cli, trained, tmp_path):
    official = {"111": {"QUESTION": "is it bad", "CONTEXTS": ["it is", "bad"], "LONG_ANSWER": "x"},
                "222": {"QUESTION": "is it good", "CONTEXTS": ["it is not"], "LONG_ANSWER": "y"}}
    (tmp_path / "test_set.json").write_text(json.dumps(official))
    code, out, err = cli("qa", "-m", trained, "-i", tmp_path / "test_set.json", "--format", "jsonl")
    assert code == 0, err
    assert [(r["id"], r["answer"]) for r in map(json.loads, out.splitlines())] == [("111", "yes"), ("222", "no")]


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_classify_with_a_classification_head(cli, tmp_path, head):
    vocab = write_tiny_vocab(tmp_path)
    labels = ["neg", "pos"] if head == "sequence" else ["O", "B-Chem", "I-Chem"]
    cls = transformers.BioGptForSequenceClassification if head == "sequence" else \
        transformers.BioGptForTokenClassification
    cfg = transformers.BioGptConfig(**TINY, vocab_size=vocab, id2label=dict(enumerate(labels)))
    torch.manual_seed(1)
    ref = cls(cfg).eval()
    ref.save_pretrained(tmp_path)
    texts = ["the cat and the dog", "of"]
    code, out, err = cli("classify", "-m", tmp_path, "--format", "jsonl", stdin="\n".join(texts).encode())
    assert code == 0, err
    tok = BioGptTokenizer.from_folder(tmp_path)
    for text, record in zip(texts, map(json.loads, out.splitlines()), strict=True):
        with torch.no_grad():
            logits = ref(torch.tensor([tok.encode(text)])).logits
        if head == "sequence":
            probs = logits[0].softmax(-1)
            assert record["label"] == labels[int(probs.argmax())]
            assert abs(record["scores"]["pos"] - probs[1].item()) < 1e-4
        else:
            first, words = 1, []
            for _, ids in tok.encode_words(text):
                words.append(labels[int(logits[0, first].argmax())])
                first += len(ids)
            spans = [(e["start"], e["end"], e["label"]) for e in record["entities"]]
            covered = [n for s, e, _ in spans for n in range(s, e)]
            assert covered == [n for n, label in enumerate(words) if label != "O"]
            assert all(words[s].endswith("Chem") and words[s] != "O" for s, _, _ in spans)
    out_file = tmp_path / "out.jsonl"  # -o: the same records, and a manifest that ends "complete", not "running"
    code, _, err = cli("classify", "-m", tmp_path, "-o", out_file, stdin="\n".join(texts).encode())
    assert code == 0 and out_file.read_text() == out, err
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert (manifest["status"], manifest["records"]) == ("complete", 2)
    code, out, _ = cli("info", "-m", tmp_path, "--format", "jsonl")
    assert code == 0 and json.loads(out)["task"].startswith("labels from a BioGptFor") and "head" in out
    # a head generates nothing: the commands that decode say where it runs; embed takes its decoder
    for args, status in ((["generate", "of"], 1), (["score"], 1), (["qa", "--question", "q", "--context", "c"], 1),
                         (["classify", "of", "-n", "3"], 2)):
        code, _, err = cli(*args, "-m", tmp_path, stdin=b"of\n")
        assert code == status and ("head: run it with `biogpt classify`" in one_error_line(err) if status == 1
                                   else "generates nothing" in one_error_line(err)), (args, err)
    code, out, err = cli("embed", "the cat", "-m", tmp_path, "--pool", "last")
    with torch.no_grad():
        hidden = transformers.BioGptModel.from_pretrained(tmp_path)(torch.tensor([tok.encode("the cat")]))
    assert code == 0 and torch.allclose(torch.tensor(json.loads(out)["embedding"]), hidden.last_hidden_state[0, -1],
                                        atol=1e-4), err


def test_text_output_says_null_for_an_answer_that_did_not_parse(cli, task_ref, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"question": "q", "context": "c"}) + "\n")
    code, out, err = cli("qa", "-m", task_ref[1], "-i", tmp_path / "in.jsonl", "-n", "3", "--format", "text")
    assert code == 0 and out == "null\n" and "did not parse" in err


def test_constrained_answers_are_always_the_tasks(cli, trained, tmp_path):
    """`--constrained`: the trained answers are unchanged, and inputs the model never saw get an
    answer the task allows (never null): qa yes/no/maybe, classify HoC labels."""
    for args, fields, _, result in EXAMPLES:
        key = {"qa": "answer", "extract": "relations", "classify": "labels"}[args[0]]
        (tmp_path / "in.jsonl").write_text(json.dumps(fields) + "\n")
        code, out, err = cli(*args, "-m", trained, "-i", tmp_path / "in.jsonl", "--format", "jsonl",
                             "--constrained")
        record = json.loads(out)
        got = record[key]
        if key == "relations":  # each entity also says where in the text it was copied from
            text = f"{fields.get('title', '')} {fields.get('abstract', '')}" if "abstract" in fields else fields["text"]
            for r in got:
                assert all(text[s:e].lower() == r[end] for end in ("head", "tail") for s, e in r.pop(f"{end}_spans"))
        assert code == 0 and got == result and record["constrained"], err
    unseen = [{"question": f"what of {w}", "context": f"{w} and more {w}"} for w in ("zinc", "x y z", "q", "blood")]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(u) + "\n" for u in unseen))
    code, out, err = cli("qa", "-m", trained, "-i", tmp_path / "qa.jsonl", "-o", tmp_path / "qa.out.jsonl",
                         "--constrained")
    records = [json.loads(line) for line in (tmp_path / "qa.out.jsonl").read_text().splitlines()]
    assert code == 0 and all(r["answer"] in ("yes", "no", "maybe") for r in records) and "did not parse" not in err
    manifest = json.loads((tmp_path / "qa.out.jsonl.manifest.json").read_text())
    assert manifest["run"]["constrained"] == "pubmedqa"
    (tmp_path / "hoc.txt").write_text("tumors grow\nvessels\n")
    code, out, err = cli("classify", "-m", trained, "-i", tmp_path / "hoc.txt", "--format", "jsonl",
                         "--constrained")
    labels = [json.loads(line)["labels"] for line in out.splitlines()]
    assert code == 0 and all(labels) and all(set(x) <= set(HOC_LABELS) for x in labels), err
