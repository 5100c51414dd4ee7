"""What `biogpt serve` exposes at GET /metrics, in Prometheus' text format (the `serve` extra's
prometheus_client), one registry per app: requests running and waiting, rows being decoded,
prompt and generated tokens, time to first token and time per output token, answers by status."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self.registry = registry = CollectorRegistry()
        Gauge("biogpt_requests_running", "Requests decoding now, or holding the model (embeddings)",
              registry=registry).set_function(running)
        Gauge("biogpt_requests_waiting", "Requests waiting for the model", registry=registry).set_function(waiting)
        self.rows = Gauge("biogpt_batch_rows", "Rows in the batch being decoded", registry=registry)
        self.prompt_tokens = Counter("biogpt_prompt_tokens", "Prompt tokens read", registry=registry)
        self.generated_tokens = Counter("biogpt_generation_tokens", "Tokens generated", registry=registry)
        self.first_token = Histogram("biogpt_time_to_first_token_seconds", "From a request's arrival to its first "
                                     "token", buckets=LATENCY, registry=registry)
        self.per_token = Histogram("biogpt_time_per_output_token_seconds", "Between a request's tokens after the "
                                   "first", buckets=LATENCY, registry=registry)
        self.answers = Counter("biogpt_requests", "Requests answered, by HTTP status", ["status"], registry=registry)

    def generated(self, seconds_to_first: float, seconds: float, tokens: int, steps: int) -> None:
        """A finished generation of `tokens` new tokens in all, its longest choice `steps` of them
        (its choices decode side by side), taking `seconds` from its arrival."""
        self.generated_tokens.inc(tokens)
        self.first_token.observe(seconds_to_first)
        if steps > 1:
            self.per_token.observe((seconds - seconds_to_first) / (steps - 1))

    def text(self) -> bytes:
        return generate_latest(self.registry)
