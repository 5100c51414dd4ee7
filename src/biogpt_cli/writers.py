"""The task commands' results in the literature's formats: PubTator text, BioC JSON and BioC XML.

Each document is written as it came in (title and abstract, the input's own mentions), then what
the model found. A generated entity name is tied to the document's text: to the input's mention of
the same text (case-insensitively, as the tasks lowercase), whose identifier the relation then
names; else to where the name occurs in the text (a new mention, by character offsets); a name
found nowhere in the document is kept, marked `grounded: false` (a BioC infon) and counted.
PubTator relation lines are `PMID<TAB>TYPE<TAB>ID1<TAB>ID2` (BC5CDR's `CID`), the form the
BioCreative V CDR evaluation reads as predictions.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from .grounding import document_text
from .literature import identifier, mention_parts

FORMATS = ("pubtator", "bioc-json", "bioc-xml")
ROLES = {"bc5cdr": ("Chemical", "Disease"), "ddi": ("Drug", "Drug"), "kd-dti": ("Drug", "Target")}


def _pattern(name: str) -> re.Pattern[str]:
    """`name` in a text whatever its case and the spacing between its tokens (Moses' `5 - fu` is
    the text's `5-FU`), not inside a longer word."""
    tokens = re.findall(r"\w+|[^\w\s]", name)
    return re.compile(r"(?<!\w)" + r"\s*".join(map(re.escape, tokens)) + r"(?!\w)", re.IGNORECASE)


def locate(name: str, text: str) -> tuple[int, int] | None:
    """Where `name` first occurs in `text` (start, end), or None."""
    m = _pattern(name).search(text) if name.strip() else None
    return (m.start(), m.end()) if m else None


def mark_ungrounded(fields: dict[str, Any], relations: list[dict[str, Any]] | None) -> int:
    """Mark `grounded: false` on each relation whose head or tail is nowhere in the document (a
    constrained one carries its offsets: no search); how many."""
    text = document_text(fields)
    missing = 0
    for r in relations or []:
        if "head_spans" in r:
            continue
        if locate(r["head"], text) is None or locate(r["tail"], text) is None:
            r["grounded"] = False
            missing += 1
    return missing


class DocumentWriter:
    """A literature format's text for the task commands' records: `head()`, a `block` per
    document (a `Renderer`'s line function), `tail()`. `record(prompt, done)` is the task's JSONL
    record (its `relations`, `labels` or `answer`)."""

    def __init__(self, fmt: str, task: str, record: Callable[[Any, Any], dict[str, Any]]) -> None:
        self.fmt, self.task, self.record, self.first = fmt, task, record, True

    def head(self) -> str:
        date = time.strftime("%Y%m%d")
        if self.fmt == "bioc-json":
            collection = {"source": "biogpt-cli", "date": date, "key": "biogpt-cli.key", "infons": {}}
            return json.dumps(collection)[:-1] + ', "documents": [\n'
        if self.fmt == "bioc-xml":
            return ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE collection SYSTEM "BioC.dtd">\n'
                    f"<collection><source>biogpt-cli</source><date>{date}</date><key>biogpt-cli.key</key>\n")
        return ""

    def tail(self) -> str:
        return {"bioc-json": "]}\n", "bioc-xml": "</collection>\n"}.get(self.fmt, "")

    def whole(self, items: list[tuple[Any, Any]]) -> str:
        """The file for `items` (prompt, done) as the task commands write it: a block a line."""
        return self.head() + "".join(self.block(p, d) + "\n" for p, d in items) + self.tail()

    def block(self, prompt: Any, done: Any) -> str:
        doc = bioc_document(dict(prompt.fields), self.record(prompt, done), self.task, str(prompt.id))
        if self.fmt == "pubtator":
            return pubtator(doc)
        if self.fmt == "bioc-xml":
            return bioc_xml(doc)
        separator, self.first = ("" if self.first else ","), False
        return separator + json.dumps(doc, ensure_ascii=False)


def bioc_document(fields: dict[str, Any], record: dict[str, Any], task: str, doc_id: str) -> dict[str, Any]:
    """The document as BioC JSON: its passages and mentions as they came, then the result: each
    relation's entities tied to mentions (found or added), labels or an answer as infons."""
    passages = _passages(fields)
    annotations = [a for p in passages for a in p["annotations"]]
    places = _layout(fields, passages)
    relations, infons = [], {}
    for i, r in enumerate(record.get("relations") or []):
        nodes = [_node(r[end], r.get(f"{end}_spans"), role, places, annotations)
                 for end, role in zip(("head", "tail"), ROLES.get(task, ("Entity", "Entity")), strict=True)]
        grounded = all(n is not None for n in nodes)
        relations.append({"id": f"R{i}", "infons": {"type": r["relation"], **({} if grounded else {
            "grounded": "false", "head": r["head"], "tail": r["tail"]})},
            "nodes": [{"refid": n["id"], "role": role} for n, role in zip(nodes, ("head", "tail"), strict=True) if n]})
    for key in ("labels", "answer"):
        if record.get(key) is not None:
            value = record[key]
            infons[key] = "|".join(value) if isinstance(value, list) else str(value)
    return {"id": doc_id, "infons": {**(fields.get("infons") or {}), **infons}, "passages": passages,
            "relations": relations}


def _passages(fields: dict[str, Any]) -> list[dict[str, Any]]:
    """The input's passages (BioC), or a title and an abstract passage with its mentions (PubTator,
    PubMed, records): every annotation with an id."""
    if fields.get("passages"):
        passages = [dict(p, annotations=[dict(a) for a in p.get("annotations") or []]) for p in fields["passages"]]
    else:
        context = fields.get("context")  # a PubMedQA item: its question and context stand for them
        context = " ".join(context) if isinstance(context, list) else context
        title = fields.get("title") or fields.get("question") or ""
        abstract = fields.get("abstract") or fields.get("text") or context or ""
        passages = [{"infons": {"type": "title"}, "offset": 0, "text": title, "annotations": []},
                    {"infons": {"type": "abstract"}, "offset": len(title) + 1, "text": abstract, "annotations": []}]
        for a in fields.get("annotations") or []:
            start = a["locations"][0]["offset"] if a.get("locations") else 0
            owner = passages[0] if start < len(title) + 1 else passages[1]
            owner["annotations"].append({"infons": {"type": a.get("type", ""), "identifier": a.get("identifier", "")},
                                         "text": a.get("text", ""), "locations": a.get("locations") or [],
                                         **({"extra": a["extra"]} if a.get("extra") else {})})
    n = 0
    for p in passages:
        for a in p["annotations"]:
            a["id"] = a.get("id") or f"A{n}"
            n += 1
    return passages


def _sections(passages: list[dict[str, Any]]) -> tuple[list[dict], list[dict], list[dict]]:
    """The title passages (`title` ones, then `front` ones, as literature.bioc_document joins a
    record's title), the abstract ones and the others, each in order."""
    groups: dict[str, list[dict]] = {"title": [], "front": [], "abstract": [], "": []}
    for p in passages:
        kind = (p.get("infons") or {}).get("type", "").lower()
        groups[kind if kind in groups else ""].append(p)
    return groups["title"] + groups["front"], groups["abstract"], groups[""]


def _layout(fields: dict[str, Any], passages: list[dict[str, Any]]) -> list[tuple[int | None, dict[str, Any]]]:
    """Where each title and abstract passage starts in the document's text (`document_text`: the
    titles joined by spaces, a space, the abstracts joined by spaces; a `text` record: its text),
    the text a record's offsets count in; then the other passages, which it does not hold (None)."""
    if "text" in fields and "abstract" not in fields and not fields.get("passages"):
        return [(0, passages[-1])]
    titles, abstracts, others = _sections(passages)
    places: list[tuple[int | None, dict[str, Any]]] = []
    at = 0
    for group in (titles, abstracts):
        for p in group:
            places.append((at, p))
            at += len(p.get("text") or "") + 1
        at = max(at, 1)  # no title: the abstract still starts after the space
    return places + [(None, p) for p in others]


def _node(name: str, spans: list[list[int]] | None, role: str, places: list[tuple[int | None, dict[str, Any]]],
          annotations: list[dict[str, Any]]) -> dict | None:
    """The mention `name` is: the input's of the same text, else a new one at the first of its
    `spans` (a constrained answer's offsets), else where it first occurs; None."""
    same = next((a for a in annotations if a.get("text", "").lower() == name.lower()), None)
    if same is not None:
        return same
    if (part := _part_of_composite(name, places, annotations)) is not None:
        return part
    for start, p in places:
        text = p.get("text") or ""
        if spans:
            found = None if start is None else next(((s - start, e - start) for s, e in spans[:1]
                                                     if start <= s and e <= start + len(text)), None)
        else:
            found = locate(name, text)
        if found is not None:
            begin, end = found
            added = {"id": f"G{len(annotations)}", "infons": {"type": role, "identifier": ""},
                     "text": text[begin:end], "locations": [{"offset": p.get("offset", 0) + begin,
                                                              "length": end - begin}]}
            p["annotations"].append(added)
            annotations.append(added)
            return added
    return None


def _part_of_composite(name: str, places: list[tuple[int | None, dict[str, Any]]],
                       annotations: list[dict[str, Any]]) -> dict | None:
    """A new mention for `name` when it is a part of an input's composite mention (`cystitis` of
    `hemorrhagic cystitis`): where the part stands inside it, with the part's identifier."""
    for a in list(annotations):
        parts = mention_parts(a)
        at = (a.get("text") or "").lower().find(name.lower())
        if len(parts) < 2 or at < 0 or not a.get("locations") or name.lower() not in [t.lower() for t, _ in parts]:
            continue
        ident = next(i for t, i in parts if t.lower() == name.lower())
        owner = next((p for _, p in places if any(x is a for x in p["annotations"])), None)
        if owner is None:
            continue
        added = {"id": f"G{len(annotations)}", "infons": {"type": (a.get("infons") or {}).get("type", ""),
                                                          "identifier": ident},
                 "text": a["text"][at:at + len(name)], "locations": [{"offset": a["locations"][0]["offset"] + at,
                                                                      "length": len(name)}]}
        owner["annotations"].append(added)
        annotations.append(added)
        return added
    return None


def pubtator(doc: dict[str, Any]) -> str:
    """A BioC document (as `bioc_document` makes it) as PubTator: title, abstract, mentions, then
    relations by identifier (a mention without one is named by its text, lowercased). Offsets
    count over the title passages, a space, the abstract passages (`_layout`), wherever a BioC
    passage said it starts; a mention in another passage (a body section) has no place in PubTator
    and is left out, and a discontinuous one gets a line for each of its pieces. Line breaks in a
    text become spaces (the offsets stay)."""
    pmid, places = doc["id"], _layout({"passages": doc["passages"]}, doc["passages"])
    start = {id(p): at for at, p in places if at is not None}
    title, abstract = (" ".join(p.get("text") or "" for p in group) for group in _sections(doc["passages"])[:2])
    lines = [f"{pmid}|t|{_one_line(title)}", f"{pmid}|a|{_one_line(abstract)}"]
    names: dict[str, str] = {}
    for p in doc["passages"]:
        for a in p["annotations"]:
            ident = identifier(a)
            names[a["id"]] = ident or a.get("text", "").lower()
            extra = "".join(f"\t{x}" for x in a.get("extra") or [])  # a composite mention's parts, as given
            if id(p) not in start:
                continue
            for loc in a.get("locations") or []:
                at = start[id(p)] + loc["offset"] - p.get("offset", 0)
                lines.append(f"{pmid}\t{at}\t{at + loc['length']}\t{_one_line(a.get('text', ''))}\t"
                             f"{a['infons'].get('type', '')}\t{ident or '-1'}{extra}")
    for r in doc["relations"]:
        ends = {n["role"]: names[n["refid"]] for n in r["nodes"]}
        head, tail = ends.get("head", r["infons"].get("head", "")), ends.get("tail", r["infons"].get("tail", ""))
        lines += [f"{pmid}\t{r['infons']['type']}\t{h}\t{t}"  # a composite mention: a line for each of its ids
                  for h in head.split("|") for t in tail.split("|")]
    lines += [f"{pmid}\t{key}\t{value}" for key, value in doc["infons"].items() if key in ("labels", "answer")]
    return "\n".join(lines) + "\n"


LINE_BREAKS = re.compile(r"[\n\r\t\v\f\x1c-\x1e\x85\u2028\u2029]")  # what a line reader (or a column) splits at
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")  # characters XML 1.0 forbids


def _one_line(text: str) -> str:
    return LINE_BREAKS.sub(" ", text)


def _xml_text(text: str) -> str:
    """`text` escaped for XML, each character XML forbids a space and a carriage return a
    character reference (a parser would fold `\r\n` into `\n`), so every offset stays."""
    return escape(NOT_XML.sub(" ", text)).replace("\r", "&#13;")


def bioc_xml(doc: dict[str, Any]) -> str:
    """A BioC document (as `bioc_document` makes it) as BioC XML."""
    def infons(d: dict[str, Any]) -> str:
        return "".join(f"<infon key={quoteattr(str(k))}>{_xml_text(str(v))}</infon>" for k, v in d.items())

    def annotation(a: dict[str, Any]) -> str:
        locations = "".join(f'<location offset="{loc["offset"]}" length="{loc["length"]}"/>'
                            for loc in a.get("locations") or [])
        return (f"<annotation id={quoteattr(a['id'])}>{infons(a.get('infons') or {})}{locations}"
                f"<text>{_xml_text(a.get('text', ''))}</text></annotation>")

    passages = "".join(f"<passage>{infons(p.get('infons') or {})}<offset>{p.get('offset', 0)}</offset>"
                       f"<text>{_xml_text(p.get('text') or '')}</text>{''.join(map(annotation, p['annotations']))}"
                       "</passage>" for p in doc["passages"])
    relations = "".join(f"<relation id={quoteattr(r['id'])}>{infons(r['infons'])}"
                        + "".join(f"<node refid={quoteattr(n['refid'])} role={quoteattr(n['role'])}/>"
                                  for n in r["nodes"]) + "</relation>" for r in doc["relations"])
    return f"<document><id>{_xml_text(doc['id'])}</id>{infons(doc['infons'])}{passages}{relations}</document>"
