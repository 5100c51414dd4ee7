"""`biogpt score`: how likely the model finds each line, or which of several choices."""

from __future__ import annotations

import html
import math
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..hub import DEFAULT_MODEL
from ..inputs import Prompt, input_name, open_input, read_records
from ..jsonl import dumps
from .common import (
    FORWARD_BATCH,
    LENGTH_WINDOW,
    AddressOpt,
    BatchOpt,
    CpusOpt,
    DebugOpt,
    DeviceOpt,
    DTypeOpt,
    Engine,
    EngineOpt,
    ErrorsOpt,
    ForceOpt,
    GpusOpt,
    InputFormatOpt,
    ModelOpt,
    OutputFormatOpt,
    QuietOpt,
    RevisionOpt,
    SameInputOpt,
    SectionLabelsOpt,
    TextOpt,
    UsageError,
    WorkersOpt,
    command,
    device_or_usage_error,
    file_or_input,
    line_progress,
    load,
    note_skipped,
    output_format,
    run_on_ray,
    stderr,
)

if TYPE_CHECKING:
    from ..output import LineWriter


@command
def score(
    file: Annotated[str | None, typer.Argument(help="Texts to score, one per line; '-' or nothing: stdin.")] = None,
    input: SameInputOpt = None,
    input_format: InputFormatOpt = "auto",
    text: TextOpt = None,
    section_labels: SectionLabelsOpt = False,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    choices: Annotated[str | None, typer.Option(help="Comma-separated continuations of --prompt to compare.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt the --choices continue.")] = None,
    fmt: OutputFormatOpt = "auto",
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
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write FILE here instead of stdout (a "
                                                "FOLDER with --engine ray).")] = None,
    force: ForceOpt = False,
    show: Annotated[bool, typer.Option(help="Each token with its surprisal (coloured on a terminal).")] = False,
    debug: DebugOpt = False,
) -> None:
    """How likely each line is (or which choice).

    Per line: tokens, mean negative log-likelihood, perplexity. With --choices: their probabilities."""
    from ..output import check_output, whole_output
    from ..plans import TEXT_FIELDS
    from ..scoring import choice_probabilities
    from .generate import input_identity, model_identity

    file = file_or_input(file, input)
    options = [c.strip() for c in choices.split(",")] if choices is not None else None
    if options is not None and (prompt is None or len(options) < 2 or not all(options)):
        raise UsageError("--choices needs --prompt and at least two non-empty, comma-separated choices")
    if options is None and prompt is not None:
        raise UsageError("--prompt goes with --choices (to score a text, pass it on stdin or in FILE)")
    if options is not None and file is not None:
        raise UsageError("--choices scores the continuations of --prompt; it reads no FILE: drop one")
    if options is not None and truncate:
        raise UsageError("--truncate cuts over-long lines of a FILE; --choices reads none")
    if engine == "local":  # a FOLDER for --engine ray, whose records are JSONL: a given --format text is refused
        fmt = output_format(fmt, output)
    if show and (options is not None or fmt == "jsonl" or engine == "ray"):
        raise UsageError("--show prints each line's tokens as text: it goes with neither --choices, --format jsonl "
                         "nor --engine ray")
    torch_device = device_or_usage_error(device)
    where = Engine(engine, address, workers, cpus_per_worker, gpus_per_worker, quiet)
    if engine == "ray":
        return run_on_ray("score", {"truncate": truncate}, where, model=model, revision=revision, dtype=dtype,
                          device=device, quantize="none", input=file, output=output, batch_size=batch_size,
                          force=force, fmt=fmt, input_format=input_format,
                          ignored={"--choices": options is not None, "--errors": errors != "strict"},
                          documents=(text, section_labels))
    check_output(output, force=force, source=file)
    file = file or "-"
    with open_input(file) as f:
        items = read_records(f, input_name(file), input_format, errors, TEXT_FIELDS["score"], text or "all",
                             section_labels, lambda message: stderr.print(f"note: {message}", markup=False))
        lm, tok = load(model, revision, dtype, torch_device)
        run = {"command": "score", "truncate": truncate, **({"prompt": prompt, "choices": options} if options else {}),
               **model_identity(lm, model, revision, dtype, "none"), **input_identity(None, file, output)}
        with whole_output(output, run) as writer:
            if options is not None:
                probs = choice_probabilities(lm, tok.encode(prompt),
                                             [tok.encode(c, add_special_tokens=False) for c in options])
                for choice, p in zip(options, probs, strict=True):
                    writer.write(dumps({"choice": choice, "probability": p}) if fmt == "jsonl"
                                 else f"{choice}\t{p:.6f}\n")
            elif show:
                _show(lm, tok, items, writer, truncate)
            else:
                with line_progress(file, output, quiet) as update:
                    _score(lm, tok, items, fmt, writer, batch_size, truncate, update)


def _score(lm: Any, tok: Any, items: Iterator[Prompt], fmt: str, writer: LineWriter, batch_size: int,
           truncate: bool, update: Callable[[int], None]) -> None:
    """A record per non-blank item, in windows of items batched by length inside; `update(lines
    done)` follows it."""
    from ..batch import batches
    from ..plans import score_records

    if fmt == "text" and writer.fd == 1 and sys.stdout.isatty():
        stderr.print("tokens\tnll\tppl", style="bold")
    skipped = done = 0
    for group in batches(items, batch_size * LENGTH_WINDOW):
        kept = [p for p in group if p.text.strip()]
        skipped, done = skipped + len(group) - len(kept), done + len(group)
        for r in score_records(lm, tok, kept, batch_size, {"truncate": truncate}, stderr.print):
            nll = math.nan if r["nll"] is None else r["nll"]
            writer.write(dumps(r) if fmt == "jsonl"
                         else f"{r['tokens']}\t{nll:.6f}\t{math.exp(nll) if math.isfinite(nll) else math.nan:.4f}\n")
        update(done)
    note_skipped(skipped)


SURPRISAL = ((4, "green"), (8, "yellow"), (12, "dark_orange"), (math.inf, "red"))
SURPRISAL_LEGEND = "surprisal in bits: green < 4, yellow < 8, orange < 12, red >= 12"


def shown_piece(token: str) -> str:
    """A BPE piece as a reader knows it: no `</w>`, Moses' escapes (`@-@`, `&amp;`) undone."""
    return html.unescape(token.replace("</w>", "").replace("@-@", "-"))


def _show(lm: Any, tok: Any, items: Iterator[Prompt], writer: LineWriter, truncate: bool) -> None:
    """Per line, each token and its surprisal in bits, `token(bits)`: coloured on a terminal
    (green: expected, red: surprising, with the legend on stderr), plain otherwise."""
    from rich.console import Console
    from rich.text import Text

    from ..plans import text_ids
    from ..scoring import token_logprobs

    console = Console(highlight=False) if writer.fd == 1 and sys.stdout.isatty() else None
    if console is not None:
        stderr.print(SURPRISAL_LEGEND, style="dim")
    for p in items:
        if not p.text.strip():
            continue
        ids = text_ids(lm, tok, p, truncate, stderr.print)
        bits = (-token_logprobs(lm, [ids])[0] / math.log(2)).tolist()
        pieces = [(shown_piece(t), b) for t, b in zip(tok.convert_ids_to_tokens(ids[1:]), bits, strict=True)]
        if console is None:
            writer.write(" ".join(f"{t}({b:.1f})" for t, b in pieces) + "\n")
            continue
        text = Text()
        for t, b in pieces:
            text.append(f"{t}({b:.1f}) ", style=next(colour for ceiling, colour in SURPRISAL if b < ceiling))
        console.print(text)
