"""biogpt-cli: a compact BioGPT that gives the reference's tokens, faster, from the command line.

The public names load on first use (PEP 562), so that `biogpt tokenize` never pays for importing
torch; `from biogpt_cli import BioGptForCausalLM` works as usual.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("biogpt-cli")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "unknown"

_HOMES = {
    "BioGptConfig": "config",
    "BioGptError": "errors", "CheckpointError": "errors", "ConfigError": "errors", "InputError": "errors",
    "VocabularyError": "errors",
    "GenerationOptions": "generation", "generate": "generation",
    "KVCache": "cache",
    "BioGptForCausalLM": "model", "BioGptForSequenceClassification": "model",
    "BioGptForTokenClassification": "model", "BioGptModel": "model", "BioGptOutput": "model",
    "stream_completions": "streaming",
    "BioGptTokenizer": "tokenizer",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'biogpt_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
