"""Manifests that tell what happened, and JSONL that no reader can split: every record written by
the package is one line, and every reader splits only at `\\n`."""

from __future__ import annotations

import json

import pytest

from biogpt_cli import output
from biogpt_cli.errors import InputError
from biogpt_cli.jsonl import dumps, lines
from tests.conftest import one_error_line

BREAKS = ["Aspirin\u2028is", "the\u2029cat", "of\x85the", "and\rthen"]


def status(path):
    return json.loads(output.manifest_path(path).read_text())


@pytest.mark.parametrize("raised, expected", [
    (RuntimeError("CUDA out of memory\nmore detail"), ("failed", "RuntimeError: CUDA out of memory")),
    (InputError("line 3: not JSON"), ("failed", "line 3: not JSON")),
    (KeyboardInterrupt(), ("interrupted", None)),
])
def test_a_manifest_names_how_the_run_ended(tmp_path, raised, expected):
    out = tmp_path / "o.jsonl"
    with pytest.raises(type(raised)), output.manifested(out, {"x": 1}, lambda: 2, fresh=True):
        raise raised
    recorded = status(out)
    assert (recorded["status"], recorded.get("error"), recorded["records"]) == (*expected, 2)


def test_a_later_complete_run_drops_the_old_error(tmp_path):
    out = tmp_path / "o.jsonl"
    with pytest.raises(RuntimeError), output.manifested(out, {}, lambda: 0, fresh=True):
        raise RuntimeError("boom")
    with output.manifested(out, {}, lambda: 1, fresh=False):
        pass
    assert status(out)["status"] == "complete" and "error" not in status(out)


def test_a_manifest_that_cannot_be_written_never_hides_the_error(tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    calls = []

    def write(*args, **kwargs):
        calls.append(kwargs.get("status"))
        if len(calls) > 1:
            raise InputError("cannot write the run manifest (disk full)")
    monkeypatch.setattr(output, "write_manifest", write)
    with pytest.raises(ValueError, match="the real problem"), output.manifested(out, {}, lambda: 0, fresh=True):
        raise ValueError("the real problem")
    calls.clear()
    with pytest.raises(InputError, match="disk full"), output.manifested(out, {}, lambda: 0, fresh=True):
        pass  # a complete run whose manifest fails says so


def test_jsonl_lines_survive_every_line_break_character():
    text = "".join(dumps({"id": i, "text": t}) for i, t in enumerate(BREAKS))
    assert text.count("\n") == len(BREAKS) and len(text.splitlines()) == len(BREAKS)  # no reader splits it
    assert [json.loads(line)["text"] for _, line in lines(text)] == BREAKS
    assert list(lines("a\r\nb\u2028c\n")) == [(1, "a"), (2, "b\u2028c")]


def test_every_path_keeps_records_whole(cli, tiny_ref, tmp_path):
    """generate (and its resume), tokenize, score and embed records; evaluate reading them."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": t, "text": t}, ensure_ascii=False) + "\n"
                           for i, t in enumerate(BREAKS)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code, _, err = cli("generate", "-m", tiny_ref[1], "-i", src, "-o", out, "-n", "2")
    assert code == 0, err
    got = [json.loads(line) for _, line in lines(out.read_text(encoding="utf-8"))]
    assert [r["prompt"] for r in got] == BREAKS and len(out.read_text(encoding="utf-8").splitlines()) == 4
    out.write_text("".join(out.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    code, _, err = cli("generate", "-m", tiny_ref[1], "-i", src, "-o", out, "-n", "2", "--resume")
    assert code == 0 and "2 inputs already done" in err
    assert [json.loads(line)["prompt"] for _, line in lines(out.read_text(encoding="utf-8"))] == BREAKS
    for command in (["score", src, "--format", "jsonl"], ["embed", "-i", src, "-o", tmp_path / "e.jsonl"]):
        code, text, err = cli(*command[:1], "-m", tiny_ref[1], *command[1:])
        text = text or (tmp_path / "e.jsonl").read_text(encoding="utf-8")
        assert code == 0 and len(text.splitlines()) == 4 and [json.loads(x)["id"] for x in text.splitlines()] == [
            f"r{i}" for i in range(4)], (command, err)
    plain = tmp_path / "plain.txt"
    plain.write_text("".join(t + "\n" for t in BREAKS), encoding="utf-8")
    code, text, _ = cli("tokenize", plain, "--format", "jsonl", "-m", tiny_ref[1])
    assert code == 0 and len(text.splitlines()) == 4
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(dumps({"id": str(i), "answer": "yes", "note": t}) for i, t in enumerate(BREAKS)),
                       encoding="utf-8")
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps({str(i): "yes" for i in range(4)}))
    code, text, _ = cli("evaluate", "--task", "pubmedqa", answers, gold, "--format", "jsonl")
    assert code == 0 and json.loads(text)["correct"] == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 256 kB file system of its own (a tmpfs: needs root, as CI runs), unmounted at the end."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here (not root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_leaves_whole_records_a_failed_manifest_and_a_resumable_file(cli, tiny_ref, tmp_path,
                                                                                  small_disk):
    import json as json_

    prompts = tmp_path / "in.txt"
    prompts.write_text("".join(f"the cat {i}\n" for i in range(400)))
    filler = small_disk / "filler"
    filler.write_bytes(b"x" * (256 * 1024 - 24 * 1024))  # about 24 kB left for the output and its manifest
    out = small_disk / "out.jsonl"
    code, _, err = cli("generate", "-i", prompts, "-o", out, "-n", "4", "-m", tiny_ref[1], "-q")
    message = one_error_line(err)
    assert code == 1 and message.startswith(f"error: {out}: disk full after ") and "free space" in message, err
    written = out.read_text().splitlines()
    assert 0 < len(written) < 400 and all(json_.loads(line) for line in written)  # whole records only
    manifest = json_.loads((small_disk / "out.jsonl.manifest.json").read_text())
    assert manifest["status"] == "failed" and "disk full" in manifest["error"]
    assert not [p.name for p in small_disk.iterdir() if p.name.endswith(".tmp") or ".biogpt-probe" in p.name]
    filler.unlink()  # space freed: the same command finishes the file
    code, _, err = cli("generate", "-i", prompts, "-o", out, "-n", "4", "-m", tiny_ref[1], "-q", "--resume")
    assert code == 0 and len(out.read_text().splitlines()) == 400, err


def test_a_full_disk_under_a_checkpoint_or_a_matrix_is_one_line_naming_it(cli, tiny_ref, tmp_path, small_disk):
    """convert and embed's safetensors matrix (finetune exports the same way) on a full disk: one
    line naming the output, nothing of theirs left behind."""
    (small_disk / "filler").write_bytes(b"x" * (256 * 1024 - 16 * 1024))
    code, _, err = cli("convert", tiny_ref[1], small_disk / "converted")
    assert code == 1 and one_error_line(err).startswith(f"error: {small_disk / 'converted'}: disk full"), err
    assert not (small_disk / "converted").exists()
    (tmp_path / "in.txt").write_text("the cat\n" * 200)
    code, _, err = cli("embed", "-i", tmp_path / "in.txt", "-o", small_disk / "e.safetensors", "-m", tiny_ref[1])
    assert code == 1 and one_error_line(err).startswith(f"error: {small_disk / 'e.safetensors'}: disk full"), err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("args, name, records", [
    (["embed", "-i", "{src}"], "out.safetensors", 2),
    (["embed", "-i", "{src}", "--format", "jsonl"], "out.jsonl", 2),
    (["score", "{src}", "--format", "jsonl"], "out.jsonl", 2),
])
def test_embed_and_score_outputs_have_their_manifest(cli, tiny_ref, tmp_path, args, name, records):
    """Every output of a model is named with the run that wrote it: model by content, input sha256,
    settings, how it ended and how many records."""
    import hashlib

    src = tmp_path / "in.txt"
    src.write_text("aspirin and ulcer\n\nthe cat\n", encoding="utf-8")
    out = tmp_path / name
    code, _, err = cli(*[a.format(src=src) for a in args], "-m", tiny_ref[1], "-o", out)
    assert code == 0, err
    manifest = status(out)
    assert (manifest["status"], manifest["records"]) == ("complete", records)
    assert manifest["run"]["command"] == args[0] and manifest["run"]["model_files"]
    assert manifest["run"]["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
