"""Test helpers that need neither pytest nor transformers, so the runtime-only smoke test can use them."""

from __future__ import annotations

import json
import string
from pathlib import Path


def write_tiny_vocab(dst: Path, prompt_tokens: int = 0) -> int:
    """A character-level vocabulary with a few merges, so tiny checkpoints need no shared data;
    `prompt_tokens` learned prompt tokens (`learned1</w>`, ...) at the end, as a converted task checkpoint has."""
    chars = string.ascii_letters + string.digits + string.punctuation
    encoder = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>")]
    for piece in [c for ch in chars for c in (ch, ch + "</w>")] + [a + b for a, b in merges]:
        encoder.setdefault(piece, len(encoder))
    for k in range(1, prompt_tokens + 1):
        encoder[f"learned{k}</w>"] = len(encoder)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
    (dst / "merges.txt").write_text("".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return len(encoder)
