"""BioGptConfig: the shape of a BioGPT model, read from a Hub `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu")


@dataclass(frozen=True)
class BioGptConfig:
    """Defaults are microsoft/biogpt. `layer_norm_eps` is deliberately absent: the reference
    builds its LayerNorms with torch's default 1e-5 whatever config.json says."""

    vocab_size: int = 42384
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 1024
    scale_embedding: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    tie_word_embeddings: bool = True
    # dropout, active only in training (`biogpt finetune`); the reference's names and defaults
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    activation_dropout: float = 0.0
    num_labels: int = 2
    architecture: str = "BioGptForCausalLM"  # config.json's `architectures[0]`
    labels: tuple[str, ...] = ()  # config.json's `id2label`, in id order
    # A fine-tuned task checkpoint of the original release (see tasks.py): which task, how many
    # learned prompt tokens (`learned1..N`, the last N vocabulary ids) and the source limit in tokens.
    task: str | None = None
    learned_prompt: int = 0
    max_source_positions: int | None = None
    relations: tuple[str, ...] = ()  # the relation words of its training data (`extract --constrained`)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "num_labels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (one of {', '.join(ACTIVATIONS)})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ConfigError(f"{name} must be a probability in [0, 1), got {value!r}")
        if not isinstance(self.learned_prompt, int) or not 0 <= self.learned_prompt < self.vocab_size:
            raise ConfigError(f"learned_prompt must be a count of prompt tokens, got {self.learned_prompt!r}")
        if self.max_source_positions is not None and (
                not isinstance(self.max_source_positions, int) or self.max_source_positions < 2):
            raise ConfigError(f"max_source_positions must be an integer >= 2, got {self.max_source_positions!r}")
        if not isinstance(self.relations, tuple) or not all(isinstance(r, str) and r.strip() for r in self.relations):
            raise ConfigError(f"relations must be a list of relation words, got {self.relations!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} {value!r} is outside the vocabulary (size {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BioGptConfig:
        """Build from a Hub config dict; unknown keys (Hub configs carry many) are ignored."""
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        id2label = data.get("id2label")
        if isinstance(id2label, dict) and id2label:
            try:
                kwargs["labels"] = tuple(str(label) for _, label in sorted((int(k), v) for k, v in id2label.items()))
            except (TypeError, ValueError):
                raise ConfigError("id2label must map integer ids to label names") from None
            kwargs.setdefault("num_labels", len(id2label))
        if isinstance(data.get("architectures"), list) and data["architectures"]:
            kwargs["architecture"] = str(data["architectures"][0])
        if isinstance(kwargs.get("relations"), list):
            kwargs["relations"] = tuple(kwargs["relations"])
        if isinstance(kwargs.get("eos_token_id"), list) and kwargs["eos_token_id"]:
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        try:
            return cls(**kwargs)
        except TypeError as e:  # e.g. a null where a number belongs
            raise ConfigError(str(e)) from None

    @classmethod
    def from_json(cls, path: str | Path) -> BioGptConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, revision: str | None = None) -> BioGptConfig:
        from .hub import resolve

        return cls.from_json(resolve(path_or_id, revision, ("config.json",)) / "config.json")

    def to_dict(self) -> dict[str, Any]:
        """A Hub-compatible config dict (the reference reads it back unchanged; it keeps the task
        fields as plain attributes)."""
        data = dataclasses.asdict(self)
        data["architectures"] = [data.pop("architecture")]
        labels = data.pop("labels")
        if not data["relations"]:
            del data["relations"]
        if labels:
            data["id2label"] = dict(enumerate(labels))
            data["label2id"] = {label: i for i, label in enumerate(labels)}
        return {"model_type": "biogpt", **{k: v for k, v in data.items() if v is not None}}
