"""What `biogpt finetune` trains besides the whole model: the learned prompt rows alone, or
low-rank adapters (LoRA) on every attention and feed-forward projection plus those rows.

Adapters are merged into the weights at export, so a fine-tuned checkpoint is a plain BioGPT
checkpoint whatever the method: inference, `transformers` and the task commands need nothing new.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .model import BioGptDecoderLayer

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")


class LoraLinear(nn.Module):
    """`base(x) + B(A(dropout(x))) * alpha / rank`, the base frozen; B starts at zero, so training
    starts from the base model exactly."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale, self.dropout = alpha / rank, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.lora_a), self.lora_b)
        return self.base(x) + low * self.scale

    def delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The weight change that adapters `a`, `b` make (the trained ones, or a snapshot's)."""
        return (b.float() @ a.float()) * self.scale


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
    """Freeze `model` and wrap each projection of each layer in a `LoraLinear`."""
    model.requires_grad_(False)
    for layer in model.modules():
        if isinstance(layer, BioGptDecoderLayer):
            for path in TARGETS:
                parent, _, name = path.rpartition(".")
                owner = layer.get_submodule(parent) if parent else layer
                setattr(owner, name, LoraLinear(getattr(owner, name), rank, alpha, dropout))


def train_rows_from(embedding: nn.Parameter, first: int) -> None:
    """Train only rows `first`.. of an embedding (the learned prompt): the optimizer steps them as
    a tensor of their own (`TrainedRows`), so the others never move."""
    embedding.requires_grad_(True)
    embedding.trained_from = first  # what an epoch's snapshot keeps of it (finetune.trained_tensors)


class TrainedRows:
    """The trained rows of an embedding (`train_rows_from`) as a parameter of their own, which the
    optimizer steps: its moments are the rows' alone, not the whole vocabulary's."""

    def __init__(self, embedding: nn.Parameter) -> None:
        self.embedding, self.first = embedding, embedding.trained_from
        self.rows = nn.Parameter(embedding.detach()[self.first:].clone())

    def gather(self) -> None:
        """Before a step: the rows' gradient is theirs of the embedding's (the rest is dropped)."""
        grad, self.embedding.grad = self.embedding.grad, None
        self.rows.grad = None if grad is None else grad[self.first:].clone()

    def scatter(self) -> None:
        """After a step: the embedding takes the stepped rows."""
        with torch.no_grad():
            self.embedding[self.first:] = self.rows

    def pull(self) -> None:
        """The rows as the embedding has them (after a restore)."""
        with torch.no_grad():
            self.rows.copy_(self.embedding[self.first:])


def merged_weights(model: nn.Module, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain-model weights that the trained tensors `trained` (named as in `model`) make: an
    adapter pair becomes its merged weight under the base layer's own name."""
    modules = dict(model.named_modules())
    merged = {}
    for name, value in trained.items():
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if isinstance(module, LoraLinear):
            if attr == "lora_a":
                weight = module.base.weight.float() + module.delta(value, trained[f"{owner}.lora_b"])
                merged[f"{owner}.weight"] = weight.to(module.base.weight.dtype)
        else:
            merged[name] = value
    return merged


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under the plain model's names, adapters left out (`.base.` dropped)."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
