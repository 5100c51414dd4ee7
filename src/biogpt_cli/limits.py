"""What one request to `biogpt serve` may ask for, how many may wait, and how their shared batch
speculates (server.py enforces them; the command's options set them, so they live apart from the
`serve` extra)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    body_bytes: int = 1_000_000  # request body
    rows: int = 64  # prompts x n of one request
    waiting: int = 32  # requests waiting for the model; more get a 429 at once
    buffered: int = 4096  # events a streamed response holds for a client that does not read
    fair_wait: float = 2.0  # seconds a request of another kind waits before the running batch stops taking more
    speculate: str = "auto"  # every request's rows (drafts.py): the tokens are the same whatever it is
    draft_tokens: int = 8

DEFAULT_LIMITS = Limits()
