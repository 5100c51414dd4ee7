"""The literature's own files, read as documents: PubMed / MEDLINE XML, BioC XML and JSON, PubTator,
and the BioGPT release's task files. A reader streams one format's documents as plain dicts:

    {"id", "title", "abstract", "body" (other passages), "annotations", "relations", ...}

XML is parsed by `lxml` (libxml2) with the network and entity resolution off: a DTD named in a
DOCTYPE is never fetched nor read, no entity is ever expanded, and a file that declares entities
(a "billion laughs", an external entity) is refused. It streams: each citation is removed from the
tree once read, so memory does not grow with the file.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from .bioc import checked
from .errors import InputError
from .jsonl import lines, loads

FORMATS = ("pubmed", "bioc", "bioc-json", "pubtator", "release")
PUBMED_ROOTS = ("PubmedArticleSet", "MedlineCitationSet")
CITATIONS = ("PubmedArticle", "PubmedBookArticle", "MedlineCitation")
Document = dict[str, Any]
Element = Any  # an lxml element (imported where a file is parsed)


GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)  # what reading a damaged or truncated .gz raises


def sniff(head: bytes, name: str) -> str | None:
    """The literature format a file's first bytes (and name) say, or None (lines of text or JSONL)."""
    text, bare = _head_text(head).lstrip("\ufeff \t\r\n"), name.removesuffix(".gz")
    if text.startswith("<"):
        root = re.search(r"<(?![?!])([\w:.-]+)", re.sub(r"<!--.*?-->", "", text, flags=re.S))
        if root and root[1] in (*PUBMED_ROOTS, "collection"):
            return "pubmed" if root[1] in PUBMED_ROOTS else "bioc"
        if text.startswith("<?xml") or bare.endswith(".xml"):
            return "xml"  # an XML file of another kind: named as such once its root is read
    if re.match(r"[^|\t\n]+\|[ta]\|", text):
        return "pubtator"
    if bare.endswith(".json"):
        return "json"  # a JSON document: BioC JSON or a release file, told apart once read
    return "release" if bare.endswith(".tsv") else None


def _head_text(head: bytes) -> str:
    """A file's first bytes as text: UTF-16 by its byte-order mark or its zero bytes (XML may come
    so, its declaration saying it), else UTF-8."""
    for bom, encoding in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        if head.startswith(bom):
            return head[len(bom):len(head) - len(head) % 2].decode(encoding, "replace")
    if head[:2] in (b"<\x00", b"\x00<"):
        return head[:len(head) - len(head) % 2].decode("utf-16-le" if head[0] else "utf-16-be", "replace")
    return head.decode("utf-8", "replace")


def documents(f: BinaryIO, name: str, fmt: str, labels: bool = False,
              counts: dict[str, int] | None = None) -> Iterator[Document]:
    """Every document of `f` in format `fmt` (`sniff`'s answer, or one the user forced); a PubMed
    structured abstract's sections as `LABEL: text` with `labels`. `counts` gets what is not a
    document (`deleted`: DeleteCitation entries) and the title-only documents (`title only`)."""
    counts = {} if counts is None else counts
    try:
        for doc in _documents(f, name, fmt, labels):
            if "deleted" in doc:
                counts["deleted"] = counts.get("deleted", 0) + len(doc["deleted"])
                continue
            if doc.get("title") and not (doc.get("abstract") or doc.get("body")):
                counts["title only"] = counts.get("title only", 0) + 1
            yield doc
    except GZIP_ERRORS as e:  # an EOFError left to click would pass for Ctrl-D (exit 130, no message)
        raise InputError(f"{name}: a damaged or truncated gzip file ({e})") from None


def _documents(f: BinaryIO, name: str, fmt: str, labels: bool) -> Iterator[Document]:
    if fmt in ("pubmed", "bioc", "xml"):
        yield from _xml_documents(f, name, fmt, labels)
        return
    text = _text(f, name)
    if fmt == "pubtator":
        yield from pubtator_documents(text, name)
    elif name.removesuffix(".gz").endswith(".tsv"):
        yield from _hoc_documents(text, name)
    else:
        yield from json_documents(text, name)


def _text(f: BinaryIO, name: str) -> str:
    try:
        return f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None


# -- XML: PubMed and BioC ------------------------------------------------------------------------
def _xml_documents(f: BinaryIO, name: str, fmt: str, labels: bool) -> Iterator[Document]:
    """The documents of an XML file, each read when its end tag is parsed, then dropped from the
    tree with whatever came before it: memory holds what the parser has read ahead, never the file.
    A file that breaks off gives the documents before the break, then the error."""
    from lxml import etree

    kinds = (*CITATIONS, "DeleteCitation") if fmt == "pubmed" else ("document",)
    parser = etree.XMLPullParser(events=("end",), tag=kinds, resolve_entities=False, no_network=True,
                                 load_dtd=False, huge_tree=False, remove_comments=True)
    state: dict[str, Any] = {"last": None, "root": None}
    try:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            parser.feed(chunk)
            yield from _finished(parser.read_events(), name, labels, state)
        closed = parser.close()
        yield from _finished(parser.read_events(), name, labels, state)
        if state["root"] is None:  # no document at all: its DTD is checked here
            _no_entities(closed, name)
    except etree.XMLSyntaxError as e:
        what = e.msg.split(", line")[0]
        if "entit" in what.lower():  # libxml2's own bound on expansion, met while reading the DTD
            raise InputError(f"{name}: refused: {what} (a file that declares XML entities could expand without "
                             "bound; PubMed and BioC files declare none)") from None
        yield from _finished(parser.read_events(), name, labels, state)
        after = f" (after id {state['last']})" if state["last"] is not None else ""
        raise InputError(f"{name}: line {e.lineno}: not well-formed XML ({what}){after}") from None
    root = state["root"] if state["root"] is not None else closed
    if root.tag not in (*PUBMED_ROOTS, "collection"):
        raise InputError(f"{name}: an XML file of <{root.tag}>, not PubMed / MEDLINE XML (<PubmedArticleSet>, "
                         "<MedlineCitationSet>) nor BioC (<collection>)")


def _finished(events: Iterator[tuple[str, Element]], name: str, labels: bool,
              state: dict[str, Any]) -> Iterator[Document]:
    """The documents whose end tags were parsed, each dropped from the tree once read."""
    for _, element in events:
        if state["root"] is None:  # the first document: its DTD is checked before any is read
            _no_entities(element, name)
        root = state["root"] = element.getroottree().getroot()
        if element.getparent() is not root:
            continue  # a MedlineCitation inside its PubmedArticle: read with it
        doc = _read_element(element, root.tag, name, element.sourceline or 0, labels)
        state["last"] = doc["id"] or state["last"]
        yield doc
        element.clear(keep_tail=True)
        while element.getprevious() is not None:
            del root[0]


def _no_entities(element: Element, name: str) -> None:
    """Refuse a file whose DTD declares entities (none is ever expanded: the parser keeps them as
    references; PubMed and BioC files declare none)."""
    dtd = element.getroottree().docinfo.internalDTD
    declared = [e.name for e in dtd.iterentities()] if dtd is not None else []
    if declared:
        raise InputError(f"{name}: refused: it declares XML entities ({', '.join(declared[:3])}), which could expand "
                         "without bound (PubMed and BioC files declare none)")


def _read_element(element: Element, root: str, name: str, line: int, labels: bool) -> Document:
    if root == "collection":
        return _bioc_xml(element, name, line)
    if element.tag == "DeleteCitation":
        return {"deleted": [p.text for p in element.iter("PMID")], "id": None}
    return _citation(element, name, line, labels)


def _flat(element: Element | None) -> str:
    """An element's text with its inline markup (<i>, <sup>, MathML) flattened, white space folded."""
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def _citation(element: Element, name: str, line: int, labels: bool) -> Document:
    citation = element if element.tag == "MedlineCitation" else element.find("MedlineCitation")
    book = element.find("BookDocument")
    where = citation if citation is not None else book
    pmid = where.findtext("PMID") if where is not None else None
    if not pmid or not pmid.strip():
        raise InputError(f"{name}: line {line}: a citation without a PMID")
    article = where.find("Article")
    article = where if article is None else article  # a book's fields are the BookDocument's own
    title = _flat(article.find("ArticleTitle")) or _flat(article.find("VernacularTitle")) \
        or _flat(article.find("Book/BookTitle"))
    sections = [(a.get("Label"), _flat(a)) for a in article.findall("Abstract/AbstractText")]
    abstract = " ".join(f"{label}: {t}" if labels and label else t for label, t in sections if t)
    return {"id": pmid.strip(), "title": title, "abstract": abstract,
            "sections": [{"label": label, "text": t} for label, t in sections if t]}


def _bioc_xml(element: Element, name: str, line: int) -> Document:
    doc_id = element.findtext("id")
    if not doc_id:
        raise InputError(f"{name}: line {line}: a BioC document without an <id>")

    def infons(e: Element) -> dict[str, str]:
        return {i.get("key", ""): i.text or "" for i in e.findall("infon")}
    passages = [{"infons": infons(p), "offset": p.findtext("offset") or "0", "text": p.findtext("text") or "",
                 "annotations": [{"id": a.get("id"), "infons": infons(a), "text": a.findtext("text") or "",
                                  "locations": [{"offset": loc.get("offset", "0"), "length": loc.get("length", "0")}
                                                for loc in a.findall("location")]}
                                 for a in p.findall("annotation")],
                 "relations": [_bioc_relation_xml(r, infons) for r in p.findall("relation")]}
                for p in element.findall("passage")]
    return bioc_document(checked({"id": doc_id, "infons": infons(element), "passages": passages,
                                  "relations": [_bioc_relation_xml(r, infons) for r in element.findall("relation")]},
                                 name, f"line {line}"))


def _bioc_relation_xml(r: Element, infons: Callable[[Element], dict[str, str]]) -> dict[str, Any]:
    return {"id": r.get("id"), "infons": infons(r),
            "nodes": [{"refid": n.get("refid"), "role": n.get("role", "")} for n in r.findall("node")]}


# -- BioC (as read from either form) -------------------------------------------------------------
def bioc_document(d: dict[str, Any]) -> Document:
    """A BioC document as a record: passages by their `type` infon (title, abstract; the others
    joined as the text), with their annotations and relations kept."""
    passages = d.get("passages") or []
    by_type: dict[str, list[str]] = {}
    for p in passages:
        by_type.setdefault((p.get("infons") or {}).get("type", "").lower(), []).append(p.get("text") or "")
    title = " ".join(by_type.pop("title", []) + by_type.pop("front", []))
    abstract = " ".join(by_type.pop("abstract", []))
    rest = " ".join(t for texts in by_type.values() for t in texts)
    annotations = [{**a, "type": (a.get("infons") or {}).get("type", ""), "identifier": identifier(a)}
                   for p in passages for a in p.get("annotations") or []]
    relations = [*(r for p in passages for r in p.get("relations") or []), *(d.get("relations") or [])]
    return {"id": str(d["id"]), "title": title, "abstract": abstract, "body": rest, "infons": d.get("infons") or {},
            "passages": passages, "annotations": annotations, "relations": relations}


def identifier(annotation: dict[str, Any]) -> str:
    """A BioC annotation's database identifier, under the infon names corpora use for it."""
    infons = annotation.get("infons") or {}
    return infons.get("identifier") or infons.get("MESH") or infons.get("Identifier") or ""


def mention_parts(annotation: dict[str, Any]) -> list[tuple[str, str]]:
    """A mention's (text, identifier) pairs: a composite one (CDR's `hemorrhagic cystitis`,
    identifier `D006470|D003556`, PubTator's sixth column `hemorrhagic|cystitis`) as its parts,
    which the corpus's CID lines name, as the release's rebuilt data splits it; any other as itself."""
    ident = annotation.get("identifier") or identifier(annotation)
    ids, extra = ident.split("|"), annotation.get("extra") or []
    parts = extra[0].split("|") if extra else []
    if len(ids) > 1 and len(parts) == len(ids):
        return list(zip(parts, ids, strict=True))
    return [(annotation.get("text", ""), ident)]


# -- PubTator ------------------------------------------------------------------------------------
def pubtator_documents(text: str, name: str) -> Iterator[Document]:
    """`PMID|t|title`, `PMID|a|abstract`, mention lines `PMID start end text type id` and relation
    lines `PMID type id1 id2`, documents apart by a blank line. Further columns (a composite
    mention's parts, a system's score) are kept as `extra`."""
    doc: Document | None = None
    for n, line in lines(text):
        if not line.strip():
            continue
        if m := re.match(r"([^|\t]+)\|([ta])\|(.*)$", line):
            if m[2] == "a" and (doc is None or doc["id"] != m[1] or doc["abstract"]):
                raise InputError(f"{name}: line {n}: document {m[1]}: an |a| line that does not follow its |t| line")
            if doc is not None and m[2] == "t":
                yield doc
            if m[2] == "t":
                doc = {"id": m[1], "title": m[3], "abstract": "", "annotations": [], "relations": []}
            else:
                doc["abstract"] = m[3]
            continue
        cols = [c.strip() for c in line.split("\t")]
        if doc is None or cols[0] != doc["id"] or len(cols) < 4:
            raise InputError(f"{name}: line {n}: not PubTator (`PMID|t|title`, `PMID|a|abstract`, then tab-separated "
                             "mentions and relations of that PMID)")
        if not (re.fullmatch(r"-?[0-9]+", cols[1]) and re.fullmatch(r"-?[0-9]+", cols[2])):
            doc["relations"].append({"type": cols[1], "id1": cols[2], "id2": cols[3], "extra": cols[4:]})
        elif len(cols) < 5:
            raise InputError(f"{name}: line {n}: a mention needs PMID, start, end, text and type")
        else:
            start, end = int(cols[1]), int(cols[2])
            if not 0 <= start <= end <= len(doc["title"]) + 1 + len(doc["abstract"]):
                raise InputError(f"{name}: line {n}: document {doc['id']}: a mention at {start}-{end}, outside its "
                                 f"text of {len(doc['title']) + 1 + len(doc['abstract'])} characters (title, a space, "
                                 "abstract) or ending before it starts")
            doc["annotations"].append({"text": cols[3], "type": cols[4], "identifier": cols[5] if len(cols) > 5 else "",
                                       "locations": [{"offset": start, "length": end - start}], "extra": cols[6:]})
    if doc is not None:
        yield doc


def cid_pairs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """A document's CID pairs: PubTator's relation lines, or BioC relations (their Chemical and
    Disease infons, or the identifiers of the mentions their nodes point at)."""
    if "passages" not in doc:
        return [(r["id1"], r["id2"]) for r in doc["relations"] if r["type"] == "CID"]
    mentions = {a.get("id"): a.get("identifier", "") for a in doc["annotations"]}
    pairs = []
    for r in doc["relations"]:
        infons = r.get("infons") or {}
        if (infons.get("relation") or infons.get("type")) == "CID":
            nodes = {n.get("role", ""): mentions.get(n.get("refid"), "") for n in r.get("nodes") or []}
            pairs.append((infons.get("Chemical") or nodes.get("Chemical") or nodes.get("head", ""),
                          infons.get("Disease") or nodes.get("Disease") or nodes.get("tail", "")))
    return pairs


# -- JSON documents: BioC JSON and the release's files ---------------------------------------------
RELEASE_FORMS = ('BioC JSON ({"documents": [...]})', 'DDI / KD-DTI ({pmid: {"abstract", "triples"}})',
                 'BC5CDR ({pmid: {"title", "abstract", "relations", ...}})',
                 'PubMedQA ({pmid: {"QUESTION", "CONTEXTS", ...}})')


NONE_OF_THE_FORMS = (f"a JSON document of none of the forms read here: {'; '.join(RELEASE_FORMS)} (JSONL, one record "
                     "a line, is read from a .jsonl file)")


def json_documents(text: str, name: str) -> Iterator[Document]:
    """A JSON document's records: BioC JSON, or a release file keyed by PMID. Never lines of text."""
    try:
        data = loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{name}: line {e.lineno}: not JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("documents"), list):
        for i, d in enumerate(data["documents"]):
            yield bioc_document(checked(d, name, f"BioC document {i + 1}"))
        return
    if isinstance(data, dict) and data:
        for pmid, doc in data.items():
            if not isinstance(doc, dict):
                raise InputError(f"{name}: pmid {pmid}: expected a JSON object: {NONE_OF_THE_FORMS}")
            yield _release_document(str(pmid), doc, name)
        return
    raise InputError(f"{name}: {NONE_OF_THE_FORMS}")


def _release_document(pmid: str, doc: dict[str, Any], name: str) -> Document:
    if "QUESTION" in doc:
        return {"id": pmid, "question": doc["QUESTION"], "context": doc.get("CONTEXTS"),
                **({"long_answer": doc["LONG_ANSWER"]} if "LONG_ANSWER" in doc else {}),
                **({"final_decision": doc["final_decision"]} if "final_decision" in doc else {})}
    if not isinstance(doc.get("abstract", ""), str) or not isinstance(doc.get("title", ""), str) \
            or not (doc.get("abstract") or doc.get("title")):
        raise InputError(f"{name}: pmid {pmid}: expected one of {'; '.join(RELEASE_FORMS[1:])}")
    return {**doc, "id": pmid, "title": doc.get("title", ""), "abstract": doc.get("abstract", "")}


def _hoc_documents(text: str, name: str) -> Iterator[Document]:
    """HoC's TSV (`text<TAB>label|label`, blank lines between): each line a document, its number the id."""
    for n, line in lines(text):
        if line.strip():
            cols = line.split("\t")
            yield {"id": str(n), "title": "", "abstract": cols[0].strip(),
                   **({"labels": cols[1].strip().split("|")} if len(cols) > 1 and cols[1].strip() else {})}


# -- which text a command reads ----------------------------------------------------------------------
def joined(title: str, abstract: str) -> str:
    """Title and abstract as the release joins them: `title. abstract` (`title abstract` when the
    title ends in punctuation); a title-only document is `title. ` alone."""
    if not title:
        return abstract
    return title + (" " if re.search(r"\W$", title) else ". ") + abstract


def text_of(doc: Document, which: str) -> str:
    """`--text title|abstract|all` of a document (`all`: title and abstract as the release joins
    them, then any other passages)."""
    if which == "title":
        return doc.get("title") or ""
    if which == "abstract":
        return doc.get("abstract") or ""
    return " ".join(t for t in (joined(doc.get("title") or "", doc.get("abstract") or "").strip(),
                                doc.get("body") or "") if t)
