"""KVCache: preallocated keys and values for every layer, written in place.

One tensor per kind, shaped [layers, batch, heads, capacity, head_dim]. A forward pass writes its
new positions at `length` and attends over the prefix `[:length]`; nothing is concatenated per
step. Positions at or past `length` are never read, so buffers are allocated uninitialised and
every copy below moves only the written prefix. Capacity grows by doubling only when a caller
decodes past it.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch, num_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # second buffer for reorder()
        self._spare_shared = 0  # positions the spare already holds (the beams' common prompt)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def _rebuild(self, rows: torch.Tensor | None, capacity: int) -> None:
        """New buffers holding the written prefix of `rows` (all rows when None)."""
        n = self.length
        for name in ("k", "v"):
            old = getattr(self, name)
            prefix = old[:, :, :, :n] if rows is None else old[:, :, :, :n].index_select(1, rows)
            new = old.new_empty(old.shape[0], prefix.shape[1], old.shape[2], capacity, old.shape[4])
            new[:, :, :, :n] = prefix
            setattr(self, name, new)
        self._spare = None

    def reserve(self, new_tokens: int, limit: int) -> None:
        """Make room for `new_tokens` more positions (at most `limit` in all)."""
        need = self.length + new_tokens
        if need > self.capacity:
            self._rebuild(None, min(max(need, 2 * self.capacity), max(limit, need)))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's [batch, heads, t, head_dim] keys/values; return the whole prefix."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def shift(self, start: int) -> None:
        """Column `start` becomes column 0: continuous batching drops the columns no live row reads
        any more (attention over them costs every step), or, with `start` < 0, opens that many
        unwritten columns in front for a prompt longer than the window. One layer at a time, so the
        temporary is small; the caller has reserved the room."""
        lo, n = max(start, 0), self.length
        for buf in (self.k, self.v):
            for layer in buf:
                layer[:, :, lo - start:n - start] = layer[:, :, lo:n].clone()
        self.length = n - start
        self._spare = None

    def advance(self, tokens: int) -> None:
        """Called once per forward pass, after every layer has written its `update`."""
        self.length += tokens

    def reorder(self, index: torch.Tensor, start: int = 0) -> None:
        """Beam search: row i becomes old row index[i], copied row by row into a spare buffer that
        then takes the place of the current one (no temporary, one pass over the data).

        Positions before `start` are left alone: the prompt, which every beam of a prompt shares
        (beams are only ever exchanged within their prompt), is the same in both buffers.
        """
        if self._spare is None or start < self._spare_shared:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
            for src, dst in zip((self.k, self.v), self._spare, strict=True):
                dst[:, :, :, :start] = src[:, :, :, :start]
            self._spare_shared = start
        n = self.length
        for src, dst in zip((self.k, self.v), self._spare, strict=True):
            for i, j in enumerate(index.tolist()):
                dst[:, i, :, start:n].copy_(src[:, j, :, start:n])
        (self.k, self.v), self._spare = self._spare, (self.k, self.v)

    def expand(self, repeats: int) -> None:
        """Repeat each row `repeats` times (a prompt's cache shared by its beams or samples)."""
        self._rebuild(torch.arange(self.batch_size, device=self.k.device).repeat_interleave(repeats), self.capacity)
