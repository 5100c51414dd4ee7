"""Where a greedy decoding step's time goes, per precision, on this machine.

    python benchmarks/step_profile.py [--workdir DIR] [--precision float32 int8 ...] [--tokens N] [--device D]

For the full-size random checkpoint that bench.py builds: milliseconds per token, the kernel the
linear layers run, and torch.profiler's operators by self time. Then the kernel timings that
the loads measured on this CPU (the user cache's kernels.json). What to read before changing a
kernel for a CPU: bench.py says how fast, this says where the time goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import PROMPT, build_checkpoint, kernel_name  # noqa: E402

from biogpt_cli import BioGptForCausalLM, BioGptTokenizer, GenerationOptions, generate  # noqa: E402
from biogpt_cli.linear import cache_dir, is_kernel  # noqa: E402

PRECISIONS = {"float32": {}, "int8": {"quantize": "int8"}, "int4": {"quantize": "int4"},
              "float16": {"dtype": "float16"}, "bfloat16": {"dtype": "bfloat16"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "biogpt-bench")
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=10, help="operators shown per precision")
    args = parser.parse_args()
    folder = args.workdir / "biogpt-random"
    build_checkpoint(folder)
    prompt = BioGptTokenizer.from_folder(folder).encode(PROMPT)
    opts = GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, speculate="off")  # a step a token
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in args.precision:
        if args.device != "cpu" and "quantize" in PRECISIONS[name]:
            continue
        model = BioGptForCausalLM.from_pretrained(folder, device=args.device, rows=1, **PRECISIONS[name])
        with torch.inference_mode():
            generate(model, [prompt], GenerationOptions(max_new_tokens=2))  # one-time set-up
            ms = per_token(model, prompt, opts)
            with torch.profiler.profile(activities=activities) as prof:
                generate(model, [prompt], opts)
            linears, rest = split_linears(model, prompt, opts)
        sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
        print(f"\n== {name}: {ms:.1f} ms per token unprofiled; linear layers: {kernel_name(model)}; the linear "
              f"layers alone, in the model's order: {linears:.1f} ms; the step with them stubbed out (everything "
              f"else): {rest:.1f} ms", flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=args.rows), flush=True)
        del model
    kernels = cache_dir() / "kernels.json"
    if kernels.is_file():
        here = f"torch {torch.__version__} | {torch.get_num_threads()} threads"
        print(f"\nkernel timings measured on this CPU with {here} (ms for 1 and 5 rows; the winner):")
        for key, entry in json.loads(kernels.read_text()).items():
            if here in key:
                print(f"{key}\n    {entry}")


def per_token(model: BioGptForCausalLM, prompt: list[int], opts: GenerationOptions) -> float:
    """Milliseconds per token of greedy decoding, unprofiled."""
    start = time.perf_counter()
    generate(model, [prompt], opts)
    return (time.perf_counter() - start) * 1e3 / opts.max_new_tokens


def split_linears(model: BioGptForCausalLM, prompt: list[int], opts: GenerationOptions) -> tuple[float, float]:
    """A token's time in its linear layers, run alone one after another on one row as a step runs
    them, and the step's time with every linear layer stubbed out (returning zeros): what the rest
    of the step costs (each stub returns one zero tensor per shape, made once: a step never writes into a
    layer's output). Their sum falls short of the step by what each costs the other (caches)."""
    layers = [m for m in model.modules() if is_kernel(m) or type(m) is torch.nn.Linear]
    like = model.biogpt.embed_tokens.weight
    inputs = [torch.randn(1, 1, m.in_features, dtype=like.dtype, device=like.device) for m in layers]
    for _ in range(2):
        start = time.perf_counter()
        for m, x in zip(layers, inputs, strict=True):
            m(x)
        linears = (time.perf_counter() - start) * 1e3
    for m in layers:  # an instance attribute shadows the class's forward
        m.forward = _stub(m.out_features)
    rest = per_token(model, prompt, opts)
    for m in layers:
        del m.forward
    return linears, rest


def _stub(width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear layer that costs next to nothing: zeros of its output's shape, made once per shape
    (a fresh tensor per call would count an allocation that is not the rest of the step's)."""
    made: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], width)
        if shape not in made:
            made[shape] = x.new_zeros(shape)
        return made[shape]
    return forward


if __name__ == "__main__":
    main()
