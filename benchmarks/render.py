"""Render the result files of `bench.py --json` into docs/performance.md and the README's speed
table, so that every published figure is a measured one, with its machine and date.

    python benchmarks/render.py          (rewrites both; commit them with the result files)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- speed table: benchmarks/render.py -->", "<!-- end of speed table -->"
HEADLINE = ("whole `generate` process", "greedy decode, float32", "beam search, 5 beams", "--quantize int8 greedy",
            "bulk generate, 64", "GPU one prompt greedy, float32, vs reference static",
            "GPU one prompt greedy, bfloat16, vs reference static", "GPU bulk 64 prompts x 64 tokens, float32, vs "
            "reference static", "GPU bulk 64 prompts x 64 tokens, bfloat16, vs reference static")


def machine_line(m: dict) -> str:
    where = f"{m['gpu']} (host {m['cpu']})" if m.get("gpu") else f"{m['cpu']}, {m['isa']}, {m['threads']} threads"
    return f"{where}; torch {m['torch']}, transformers {m.get('transformers') or '?'}; {m['date']}"


def number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def table(rows: list[dict], names: tuple[str, ...] | None = None) -> list[str]:
    lines = ["| figure | biogpt-cli | reference | unit | better by |", "|---|---|---|---|---|"]
    for r in rows:
        if names is None or any(r["figure"].startswith(n) for n in names):
            lines.append(f"| {r['figure']} | {number(r['ours'])} | {number(r['reference'])} | {r['unit']} | "
                         f"{r['speedup']:.2f}x |")
    return lines


def results() -> list[tuple[str, dict]]:
    return [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in sorted(RESULTS.glob("*.json"))]


def performance_page(found: list[tuple[str, dict]]) -> str:
    out = ["# Performance", "",
           "Every table below is rendered by `benchmarks/render.py` from a result file that `benchmarks/bench.py "
           "--json` wrote (`benchmarks/results/`). Each run times biogpt-cli and the reference (`transformers`) "
           "side by side on the same machine, with random weights of the full microsoft/biogpt shape; a figure "
           "holds for the machine it names. \"better by\" is how many times faster (or smaller) ours is.", "",
           "Reproduce: `python benchmarks/bench.py --json` (add `--device cuda` on a GPU, `--only decode` for a "
           "part), then `python benchmarks/render.py`.", "",
           "When speculation pays (`--only speculate`): a forward pass of K new tokens reads the weights once "
           "for all K, so on a CPU it costs little more than one (the rows `a forward pass of K new tokens vs 1` "
           "give the curve). A draft whose tokens are kept with probability a yields 1 + a + ... + a^K tokens a "
           "pass, so it pays where that exceeds the pass's extra cost: always for a grammar's forced words "
           "(a = 1), for prompt lookup where text repeats its source (extraction, QA on the context: the kept "
           "share on a small trained model is in the rows `trained small model, ...`), and for a quantized copy "
           "only where K of its steps (the rows `a drafting step of the int8 copy`) cost less than the float32 "
           "steps its kept tokens save. A batch of several rows already reads the weights once for all "
           "of them, so `auto` drafts from the text only for a row decoding alone; the server row with 16 "
           "clients measures `auto` against `off` under that load.", "",
           "Our CPU kernels (`--only kernels`; docs/development.md says how they work) are one C file with "
           "intrinsics (AVX-512 VNNI, AVX2, plain loops elsewhere), compiled at first use by the machine's own "
           "`cc -O3 -march=native` in under a second (the row `whole generate process ...` notes the first "
           "build), sharing torch's OpenMP runtime and called through ctypes. The other routes: numba cannot "
           "emit the int8 dot-product instructions (`dpbusd`, `maddubs`) that make int8 and int4 cheap, and "
           "would be another large dependency; `torch.utils.cpp_extension` compiles against torch's large "
           "headers, far slower at first use, and ties the library to torch's ABI; ONNX Runtime's "
           "`MatMulNBits` covers int4/int8 only and brings a runtime with its own thread pool beside torch's. "
           "A machine without a compiler keeps torch's kernels. Each kernel competes with torch's on the "
           "model's own weights at the first load (`choose_kernel`), so a figure where torch's kernel is "
           "faster on a CPU is what that CPU's users keep: the rows `... the product's choice vs torch's` "
           "measure what a user gets; the rows `... ours vs torch's kernels` force ours. On a virtual machine "
           "the read bandwidth moves from second to second, so each share of the bandwidth bound is taken "
           "against the bandwidth measured around that run.", ""]
    for name, data in reversed(found):
        out += [f"## {machine_line(data['machine'])}", "", f"`bench.py {data.get('command', '')}` -> `{name}`", "",
                *table(data["rows"]), ""]
        notes = [f"- {r['figure']}: {r['note']}" for r in data["rows"] if r.get("note")]
        out += (["Notes:", "", *notes, ""] if notes else [])
    return "\n".join(out)


def readme_table(found: list[tuple[str, dict]]) -> str:
    """The newest result of each machine, headline figures only: whole CPU runs (a part run with
    `--only` is in docs/performance.md only) and GPU runs."""
    newest: dict[str, tuple[str, dict]] = {}
    for name, data in found:
        command = data.get("command", "")
        if "--only" not in command or "--device cuda" in command:
            newest[re.sub(r"^\d{4}-\d{2}-\d{2}-", "", name)] = (name, data)
    out = [BEGIN]
    for name, data in newest.values():
        headline = table(data["rows"], HEADLINE)
        if len(headline) > 2:
            out += ["", f"**{machine_line(data['machine'])}** ([{name}](benchmarks/results/{name}))", "", *headline]
    return "\n".join([*out, "", END])


def main() -> None:
    found = results()
    if not found:
        sys.exit(f"error: no result files in {RESULTS}: run benchmarks/bench.py --json first")
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "performance.md").write_text(performance_page(found), encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if BEGIN not in readme or END not in readme:
        sys.exit(f"error: README.md has no {BEGIN} ... {END} block to fill")
    head, rest = readme.split(BEGIN, 1)
    (ROOT / "README.md").write_text(head + readme_table(found) + rest.split(END, 1)[1], encoding="utf-8")
    print(f"rendered {len(found)} result files into docs/performance.md and README.md")


if __name__ == "__main__":
    main()
