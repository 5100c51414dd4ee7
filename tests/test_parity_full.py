"""Parity beyond the toy model: generation on the full microsoft/biogpt shape, past position 64,
against the reference's generate(); and a BioGPT-Large-shaped forward pass."""

from __future__ import annotations

import pytest
import torch
import transformers

from biogpt_cli import BioGptConfig, BioGptForCausalLM, BioGptModel, GenerationOptions, generate
from biogpt_cli.loading import from_state_dict
from tests.test_generation import our_rows

NEW = 70  # prompts of 3-9 tokens + 70 new tokens: positions well past 64


@pytest.fixture(scope="module")
def full():
    """(reference, ours) with random weights of the full microsoft/biogpt shape. The embedding is
    scaled up so that logits are peaked (std ~3 instead of ~0.6): near-ties between the top two
    tokens, where float rounding would decide, become rare."""
    torch.manual_seed(0)
    ref = transformers.BioGptForCausalLM(transformers.BioGptConfig()).eval()
    with torch.no_grad():
        ref.biogpt.embed_tokens.weight.mul_(4)
    ours = from_state_dict(BioGptForCausalLM, BioGptConfig.from_dict(ref.config.to_dict()), dict(ref.state_dict()))
    return ref, ours


def left_padded(prompts, pad=1):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    return ids, (ids != pad).long()


PROMPTS = [[2, 1000, 2000, 3000, 40, 50, 60, 70, 80], [2, 9000, 77]]
CASES = {
    "greedy": GenerationOptions(max_new_tokens=NEW),
    "beam": GenerationOptions(max_new_tokens=NEW, num_beams=3, num_return_sequences=2),
    "penalties": GenerationOptions(max_new_tokens=NEW, repetition_penalty=1.3, no_repeat_ngram_size=3),
}


@pytest.mark.parametrize("name", CASES)
def test_full_shape_padded_batch_equals_reference(full, name):
    ref, ours = full
    opts = CASES[name]
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=opts.num_beams,
                                num_return_sequences=opts.num_return_sequences, do_sample=False,
                                repetition_penalty=opts.repetition_penalty,
                                no_repeat_ngram_size=opts.no_repeat_ngram_size, pad_token_id=1).tolist()
    got = generate(ours, PROMPTS, opts)
    k = opts.num_return_sequences
    for i, seqs in enumerate(got):
        for j, row in enumerate(expected[i * k:(i + 1) * k]):
            new = row[ids.shape[1]:]
            assert our_rows([seqs[j]], [], len(new))[0] == new, f"prompt {i}, sequence {j}"


def test_full_shape_sampling_with_default_top_k_equals_reference(full):
    ref, ours = full
    prompt = PROMPTS[0]
    opts = GenerationOptions(max_new_tokens=NEW, do_sample=True, num_return_sequences=2)  # top_k 50 by default
    torch.manual_seed(11)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=True, num_return_sequences=2,
                                pad_token_id=1).tolist()
    got = generate(ours, [prompt], opts, torch.Generator().manual_seed(11))[0]
    assert our_rows(got, prompt, len(expected[0])) == expected


def test_large_shaped_forward_equals_reference():
    """BioGPT-Large's shape (1600 hidden, 25 heads of 64, 57717 tokens, 2048 positions) on two layers,
    over a sequence that passes position 1024."""
    config = transformers.BioGptConfig(vocab_size=57717, hidden_size=1600, num_hidden_layers=2, num_attention_heads=25,
                                       intermediate_size=6400, max_position_embeddings=2048)
    torch.manual_seed(1)
    ref = transformers.BioGptModel(config).eval()
    ours = from_state_dict(BioGptModel, BioGptConfig.from_dict(config.to_dict()), dict(ref.state_dict()))
    ids = torch.randint(4, 57717, (1, 1100))
    ids[0, 0] = 2
    with torch.no_grad():
        expected = ref(ids).last_hidden_state
    got = ours(ids).last_hidden_state
    assert got.shape == (1, 1100, 1600) and torch.allclose(got, expected, atol=1e-4)
