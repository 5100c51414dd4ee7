"""The server's requests: OpenAI's completions and embeddings fields, vLLM's extra sampling
fields, and what each means in `generate`'s settings (plans.py), so that a request decodes as
`biogpt generate` does with the same options. Checks that need no model live here too; the HTTP
layer (server.py) renders the 4xx they return.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's fields, then vLLM's: what /v1/models lists as honoured
OPENAI_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "best_of", "stop", "seed", "logprobs",
                 "echo", "stream", "stream_options", "user", "frequency_penalty", "presence_penalty", "logit_bias")
VLLM_FIELDS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "no_repeat_ngram_size", "use_beam_search",
               "length_penalty", "early_stopping", "bad_words", "stop_token_ids", "include_stop_str_in_output",
               "ignore_eos", "guided_choice")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with no choices and the request's usage


class CompletionRequest(BaseModel):
    """/v1/completions: OpenAI's fields and vLLM's extra ones; any other field is refused."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)  # None: up to the model's positions; 0 only with echo
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=16)
    best_of: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # BioGPT token ids (as strings, as JSON keys are) -> bias
    suffix: str | None = None  # taken only empty: BioGPT has no infilling
    # vLLM's
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    bad_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    guided_choice: list[str] | None = None  # the completion is one of these texts

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def rows(self) -> int:
        """Rows each prompt decodes: its beams, or its best_of samples, else its n."""
        return max(self.n, self.best_of or 0)


TASK_FORMATS = ("json", "pubtator", "bioc-xml", "bioc-json")


class TaskRequest(BaseModel):
    """/v1/qa, /v1/extract, /v1/classify as JSON: documents as the task commands read JSONL records
    (`{"id", "title", "abstract"}`, `{"question", "context"}`, `{"text"}`, or a BioC JSON document
    with its passages), and what the commands' options say."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    documents: list[dict[str, Any]] | None = None  # None: a literature file is the body
    constrained: bool = False
    task: str | None = None  # extract: bc5cdr, ddi or kd-dti, when the checkpoint does not say
    relations: list[str] | None = None  # with constrained: the relation words
    max_tokens: int = Field(0, ge=0)  # 0: until </s> or the positions left, as -n 0
    format: Literal["json", "pubtator", "bioc-xml", "bioc-json"] = "json"


class EmbeddingRequest(BaseModel):
    """OpenAI's /v1/embeddings. Token arrays are typed here only to be refused with a hint: clients
    send them as tiktoken's ids (LangChain's OpenAIEmbeddings does by default), not BioGPT's."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def problem(body: CompletionRequest, rows_limit: int) -> tuple[str, str] | None:
    """The first thing wrong with a completions request that is seen without the model: (the
    field, the message naming it)."""
    checks = [
        ("prompt", not body.prompts or not all(p.strip() for p in body.prompts), "every prompt needs some text"),
        ("suffix", bool(body.suffix), "not supported by this server (BioGPT has no infilling; leave it out)"),
        ("best_of", body.best_of is not None and body.best_of < body.n, f"must be at least n ({body.n})"),
        ("best_of", (body.best_of or 0) > body.n and body.stream, "more than n: not with stream: true (the best n "
         "are known only at the end)"),
        ("best_of", (body.best_of or 0) > body.n and body.temperature == 0 and not body.use_beam_search,
         "more than n needs sampling (temperature > 0) or use_beam_search"),
        ("use_beam_search", body.use_beam_search and body.temperature > 0, "beam search is deterministic: send "
         "temperature: 0 with it"),
        ("length_penalty", body.length_penalty != 1.0 and not body.use_beam_search, "only with use_beam_search"),
        ("early_stopping", body.early_stopping is not False and not body.use_beam_search, "only with use_beam_search"),
        ("stop_token_ids", bool(body.stop_token_ids) and body.use_beam_search, "not with use_beam_search"),
        ("guided_choice", body.guided_choice is not None and not (body.guided_choice and all(
            c.strip() for c in body.guided_choice)), "a list of one or more non-empty texts"),
        ("guided_choice", bool(body.guided_choice) and body.ignore_eos, "not with ignore_eos (a choice ends the "
         "completion with </s>)"),
        ("bad_words", any(not w.strip() for w in body.bad_words or ()), "every banned word needs some text"),
        ("stream_options", body.stream_options is not None and not body.stream, "only with stream: true"),
        ("echo", bool(body.echo) and body.stream, "not with stream: true (echo scores the prompt: send it unstreamed)"),
        ("max_tokens", body.max_tokens == 0 and not body.echo,
         "0 generates nothing: give at least 1, or echo: true to score the prompt"),
        ("n", len(body.prompts) * body.rows > rows_limit, f"prompt x n: {len(body.prompts)} x {body.rows} rows, over "
         f"this server's {rows_limit} a request (serve --max-rows)"),
    ]
    for field, bad, message in checks:
        if bad:
            return field, message if field == "n" else f"{field}: {message}"  # n's names "prompt x n"
    return None


# the engine's names for what a request calls otherwise
REQUEST_TERMS = {"-n (max_new_tokens)": "max_tokens", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                 "bad_words_ids": "bad_words", "num_return_sequences": "n", "num_beams": "n",
                 "the choice": "guided_choice: the choice", "--choices": "guided_choice", "--ban": "bad_words",
                 "--min-new-tokens": "min_tokens", "--no-repeat-ngram-size": "no_repeat_ngram_size"}


def in_request_terms(message: str) -> tuple[str, str]:
    """An engine message about a request in its own fields' names: (the field, the message)."""
    for ours, theirs in REQUEST_TERMS.items():
        message = message.replace(ours, theirs)
    field = max((f for f in (*OPENAI_FIELDS, *VLLM_FIELDS) if message.startswith(f)), key=len, default="prompt")
    return field, message


def logit_bias(body: CompletionRequest) -> dict[int, float]:
    """`logit_bias` with integer keys; ValueError naming a key that is no token id."""
    out = {}
    for key, value in (body.logit_bias or {}).items():
        if not re.fullmatch(r"\s*-?[0-9]+\s*", key):  # ASCII digits only: "²" and "١٢" are digits to isdigit()
            raise ValueError(f"logit_bias: {key!r} is not a token id (BioGPT's ids: POST /tokenize gives them)")
        out[int(key)] = value
    return out


def settings(body: CompletionRequest) -> dict[str, Any]:
    """`generate`'s settings (plans.generate_plan) for a completions request. `max_tokens` None
    (up to the model's positions) and `ignore_eos` are settled once the prompts are tokenized
    (serving.Engine.prepare); 0 (an echo alone) plans one token, never decoded."""
    beams = body.use_beam_search and body.rows > 1
    sample = body.temperature > 0 and not body.use_beam_search
    return {
        "max_new_tokens": None if body.max_tokens is None else body.max_tokens or 1,
        "min_new_tokens": body.min_tokens, "ignore_eos": body.ignore_eos,
        "sample": sample, "temperature": body.temperature if sample else None,
        "top_p": body.top_p if sample else None, "top_k": max(body.top_k or 0, 0) if sample else None,
        "min_p": body.min_p if sample and body.min_p > 0 else None,
        "num_beams": body.rows if beams else 1, "num_return_sequences": body.n if beams else body.rows if sample else 1,
        "length_penalty": body.length_penalty if beams else None,
        "early_stopping": body.early_stopping if beams else None,
        "repetition_penalty": body.repetition_penalty, "no_repeat_ngram_size": body.no_repeat_ngram_size,
        "logprobs": body.logprobs if body.logprobs is not None or (body.best_of or 0) <= body.n else 0,
        "ban": body.bad_words or [], "stop": [body.stop] if isinstance(body.stop, str) else body.stop or [],
        "stop_token_ids": body.stop_token_ids or [], "include_stop": body.include_stop_str_in_output,
        "frequency_penalty": body.frequency_penalty, "presence_penalty": body.presence_penalty,
        "logit_bias": logit_bias(body), "choices": body.guided_choice, "seed": body.seed,
    }
