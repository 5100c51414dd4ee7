"""Fixtures: tiny random-weight checkpoints built by the reference, and the real vocabularies.

Nothing here downloads. The real BioGPT vocabularies come from `$BIOGPT_SHARED` or `../shared`
beside the checkout; tests that need them skip when they are absent (a user's fresh clone).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.fixtures import write_tiny_vocab  # noqa: F401 -- re-exported for the test modules

ROOT = Path(__file__).resolve().parents[1]
# Kernel timings and converted weights go to a temporary cache, never the user's (subprocesses inherit it).
os.environ["BIOGPT_CACHE"] = tempfile.mkdtemp(prefix="biogpt-test-cache-")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def shared_dir() -> Path | None:
    path = Path(os.environ.get("BIOGPT_SHARED", ROOT.parent / "shared"))
    return path if (path / "vocab" / "biogpt" / "dict.txt").is_file() else None


def write_hub_vocab_from_fairseq(src: Path, dst: Path) -> None:
    """The documented derivation: ids 0..3 special, dict line i -> id i+4, `w@@` -> `w`, else `w</w>`."""
    encoder = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i, line in enumerate((src / "dict.txt").read_text(encoding="utf-8").splitlines()):
        word = line.rsplit(" ", 1)[0]
        encoder.setdefault(word[:-2] if word.endswith("@@") else word + "</w>", i + 4)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (dst / "merges.txt").write_bytes((src / "bpecodes").read_bytes())


def make_reference(folder: Path, seed: int = 0, tie: bool = True, prompt_tokens: int = 0, **overrides):
    """A random reference BioGptForCausalLM saved in the Hub layout (safetensors, tied key omitted)."""
    import transformers
    from safetensors.torch import save_file

    vocab_size = write_tiny_vocab(folder, prompt_tokens)
    cfg = transformers.BioGptConfig(**{**TINY, "vocab_size": vocab_size, "tie_word_embeddings": tie, **overrides})
    torch.manual_seed(seed)
    ref = transformers.BioGptForCausalLM(cfg).eval()
    with torch.no_grad():  # make layer norms and biases non-trivial so bugs there show
        for name, p in ref.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if tie:
        state.pop("output_projection.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg.to_json_file(folder / "config.json")
    return ref


@pytest.fixture(scope="session")
def tiny_ref(tmp_path_factory):
    """(reference model, folder) for a tiny random checkpoint; shared by many tests, never mutated."""
    folder = tmp_path_factory.mktemp("tiny")
    return make_reference(folder), folder


@pytest.fixture(scope="session")
def real_vocab(tmp_path_factory):
    """(fairseq folder, hub folder) of the real microsoft/biogpt vocabulary."""
    shared = shared_dir()
    if shared is None:
        pytest.skip("real BioGPT vocabulary not found: set BIOGPT_SHARED or put shared/ beside the checkout")
    hub = tmp_path_factory.mktemp("hubvocab")
    write_hub_vocab_from_fairseq(shared / "vocab" / "biogpt", hub)
    return shared / "vocab" / "biogpt", hub


@pytest.fixture(scope="session")
def corpus_lines():
    shared = shared_dir()
    if shared is None:
        pytest.skip("PubMed dev corpus not found: set BIOGPT_SHARED or put shared/ beside the checkout")
    corpus = shared / "corpus" / "pubmed_abstracts_dev.txt"
    if not corpus.is_file():  # the shared data is there but incomplete: an error, not a silent skip
        pytest.fail(f"{corpus} is missing from the shared data at {shared}")
    return corpus.read_text(encoding="utf-8").splitlines()


@pytest.fixture
def cli(capfd, monkeypatch):
    """run(args, stdin) -> (exit code, stdout, stderr), in-process, with fd-level capture."""
    from biogpt_cli.cli import main

    def run(*args: str, stdin: bytes = b""):
        capfd.readouterr()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = main([str(a) for a in args])
        out, err = capfd.readouterr()
        return code, out, err
    return run


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]
