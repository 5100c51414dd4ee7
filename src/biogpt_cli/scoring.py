"""Scoring text with the language model: how likely each token is given the ones before it."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import InputError
from .model import BioGptForCausalLM


@torch.inference_mode()
def token_logprobs(model: BioGptForCausalLM, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """log p(token i | tokens < i) for i >= 1 of each sequence, in one right-padded batch.

    Only real positions go through the output projection (one row's logits at a time), so a batch
    of long lines never holds a [batch, length, vocab] tensor.
    """
    limit = model.config.max_position_embeddings
    too_long = [i for i, s in enumerate(sequences) if len(s) > limit]
    if too_long:
        raise InputError(f"sequence {too_long[0]} has {len(sequences[too_long[0]])} tokens; the model has "
                         f"{limit} positions")
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), model.config.pad_token_id)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    device = model.biogpt.embed_tokens.weight.device
    hidden = model.biogpt(ids.to(device), attention_mask=mask.to(device)).last_hidden_state
    out = []
    for i, s in enumerate(sequences):
        logits = model.output_projection(hidden[i, : len(s) - 1]).float()
        out.append(F.log_softmax(logits, -1).gather(1, ids[i, 1 : len(s), None].to(device))[:, 0].cpu())
    return out


def sequence_nll(model: BioGptForCausalLM, sequences: Sequence[Sequence[int]]) -> list[tuple[int, float]]:
    """(tokens, mean negative log-likelihood) per sequence: the reference's causal-LM loss with
    labels = input ids. A one-token sequence predicts nothing: its NLL is NaN."""
    return [(len(s), -lp.mean().item() if len(lp) else math.nan)
            for s, lp in zip(sequences, token_logprobs(model, sequences), strict=True)]


def choice_probabilities(model: BioGptForCausalLM, prompt: Sequence[int],
                         choices: Sequence[Sequence[int]]) -> list[float]:
    """Probabilities of each continuation of `prompt`, normalised over the choices
    (PubMedQA-style yes/no/maybe): softmax of each choice's summed token log-probabilities."""
    if any(not c for c in choices):
        raise InputError("every choice needs at least one token")
    logprobs = token_logprobs(model, [[*prompt, *c] for c in choices])
    totals = torch.stack([lp[len(prompt) - 1:].sum() for lp in logprobs])
    return totals.softmax(0).tolist()
