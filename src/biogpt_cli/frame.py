"""A batch's frame: left-padded prompts, their token history and the cached forward pass.

Decoding (generation.py) chooses tokens; the frame feeds them, one a row a step or several at
once, and keeps every row's columns, mask and cache in step as prompts join and leave.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError, PromptTooLong
from .graphs import graphs_enabled, release, resized, static_rows
from .model import BioGptForCausalLM


def fit_prompt(ids: list[int], max_new_tokens: int, max_positions: int, truncate: bool = False) -> list[int]:
    """`ids` if they leave room for `max_new_tokens` in the position table; with `truncate`, the
    leading `</s>` and the prompt's last tokens (the ones nearest to what comes next)."""
    room = max_positions - max_new_tokens
    if len(ids) <= room:
        return ids
    if not truncate or room < 2:
        raise PromptTooLong(len(ids), max_new_tokens, max_positions)
    return ids[:1] + ids[len(ids) - room + 1:]


class Frame:
    """Left-padded prompts, their history buffer and the cached forward pass.

    The history's columns are shared by all rows; a row's real tokens run from `first[row]` to
    `length`, and its new ones from `starts[row]`. Under continuous batching a new prompt is
    right-aligned at the current length, and the columns before every live row's first are
    dropped (`_reframe`) so that attention reads only what some row still needs. On a GPU the keys
    and values are not in that frame: each row has its own positions in a static cache (`rows`,
    graphs.py), so only the token history moves.
    """

    def __init__(self, model: BioGptForCausalLM, prompts: Sequence[Sequence[int]], max_new: int, repeats: int,
                 columns: int = 0, room: int = 0):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token")
        cfg = model.config
        self.model, self.width, self.vocab = model, max(map(len, prompts)), cfg.vocab_size
        self.inputs_only = cfg.vocab_size - cfg.learned_prompt  # the first learned prompt token: never generated
        fit_prompt([0] * self.width, max_new, cfg.max_position_embeddings)  # raises when it does not fit
        device = next(model.parameters()).device
        b, total = len(prompts), max(columns, self.width + max_new)  # the cache grows only as decoding needs
        self.history = torch.full((b, total), self.vocab, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.history[i, self.width - len(p):self.width] = torch.tensor(p)
        padded = any(len(p) < self.width for p in prompts)
        self.mask = (self.history != self.vocab).long() if padded else None
        if self.mask is not None:
            self.mask[:, self.width:] = 1
        ids = self.history[:, :self.width].clamp(max=self.vocab - 1)  # pad slots: any id, masked out
        # on a GPU: each row at its own position in a static cache, every step one captured graph;
        # its rows are those in use (rounded up), and grow as prompts join (`add_rows`)
        static = repeats == 1 and graphs_enabled(device)
        self.rows = static_rows(model, b, self.width + max_new) if static else None
        if self.rows is not None:
            self.cache, self.logits = None, self._offered(self.rows.prefill(range(b), prompts))
        else:
            self.cache = model.new_cache(b, self.width + max_new, room)
            with torch.no_grad():
                out = model(ids, self._mask(self.width), past_key_values=self.cache, logits_to_keep=1)
            self.logits = self._offered(out.logits[:, -1].float())
        if repeats > 1:  # beams/samples of one prompt share its prefill
            index = torch.arange(b, device=device).repeat_interleave(repeats)
            self.history, self.logits = self.history[index], self.logits[index]
            self.mask = self.mask[index] if self.mask is not None else None
            self.cache.expand(repeats)
        self.length = self.width
        self.first = [self.width - len(p) for p in prompts for _ in range(repeats)]
        self.starts = torch.full((len(self.first),), self.width, device=device)  # processors read it

    def _mask(self, length: int) -> torch.Tensor | None:
        return self.mask[:, :length] if self.mask is not None else None

    def _offered(self, scores: torch.Tensor) -> torch.Tensor:
        """Next-token scores without the model's learned prompt tokens: they are inputs only."""
        if self.inputs_only < self.vocab:
            scores[:, self.inputs_only:] = float("-inf")
        return scores

    def window(self, alive: Sequence[bool]) -> int:
        """The first column a live row still reads (the current length when none is live)."""
        return min((f for f, live in zip(self.first, alive, strict=True) if live), default=self.length)

    def fits(self, prompts: Sequence[Sequence[int]], keep: int, max_new: int) -> bool:
        """Whether `prompts` can take rows now together, keeping the columns from `keep` on: the
        window the longest needs, plus `max_new` tokens, within the model's positions. The rows all
        move on in one frame, so `max_new` counts the tokens every live row still has to go too: a
        long prompt that widened the frame would otherwise push them past the last position."""
        longest = max(map(len, prompts))  # a static cache widens for it (`admit`): each row starts at 0
        return max(self.length - keep, longest) + max_new <= self.model.config.max_position_embeddings

    def close(self) -> None:
        """The batch is over: its static decoder goes back to the model's idle ones."""
        if self.rows is not None:
            release(self.model, self.rows)
            self.rows = None

    def add_rows(self, n: int) -> range:
        """`n` new rows, empty and masked, for prompts that arrive while the batch runs (a static
        decoder grows to the next bucket of rows when they are not there yet)."""
        if self.cache is not None:
            self.cache.add_rows(n)
        elif len(self.first) + n > self.rows.rows:
            self.rows = resized(self.model, self.rows, len(self.first) + n, self.rows.cache.capacity)
        self.history = torch.cat([self.history, self.history.new_full((n, self.history.shape[1]), self.vocab)])
        self.mask = torch.cat([torch.ones_like(self.history[:-n]) if self.mask is None else self.mask,
                               torch.zeros_like(self.history[-n:])])
        self.first += [self.length] * n
        self.starts = torch.cat([self.starts, self.starts[:1].expand(n)])
        return range(len(self.first) - n, len(self.first))

    def admit(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], keep: int, max_new: int,
              to_go: int = 0) -> torch.Tensor:
        """Continuous batching: new prompts take the places of finished (or new) `rows`, each
        right-aligned at the current length (its padding masked, so its positions start at 0 as
        when alone). They are prefilled together, apart from the running rows, as a batch of them
        alone would be. Returns their next-token logits.

        The window is moved first when the longest prompt is longer than it, when the columns
        before `keep` (which no live row reads) are at least half of it, or when the new tokens
        would not fit, for them or for the tokens the live rows still have `to_go`."""
        n = max(map(len, prompts))
        start = min(keep, self.length - n)
        too_long = self.length + max(max_new, to_go) > self.model.config.max_position_embeddings
        if start < 0 or (start > 0 and (2 * start >= self.length or too_long)):
            self._reframe(start)
        end = self.length
        if self.rows is not None and n + max_new > self.rows.cache.capacity:  # its rows start at 0
            self.rows = resized(self.model, self.rows, self.rows.rows, n + max_new)
        logits = self.rows.prefill(rows, prompts) if self.rows is not None else self._prefill(rows, prompts, end)
        logits = self._offered(logits)
        if self.mask is None:
            self.mask = torch.ones_like(self.history)
        for row, p in zip(rows, prompts, strict=True):
            m = len(p)
            self.history[row] = self.vocab
            self.history[row, end - m:end] = torch.tensor(p, device=self.history.device)
            self.mask[row] = 0
            self.mask[row, end - m:] = 1
            self.first[row], self.starts[row] = end - m, end
        return logits

    def _prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], end: int) -> torch.Tensor:
        """The prompts' forward pass together (left-padded, masked), their keys and values copied
        into `rows` so that each ends at column `end`; their next-token logits."""
        n, device = max(map(len, prompts)), self.history.device
        ids = torch.tensor([[p[0]] * (n - len(p)) + list(p) for p in prompts], device=device)  # padding: masked
        mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts], device=device)
        own = self.model.new_cache(len(prompts), n)
        with torch.no_grad():
            logits = self.model(ids, mask if len(set(map(len, prompts))) > 1 else None, past_key_values=own,
                                logits_to_keep=1).logits[:, -1].float()
        for i, (row, p) in enumerate(zip(rows, prompts, strict=True)):
            m = len(p)
            self.cache.k[:, row, :, end - m:end] = own.k[:, i, :, n - m:]
            self.cache.v[:, row, :, end - m:end] = own.v[:, i, :, n - m:]
        return logits

    def _reframe(self, start: int) -> None:
        """Column `start` becomes column 0 (negative: that many padding columns open in front), in
        the cache, the history, the mask and every row's bookkeeping."""
        lo, n = max(start, 0), self.length - start
        if self.cache is not None:  # a static cache has no shared columns: its rows start at 0
            self.cache.reserve(max(-start, 0), self.model.config.max_position_embeddings)
            self.cache.shift(start)
        if self.mask is None:
            self.mask = torch.ones_like(self.history)
        for buf, front, back in ((self.history, self.vocab, self.vocab), (self.mask, 0, 1)):
            buf[:, lo - start:n] = buf[:, lo:self.length].clone()
            buf[:, :lo - start] = front
            buf[:, n:] = back
        self.length = n
        self.first = [f - start for f in self.first]
        self.starts -= start

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` [rows, K] in one forward pass (eager rows only); the scores after each
        of them [rows, K, vocab] in float32."""
        k = tokens.shape[1]
        self.history[:, self.length:self.length + k] = tokens
        self.length += k
        with torch.no_grad():
            out = self.model(tokens, self._mask(self.length), past_key_values=self.cache, logits_to_keep=k)
        scores = out.logits.float()
        if self.inputs_only < self.vocab:
            scores[:, :, self.inputs_only:] = float("-inf")
        return scores

    def truncate(self, length: int) -> None:
        """Forget the columns from `length` on (a guess's tokens the row did not take)."""
        self.length = self.cache.length = length

    def step(self, tokens: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token per row (`live`: the rows still decoding; None: all); return
        next-token scores [rows, vocab] in float32."""
        self.history[:, self.length] = tokens
        self.length += 1
        if self.rows is not None:
            return self._offered(self.rows.step(tokens, torch.ones_like(tokens) if live is None else live.long()))
        with torch.no_grad():
            out = self.model(tokens[:, None], self._mask(self.length), past_key_values=self.cache, logits_to_keep=1)
        return self._offered(out.logits[:, -1].float())
