"""What `biogpt serve` exposes at GET /metrics, in Prometheus' text format (the `serve` extra's
prometheus_client), one registry per app: requests running and waiting, rows being decoded and
the batch's capacity, prompt and generated tokens, latency histograms (time in the queue, to the
first token, per output token, end to end), requests cancelled or started over, answers by status."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, running: Callable[[], float], waiting: Callable[[], float], capacity: int = 0) -> None:
        self.registry = registry = CollectorRegistry()
        Gauge("biogpt_requests_running", "Requests decoding now, or holding the model (embeddings)",
              registry=registry).set_function(running)
        Gauge("biogpt_requests_waiting", "Requests waiting for the model", registry=registry).set_function(waiting)
        self.rows = Gauge("biogpt_batch_rows", "Rows in the batch being decoded (their keys and values cached)",
                          registry=registry)
        Gauge("biogpt_batch_rows_capacity", "Rows a batch may hold (serve --max-rows)", registry=registry).set(capacity)
        self.prompt_tokens = Counter("biogpt_prompt_tokens", "Prompt tokens read", registry=registry)
        self.generated_tokens = Counter("biogpt_generation_tokens", "Tokens generated", registry=registry)
        self.first_token = Histogram("biogpt_time_to_first_token_seconds", "From a request's arrival to its first "
                                     "token", buckets=LATENCY, registry=registry)
        self.per_token = Histogram("biogpt_time_per_output_token_seconds", "Between a request's tokens after the "
                                   "first", buckets=LATENCY, registry=registry)
        self.queued = Histogram("biogpt_queue_time_seconds", "From a request's arrival to its rows joining a batch",
                                buckets=LATENCY, registry=registry)
        self.latency = Histogram("biogpt_e2e_request_latency_seconds", "From a request's arrival to its last token",
                                 buckets=LATENCY, registry=registry)
        self.cancelled = Counter("biogpt_requests_cancelled", "Requests whose client went away before the end",
                                 registry=registry)
        self.restarted = Counter("biogpt_requests_restarted", "Requests started over in a fresh batch after the "
                                 "batch they were in failed (their streams go on where they were)", registry=registry)
        self.answers = Counter("biogpt_requests", "Requests answered, by HTTP status", ["status"], registry=registry)

    def generated(self, seconds_to_first: float, seconds: float, tokens: int, steps: int) -> None:
        """A finished generation of `tokens` new tokens in all, its longest choice `steps` of them
        (its choices decode side by side), taking `seconds` from its arrival."""
        self.generated_tokens.inc(tokens)
        self.first_token.observe(seconds_to_first)
        self.latency.observe(seconds)
        if steps > 1:
            self.per_token.observe((seconds - seconds_to_first) / (steps - 1))

    def text(self) -> bytes:
        return generate_latest(self.registry)
