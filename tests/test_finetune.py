"""`biogpt finetune`: the release's data forms, its recipe, the methods, resume, and checkpoints the
task commands and `transformers` run. Tiny models trained for seconds on toy data shaped like the
releases' files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from biogpt_cli import InputError
from biogpt_cli import finetune as ft
from biogpt_cli.datasets import read_examples
from biogpt_cli.loading import load_pretrained, read_safetensors
from biogpt_cli.memory import check_training_fits
from tests.conftest import make_reference, one_error_line

FAST = ("--lr", "1e-2", "--warmup", "10", "--tokens-per-update", "4096", "--batch-tokens", "2048", "--average", "1",
        "-q")
QA = {"1": ("aspirin", "bad", "yes"), "2": ("water", "good", "no"), "3": ("tea", "unclear", "maybe"),
      "4": ("salt", "bad", "yes"), "5": ("rice", "good", "no"), "6": ("coffee", "unclear", "maybe")}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random base model without dropout (so a few seconds of training memorise the data)."""
    folder = tmp_path_factory.mktemp("base")
    make_reference(folder, seed=1, hidden_size=64, intermediate_size=128, max_position_embeddings=256,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return folder


def pubmedqa_json(path: Path) -> Path:
    path.write_text(json.dumps({pmid: {"QUESTION": f"is {w} bad", "CONTEXTS": [f"{w} is", f"{a}"],
                                       "LONG_ANSWER": "x", "final_decision": d} for pmid, (w, a, d) in QA.items()}))
    return path


# -- the releases' data forms ------------------------------------------------------------------
def test_examples_are_the_releases_targets(tmp_path):
    qa = read_examples("pubmedqa", pubmedqa_json(tmp_path / "qa.json"))
    assert qa[0].target == "the answer to the question given the context is yes."
    assert qa[0].fields == {"question": "is aspirin bad", "context": ["aspirin is", "bad"]}
    ddi = tmp_path / "ddi.json"
    ddi.write_text(json.dumps({"9": {"abstract": "Warfarin and Aspirin; then Heparin.", "triples": [
        {"drug": "heparin", "target": "aspirin", "interaction": "Advise"},
        {"drug": "warfarin", "target": "Aspirin", "interaction": "effect"}]}, "10": {"abstract": "x", "triples": []}}))
    [doc] = read_examples("ddi", ddi)  # the document without triples is skipped, as the release skips it
    assert doc.target == ("the interaction between warfarin and aspirin is effect; "
                          "the interaction between heparin and aspirin is advise.")  # sorted by position
    pubtator = tmp_path / "cdr.txt"
    pubtator.write_text("7|t|Lithium and kidneys\n7|a|Lithium harms the kidney damage.\n"
                        "7\t0\t7\tLithium\tChemical\tD008094\n7\t12\t19\tkidneys\tDisease\tD007674\n"
                        "7\t38\t51\tkidney damage\tDisease\tD007674\n7\tCID\tD008094\tD007674\n\n"
                        "8|t|None\n8|a|Nothing.\n")
    [cdr] = read_examples("bc5cdr", pubtator)  # the longest mention names the id; doc 8 has no relation
    assert cdr.target == "the relation between lithium and kidney damage exists."
    hoc = tmp_path / "hoc.tsv"
    hoc.write_text("( DCs ) grow\tempty\n\ncells die\tresisting cell death|inducing angiogenesis\n")
    assert [e.target for e in read_examples("hoc", hoc)] == [
        "the type of this document is empty.",
        "the type of this document is resisting cell death|inducing angiogenesis."]


def test_title_only_documents_train_as_the_release_builds_them(cli, base, tmp_path):
    """KD-DTI's real files hold citations without an abstract: trained on `title. `, counted."""
    data = {"1": {"title": "Imatinib inhibits ABL1", "abstract": "It binds the kinase.", "triples": [
        {"drug": "imatinib", "target": "ABL1", "interaction": "inhibitor"}]},
        "2": {"title": "Gefitinib and EGFR", "abstract": "", "triples": [
            {"drug": "gefitinib", "target": "EGFR", "interaction": "inhibitor"}]}}
    (tmp_path / "valid.json").write_text(json.dumps(data))
    code, _, err = cli("finetune", tmp_path / "valid.json", "--task", "kd-dti", "-m", base, "-o", tmp_path / "out",
                       "--epochs", "1", *FAST)
    assert code == 0 and "1 title-only document (no abstract): trained on its title" in err, err


@pytest.mark.parametrize("task, text, where", [
    ("hoc", "a\tempty\nno label here\n", "line 2"),
    ("custom", '{"source": "a", "target": "b"}\n{"source": "a"}\n', "line 2"),
    ("bc5cdr", "1|t|T\n1|a|A\n1\tCID\n", "line 3"),
    ("pubmedqa", '{"5": {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps"}}', "pmid 5"),
    ("bc5cdr", '{"7": "a string, not a document"}', "pmid 7: expected a JSON object"),
    ("ddi", '{"8": {"abstract": "a", "triples": 5}}', 'pmid 8: "triples" must be a list of objects'),
    ("kd-dti", '{"9": {"title": "t", "abstract": "a", "triples": ["x"]}}', 'pmid 9: "triples" must be a list'),
    ("ddi", "[" * 100_000, "line 1: not JSON (nested too deeply)"),
    ("custom", '{"source": ' + "[" * 100_000, "line 1: not JSON (nested too deeply)"),
])
def test_bad_records_are_named_before_training(cli, base, tmp_path, task, text, where):
    (tmp_path / "data").write_text(text)
    code, out, err = cli("finetune", tmp_path / "data", "--task", task, "-m", base, "-o", tmp_path / "out")
    assert code == 1 and out == "" and where in one_error_line(err) and str(tmp_path / "data") in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


# -- end to end --------------------------------------------------------------------------------
def test_pubmedqa_checkpoint_answers_and_evaluates(cli, base, tmp_path):
    train = pubmedqa_json(tmp_path / "train.json")
    code, _, err = cli("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "qa",
                       "--epochs", "100", "--dev", train, *FAST)
    assert code == 0 and "dev_accuracy" in err, err
    inputs = "".join(json.dumps({"id": k, "question": f"is {w} bad", "context": [f"{w} is", a]}) + "\n"
                     for k, (w, a, _) in QA.items())
    (tmp_path / "in.jsonl").write_text(inputs)
    code, _, _ = cli("qa", "-m", tmp_path / "qa", "-i", tmp_path / "in.jsonl", "-o", tmp_path / "pred.jsonl")
    answers = {r["id"]: r["answer"] for r in map(json.loads, (tmp_path / "pred.jsonl").read_text().splitlines())}
    assert code == 0 and sum(answers[k] == d for k, (_, _, d) in QA.items()) >= 0.95 * len(QA)
    (tmp_path / "gold.json").write_text(json.dumps({k: d for k, (_, _, d) in QA.items()}))
    code, out, _ = cli("evaluate", "--task", "pubmedqa", tmp_path / "pred.jsonl", tmp_path / "gold.json",
                       "--format", "jsonl")
    assert code == 0 and json.loads(out)["accuracy"] >= 0.95
    code, out, _ = cli("info", "-m", tmp_path / "qa", "--format", "jsonl")
    training = json.loads(out)["training"]
    assert training["base_model"] == str(base) and "full, lr 0.01" in training["recipe"]
    assert "dev_accuracy 1" in training["final"]


def test_extract_checkpoint_returns_the_trained_relations(cli, base, tmp_path):
    docs = {"a": ("warfarin with aspirin", "warfarin", "aspirin", "effect"),
            "b": ("heparin then insulin", "heparin", "insulin", "advise"),
            "c": ("lithium and salt", "lithium", "salt", "mechanism")}
    (tmp_path / "ddi.json").write_text(json.dumps({k: {"abstract": text, "triples": [
        {"drug": d, "target": t, "interaction": r}]} for k, (text, d, t, r) in docs.items()}))
    code, _, err = cli("finetune", tmp_path / "ddi.json", "--task", "ddi", "-m", base, "-o", tmp_path / "ddi",
                       "--epochs", "120", *FAST)
    assert code == 0, err
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": k, "abstract": v[0]}) + "\n" for k, v in docs.items()))
    code, out, _ = cli("extract", "-m", tmp_path / "ddi", "-i", tmp_path / "in.jsonl", "--format", "jsonl")
    found = {r["id"]: r["relations"] for r in map(json.loads, out.splitlines())}
    assert code == 0 and found == {k: [{"head": d, "relation": r, "tail": t}] for k, (_, d, t, r) in docs.items()}


def test_hoc_checkpoint_classifies(cli, base, tmp_path):
    rows = [("cells divide fast", "sustaining proliferative signaling"), ("vessels grow", "inducing angiogenesis"),
            ("nothing here", "empty"), ("cells never die", "resisting cell death|enabling replicative immortality")]
    (tmp_path / "train.tsv").write_text("".join(f"{t}\t{label}\n" for t, label in rows))
    code, _, err = cli("finetune", tmp_path / "train.tsv", "--task", "hoc", "-m", base, "-o", tmp_path / "hoc",
                       "--updates", "120", *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "hoc" / "config.json").read_text())["learned_prompt"] == 1  # HoC's one token
    (tmp_path / "in.txt").write_text("".join(t + "\n" for t, _ in rows))
    code, out, _ = cli("classify", "-m", tmp_path / "hoc", "-i", tmp_path / "in.txt", "--format", "jsonl", "-n", "120")
    assert code == 0 and [r["labels"] for r in map(json.loads, out.splitlines())] == [
        label.split("|") for _, label in rows]


# -- methods and checkpoints -------------------------------------------------------------------
def small_run(base: Path, tmp_path: Path, method: str, out: str = "out", device: str = "cpu", **recipe) -> ft.Run:
    examples = read_examples("pubmedqa", pubmedqa_json(tmp_path / "train.json"))
    settings = {"lr": 1e-2, "warmup": 2, "epochs": 4, "tokens_per_update": 512, "batch_tokens": 256, "average": 2,
                "method": method, **recipe}
    r = ft.dataclasses.replace(ft.RECIPES["pubmedqa"], **settings)
    identity = {"base_model": str(base), "base_sha256": "x", "task": "pubmedqa", "recipe": ft.dataclasses.asdict(r),
                "train": {"file": "train.json", "sha256": "y", "examples": len(examples)}}
    return ft.prepare("pubmedqa", str(base), examples, tmp_path / out, r, torch.device(device), identity)


def test_the_parameters_said_to_train_are_those_that_change(cli, base, tmp_path, monkeypatch):
    """`prompt` trains the 9 prompt rows of the embedding (9 x 64 values here), not all of it; a
    run that cannot fit in memory is a usage error (exit 2), before any training."""
    from biogpt_cli import memory

    train = pubmedqa_json(tmp_path / "train.json")
    code, _, err = cli("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "p", "--method", "prompt",
                       "--epochs", "1", *FAST)
    assert code == 0 and "(prompt: 576 parameters train)" in err, err
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**6)
    code, _, err = cli("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "q", "--epochs", "1")
    assert code == 2 and "training needs about" in one_error_line(err)


def test_prompt_method_trains_only_the_prompt_rows(base, tmp_path):
    run = small_run(base, tmp_path, "prompt")
    ft.train(run)
    before = read_safetensors(base / "model.safetensors")
    after = read_safetensors(tmp_path / "out" / "model.safetensors")
    rows = before["biogpt.embed_tokens.weight"].shape[0]
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "biogpt.embed_tokens.weight")
    assert torch.equal(after["biogpt.embed_tokens.weight"][:rows], before["biogpt.embed_tokens.weight"])
    assert not torch.equal(after["biogpt.embed_tokens.weight"][rows:], run.model.biogpt.embed_tokens.weight[rows:] * 0)
    # an epoch's snapshot keeps what changed: the prompt's rows, not the whole embedding
    kept = read_safetensors(ft.snapshots(tmp_path / "out")[-1])
    assert list(kept) == ["biogpt.embed_tokens.weight"] and kept["biogpt.embed_tokens.weight"].shape[0] == 9
    # and Adam's moments are the prompt's rows' alone (9 x 64), not the whole vocabulary's
    moments = ft.read_state(tmp_path / "out" / ft.STATE / "state.pt")["optimizer"]["state"]
    assert [tuple(m["exp_avg"].shape) for m in moments.values()] == [(9, 64)]


def test_lora_is_merged_and_transformers_loads_the_checkpoint(base, tmp_path):
    """The exported weights (two epochs averaged, adapters merged) give the reference's logits."""
    run = small_run(base, tmp_path, "lora", rank=4)
    history = ft.train(run)
    assert history[-1]["loss"] < history[0]["loss"]
    ours, tok = load_pretrained(tmp_path / "out", kernels=False)
    ref = transformers.BioGptForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([[2, 5, 9, 30, *tok.prompt_ids]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-5)
        averaged = ft.averaged_state(run.model, ft.snapshots(tmp_path / "out"))
        assert len(ft.snapshots(tmp_path / "out")) == 2 and not torch.equal(
            averaged["biogpt.layers.0.fc1.weight"], run.model.biogpt.layers[0].fc1.base.weight)


@pytest.mark.parametrize("method", ["full", "prompt"])
def test_interrupted_and_resumed_equals_uninterrupted(base, tmp_path, method):
    ft.train(small_run(base, tmp_path, method, "whole"))

    def interrupt(p: ft.Progress) -> None:  # Ctrl-C in the middle of epoch 3
        if p.epoch == 3 and not p.epoch_done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ft.train(small_run(base, tmp_path, method), on_progress=interrupt)
    assert json.loads((tmp_path / "out" / "training.json").read_text())["history"][-1]["epoch"] == 2
    ft.train(small_run(base, tmp_path, method), resume=True)  # a new process: the model loaded afresh
    whole, resumed = (read_safetensors(tmp_path / d / "model.safetensors") for d in ("whole", "out"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_kill_while_the_run_is_saved_leaves_it_resumable(base, tmp_path, monkeypatch):
    """A kill in the middle of writing `run.json` (emptied, as a torn write leaves it) or a
    checkpoint export (its staging folder left behind): the run resumes, and the next export
    removes what the killed one left."""
    ft.train(small_run(base, tmp_path, "full", "whole", epochs=2))
    real = Path.write_text

    def torn(self, *args, **kwargs):
        if self.name.startswith("run.json"):
            real(self, "")
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    ft.train(small_run(base, tmp_path, "full", epochs=1))
    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", torn)
        with pytest.raises(KeyboardInterrupt):
            ft.train(small_run(base, tmp_path, "full", epochs=2), resume=True)
    state = tmp_path / "out" / ft.STATE
    assert json.loads((state / "run.json").read_text())["task"] == "pubmedqa" and not list(state.glob("*.tmp"))
    left = tmp_path / "out" / ".biogpt-convert-999999999"  # what `kill -9` during an export leaves
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"x" * 1000)
    ft.train(small_run(base, tmp_path, "full", epochs=2), resume=True)
    whole, resumed = (read_safetensors(tmp_path / d / "model.safetensors") for d in ("whole", "out"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole) and not left.exists()


def test_a_state_file_that_pickles_code_is_refused_without_running_it(cli, base, tmp_path):
    """`--resume` reads the run's state as tensors and plain data: a state file carrying a pickled
    payload is refused, and the payload never runs."""
    ft.train(small_run(base, tmp_path, "full", epochs=1))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")
    path = tmp_path / "out" / ft.STATE / "state.pt"
    state = torch.load(path, weights_only=True)
    state["history"].append(Payload())
    torch.save(state, path)
    with pytest.raises(InputError, match="refused: it pickles objects other than a run's state"):
        ft.train(small_run(base, tmp_path, "full", epochs=2), resume=True)
    assert not marker.exists()


def test_resume_continues_only_the_same_run(cli, base, tmp_path):
    train = pubmedqa_json(tmp_path / "train.json")
    args = ("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "out", "--tokens-per-update", "512",
            "--batch-tokens", "256", "-q")
    assert cli(*args, "--epochs", "1")[0] == 0
    state = tmp_path / "out" / ft.STATE / "state.pt"
    good = state.read_bytes()
    state.write_bytes(b"not a state")  # refused before anything says the run resumes
    code, _, err = cli(*args, "--epochs", "2", "--resume")
    assert code == 1 and err.splitlines()[-1].startswith("error: ") and "state.pt: refused" in err
    assert "resuming" not in err
    state.write_bytes(good)
    code, _, err = cli(*args[:-1], "--epochs", "2", "--resume")  # a longer run continues the shorter one
    assert code == 0 and json.loads((tmp_path / "out" / "training.json").read_text())["complete"], err
    assert f"resuming {tmp_path / 'out'} at epoch 2 (epochs 1-1 done)" in err
    code, _, err = cli(*args, "--epochs", "3", "--lr", "1e-3", "--resume")
    assert code == 1 and "(recipe.lr 1e-05 -> 0.001)" in one_error_line(err)  # the field and both values
    code, _, err = cli(*args, "--epochs", "1")
    assert code == 2 and "--resume continues it, --force starts over" in one_error_line(err)


def test_output_folder_and_memory_are_checked_first(cli, base, tmp_path):
    train = pubmedqa_json(tmp_path / "train.json")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = cli("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "full")
    assert code == 2 and "is not empty (--force writes into it)" in one_error_line(err)
    code, _, err = cli("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "new", "--resume")
    assert code == 2 and "holds no run to resume" in one_error_line(err)
    code, _, err = cli("finetune", train, "--task", "custom", "-m", base, "-o", tmp_path / "new", "--dev", train)
    assert code == 2 and "--task custom has none" in one_error_line(err)
    config = load_pretrained(base, kernels=False)[0].config
    with pytest.raises(InputError, match="training needs about .* try --method lora"):
        check_training_fits(config, 10**9, 1024, free=4 * 10**9)
    check_training_fits(config, 10**8, 1024, free=4 * 10**9)  # the loaded weights are not counted again
    (tmp_path / "full" / ft.STATE).mkdir()
    (tmp_path / "full" / ft.STATE / "state.pt").write_bytes(b"")
    (tmp_path / "full" / ft.STATE / "run.json").write_text("")  # emptied by something else
    code, _, err = cli("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "full", "--resume")
    assert code == 1 and "run.json: unreadable" in one_error_line(err) and "--force starts it over" in err


def test_a_small_dataset_gets_updates_its_size_and_each_epoch_is_reported(cli, base, tmp_path):
    """A few examples are less than one update of the recipe's 32,768 tokens: by default the
    updates are sized to the data (several an epoch, a short warm-up: the loss goes down), said in
    one line; the recipe's size, given, makes one small step an epoch, and a note names the
    flags. Every epoch prints its line, and a resume its epoch."""
    train = pubmedqa_json(tmp_path / "train.json")
    args = ("finetune", train, "--task", "pubmedqa", "-m", base, "--batch-tokens", "16", "--lr", "1e-3")
    code, _, err = cli(*args, "-o", tmp_path / "fit", "--epochs", "2")
    assert code == 0 and re.search(r"less than one update of 32,768: updates of 32 tokens instead \(about \d+ an "
                                   r"epoch\)", err), err
    assert "and a warm-up of 10; --tokens-per-update 32768 keeps the recipe's" in err
    losses = [float(x) for x in re.findall(r"epoch \d+: \d+/\d+ updates, loss ([\d.]+)", err)]
    assert re.search(r"epoch 2: (\d+)/\1 updates", err) and losses[1] < losses[0], err
    code, _, err = cli(*args, "-o", tmp_path / "fit", "--epochs", "3", "--resume")
    assert code == 0 and "at epoch 3 (epochs 1-2 done)" in err, err
    code, _, err = cli(*args, "-o", tmp_path / "recipe", "--epochs", "2", "--tokens-per-update", "32768")
    assert code == 0 and "less than one update of 32,768: each epoch makes a single small step" in err, err
    assert "set --tokens-per-update 32 --warmup 10" in err and "epoch 2: 2/2 updates" in err


def test_the_best_dev_epoch_is_kept_and_training_stops_when_it_stalls(cli, base, tmp_path):
    """`--keep best` exports the epoch best on --dev (kept beside the last --average), `--patience`
    stops once the dev metric has not improved for that many epochs; both need --dev."""
    train = pubmedqa_json(tmp_path / "train.json")
    code, _, err = cli("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "x", "--keep", "best")
    assert code == 2 and "goes by the dev metric: add --dev FILE" in one_error_line(err)
    code, _, err = cli("finetune", train, "--task", "pubmedqa", "-m", base, "-o", tmp_path / "out", "--dev", train,
                       "--epochs", "40", "--keep", "best", "--patience", "3", *FAST)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "training.json").read_text())
    history = manifest["history"]
    best = ft.best_epoch(history, "pubmedqa")
    assert manifest["averaged_epochs"] == [best] and history[-1]["epoch"] - best == 3 < 40  # stopped early
    assert manifest["complete"] and history[best - 1]["dev_accuracy"] == max(h["dev_accuracy"] for h in history)
    kept = ft.snapshots(tmp_path / "out")
    assert [int(p.stem.split("-")[1]) for p in kept] == sorted({best, history[-1]["epoch"]})


def test_epochs_are_ranked_by_the_tasks_headline_metric():
    """BC5CDR's dev scores list precision first: the best epoch is the best F1 all the same, and
    PubMedQA's is the best accuracy (not its macro-F1)."""
    history = [{"epoch": 1, "dev_precision": 0.9, "dev_recall": 0.1, "dev_f1": 0.18},
               {"epoch": 2, "dev_precision": 0.5, "dev_recall": 0.5, "dev_f1": 0.5},
               {"epoch": 3, "dev_precision": 0.4, "dev_recall": 0.4, "dev_f1": 0.4}]
    assert ft.best_epoch(history, "bc5cdr") == 2 and ft.stalled(history, 1, "bc5cdr")
    qa = [{"epoch": 1, "dev_f1": 0.6, "dev_accuracy": 0.5}, {"epoch": 2, "dev_f1": 0.4, "dev_accuracy": 0.7}]
    assert ft.best_epoch(qa, "pubmedqa") == 2 and not ft.stalled(qa, 1, "pubmedqa")
