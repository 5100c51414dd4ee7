"""Smoke test in a venv with only the runtime dependencies (no test extras, so no transformers,
pytest or whatever they bring), at the newest and at the lowest allowed versions: the README's
set-up command's `generate` against a local model, a .bin load, `convert`, `--quantize int8`
(prepared, then from the cache), `tokenize` and the one-line errors, each with nothing on stderr but the expected lines.

    python tests/smoke_runtime.py        (run by .ci/run in .venv-runtime and .venv-lowest)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biogpt_cli import BioGptConfig, BioGptForCausalLM  # noqa: E402
from tests.fixtures import write_tiny_vocab  # noqa: E402


def biogpt(*args: str, expect_err: str = "", code: int = 0, stdin: str = "") -> str:
    run = subprocess.run([str(Path(sys.executable).parent / "biogpt"), *map(str, args)], capture_output=True,
                         text=True, input=stdin)
    if run.returncode != code or not run.stderr.startswith(expect_err) or run.stderr.count("\n") > 1:
        sys.exit(f"smoke: biogpt {' '.join(map(str, args))}: exit {run.returncode}, stderr:\n{run.stderr}")
    return run.stdout


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BIOGPT_CACHE"] = str(Path(tmp) / "cache")  # the commands' cache: empty, and left behind by none
        folder = Path(tmp) / "tiny"
        config = BioGptConfig(vocab_size=write_tiny_vocab(folder), hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
        torch.manual_seed(0)
        state = BioGptForCausalLM(config).state_dict()
        torch.save(state, folder / "pytorch_model.bin")
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        out = biogpt("generate", "COVID-19 is", "-m", folder, "-n", "5", "--format", "jsonl")
        assert json.loads(out)["finish_reason"] in ("eos", "length"), out
        biogpt("convert", folder, Path(tmp) / "converted", expect_err="wrote ")
        biogpt("generate", "COVID-19 is", "-m", Path(tmp) / "converted", "-n", "5")
        quantized = [biogpt("generate", "COVID-19 is", "-m", folder, "-n", "5", "--quantize", "int8") for _ in range(2)]
        assert quantized[0] == quantized[1], quantized  # the second run maps the cached int8 layers
        assert len(list((Path(tmp) / "cache" / "prepared").glob("*.safetensors"))) == 1
        ids = biogpt("tokenize", "-m", folder, stdin="the cat\n")
        assert ids.split()[0] == "2", ids
        biogpt("generate", "x", "-m", Path(tmp) / "missing", expect_err="error: ", code=1)
        biogpt("generate", "x", "-m", folder, "--top-p", "2", "--sample", expect_err="error: ", code=2)
        biogpt("generate", "x", "-m", folder, "--no-such-option", expect_err="error: ", code=2)
    print("smoke: generate, .bin load, convert, --quantize int8, tokenize and errors ran with a clean stderr")


if __name__ == "__main__":
    main()
