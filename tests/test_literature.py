"""Literature files in: PubMed / MEDLINE XML, BioC XML and JSON, PubTator and the release's task
files, read as documents by every command that reads records.

The samples are written here from the formats' published descriptions: NLM's PubMed DTD
(`pubmed_250101.dtd`: PubmedArticleSet, PubmedArticle, PubmedBookArticle, DeleteCitation, the older
MedlineCitationSet), the BioC DTD and its JSON form (bioc.sourceforge.net), PubTator's text format
as the BioCreative V CDR corpus ships it, and the BioGPT release's task files."""

from __future__ import annotations

import gzip
import io
import json
import socket
import time

import pytest

from biogpt_cli import literature
from biogpt_cli.errors import InputError
from biogpt_cli.inputs import read_records
from biogpt_cli.tasks import TASKS
from tests.conftest import one_error_line
from tests.test_tasks import trained  # noqa: F401 -- a fixture: a tiny model trained on the tasks' templates

DOCTYPE = ('<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" '
           '"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">')
PUBMED = f"""<?xml version="1.0" encoding="utf-8"?>
{DOCTYPE}
<PubmedArticleSet>
<PubmedArticle>
  <MedlineCitation Status="MEDLINE" Owner="NLM">
    <PMID Version="1">31000001</PMID>
    <Article PubModel="Print">
      <ArticleTitle>Effect of CO<sub>2</sub> on <i>Escherichia coli</i> &#x3b2;-lactamase in Z&#xfc;rich.</ArticleTitle>
      <Abstract>
        <AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Resistance <b>spreads</b>
          fast.</AbstractText>
        <AbstractText Label="RESULTS" NlmCategory="RESULTS">Levels rose 10<sup>3</sup>-fold.</AbstractText>
      </Abstract>
    </Article>
    <CommentsCorrectionsList><CommentsCorrections RefType="Cites"><PMID Version="1">5</PMID>
    </CommentsCorrections></CommentsCorrectionsList>
  </MedlineCitation>
  <PubmedData><ArticleIdList><ArticleId IdType="pubmed">31000001</ArticleId></ArticleIdList></PubmedData>
</PubmedArticle>
<PubmedArticle>
  <MedlineCitation><PMID Version="1">31000002</PMID>
    <Article><ArticleTitle>Aspirin and ulcers: a title without an abstract</ArticleTitle></Article>
  </MedlineCitation>
</PubmedArticle>
<PubmedArticle>
  <MedlineCitation><PMID Version="1">31000003</PMID>
    <Article><ArticleTitle></ArticleTitle><VernacularTitle>Aspirine et ulc&#xe8;res.</VernacularTitle>
      <Abstract><AbstractText>Un r&#xe9;sum&#xe9;.</AbstractText></Abstract></Article>
  </MedlineCitation>
</PubmedArticle>
<PubmedBookArticle>
  <BookDocument><PMID Version="1">31000004</PMID><Book><BookTitle>Pharmacology</BookTitle></Book>
    <Abstract><AbstractText>A chapter.</AbstractText></Abstract></BookDocument>
</PubmedBookArticle>
<DeleteCitation><PMID Version="1">29000001</PMID><PMID Version="1">29000002</PMID></DeleteCitation>
</PubmedArticleSet>
"""
MEDLINE_2016 = """<?xml version="1.0"?>
<!DOCTYPE MedlineCitationSet PUBLIC "-//NLM//DTD Medline Citation, 1st January, 2016//EN"
  "http://www.nlm.nih.gov/databases/dtd/nlmmedlinecitationset_160101.dtd">
<MedlineCitationSet>
<MedlineCitation Owner="NLM" Status="MEDLINE"><PMID Version="1">10000001</PMID>
  <Article><ArticleTitle>Old format.</ArticleTitle><Abstract><AbstractText>Still read.</AbstractText></Abstract>
  </Article></MedlineCitation>
</MedlineCitationSet>
"""
BIOC_XML = """<?xml version='1.0' encoding='UTF-8'?>
<!DOCTYPE collection SYSTEM "BioC.dtd">
<collection><source>PubTator</source><date>20250101</date><key>BioC.key</key>
<document><id>227508</id>
  <passage><infon key="type">title</infon><offset>0</offset><text>Naloxone reverses the antihypertensive effect.</text>
    <annotation id="0"><infon key="type">Chemical</infon><infon key="MESH">D009270</infon>
      <location offset="0" length="8"/><text>Naloxone</text></annotation>
  </passage>
  <passage><infon key="type">abstract</infon><offset>47</offset><text>Clonidine lowers blood pressure.</text>
    <annotation id="1"><infon key="type">Chemical</infon><infon key="identifier">D003000</infon>
      <location offset="47" length="9"/><text>Clonidine</text></annotation>
  </passage>
  <passage><infon key="type">methods</infon><offset>80</offset><text>Rats were used.</text></passage>
  <relation id="R0"><infon key="relation">CID</infon><node refid="0" role="Chemical"/><node refid="1" role="Disease"/>
  </relation>
</document>
</collection>
"""
BIOC_JSON = {"source": "PubTator", "date": "20250101", "key": "BioC.key", "infons": {}, "documents": [
    {"id": "354896", "infons": {}, "relations": [], "passages": [
        {"infons": {"type": "title"}, "offset": 0, "text": "Lithium and the kidney.", "annotations": [
            {"id": "0", "infons": {"type": "Chemical", "identifier": "D008094"}, "text": "Lithium",
             "locations": [{"offset": 0, "length": 7}]}], "relations": []},
        {"infons": {"type": "abstract"}, "offset": 24, "text": "Lithium damages it.", "annotations": [],
         "relations": []}]}]}
PUBTATOR = ("6794356|t|Tricuspid valve regurgitation and lithium carbonate toxicity in a newborn infant.\n"
            "6794356|a|A newborn with massive tricuspid regurgitation was born to a mother taking lithium.\n"
            "6794356\t0\t29\tTricuspid valve regurgitation\tDisease\tD014262\n"
            "6794356\t34\t51\tlithium carbonate\tChemical\tD016651\n"
            "6794356\tCID\tD016651\tD014262\n"
            "\n"
            "6804000|t|Only a title here.\n"
            "6804000|a|\n")


def records(data: str | bytes, name: str, **kwargs) -> list:
    raw = data.encode() if isinstance(data, str) else data
    notes: list[str] = []
    found = list(read_records(io.BufferedReader(io.BytesIO(raw)), name, "auto", note=notes.append, **kwargs))
    return found, notes


def test_pubmed_citations_are_documents_keyed_by_pmid():
    docs, notes = records(PUBMED, "pubmed25n0001.xml")
    assert [p.id for p in docs] == ["31000001", "31000002", "31000003", "31000004"]
    first = docs[0].fields
    assert first["title"] == "Effect of CO2 on Escherichia coli \u03b2-lactamase in Z\u00fcrich."  # markup flattened
    assert first["abstract"] == "Resistance spreads fast. Levels rose 103-fold."  # sections in order, one space
    assert docs[0].text == first["title"] + " " + first["abstract"]  # `all`: joined as the release joins them
    assert docs[2].fields["title"] == "Aspirine et ulc\u00e8res." and docs[3].fields["title"] == "Pharmacology"
    assert notes == ["pubmed25n0001.xml: 2 DeleteCitation entries (PMIDs to delete, not citations) left out",
                     "pubmed25n0001.xml: 1 title-only document (no abstract): read as their title"]
    labelled, _ = records(PUBMED, "x.xml", labels=True, which="abstract")
    assert labelled[0].text == "BACKGROUND: Resistance spreads fast. RESULTS: Levels rose 103-fold."
    titles, _ = records(PUBMED, "x.xml", which="title")
    assert titles[1].text == "Aspirin and ulcers: a title without an abstract"
    old, _ = records(MEDLINE_2016, "medline16n0001.xml")
    assert [(p.id, p.text) for p in old] == [("10000001", "Old format. Still read.")]


def test_bioc_xml_and_json_keep_passages_annotations_and_relations():
    [doc], _ = records(BIOC_XML, "corpus.xml")
    f = doc.fields
    assert (doc.id, f["title"], f["abstract"], f["body"]) == (
        "227508", "Naloxone reverses the antihypertensive effect.", "Clonidine lowers blood pressure.",
        "Rats were used.")
    assert doc.text == "Naloxone reverses the antihypertensive effect. Clonidine lowers blood pressure. Rats were used."
    assert [(a["text"], a["type"], a["identifier"], a["locations"]) for a in f["annotations"]] == [
        ("Naloxone", "Chemical", "D009270", [{"offset": 0, "length": 8}]),
        ("Clonidine", "Chemical", "D003000", [{"offset": 47, "length": 9}])]
    assert f["relations"][0]["nodes"] == [{"refid": "0", "role": "Chemical"}, {"refid": "1", "role": "Disease"}]
    [doc], _ = records(json.dumps(BIOC_JSON), "corpus.json")
    assert (doc.id, doc.text) == ("354896", "Lithium and the kidney. Lithium damages it.")
    assert doc.fields["annotations"][0]["identifier"] == "D008094"


def test_pubtator_documents_with_mentions_and_relations():
    docs, notes = records(PUBTATOR, "cdr.txt")
    assert [p.id for p in docs] == ["6794356", "6804000"]
    f = docs[0].fields
    assert [(a["text"], a["type"], a["identifier"]) for a in f["annotations"]] == [
        ("Tricuspid valve regurgitation", "Disease", "D014262"), ("lithium carbonate", "Chemical", "D016651")]
    assert f["relations"] == [{"type": "CID", "id1": "D016651", "id2": "D014262", "extra": []}]
    assert notes == ["cdr.txt: 1 title-only document (no abstract): read as their title"]


def test_gzip_and_the_commands_read_documents(cli, tiny_ref, tmp_path):
    """`generate` continues each citation's title (its default `--text`), `score` reads all of it;
    records are keyed by the PMID, and a resumed run continues by id."""
    path = tmp_path / "pubmed25n0001.xml.gz"
    path.write_bytes(gzip.compress(PUBMED.encode()))
    out = tmp_path / "out.jsonl"
    code, _, err = cli("generate", "-i", path, "-o", out, "-n", "3", "-m", tiny_ref[1], "-q")
    assert code == 0 and "2 DeleteCitation entries" in err and "title-only" not in err, err  # titles, all of them
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == ["31000001", "31000002", "31000003", "31000004"]
    assert written[1]["prompt"] == "Aspirin and ulcers: a title without an abstract" and "line" not in written[1]
    out.write_text("".join(json.dumps(r) + "\n" for r in written[:2]))  # an interrupted run
    code, _, err = cli("generate", "-i", path, "-o", out, "-n", "3", "-m", tiny_ref[1], "-q", "--resume")
    assert code == 0 and [json.loads(x)["id"] for x in out.read_text().splitlines()] == [r["id"] for r in written]
    code, got, err = cli("score", "-i", path, "--format", "jsonl", "-m", tiny_ref[1], "--truncate")
    scored = [json.loads(line) for line in got.splitlines()]
    assert code == 0 and [r["id"] for r in scored] == [r["id"] for r in written], err
    assert "1 title-only document (no abstract): read as their title" in err


def test_a_truncated_xml_gz_is_one_error_line(cli, tiny_ref, tmp_path):
    """`head -c` of a .xml.gz: one line naming the file, exit 1 (not click's Ctrl-D exit 130)."""
    whole = gzip.compress((PUBMED * 1).encode() + b"<!--" + b"x" * 200_000 + b"-->")
    path = tmp_path / "t.xml.gz"
    path.write_bytes(whole[:len(whole) // 2])
    code, _, err = cli("generate", "-i", path, "-o", tmp_path / "o.jsonl", "-n", "2", "-m", tiny_ref[1], "-q")
    assert code == 1 and "t.xml.gz: a damaged or truncated gzip file" in one_error_line(err)


def test_extract_reads_a_release_file_as_its_documents(cli, trained, tmp_path):  # noqa: F811
    """The release's DDI test file is a pretty-printed JSON object: one record per document, keyed
    by PMID (not one per line of its text); a title-only document is a record like any other."""
    ddi = {"1001": {"abstract": "Warfarin with aspirin.", "triples": []},
           "1002": {"title": "Only a title", "abstract": "", "triples": []}}
    (tmp_path / "test.json").write_text(json.dumps(ddi, indent=4))
    code, out, err = cli("extract", "--task", "ddi", "-m", trained, "-i", tmp_path / "test.json", "--format", "jsonl")
    found = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in found] == ["1001", "1002"], err
    assert found[0]["relations"] == [{"head": "warfarin", "relation": "effect", "tail": "aspirin"}]
    (tmp_path / "other.json").write_text('{"a": [1, 2]}')
    code, _, err = cli("extract", "--task", "ddi", "-m", trained, "-i", tmp_path / "other.json")
    assert code == 1 and "pmid a: expected a JSON object: a JSON document of none of the forms read here: BioC JSON" \
        in one_error_line(err)


def test_title_only_documents_get_the_release_source():
    """KD-DTI and BC5CDR build a title-only document's source as `title. `, lowercased."""
    assert TASKS["kd-dti"].source({"title": "Imatinib Targets ABL1", "abstract": ""}) == "imatinib targets abl1. "
    assert TASKS["bc5cdr"].source({"title": "Lithium toxicity?", "abstract": ""}) == "lithium toxicity? "
    assert TASKS["ddi"].source({"title": "Warfarin Alone", "abstract": ""}) == "warfarin alone"
    with pytest.raises(InputError, match="both empty"):
        TASKS["kd-dti"].source({"title": "", "abstract": " "})


def line_of(text: str, needle: str) -> int:
    return text[:text.index(needle)].count("\n") + 1


MISMATCHED = PUBMED.replace("</ArticleTitle>", "</ArticleTitl>", 1)
NO_PMID = PUBMED.replace('<PMID Version="1">31000002</PMID>', "")
SECOND = "<PubmedArticle>\n  <MedlineCitation>\n"  # the second citation, its PMID gone


@pytest.mark.parametrize("data, message", [
    (MISMATCHED, f"line {line_of(MISMATCHED, '</ArticleTitl>')}: not well-formed XML \\(Opening and ending tag "
                 "mismatch: ArticleTitle"),
    (NO_PMID, f"line {line_of(NO_PMID, SECOND)}: a citation without a PMID"),
    ("<?xml version='1.0'?><records><record/></records>", "an XML file of <records>, not PubMed"),
])
def test_bad_xml_is_one_line_naming_where(data, message):
    with pytest.raises(InputError, match=message):
        records(data, "bad.xml")


def test_malformed_xml_names_the_last_pmid_read():
    broken = PUBMED.replace("<MedlineCitation><PMID Version=\"1\">31000003</PMID>", "<MedlineCitation><PMID>3<PMID>")
    with pytest.raises(InputError, match=r"bad.xml: line \d+: not well-formed XML .* \(after id 31000002\)"):
        records(broken, "bad.xml")


def test_entities_are_refused_at_once_and_no_dtd_is_fetched():
    """A "billion laughs" file is one error in well under a second; a DTD or an external entity
    named by URL is never fetched (a listener on this machine sees no connection)."""
    laughs = '<?xml version="1.0"?>\n<!DOCTYPE PubmedArticleSet [\n<!ENTITY lol "lol">\n' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">\n' for i in range(1, 10)) \
        + "]>\n<PubmedArticleSet>&lol9;</PubmedArticleSet>\n"
    start = time.perf_counter()
    with pytest.raises(InputError, match="laughs.xml: refused: .* XML entities could expand without bound"):
        records(laughs, "laughs.xml")
    assert time.perf_counter() - start < 1
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        fetched = PUBMED.replace(DOCTYPE, f'<!DOCTYPE PubmedArticleSet SYSTEM "http://127.0.0.1:{port}/pubmed.dtd">')
        assert len(records(fetched, "x.xml")[0]) == 4  # read without its DTD
        external = ('<?xml version="1.0"?>\n<!DOCTYPE PubmedArticleSet [<!ENTITY x SYSTEM '
                    f'"http://127.0.0.1:{port}/x">]>\n<PubmedArticleSet>&x;</PubmedArticleSet>')
        with pytest.raises(InputError, match="refused"):
            records(external, "x.xml")
        with pytest.raises(TimeoutError):
            listener.accept()


def test_memory_does_not_grow_with_the_file(monkeypatch):
    """Each citation leaves the tree once read: whenever a document is handed on, the tree holds it
    and what the parser has read ahead, not the documents before it."""
    citation = PUBMED.split("<PubmedArticle>")[1].split("</PubmedArticle>")[0]
    body = "".join(f"<PubmedArticle>{citation.replace('31000001', str(i))}</PubmedArticle>\n" for i in range(1, 3001))
    data = f"<?xml version='1.0'?>\n<PubmedArticleSet>\n{body}</PubmedArticleSet>\n".encode()
    held, real = [], literature._read_element
    monkeypatch.setattr(literature, "_read_element", lambda e, *a: held.append(len(e.getparent())) or real(e, *a))
    assert sum(1 for _ in literature.documents(io.BytesIO(data), "x.xml", "pubmed")) == 3000
    per_read = 2 * (1 << 16) // (len(data) // 3000)  # citations in two 64 kB reads of the file
    assert len(held) == 3000 and max(held) <= per_read  # of 3,000


def test_classify_writes_labels_as_a_document_infon(cli, trained, tmp_path):  # noqa: F811
    """A PubTator document in, its HoC labels out: a BioC document infon, or a PubTator line."""
    (tmp_path / "in.txt").write_text("5|t|cells divide\n5|a|\n\n")
    for fmt in ("bioc-json", "pubtator"):
        code, out, err = cli("classify", "-m", trained, "-i", tmp_path / "in.txt", "--format", fmt, "--text", "title")
        assert code == 0, err
        if fmt == "pubtator":
            assert out.strip().splitlines()[-1] == "5\tlabels\tempty"
        else:
            [doc] = json.loads(out)["documents"]
            assert doc["id"] == "5" and doc["infons"] == {"labels": "empty"}


def test_tokenize_reads_documents_keyed_by_id(cli, tiny_ref, tmp_path):
    path = tmp_path / "cdr.txt"
    path.write_text(PUBTATOR)
    code, out, err = cli("tokenize", "-i", path, "--format", "jsonl", "--text", "title", "-m", tiny_ref[1])
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in records] == ["6794356", "6804000"], err
    assert "".join(records[1]["tokens"]).replace("</w>", " ").strip() == "</s>Only a title here ."


def test_bc5cdr_training_data_reads_as_the_corpus_ships_it(tmp_path):
    """`finetune --task bc5cdr` takes the corpus's BioC as it takes its PubTator: the same examples."""
    from biogpt_cli.datasets import read_examples

    title, abstract = PUBTATOR.splitlines()[0].split("|t|")[1], PUBTATOR.splitlines()[1].split("|a|")[1]
    bioc = {"documents": [{"id": "6794356", "relations": [
        {"id": "R0", "infons": {"relation": "CID", "Chemical": "D016651", "Disease": "D014262"}}], "passages": [
        {"infons": {"type": "title"}, "offset": 0, "text": title, "annotations": [
            {"id": "0", "infons": {"type": "Disease", "MESH": "D014262"}, "text": "Tricuspid valve regurgitation",
             "locations": [{"offset": 0, "length": 29}]},
            {"id": "1", "infons": {"type": "Chemical", "MESH": "D016651"}, "text": "lithium carbonate",
             "locations": [{"offset": 34, "length": 17}]}]},
        {"infons": {"type": "abstract"}, "offset": len(title) + 1, "text": abstract, "annotations": []}]}]}
    (tmp_path / "cdr.txt").write_text(PUBTATOR)
    (tmp_path / "cdr.json").write_text(json.dumps(bioc))
    from_pubtator, from_bioc = (read_examples("bc5cdr", tmp_path / name) for name in ("cdr.txt", "cdr.json"))
    assert from_bioc == from_pubtator and from_bioc[0].target == (
        "the relation between lithium carbonate and tricuspid valve regurgitation exists.")


# -- composite mentions (BC5CDR) -------------------------------------------------------------------
COMPOSITE = """\
8701013|t|Ifosfamide-induced hemorrhagic cystitis.
8701013|a|Ifosfamide caused hemorrhagic cystitis and nephrotoxicity in children.
8701013\t0\t10\tIfosfamide\tChemical\tD007069
8701013\t19\t39\themorrhagic cystitis\tDisease\tD006470|D003556\themorrhagic|cystitis
8701013\t41\t51\tIfosfamide\tChemical\tD007069
8701013\t59\t79\themorrhagic cystitis\tDisease\tD006470|D003556\themorrhagic|cystitis
8701013\t84\t98\tnephrotoxicity\tDisease\tD009422
8701013\tCID\tD007069\tD006470
8701013\tCID\tD007069\tD003556
8701013\tCID\tD007069\tD009422

"""


def test_composite_mentions_train_as_their_parts(tmp_path):
    """A CDR composite mention (`D006470|D003556`, parts `hemorrhagic|cystitis`), whose CID lines
    name each part: training reads it as the release's rebuilt data does, one name per part."""
    from biogpt_cli.datasets import read_examples

    (tmp_path / "cdr.PubTator").write_text(COMPOSITE)
    (example,) = read_examples("bc5cdr", tmp_path / "cdr.PubTator")
    assert example.target == ("the relation between ifosfamide and hemorrhagic exists; the relation between "
                              "ifosfamide and cystitis exists; the relation between ifosfamide and nephrotoxicity "
                              "exists.")


def test_the_writers_name_a_composite_mentions_parts():
    """A relation naming a composite's part gets a mention of that part, inside the composite,
    with its identifier; one naming the whole composite, a relation line for each of its ids."""
    from biogpt_cli.writers import bioc_document, pubtator

    (doc,) = literature.pubtator_documents(COMPOSITE, "cdr.PubTator")
    text = f"{doc['title']} {doc['abstract']}"
    record = {"relations": [{"head": "ifosfamide", "relation": "CID", "tail": "cystitis"},
                            {"head": "ifosfamide", "relation": "CID", "tail": "hemorrhagic cystitis"}]}
    out = pubtator(bioc_document(dict(doc), record, "bc5cdr", doc["id"])).splitlines()
    part = [line.split("\t") for line in out if line.endswith("\tD003556") and "\tCID\t" not in line]
    assert [p[3] for p in part] == ["cystitis"] and text[int(part[0][1]):int(part[0][2])] == "cystitis"
    relations = [line for line in out if "\tCID\t" in line]
    assert relations == ["8701013\tCID\tD007069\tD003556", "8701013\tCID\tD007069\tD006470",
                         "8701013\tCID\tD007069\tD003556"]


def _document_text(doc):
    return f"{doc['title']} {doc['abstract']}"


def test_written_files_are_read_back_whatever_the_text_holds():
    """Control characters (U+000C, U+001B) become spaces in BioC XML, which forbids them, and line
    breaks become spaces in PubTator's one-line fields: both files read back, every offset kept."""
    from biogpt_cli.writers import bioc_document, bioc_xml, pubtator

    fields = {"id": "7", "title": "Aspirin\x0c and\nulcers\x1b", "abstract": "Aspirin caused\r\nulcers\u2028here.",
              "annotations": [{"text": "ulcers", "type": "Disease", "identifier": "D014456",
                               "locations": [{"offset": 13, "length": 6}]}]}
    record = {"relations": [{"head": "aspirin", "relation": "CID", "tail": "ulcers"}]}
    doc = bioc_document(fields, record, "bc5cdr", "7")
    xml = '<?xml version="1.0" encoding="UTF-8"?><collection><source>x</source>' + bioc_xml(doc) + "</collection>"
    (back,) = literature.documents(io.BytesIO(xml.encode()), "out.xml", "bioc")
    assert len(_document_text(back)) == len(_document_text(fields))
    (again,) = literature.pubtator_documents(pubtator(doc), "out.pubtator")
    text = _document_text(again)
    assert len(text) == len(_document_text(fields)) and again["relations"]
    assert all(text[a["locations"][0]["offset"]:][:a["locations"][0]["length"]] == a["text"]
               for a in again["annotations"])


def test_pubtator_from_bioc_counts_offsets_over_its_own_layout():
    """A BioC abstract passage need not start at len(title) + 1 (the CDR BioC sample has one at
    102 after a 96-character title): PubTator's offsets are moved to its title, space, abstract;
    a mention in another passage (a body section) is left out."""
    from biogpt_cli.writers import bioc_document, pubtator

    bioc = {"id": "9", "passages": [
        {"infons": {"type": "title"}, "offset": 0, "text": "Lithium tremor.", "annotations": []},
        {"infons": {"type": "abstract"}, "offset": 102, "text": "Lithium caused tremor.", "annotations": [
            {"id": "T1", "infons": {"type": "Disease", "identifier": "D014202"}, "text": "tremor",
             "locations": [{"offset": 117, "length": 6}]}]},
        {"infons": {"type": "results"}, "offset": 200, "text": "Tremor again.", "annotations": [
            {"id": "T2", "infons": {"type": "Disease", "identifier": "D014202"}, "text": "Tremor",
             "locations": [{"offset": 200, "length": 6}]}]}]}
    fields = literature.bioc_document(bioc)
    (back,) = literature.pubtator_documents(pubtator(bioc_document(fields, {}, "bc5cdr", "9")), "x.pubtator")
    (mention,) = back["annotations"]
    start = mention["locations"][0]["offset"]
    assert start == len("Lithium tremor.") + 1 + 15 and _document_text(back)[start:start + 6] == "tremor"


@pytest.mark.parametrize(("document", "says"), [
    ({"id": "1", "passages": ["a string"]}, 'document 1: passage 1: expected an object, got "a string"'),
    ({"id": "2", "infons": ["x"], "passages": []}, 'document 2: "infons" must be an object of strings, got ["x"]'),
    ({"id": "3", "passages": [{"infons": {"type": None}, "text": "t"}]}, 'the infon "type" must be a string, got null'),
    ({"id": "4", "passages": [{"offset": 0, "text": 12}]}, 'document 4: passage 1: "text" must be a string, got 12'),
    ({"id": "5", "passages": [{"offset": "x", "text": "t"}]}, "offset must be a whole number of characters, got \"x\""),
    ({"id": None, "passages": []}, '"id" must be a non-empty string or a number, got null'),
    ({"id": "6", "passages": [{"text": "t", "annotations": [{"text": "t",
                                                             "locations": [{"offset": -1, "length": 1}]}]}]},
     "a location's offset must be a whole number of characters, got -1"),
])
def test_malformed_bioc_is_one_line_naming_the_document(cli, tiny_ref, tmp_path, document, says):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"source": "x", "documents": [document]}))
    code, _, err = cli("generate", "-i", path, "-n", "1", "-m", tiny_ref[1])
    assert code == 1 and f"{path}: " in err and says in one_error_line(err)


def test_malformed_bioc_xml_and_pubtator_are_one_line(cli, tiny_ref, tmp_path):
    bad = {"x.xml": '<?xml version="1.0"?><collection><source>s</source><document><id>7</id><passage><offset>z'
                    '</offset><text>t</text></passage></document></collection>',
           "neg.pubtator": "8|t|Title\n8|a|Abstract\n8\t-3\t2\tTi\tChemical\tD1\n",
           "ends.pubtator": "9|t|Title\n9|a|Abstract\n9\t5\t2\tTi\tChemical\tD1\n",
           "order.pubtator": "10|a|Abstract first\n10|t|Title\n"}
    says = {"x.xml": "document 7: passage 1: offset must be a whole number",
            "neg.pubtator": "document 8: a mention at -3-2", "ends.pubtator": "document 9: a mention at 5-2",
            "order.pubtator": "document 10: an |a| line that does not"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        code, _, err = cli("generate", "-i", tmp_path / name, "-n", "1", "-m", tiny_ref[1], "--input-format",
                           "auto")
        assert code == 1 and says[name] in one_error_line(err), err


def test_utf16_xml_is_told_by_its_content():
    data = PUBMED.replace('encoding="utf-8"', 'encoding="UTF-16"').encode("utf-16")
    assert literature.sniff(data[:4096], "x.xml") == "pubmed" and literature.sniff(data[:4096], "x") == "pubmed"
    assert [d["id"] for d in literature.documents(io.BytesIO(data), "x", "pubmed")][:2] == ["31000001", "31000002"]


def test_a_qa_item_in_pubtator_has_its_question_and_context():
    from biogpt_cli.writers import bioc_document, pubtator

    fields = {"question": "Do statins help?", "context": ["Statins lowered deaths.", "In 2 trials."]}
    lines = pubtator(bioc_document(fields, {"answer": "yes"}, "pubmedqa", "q1")).splitlines()
    assert lines == ["q1|t|Do statins help?", "q1|a|Statins lowered deaths. In 2 trials.", "q1\tanswer\tyes"]


def test_written_title_is_the_records_title_whatever_the_passage_order():
    """A BioC `front` passage before its `title`: the record's title (title, then front) and the
    text PubTator writes are one text, so the offsets counted in one hold in the other."""
    from biogpt_cli.writers import bioc_document, pubtator

    bioc = {"id": "5", "passages": [
        {"infons": {"type": "front"}, "offset": 0, "text": "Vol 3.", "annotations": []},
        {"infons": {"type": "title"}, "offset": 7, "text": "Lithium tremor.", "annotations": []},
        {"infons": {"type": "abstract"}, "offset": 23, "text": "Lithium caused tremor.", "annotations": [
            {"id": "T1", "infons": {"type": "Disease", "identifier": "D014202"}, "text": "tremor",
             "locations": [{"offset": 38, "length": 6}]}]}]}
    fields = literature.bioc_document(bioc)
    (back,) = literature.pubtator_documents(pubtator(bioc_document(fields, {}, "bc5cdr", "5")), "x.pubtator")
    assert back["title"] == fields["title"] == "Lithium tremor. Vol 3."
    (mention,) = back["annotations"]
    start = mention["locations"][0]["offset"]
    assert _document_text(back)[start:start + 6] == "tremor"
