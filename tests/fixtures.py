"""Test helpers that need neither pytest nor transformers, so the runtime-only smoke test can use them."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux's /proc): a Ray run's daemons, for the tests that see them
    end and the bench that weighs them."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found
