"""What each precision costs in quality, measured where it means something.

Random weights give near-uniform logits, so agreement on them says little. This trains (once,
cached in the work folder, a few minutes on 2 cores) a small BioGPT-shaped model on the PubMed dev
corpus with the real vocabulary, then compares every precision with float32 on held-out lines:
perplexity relative to float32, and top-1 agreement of the next-token predictions, computed as
decoding computes them (a few tokens a pass through the cache: the rows our kernels multiply, not
a prompt's GEMM), for torch's quantized kernels and ours. It also counts the prompts whose greedy
tokens differ when they share a batch: fbgemm's int8 activations are quantized over all rows of a
call, so a batch is not the same computation as each prompt alone (ours are quantized per row).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import torch

from biogpt_cli import BioGptConfig, BioGptForCausalLM, BioGptTokenizer, GenerationOptions, generate
from biogpt_cli.native import MAX_ROWS, library

SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
             max_position_embeddings=256)
HELD_OUT = 100
SEQ = 64
BATCHED, PROMPT = 40, 8  # prompts of 8 tokens, greedy 20 new tokens, batched and alone


def train(vocab_folder: Path, lines: list[str], folder: Path, steps: int = 300) -> Path:
    """Train on all but the last HELD_OUT lines; saved in the Hub layout in `folder` (reused)."""
    from safetensors.torch import save_file

    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((vocab_folder / name).read_bytes())
    tok = BioGptTokenizer.from_folder(folder)
    stream = [i for line in lines[:-HELD_OUT] for i in tok.encode(line)]
    config = BioGptConfig(vocab_size=tok.vocab_size, **SHAPE)
    torch.manual_seed(0)
    model = BioGptForCausalLM(config)
    for name, p in model.named_parameters():  # the reference's initialisation: N(0, 0.02), zero biases
        if "layer_norm" not in name:
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=2e-3, total_steps=steps)
    rng = random.Random(0)
    start = time.perf_counter()
    for _ in range(steps):
        starts = [rng.randrange(len(stream) - SEQ) for _ in range(8)]
        ids = torch.tensor([stream[s:s + SEQ] for s in starts])
        loss = model(ids, labels=ids).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        schedule.step()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "output_projection.weight"}
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    print(f"trained the quality model: {steps} steps in {time.perf_counter() - start:.0f} s, last loss {loss:.2f}")
    return folder


def measure(folder: Path, lines: list[str]) -> list[dict]:
    """Perplexity and top-1 agreement on the held-out lines, per precision, against float32."""
    tok = BioGptTokenizer.from_folder(folder)
    held = [tok.encode(line)[:SHAPE["max_position_embeddings"]] for line in lines[-HELD_OUT:]]
    results, base = [], None
    cases = [("float32", {}, None), ("--quantize int8", {"quantize": "int8"}, "int8"),
             ("--quantize int4", {"quantize": "int4"}, "int4")]
    if library() is not None:
        cases += [("--quantize int8, our kernel", {"quantize": "int8"}, "int8-native"),
                  ("--quantize int4, our kernel", {"quantize": "int4"}, "int4-native")]
    cases += [("--dtype bfloat16", {"dtype": "bfloat16"}, None), ("--dtype float16", {"dtype": "float16"}, None)]
    for label, kwargs, kernel in cases:
        os.environ["BIOGPT_KERNEL"] = kernel or ""
        model = BioGptForCausalLM.from_pretrained(folder, **kwargs)
        logprobs, top1 = [], []
        with torch.inference_mode():
            for seq in held:
                logits = decoded_logits(model, seq)
                logprobs.append(logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0])
                top1.append(logits.argmax(-1))
        nll = -torch.cat(logprobs).mean().item()
        if base is None:
            base = (nll, top1)
        agree = torch.cat([(a == b).float() for a, b in zip(top1, base[1], strict=True)]).mean().item()
        prompts, opts = [seq[:PROMPT] for seq in held[:BATCHED]], GenerationOptions(max_new_tokens=20)
        together = generate(model, prompts, opts)
        differ = sum(generate(model, [p], opts)[0][0].ids != t[0].ids for p, t in zip(prompts, together, strict=True))
        os.environ.pop("BIOGPT_KERNEL")
        results.append({"precision": label, "perplexity": math.exp(nll), "vs_float32": math.exp(nll - base[0]) - 1,
                        "top1_agreement": agree, "batched_differs": differ, "batched": len(prompts)})
    return results


def decoded_logits(model: BioGptForCausalLM, seq: list[int]) -> torch.Tensor:
    """Each position's next-token logits ([len - 1, vocab], float32), fed as decoding feeds the
    model: at most MAX_ROWS tokens a pass, through the cache."""
    cache, out = model.new_cache(1, len(seq)), []
    for start in range(0, len(seq) - 1, MAX_ROWS):
        chunk = torch.tensor([seq[start:min(start + MAX_ROWS, len(seq) - 1)]])
        out.append(model(chunk, past_key_values=cache, use_cache=True).logits[0].float())
    return torch.cat(out)
