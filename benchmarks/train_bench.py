"""Fine-tuning throughput and peak memory: `biogpt finetune`'s update against a plain
`transformers` training loop doing the same work (same model, examples, micro-batches, padding,
dropout, AdamW settings and precision), each in a process of its own so that its peak resident
memory is its own. `bench.py --only finetune` runs it; alone:

    python benchmarks/train_bench.py ours|ours-lora|reference FOLDER CORPUS UPDATES [DEVICE]

prints one JSON object: target tokens trained per second (after one warm-up update) and the seconds
(on a GPU, where both loops train under bfloat16 autocast, also the GPU's peak memory).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from biogpt_cli import finetune as ft  # noqa: E402
from biogpt_cli.datasets import Example  # noqa: E402
from biogpt_cli.model import causal_lm_loss  # noqa: E402

BATCH_TOKENS, TOKENS_PER_UPDATE = 1024, 2048
RECIPE = ft.dataclasses.replace(ft.RECIPES["pubmedqa"], warmup=10, batch_tokens=BATCH_TOKENS,
                                tokens_per_update=TOKENS_PER_UPDATE)


def examples(corpus: Path, n: int) -> list[Example]:
    """PubMedQA-shaped examples whose contexts are the corpus's abstracts."""
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if len(line) > 400][:n]
    return [Example(str(i), {"question": "is it effective ?", "context": [line[:1500]]},
                    f"the answer to the question given the context is {('yes', 'no', 'maybe')[i % 3]}.")
            for i, line in enumerate(lines)]


def updates(seqs: list[list[int]]) -> list[list[list[int]]]:
    """The updates of the first epoch, as lists of micro-batches of ids: the same for both loops."""
    batches = ft.epoch_batches([len(s) for s in seqs], 1, RECIPE)
    groups = [batches[k:k + RECIPE.accumulate] for k in range(0, len(batches), RECIPE.accumulate)]
    return [[[seqs[i] for i in b] for b in group] for group in groups]


def reference_step(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device):
    def step(group: list[list[list[int]]]) -> int:
        tokens = sum(len(s) - 1 for b in group for s in b)
        for b in group:
            ids, mask, labels = ft.collate(b, device)
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):  # as ft.Trainer does
                logits = model(input_ids=ids, attention_mask=mask).logits
            loss = causal_lm_loss(logits, labels, "sum")
            (loss / tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens
    return step


def main() -> None:
    which, folder, corpus, count = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    device = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
    data = examples(corpus, 64)
    if which == "reference":
        import transformers

        from biogpt_cli import BioGptTokenizer

        tok = BioGptTokenizer.from_folder(folder)
        tok.add_prompt_tokens(RECIPE.prompt_tokens)
        work = updates(ft.encode("pubmedqa", data, tok, 900, 1024))[:count + 1]
        model = transformers.BioGptForCausalLM.from_pretrained(folder)
        model.resize_token_embeddings(tok.vocab_size)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
        step = reference_step(model, opt, device)
    else:
        lora = which == "ours-lora"
        recipe = ft.dataclasses.replace(RECIPE, method="lora" if lora else "full", recompute=lora)  # the defaults
        run = ft.prepare("pubmedqa", str(folder), data, Path("/nonexistent"), recipe, device, {})
        work = updates(run.train)[:count + 1]
        trainer = ft.Trainer(run.model, recipe, run.groups, run.device)
        run.model.train()

        def step(group: list[list[list[int]]]) -> int:
            return trainer.update(group)[1]
    step(work[0])  # warm-up: allocations, oneDNN's or cuBLAS's first calls
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start, tokens = time.perf_counter(), sum(step(group) for group in work[1:])
    sync()
    seconds = time.perf_counter() - start
    gpu = {"gpu_peak_gb": torch.cuda.max_memory_allocated() / 1e9} if device.type == "cuda" else {}
    print(json.dumps({"tokens_per_s": tokens / seconds, "seconds": seconds, "tokens": tokens, **gpu}))


if __name__ == "__main__":
    main()
