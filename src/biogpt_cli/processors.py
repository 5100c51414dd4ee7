"""Logits processors: plain functions `(history, scores) -> scores`, each the reference's own.

`history` is `[rows, length]`: every row's tokens so far, with left padding replaced by the
sentinel `vocab_size` (never a real token, in no n-gram); `scores` are `[rows, vocab]`. Each works
on the whole batch on its device, row by row the same as alone; `generation.make_processors`
composes them in the reference's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = float("-inf")


def repetition_penalty(penalty: float) -> Processor:
    """Divide positive / multiply negative scores of every token already in the row (CTRL)."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = torch.zeros(scores.shape[0], scores.shape[1] + 1, dtype=torch.bool, device=scores.device)
        seen = seen.scatter_(1, history, True)[:, :-1]
        return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
    return apply


def logit_bias(bias: dict[int, float]) -> Processor:
    """Add `bias[token]` to its score (OpenAI's `logit_bias`: -100 bans a token, 100 all but forces it)."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(list(bias), device=scores.device)
        values = torch.tensor(list(bias.values()), device=scores.device, dtype=scores.dtype)
        return scores.index_add(1, index, values.expand(scores.shape[0], -1))
    return apply


def frequency_presence(frequency: float, presence: float, starts: int | torch.Tensor) -> Processor:
    """OpenAI's penalties: subtract `frequency` times a token's count among the new tokens so far,
    and `presence` once if it is among them (`starts`: where new tokens begin, per row or for all)."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        columns = torch.arange(history.shape[1], device=history.device)
        new = (columns >= torch.as_tensor(starts, device=history.device).reshape(-1, 1)).to(scores.dtype)
        counts = torch.zeros(scores.shape[0], scores.shape[1] + 1, device=scores.device, dtype=scores.dtype)
        counts = counts.scatter_add_(1, history, new.expand(history.shape[0], -1))[:, :-1]  # less the padding's
        return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)
    return apply


def _banned(scores: torch.Tensor, tokens: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """`scores` with `tokens[r, i]` banned wherever `hit[r, i]`, in one scatter on the device."""
    index = torch.where(hit, tokens, scores.shape[1])  # a miss lands in a spare column
    spare = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], 1)
    return spare.scatter(1, index, NEG_INF)[:, :-1]


def no_repeat_ngram(n: int) -> Processor:
    """Ban every token that would complete an n-gram already present in the row (rows end at the
    last column; the history's padding, the vocabulary size, is in no n-gram)."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if history.shape[1] < n:
            return scores
        grams = history.unfold(1, n, 1)  # [rows, windows, n]
        real = (grams != scores.shape[1]).all(-1)
        hit = real & (grams[:, :, :-1] == history[:, None, history.shape[1] - n + 1:]).all(-1)
        return _banned(scores, grams[:, :, -1], hit)
    return apply


def bad_words(sequences: Sequence[Sequence[int]]) -> Processor:
    """Ban the last token of each sequence whenever the row ends with the rest of it."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        width, rows = history.shape[1], history.shape[0]
        fit = [seq for seq in sequences if len(seq) - 1 <= width]
        if not fit:
            return scores
        hit = torch.stack([(history[:, width - len(seq) + 1:] == torch.tensor(seq[:-1], device=history.device))
                           .all(-1) for seq in fit], 1)
        last = torch.tensor([seq[-1] for seq in fit], device=history.device).expand(rows, -1)
        return _banned(scores, last, hit)
    return apply


def min_new_tokens(count: int, eos: int, prompt_width: int | torch.Tensor) -> Processor:
    """`prompt_width`: where new tokens start, for all rows or per row (a tensor the caller updates)."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        short = torch.as_tensor(history.shape[1] - prompt_width < count, device=scores.device)
        scores = scores.clone()  # no test of `short` on the host: a device sync every step
        scores[:, eos] = scores[:, eos].masked_fill(short, NEG_INF)
        return scores
    return apply


def temperature(t: float) -> Processor:
    return lambda history, scores: scores / t


def top_k(k: int, keep: int = 1) -> Processor:
    """Keep the k likeliest tokens (at least `keep`)."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(scores, min(max(k, keep), scores.shape[-1])).values[..., -1:]
        return scores.masked_fill(scores < kth, NEG_INF)
    return apply


def top_p(p: float, keep: int = 1) -> Processor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least `keep`)."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - p
        remove[..., -keep:] = False
        return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)
    return apply


def min_p(p: float, keep: int = 1) -> Processor:
    """Drop tokens less likely than p times the most likely one (keeping at least `keep`)."""
    def apply(history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(-1)
        remove = probs < p * probs.amax(-1, keepdim=True)
        remove.scatter_(-1, torch.topk(probs, min(keep, probs.shape[-1])).indices, False)
        return scores.masked_fill(remove, NEG_INF)
    return apply


def apply_all(procs: list[Processor], history: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for proc in procs:
        scores = proc(history, scores)
    return scores
