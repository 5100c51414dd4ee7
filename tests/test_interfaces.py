"""Where users meet it: the interactive mode, token confidence (--logprobs, --show-confidence,
score --show) and embeddings."""

from __future__ import annotations

import json
import os
import re
import select
import sys
import time

import pytest
import torch
import transformers

from biogpt_cli import GenerationOptions, generate
from biogpt_cli.loading import load_pretrained
from biogpt_cli.streaming import continuation
from tests.conftest import make_reference, one_error_line
from tests.test_cli import run_in_pty


@pytest.fixture(scope="module")
def tiny(tiny_ref):
    model, tok = load_pretrained(tiny_ref[1])
    return tiny_ref[1], model, tok


def greedy(model, tok, prompt, n):
    ids = tok.encode(prompt)
    return continuation(tok, ids, generate(model, [ids], GenerationOptions(max_new_tokens=n))[0][0].ids)[0]


@pytest.fixture(scope="module")
def slower(tmp_path_factory):
    """A model big enough that 800 new tokens take a few seconds: time to press Ctrl-C."""
    folder = tmp_path_factory.mktemp("slower")
    make_reference(folder, seed=4, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   intermediate_size=2048, max_position_embeddings=1024)
    model, tok = load_pretrained(folder)
    return folder, model, tok


def test_interactive_settings_are_checked_in_their_own_words():
    """/set refuses what the engine would, and its replies name settings, not the CLI's flags."""
    from biogpt_cli.cli.interactive import command

    settings = {"max_new_tokens": 5, "sample": True}
    for line in ("/set n 0", "/set t 0", "/set sample off"):
        reply = command(line, {**settings, "num_return_sequences": 2} if "sample" in line else settings)
        assert reply.startswith("not changed: ") and "--" not in reply, reply
    assert command("/set p 0.5", settings) == "top_p = 0.5" and settings["top_p"] == 0.5
    shown = command("/show", settings)  # the values decoding uses, not None for a default
    assert "top_p=0.5" in shown and "temperature=1.0" in shown and "top_k=50" in shown and "sample=True" in shown
    assert command("/exit", settings) is None


def test_interactive_session(slower, tmp_path):
    """Two prompts, a /set, a Ctrl-C in the middle of a generation, a prompt too long, then Ctrl-D;
    the lines typed are kept for the next session."""
    import pty

    folder, model, tok = slower
    history = tmp_path / "state" / "history"
    pid, fd = pty.fork()
    if pid == 0:
        # one token a pass: the random model repeats itself, and its drafts would end 800 tokens before the Ctrl-C
        os.execve(sys.executable, [sys.executable, "-m", "biogpt_cli", "generate", "-m", str(folder), "-n", "5",
                                   "--speculate", "off"], {**os.environ, "BIOGPT_HISTORY": str(history)})
    screen, seen = b"", 0

    def until(text: bytes, timeout: float = 60) -> None:
        """Wait for `text` after what earlier waits matched."""
        nonlocal screen, seen
        deadline = time.time() + timeout
        while text not in screen[seen:] and time.time() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                screen += os.read(fd, 4096)
        assert text in screen[seen:], screen.decode(errors="replace")
        seen = screen.index(text, seen) + len(text)

    until(b"> ")
    os.write(fd, b"the cat\n")
    until(greedy(model, tok, "the cat", 5).encode())
    until(b"> ")
    os.write(fd, b"/set n 3\n")
    until(b"max_new_tokens = 3")
    os.write(fd, b"of the\n")
    until(greedy(model, tok, "of the", 3).encode())
    os.write(fd, b"/set n 800\n")
    until(b"max_new_tokens = 800")
    os.write(fd, b"the end\n")
    time.sleep(1.0)
    os.write(fd, b"\x03")  # Ctrl-C while it generates
    until(b"[stopped]")
    until(b"> ")
    os.write(fd, b"/set n 1023\n")
    until(b"max_new_tokens = 1023")
    os.write(fd, b"the end\n")  # 3 tokens + 1023 > 1024 positions: the hint is the session's own setting
    until(b"exceeds the model's 1024 positions (shorten it or /set n lower)")
    until(b"> ")
    os.write(fd, b"\x04")  # Ctrl-D leaves
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert history.read_text().splitlines() == ["the cat", "/set n 3", "of the", "/set n 800", "the end",
                                                "/set n 1023", "the end"]


def test_history_file_follows_the_environment(monkeypatch, tmp_path):
    from biogpt_cli.cli.interactive import history_file

    monkeypatch.delenv("BIOGPT_HISTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert history_file() == tmp_path / "biogpt-cli" / "history"
    monkeypatch.setenv("BIOGPT_HISTORY", "")  # kept nowhere
    assert history_file() is None


def test_logprobs_equal_the_reference_log_softmax(cli, tiny, tiny_ref):
    folder, model, tok = tiny
    ref = tiny_ref[0]
    code, out, err = cli("generate", "the cat", "-m", folder, "-n", "6", "--logprobs", "3", "--format", "jsonl")
    assert code == 0, err
    record = json.loads(out)
    ids = tok.encode("the cat") + record["ids"]
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0], -1)
    start = len(tok.encode("the cat")) - 1
    for i, entry in enumerate(record["logprobs"]):
        assert entry["id"] == record["ids"][i]
        assert abs(entry["logprob"] - logp[start + i, entry["id"]].item()) < 1e-4
        best = torch.topk(logp[start + i], 3)
        assert [t["id"] for t in entry["top"]] == best.indices.tolist()
    code, _, err = cli("generate", "the cat", "-m", folder, "--logprobs", "3")
    assert code == 2 and "--logprobs" in err


def test_logprobs_come_from_the_decoding_steps(cli, tiny, tiny_ref, monkeypatch):
    """Sampled rows sharing a batch carry the values of their own steps: no second forward pass is
    made (it would fail the test here)."""
    import biogpt_cli.scoring

    folder, model, tok = tiny
    monkeypatch.setattr(biogpt_cli.scoring, "top_logprobs", lambda *a: pytest.fail("a second forward pass"))
    code, out, err = cli("generate", "-m", folder, "-n", "8", "--logprobs", "2", "--format", "jsonl", "--sample",
                         "--seed", "3", "-i", "-", stdin=b"the cat\nof the\na dog is\n")
    assert code == 0, err
    for line in out.splitlines():
        record = json.loads(line)
        ids = tok.encode(record["prompt"]) + record["ids"]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_ref[0](torch.tensor([ids])).logits[0], -1)
        start = len(tok.encode(record["prompt"])) - 1
        assert len(record["logprobs"]) == len(record["ids"])
        for i, entry in enumerate(record["logprobs"]):
            assert abs(entry["logprob"] - logp[start + i, entry["id"]].item()) < 1e-4
            assert [t["id"] for t in entry["top"]] == torch.topk(logp[start + i], 2).indices.tolist()


def test_show_confidence_colours_the_stream(tiny):
    folder, model, tok = tiny
    code, screen = run_in_pty(["generate", "the cat", "-m", str(folder), "-n", "8", "--show-confidence"])
    assert code == 0 and "confidence: green" in screen
    assert re.search(r"\x1b\[(3[1-3]|38;5;208)m", screen)  # red, green, yellow or orange text
    plain = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen)
    assert greedy(model, tok, "the cat", 8).strip() in plain


@pytest.mark.parametrize("where", [["--format", "jsonl"], ["-o", "out.txt"], ["--engine", "ray", "-i", "in.jsonl"]])
def test_show_confidence_is_refused_where_nothing_shows_it(cli, tiny, tmp_path, where):
    code, _, err = cli("generate", *(["the cat"] if "-i" not in where else []), "-m", tiny[0], "--show-confidence",
                       *[str(tmp_path / w) if w.startswith(("out", "in")) else w for w in where])
    assert code == 2 and "--show-confidence colours text streamed to a terminal" in one_error_line(err)
    assert not (tmp_path / "out.txt").exists()


def test_score_show(cli, tiny, tmp_path):
    folder = tiny[0]
    (tmp_path / "t.txt").write_text("the cat\n")
    code, out, _ = cli("score", tmp_path / "t.txt", "-m", folder, "--show")
    assert code == 0 and re.fullmatch(r"(\S+\(\d+\.\d\) ?)+\n", out), out
    code, screen = run_in_pty(["score", str(tmp_path / "t.txt"), "-m", str(folder), "--show"])
    assert code == 0 and "\x1b[" in screen
    (tmp_path / "long.txt").write_text(" ".join(["the"] * 70) + "\n")  # 71 tokens: the tiny model has 64
    code, _, err = cli("score", tmp_path / "long.txt", "-m", folder, "--show")
    assert code == 1 and "line 1: 71 tokens exceed the model's 64 positions (pass --truncate" in one_error_line(err)
    code, out, err = cli("score", tmp_path / "long.txt", "-m", folder, "--show", "--truncate")
    assert code == 0 and len(out.split()) == 63 and "71 tokens cut to 64 (</s> and the text's last 63)" in err


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_embeddings_equal_the_reference_and_do_not_depend_on_batching(cli, tiny, tiny_ref, tmp_path, pool):
    folder, _, tok = tiny
    ref = transformers.BioGptModel.from_pretrained(folder).eval()
    lines = ["the cat and the dog", "of", "in the end"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    runs = []
    for batch in ("1", "3"):
        code, out, err = cli("embed", "-i", tmp_path / "in.txt", "-m", folder, "--pool", pool, "--batch-size", batch)
        assert code == 0, err
        runs.append([json.loads(x) for x in out.splitlines()])
    assert [r["line"] for r in runs[0]] == [1, 2, 3]
    for line, a, b in zip(lines, *runs, strict=True):
        ids = torch.tensor([tok.encode(line)])
        with torch.no_grad():
            hidden = ref(ids).last_hidden_state[0]
        expected = hidden[1:].mean(0) if pool == "mean" else hidden[-1]
        assert torch.allclose(torch.tensor(a["embedding"]), expected, atol=1e-4)
        assert torch.allclose(torch.tensor(a["embedding"]), torch.tensor(b["embedding"]), atol=1e-5)
    mask = os.umask(0o022)
    try:
        code, _, err = cli("embed", "-i", tmp_path / "in.txt", "-m", folder, "-o", tmp_path / "e.safetensors",
                           "--pool", pool, "--normalize")
    finally:
        os.umask(mask)
    assert code == 0 and (tmp_path / "e.safetensors").stat().st_mode & 0o777 == 0o644, err  # not safetensors' 0600
    from safetensors import safe_open

    with safe_open(tmp_path / "e.safetensors", "pt") as f:
        matrix = f.get_tensor("embeddings")
        assert json.loads(f.metadata()["keys"]) == [{"line": 1}, {"line": 2}, {"line": 3}]
    raw = torch.tensor([r["embedding"] for r in runs[0]])
    assert matrix.shape == (3, 32) and torch.allclose(matrix, raw / raw.norm(dim=1, keepdim=True), atol=1e-5)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_embeddings_stay_close(cli, tmp_path, quantize):
    """--quantize for corpus-scale embedding (its speed: `bench.py --only embed`): the vectors keep
    their direction. int4 needs rows of 128 columns: a 256-wide model."""
    folder = tmp_path / "model"
    make_reference(folder, seed=2, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    (tmp_path / "in.txt").write_text("the cat and the dog\nof the end\n")
    runs = [cli("embed", "-i", tmp_path / "in.txt", "-m", folder, *extra) for extra in ((), ("--quantize", quantize))]
    assert all(code == 0 for code, _, _ in runs), runs
    plain, quantized = ([json.loads(x)["embedding"] for x in out.splitlines()] for _, out, _ in runs)
    cosine = torch.nn.functional.cosine_similarity(torch.tensor(plain), torch.tensor(quantized))
    assert cosine.min() > 0.99 and not torch.equal(torch.tensor(plain), torch.tensor(quantized)), cosine


def test_embed_names_the_bad_line_and_truncates_on_request(cli, tiny, tmp_path):
    folder, _, tok = tiny
    (tmp_path / "in.txt").write_text("of\n" + " ".join(["the"] * 70) + "\n")  # 71 tokens: the tiny model has 64
    code, _, err = cli("embed", "-i", tmp_path / "in.txt", "-m", folder)
    assert code == 1 and "line 2: 71 tokens exceed the model's 64 positions (pass --truncate to embed its last 63)" \
        in one_error_line(err)
    code, out, err = cli("embed", "-i", tmp_path / "in.txt", "-m", folder, "--truncate")
    assert code == 0 and "line 2: 71 tokens cut to 64 (</s> and the text's last 63)" in err
    (tmp_path / "cut.txt").write_text(" ".join(["the"] * 63) + "\n")  # what --truncate kept: the last 63
    _, alone, _ = cli("embed", "-i", tmp_path / "cut.txt", "-m", folder)
    assert json.loads(out.splitlines()[1])["embedding"] == json.loads(alone)["embedding"]
    (tmp_path / "nul.txt").write_text("of\n\x00\n")  # Moses keeps no token of it
    code, _, err = cli("embed", "-i", tmp_path / "nul.txt", "-m", folder)
    assert code == 1 and "line 2: nothing to embed" in one_error_line(err)
    (tmp_path / "in.jsonl").write_text('{"text": "of", "id": 1}\n{"prompt": "of", "id": 2}\n{"title": "of"}\n')
    code, out, err = cli("embed", "-i", tmp_path / "in.jsonl", "-m", folder)  # score's field or generate's
    assert code == 1 and 'line 3: expected an object with a string "text" or "prompt"' in one_error_line(err)
    first, second = map(json.loads, out.splitlines())
    assert (first["id"], second["id"]) == (1, 2) and first["embedding"] == second["embedding"]
    code, _, err = cli("embed", "of", "-m", folder, "--format", "safetensors")
    assert code == 2 and "give -o FILE.safetensors" in one_error_line(err)
    code, out, _ = cli("embed", "of", "-m", folder, "--format", "text")
    assert code == 0 and [float(x) for x in out.split()] == pytest.approx(first["embedding"], abs=1e-5)


def test_shell_completion_script():
    import subprocess

    # typer finds the shell from the parent process (with shellingham installed): run it under bash ("; exit"
    # keeps bash from exec-ing python in its place)
    command = f"'{sys.executable}' -m biogpt_cli --show-completion; exit $?"
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "complete" in run.stdout and "biogpt" in run.stdout.lower()
