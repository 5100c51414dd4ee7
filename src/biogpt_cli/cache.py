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
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", room: int = 0) -> None:
        """`room`: rows that may join (`add_rows`). On the CPU the buffers hold them from the start:
        untouched pages of an uninitialised buffer cost no memory, and a join that copied every row
        into fresh pages would stall the batch; elsewhere the buffers double when full."""
        rows = max(batch, room) if torch.device(device).type == "cpu" else batch
        shape = (num_layers, rows, num_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0
        self.rows = batch  # rows in use: the buffers may hold more, for rows that join (`add_rows`)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.rows

    def _rebuild(self, rows: torch.Tensor | None, capacity: int) -> None:
        """New buffers holding the written prefix of `rows` (all rows in use when None, keeping
        the room for more)."""
        n = self.length
        for name in ("k", "v"):
            old = getattr(self, name)
            prefix = old[:, :self.rows, :, :n] if rows is None else old[:, :, :, :n].index_select(1, rows)
            room = old.shape[1] if rows is None else prefix.shape[1]
            new = old.new_empty(old.shape[0], room, old.shape[2], capacity, old.shape[4])
            new[:, :prefix.shape[1], :, :n] = prefix
            setattr(self, name, new)
        self.rows = prefix.shape[1]

    def reserve(self, new_tokens: int, limit: int) -> None:
        """Make room for `new_tokens` more positions (at most `limit` in all)."""
        need = self.length + new_tokens
        if need > self.capacity:
            self._rebuild(None, min(max(need, 2 * self.capacity), max(limit, need)))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's [batch, heads, t, head_dim] keys/values; return the whole prefix."""
        end, n = self.length + k.shape[2], self.rows
        self.k[layer, :n, :, self.length : end] = k
        self.v[layer, :n, :, self.length : end] = v
        return self.k[layer, :n, :, :end], self.v[layer, :n, :, :end]

    def shift(self, start: int) -> None:
        """Column `start` becomes column 0: continuous batching drops the columns no live row reads
        any more (attention over them costs every step), or, with `start` < 0, opens that many
        unwritten columns in front for a prompt longer than the window. One layer at a time, so the
        temporary is small; the caller has reserved the room."""
        lo, n = max(start, 0), self.length
        for buf in (self.k, self.v):
            for layer in buf[:, :self.rows]:
                layer[:, :, lo - start:n - start] = layer[:, :, lo:n].clone()
        self.length = n - start

    def advance(self, tokens: int) -> None:
        """Called once per forward pass, after every layer has written its `update`."""
        self.length += tokens

    def inherit(self, slots: list[int], parents: list[int], start: int = 0) -> list[int]:
        """Beam search: new row i continues old row `parents[i]`; `slots[r]` is the cache row that
        holds row r, and the new rows' slots are returned. A parent's first child takes over its
        slot as it is; a further child gets the slot of a row left without children, and the
        parent's positions from `start` on are copied there. Most steps copy one or two rows of
        five, where reordering moved all five.

        Parents lie in their child's group (one prompt's beams), so the childless rows, taken in
        order, fall in the group of the child that needs one; before `start` (the prompt) a
        group's rows hold the same."""
        new, taken = [], set()
        for p in parents:
            new.append(-1 if slots[p] in taken else slots[p])
            taken.add(slots[p])
        free = [s for s in slots if s not in taken]
        for i, p in enumerate(parents):
            if new[i] < 0:
                new[i] = free.pop(0)
                for buf in (self.k, self.v):
                    buf[:, new[i], :, start:self.length] = buf[:, slots[p], :, start:self.length]
        return new

    def add_rows(self, n: int) -> None:
        """`n` more rows in use, zeroed (a masked column must hold no NaN), for prompts that join a
        running batch. The buffers double when full (rarely, on the CPU: see `room`)."""
        rows = self.rows + n
        if rows > self.k.shape[1]:
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros(old.shape[0], max(rows, 2 * old.shape[1]), *old.shape[2:])
                new[:, :self.rows] = old[:, :self.rows]
                setattr(self, name, new)
        else:
            self.k[:, self.rows:rows] = 0
            self.v[:, self.rows:rows] = 0
        self.rows = rows

    def expand(self, repeats: int) -> None:
        """Repeat each row `repeats` times (a prompt's cache shared by its beams or samples)."""
        self._rebuild(torch.arange(self.batch_size, device=self.k.device).repeat_interleave(repeats), self.capacity)


class StaticCache:
    """Keys and values at a fixed capacity, each row written at its own position, held on the
    device: nothing a step does depends on a host value, so the step can be captured once (a CUDA
    graph, graphs.py) and replayed. The attention mask is built on the device from the positions;
    columns past a row's position hold zeros or keys written before (never NaN), masked out. A row
    whose `live` is 0 (finished) keeps its position, so it never runs past the capacity."""

    static = True

    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch, num_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.position = torch.zeros(batch, dtype=torch.long, device=device)  # each row's next position
        self.live = torch.ones(batch, dtype=torch.long, device=device)  # 0: a finished row, which stays put
        self._columns = torch.arange(capacity, device=device)
        self._index: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def positions_and_mask(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [batch, t] of the next `t` tokens of every row, and the boolean SDPA mask
        [batch, 1, t, capacity]: each attends to its row's columns up to itself."""
        positions = self.position[:, None] + torch.arange(t, device=self.position.device)
        b, h, d = self.k.shape[1], self.k.shape[2], self.k.shape[4]
        self._index = positions[:, None, :, None].expand(b, h, t, d)
        return positions, (self._columns[None, None, :] <= positions[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's [batch, heads, t, head_dim] keys/values at each row's positions; return
        the whole buffers (the mask hides what is not written yet)."""
        self.k[layer].scatter_(2, self._index, k)
        self.v[layer].scatter_(2, self._index, v)
        return self.k[layer], self.v[layer]

    def advance(self, tokens: int) -> None:
        self.position += tokens * self.live
