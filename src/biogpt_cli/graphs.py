"""Rows decoded over a static cache, their one-token step captured in a CUDA graph.

A decoding step is a few hundred small kernels: on a GPU their launches, not the bytes they read,
set the speed. Over a `StaticCache` nothing in the step depends on a host value (each row's
position is a device tensor, the mask is built from it, a finished row stays where it is), so the
step of a bucket of rows (1, 2, 4, ... of them) is captured once per decoder, and each token of
every row is one graph replay. A batch's decoder holds the rows in use, rounded up to a bucket,
and grows to the next bucket as rows join (a prompt longer than the capacity widens it); its old
buffers are freed before the new ones are taken. Prompts are prefilled eagerly, together, into
any free rows; the logits processors and sampling run after the graph on its output. A capture
cannot be kept on disk (a graph holds device addresses), so it is paid once per decoder shape and
process; `-v` reports its time.
BIOGPT_GRAPHS=0 (`--no-graphs`) decodes eagerly instead. A captured step checks itself: its first
replay is compared with the eager step on the same inputs (logits within `TOLERANCE` of the
largest, per dtype), and a mismatch, or any error while capturing or replaying, drops the model to
the eager path for the rest of the process, with one `GraphFallback` warning naming what failed.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence

import torch

from .cache import StaticCache

BUCKET = 256  # capacities are rounded up to this, so a process captures few graphs
CAPTURES: list[float] = []  # seconds each capture of this process took (`-v` reports them)
UNCAPTURED: list[str] = []  # why a capture failed: those rows then run the same step eagerly (`-v` says so)
# a replay may differ from the eager step by kernel choice and rounding, at most this much of the largest logit
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


class GraphFallback(UserWarning):
    """A captured step failed or disagreed with the eager step: its model decodes eagerly from then on."""


def graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("BIOGPT_GRAPHS", "1").strip() not in ("0", "false", "no", "off")


class StaticRows:
    """`rows` rows over a static cache of `capacity` positions: on CUDA (unless graphs are off) a
    step replays a captured graph, elsewhere it runs eagerly (the same computation, which is how
    the CPU tests check it)."""

    def __init__(self, model: torch.nn.Module, rows: int, capacity: int) -> None:
        cfg, p = model.config, next(model.parameters())
        self.model = model
        self.cache = StaticCache(cfg.num_hidden_layers, rows, cfg.num_attention_heads, cfg.head_dim, capacity,
                                 p.dtype, p.device)
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=p.device)
        self.captured = graphs_enabled(p.device) and "_eager" not in vars(model)
        self.checked = False  # its first replay was compared with the eager step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Start `rows` over with `prompts`, prefilled together (right-padded: causal attention
        keeps the padding out of every real token); their next-token logits [len(rows), vocab] in
        float32."""
        device, lengths = self.tokens.device, [len(p) for p in prompts]
        n = max(lengths)
        ids = torch.tensor([[*p, *[p[-1]] * (n - len(p))] for p in prompts], device=device)
        own = self.model.new_cache(len(prompts), n)
        with torch.no_grad():
            hidden = self.model.biogpt(ids, past_key_values=own).last_hidden_state
            last = hidden[torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device) - 1]
            logits = self.model.output_projection(last).float()
        index = torch.tensor(list(rows), device=device)
        self.cache.k[:, index, :, :n] = own.k[:, :, :, :n]
        self.cache.v[:, index, :, :n] = own.v[:, :, :, :n]
        self.cache.position[index] = torch.tensor(lengths, device=device)
        return logits

    def free(self) -> None:
        """Let go of the buffers and the graph (a decoder resized, whose content was copied)."""
        self.cache = self.graph = self.logits = None

    def step(self, tokens: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """One token for each of the first len(tokens) rows, whose `live` ones move on (the others,
        and the rows past them, stay where they are); their next-token logits in float32 (a copy:
        the graph's own output is overwritten by the next replay)."""
        b = tokens.shape[0]
        self.tokens[:b, 0].copy_(tokens)
        self.cache.live[:b].copy_(live)
        self.cache.live[b:] = 0
        if self.captured and "_eager" not in vars(self.model):
            logits = self._replayed(b)
            if logits is not None:
                return logits
        self.captured = False
        return self._forward()[:b].float()

    def _forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.tokens, past_key_values=self.cache, logits_to_keep=1).logits[:, -1]

    def _replayed(self, b: int) -> torch.Tensor | None:
        """The captured step's logits (captured at its first use); on its first replay the eager
        step's, after checking that they agree. None, with the cache as it was and the model eager
        from now on, when capturing or replaying fails or the first replay disagrees."""
        position = self.cache.position.clone()
        try:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits[:b].to(torch.float32, copy=True)
        except RuntimeError as e:
            self.cache.position.copy_(position)
            return self._fall_back(f"failed ({(str(e).strip() or type(e).__name__).splitlines()[0]})")
        if self.checked:
            return logits
        self.checked = True
        self.cache.position.copy_(position)  # the same step again, eagerly: the same keys and positions
        eager = self._forward()[:b].float()
        worst = (logits - eager).abs().max().item()
        bound = TOLERANCE.get(self.cache.k.dtype, 1e-3) * max(1.0, eager.abs().max().item())
        if not worst <= bound:  # NaN too
            self._fall_back(f"disagreed with the eager step (logits off by {worst:.3g}, more than {bound:.3g})")
        return eager

    def _fall_back(self, what: str) -> None:
        """The model decodes eagerly from now on; one warning says why."""
        self.graph = None
        if "_eager" not in vars(self.model):
            vars(self.model)["_eager"] = what
            UNCAPTURED.append(what)
            warnings.warn(f"the captured decode step {what}: decoding eagerly from here on (--no-graphs skips "
                          "capturing)", GraphFallback, stacklevel=4)
        return None

    def _capture(self) -> None:
        """Warm up on a side stream (restoring the positions each time: the warm-ups write the same
        tokens' keys where the real step will), then record the step; RuntimeError when this torch
        and device cannot capture it."""
        start = time.perf_counter()
        position = self.cache.position.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward()
                    self.cache.position.copy_(position)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread-local: a server's other threads (embeddings, echo) may use the GPU meanwhile
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.logits = self._forward()
            CAPTURES.append(time.perf_counter() - start)
        finally:
            self.cache.position.copy_(position)


class Decoders:
    """A model's decoders, each used by one batch at a time (`take`, `give_back`), so that two
    threads generating with one model never share a cache. An idle decoder is kept for its
    captured graph until another one is needed: every idle one is freed first, so the model holds
    the decoders in use and at most the idle ones of its last batches. They are keyed by the
    weights they read (device, dtype, storage): a model moved or changed since drops them all (a
    graph would read freed memory)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[StaticRows] = []
        self.weights: tuple = ()

    def take(self, model: torch.nn.Module, rows: int, capacity: int) -> StaticRows:
        with self.lock:
            self._check(model)
            found = next((d for d in self.idle if d.rows == rows and d.cache.capacity == capacity), None)
            if found is not None:
                self.idle.remove(found)
                return found
            self.idle.clear()  # freed before the new buffers are taken
        return StaticRows(model, rows, capacity)

    def give_back(self, model: torch.nn.Module, decoder: StaticRows) -> None:
        with self.lock:
            if _weights(model) == self.weights:  # else it reads weights that are gone
                self.idle.append(decoder)

    def _check(self, model: torch.nn.Module) -> None:
        key = _weights(model)
        if key != self.weights:
            self.idle.clear()
            self.weights = key


def _weights(model: torch.nn.Module) -> tuple:
    return tuple((t.data_ptr(), t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def decoders(model: torch.nn.Module) -> Decoders:
    """The model's decoders (made once: `setdefault` is atomic, so two threads get the same)."""
    return vars(model).setdefault("_decoders", Decoders())


def bucket_of(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


def capacity_of(model: torch.nn.Module, positions: int) -> int:
    return min(model.config.max_position_embeddings, -(-positions // BUCKET) * BUCKET)


def static_rows(model: torch.nn.Module, rows: int, positions: int) -> StaticRows:
    """A decoder of its own for a batch of `rows` rows (rounded up to a power of two) of up to
    `positions` positions each (prompt and new tokens; rounded up to `BUCKET`), taken from the
    model's idle ones where one has that shape, so that its graph is captured once. The batch
    gives it back (`release`) when it ends."""
    return decoders(model).take(model, bucket_of(rows), capacity_of(model, positions))


def release(model: torch.nn.Module, decoder: StaticRows) -> None:
    decoders(model).give_back(model, decoder)


def resized(model: torch.nn.Module, decoder: StaticRows, rows: int, positions: int) -> StaticRows:
    """A decoder for at least `rows` rows and `positions` positions holding what `decoder` holds
    (rows joined a running batch, or a prompt longer than its capacity). The old buffers are
    copied to the host and freed before the new ones are taken, so the device never holds both."""
    rows, capacity = max(bucket_of(rows), decoder.rows), max(capacity_of(model, positions), decoder.cache.capacity)
    if (rows, capacity) == (decoder.rows, decoder.cache.capacity):
        return decoder
    n, r = decoder.cache.capacity, decoder.rows
    held = [t.to("cpu") for t in (decoder.cache.k, decoder.cache.v, decoder.cache.position)]
    decoder.free()
    wider = decoders(model).take(model, rows, capacity)
    wider.cache.k[:, :r, :, :n] = held[0].to(wider.cache.k.device)
    wider.cache.v[:, :r, :, :n] = held[1].to(wider.cache.v.device)
    wider.cache.position[:r] = held[2].to(wider.cache.position.device)
    wider.cache.position[r:] = 0
    return wider
