"""Training data for `biogpt finetune`, read in the forms the tasks' releases ship it, and turned
into the examples the original release trains on (its `examples/*/rebuild_data.py`).

An `Example` is the task command's input fields (so the source text is built by `tasks.py`,
exactly as at inference) plus the verbalised target. Readers check every record before any
training, and a bad one is named by file and line (or key, for JSON documents).

* PubMedQA: the release's JSON (`{pmid: {QUESTION, CONTEXTS, final_decision, ...}}`).
* BC5CDR: PubTator text (title `|t|`, abstract `|a|`, mentions, `CID` relations) or BioC (XML or
  JSON) as the corpus ships it, or the release's rebuilt JSON (`title`, `abstract`, `relations`,
  `chemical2id`, `disease2id`).
* DDI / KD-DTI: the release's JSON (`{pmid: {title?, abstract, triples: [{drug, target, interaction}]}}`).
* HoC: the release's TSV (`text<TAB>label|label`).
* custom: JSONL records `{"source": ..., "target": ...}` (the source is used as given).
Documents without relations are skipped, as the release skips them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .evaluate import read_text
from .inputs import parse_record
from .jsonl import lines, loads
from .literature import cid_pairs, documents, mention_parts, sniff
from .tasks import TASKS, Task, text_field

TASK_NAMES = (*TASKS, "custom")
CUSTOM = Task("custom", "", "text", lambda f: text_field(f, "source"), lambda text: text or None, 900)


@dataclass(frozen=True)
class Example:
    id: str
    fields: Mapping[str, Any]  # the task command's input record
    target: str  # the verbalised answer the model learns to write


def task_of(name: str) -> Task:
    return CUSTOM if name == "custom" else TASKS[name]


def read_examples(task: str, path: str | Path) -> list[Example]:
    """Every training example in `path`; `InputError` naming the record for a bad one."""
    text = read_text(path)
    reader = {"pubmedqa": _pubmedqa, "bc5cdr": _bc5cdr, "ddi": _relations, "kd-dti": _relations,
              "hoc": _hoc, "custom": _custom}[task]
    examples = list(reader(text, str(path), task))
    if not examples:
        raise InputError(f"{path}: no {task} training examples in it")
    return examples


def _json_documents(text: str, path: str, what: str) -> dict[str, Any]:
    try:
        data = loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: not JSON ({e.msg}); expected {what}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected {what}, a JSON object keyed by pmid")
    return data


def _field(doc: Any, key: str, path: str, pmid: str, kind: type | tuple[type, ...] = str) -> Any:
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind):
        raise InputError(f'{path}: pmid {pmid}: expected a field "{key}"')
    return value


def _objects(doc: Any, key: str, path: str, pmid: str) -> list[dict[str, Any]]:
    """A document's list of objects under `key` (triples, relations); none when it has none."""
    if not isinstance(doc, dict):
        raise InputError(f"{path}: pmid {pmid}: expected a JSON object")
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InputError(f'{path}: pmid {pmid}: "{key}" must be a list of objects')
    return value


# -- PubMedQA ----------------------------------------------------------------------------------
def _pubmedqa(text: str, path: str, task: str) -> Iterator[Example]:
    for pmid, doc in _json_documents(text, path, "PubMedQA's JSON ({pmid: {QUESTION, CONTEXTS, ...}})").items():
        label = _field(doc, "final_decision", path, pmid)
        if label not in ("yes", "no", "maybe"):
            raise InputError(f"{path}: pmid {pmid}: final_decision is {label!r}, not yes, no or maybe")
        fields = {"question": _field(doc, "QUESTION", path, pmid),
                  "context": _field(doc, "CONTEXTS", path, pmid, list)}
        yield Example(pmid, fields, f"the answer to the question given the context is {label}.")


# -- relation extraction -----------------------------------------------------------------------
def _relations(text: str, path: str, task: str) -> Iterator[Example]:
    """DDI (abstract only) and KD-DTI (title and abstract); triples sorted by where the drug is
    first found in the source, as the release sorts them."""
    for pmid, doc in _json_documents(text, path, f"the {task} release's JSON").items():
        triples = _objects(doc, "triples", path, pmid)
        if not triples:
            continue
        keys = ("abstract",) if task == "ddi" else ("title", "abstract")
        fields = {k: _field(doc, k, path, pmid) for k in keys}
        content = TASKS[task].source(fields)
        for t in triples:
            for key in ("drug", "target", "interaction"):
                _field(t, key, path, pmid)
        ordered = sorted(triples, key=lambda t: content.find(t["drug"]))
        target = "; ".join(f"the interaction between {t['drug'].lower()} and {t['target'].lower()} is "
                           f"{t['interaction'].lower()}" for t in ordered)
        yield Example(pmid, fields, target + ".")


def _bc5cdr(text: str, path: str, task: str) -> Iterator[Example]:
    docs = _cdr_documents(text, path)
    for pmid, doc in docs.items():
        if not _objects(doc, "relations", path, pmid):
            continue
        fields = {"title": _field(doc, "title", path, pmid), "abstract": _field(doc, "abstract", path, pmid)}
        names = {kind: _longest_names(_field(doc, f"{kind}2id", path, pmid, dict)) for kind in ("chemical", "disease")}
        try:
            pairs = [(names["chemical"][r["chemical"]], names["disease"][r["disease"]]) for r in doc["relations"]]
        except (KeyError, TypeError):
            raise InputError(f"{path}: pmid {pmid}: a relation names an entity id with no mention") from None
        yield Example(pmid, fields, "; ".join(f"the relation between {c} and {d} exists" for c, d in pairs) + ".")


def _longest_names(name2id: dict[str, str]) -> dict[str, str]:
    """id -> the longest of its mentions (the release's `unify_ent2id(method='max')`)."""
    names: dict[str, str] = {}
    for name, i in name2id.items():
        if len(name) > len(names.get(i, "")):
            names[i] = name
    return names


def _cdr_documents(text: str, path: str) -> dict[str, dict[str, Any]]:
    """BC5CDR as the corpus ships it (PubTator, BioC XML or JSON) or the release rebuilt it (JSON),
    each document in the release's form: mentions lowercased, `CID` relations in order."""
    fmt = sniff(text[:4096].encode(), path) or ("json" if text.lstrip().startswith("{") else "pubtator")
    if fmt == "json" and not text.lstrip().startswith("{"):
        raise InputError(f"{path}: expected BC5CDR as PubTator, BioC or the release's JSON")
    found = documents(io.BytesIO(text.encode()), path, fmt)
    return {d["id"]: _release_form(d) if "annotations" in d else d for d in found}


def _release_form(doc: dict[str, Any]) -> dict[str, Any]:
    names: dict[str, dict[str, str]] = {"chemical2id": {}, "disease2id": {}}
    for a in doc["annotations"]:
        kind = (a.get("type") or "").lower()
        if kind in ("chemical", "disease") and a.get("identifier"):
            for text, ident in mention_parts(a):  # a composite mention as its parts, which the CID lines name
                names[f"{kind}2id"][text.lower()] = ident
    return {"title": doc["title"], "abstract": doc["abstract"],
            "relations": [{"chemical": c, "disease": d} for c, d in cid_pairs(doc)], **names}


# -- HoC and custom ----------------------------------------------------------------------------
def _hoc(text: str, path: str, task: str) -> Iterator[Example]:
    for n, line in lines(text):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or not cols[0].strip() or not cols[1].strip():
            raise InputError(f"{path}: line {n}: expected `text<TAB>label|label` (HoC's TSV)")
        yield Example(str(n), {"text": cols[0].strip()}, f"the type of this document is {cols[1].strip()}.")


def _custom(text: str, path: str, task: str) -> Iterator[Example]:
    ids: dict[str | int, str] = {}
    for n, line in lines(text):
        if line.strip():
            record = parse_record(n, line, path, "source", ids)
            target = record.fields.get("target")
            if not record.text.strip() or not isinstance(target, str) or not target.strip():
                raise InputError(f'{path}: line {n}: expected {{"source": "...", "target": "..."}}, both non-empty')
            yield Example(str(n if record.id is None else record.id), {"source": record.text}, target)
