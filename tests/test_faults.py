"""Broken models, an unreachable Hub and hostile input, through the command line: exit code and
one clear line on stderr, never a traceback, and no model loaded from a half-finished download."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import make_reference, one_error_line, write_hub_vocab_from_fairseq
from tests.test_loading import _Evil


def break_model(folder: Path, how: str, shared: Path | None) -> str:
    """Damage a copy of the tiny model folder; return what the error line must mention."""
    weights = folder / "model.safetensors"
    if how == "no weights":
        weights.unlink()
        return "no weights"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:5000])
        return "model.safetensors: not a valid safetensors file"
    if how == "garbage":
        weights.write_bytes(b"\xff" * 4096)
        return "model.safetensors: not a valid safetensors file"
    if how == "pickled code":
        weights.unlink()
        torch.save({"x": _Evil()}, folder / "pytorch_model.bin")
        return "pytorch_model.bin: refused"
    if how == "wrong shapes":
        from safetensors.torch import load_file
        state = load_file(weights)
        state["biogpt.layers.0.fc2.weight"] = torch.zeros(5, 5)
        save_file(state, weights)
        return "wrong shape: biogpt.layers.0.fc2.weight"
    if how == "bad json":
        (folder / "config.json").write_text("{oops")
        return "config.json: invalid JSON"
    if how == "inconsistent config":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
        return "config.json: hidden_size 32 is not divisible by num_attention_heads 5"
    if how == "no vocabulary":
        (folder / "vocab.json").unlink()
        return "no tokenizer files"
    if how == "vocab.json not json":
        (folder / "vocab.json").write_text("[")
        return "vocab.json: invalid JSON"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no weights", "truncated", "garbage", "pickled code", "wrong shapes", "bad json",
                                 "inconsistent config", "no vocabulary", "vocab.json not json"])
def test_broken_model_folder(cli, tiny_ref, tmp_path, how, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_ref[1], folder)
    must_say = break_model(folder, how, None)
    for command in (["generate", "x"], ["score"], ["info"]):
        code, out, err = cli(*command, "-m", folder, stdin=b"x\n")
        if command == ["info"] and how in ("no vocabulary", "vocab.json not json"):
            assert code == 0  # info reports a broken vocabulary instead of failing on it
            continue
        assert code == 1 and out == ""
        assert must_say in one_error_line(err)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_large_weights_with_base_vocabulary(cli, tmp_path):
    """A BioGPT-Large-sized vocabulary (57717) beside weights made for the base one (42384)."""
    shared = Path(os.environ.get("BIOGPT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    if not (shared / "vocab" / "biogpt-large" / "dict.txt").is_file():
        pytest.skip("real BioGPT-Large vocabulary not found: set BIOGPT_SHARED or put shared/ beside the checkout")
    folder = tmp_path / "model"
    make_reference(folder, vocab_size=42384)
    write_hub_vocab_from_fairseq(shared / "vocab" / "biogpt-large", folder)
    code, out, err = cli("generate", "x", "-m", folder)
    assert code == 1 and out == ""
    assert "the vocabulary has 57717 tokens but the model expects 42384" in one_error_line(err)


def run_biogpt(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "biogpt_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def test_unreachable_hub_fails_fast_with_advice(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    # a bound on waiting, not a speed: with huggingface_hub's own retries (about 25 s) on top of a start
    # the run would not end within it
    run = run_biogpt("generate", "x", "-m", "someone/some-biogpt", env=env, timeout=30)
    line = one_error_line(run.stderr)
    assert run.returncode == 1 and run.stdout == ""
    assert "someone/some-biogpt is not in the local Hugging Face cache" in line
    assert "--model PATH" in line and "HF_HUB_OFFLINE=1" in line


def test_partial_download_is_not_a_model(tiny_ref, tmp_path):
    """A Hub cache whose weights never finished downloading (only a `.incomplete` blob)."""
    repo = tmp_path / "hf" / "hub" / "models--someone--partial"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    (repo / "blobs").mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_ref[1] / name, snap / name)
    data = (tiny_ref[1] / "model.safetensors").read_bytes()
    (repo / "blobs" / ("c" * 64 + ".incomplete")).write_bytes(data[: len(data) // 3])
    run = run_biogpt("generate", "x", "-m", "someone/partial",
                     env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and run.stdout == ""
    assert "someone/partial is not in the local Hugging Face cache" in one_error_line(run.stderr)


def test_generate_input_faults(cli, tiny_ref, tmp_path):
    folder = tiny_ref[1]
    code, out, err = cli("generate", "-m", folder, "-n", "3", stdin=b"good line\nbad \xc3\x28 line\n")
    assert code == 1 and "stdin: line 2: invalid UTF-8 (byte 0xc3 at column 5)" in one_error_line(err)
    assert out.startswith("good line")  # the finished line was kept
    code, out, err = cli("generate", "-m", folder, "-n", "3", "--errors", "replace",
                         stdin=b"good line\nbad \xc3\x28 line\nnul\x00byte\n")
    assert code == 0 and out.splitlines()[1].startswith("bad \ufffd( line") and len(out.splitlines()) == 3
    code, out, err = cli("generate", "-m", folder, "-i", "-", "--input-format", "jsonl", stdin=b'{"text": 1}\n')
    assert code == 1 and 'line 1: expected an object with a string "prompt"' in one_error_line(err)
    # --resume matches records on their id: a repeated id would pass for done, so it is refused
    code, out, err = cli("generate", "-m", folder, "-n", "1", "-i", "-", "--input-format", "jsonl",
                         stdin=b'{"id": 7, "prompt": "a"}\n{"id": "7", "prompt": "b"}\n{"id": 7, "prompt": "c"}\n')
    assert code == 1 and "stdin: line 3: id 7 is repeated (first at line 1)" in one_error_line(err)
    assert len(out.splitlines()) == 2  # 7 and "7" are different ids
