"""The `biogpt` command line: outputs equal the library's, exit codes, one-line errors, Unix manners.

Most tests call `main()` in this process (fast); the ones about pipes and signals run a real process.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

from biogpt_cli import GenerationOptions, generate
from biogpt_cli.loading import load_pretrained
from biogpt_cli.streaming import continuation
from tests.conftest import ROOT, one_error_line

PROMPTS = ["the cat and", "of the", "and then the dog", "in", "the end of the"]


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    folder = tiny_ref[1]
    model, tok = load_pretrained(folder)
    return folder, model, tok


def expected_texts(model, tok, prompts, opts):
    ids = [tok.encode(p) for p in prompts]
    return [[continuation(tok, i, s.ids)[0] for s in seqs] for i, seqs in zip(ids, generate(model, ids, opts),
                                                                             strict=True)]


# -- generate ----------------------------------------------------------------------------------
def test_generate_prompt_argument(cli, tiny):
    folder, model, tok = tiny
    code, out, err = cli("generate", PROMPTS[0], "-m", folder, "-n", "12")
    assert (code, err) == (0, "")
    expected = expected_texts(model, tok, PROMPTS[:1], GenerationOptions(max_new_tokens=12))
    assert out == PROMPTS[0] + expected[0][0] + "\n"


def test_collector_returns_once_the_model_is_loaded(cli, tiny):
    """`entry` starts with the garbage collector off (`end_startup`); loading the model turns it
    back on, with what the start built frozen, so a long batch or a server collects as usual."""
    gc.disable()
    try:
        code, _, err = cli("generate", PROMPTS[0], "-m", tiny[0], "-n", "2")
        assert (code, err) == (0, "")
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.parametrize("batch", ["1", "2", "8"])
def test_generate_from_stdin_in_order_any_batch_size(cli, tiny, batch):
    folder, model, tok = tiny
    stdin = "\n".join([PROMPTS[0], "", "   ", *PROMPTS[1:]]).encode() + b"\n"
    code, out, err = cli("generate", "-m", folder, "-n", "7", "--batch-size", batch, stdin=stdin)
    assert code == 0
    assert err == "note: skipped 2 blank lines\n"
    texts = expected_texts(model, tok, PROMPTS, GenerationOptions(max_new_tokens=7))
    assert out.splitlines() == [p + t[0] for p, t in zip(PROMPTS, texts, strict=True)]


def test_generate_jsonl_beams(cli, tiny):
    folder, model, tok = tiny
    code, out, err = cli("generate", "-m", folder, "-n", "6", "--num-beams", "3", "--num-return-sequences", "2",
                         "--format", "jsonl", "--input", "-", stdin="\n".join(PROMPTS[:2]).encode())
    assert (code, err) == (0, "")
    records = [json.loads(line) for line in out.splitlines()]
    opts = GenerationOptions(max_new_tokens=6, num_beams=3, num_return_sequences=2)
    expected = generate(model, [tok.encode(p) for p in PROMPTS[:2]], opts)
    assert [(r["prompt"], r["line"], r["sequence"], r["ids"], r["finish_reason"]) for r in records] == [
        (PROMPTS[i], i + 1, j, s.ids, s.finish_reason) for i, seqs in enumerate(expected) for j, s in enumerate(seqs)]
    assert all(r["text"] == continuation(tok, tok.encode(r["prompt"]), r["ids"])[0] for r in records)


def test_generate_sampling_is_seeded(cli, tiny):
    folder = tiny[0]
    args = ("generate", "the", "-m", folder, "-n", "10", "--sample", "--top-k", "20", "--top-p", "0.9",
            "--format", "jsonl")
    runs = [json.loads(cli(*args, "--seed", s)[1])["ids"] for s in ("1", "1", "2")]
    assert runs[0] == runs[1] != runs[2]
    beams = [json.loads(cli(*args, "--num-beams", "3", "--seed", s)[1])["ids"] for s in ("1", "1", "2")]
    assert beams[0] == beams[1] != beams[2]


def test_generate_stop_and_ban(cli, tiny):
    folder, model, tok = tiny
    base = ("generate", "the", "-m", folder, "-n", "10", "--format", "jsonl", "--no-repeat-ngram-size", "1")
    free = json.loads(cli(*base)[1])  # the tiny model repeats itself; n-gram 1 makes every token new
    words = free["text"].split()
    stopped = json.loads(cli(*base, "--stop", words[3])[1])
    assert stopped["finish_reason"] == "stop" and stopped["text"] == " " + " ".join(words[:3]) + " "
    assert stopped["ids"] == free["ids"][:len(stopped["ids"])] and len(stopped["ids"]) < 10
    out = json.loads(cli(*base, "--ban", words[1], "--ban", " ".join(words[2:4]))[1])
    assert out["ids"] != free["ids"]
    for banned in (words[1], " ".join(words[2:4])):  # as BPE ids: a word, and a phrase of two
        seq = tok.encode(banned, add_special_tokens=False)
        assert not any(out["ids"][i:i + len(seq)] == seq for i in range(len(out["ids"])))


def test_generate_prompt_too_long_and_truncate(cli, tiny):
    folder = tiny[0]
    long = " ".join(["the"] * 70)  # the tiny model has 64 positions
    code, out, err = cli("generate", long, "-m", folder, "-n", "5")
    assert code == 1 and "exceeds the model's 64 positions" in one_error_line(err) and out == ""
    code, out, err = cli("generate", long, "-m", folder, "-n", "5", "--truncate", "--format", "jsonl")
    assert code == 0 and "cut to 59 (</s> and its last 58)" in err
    record = json.loads(out)
    assert len(record["ids"]) == 5 and record["prompt_tokens_given"] == 71
    assert record["prompt"].split() == ["the"] * 58  # the prompt as used, not the whole one given


@pytest.mark.parametrize("args", [
    ["--max-new-tokens", "-1"], ["--num-beams", "0"], ["--top-p", "0"], ["--top-p", "1.5"], ["--temperature", "-1"],
    ["--temperature", "0"], ["--sample", "--temperature", "0"], ["--num-beams", "2", "--num-return-sequences", "3"],
    ["--num-return-sequences", "2"],
    ["--dtype", "float64"], ["--device", "cuda:99"], ["--device", "tpu"], ["--resume"], ["--batch-size", "0"],
    ["--repetition-penalty", "0"], ["--min-new-tokens", "99"], ["--bogus-option"], ["--format", "xml"],
    ["--quantize", "int8", "--dtype", "float16"], ["--workers", "2"], ["--address", "head:6379"],
])
def test_bad_options_are_usage_errors_before_loading(cli, args):
    code, out, err = cli("generate", "x", "-m", "/no/such/model", *args)  # loading it would exit 1
    assert code == 2 and out == ""
    one_error_line(err)


@pytest.mark.parametrize("args,message", [
    (["generate", "x", "--input-format", "jsonl"], "--input-format is for --input: input on the command line is"),
    (["qa", "--question", "q", "--context", "c", "--errors", "replace"], "--errors is for --input"),
    (["embed", "x", "--errors", "replace", "--input-format", "text"], "--input-format and --errors are for --input"),
    (["score", "--prompt", "p", "--choices", "a,b", "--truncate"], "--truncate cuts over-long lines of a FILE"),
])
def test_options_that_would_change_nothing_are_refused(cli, args, message):
    code, _, err = cli(*args, "-m", "/no/such/model")
    assert code == 2 and message in one_error_line(err)


@pytest.mark.parametrize("command", [["score", "x.txt"], ["embed", "x"], ["qa", "--question", "q", "--context", "c"],
                                     ["extract", "x"], ["classify", "x"]])
def test_ray_options_on_a_local_run_are_refused(cli, command):
    """They would be ignored: a user who forgot --engine ray would wait for a local run."""
    code, _, err = cli(*command, "-m", "/no/such/model", "--workers", "4", "--cpus-per-worker", "2")
    assert code == 2 and one_error_line(err) == "error: --workers, --cpus-per-worker only apply to --engine ray"


def test_usage_errors_about_inputs(cli, tmp_path):
    assert cli("generate", "", "-m", "/no/such/model")[0] == 2
    assert cli("generate", "x", "-i", "-", "-m", "/no/such/model")[0] == 2
    for command in (["generate", "-i"], ["tokenize"], ["detokenize"]):  # named before any model loads
        code, _, err = cli(*command, tmp_path / "missing.txt", "-m", "/no/such/model")
        assert code == 1 and "missing.txt: no such file" in one_error_line(err)
    code, _, err = cli("generate", "x", "-m", "/no/such/model", "-o", tmp_path / "no" / "out.jsonl")
    assert code == 1 and f"no folder {tmp_path / 'no'} to write it in" in one_error_line(err)


def test_model_errors_are_one_line(cli, tmp_path):
    code, out, err = cli("generate", "x", "-m", tmp_path)
    assert code == 1 and out == "" and "no tokenizer files" in one_error_line(err)
    code, _, err = cli("info", "-m", "/no/such/model")
    assert code == 1 and "no such model folder" in one_error_line(err)


def test_debug_shows_the_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "biogpt_cli", "info", "-m", str(tmp_path), "--debug"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" in run.stderr


# -- output files: refuse, force, resume -------------------------------------------------------
def test_output_file_refused_forced_and_resumed(cli, tiny, tmp_path):
    folder = tiny[0]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    base = ("generate", "-m", folder, "-n", "5", "-i", prompts, "-o", out, "--format", "jsonl",
            "--num-beams", "2", "--num-return-sequences", "2")
    assert cli(*base)[0] == 0
    complete = out.read_text()
    assert [json.loads(x)["id"] for x in complete.splitlines()] == [f"p{i}" for i in range(5) for _ in range(2)]
    code, _, err = cli(*base)
    assert code == 1 and "already exists" in one_error_line(err) and out.read_text() == complete
    manifest = tmp_path / "out.jsonl.manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "started": "earlier"}))
    assert cli(*base, "--force")[0] == 0 and out.read_text() == complete
    assert json.loads(manifest.read_text())["started"] != "earlier"  # a new run, not the old one's record
    # a run killed mid-way: 2 whole prompts, half of the third's group, a torn line
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:17])
    started = json.loads(manifest.read_text())["started"]
    assert cli(*base, "--resume")[0] == 0
    assert out.read_text() == complete and json.loads(manifest.read_text())["started"] == started


@pytest.mark.parametrize("command", [["generate"], ["extract", "--task", "ddi"], ["embed"]])
def test_output_that_is_the_input_is_refused_and_the_input_kept(cli, tmp_path, command):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "a", "abstract": "a"}) + "\n")
    spelled_otherwise = f"{tmp_path}/./in.jsonl"
    code, out, err = cli(*command, "-i", data, "-o", spelled_otherwise, "--force", "-m", "/no/such/model")
    assert code == 1 and out == "" and "is also the input" in one_error_line(err)
    assert data.read_text() == json.dumps({"prompt": "a", "abstract": "a"}) + "\n"


def test_resume_refuses_a_damaged_file(cli, tiny, tmp_path):
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", tiny[0], "-i", "-", "-o", out, "-n", "3")
    assert cli(*args, stdin=b"a\nb\nc\n")[0] == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "not json", lines[2]]) + "\n")
    code, _, err = cli(*args, "--resume", stdin=b"a\nb\nc\n")
    assert code == 1 and "line 2 is not a record" in one_error_line(err)
    out.write_text("\n".join([lines[0], "[1, 2]", lines[2]]) + "\n")
    code, _, err = cli(*args, "--resume", stdin=b"a\nb\nc\n")
    assert code == 1 and "line 2 is not a record" in one_error_line(err)


def test_resume_of_a_prompt_argument_run_keeps_its_record(cli, tiny, tmp_path):
    """The PROMPT argument's record has no line or id: a resume still knows it is done."""
    out, args = tmp_path / "out.jsonl", ("generate", "the cat", "-m", tiny[0], "-n", "3")
    assert cli(*args, "-o", out)[0] == 0
    complete = out.read_text()
    code, _, err = cli(*args, "-o", out, "--resume")
    assert code == 0 and "1 input already done" in err and out.read_text() == complete


# -- tokenize / detokenize / score / info / convert --------------------------------------------
def test_tokenize_equals_reference_on_corpus(cli, real_vocab, corpus_lines, tmp_path):
    fairseq, hub = real_vocab
    ref = transformers.BioGptTokenizer(str(hub / "vocab.json"), str(hub / "merges.txt"))
    lines = corpus_lines[:300]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    expected = [" ".join(map(str, ref(x)["input_ids"])) for x in lines]
    for jobs in ("1", "2"):
        code, out, err = cli("tokenize", corpus, "-m", fairseq, "--jobs", jobs)
        assert (code, err) == (0, "") and out.splitlines() == expected
    code, out, _ = cli("tokenize", "-m", hub, "--tokens", "--no-special", stdin=lines[0].encode())
    assert out.split() == ref.convert_ids_to_tokens(ref(lines[0])["input_ids"][1:])
    code, out, _ = cli("tokenize", "-m", hub, "--format", "jsonl", stdin=lines[0].encode())
    assert json.loads(out)["ids"] == ref(lines[0])["input_ids"]


def test_tokenize_hostile_input(cli, tiny, tmp_path):
    folder = tiny[0]
    code, out, err = cli("tokenize", "-m", folder, stdin=b"fine\n\xff\xfe broken\n")
    assert code == 1 and "line 2: invalid UTF-8 (byte 0xff at column 1)" in one_error_line(err)
    code, out, err = cli("tokenize", "-m", folder, "--errors", "replace", stdin=b"fine\n\xff broken\n\n")
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = cli("tokenize", "-m", folder, stdin=b"a\x00b\tc\r\n")
    assert code == 0 and out.startswith("2 ")
    binary = bytes(range(256)) * 64
    assert cli("tokenize", "-m", folder, stdin=binary)[0] == 1
    assert cli("tokenize", "-m", folder, "--errors", "replace", stdin=binary)[0] == 0
    for jobs in ("1", "2"):  # BPE time grows with the square of a word's length: refused, not hung
        code, out, err = cli("tokenize", "-m", folder, "--jobs", jobs, stdin=b"fine\n" + b"ab" * 6000 + b"\n")
        assert code == 1 and "stdin: line 2: a 12,000-character run without spaces" in one_error_line(err)
    big = tmp_path / "big.txt"
    big.write_bytes(b"the cat and the dog " * 500_000 + b"\n")  # one 10 MB line
    code, out, _ = cli("tokenize", big, "-m", folder, "--no-special")
    assert code == 0 and len(out.split()) > 2_000_000


def test_a_byte_order_mark_is_no_part_of_the_text(cli, tiny, tmp_path):
    """Windows editors start UTF-8 files with a BOM: read as text it became <unk>, and broke JSON."""
    folder, bom = tiny[0], b"\xef\xbb\xbf"
    plain, marked = cli("tokenize", "-m", folder, stdin=b"the cat\n")[1], cli("tokenize", "-m", folder,
                                                                             stdin=bom + b"the cat\n")[1]
    assert marked == plain and " 3 " not in marked
    (tmp_path / "in.jsonl").write_bytes(bom + b'{"prompt": "the cat", "id": 7}\n')
    code, out, err = cli("generate", "-m", folder, "-i", tmp_path / "in.jsonl", "-n", "2", "--format", "jsonl")
    assert code == 0 and json.loads(out)["prompt"] == "the cat" and json.loads(out)["id"] == 7, err
    (tmp_path / "gold.json").write_bytes(bom + b'{"7": "yes"}')
    (tmp_path / "pred.jsonl").write_text('{"id": "7", "answer": "yes"}\n')
    code, out, err = cli("evaluate", "--task", "pubmedqa", tmp_path / "pred.jsonl", tmp_path / "gold.json",
                         "--format", "jsonl")
    assert code == 0 and json.loads(out)["accuracy"] == 1.0, err


def test_detokenize_round_trip(cli, tiny):
    folder, _, tok = tiny
    ids = tok.encode("the cat and the dog")
    code, out, _ = cli("detokenize", "-m", folder, stdin=(" ".join(map(str, ids)) + "\n").encode())
    assert (code, out) == (0, "the cat and the dog\n")
    code, _, err = cli("detokenize", "-m", folder, stdin=b"2 99999\n")
    assert code == 1 and "line 1: id 99999 is outside the vocabulary" in one_error_line(err)
    code, records, _ = cli("tokenize", "-m", folder, "--format", "jsonl", stdin=b"the cat and the dog\nof\n")
    assert cli("detokenize", "-m", folder, stdin=records.encode())[:2] == (0, "the cat and the dog\nof\n")
    code, _, err = cli("detokenize", "-m", folder, stdin=b'{"ids": [2, "x"]}\n')
    assert code == 1 and 'line 1: expected space-separated integer ids, or a JSON record with "ids"' in err


def test_score_an_over_long_line(cli, tiny):
    long = (" ".join(["the"] * 70) + "\n").encode()  # the tiny model has 64 positions
    code, out, err = cli("score", "-m", tiny[0], stdin=long)
    assert code == 1 and out == "" and "line 1: 71 tokens exceed the model's 64 positions (pass --truncate" in (
        one_error_line(err))
    code, out, err = cli("score", "-m", tiny[0], "--truncate", stdin=long)
    assert code == 0 and out.split("\t")[0] == "64" and "71 tokens cut to 64 (</s> and the text's last 63)" in err


def test_score_equals_reference_loss(cli, tiny_ref, tiny):
    ref, folder = tiny_ref
    tok = tiny[2]
    lines = ["the cat and the dog", "of", "and then"]
    code, out, err = cli("score", "-m", folder, "--format", "jsonl", "--batch-size", "2",
                         stdin="\n".join(lines).encode())
    assert (code, err) == (0, "")
    for line, record in zip(lines, map(json.loads, out.splitlines()), strict=True):
        ids = torch.tensor([tok.encode(line)])
        with torch.no_grad():
            loss = ref(ids, labels=ids).loss.item()
        assert record["tokens"] == ids.shape[1] and abs(record["nll"] - loss) < 1e-4
        assert abs(record["ppl"] - math.exp(loss)) < 1e-3 * math.exp(loss)
    code, out, err = cli("score", "-m", folder, stdin=b"\nof\n")  # blank lines are skipped, as generate does
    assert code == 0 and len(out.splitlines()) == 1 and err == "note: skipped 1 blank line\n"


@pytest.mark.parametrize("command", ["score", "embed"])
def test_a_whole_file_output_appears_only_when_complete(cli, tiny, tmp_path, command):
    """score and embed cannot resume, so -o takes its name only once every line is in: a run that
    fails at line 20 leaves no file (nor a manifest saying it runs), and the file --force was to
    replace keeps what it had."""
    folder, good, bad, out = tiny[0], tmp_path / "good.txt", tmp_path / "bad.txt", tmp_path / "out.jsonl"
    good.write_text("the cat\nof the\n")
    bad.write_text("the cat\n" * 19 + " ".join(["the"] * 70) + "\n")  # 71 tokens: the tiny model has 64
    run = (command, "-m", folder, "--batch-size", "1", "-o", out, "-i")
    code, _, err = cli(*run, bad)
    assert code == 1 and "line" in one_error_line(err) and "20" in err and sorted(tmp_path.iterdir()) == [bad, good]
    code, _, err = cli(*run, good)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    manifest = out.with_name(out.name + ".manifest.json")  # once the file is whole, what wrote it
    assert code == 0 and [r["line"] for r in records] == [1, 2] and sorted(tmp_path.iterdir()) == [bad, good, out,
                                                                                                   manifest]
    code, _, err = cli(*run, good)  # there already: the hint offers no --resume, which these commands lack
    assert code == 1 and one_error_line(err).endswith(": already exists; pass --force to overwrite it")
    before = manifest.read_text()
    code, _, err = cli(*run, bad, "--force")
    assert code == 1 and [json.loads(x) for x in out.read_text().splitlines()] == records
    assert manifest.read_text() == before
    assert sorted(tmp_path.iterdir()) == [bad, good, out, manifest]


@pytest.mark.parametrize("command, good, bad", [("tokenize", b"the cat\nof the\n", b"the cat\n" * 19 + b"\xff\n"),
                                                ("detokenize", b"5 6\n7\n", b"5 6\n" * 19 + b"x\n")])
def test_tokenize_and_detokenize_take_i_and_write_whole_files(cli, tiny, tmp_path, command, good, bad):
    """-i and -o as the other commands take them; the output appears only once every line is in."""
    folder, out = tiny[0], tmp_path / "out.txt"
    (tmp_path / "good.txt").write_bytes(good)
    (tmp_path / "bad.txt").write_bytes(bad)
    _, expected, _ = cli(command, "-m", folder, tmp_path / "good.txt")
    code, stdout, err = cli(command, "-m", folder, "-i", tmp_path / "good.txt", "-o", out)
    assert code == 0 and stdout == "" and out.read_text() == expected and expected.count("\n") == 2, err
    code, _, err = cli(command, "-m", folder, "-i", tmp_path / "good.txt", "-o", out)
    assert code == 1 and one_error_line(err).endswith(": already exists; pass --force to overwrite it")
    code, _, err = cli(command, "-m", folder, "-i", tmp_path / "bad.txt", "-o", out, "--force")
    assert code == 1 and "line 20" in one_error_line(err) and out.read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "good.txt", "out.txt"]
    code, _, err = cli(command, "-m", folder, tmp_path / "good.txt", "-i", tmp_path / "good.txt")
    assert code == 2 and "give FILE or --input, not both" in one_error_line(err)
    if command == "tokenize":  # --format auto: JSONL for a .jsonl name
        assert cli(command, "-m", folder, tmp_path / "good.txt", "-o", tmp_path / "t.jsonl")[0] == 0
        assert json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])["ids"] == [int(i) for i in
                                                                                         expected.split()[:5]]


@contextlib.contextmanager
def pipe_path(data: bytes):
    """A pipe holding `data`, as `<(cat FILE)` gives one: readable once, as /dev/fd/N."""
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    try:
        yield f"/dev/fd/{r}"
    finally:
        os.close(r)


def test_a_pipe_given_as_the_input_file_is_read_once(cli, tiny, tmp_path):
    """Counting a progress bar's total or hashing the input for the manifest read a pipe
    (`-i <(zcat prompts.gz)`) to its end before the run: tokenize printed nothing and generate wrote
    no record, with exit 0."""
    from biogpt_cli.inputs import count_items

    folder, out = tiny[0], tmp_path / "out.jsonl"
    with pipe_path(b"the cat\nof the\n") as path:  # a bar's total on a terminal: none, rather than the lines
        assert count_items(path) is None and count_items(str(tmp_path / "none")) is None
    with pipe_path(b"the cat\nof the\n") as path:
        code, ids, _ = cli("tokenize", "-m", folder, path)
    assert code == 0 and len(ids.splitlines()) == 2
    with pipe_path(b"the cat\nof the\n") as path:
        code, _, err = cli("generate", "-m", folder, "-n", "2", "-i", path, "-o", out)
    assert code == 0 and len(out.read_text().splitlines()) == 2, err
    run = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())["run"]
    assert run["input"].startswith("/dev/fd/") and "input_sha256" not in run


def test_gzipped_inputs_are_read_through(cli, tiny, tmp_path):
    """`-i prompts.txt.gz` (and .jsonl.gz records) read as the plain file reads; a truncated one is
    one error line (click would take gzip's EOFError for Ctrl-D: exit 130, no message)."""
    import gzip

    folder, text = tiny[0], "the cat\nof the dog\n"
    (tmp_path / "p.txt").write_text(text)
    (tmp_path / "p.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(b'{"id": "a", "prompt": "the cat"}\n'))
    plain = cli("tokenize", "-m", folder, tmp_path / "p.txt")
    assert cli("tokenize", "-m", folder, tmp_path / "p.txt.gz")[:2] == plain[:2] and plain[0] == 0
    code, out, err = cli("generate", "-m", folder, "-n", "3", "-i", tmp_path / "p.jsonl.gz", "--format", "jsonl")
    assert code == 0 and json.loads(out)["id"] == "a", err
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(text.encode() * 50)[:40])
    for command in (("tokenize", "-m", folder, tmp_path / "cut.txt.gz"),
                    ("generate", "-m", folder, "-n", "2", "-i", tmp_path / "cut.txt.gz", "-o", tmp_path / "o.jsonl")):
        code, _, err = cli(*command)
        assert code == 1 and "cut.txt.gz: a damaged or truncated gzip file" in one_error_line(err)


def test_score_reads_file_or_input_and_writes_output(cli, tiny, tmp_path):
    folder, text = tiny[0], tmp_path / "t.txt"
    text.write_text("the cat\nof the\n")
    code, by_argument, _ = cli("score", text, "-m", folder)
    assert code == 0 and len(by_argument.splitlines()) == 2
    assert cli("score", "-i", text, "-m", folder)[1] == by_argument
    assert cli("score", text, "-i", text, "-m", folder)[0] == 2
    assert cli("score", "-i", text, "-m", folder, "-o", tmp_path / "s.txt")[:2] == (0, "")
    assert (tmp_path / "s.txt").read_text() == by_argument  # text: the name does not end in .jsonl
    assert cli("score", "-i", text, "-m", folder, "--show", "--format", "jsonl")[0] == 2
    assert cli("score", "-i", text, "-m", folder, "--show", "-o", tmp_path / "s.jsonl")[0] == 2  # JSONL by name
    code, _, err = cli("score", "-i", text, "-m", folder, "--show", "--engine", "ray", "-o", tmp_path / "out")
    assert code == 2 and "nor --engine ray" in one_error_line(err)
    records = tmp_path / "t.jsonl"  # JSONL: records with "text" and "id", as --engine ray reads them
    records.write_text('{"id": "a", "text": "the cat"}\n{"id": "b", "text": "of the"}\n')
    code, out, _ = cli("score", "-i", records, "-m", folder, "--format", "jsonl")
    scored = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [r["id"] for r in scored] == ["a", "b"]
    as_text = [x.rsplit("\t", 1)[0] for x in by_argument.splitlines()]  # tokens and nll of the plain lines
    assert [f"{r['tokens']}\t{r['nll']:.6f}" for r in scored] == as_text
    records.write_text('{"id": "a", "prompt": "the cat"}\n')
    code, _, err = cli("score", "-i", records, "-m", folder)
    assert code == 1 and 'line 1: expected an object with a string "text"' in one_error_line(err)


def test_score_choices(cli, tiny_ref, tiny):
    ref, folder = tiny_ref
    tok = tiny[2]
    code, out, _ = cli("score", "-m", folder, "--prompt", "the cat", "--choices", "and,of the,in")
    probs = {c: float(p) for c, p in (line.split("\t") for line in out.splitlines())}
    assert code == 0 and abs(sum(probs.values()) - 1) < 1e-5
    prompt = tok.encode("the cat")
    totals = {}
    for choice in probs:
        ids = prompt + tok.encode(choice, add_special_tokens=False)
        with torch.no_grad():
            logp = ref(torch.tensor([ids])).logits[0].log_softmax(-1)
        totals[choice] = sum(logp[i - 1, ids[i]].item() for i in range(len(prompt), len(ids)))
    norm = math.log(sum(math.exp(t) for t in totals.values()))
    assert all(abs(probs[c] - math.exp(totals[c] - norm)) < 1e-5 for c in probs)
    assert cli("score", "-m", folder, "--choices", "a,b")[0] == 2


def test_info_and_convert(cli, tiny_ref, tiny, tmp_path):
    folder = tiny[0]
    code, out, _ = cli("info", "-m", folder, "--format", "jsonl")
    facts = json.loads(out)
    assert code == 0 and facts["config"]["hidden_size"] == 32 and "model.safetensors" in facts["files"]
    assert facts["parameters"] == sum(p.numel() for p in tiny_ref[0].parameters())  # tied weights once
    dst = tmp_path / "converted"
    mask = os.umask(0o022)
    try:
        assert cli("convert", folder, dst)[0] == 0
    finally:
        os.umask(mask)
    # every file readable as open() makes it (safetensors' own save_file creates its file 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in dst.iterdir()} == dict.fromkeys(
        ("config.json", "model.safetensors", "vocab.json", "merges.txt"), 0o644)
    assert cli("convert", folder, dst)[0] == 2  # not empty any more
    (tmp_path / "a-file").write_text("x")
    code, _, err = cli("convert", folder, tmp_path / "a-file", "--force")  # --force cannot help: not "pass --force"
    assert code == 2 and "a-file: is a file; DST is the folder" in one_error_line(err)
    code, out, _ = cli("generate", "the cat", "-m", dst, "-n", "5")
    assert code == 0 and out == cli("generate", "the cat", "-m", folder, "-n", "5")[1]


def test_live_terminal_rendering(tiny):
    from rich.console import Console

    from biogpt_cli.inputs import Prompt
    from biogpt_cli.output import Renderer
    from biogpt_cli.streaming import stream_completions

    _, model, tok = tiny
    screen = io.StringIO()
    renderer = Renderer("text", None, Console(file=screen, force_terminal=True, width=200), 1)
    prompts = [Prompt(1, PROMPTS[0]), Prompt(2, PROMPTS[1])]
    renderer.begin(prompts)
    opts = GenerationOptions(max_new_tokens=8)
    for ev in stream_completions(model, tok, [tok.encode(p.text) for p in prompts], opts):
        renderer.event(ev)
    texts = expected_texts(model, tok, [p.text for p in prompts], GenerationOptions(max_new_tokens=8))
    shown = screen.getvalue()
    assert "\x1b[1m" + PROMPTS[0] in shown  # the prompt in bold
    stripped = re.sub(r"\x1b\[[0-9;]*m", "", shown)
    assert stripped == "".join(p.text + t[0] + "\n" for p, t in zip(prompts, texts, strict=True))


# -- real processes: pipes, signals, examples --------------------------------------------------
def biogpt(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "biogpt_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def test_broken_pipe_exits_quietly(tiny, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n" * 2000)
    proc = biogpt("generate", "-m", tiny[0], "-n", "20", "-i", prompts, "--batch-size", "1")
    first = proc.stdout.readline()
    proc.stdout.close()
    proc.wait(timeout=120)
    assert first.startswith(b"the cat") and proc.returncode == 141 and proc.stderr.read() == b""


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_killed_batch_resumes_to_exactly_one_record_per_prompt(tiny, tmp_path, how):
    folder = tiny[0]
    prompts = tmp_path / "p.txt"
    n = 400
    prompts.write_text("".join(f"the {'cat and ' * (i % 5)}dog\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    args = ("generate", "-m", folder, "-n", "40", "-i", prompts, "-o", out, "--format", "jsonl", "--batch-size", "1")
    proc = biogpt(*args)
    deadline = time.time() + 1800  # a safety net only: a busy machine may take minutes to write the first records
    while (not out.exists() or out.stat().st_size < 2000) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(how)
    proc.wait(timeout=600)
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGKILL: -9, signal.SIGINT: 130}[how]
    partial = out.read_text()
    if how != signal.SIGKILL:
        err = proc.stderr.read().decode()
        assert "Traceback" not in err
        count = len(partial.splitlines())
        assert f"interrupted: {out} holds {count} complete records; to finish it: biogpt generate" in err
        assert err.rstrip().endswith("--resume")
    assert partial.endswith("\n") and all(json.loads(x) for x in partial.splitlines())
    assert 0 < len(partial.splitlines()) < n, "the run must be interrupted mid-way"
    resumed = biogpt(*args, "--resume")
    assert resumed.wait(timeout=1800) == 0
    assert f"{len(partial.splitlines())} inputs already done" in resumed.stderr.read().decode()
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, n + 1))
    assert records[:len(partial.splitlines())] == [json.loads(x) for x in partial.splitlines()]


def test_examples_run(tiny, tmp_path):
    path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"  # the venv's biogpt first
    env = {**os.environ, "BIOGPT_MODEL": str(tiny[0]), "PATH": path}
    titles = tmp_path / "titles.txt"
    titles.write_text("the cat and\nof the dog\nin the end\nand then\n")
    run = subprocess.run(["bash", str(ROOT / "examples" / "pipeline.sh"), str(titles)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "continued 3 titles" in run.stdout and "tokens:" in run.stdout
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "api.py"), str(tiny[0])], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("COVID-19 is") and "beam:" in run.stdout and "yes" in run.stdout
    assert "nearest to the first title: " in run.stdout
    assert run.stdout.splitlines()[-1].startswith("['COVID-19 is")  # the transformers-style batch


def test_tokenizer_only_commands_do_not_import_torch(tiny, tmp_path):
    code = ("import sys; from biogpt_cli.cli import main; assert main(['tokenize', '-m', sys.argv[1], '-o', "
            "sys.argv[2]]) == 0; assert 'torch' not in sys.modules, 'torch was imported'")
    run = subprocess.run([sys.executable, "-c", code, str(tiny[0]), str(tmp_path / "ids.txt")], input="the cat",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and (tmp_path / "ids.txt").read_text() == "2 193 8 4 43\n", run.stderr


# -- first contact: options that never silently do nothing, manifests, formats, -v, help ------
@pytest.mark.parametrize("args, named", [
    (["--temperature", "0.5"], "--temperature"), (["--top-p", "0.9"], "--top-p"), (["--top-k", "5"], "--top-k"),
    (["--min-p", "0.1"], "--min-p"), (["--seed", "3"], "--seed"), (["--length-penalty", "2"], "--length-penalty"),
    (["--early-stopping"], "--early-stopping"), (["--sample", "--seed", str(2**70)], "--seed"),
    (["--resume", "--force", "-o", "x.jsonl"], "--resume"),
])
def test_options_that_would_do_nothing_are_usage_errors(cli, args, named):
    code, out, err = cli("generate", "x", "-m", "/no/such/model", *args)
    assert code == 2 and out == "" and named in one_error_line(err)


def test_the_verb_agrees_with_the_options_named(cli):
    _, _, err = cli("generate", "x", "-m", "/no/such/model", "--top-p", "0.9")
    assert "--top-p only applies when sampling" in one_error_line(err)
    _, _, err = cli("generate", "x", "-m", "/no/such/model", "--top-p", "0.9", "--seed", "1")
    assert "--top-p, --seed only apply when sampling" in one_error_line(err)


def test_score_file_with_choices_is_a_usage_error(cli, tmp_path):
    (tmp_path / "f.txt").write_text("a\n")
    code, _, err = cli("score", tmp_path / "f.txt", "-m", "/no/such", "--prompt", "p", "--choices", "a,b")
    assert code == 2 and "--choices" in one_error_line(err)


def test_output_format_follows_the_file_name(cli, tiny, tmp_path):
    code, _, _ = cli("generate", "the cat", "-m", tiny[0], "-n", "3", "-o", tmp_path / "x.jsonl")
    assert code == 0 and json.loads((tmp_path / "x.jsonl").read_text())["prompt"] == "the cat"
    code, _, _ = cli("generate", "the cat", "-m", tiny[0], "-n", "3", "-o", tmp_path / "x.txt")
    assert code == 0 and (tmp_path / "x.txt").read_text().startswith("the cat")
    code, _, _ = cli("generate", "the cat", "-m", tiny[0], "-n", "3", "-o", tmp_path / "y.jsonl", "--format", "text")
    assert code == 0 and (tmp_path / "y.jsonl").read_text().startswith("the cat")


def test_resume_refuses_another_run_and_names_what_differs(cli, tiny, tmp_path):
    prompts, other = tmp_path / "p.txt", tmp_path / "q.txt"
    prompts.write_text("the cat\nof the\n")
    other.write_text("in\nthe end\n")
    out = tmp_path / "out.jsonl"
    assert cli("generate", "-m", tiny[0], "-n", "5", "-i", prompts, "-o", out)[0] == 0
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["records"] == 2
    assert manifest["run"]["options"]["max_new_tokens"] == 5 and len(manifest["run"]["input_sha256"]) == 64
    code, _, err = cli("generate", "-m", tiny[0], "-n", "20", "-i", prompts, "-o", out, "--resume")
    assert code == 1 and "different run (options.max_new_tokens 5 -> 20)" in one_error_line(err)
    code, _, err = cli("generate", "-m", tiny[0], "-n", "5", "-i", other, "-o", out, "--resume")
    assert code == 1 and "input" in one_error_line(err)
    (tmp_path / "out.jsonl.manifest.json").unlink()
    code, _, err = cli("generate", "-m", tiny[0], "-n", "5", "-i", prompts, "-o", out, "--resume")
    assert code == 1 and "no readable run manifest" in one_error_line(err)
    assert len(out.read_text().splitlines()) == 2  # refused runs leave the file as it was


def test_verbose_figures_are_real_for_beam_search(cli, tiny, monkeypatch):
    import biogpt_cli.streaming as streaming

    slow = streaming.beam_search

    def beam_search(*args, **kwargs):
        time.sleep(0.3)
        return slow(*args, **kwargs)

    monkeypatch.setattr(streaming, "beam_search", beam_search)
    code, _, err = cli("generate", "the cat", "-m", tiny[0], "-n", "6", "--num-beams", "3", "-v")
    assert code == 0 and re.search(r"^loaded .* in \d+\.\d\d s$", err, re.M), err
    m = re.search(r"(\d+) new tokens in ([\d.]+) s; first token after [\d.]+ s, ([\d.]+) new tokens/s", err)
    new, seconds, rate = int(m[1]), float(m[2]), float(m[3])
    assert seconds >= 0.3 and 0 < rate <= new / 0.3 + 1e-6


def test_verbose_first_token_is_the_first_token_even_when_nobody_watches(cli, tiny, monkeypatch):
    """Output to a pipe is decoded once at the end: the first token's time is still when it was chosen."""
    from biogpt_cli import generation

    step = generation.Frame.step
    monkeypatch.setattr(generation.Frame, "step", lambda self, *a: time.sleep(0.02) or step(self, *a))
    code, _, err = cli("generate", "the cat", "-m", tiny[0], "-n", "30", "--min-new-tokens", "30", "-v")
    m = re.search(r"in ([\d.]+) s; first token after ([\d.]+) s", err)
    assert code == 0 and m and float(m[2]) < float(m[1]) / 3, err


def test_verbose_counts_read_well(cli, tiny, tmp_path):
    (tmp_path / "in.txt").write_text("the cat\n\n")
    code, _, err = cli("generate", "-m", tiny[0], "-n", "2", "-i", tmp_path / "in.txt", "-o", tmp_path / "o.jsonl",
                       "-v")
    assert code == 0 and "1 prompt, " in err and "\n1 record written to " in err and "skipped 1 blank line\n" in err


def test_help_reads_well_at_80_columns_and_version(tmp_path):
    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    for name in ("generate", "qa", "extract", "classify", "score", "evaluate", "tokenize"):
        text = subprocess.run([sys.executable, "-m", "biogpt_cli", name, "--help"], capture_output=True,
                              text=True, env=env).stdout
        assert "…" not in text and max(map(len, text.splitlines())) <= 80, text
        assert "--help" in text
    import typer

    from biogpt_cli.cli import app

    for name, cmd in typer.main.get_command(app).commands.items():
        undocumented = [p.name for p in cmd.params if not getattr(p, "help", None)]
        assert not undocumented, f"{name}: options without help: {undocumented}"
    version = subprocess.run([sys.executable, "-m", "biogpt_cli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("biogpt-cli ")


def test_failed_convert_removes_what_it_created(cli, tiny, tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    code, _, err = cli("convert", tiny[0], tmp_path / "dst")
    assert code == 1 and f"{tmp_path / 'dst'}: disk full" in one_error_line(err) and not (tmp_path / "dst").exists()


def run_in_pty(args: list[str], timeout: float = 60, env: dict | None = None,
               stdout: str | None = None) -> tuple[int, str]:
    """Run `python -m biogpt_cli ARGS` with a terminal for stdin, stdout (unless sent to the file
    `stdout`) and stderr; (exit code, screen)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdio are the terminal
        if stdout is not None:
            os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.execve(sys.executable, [sys.executable, "-m", "biogpt_cli", *args], {**os.environ, **(env or {})})
    screen, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), screen.decode(errors="replace")


def test_beam_search_on_a_terminal_shows_its_steps(tiny):
    code, screen = run_in_pty(["generate", "the cat", "-m", str(tiny[0]), "-n", "12", "--num-beams", "3"])
    assert code == 0 and "beam search: step" in screen
    # the spinner's line is erased when it stops: the prompt comes after that, or it is erased with it
    assert "\x1b[1mthe cat\x1b[0m" in screen.rsplit("\x1b[2K", 1)[1], screen


def test_only_the_prompt_is_bold_in_every_sequence_on_a_terminal(tiny):
    """Sequences after the first wait their turn; the text they made meanwhile is no part of the
    bold prompt (it was: rich's Text(style=...) styled what was appended to it too)."""
    code, screen = run_in_pty(["generate", "the cat", "-m", str(tiny[0]), "-n", "6", "--sample", "--seed", "2",
                               "--num-return-sequences", "3"])
    assert code == 0 and re.findall(r"\x1b\[1m(.*?)\x1b\[0m", screen) == ["the cat"] * 3, screen


def test_score_prints_a_header_on_a_terminal_only(cli, tiny, tmp_path):
    (tmp_path / "f.txt").write_text("the cat\n")
    code, screen = run_in_pty(["score", str(tmp_path / "f.txt"), "-m", str(tiny[0])])
    assert code == 0 and re.search(r"tokens\s+nll\s+ppl", screen)
    code, out, err = cli("score", tmp_path / "f.txt", "-m", tiny[0])
    assert code == 0 and "nll" not in out + err


def test_seeded_samples_do_not_depend_on_batching_neighbours_or_resume(cli, tiny, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{p}\n" for p in PROMPTS))
    args = ("generate", "-m", tiny[0], "-n", "8", "--sample", "--seed", "11", "-i", prompts, "--format", "jsonl")
    runs = [cli(*args, "--batch-size", b)[1] for b in ("1", "2", "8")]
    assert runs[0] == runs[1] == runs[2]
    first = json.loads(runs[0].splitlines()[2])
    (tmp_path / "alone.txt").write_text("\n\n" + PROMPTS[2] + "\n")  # the same line number, no neighbours
    alone = json.loads(cli(*args[:-4], "-i", tmp_path / "alone.txt", "--format", "jsonl")[1])
    assert alone["ids"] == first["ids"]
    out = tmp_path / "out.jsonl"
    out.write_text("".join(runs[0].splitlines(keepends=True)[:2]))
    cli(*args[:-2], "-o", out, "--force")  # a fresh run writes its manifest, then it is cut back
    out.write_text("".join(runs[0].splitlines(keepends=True)[:2]))
    assert cli(*args[:-2], "-o", out, "--resume")[0] == 0
    assert out.read_text() == runs[0]


def test_beam_search_stop_keeps_the_ids_up_to_the_stop(cli, tiny):
    base = ("generate", "the", "-m", tiny[0], "-n", "10", "--format", "jsonl", "--num-beams", "2",
            "--no-repeat-ngram-size", "1")
    free = json.loads(cli(*base)[1])
    word = free["text"].split()[3]
    stopped = json.loads(cli(*base, "--stop", word)[1])
    assert stopped["finish_reason"] == "stop" and word not in stopped["text"]
    greedy_rule = [n for n in range(1, len(free["ids"]) + 1)
                   if word in continuation(tiny[2], tiny[2].encode("the"), free["ids"][:n])[0]][0]
    assert stopped["ids"] == free["ids"][:greedy_rule]


def test_text_commands_write_utf8_whatever_the_locale(tiny, tmp_path):
    import shutil

    folder = shutil.copytree(tiny[0], tmp_path / "μοντέλο")  # Greek: not in cp1252
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    run = subprocess.run([sys.executable, "-m", "biogpt_cli", "info", "-m", str(folder)], capture_output=True,
                         env=env, timeout=600)
    assert run.returncode == 0 and run.stderr == b"" and "μοντέλο".encode() in run.stdout


def test_unwritable_converted_cache_only_costs_speed(tiny_ref, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    ref, folder = tiny_ref
    for f in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / f).write_bytes((folder / f).read_bytes())
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")

    def refuse(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 30, kind: ReadOnlyFilesystem })")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path / "cache"))
    model, _ = load_pretrained(tmp_path)
    assert model.config.vocab_size == ref.config.vocab_size


def test_a_signal_from_another_thread_never_splits_a_record(tmp_path, monkeypatch):
    """Torch's threads leave SIGINT unblocked: the kernel may hand it to any of them mid-write."""
    import threading

    from biogpt_cli import output

    real_write, sent = os.write, []

    def one_byte_at_a_time(fd, data):
        if not sent:  # a Ctrl-C that another thread receives, while the record is half written
            sent.append(threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT)))
            sent[0].start()
            sent[0].join()
            time.sleep(0.05)
        return real_write(fd, bytes(data[:1]))

    monkeypatch.setattr(output.os, "write", one_byte_at_a_time)
    path = tmp_path / "out.jsonl"
    writer = output.LineWriter(os.open(path, os.O_WRONLY | os.O_CREAT))
    record = json.dumps({"text": "x" * 200}) + "\n"
    with pytest.raises(KeyboardInterrupt):
        writer.write(record)
    writer.close()
    assert path.read_text() == record and writer.records == 1


def test_progress_bar_on_a_terminal_and_never_on_a_pipe(cli, tiny, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\nof the\nin the end\n")
    args = ["generate", "-m", str(tiny[0]), "-n", "4", "-i", str(prompts), "-o", str(tmp_path / "a.jsonl")]
    code, screen = run_in_pty(args)
    assert code == 0 and re.search(r"records .*3/3", screen), screen
    code, screen = run_in_pty([*args[:-1], str(tmp_path / "b.jsonl"), "--quiet"])
    assert code == 0 and "3/3" not in screen
    code, out, err = cli(*args[:-1], tmp_path / "c.jsonl")
    assert code == 0 and out == "" and err == ""
    code, screen = run_in_pty(["tokenize", str(prompts), "-m", str(tiny[0])], stdout=str(tmp_path / "ids.txt"))
    assert code == 0 and re.search(r"lines .*3/3", screen) and len((tmp_path / "ids.txt").read_text().splitlines()) == 3
    for command, out in (("score", "s.txt"), ("embed", "e.jsonl")):  # texts read whole, into a file
        code, screen = run_in_pty([command, "-i", str(prompts), "-m", str(tiny[0]), "-o", str(tmp_path / out)])
        assert code == 0 and re.search(r"lines .*3/3", screen), (command, screen)


def test_score_groups_lines_by_length_and_keeps_their_order(cli, tiny, tmp_path):
    folder, model, tok = tiny
    lines = ["the cat and the dog and the end of the story", "of", "the end", "a b c d e f g h i j k l", "in"]
    (tmp_path / "f.txt").write_text("\n".join(lines) + "\n")
    code, out, _ = cli("score", tmp_path / "f.txt", "-m", folder, "--format", "jsonl", "--batch-size", "2")
    records = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [r["line"] for r in records] == [1, 2, 3, 4, 5]
    from biogpt_cli.scoring import sequence_nll

    for line, r in zip(lines, records, strict=True):
        count, nll = sequence_nll(model, [tok.encode(line)])[0]
        assert r["tokens"] == count and abs(r["nll"] - nll) < 1e-4


def test_option_values_are_named_in_plain_words(cli, tiny):
    """A count that is no number, a -n past the model's positions (exit 2, before loading) and
    `pull` offline say what is wrong in the user's terms."""
    code, _, err = cli("generate", "x", "--batch-size", "abc", "-m", tiny[0])
    assert code == 2 and "'abc' is not a whole number" in one_error_line(err)
    code, _, err = cli("generate", "x", "-n", "1000000000", "-m", tiny[0])
    assert code == 2 and "-n 1000000000: more new tokens than the model's 64 positions" in one_error_line(err)


def test_pull_offline_does_not_suggest_an_option_it_lacks(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli("pull", "someone/some-biogpt")
    line = one_error_line(err)
    assert code == 1 and "--model" not in line and "a local folder needs no pull" in line
