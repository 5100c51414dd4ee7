"""biogpt-cli against the reference (`transformers`), side by side in one run, on this machine.

    python benchmarks/bench.py [--quick] [--json] [--repeats N] [--new-tokens N] [--workdir DIR]
                               [--only decode|kernels|process|tokenize|engine|bulk|embed|quality|gpu|serve|
                                       finetune|literature|constraints|speculate]
                               [--device cuda] [--compile]

Builds random weights of the full microsoft/biogpt shape (saved once as safetensors with the real
vocabulary from ../shared), then times the same work both ways and prints ratios: absolute times
on a shared machine are noise, ratios measured in one run are the figures. Every figure is the
median of `--repeats` runs, printed with the machine it ran on (CPU, ISA level, threads, torch,
measured read bandwidth); decode figures also as a share of their bandwidth bound (bytes read per
token / the bandwidth, measured again around each timed run); decoding speed is one token a pass
(`speculate="off"`, as the reference decodes: random weights repeat themselves, which would make
drafts look free), and `--only speculate` measures speculation against it. Not a test: nothing here asserts
a speed. Needs only the runtime dependencies and transformers (the reference), not the test tools.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.fixtures' vocabulary helper (no pytest needed)
sys.path.insert(0, str(ROOT / "benchmarks"))

import machine  # noqa: E402
import quality  # noqa: E402

from biogpt_cli import BioGptForCausalLM, BioGptTokenizer, GenerationOptions, generate  # noqa: E402
from biogpt_cli.inputs import parallel_map  # noqa: E402
from biogpt_cli.linear import PackedLinear, is_kernel  # noqa: E402
from biogpt_cli.scoring import sequence_nll  # noqa: E402
from tests.fixtures import descendants, shared_dir, write_hub_vocab_from_fairseq  # noqa: E402

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


def bounded_compare(ours: Callable[[], object], reference: Callable[[], object], repeats: int,
                    model: torch.nn.Module, device: str, steps: int) -> tuple[float, float, str]:
    """`compare`, with each of our runs set against the read bandwidth measured just before and just
    after it: on a VM the bandwidth moves from second to second (35 to 64 GB/s within one run here),
    so a bound measured at another moment says more about the moment than about the kernel. Returns
    the median times and a note: the median share of the bound at each run's own bandwidth, and the
    share at the best bandwidth seen in the figure's runs (the strictest reading)."""
    runs = []
    for _ in range(repeats):
        before = machine.bandwidth(device=device, repeats=3)
        t = seconds(ours)
        runs.append((t, (before + machine.bandwidth(device=device, repeats=3)) / 2, seconds(reference)))
    t_ours, t_ref = statistics.median(r[0] for r in runs), statistics.median(r[2] for r in runs)
    size = machine.weight_bytes(model)
    share = statistics.median(steps / t / (bw / size) for t, bw, _ in runs)
    typical, best = statistics.median(r[1] for r in runs), max(r[1] for r in runs)
    theirs, strict = steps / t_ref / (typical / size), steps / t_ours / (best / size)
    return t_ours, t_ref, (f"{share:.0%} of the bandwidth bound at each run's bandwidth (median {typical / 1e9:.1f} "
                           f"GB/s; reference {theirs:.0%}), {strict:.0%} at the best of them ({best / 1e9:.1f} GB/s)")


def kernel_name(model: torch.nn.Module) -> str:
    """The kernel the decoder's linear layers run (chosen at load on this CPU)."""
    names = {"packed" + (f"-{m.rows}" if m.rows else "") if isinstance(m, PackedLinear) else type(m).__name__
             for m in model.biogpt.layers.modules() if is_kernel(m)}
    return "+".join(sorted(names)) or "plain F.linear"


def reference_model(folder: Path, device: str, dtype: torch.dtype = torch.float32):
    import transformers

    return transformers.BioGptForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def decode_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    tok = BioGptTokenizer.from_folder(folder)
    prompt = tok.encode(PROMPT)
    ids = torch.tensor([prompt], device=args.device)
    ref = reference_model(folder, args.device)
    ours = BioGptForCausalLM.from_pretrained(folder, device=args.device)
    single = BioGptForCausalLM.from_pretrained(folder, device=args.device, rows=1)  # as `generate PROMPT` loads
    n = args.new_tokens
    cases = {
        "greedy decode, float32": ({}, {}, single),
        "beam search, 5 beams, float32": ({"num_beams": 5}, {"num_beams": 5}, ours),
        "sampling (top-k 50, top-p 0.9), float32": ({"do_sample": True, "top_k": 50, "top_p": 0.9},
                                                     {"do_sample": True, "top_k": 50, "top_p": 0.9}, single),
    }
    with torch.inference_mode():  # one-time set-up (oneDNN primitives, first touches) is no decoding speed
        for model in (ours, single):
            generate(model, [prompt], GenerationOptions(max_new_tokens=2))
        ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2)
    for name, (mine, theirs, model) in cases.items():
        opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, speculate="off", **mine)
        gen = torch.Generator(args.device).manual_seed(0)
        with torch.inference_mode():
            t_ours, t_ref, bound = bounded_compare(
                lambda opts=opts, gen=gen, model=model: generate(model, [prompt], opts, gen),
                lambda theirs=theirs: ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                   min_new_tokens=n, **theirs), args.repeats, model, args.device, n)
        rows.append(row(name, n / t_ours, n / t_ref, "tokens/s", higher=True, target=TARGETS.get(name),
                        note=f"{kernel_name(model)}; {bound}"))
    long = torch.randint(4, 42384, (1, 256), device=args.device)
    long[0, 0] = 2
    # a long prompt runs the kernel chosen for the rows its caller decodes: `generate PROMPT`'s one-row
    # choice, and the batch commands' five-row one
    for label, model in (("prefill, 256-token prompt", single), ("prefill, 256-token prompt, 5-row choice", ours)):
        with torch.inference_mode():
            t_ours, t_ref = compare(
                lambda model=model: generate(model, [long[0].tolist()], GenerationOptions(max_new_tokens=1)),
                lambda: ref.generate(long, attention_mask=torch.ones_like(long), max_new_tokens=1), args.repeats)
        rows.append(row(label, t_ours, t_ref, "s", higher=False, target=TARGETS["prefill"], note=kernel_name(model)))

    def reference_greedy() -> None:
        ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)

    variants(folder, ours, prompt, args, rows, reference_greedy)


def kernel_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """Our CPU kernels (native/) against torch's best on this CPU, per precision, in one run:
    greedy decode on ours with its share of the bandwidth bound; then what the product loads (the
    kernel `choose_kernel` measured fastest, ours or torch's) for 5 beams and for a 256-token
    prompt; and a process's start with the library cached, the first build timed."""
    from unittest import mock

    from biogpt_cli import linear, native

    if native.library() is None:
        sys.exit(f"error: our kernels are unavailable here: {native.unavailable()}")
    prompt = BioGptTokenizer.from_folder(folder).encode(PROMPT)
    long = [2, *torch.randint(4, 42384, (255,), generator=torch.Generator().manual_seed(0)).tolist()]
    n = args.new_tokens
    for precision in ("float32", "int8", "int4"):
        quantize = "none" if precision == "float32" else precision
        ours = "native" if quantize == "none" else f"{quantize}-native"
        for label, rows_decoded, beams in (("greedy decode", 1, 1), ("beam search, 5 beams", None, 5)):
            theirs = load_with(folder, _torch_kernel(folder, quantize, rows_decoded, linear, mock), quantize,
                               rows_decoded, torch_attention=True)
            mine = load_with(folder, ours if beams == 1 else None, quantize, rows_decoded, torch_attention=False)
            opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, speculate="off", num_beams=beams)
            with torch.inference_mode():
                for model in (mine, theirs):
                    generate(model, [prompt], GenerationOptions(max_new_tokens=2))
                t, t_ref, bound = bounded_compare(lambda m=mine, o=opts: generate(m, [prompt], o),
                                                  lambda m=theirs, o=opts: generate(m, [prompt], o),
                                                  args.repeats, mine, "cpu", n)
                what = "ours" if beams == 1 else "the product's choice"
                rows.append(row(f"{label}, {precision}: {what} vs torch's kernels", n / t, n / t_ref, "tokens/s",
                                higher=True, target=KERNEL_TARGETS.get((label, precision), "not slower"),
                                note=f"{mine.kernel} vs {theirs.kernel}; {bound}"))
                if beams == 1:  # a long prompt on the kernel a one-row caller loads (generate PROMPT)
                    chosen = load_with(folder, None, quantize, 1, torch_attention=False)
                    for model in (chosen, theirs):  # the prompt's shapes set up once
                        generate(model, [long], GenerationOptions(max_new_tokens=1))
                    t, t_ref = compare(lambda m=chosen: generate(m, [long], GenerationOptions(max_new_tokens=1)),
                                       lambda m=theirs: generate(m, [long], GenerationOptions(max_new_tokens=1)),
                                       args.repeats)
                    rows.append(row(f"prefill, 256-token prompt, {precision}: the product's choice vs torch's", t,
                                    t_ref, "s", higher=False, target="not slower",
                                    note=f"{chosen.kernel} vs {theirs.kernel}"))
                    del chosen
            del mine, theirs
    start_figures(folder, args, rows)


KERNEL_TARGETS = {("greedy decode", "float32"): ">= 80% of bound", ("greedy decode", "int8"): ">= 75% of bound",
                  ("greedy decode", "int4"): ">= 65% of bound, >= int8"}


def _torch_kernel(folder: Path, quantize: str, rows_decoded: int | None, linear: object, mock: object) -> str:
    """The kernel torch's candidates alone would give (choose_kernel with ours left out)."""
    model = BioGptForCausalLM.from_pretrained(folder, kernels=False)
    layers = [m for m in model.biogpt.layers.modules() if isinstance(m, torch.nn.Linear)]
    with mock.patch.object(linear, "library", lambda: None):
        return linear.choose_kernel(layers, rows_decoded, quantize)


def load_with(folder: Path, kernel: str | None, quantize: str, rows_decoded: int | None,
              torch_attention: bool) -> BioGptForCausalLM:
    """The model on `kernel` (forced; None: the measured choice), with torch's own attention for
    torch's kernels (as before ours)."""
    os.environ["BIOGPT_KERNEL"] = kernel or ""
    try:
        model = BioGptForCausalLM.from_pretrained(folder, rows=rows_decoded, quantize=quantize)
    finally:
        del os.environ["BIOGPT_KERNEL"]
    if torch_attention:
        for layer in model.biogpt.layers:
            vars(layer.self_attn).pop("sdpa", None)
    return model


def start_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """`generate -n 1` as a whole process, our kernels cached vs BIOGPT_NATIVE=0, and the build
    that a machine's first start pays (compiled into an empty cache)."""
    command = [sys.executable, "-m", "biogpt_cli", "generate", PROMPT, "-m", str(folder), "-n", "1", "-v"]
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for _ in range(args.repeats):
        for name, env in (("ours", {}), ("torch", {"BIOGPT_NATIVE": "0"})):
            start = time.perf_counter()
            run = subprocess.run(command, capture_output=True, env={**os.environ, **env})
            times[name].append(time.perf_counter() - start)
            if run.returncode:
                sys.exit(f"error: generate failed: {run.stderr.decode()[-800:]}")
    with tempfile.TemporaryDirectory() as empty:
        code = "from biogpt_cli import native; print(native.describe())"
        built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "BIOGPT_CACHE": empty}).stdout.strip()
    rows.append(row("whole `generate` process to the first token: our kernels (cached) vs torch's",
                    statistics.median(times["ours"]), statistics.median(times["torch"]), "s", higher=False,
                    target="not slower", note=f"a machine's first start: {built}"))


def variants(folder: Path, fp32: BioGptForCausalLM, prompt: list[int], args: argparse.Namespace, rows: list[dict],
             reference_greedy: Callable[[], object]) -> None:
    """int8 / int4 / float16 / bfloat16 greedy speed, each timed alternately with the reference's
    float32 greedy decode (a shared machine's load drifts between cases), and their quality against
    float32 on the same weights: top-1 agreement and max |logit error| over a teacher-forced
    sequence (the float32 greedy one)."""
    n = args.new_tokens
    opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, speculate="off")
    with torch.inference_mode():
        seq = prompt + generate(fp32, [prompt], GenerationOptions(max_new_tokens=args.agreement_tokens,
                                                                  min_new_tokens=args.agreement_tokens))[0][0].ids
        base = fp32(torch.tensor([seq], device=args.device)).logits[0, len(prompt) - 1:].float()
    cases = [("--dtype float16", {"dtype": "float16"}, "float16"),
             ("--dtype bfloat16", {"dtype": "bfloat16"}, "bfloat16")]
    if not args.device.startswith("cuda"):
        cases[:0] = [("--quantize int8", {"quantize": "int8"}, "int8"),
                     ("--quantize int4", {"quantize": "int4"}, "int4")]
    for label, kwargs, target in cases:
        model = BioGptForCausalLM.from_pretrained(folder, device=args.device, rows=1, **kwargs)
        with torch.inference_mode():
            generate(model, [prompt], GenerationOptions(max_new_tokens=2))  # one-time set-up is no decoding speed
            t, t_ref, bound = bounded_compare(lambda model=model: generate(model, [prompt], opts), reference_greedy,
                                              args.repeats, model, args.device, n)
            logits = model(torch.tensor([seq], device=args.device)).logits[0, len(prompt) - 1:].float()
        agree = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
        err = (logits - base).abs().max().item()
        rows.append(row(f"{label} greedy decode (vs reference float32)", n / t, n / t_ref, "tokens/s",
                        higher=True, target=TARGETS.get(target),
                        note=f"{kernel_name(model)}; {bound}; on random weights: "
                             f"top-1 agreement {agree:.1%}, max logit error {err:.3g} (logit std {base.std():.2f})"))
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
                    note=f"ours / weight bytes = {m_ours / weights:.3f} (reference {m_ref / weights:.3f})"))


def finetune_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """`biogpt finetune`'s updates against a plain `transformers` loop on the same micro-batches
    (train_bench.py), each side in a process of its own (peak memory: resident, or the GPU's),
    alternated `--repeats` times."""
    corpus = shared_dir() / "corpus" / "pubmed_abstracts_dev.txt"
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "reference": [], "ours-lora": []}
    peak_file = args.workdir / "peak"
    gpu = args.device != "cpu"
    for _ in range(args.repeats):
        for name in runs:
            peak_file.unlink(missing_ok=True)
            command = [sys.executable, "-c", PEAK, str(peak_file), str(ROOT / "benchmarks" / "train_bench.py"), name,
                       str(folder), str(corpus), "3", args.device]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"error: the {name} training process failed: {run.stderr[-800:]}")
            result = json.loads(run.stdout.splitlines()[-1])
            peak = result["gpu_peak_gb"] if gpu else int(peak_file.read_text()) * 1024 / 1e9
            runs[name].append((result["tokens_per_s"], peak))
    rates = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
    mem = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
    if gpu:
        rows.append(row("GPU fine-tuning, full, bfloat16 autocast (target tokens/s)", rates["ours"],
                        rates["reference"], "tok/s", higher=True, target=">= 1.0x",
                        note=f"GPU peak {mem['ours']:.1f} vs {mem['reference']:.1f} GB; lora {rates['ours-lora']:.0f}"
                             " tok/s"))
        return
    rows.append(row("fine-tuning, full, float32 (target tokens/s)", rates["ours"], rates["reference"], "tok/s",
                    higher=True, target=">= 1.0x", note="micro-batches of 1024 padded tokens, 2 per update"))
    rows.append(row("fine-tuning, full: peak resident memory", mem["ours"], mem["reference"], "GB", higher=False))
    rows.append(row("fine-tuning, --method lora vs full (ours): peak memory", mem["ours-lora"], mem["ours"], "GB",
                    higher=False, target="<= 0.6x", note=f"lora trains at {rates['ours-lora']:.1f} tok/s (recomputing "
                                                          "activations, its default)"))


def engine_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """What the engine costs beside the model, on a tiny model with the real vocabulary: the
    streaming detokenizer's time per token and row with ~700-token prompts against ~20-token ones
    (the "reference" column here is the short prompts), and the peak memory of `generate -i -o`
    over 40,000 prompts against 4,000."""
    from biogpt_cli.streaming import TextStream

    tok = BioGptTokenizer.from_folder(folder)
    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    new = [tok.encode(line, add_special_tokens=False)[:127] for line in lines[100:124]]
    costs = {}
    for size in (20, 700):
        prompts = [tok.encode(" ".join(lines[i:i + 12]))[:size] for i in range(24)]

        def stream_all(prompts: list[list[int]] = prompts) -> None:
            for prompt, ids in zip(prompts, new, strict=True):
                stream = TextStream(tok, prompt)
                for t in ids:
                    stream.add(t)
                stream.finish()
        costs[size] = statistics.median(seconds(stream_all) for _ in range(args.repeats)) / sum(map(len, new))
    rows.append(row("streaming, ms per token and row: ~700-token prompts vs ~20", costs[700] * 1e3, costs[20] * 1e3,
                    "ms", higher=False, target="<= 1.3x the short prompts' (better by >= 0.77)"))
    tiny = tiny_model(args)
    peaks = {}
    for n in (4000, 40000):
        src, out = args.workdir / f"prompts-{n}.txt", args.workdir / f"out-{n}.jsonl"
        src.write_text("".join(f"{lines[i % len(lines)][:60]}\n" for i in range(n)), encoding="utf-8")
        peaks[n] = peak_of(args, ["-m", "biogpt_cli", "generate", "-i", str(src), "-o", str(out), "--force", "-m",
                                  str(tiny), "-n", "1", "--batch-size", "64"])
    rows.append(row("peak memory of generate -i -o: 40,000 prompts vs 4,000", peaks[40000] / 1e6, peaks[4000] / 1e6,
                    "MB", higher=False, target="+ <= 10 MB", note=f"+{(peaks[40000] - peaks[4000]) / 1e6:.1f} MB"))


def constraint_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """What `--constrained` costs (the "reference" column is the same decoding unconstrained):
    building DDI's automaton for a source (its words aligned to the text) up to its first entity's
    tokens (the widest step) against one decoding step at batch 1; the mask of a row step (the
    automaton's allowed tokens and the row's mask) at its 99th percentile over random answers on
    a 1,000-token source, against the 0.5 ms target; and the median time between decoding steps,
    from one model step to the next (the mask, the automata, the choice and the model), at batch 1
    (640-token sources) and 16 (160-token ones), on microsoft/biogpt's shape, on `--device`."""
    import random

    from biogpt_cli import generation
    from biogpt_cli.constraints import Held, allowed_mask
    from biogpt_cli.grammars import DDI_RELATIONS, source_words, task_grammar
    from biogpt_cli.tasks import TASKS, build_input

    tok = BioGptTokenizer.from_folder(folder)
    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    docs = [{"title": "", "abstract": " ".join(lines[i * 12:(i + 1) * 12])} for i in range(16)]
    ours = BioGptForCausalLM.from_pretrained(folder, device=args.device)
    task = TASKS["ddi"]
    head = tok.encode("the interaction between", add_special_tokens=False)

    def grammar(fields: dict, ids: list[int], pieces: list | None = None) -> object:
        g = task_grammar(task, tok, source_words(task, tok, fields, ids, pieces), DDI_RELATIONS)
        state = g.start()
        for t in head:
            state = g.advance(state, t)
        g.allowed(state)
        return g

    times: list[float] = []
    step = generation.Frame.step

    def timed(self: object, *a: object) -> torch.Tensor:
        times.append(time.perf_counter())
        return step(self, *a)

    def per_step(fields: list[dict], prompts: list[list[int]], held: bool) -> float:
        times.clear()
        opts = GenerationOptions(max_new_tokens=24, min_new_tokens=0 if held else 24, speculate="off")  # a step a pass
        with torch.inference_mode():
            generate(ours, prompts, opts, constraints=[grammar(f, p) for f, p in zip(fields, prompts, strict=True)]
                     if held else None)
        return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))

    generation.Frame.step = timed
    free_step = 0.0
    try:
        for batch, size in ((1, 640), (16, 160)):
            prompts = [build_input(task, tok, d, size) for d in docs[:batch]]
            per_step(docs[:batch], prompts, False)  # one-time set-up
            pairs = [(per_step(docs[:batch], prompts, True), per_step(docs[:batch], prompts, False))
                     for _ in range(args.repeats)]
            held, free = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            rows.append(row(f"constrained (DDI) decoding step, batch {batch}, {size}-token sources", held * 1e3,
                            free * 1e3, "ms", higher=False, target="<= 1.10x unconstrained (better by >= 0.91)",
                            note="reference: the same decoding unconstrained"))
            free_step = free_step or free
    finally:
        generation.Frame.step = step
    long = {"title": "", "abstract": " ".join(lines[:40])}
    pieces = tok.encode_words(task.source(long))  # the input's own tokenization, which a plain run does too
    ids = build_input(task, tok, long, 1000, pieces)
    build = statistics.median(seconds(lambda: grammar(long, ids, pieces)) for _ in range(args.repeats))
    rows.append(row("DDI automaton for a 1,000-token source (words aligned) vs one step", build * 1e3, free_step * 1e3,
                    "ms", higher=False, target="well under one step",
                    note="reference: one unconstrained decoding step at batch 1, 640-token source"))
    g, rng, costs = task_grammar(task, tok, source_words(task, tok, long, ids, pieces), DDI_RELATIONS, 374), \
        random.Random(0), []
    for _ in range(200):  # random answers: every step's allowed tokens, its mask, the advance
        held = Held(g)
        while True:
            start = time.perf_counter()
            allowed_mask([held], ours.config.vocab_size, torch.device("cpu"))
            cost = time.perf_counter() - start
            t = rng.choice(held.allowed())  # the model's choice, not timed
            start = time.perf_counter()
            held.advance(t)
            costs.append(cost + time.perf_counter() - start)
            if t == 2:
                break
    costs.sort()
    rows.append(row(f"DDI mask per row step, 99th percentile of {len(costs)} steps, 1,000-token source",
                    costs[int(len(costs) * 0.99)] * 1e3, 0.5, "ms", higher=False, target="<= 0.5 ms (p99)",
                    note=f"reference: the target; median {statistics.median(costs) * 1e3:.3f} ms"))


def speculate_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """Speculation (`--speculate`) against `off` (the "reference" column: the same engine feeding
    one token a pass), in one run on microsoft/biogpt's shape: constrained task answers one
    document at a time; free text, greedy, one prompt, with each draft source; what a forward pass
    of K new tokens costs against one; acceptance on a small trained model (random weights say
    nothing of it); and the server under 16 concurrent clients."""

    from biogpt_cli.grammars import source_words, task_grammar
    from biogpt_cli.tasks import TASKS, build_input

    tok = BioGptTokenizer.from_folder(folder)
    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    ours = BioGptForCausalLM.from_pretrained(folder, device=args.device)
    cases = {"extract --constrained (BC5CDR)": ("bc5cdr", [{"title": lines[2 * i][:120], "abstract": lines[2 * i + 1]}
                                                         for i in range(4)]),
             "qa --constrained (PubMedQA)": ("pubmedqa", [{"question": lines[i][:100] + "?", "context": lines[i + 9]}
                                                         for i in range(4)])}
    opts = GenerationOptions(max_new_tokens=48, bad_words_ids=[[1]])
    for name, (task_name, docs) in cases.items():
        task = TASKS[task_name]
        inputs = [build_input(task, tok, d, 600) for d in docs]
        words = [source_words(task, tok, d, ids) if task.result == "relations" else () for d, ids in zip(docs, inputs,
                                                                                                       strict=True)]

        def answers(setting: str = "auto", inputs: list = inputs, words: list = words, task: object = task) -> list:
            with torch.inference_mode():
                return [generate(ours, [ids], replace(opts, speculate=setting),
                                 constraints=[task_grammar(task, tok, w, (), 48)])[0][0].ids
                        for ids, w in zip(inputs, words, strict=True)]

        fast = answers()
        assert answers("off") == fast, "speculation changed an answer"
        off = statistics.median(seconds(lambda: answers("off")) for _ in range(args.repeats))
        on = statistics.median(seconds(answers) for _ in range(args.repeats))
        with torch.inference_mode():  # the prompts' prefill and first choice, which both pay alike
            first = statistics.median(seconds(lambda inputs=inputs: [generate(ours, [i], GenerationOptions(
                max_new_tokens=1)) for i in inputs]) for _ in range(args.repeats))
        n = sum(len(a) + 1 for a in fast)
        rows.append(row(f"{name}, batch 1: tokens/s, --speculate auto", n / on, n / off, "tokens/s",
                        higher=True, target=">= 2x", note=f"{n} tokens over {len(docs)} answers, identical; reference: "
                        "--speculate off; prefill included; random weights (their entities are chosen at random, "
                        "so a draft copied from the source is seldom kept)"))
        rows.append(row(f"{name}, batch 1: tokens/s after the prefill", (n - len(docs)) / (on - first),
                        (n - len(docs)) / (off - first), "tokens/s", higher=True, target=">= 2x",
                        note=f"the prompts' prefill and first token ({first:.2f} s) left out of both"))
    free_text_figures(ours, tok, lines, args, rows)
    verify_costs(ours, tok, lines, args, rows)
    acceptance_figures(folder, lines, args, rows)
    speculating_server(folder, args, rows)


def free_text_figures(ours: BioGptForCausalLM, tok: BioGptTokenizer, lines: list[str], args: argparse.Namespace,
                      rows: list[dict]) -> None:
    """Free text, greedy, float32, one prompt at a time: each draft source against `off`, the same
    tokens, with the share of drafted tokens kept. Random weights repeat themselves (lookup), and
    their near-flat logits disagree with a quantized copy: acceptance is on the trained model."""

    from biogpt_cli.drafts import DraftStats
    from biogpt_cli.generation import stream_tokens

    prompts = [[2, *tok.encode(line, add_special_tokens=False)[:200]] for line in lines[20:24]]
    opts = GenerationOptions(max_new_tokens=64)

    def texts(setting: str, stats: object = None) -> list:
        with torch.inference_mode():
            return [[t for _, t, r in stream_tokens(ours, [p], replace(opts, speculate=setting), stats=stats)
                     if r is None] for p in prompts]

    base = texts("off")
    off = statistics.median(seconds(lambda: texts("off")) for _ in range(args.repeats))
    n = sum(map(len, base))
    for setting in ("auto", "ngram", "int8", "int4"):
        stats = DraftStats()
        assert texts(setting, stats) == base, f"--speculate {setting} changed the tokens"
        on = statistics.median(seconds(lambda s=setting: texts(s)) for _ in range(args.repeats))
        rows.append(row(f"generate, greedy, one prompt: tokens/s, --speculate {setting}", n / on, n / off, "tokens/s",
                        higher=True, note=f"{stats.line()}; random weights; reference: --speculate off"))


def verify_costs(ours: BioGptForCausalLM, tok: BioGptTokenizer, lines: list[str], args: argparse.Namespace,
                 rows: list[dict]) -> None:
    """What one forward pass of K new tokens over a cached 600-token prompt costs against one
    token (float32), and one token of the int8 and int4 copies that draft: with an acceptance a,
    a pass keeps 1 + a + ... + a^K tokens on average, so the speed at any acceptance can be read off."""
    from biogpt_cli.drafts import draft_model

    prompt = torch.tensor([[2, *tok.encode(" ".join(lines[:10]), add_special_tokens=False)[:599]]])

    def cost(model: torch.nn.Module, k: int) -> float:
        best = 1e9
        for _ in range(args.repeats):
            cache = model.new_cache(1, 600 + k)
            with torch.inference_mode():
                model(prompt, past_key_values=cache, logits_to_keep=1)
                start = time.perf_counter()
                model(prompt[:, -k:], past_key_values=cache, logits_to_keep=k)
                best = min(best, time.perf_counter() - start)
        return best

    one = cost(ours, 1)
    for k in range(2, 9):
        c = cost(ours, k)
        rows.append(row(f"a forward pass of {k} new tokens vs 1, 600 cached", c * 1e3, one * 1e3, "ms",
                        higher=False, note=f"{c / one:.2f}x the cost of one token for {k} tokens"))
    for precision in ("int8", "int4"):
        c = cost(draft_model(ours, precision), 1)
        rows.append(row(f"a drafting step of the {precision} copy vs a float32 step", c * 1e3, one * 1e3, "ms",
                        higher=False, note="one token, 600 cached; self-drafting K tokens costs K of these"))


def acceptance_figures(folder: Path, lines: list[str], args: argparse.Namespace, rows: list[dict]) -> None:
    """Acceptance where it means something: the small model `quality` trains on the corpus (the
    same text as `--only quality`), continuations of held-out lines, 48 tokens each, per draft
    source: drafted tokens kept, and tokens a pass (its tokens/s is engine overhead). Greedy, and
    sampled at temperature 0.8 (seeded): so small a model's greedy text soon repeats itself."""
    from biogpt_cli.drafts import DraftStats
    from biogpt_cli.generation import prompt_generator, stream_tokens

    trained = quality.train(folder, lines, args.workdir / "quality-model")
    model, tok = BioGptForCausalLM.from_pretrained(trained), BioGptTokenizer.from_folder(trained)
    prompts = [tok.encode(line)[:24] for line in lines[-40:]]
    for mode, opts in (("greedy", GenerationOptions(max_new_tokens=48)),
                       ("sampled", GenerationOptions(max_new_tokens=48, do_sample=True, temperature=0.8, top_k=0))):
        for setting in ("ngram", "int8", "int4"):
            stats, repeats = DraftStats(), 0
            with torch.inference_mode():
                for i, p in enumerate(prompts):
                    new = [t for _, t, r in stream_tokens(model, [p], replace(opts, speculate=setting),
                                                          lambda j, i=i: prompt_generator(0, i), stats=stats)
                           if r is None]
                    repeats += len(new) - len(set(zip(new, new[1:], new[2:], strict=False)))
            rows.append(row(f"trained small model, {mode}, --speculate {setting}: drafted tokens kept",
                            stats.kept / max(stats.drafted, 1), 1.0, "share", higher=True,
                            note=f"{stats.line()}; {len(prompts)} held-out prompts; {repeats} of {stats.tokens} new "
                                 "tokens continue a 3-gram the text already had; reference: all kept"))


def speculating_server(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """16 concurrent clients (greedy, 32 tokens, streamed) on `serve --speculate auto` against
    `serve --speculate off`: under load, speculation must not make the server slower."""
    from concurrent.futures import ThreadPoolExecutor

    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    rates = {}
    for setting in ("off", "auto"):
        with served(folder, args, ["--speculate", setting]) as (client, model):
            def ask(i: int, client: object = client, model: str = model) -> int:
                return client.completions.create(model=model, prompt=" ".join(lines[i].split()[:12]), max_tokens=32,
                                                 temperature=0).usage.completion_tokens
            def together(pool: ThreadPoolExecutor, ask: Callable[[int], int] = ask) -> float:
                start = time.perf_counter()
                return sum(pool.map(ask, range(16))) / (time.perf_counter() - start)
            ask(0)  # warm
            with ThreadPoolExecutor(16) as pool:
                rates[setting] = statistics.median(together(pool) for _ in range(args.repeats))
    rows.append(row("serve, 16 concurrent clients x 32 tokens: --speculate auto", rates["auto"], rates["off"],
                    "tokens/s", higher=True, target="not slower", note="reference: serve --speculate off"))


def tiny_model(args: argparse.Namespace) -> Path:
    """A tiny random model with the real vocabulary (what the engine costs beside the model)."""
    tiny = args.workdir / "tiny-real-vocab"
    if not (tiny / "model.safetensors").is_file():
        import transformers
        from safetensors.torch import save_file

        tiny.mkdir(parents=True, exist_ok=True)
        write_hub_vocab_from_fairseq(shared_dir() / "vocab" / "biogpt", tiny)
        config = transformers.BioGptConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128)
        state = transformers.BioGptForCausalLM(config).state_dict()
        save_file({k: v.contiguous() for k, v in state.items() if k != "output_projection.weight"},
                  tiny / "model.safetensors", metadata={"format": "pt"})
        config.to_json_file(tiny / "config.json")
    return tiny


def peak_of(args: argparse.Namespace, command: list[str]) -> int:
    """Peak resident bytes of `python COMMAND...` in a process of its own."""
    peak = args.workdir / "peak"
    run = subprocess.run([sys.executable, "-c", PEAK, str(peak), *command], capture_output=True)
    if run.returncode:
        sys.exit(f"error: {' '.join(command[:4])} failed: {run.stderr.decode()[-800:]}")
    return int(peak.read_text()) * 1024


def literature_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """PubMed XML as a baseline file holds it (`.xml.gz`, citations of real PubMed titles and
    abstracts with the authors, MeSH headings and references a citation carries): our streamed,
    guarded parse (literature.py: defusedxml, each citation read into a record) against the standard
    library's unguarded `iterparse` that only walks the elements (the "reference": what a home-made
    parser costs at the least), one core; and the peak memory of `embed -i FILE.xml.gz -o` over
    30,000 citations against 3,000 (tiny model)."""
    import gzip
    import io
    import xml.etree.ElementTree as ET

    from biogpt_cli.literature import documents

    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    files = {n: args.workdir / f"pubmed-{n}.xml.gz" for n in (3000, 30000)}
    for n, path in files.items():
        if not path.is_file():
            path.write_bytes(gzip.compress(baseline_xml(lines, n).encode(), compresslevel=6))
    data = gzip.decompress(files[30000].read_bytes())

    def ours() -> int:
        return sum(1 for _ in documents(io.BytesIO(data), "x.xml", "pubmed"))

    def reference() -> int:
        found = 0
        for _, element in ET.iterparse(io.BytesIO(data)):
            if element.tag == "PubmedArticle":
                found += 1
                element.clear()
        return found
    assert ours() == reference() == 30000
    t_ours, t_ref = compare(ours, reference, args.repeats)
    rows.append(row("PubMed XML parse, 30,000 citations (one core)", 30000 / t_ours, 30000 / t_ref, "citations/s",
                    higher=True, target=">= 5,000 citations/s",
                    note=f"{len(data) / 30000 / 1e3:.1f} kB a citation; reference: the standard library's unguarded "
                         "iterparse walking the elements, no record made"))
    tiny, peaks = tiny_model(args), {}
    for n, path in files.items():
        peaks[n] = peak_of(args, ["-m", "biogpt_cli", "embed", "-i", str(path), "-o", str(args.workdir / "e.jsonl"),
                                  "--force", "-m", str(tiny), "--truncate", "-q"])
    rows.append(row("peak memory of embed -i FILE.xml.gz -o: 30,000 citations vs 3,000", peaks[30000] / 1e6,
                    peaks[3000] / 1e6, "MB", higher=False, target="+ <= 50 MB",
                    note=f"+{(peaks[30000] - peaks[3000]) / 1e6:.1f} MB"))


def baseline_xml(lines: list[str], n: int) -> str:
    """`n` citations shaped as PubMed's baseline files hold them, titles and abstracts from the corpus."""
    from xml.sax.saxutils import escape

    authors = "".join(f"<Author ValidYN=\"Y\"><LastName>Author{k}</LastName><ForeName>A</ForeName><Initials>A"
                      f"</Initials><AffiliationInfo><Affiliation>Department {k}, University Hospital, City, Country."
                      "</Affiliation></AffiliationInfo></Author>" for k in range(6))
    mesh = "".join(f'<MeshHeading><DescriptorName UI="D00{k:04d}" MajorTopicYN="N">Heading {k}</DescriptorName>'
                   f'<QualifierName UI="Q00000{k % 9}" MajorTopicYN="N">qualifier</QualifierName></MeshHeading>'
                   for k in range(12))
    refs = "".join(f'<Reference><Citation>Ref {k}. J Test. 2019;1:1-9.</Citation><ArticleIdList><ArticleId '
                   f'IdType="pubmed">{k + 1000}</ArticleId></ArticleIdList></Reference>' for k in range(15))
    body = []
    for i in range(n):
        text = lines[i % len(lines)]
        title, abstract = escape(text[:text.find(". ") + 1] or text[:120]), escape(text)
        body.append(f'<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="1">{i + 1}</PMID>'
                    f'<Article PubModel="Print"><Journal><Title>Journal of Tests</Title></Journal>'
                    f"<ArticleTitle>{title}</ArticleTitle><Abstract><AbstractText>{abstract}</AbstractText></Abstract>"
                    f'<AuthorList CompleteYN="Y">{authors}</AuthorList><Language>eng</Language></Article>'
                    f"<MeshHeadingList>{mesh}</MeshHeadingList></MedlineCitation><PubmedData><ArticleIdList>"
                    f'<ArticleId IdType="pubmed">{i + 1}</ArticleId></ArticleIdList><ReferenceList>{refs}'
                    "</ReferenceList></PubmedData></PubmedArticle>\n")
    return '<?xml version="1.0" encoding="utf-8"?>\n<PubmedArticleSet>\n' + "".join(body) + "</PubmedArticleSet>\n"


def tokenizer_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    import functools

    import transformers

    from biogpt_cli.cli.text import _tokenize_line
    from biogpt_cli.inputs import Prompt

    shared = shared_dir()
    lines = (shared / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    lines = lines * (1 if args.quick else 5)
    ref = transformers.BioGptTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ours = BioGptTokenizer.from_folder(folder)
    render = functools.partial(_tokenize_line, ours, True, "ids", "corpus")
    numbered = [Prompt(n, line) for n, line in enumerate(lines, 1)]
    expected = [" ".join(map(str, ref(x)["input_ids"])) + "\n" for x in lines]
    assert list(parallel_map(render, numbered, 2)) == expected, "tokenizer ids differ from the reference"
    for jobs in (1, 2):
        t, t_ref = compare(lambda jobs=jobs: list(parallel_map(render, numbered, jobs)),
                           lambda: [" ".join(map(str, ref(x)["input_ids"])) + "\n" for x in lines], args.repeats)
        rows.append(row(f"tokenize, --jobs {jobs} ({len(lines)} PubMed lines)", len(lines) / t, len(lines) / t_ref,
                        "lines/s", higher=True, target=TARGETS["tokenize"] if jobs == 2 else None,
                        note="identical ids"))


def bulk_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """Many prompts: `generate -i`'s engine against the reference's batched generate() (batch 8,
    left padding), and scoring lines against the reference's loss per line."""
    from biogpt_cli.batch import Job, default_batch_size, run

    tok = BioGptTokenizer.from_folder(folder)
    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    prompts = [tok.encode(" ".join(line.split()[:4 + 3 * (i % 8)])) for i, line in enumerate(lines[:64])]
    n = 16 if args.quick else 64
    ref = reference_model(folder, args.device)
    ours = BioGptForCausalLM.from_pretrained(folder, device=args.device)
    opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, speculate="off")
    sink = type("Sink", (), {"begin": lambda self, p: None, "add": lambda self, p: None,
                             "event": lambda self, ev: None})()
    jobs = [Job(("line", i + 1), p) for i, p in enumerate(prompts)]

    def reference() -> None:
        for k in range(0, len(prompts), 8):
            chunk = prompts[k:k + 8]
            width = max(map(len, chunk))
            ids = torch.tensor([[1] * (width - len(p)) + p for p in chunk], device=args.device)
            ref.generate(ids, attention_mask=(ids != 1).long(), max_new_tokens=n, min_new_tokens=n, pad_token_id=1)

    with torch.inference_mode():  # ours at the default batch size and at 8, alternating with the reference
        times = [(seconds(lambda: run(ours, tok, jobs, opts, sink)),
                  seconds(lambda: run(ours, tok, jobs, opts, sink, batch_size=8)), seconds(reference))
                 for _ in range(args.repeats)]
    t_ours, t_eight, t_ref = (statistics.median(t[k] for t in times) for k in range(3))
    total = len(prompts) * n
    rows.append(row(f"bulk generate, {len(prompts)} prompts x {n} new tokens", total / t_ours, total / t_ref,
                    "tokens/s", higher=True, target=TARGETS["bulk"],
                    note=f"ours at the default --batch-size ({default_batch_size(opts, args.device)})"))
    rows.append(row("bulk generate, ours at --batch-size 8 too", total / t_eight, total / t_ref, "tokens/s",
                    higher=True))
    texts = [tok.encode(line)[:256] for line in lines[:128]]
    loss = torch.nn.CrossEntropyLoss(reduction="none")

    def reference_scores() -> None:
        for k in range(0, len(texts), 8):
            chunk = texts[k:k + 8]
            width = max(map(len, chunk))
            ids = torch.tensor([p + [1] * (width - len(p)) for p in chunk], device=args.device)
            logits = ref(ids, attention_mask=(ids != 1).long()).logits
            loss(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    with torch.inference_mode():
        t_ours, t_ref = compare(lambda: [sequence_nll(ours, texts[k:k + 8]) for k in range(0, len(texts), 8)],
                                reference_scores, args.repeats)
    rows.append(row(f"score, {len(texts)} PubMed lines (batch 8)", len(texts) / t_ours, len(texts) / t_ref,
                    "lines/s", higher=True))


def gpu_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """On a GPU, against both of the reference's paths: eager `generate()` and its static cache
    (`cache_implementation="static"`, which compiles its step: its warm-up is noted, not timed).
    One prompt's greedy decode in float32, bfloat16 and float16 (ours replays a captured step),
    and bulk, 64 prompts of 5-40 tokens x 64 new tokens, at batch 64 for all, in float32 and
    bfloat16."""
    import random

    rng = random.Random(0)
    bulk = [[2] + [rng.randrange(4, 40000) for _ in range(rng.randrange(4, 40))] for _ in range(64)]
    for dtype in ("float32", "bfloat16", "float16"):
        gpu_dtype_figures(folder, args, rows, dtype, bulk)
        torch.cuda.empty_cache()


def gpu_dtype_figures(folder: Path, args: argparse.Namespace, rows: list[dict], dtype: str,
                      bulk: list[list[int]]) -> None:
    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        return lambda: (fn(), torch.cuda.synchronize())

    ref = reference_model(folder, args.device, getattr(torch, dtype))
    ours = BioGptForCausalLM.from_pretrained(folder, device=args.device, dtype=dtype)
    prompt, n = BioGptTokenizer.from_folder(folder).encode(PROMPT), args.new_tokens
    ids = torch.tensor([prompt], device=args.device)
    greedy = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
    opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, speculate="off")
    paths = {"eager": {}} if dtype == "float16" else {"eager": {}, "static cache": {"cache_implementation": "static"}}
    for path, extra in paths.items():
        try:
            with torch.inference_mode():
                warm = seconds(synced(lambda extra=extra: [ref.generate(ids, **greedy, **extra) for _ in range(2)]))
                mine = seconds(lambda: generate(ours, [prompt], opts))
                t_ours, t_ref = compare(synced(lambda: generate(ours, [prompt], opts)),
                                        synced(lambda extra=extra: ref.generate(ids, **greedy, **extra)), args.repeats)
        except Exception as e:  # noqa: BLE001 -- a reference path this transformers cannot run is noted, not fatal
            print(f"GPU one prompt, {dtype}, reference {path}: failed ({type(e).__name__}: {str(e)[:200]})")
            continue
        rows.append(row(f"GPU one prompt greedy, {dtype}, vs reference {path}", n / t_ours, n / t_ref, "tokens/s",
                        higher=True, note=f"{n} new tokens; reference warm-up {warm:.1f} s, ours {mine:.1f} s"))
    if dtype == "float16":
        return
    width = max(map(len, bulk))
    padded = torch.tensor([[1] * (width - len(p)) + p for p in bulk], device=args.device)
    o64 = GenerationOptions(max_new_tokens=64, min_new_tokens=64, speculate="off")
    for path, extra in paths.items():
        theirs = {"attention_mask": (padded != 1).long(), "max_new_tokens": 64, "min_new_tokens": 64,
                  "do_sample": False, "pad_token_id": 1, **extra}
        try:
            with torch.inference_mode():
                warm = seconds(synced(lambda theirs=theirs: [ref.generate(padded, **theirs) for _ in range(2)]))
                generate(ours, bulk[:2], GenerationOptions(max_new_tokens=2))
                t_ours, t_ref = compare(synced(lambda: generate(ours, bulk, o64)),
                                        synced(lambda theirs=theirs: ref.generate(padded, **theirs)), args.repeats)
        except Exception as e:  # noqa: BLE001 -- as above
            print(f"GPU bulk, {dtype}, reference {path}: failed ({type(e).__name__}: {str(e)[:200]})")
            continue
        rows.append(row(f"GPU bulk {len(bulk)} prompts x 64 tokens, {dtype}, vs reference {path} (batch {len(bulk)})",
                        len(bulk) * 64 / t_ours, len(bulk) * 64 / t_ref, "tokens/s", higher=True,
                        note=f"reference warm-up {warm:.1f} s"))


@contextlib.contextmanager
def served(folder: Path, args: argparse.Namespace, options: list[str] = ()) -> Iterator[tuple[object, str]]:
    """`biogpt serve` in its own process on a loopback port, and an `openai` client for it."""
    import socket
    import urllib.request

    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "biogpt_cli", "serve", "-m", str(folder), "--port", str(port), "--device",
               args.device, "--quiet", *options]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("biogpt serve did not start") from None
                time.sleep(0.5)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600), \
            str(folder)
    finally:
        server.terminate()
        server.wait(30)


def serve_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """`biogpt serve` under load: the command in its own process on a loopback port, the `openai`
    client from 1, 4, 8 and 16 threads (fixed prompts, 32 new tokens, greedy, streamed), against
    the same requests sent one at a time (the "reference" column). Aggregate new tokens/s; p50/p95
    latency and time to first token in the note."""
    from concurrent.futures import ThreadPoolExecutor

    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    with served(folder, args) as (client, model):
        def ask(i: int) -> tuple[float, float]:
            """A streamed request's latency and time to its first text."""
            start, first = time.perf_counter(), None
            for chunk in client.completions.create(model=model, prompt=" ".join(lines[i].split()[:12]),
                                                   max_tokens=32, temperature=0, stream=True):
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - start
            return time.perf_counter() - start, first or 0.0

        def p50_p95(values: list[float]) -> str:
            values = sorted(values)
            p95 = values[min(len(values) - 1, int(0.95 * len(values)))]
            return f"p50 {values[len(values) // 2]:.1f} s, p95 {p95:.1f} s"

        for n in (1, 4, 8, 16):
            alone = seconds(lambda n=n: [ask(i) for i in range(n)])
            with ThreadPoolExecutor(n) as pool:
                start = time.perf_counter()
                answers = list(pool.map(ask, range(n)))
                together = time.perf_counter() - start
            rows.append(row(f"serve, {n} concurrent clients x 32 tokens (vs one at a time)", n * 32 / together,
                            n * 32 / alone, "tokens/s", higher=True, target=">= 4x at 8, >= 6x at 16",
                            note=f"latency {p50_p95([a[0] for a in answers])}; first token "
                                 f"{p50_p95([a[1] for a in answers])}"))
        short_while_busy(client, model, lines, rows)
        beam_requests(client, model, lines, folder, rows)


def beam_requests(client: object, model: str, lines: list[str], folder: Path, rows: list[dict]) -> None:
    """4 clients at once asking for beam search (`use_beam_search`, n 5, 32 tokens), against the
    library's `generate` with `--num-beams 5 --num-return-sequences 5`'s settings, one prompt at a
    time in this process: new tokens/s of all the sequences returned."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [" ".join(lines[40 + i].split()[:12]) for i in range(4)]

    def ask(prompt: str) -> int:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=32, temperature=0, n=5,
                                        extra_body={"use_beam_search": True})
        return out.usage.completion_tokens

    with ThreadPoolExecutor(4) as pool:
        start = time.perf_counter()
        served = sum(pool.map(ask, prompts))
        together = time.perf_counter() - start
    lm, tok = BioGptForCausalLM.from_pretrained(folder), BioGptTokenizer.from_folder(folder)
    opts = GenerationOptions(max_new_tokens=32, num_beams=5, num_return_sequences=5)
    start, made = time.perf_counter(), 0
    with torch.inference_mode():
        for prompt in prompts:
            made += sum(len(s.ids) for s in generate(lm, [tok.encode(prompt)], opts)[0])  # as usage counts
    alone = time.perf_counter() - start
    rows.append(row("serve, 4 clients x beam search (n 5, 32 tokens) vs generate one at a time", served / together,
                    made / alone, "tokens/s", higher=True, note="requests of the same beam settings share fixed "
                    "batches; the reference column is the library's generate(), one prompt at a time, in process"))


def short_while_busy(client: object, model: str, lines: list[str], rows: list[dict]) -> None:
    """A 1-token request sent while 16 streams of 64 tokens run: its latency (p95 of 5, one after
    another) against the same request on an idle server; the note gives the busy batch's step."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(i: int, tokens: int) -> float:
        start = time.perf_counter()
        client.completions.create(model=model, prompt=" ".join(lines[i].split()[:12]), max_tokens=tokens,
                                  temperature=0)
        return time.perf_counter() - start

    idle = statistics.median(ask(40 + i, 1) for i in range(5))
    with ThreadPoolExecutor(16) as pool:
        long = [pool.submit(ask, i, 64) for i in range(16)]
        time.sleep(16 * idle + 1)  # every long stream has had its prefill and is decoding now
        busy = sorted(ask(40 + i, 1) for i in range(5))
        step = max(f.result() for f in long) / 64
    rows.append(row("serve, a 1-token request while 16 streams of 64 tokens run (vs an idle server)", busy[-1], idle,
                    "s", higher=False, target="<= 2 steps of the batch + its own prefill",
                    note=f"p95 of 5 (p50 {busy[2]:.2f} s); the busy batch's step about {step:.2f} s"))


def embed_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """`embed`'s mean pooling of PubMed abstracts (their first 80 words), float32 and int8, against
    the reference's `BioGptModel` on the same batches of 8, padded, pooled the same way."""
    import transformers

    from biogpt_cli import BioGptModel
    from biogpt_cli.scoring import embed

    tok = BioGptTokenizer.from_folder(folder)
    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    texts = [tok.encode(" ".join(line.split()[:80])) for line in lines[:32]]
    ref = transformers.BioGptModel.from_pretrained(folder).to(args.device).eval()

    def reference() -> torch.Tensor:
        out = []
        for k in range(0, len(texts), 8):
            chunk = texts[k:k + 8]
            width = max(map(len, chunk))
            ids = torch.tensor([p + [1] * (width - len(p)) for p in chunk], device=args.device)
            mask = (ids != 1).long()
            hidden = ref(ids, attention_mask=mask).last_hidden_state
            mask[:, 0] = 0  # the leading </s>, as embed leaves it out
            out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        return torch.cat(out).cpu()

    with torch.inference_mode():
        expected = reference()
        for label, quantize in (("float32", "none"), ("--quantize int8", "int8")):
            ours = BioGptModel.from_pretrained(folder, device=args.device, kernels=True, quantize=quantize)
            embed(ours, texts[:8])  # one-time set-up
            t_ours, t_ref = compare(lambda ours=ours: embed(ours, texts), reference, args.repeats)
            cosine = torch.nn.functional.cosine_similarity(embed(ours, texts), expected).min().item()
            rows.append(row(f"embed {label}, {len(texts)} abstracts (80 words, batch 8)", len(texts) / t_ours,
                            len(texts) / t_ref, "texts/s", higher=True,
                            note=f"vs the reference in float32; cosine to its vectors >= {cosine:.4f}"))


def _tree_pss(root: int) -> int:
    """Proportional set size (bytes) of a process and all its descendants (Ray's daemons included)."""
    total = 0
    for pid in {root} | descendants(root):
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                          if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration):
            continue
    return total


def ray_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """`generate` over the same JSONL as one plain process and as a local 2-CPU Ray run (one
    worker): records per second and peak memory of the whole process tree (PSS)."""
    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    n = 16 if args.quick else 64
    data = args.workdir / "ray-input.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": " ".join(line.split()[:8])}) + "\n"
                            for i, line in enumerate(lines[:n])))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    measured = {}
    for name, extra in (("plain", ["-o", str(args.workdir / "plain.jsonl"), "--force"]),
                        ("ray", ["--engine", "ray", "--workers", "1", "-o", str(args.workdir / "ray-out")])):
        subprocess.run(["rm", "-rf", str(args.workdir / "ray-out")], check=True)
        command = [sys.executable, "-m", "biogpt_cli", "generate", "-m", str(folder), "-n", "16", "-i", str(data),
                   *extra]
        start, peak = time.perf_counter(), 0
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None:
            peak = max(peak, _tree_pss(proc.pid))
            time.sleep(0.25)
        if proc.returncode:
            sys.exit(f"error: the {name} run failed: {proc.stderr.read().decode()[-800:]}")
        measured[name] = (n / (time.perf_counter() - start), peak)
    (ray_rate, ray_peak), (plain_rate, plain_peak) = measured["ray"], measured["plain"]
    rows.append(row(f"Ray (local, 2 CPUs, 1 worker) vs one process, {n} prompts x 16 tokens", ray_rate, plain_rate,
                    "records/s", higher=True, note=f"whole processes; peak memory (PSS of the process tree) "
                    f"{ray_peak / 1e9:.2f} GB with Ray, {plain_peak / 1e9:.2f} GB without"))


def quality_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    lines = (shared_dir() / "corpus" / "pubmed_abstracts_dev.txt").read_text(encoding="utf-8").splitlines()
    trained = quality.train(folder, lines, args.workdir / "quality-model")
    for r in quality.measure(trained, lines):
        goal = next((g for p, g in (("--quantize int8", "<= +1%"), ("--quantize int4", "<= +5%"))
                     if r["precision"].startswith(p)), "")
        rows.append(row(f"{r['precision']}: held-out perplexity (trained model)", r["perplexity"],
                        r["perplexity"] / (1 + r["vs_float32"]), "ppl", higher=False, target=goal,
                        note=f"{r['vs_float32']:+.2%} vs float32, top-1 agreement {r['top1_agreement']:.1%}; "
                        f"{r['batched_differs']} of {r['batched']} prompts give other greedy tokens batched"))


def compile_figures(folder: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """Why there is no --compile: torch.compile of the decoder (plain weights: it cannot lower the
    prepacked oneDNN kernels), its compile time, and its warm speed against our eager default."""
    n = args.new_tokens
    prompt = BioGptTokenizer.from_folder(folder).encode(PROMPT)
    eager = BioGptForCausalLM.from_pretrained(folder)
    plain = BioGptForCausalLM.from_pretrained(folder, kernels=False)
    compiled = torch.compile(plain, dynamic=True)
    opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, speculate="off")
    with torch.inference_mode():
        first = seconds(lambda: generate(compiled, [prompt], opts))
        t_compiled, t_eager = compare(lambda: generate(compiled, [prompt], opts),
                                      lambda: generate(eager, [prompt], opts), args.repeats)
    rows.append(row("torch.compile greedy decode (vs our eager default)", n / t_compiled, n / t_eager, "tokens/s",
                    higher=True, note=f"first call, compiling included: {first:.0f} s"))


TARGETS = {  # the goals each figure is read against; every figure is also to be >= 1.0x the reference
    "greedy decode, float32": ">= 1.0x, >= 85% of bound", "beam search, 5 beams, float32": ">= 85% of bound",
    "sampling (top-k 50, top-p 0.9), float32": ">= 1.0x", "prefill": ">= 1.0x", "int8": ">= 3.5x, ppl <= +1%",
    "int4": ">= 5x, ppl <= +5%", "float16": ">= 2x where native", "bfloat16": ">= 2x where native",
    "cold start": "<= 0.5x", "memory": "<= 1.2x weights", "bulk": ">= 3x", "tokenize": ">= 1.0x",
}


def row(name: str, ours: float, reference: float, unit: str, higher: bool, target: str | None = None,
        note: str = "") -> dict:
    """`ratio` is always 'how many times better': ours/reference for rates, reference/ours for costs.
    Printed at once (a long run shows its figures as they come)."""
    r = {"figure": name, "ours": ours, "reference": reference, "unit": unit,
         "speedup": ours / reference if higher else reference / ours,
         "ratio ours/reference": ours / reference, "target": target or "", "note": note}
    print(f"{r['figure']:58} {r['ours']:10.3f} {r['reference']:10.3f}  {r['unit']:8} {r['speedup']:8.2f}x  "
          f"{r['target']}", flush=True)
    if r["note"]:
        print(f"{'':60}{r['note']}", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 16 new tokens, 1x corpus")
    parser.add_argument("--json", action="store_true",
                        help="write the machine and the rows to --results/<date>-<machine>.json (docs/performance.md "
                             "is rendered from those files by benchmarks/render.py)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--agreement-tokens", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "biogpt-bench",
                        help="where the random full-size checkpoint is kept between runs")
    parser.add_argument("--only", choices=["decode", "kernels", "process", "tokenize", "engine", "bulk", "embed",
                                           "quality", "ray", "gpu", "serve", "finetune", "literature", "constraints",
                                           "speculate"],
                        action="append",
                        help="run only these parts (ray, serve, finetune, literature, constraints, speculate: "
                             "only when named)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (decode and bulk figures)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (minutes)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new_tokens, args.agreement_tokens = 1, 16, 48
    folder = args.workdir / "biogpt-random"
    build_checkpoint(folder)
    where = machine.describe(args.device)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in where.items()))
    print(f"{'figure':58} {'ours':>10} {'reference':>10}  {'unit':8} {'better by':>9}  target", flush=True)
    rows: list[dict] = []
    # whole processes first, while this process is still small; then the in-process figures
    parts = (("process", process_figures), ("tokenize", tokenizer_figures), ("engine", engine_figures),
             ("decode", decode_figures), ("kernels", kernel_figures),
             ("bulk", bulk_figures), ("embed", embed_figures), ("quality", quality_figures), ("ray", ray_figures),
             ("gpu", gpu_figures), ("serve", serve_figures), ("finetune", finetune_figures),
             ("literature", literature_figures), ("constraints", constraint_figures), ("speculate", speculate_figures))
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # `timeout`: keep what was measured
    gpu = args.device != "cpu"
    complete = False
    try:
        for part, fn in parts:
            named_only = ("ray", "serve", "finetune", "literature", "constraints", "speculate")
            everything = part not in named_only and (part in ("decode", "bulk", "gpu") if gpu else part != "gpu")
            if (not args.only and everything) or part in (args.only or ()):
                fn(folder, args, rows)
        if args.compile:
            compile_figures(folder, args, rows)
        complete = True
    finally:
        if args.json and rows:
            write_results(args, where, rows, complete)


def write_results(args: argparse.Namespace, where: dict, rows: list[dict], done: bool) -> None:
    """The result file docs/performance.md is rendered from (a run cut short says so)."""
    args.results.mkdir(parents=True, exist_ok=True)
    parts = "-" + "-".join(args.only) if args.only else ""  # a partial run keeps its own file
    path = args.results / f"{where['date']}-{machine.slug(where)}{parts}.json"
    path.write_text(json.dumps({"machine": where, "command": " ".join(sys.argv[1:]), "complete": done, "rows": rows},
                               indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}" + ("" if done else " (the run was cut short)"))

if __name__ == "__main__":
    main()
