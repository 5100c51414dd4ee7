"""Scoring text with the language model: how likely each token is given the ones before it."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import InputError, NothingToEmbed
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
    ids, mask = right_padded(model, sequences)
    hidden = model.biogpt(ids, attention_mask=mask).last_hidden_state
    out = []
    for i, s in enumerate(sequences):
        logits = model.output_projection(hidden[i, : len(s) - 1]).float()
        out.append(F.log_softmax(logits, -1).gather(1, ids[i, 1 : len(s), None])[:, 0].cpu())
    return out


def length_groups(sequences: Sequence[Sequence[int]], size: int) -> Iterator[list[int]]:
    """Indices of `sequences` in groups of `size`, shortest first: a right-padded batch of
    similar lengths computes little padding (and gives each row what it gives alone)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for k in range(0, len(order), size):
        yield order[k:k + size]


def right_padded(model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of texts read whole: ids padded on the right and their attention mask, on the
    model's device. Padding is masked, so each row gives what it gives alone."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), model.config.pad_token_id)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    device = getattr(model, "biogpt", model).embed_tokens.weight.device
    return ids.to(device), mask.to(device)


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


def _labels(model: torch.nn.Module) -> list[str]:
    c = model.config
    return list(c.labels) if len(c.labels) == c.num_labels else [f"LABEL_{i}" for i in range(c.num_labels)]


@torch.inference_mode()
def classify_sequences(model: torch.nn.Module, sequences: Sequence[Sequence[int]]) -> list[dict]:
    """A sequence-classification head's label and per-class probabilities, one right-padded batch."""
    ids, mask = right_padded(model, sequences)
    probs = model(ids, attention_mask=mask).logits.float().softmax(-1).cpu()
    labels = _labels(model)
    return [{"label": labels[int(p.argmax())], "scores": dict(zip(labels, p.tolist(), strict=True))} for p in probs]


@torch.inference_mode()
def label_tokens(model: torch.nn.Module, tokenizer: object, text: str) -> list[dict]:
    """A token-classification head's entities: each Moses word takes its first token's label, and
    B-X / I-X runs merge into one span of words [start, end) labelled X (O is outside any)."""
    words = tokenizer.encode_words(text)
    ids = [tokenizer.encoder["</s>"]] + [i for _, word_ids in words for i in word_ids]
    device = model.biogpt.embed_tokens.weight.device
    predicted = model(torch.tensor([ids], device=device)).logits[0].argmax(-1).tolist()
    labels, first, entities = _labels(model), 1, []
    for n, (_, word_ids) in enumerate(words):
        label = labels[predicted[first]]
        first += len(word_ids)
        kind = label[2:] if label[:2] in ("B-", "I-") else None if label == "O" else label
        if kind is None:
            continue
        if entities and entities[-1]["end"] == n and entities[-1]["label"] == kind and not label.startswith("B-"):
            entities[-1]["end"] = n + 1
        else:
            entities.append({"label": kind, "start": n, "end": n + 1})
    for e in entities:
        e["text"] = tokenizer.detokenize([w for w, _ in words[e["start"]:e["end"]]])
    return entities


def embed(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pool: str = "mean", *,
          normalize: bool = False, batch_size: int = 8) -> torch.Tensor:
    """One vector per sequence from the final hidden state (after the last layer norm): the mean
    over the text's tokens (not the leading `</s>`), or the last token's; with `normalize`, scaled
    to length 1 (OpenAI's embeddings are, and clients may take their dot product for the cosine).
    Sequences of similar length share a right-padded batch; padding is masked, so a batch gives the
    vectors each sequence gives alone. Rows come back in the order given."""
    empty = next((i for i, s in enumerate(sequences) if len(s) < 2), None)
    if empty is not None:
        raise NothingToEmbed(empty)
    out = torch.empty(len(sequences), model.config.hidden_size)
    for group in length_groups(sequences, batch_size):
        out[group] = _pooled(model, [sequences[i] for i in group], pool)
    return F.normalize(out, dim=-1) if normalize else out


@torch.inference_mode()
def _pooled(model: torch.nn.Module, sequences: list[Sequence[int]], pool: str) -> torch.Tensor:
    ids, mask = right_padded(model, sequences)
    hidden = getattr(model, "biogpt", model)(ids, attention_mask=mask).last_hidden_state.float()
    if pool == "last":
        return hidden[torch.arange(len(sequences), device=hidden.device), mask.sum(1) - 1].cpu()
    text = mask.clone()
    text[:, 0] = 0  # the leading </s> is no part of the text
    return ((hidden * text[..., None]).sum(1) / text.sum(1, keepdim=True)).cpu()


@torch.inference_mode()
def top_logprobs(model: BioGptForCausalLM, prompt: Sequence[int], new: Sequence[int],
                 k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each new token: its log-probability under the model (the raw logits, before any
    sampling filter) and the `k` likeliest tokens at that step with theirs, from one forward pass
    over prompt + new tokens (the values the reference's logits give for the same weights)."""
    if not new:
        return []
    ids = torch.tensor([[*prompt, *new]], device=model.biogpt.embed_tokens.weight.device)
    hidden = model.biogpt(ids).last_hidden_state[0, len(prompt) - 1:-1]
    logp = F.log_softmax(model.output_projection(hidden).float(), -1).cpu()
    chosen = logp.gather(1, torch.tensor(new)[:, None])[:, 0].tolist()
    best = torch.topk(logp, k) if k else None
    return [(chosen[i], list(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)) if best else [])
            for i in range(len(new))]
