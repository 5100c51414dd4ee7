"""Every decoding option over HTTP, through the openai client's `extra_body` as vLLM's clients send
them: each equal to `biogpt generate` with the same settings where the command line has it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="openai (a test dependency) is not installed")
import httpx  # noqa: E402
import torch  # noqa: E402

from biogpt_cli import GenerationOptions, generate  # noqa: E402
from tests.conftest import client  # noqa: E402

PROMPT = "the cat and"
# (request fields, the same settings as `biogpt generate` options)
SAME_AS_GENERATE = [
    ({"temperature": 0, "extra_body": {"repetition_penalty": 1.5}}, ["--repetition-penalty", "1.5"]),
    ({"temperature": 0, "extra_body": {"no_repeat_ngram_size": 2}}, ["--no-repeat-ngram-size", "2"]),
    ({"temperature": 0, "extra_body": {"min_tokens": 10}}, ["--min-new-tokens", "10"]),
    ({"temperature": 0, "extra_body": {"ignore_eos": True}}, ["--min-new-tokens", "12"]),
    ({"temperature": 0, "extra_body": {"bad_words": ["w", "T"]}}, ["--ban", "w", "--ban", "T"]),
    ({"temperature": 0, "stop": [" K"]}, ["--stop", " K"]),
    ({"temperature": 0.8, "seed": 3, "extra_body": {"top_k": 5}},
     ["--sample", "--temperature", "0.8", "--seed", "3", "--top-k", "5"]),
    ({"temperature": 1, "seed": 4, "top_p": 0.7, "extra_body": {"min_p": 0.05}},
     ["--sample", "--seed", "4", "--top-k", "0", "--top-p", "0.7", "--min-p", "0.05"]),
    ({"temperature": 0, "n": 3, "extra_body": {"use_beam_search": True}},
     ["--num-beams", "3", "--num-return-sequences", "3"]),
    ({"temperature": 0, "n": 2, "best_of": 4, "extra_body": {"use_beam_search": True, "length_penalty": 0.5,
                                                             "early_stopping": True}},
     ["--num-beams", "4", "--num-return-sequences", "2", "--length-penalty", "0.5", "--early-stopping"]),
]


@pytest.mark.parametrize("request_, options", SAME_AS_GENERATE, ids=lambda x: json.dumps(x)[:60])
def test_each_option_equals_generate(server, tiny_ref, cli, request_, options):
    out = client(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=12, **request_)
    code, lines, err = cli("generate", "-m", tiny_ref[1], PROMPT, "-n", "12", "--format", "jsonl", *options)
    assert code == 0, err
    expected = [json.loads(line)["text"] for line in lines.splitlines()]
    assert [ch.text for ch in sorted(out.choices, key=lambda ch: ch.index)] == expected


def by_hand(lm, tok, ids, n, adjust):
    """Greedy text of `n` tokens, each step's logits changed by `adjust(logits, new_tokens)`."""
    history, new = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            t = int(adjust(lm(torch.tensor([history])).logits[0, -1].float(), new).argmax())
            if t == 2:
                break
            history.append(t)
            new.append(t)
    return tok.decode(ids + new, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]


def test_openai_penalties_bias_and_stop_tokens(server):
    """Fields `generate` lacks, against their definitions: OpenAI's penalties over the new tokens,
    `logit_bias` over BioGPT ids, vLLM's stop tokens (kept with include_stop_str_in_output)."""
    _, lm, tok = server
    c, ids = client(server), tok.encode(PROMPT)
    free = generate(lm, [ids], GenerationOptions(max_new_tokens=12))[0][0].ids
    for bias in ({str(free[0]): -100}, {"50": 100}, {"7": 3.5, "12": -2}):
        got = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=bias)

        def add(logits, new, bias=bias):
            index, values = torch.tensor([int(k) for k in bias]), torch.tensor([float(v) for v in bias.values()])
            return logits.index_add(0, index, values)
        assert got.choices[0].text == by_hand(lm, tok, ids, 6, add)
    for frequency, presence in ((1.5, 0), (0, 2), (-1, 0.5)):
        got = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                   frequency_penalty=frequency, presence_penalty=presence)

        def penalised(logits, new, f=frequency, p=presence):
            counts = torch.bincount(torch.tensor(new, dtype=torch.long), minlength=logits.shape[0]).float()
            return logits - f * counts - p * (counts > 0).float()
        assert got.choices[0].text == by_hand(lm, tok, ids, 10, penalised)
    stop = free[3]
    cut = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                               extra_body={"stop_token_ids": [stop]})
    kept = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                extra_body={"stop_token_ids": [stop], "include_stop_str_in_output": True})
    upto = free.index(stop)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert cut.choices[0].text == tok.decode(ids + free[:upto], skip_special_tokens=True)[len(decoded):]
    assert kept.choices[0].text == tok.decode(ids + free[:upto + 1], skip_special_tokens=True)[len(decoded):]
    assert cut.choices[0].finish_reason == "stop"


def test_best_of_returns_the_likeliest_samples(server):
    c = client(server)
    out = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1, n=2, best_of=5, seed=7,
                               logprobs=0)
    every = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1, n=5, seed=7, logprobs=0)
    totals = sorted((sum(ch.logprobs.token_logprobs) for ch in every.choices), reverse=True)
    assert [sum(ch.logprobs.token_logprobs) for ch in out.choices] == pytest.approx(totals[:2])
    plain = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1, n=2, best_of=5, seed=7)
    assert [ch.text for ch in plain.choices] == [ch.text for ch in out.choices] and plain.choices[0].logprobs is None


def test_logprobs_are_text_pieces_with_offsets(server):
    """OpenAI's shape: one text_offset per token, tokens the text they add, so that zipping them
    with the offsets rebuilds the text; with echo, the prompt's first."""
    c = client(server)
    for prompt in (PROMPT, "IL-2 (a cytokine) \"binds\""):
        out = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2)
        lp, text = out.choices[0].logprobs, out.choices[0].text
        assert "".join(lp.tokens) == text and len(lp.text_offset) == len(lp.tokens) == len(lp.token_logprobs)
        assert all(text[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens, strict=True))
        echoed = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=1,
                                      echo=True).choices[0]
        assert "".join(echoed.logprobs.tokens) == echoed.text
        assert all(echoed.text[o:o + len(t)] == t for o, t in zip(echoed.logprobs.text_offset,
                                                                  echoed.logprobs.tokens, strict=True))


def test_names_max_tokens_null_and_the_tokenizer_routes(server):
    base, lm, tok = server
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny", "alias"]
    fields = c.models.list().data[0].model_extra["completion_fields"]
    assert "use_beam_search" in fields["vllm"] and "logit_bias" in fields["openai"]
    assert c.completions.create(model="alias", prompt=PROMPT, max_tokens=3, temperature=0).model == "alias"
    with pytest.raises(openai.NotFoundError, match="'tiny', 'alias'"):
        c.completions.create(model="microsoft/biogpt", prompt=PROMPT, max_tokens=3)
    long = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=None, temperature=0,
                                extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == lm.config.max_position_embeddings - len(tok.encode(PROMPT))
    headers = {"Authorization": "Bearer sekret"}
    r = httpx.post(base + "/tokenize", json={"model": "tiny", "prompt": PROMPT}, headers=headers, timeout=10).json()
    assert r["tokens"] == tok.encode(PROMPT) and r["count"] == len(r["tokens"]) and r["max_model_len"] == 64
    r = httpx.post(base + "/detokenize", json={"tokens": tok.encode(PROMPT)}, headers=headers, timeout=10).json()
    assert r == {"prompt": PROMPT}
    r = httpx.post(base + "/detokenize", json={"tokens": [10 ** 6]}, headers=headers, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_a_stop_string_kept_in_the_text(server):
    c = client(server)
    ask = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1, seed=3)  # varied text, the same each time
    free = c.completions.create(**ask).choices[0].text
    # a stop string first found past the first word (one at the first word leaves no text at all)
    stop = next(free[i:i + 2] for i in range(len(free) - 1) if free[:free.index(free[i:i + 2])].strip())
    cut = c.completions.create(**ask, stop=[stop]).choices[0]
    kept = c.completions.create(**ask, stop=[stop], extra_body={"include_stop_str_in_output": True}).choices[0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == free[:free.index(stop) + len(stop)] and cut.text == free[:free.index(stop)]


def test_token_id_fields_name_themselves(server):
    """A logit_bias key that only Unicode calls a digit ("²", "١٢") is not a token id; an id out of
    range is reported under the field that holds it."""
    c = client(server)
    for bias in ({"²": 1}, {"١٢": 100}, {"12a": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, logit_bias=bias)
        assert e.value.body["param"] == "logit_bias" and "is not a token id" in e.value.body["message"]
    for field, value in (("stop_token_ids", [10 ** 9]), ("logit_bias", {str(10 ** 9): 1})):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={field: value})
        assert e.value.body["param"] == field and e.value.body["message"].startswith(f"{field}: token ids must be")
