"""One row decoded over a static cache, its one-token step captured in a CUDA graph.

A decoding step of one row is a few hundred small kernels: on a GPU their launches, not the
bytes they read, set the speed. Over a `StaticCache` nothing in the step depends on a host value
(the position is a device tensor, the mask is built from it), so the step is captured once per
process and capacity, and each token is one graph replay. Prefill runs eagerly; the logits
processors and sampling run after the graph on its output. A capture takes well under a second
and cannot be kept on disk (a graph holds device addresses), so it is paid once per process;
`-v` reports it. BIOGPT_GRAPHS=0 (`--no-graphs`) decodes eagerly instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from .cache import StaticCache

BUCKET = 256  # capacities are rounded up to this, so a process captures few graphs
CAPTURES: list[float] = []  # seconds each capture of this process took (`-v` reports them)


def graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("BIOGPT_GRAPHS", "1").strip() not in ("0", "false", "no", "off")


class RowDecoder:
    """A single row's prefill and steps over a static cache of `capacity` positions: on CUDA
    (unless graphs are off) the step replays a captured graph, elsewhere it runs eagerly (the same
    computation, which is how the CPU tests check it)."""

    def __init__(self, model: torch.nn.Module, capacity: int) -> None:
        cfg, p = model.config, next(model.parameters())
        self.model = model
        self.cache = StaticCache(cfg.num_hidden_layers, 1, cfg.num_attention_heads, cfg.head_dim, capacity,
                                 p.dtype, p.device)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=p.device)
        self.captured = graphs_enabled(p.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def prefill(self, prompt: Sequence[int]) -> torch.Tensor:
        """Start the row over with `prompt`; its next-token logits [1, vocab] in float32."""
        self.cache.position.zero_()
        ids = torch.tensor([list(prompt)], device=self.token.device)
        with torch.no_grad():
            return self.model(ids, past_key_values=self.cache, logits_to_keep=1).logits[:, -1].float()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token; the next-token logits [1, vocab] in float32 (a copy: the graph's own
        output is overwritten by the next replay)."""
        self.token.copy_(tokens.view(1, 1))
        if not self.captured:
            return self._forward().float()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.float().clone()

    def _forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.token, past_key_values=self.cache, logits_to_keep=1).logits[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream (restoring the position each time: the warm-ups write the same
        token's keys where the real step will), then record the step."""
        start = time.perf_counter()
        position = self.cache.position.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
                self.cache.position.copy_(position)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        self.cache.position.copy_(position)
        CAPTURES.append(time.perf_counter() - start)


def row_decoder(model: torch.nn.Module, positions: int) -> RowDecoder:
    """The process's decoder for one row of up to `positions` positions (prompt and new tokens),
    kept per model and capacity bucket so that its graph is captured once."""
    limit = model.config.max_position_embeddings
    capacity = min(limit, -(-positions // BUCKET) * BUCKET)
    own = vars(model).setdefault("_row_decoders", {})  # lives as long as the model
    if capacity not in own:
        own[capacity] = RowDecoder(model, capacity)
    return own[capacity]
