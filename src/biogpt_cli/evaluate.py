"""The paper's metrics, computed the way the original release's evaluation scripts compute them,
from our JSONL predictions and the official gold files. Predictions missing for a gold item count
as wrong (an empty answer) and are reported in `missing`.

* PubMedQA: accuracy and macro-F1 (the two figures of its `evaluation.py` and leaderboard) against
  `test_ground_truth.json` ({pmid: yes|no|maybe}), matched on `id`.
* HoC: micro-F1 over the 11 labels (including `empty`; other labels are ignored, as sklearn's
  MultiLabelBinarizer does) against the release's `test.tsv` (label in the last column), matched
  on the input `line` (run `classify` on the TSV's first column so the line numbers agree).
* DDI / KD-DTI: `hard_match_evaluation.py`: names lowercased without spaces, each set scored under
  two normalisations (abbreviation in brackets, or the name without it), the better one kept;
  per-document (sample) and corpus-level (ontology) figures. The paper's F1 (38.42 for KD-DTI,
  below both its P and R) can only be the mean per-document F1, so `f1` is `sample_f1`.
* BC5CDR: relation P/R/F over (pmid, chemical MeSH, disease MeSH) against the PubTator gold file,
  names mapped to MeSH ids with the release's `test.entities.json` (-1 when unknown).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import InputError
from .jsonl import lines, loads
from .tasks import HOC_LABELS

Scores = dict[str, float | int]


def read_predictions(path: str | Path, key: str = "id") -> dict[str, dict[str, Any]]:
    """Our JSONL records by `key` (`id`, else `line`), as strings."""
    records: dict[str, dict[str, Any]] = {}
    for n, line in lines(read_text(path)):
        if not line.strip():
            continue
        try:
            record = loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: line {n}: not JSON ({e.msg}){_order_hint(path)}") from None
        value = record.get(key, record.get("line")) if isinstance(record, dict) else None
        if value is None:
            fields = f'"{key}" or "line"' if key != "line" else '"line"'
            raise InputError(f"{path}: line {n}: a prediction record needs {fields}")
        records[str(value)] = record
    return records


def read_text(path: str | Path) -> str:
    """A whole UTF-8 file; a missing or unreadable one is one `InputError` line."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")  # a BOM (a Windows editor's) is no part of the text
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None


def _json(path: str | Path) -> Any:
    try:
        return loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno}){_order_hint(path)}") from None


def _order_hint(path: str | Path) -> str:
    """Why a file may not parse as what it was taken for: the arguments were given the other way
    round (predictions are JSONL records, gold files one JSON document or the release's text)."""
    return "; the order is PREDICTIONS GOLD: is this the other file?" if Path(path).suffix in (".json", ".jsonl") \
        else ""


def _prf(tp: int, predicted: int, gold: int) -> tuple[float, float, float]:
    p = tp / predicted if predicted else 0.0
    r = tp / gold if gold else 0.0
    return p, r, 2 * p * r / (p + r) if p + r else 0.0


# -- PubMedQA and HoC --------------------------------------------------------------------------
def pubmedqa(predictions: str | Path, gold: str | Path) -> Scores:
    truth = _json(gold)
    if not isinstance(truth, dict):
        raise InputError(f"{gold}: expected test_ground_truth.json, an object of pmid -> yes|no|maybe")
    wrong = next(((pmid, label) for pmid, label in truth.items() if label not in ("yes", "no", "maybe")), None)
    if wrong is not None:  # another file given as the gold one would score every answer wrong
        raise InputError(f"{gold}: pmid {wrong[0]} has the label {json.dumps(wrong[1])}, not yes, no or maybe: "
                         f"expected test_ground_truth.json{_order_hint(gold)}")
    preds = read_predictions(predictions)
    answers = {pmid: preds.get(str(pmid), {}).get("answer") for pmid in truth}
    correct = sum(answers[pmid] == label for pmid, label in truth.items())
    return {"accuracy": correct / len(truth) if truth else 0.0, "macro_f1": _macro_f1(truth, answers),
            "correct": correct, "n": len(truth), "missing": sum(str(pmid) not in preds for pmid in truth),
            "extra": len(set(preds) - set(map(str, truth)))}


def _macro_f1(truth: dict[str, str], answers: dict[str, str | None]) -> float:
    """PubMedQA's evaluation.py's second figure (sklearn's `f1_score(average="macro")`): the mean
    F1 over the labels of the gold and of the answers; a missing answer is wrong, not a label."""
    labels = sorted(set(truth.values()) | {a for a in answers.values() if a is not None})
    f1s = [_prf(sum(truth[k] == label == answers[k] for k in truth), sum(a == label for a in answers.values()),
                sum(t == label for t in truth.values()))[2] for label in labels]
    return sum(f1s) / len(f1s) if f1s else 0.0


def hoc(predictions: str | Path, gold: str | Path) -> Scores:
    truth = {str(n): line.split("\t")[-1] for n, line in lines(read_text(gold)) if line.strip()}
    preds = read_predictions(predictions, key="line")
    known = set(HOC_LABELS)
    tp = fp = fn = 0
    for key, labels in truth.items():
        g = {w.strip() for w in labels.strip().split("|")} & known
        p = set(preds.get(key, {}).get("labels") or ()) & known
        tp, fp, fn = tp + len(g & p), fp + len(p - g), fn + len(g - p)
    precision, recall, f1 = _prf(tp, tp + fp, tp + fn)
    return {"f1": f1, "precision": precision, "recall": recall, "n": len(truth),
            "missing": sum(key not in preds for key in truth), "extra": len(set(preds) - set(truth))}


# -- DDI and KD-DTI (hard_match_evaluation.py) -------------------------------------------------
_ROMAN = dict(zip("0123456789", ["0", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"], strict=True))


def _normalize(s: str) -> str:
    s = s.strip()
    if len(s) > 2 and s[-1].isnumeric() and not s[-2].isnumeric() and s[-1] in _ROMAN:
        s = s[:-1] + _ROMAN[s[-1]]
    return re.sub("[^a-zA-Z0-9]+", "", s.replace("-type", ""))


def _main_name(s: str) -> str:
    s = s.strip()
    return _normalize(s[:s.rfind("(")].strip()) if "(" in s and s[-1] == ")" else _normalize(s)


def _abbreviation(s: str) -> str:
    s = s.strip()
    return _normalize(s[s.rfind("(") + 1:-1].strip()) if "(" in s and s[-1] == ")" else _normalize(s)


def _normed(items: set, fn: Any) -> set:
    return {tuple(fn(x) for x in item) if isinstance(item, tuple) else fn(item) for item in items}


def _precision(pred: set, gold: set) -> float:
    return float(pred == gold) if not pred else len(pred & gold) / len(pred)


def _recall(pred: set, gold: set) -> float:
    return float(pred == gold) if not gold else len(pred & gold) / len(gold)


def _accuracy(pred: set, gold: set) -> float:
    return float(pred == gold) if not gold else len(pred & gold) / len(pred | gold)


def _best(pred: set, gold: set, metric: Any) -> float:
    """Both the abbreviation and the main name count as a match: the better score."""
    return max(metric(_normed(pred, _abbreviation), _normed(gold, _abbreviation)),
               metric(_normed(pred, _main_name), _normed(gold, _main_name)))


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _squash(s: str) -> str:
    return s.strip().lower().replace(" ", "")


def _triples(items: Iterable[tuple[str, str, str]]) -> tuple[set, set, set, set]:
    """(drug, target, interaction) triples -> their drug, target, interaction and triple sets."""
    triples = {tuple(_squash(x) for x in item) for item in items}
    return {t[0] for t in triples}, {t[1] for t in triples}, {t[2] for t in triples}, triples


def hard_match(predictions: str | Path, gold: str | Path) -> Scores:
    """DDI / KD-DTI over the gold documents that have triples (the release's relis_test.pmid)."""
    truth = _json(gold)
    if not isinstance(truth, dict):
        raise InputError(f"{gold}: expected the release's test.json, an object of pmid -> document")
    preds = read_predictions(predictions)
    sample: dict[str, list[float]] = {k: [] for k in ("p", "r", "f1", "d", "t", "i")}
    corpus: list[set] = [set(), set(), set(), set(), set(), set(), set(), set()]  # pred d t i triple, gold d t i triple
    docs = {str(k): v for k, v in truth.items() if isinstance(v, dict) and v.get("triples")}
    for pmid, doc in docs.items():
        relations = preds.get(pmid, {}).get("relations") or []
        pred = _triples((r["head"], r["tail"], r["relation"]) for r in relations)
        gold_sets = _triples((t["drug"], t["target"], t["interaction"]) for t in doc["triples"])
        p, r = _best(pred[3], gold_sets[3], _precision), _best(pred[3], gold_sets[3], _recall)
        sample["p"].append(p)
        sample["r"].append(r)
        sample["f1"].append(_f1(p, r))
        for name, ps, gs in zip("dti", pred[:3], gold_sets[:3], strict=True):
            sample[name].append(_best(ps, gs, _accuracy))
        for i, s in enumerate((*pred, *gold_sets)):
            corpus[i] |= s
    pred_all, gold_all = corpus[:4], corpus[4:]
    onto = [(_best(p, g, _precision), _best(p, g, _recall)) for p, g in zip(pred_all, gold_all, strict=True)]
    p, r = _mean(sample["p"]), _mean(sample["r"])
    return {
        "precision": p, "recall": r, "f1": _mean(sample["f1"]),
        "sample_precision": p, "sample_recall": r, "sample_f1": _mean(sample["f1"]), "sample_macro_f1": _f1(p, r),
        "sample_acc_drug": _mean(sample["d"]), "sample_acc_target": _mean(sample["t"]),
        "sample_acc_interaction": _mean(sample["i"]),
        "onto_precision": onto[3][0], "onto_recall": onto[3][1], "onto_f1": _f1(*onto[3]),
        "onto_f1_drug": _f1(*onto[0]), "onto_f1_target": _f1(*onto[1]), "onto_f1_interaction": _f1(*onto[2]),
        "n": len(docs), "missing": sum(pmid not in preds for pmid in docs),
        "extra": len(set(preds) - set(map(str, truth))),
    }


# -- BC5CDR ------------------------------------------------------------------------------------
def bc5cdr(predictions: str | Path, gold: str | Path, entities: str | Path | None) -> Scores:
    """Chemical-induced-disease relations as (pmid, MeSH, MeSH): the gold as the corpus ships it
    (PubTator, BioC XML or JSON); the predictions as our JSONL (names, mapped to MeSH ids by the
    release's test.entities.json) or as PubTator (`extract --format pubtator`: identifiers)."""
    pmids, truth = _cdr_relations(gold)
    if _input_format(predictions) == "pubtator":
        ids, predicted = _cdr_relations(predictions)
        done = ids
    elif entities is None:
        raise InputError("bc5cdr needs --entities test.entities.json (the release's mention -> MeSH id map) to "
                         "score JSONL predictions (or give the predictions as PubTator: extract --format pubtator)")
    else:
        ent2id = _json(entities)
        if not isinstance(ent2id, dict) or not all(isinstance(ent2id.get(k), dict) for k in ("chemical2id",
                                                                                            "disease2id")):
            raise InputError(f"{entities}: expected the release's test.entities.json with chemical2id and disease2id")
        preds = read_predictions(predictions)
        predicted = {(pmid, ent2id["chemical2id"].get(r["head"], "-1"), ent2id["disease2id"].get(r["tail"], "-1"))
                     for pmid, record in preds.items() if pmid in pmids for r in record.get("relations") or ()}
        done = set(preds)
    predicted = {p for p in predicted if p[0] in pmids}
    precision, recall, f1 = _prf(len(predicted & truth), len(predicted), len(truth))
    return {"precision": precision, "recall": recall, "f1": f1, "n": len(pmids), "gold_relations": len(truth),
            "predicted_relations": len(predicted), "missing": len(pmids - done), "extra": len(done - pmids)}


def _input_format(path: str | Path) -> str:
    from .inputs import open_input, record_format

    with open_input(str(path)) as f:
        return record_format(f, str(path))


def _cdr_relations(path: str | Path) -> tuple[set[str], set[tuple[str, str, str]]]:
    """The documents and the `CID` relations (pmid, chemical, disease) of a PubTator or BioC file."""
    from .inputs import open_input
    from .literature import cid_pairs, documents

    fmt = _input_format(path)
    if fmt not in ("pubtator", "bioc", "json"):
        raise InputError(f"{path}: expected BC5CDR's relations as PubTator or BioC (XML or JSON)")
    pmids, relations = set(), set()
    with open_input(str(path)) as f:
        for doc in documents(f, str(path), fmt):
            pmids.add(doc["id"])
            relations |= {(doc["id"], *pair) for pair in cid_pairs(doc)}
    return pmids, relations


def evaluate(task: str, predictions: str | Path, gold: str | Path, entities: str | Path | None = None) -> Scores:
    """The task's scores; a gold file with nothing to score is an error, not an accuracy of 0."""
    if task == "pubmedqa":
        scores = pubmedqa(predictions, gold)
    elif task == "hoc":
        scores = hoc(predictions, gold)
    elif task in ("ddi", "kd-dti"):
        scores = hard_match(predictions, gold)
    else:
        scores = bc5cdr(predictions, gold, entities)
    if not scores["n"]:
        raise InputError(f"{gold}: no gold items to score against (is it the {task} test set?)")
    if scores["missing"] == scores["n"]:  # almost always the wrong file: every answer would count as wrong
        raise InputError(f"{predictions}: none of its records matches one of the {scores['n']} gold items (by id, "
                         f"or line for hoc): is it the output for this test set?{_order_hint(predictions)}")
    return scores
