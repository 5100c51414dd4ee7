"""Fixtures: tiny random-weight checkpoints built by the reference, and the real vocabularies.

Nothing here downloads. The real BioGPT vocabularies come from `$BIOGPT_SHARED` or `../shared`
beside the checkout; tests that need them skip when they are absent (a user's fresh clone).
"""

from __future__ import annotations

import io
import os
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.fixtures import ROOT, shared_dir, write_hub_vocab_from_fairseq, write_tiny_vocab  # noqa: F401

# Kernel timings and converted weights go to a temporary cache, never the user's (subprocesses inherit it).
os.environ["BIOGPT_CACHE"] = tempfile.mkdtemp(prefix="biogpt-test-cache-")
# The Ctrl-C tests need SIGINT delivered: a non-interactive shell starts a background job (`.ci/run &`)
# with it ignored, which Python and every child would keep (a handled signal is reset to the default on exec).
signal.signal(signal.SIGINT, signal.default_int_handler)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


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
def eos_ref(tmp_path_factory):
    """A tiny model whose </s> is likely enough that beams finish early (exercises eos paths);
    shared, never mutated."""
    ref = make_reference(tmp_path_factory.mktemp("eos"), seed=5)
    with torch.no_grad():
        ref.biogpt.embed_tokens.weight[2] *= 6
    return ref


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


@pytest.fixture
def slow_generation(monkeypatch):
    """Generation slowed to 0.1 s a token: time for another request to arrive meanwhile."""
    import time

    from biogpt_cli import batch

    real = batch.stream_completions

    def slowed(*args, **kwargs):
        for ev in real(*args, **kwargs):
            time.sleep(0.1)
            yield ev
    monkeypatch.setattr(batch, "stream_completions", slowed)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def request_settings(max_tokens: int, temperature: float = 0.0, n: int = 1, seed: int | None = None,
                     logprobs: int | None = None) -> dict:
    """A completions request's settings for the server's engine (protocol.py), as HTTP makes them."""
    from biogpt_cli.protocol import CompletionRequest, settings

    return settings(CompletionRequest(prompt="-", max_tokens=max_tokens, temperature=temperature, n=n, seed=seed,
                                      logprobs=logprobs))


def serving(app):
    """A real server on a free loopback port, in a thread: (base URL, stop)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)
    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def server(tiny_ref):
    """(base URL, model, tokenizer) of a server on a free loopback port, stopped at the end; the
    model is served as "tiny" and "alias"."""
    from biogpt_cli.loading import load_pretrained
    from biogpt_cli.server import create_app

    lm, tok = load_pretrained(tiny_ref[1])
    base, stop = serving(create_app(lm, tok, ["tiny", "alias"], api_key="sekret"))
    yield base, lm, tok
    stop()


def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="sekret", max_retries=0, timeout=300)
