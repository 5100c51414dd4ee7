"""`biogpt score`: how likely the model finds each line, or which of several choices."""

from __future__ import annotations

import json
import math
import sys
from typing import Annotated

import typer

from ..errors import InputError
from ..hub import DEFAULT_MODEL
from ..inputs import Prompt, input_name, open_input, read_lines
from .common import (
    FORWARD_BATCH,
    AddressOpt,
    BatchOpt,
    CpusOpt,
    DebugOpt,
    DeviceOpt,
    DTypeOpt,
    Engine,
    EngineOpt,
    ErrorsOpt,
    FormatOpt,
    GpusOpt,
    ModelOpt,
    OutputOpt,
    QuietOpt,
    RevisionOpt,
    UsageError,
    WorkersOpt,
    command,
    device_or_usage_error,
    load,
    out,
    run_on_ray,
    stderr,
)


@command
def score(
    file: Annotated[str | None, typer.Argument(help="Texts to score, one per line; '-' or nothing: stdin.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    choices: Annotated[str | None, typer.Option(help="Comma-separated continuations of --prompt to compare.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt the --choices continue.")] = None,
    fmt: FormatOpt = "text",
    batch_size: BatchOpt = FORWARD_BATCH,
    truncate: Annotated[bool, typer.Option(help="Score the end of over-long lines instead of failing.")] = False,
    dtype: DTypeOpt = "float32",
    device: DeviceOpt = "cpu",
    errors: ErrorsOpt = "strict",
    quiet: QuietOpt = False,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = 1,
    cpus_per_worker: CpusOpt = 1.0,
    gpus_per_worker: GpusOpt = 0.0,
    output: OutputOpt = None,
    show: Annotated[bool, typer.Option(help="Each token with its surprisal (coloured on a terminal).")] = False,
    debug: DebugOpt = False,
) -> None:
    """Per line: tokens, mean negative log-likelihood, perplexity. With --choices: their probabilities."""
    from ..batch import batches
    from ..plans import score_records
    from ..scoring import choice_probabilities

    options = [c.strip() for c in choices.split(",")] if choices is not None else None
    if options is not None and (prompt is None or len(options) < 2 or not all(options)):
        raise UsageError("--choices needs --prompt and at least two non-empty, comma-separated choices")
    if options is None and prompt is not None:
        raise UsageError("--prompt goes with --choices (to score a text, pass it on stdin or in FILE)")
    if options is not None and file is not None:
        raise UsageError("--choices scores the continuations of --prompt; it reads no FILE: drop one")
    torch_device = device_or_usage_error(device)
    if engine == "ray":
        return run_on_ray("score", {"truncate": truncate}, Engine(engine, address, workers, cpus_per_worker,
                                                                  gpus_per_worker, quiet),
                          model=model, revision=revision, dtype=dtype, device=device, quantize="none", input=file,
                          output=output, batch_size=batch_size)
    if output is not None:
        raise UsageError("score writes to stdout; -o FOLDER is for --engine ray")
    lm, tok = load(model, revision, dtype, torch_device)
    if options is not None:
        probs = choice_probabilities(lm, tok.encode(prompt), [tok.encode(c, add_special_tokens=False) for c in options])
        for choice, p in zip(options, probs, strict=True):
            out(json.dumps({"choice": choice, "probability": p}) + "\n" if fmt == "jsonl" else f"{choice}\t{p:.6f}\n")
        return
    file = file or "-"
    name = input_name(file)
    if show:
        return _show(lm, tok, file, name, errors)
    if fmt == "text" and sys.stdout.isatty():
        stderr.print("tokens\tnll\tppl", style="bold")
    skipped = 0
    with open_input(file) as f:
        lines = (Prompt(n, t) for n, t in read_lines(f, name, errors))
        for group in batches(lines, batch_size * 16):  # a window of lines, batched by length inside
            kept = [p for p in group if p.text.strip()]
            skipped += len(group) - len(kept)
            for r in score_records(lm, tok, kept, batch_size, truncate, stderr.print):
                nll = math.nan if r["nll"] is None else r["nll"]
                out(json.dumps(r) + "\n" if fmt == "jsonl"
                    else f"{r['tokens']}\t{nll:.6f}\t{math.exp(nll) if math.isfinite(nll) else math.nan:.4f}\n")
    if skipped:
        stderr.print(f"note: skipped {skipped} blank line{'s' * (skipped > 1)}")


def _show(lm: object, tok: object, file: str, name: str, errors: str) -> None:
    """Per line, each token and its surprisal in bits: coloured on a terminal (green: expected,
    red: surprising), `token(bits)` as plain text otherwise."""
    from rich.console import Console
    from rich.text import Text

    from ..scoring import token_logprobs

    console = Console(highlight=False) if sys.stdout.isatty() else None
    with open_input(file) as f:
        for n, line in read_lines(f, name, errors):
            if not line.strip():
                continue
            ids = tok.encode(line)
            if len(ids) > lm.config.max_position_embeddings:
                raise InputError(f"{name}: line {n}: {len(ids)} tokens exceed the model's positions")
            bits = (-token_logprobs(lm, [ids])[0] / math.log(2)).tolist()
            pieces = [(t.replace("</w>", ""), b) for t, b in zip(tok.convert_ids_to_tokens(ids[1:]), bits, strict=True)]
            if console is None:
                out(" ".join(f"{t}({b:.1f})" for t, b in pieces) + "\n")
                continue
            text = Text()
            for t, b in pieces:
                text.append(t + " ", style="green" if b < 4 else "yellow" if b < 8 else "dark_orange" if b < 12
                            else "red")
            console.print(text)
