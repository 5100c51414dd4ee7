"""biogpt-cli against the reference (`transformers`), side by side in one run, on this machine.

    python benchmarks/bench.py [--quick] [--json] [--repeats N] [--new-tokens N] [--workdir DIR] [--compile]

Builds random weights of the full microsoft/biogpt shape (saved once as safetensors with the real
vocabulary from ../shared), then times the same work both ways and prints ratios: absolute times
on a shared machine are noise, ratios measured in one run are the figures. Every figure is the
median of `--repeats` runs. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.conftest's vocabulary helper

from biogpt_cli import BioGptForCausalLM, BioGptTokenizer, GenerationOptions, generate  # noqa: E402
from biogpt_cli.inputs import parallel_map  # noqa: E402
from tests.conftest import shared_dir, write_hub_vocab_from_fairseq  # noqa: E402

PROMPT = "COVID-19 is a disease caused by a coronavirus that was first identified in"


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(ours: Callable[[], object], reference: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of each, run alternately so that both see the same machine load."""
    pairs = [(seconds(ours), seconds(reference)) for _ in range(repeats)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def build_checkpoint(folder: Path) -> None:
    """Random weights of microsoft/biogpt's shape, saved like the Hub does (tied key omitted)."""
    import transformers
    from safetensors.torch import save_file

    if (folder / "model.safetensors").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    shared = shared_dir()
    if shared is None:
        sys.exit("error: the real vocabulary is needed (set BIOGPT_SHARED or put shared/ beside the checkout)")
    write_hub_vocab_from_fairseq(shared / "vocab" / "biogpt", folder)
    torch.manual_seed(0)
    ref = transformers.BioGptForCausalLM(transformers.BioGptConfig())
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "output_projection.weight"}
    save_file(state, folder / "model.safetensors.tmp", metadata={"format": "pt"})
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    ref.config.to_json_file(folder / "config.json")


def decode_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    import transformers

    tok = BioGptTokenizer.from_folder(folder)
    prompt = tok.encode(PROMPT)
    ids = torch.tensor([prompt])
    ref = transformers.BioGptForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = BioGptForCausalLM.from_pretrained(folder)
    n = args.new_tokens
    cases = {
        "greedy decode, float32": ({}, {}),
        "beam search, 5 beams, float32": ({"num_beams": 5}, {"num_beams": 5}),
        "sampling (top-k 50, top-p 0.9), float32": ({"do_sample": True, "top_k": 50, "top_p": 0.9},
                                                     {"do_sample": True, "top_k": 50, "top_p": 0.9}),
    }
    for name, (mine, theirs) in cases.items():
        opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, **mine)
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            t_ours, t_ref = compare(lambda opts=opts, gen=gen: generate(ours, [prompt], opts, gen),
                                    lambda theirs=theirs: ref.generate(ids, attention_mask=torch.ones_like(ids),
                                                                       max_new_tokens=n, min_new_tokens=n, **theirs),
                                    args.repeats)
        rows.append(row(name, n / t_ours, n / t_ref, "tokens/s", higher=True, target=TARGETS.get(name)))
    long = torch.randint(4, 42384, (1, 256))
    long[0, 0] = 2
    with torch.inference_mode():
        t_ours, t_ref = compare(lambda: generate(ours, [long[0].tolist()], GenerationOptions(max_new_tokens=1)),
                                lambda: ref.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=1),
                                args.repeats)
    rows.append(row("prefill, 256-token prompt", t_ours, t_ref, "s", higher=False))
    ref_greedy = next(r["reference"] for r in rows if r["figure"] == "greedy decode, float32")
    variants(folder, ours, prompt, args, rows, ref_greedy)


def variants(folder: Path, fp32: BioGptForCausalLM, prompt: list[int], args: argparse.Namespace, rows: list[dict],
             ref_greedy: float) -> None:
    """int8 / float16 / bfloat16 greedy speed and their quality against float32 on the same weights:
    top-1 agreement and max |logit error| over a teacher-forced sequence (the float32 greedy one)."""
    n = args.new_tokens
    opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n)
    with torch.inference_mode():
        seq = prompt + generate(fp32, [prompt], GenerationOptions(max_new_tokens=args.agreement_tokens,
                                                                  min_new_tokens=args.agreement_tokens))[0][0].ids
        base = fp32(torch.tensor([seq])).logits[0, len(prompt) - 1:].float()
    for label, kwargs, target in (("--quantize int8", {"quantize": "int8"}, "int8"),
                                  ("--dtype float16", {"dtype": "float16"}, "float16"),
                                  ("--dtype bfloat16", {"dtype": "bfloat16"}, None)):
        model = BioGptForCausalLM.from_pretrained(folder, **kwargs)
        with torch.inference_mode():
            t = statistics.median(seconds(lambda model=model: generate(model, [prompt], opts))
                                  for _ in range(args.repeats))
            logits = model(torch.tensor([seq])).logits[0, len(prompt) - 1:].float()
        agree = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
        err = (logits - base).abs().max().item()
        rows.append(row(f"{label} greedy decode (vs reference float32)", n / t, ref_greedy, "tokens/s",
                        higher=True, target=TARGETS.get(target),
                        note=f"top-1 agreement {agree:.1%}, max logit error {err:.3g} (logit std {base.std():.2f})"))
        del model


# Runs a command's Python code, then writes the process's peak resident memory (VmHWM: reset by
# exec, unlike ru_maxrss, which a forked child inherits from this large parent) to argv[1], at
# exit or at os._exit (which `biogpt` uses to skip the interpreter's teardown).
PEAK = """import atexit, os, runpy, sys
out = sys.argv.pop(1)
def peak():
    with open("/proc/self/status") as f, open(out, "w") as o:
        o.write(next(line.split()[1] for line in f if line.startswith("VmHWM")))
atexit.register(peak)
_exit = os._exit
os._exit = lambda code: (peak(), _exit(code))
sys.argv.pop(0)
if sys.argv[0] == "-m":
    sys.argv.pop(0)
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""

REFERENCE_GENERATE = """import sys, transformers as t
folder, prompt = sys.argv[1:3]
tok = t.BioGptTokenizer.from_pretrained(folder)
model = t.BioGptForCausalLM.from_pretrained(folder).eval()
print(tok.decode(model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=1)[0]))
"""


def process_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """Whole processes: start to first token, and peak resident memory, ours vs the reference's."""
    script = args.workdir / "reference_generate.py"
    script.write_text(REFERENCE_GENERATE)
    commands = {"ours": ["-m", "biogpt_cli", "generate", PROMPT, "-m", str(folder), "-n", "1"],
                "reference": [str(script), str(folder), PROMPT]}
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    peaks: dict[str, list[int]] = {"ours": [], "reference": []}
    peak_file = args.workdir / "peak"
    for _ in range(args.repeats):
        for name, command in commands.items():
            peak_file.unlink(missing_ok=True)
            start = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", PEAK, str(peak_file), *command], capture_output=True)
            times[name].append(time.perf_counter() - start)
            if run.returncode:
                sys.exit(f"error: the {name} process failed: {run.stderr.decode()[-800:]}")
            peaks[name].append(int(peak_file.read_text()) * 1024)
    t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["reference"])
    rows.append(row("whole `generate` process to the first token", t_ours, t_ref, "s", higher=False,
                    target=TARGETS["cold start"]))
    weights = (folder / "model.safetensors").stat().st_size
    m_ours, m_ref = statistics.median(peaks["ours"]), statistics.median(peaks["reference"])
    rows.append(row("peak resident memory of generate, float32", m_ours / 1e9, m_ref / 1e9, "GB", higher=False,
                    target=TARGETS["memory"],
                    note=f"ours / weight bytes = {m_ours / weights:.2f} (reference {m_ref / weights:.2f})"))


def tokenizer_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    import functools

    import transformers

    from biogpt_cli.cli import _tokenize_line

    shared = shared_dir()
    lines = (shared / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    lines = lines * (1 if args.quick else 5)
    ref = transformers.BioGptTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ours = BioGptTokenizer.from_folder(folder)
    render = functools.partial(_tokenize_line, ours, True, "ids", "corpus")
    numbered = list(enumerate(lines, 1))
    expected = [" ".join(map(str, ref(x)["input_ids"])) + "\n" for x in lines]
    assert list(parallel_map(render, numbered, 2)) == expected, "tokenizer ids differ from the reference"
    for jobs in (1, 2):
        t, t_ref = compare(lambda jobs=jobs: list(parallel_map(render, numbered, jobs)),
                           lambda: [" ".join(map(str, ref(x)["input_ids"])) + "\n" for x in lines], args.repeats)
        rows.append(row(f"tokenize, --jobs {jobs} ({len(lines)} PubMed lines)", len(lines) / t, len(lines) / t_ref,
                        "lines/s", higher=True, target=TARGETS["tokenize"] if jobs == 2 else None,
                        note="identical ids"))


def compile_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """Why there is no --compile: torch.compile of the decoder (plain weights: it cannot lower the
    prepacked oneDNN kernels), its compile time, and its warm speed against our eager default."""
    n = args.new_tokens
    prompt = BioGptTokenizer.from_folder(folder).encode(PROMPT)
    eager = BioGptForCausalLM.from_pretrained(folder)
    plain = BioGptForCausalLM.from_pretrained(folder, kernels=False)
    compiled = torch.compile(plain, dynamic=True)
    opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n)
    with torch.inference_mode():
        first = seconds(lambda: generate(compiled, [prompt], opts))
        t_compiled, t_eager = compare(lambda: generate(compiled, [prompt], opts),
                                      lambda: generate(eager, [prompt], opts), args.repeats)
    rows.append(row("torch.compile greedy decode (vs our eager default)", n / t_compiled, n / t_eager, "tokens/s",
                    higher=True, note=f"first call, compiling included: {first:.0f} s"))


TARGETS = {
    "greedy decode, float32": ">= 1.6x", "beam search, 5 beams, float32": ">= 3x",
    "sampling (top-k 50, top-p 0.9), float32": ">= 1.6x", "int8": ">= 4x, top-1 >= 99%",
    "float16": ">= 2x, logits within 1e-2", "cold start": "<= 0.5x", "memory": "<= 1.2x weights",
    "tokenize": ">= 1.8x",
}


def row(name: str, ours: float, reference: float, unit: str, higher: bool, target: str | None = None,
        note: str = "") -> dict:
    """`ratio` is always 'how many times better': ours/reference for rates, reference/ours for costs."""
    return {"figure": name, "ours": ours, "reference": reference, "unit": unit,
            "speedup": ours / reference if higher else reference / ours,
            "ratio ours/reference": ours / reference, "target": target or "", "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 16 new tokens, 1x corpus")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--agreement-tokens", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "biogpt-bench",
                        help="where the random full-size checkpoint is kept between runs")
    parser.add_argument("--only", choices=["decode", "process", "tokenize"], action="append")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new_tokens, args.agreement_tokens = 1, 16, 48
    folder = args.workdir / "biogpt-random"
    build_checkpoint(folder)
    rows: list[dict] = []
    # whole processes first, while this process is still small; then the in-process figures
    for part, fn in (("process", process_figures), ("tokenize", tokenizer_figures), ("decode", decode_figures)):
        if not args.only or part in args.only:
            fn(folder, args, rows)
    if args.compile:
        compile_figures(folder, args, rows)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    print(f"{'figure':58} {'ours':>10} {'reference':>10}  {'unit':8} {'better by':>9}  target")
    for r in rows:
        print(f"{r['figure']:58} {r['ours']:10.3f} {r['reference']:10.3f}  {r['unit']:8} {r['speedup']:8.2f}x  "
              f"{r['target']}")
        if r["note"]:
            print(f"{'':60}{r['note']}")


if __name__ == "__main__":
    main()
