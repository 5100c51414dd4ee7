"""`biogpt generate`, and `run_batch`: the input -> engine -> output plumbing every generating
command shares (output file and manifest, resume, live terminal output, interrupts, -v)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..errors import BioGptError, InputError
from ..hub import DEFAULT_MODEL
from ..inputs import Prompt, count_items, input_name, open_input, read_records, rereadable
from .common import (
    ARGV,
    AddressOpt,
    CpusOpt,
    DebugOpt,
    DecodeBatchOpt,
    DeviceOpt,
    DraftTokensOpt,
    DTypeOpt,
    Engine,
    EngineOpt,
    ErrorsOpt,
    ForceOpt,
    GpusOpt,
    InputFormat,
    InputFormatOpt,
    InputOpt,
    ModelOpt,
    OutputFormatOpt,
    OutputOpt,
    QuantizeOpt,
    QuietOpt,
    Quit,
    ResumeOpt,
    RevisionOpt,
    SectionLabelsOpt,
    SpeculateOpt,
    TextOpt,
    UsageError,
    VerboseOpt,
    WorkersOpt,
    check_decode_memory,
    check_precision,
    command,
    counted,
    device_or_usage_error,
    load,
    note_skipped,
    output_format,
    progress,
    run_on_ray,
    shows_progress,
    stderr,
)

MAX_SEED = 2**63 - 1


@command
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt. Without it: --input, or stdin when piped.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="New tokens at most.")] = 50,
    min_new_tokens: Annotated[int, typer.Option(min=0, help="New tokens before </s> may end a sequence.")] = 0,
    num_beams: Annotated[int, typer.Option(min=1, help="Beam search with this many beams.")] = 1,
    length_penalty: Annotated[float | None, typer.Option(help="Beams: score = log p / length ** this [1].")] = None,
    early_stopping: Annotated[bool | None, typer.Option(help="Beams: stop once num_beams are done.")] = None,
    no_repeat_ngram_size: Annotated[int, typer.Option(min=0, help="Never repeat an n-gram of this size.")] = 0,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise tokens already present (1: off).")] = 1.0,
    sample: Annotated[bool, typer.Option("--sample", help="Sample, not greedy (with --num-beams: beam sampling).")
                      ] = False,
    temperature: Annotated[float | None, typer.Option(help="Sampling: divide logits by this [1].")] = None,
    top_k: Annotated[int | None, typer.Option(min=0, help="Sampling: keep the k likeliest, 0: off [50].")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sampling: nucleus mass, in [0, 1] [1].")] = None,
    min_p: Annotated[float | None, typer.Option(min=0, max=1, help="Sampling: drop p < min_p * max p.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Sampling: seed, below 2**63 (random without).")] = None,
    num_return_sequences: Annotated[int, typer.Option(min=1, help="Sequences per prompt (sampling/beams).")] = 1,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when the text contains this (repeatable).")] = None,
    ban: Annotated[list[str] | None, typer.Option(help="Never generate this word or phrase (repeatable).")] = None,
    choices: Annotated[str | None, typer.Option(help="The continuation is one of these texts: a,b,c.")] = None,
    speculate: SpeculateOpt = "auto",
    draft_tokens: DraftTokensOpt = 8,
    input: InputOpt = None,
    input_format: InputFormatOpt = "auto",
    text: TextOpt = None,
    section_labels: SectionLabelsOpt = False,
    output: OutputOpt = None,
    fmt: OutputFormatOpt = "auto",
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    batch_size: DecodeBatchOpt = None,
    truncate: Annotated[bool, typer.Option(help="Cut over-long prompts from the left instead of failing.")] = False,
    dtype: DTypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    graphs: Annotated[bool, typer.Option(help="CUDA: replay the decode step from a captured graph.")]
    = True,
    errors: ErrorsOpt = "strict",
    verbose: VerboseOpt = False,
    logprobs: Annotated[int | None, typer.Option(min=0, max=20, help="JSONL: each token's logprob and K best.")]
    = None,
    show_confidence: Annotated[bool, typer.Option(help="Terminal: colour each word by its probability.")] = False,
    quiet: QuietOpt = False,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = 1,
    cpus_per_worker: CpusOpt = 1.0,
    gpus_per_worker: GpusOpt = 0.0,
    debug: DebugOpt = False,
) -> None:
    """Continue prompts (streamed, or to files).

    Text streams to a terminal; otherwise whole lines, or JSONL records. Without PROMPT or
    --input, stdin is read, or on a terminal the interactive mode starts."""
    from ..plans import generate_plan, generation_options

    if seed is not None and seed > MAX_SEED:
        raise UsageError(f"--seed {seed} is too large: seeds are below 2**63")
    sampling = {"--temperature": temperature, "--top-k": top_k, "--top-p": top_p, "--min-p": min_p, "--seed": seed}
    given = [name for name, value in sampling.items() if value is not None]
    if given and not sample:
        raise UsageError(f"{', '.join(given)} only {_apply(given)} when sampling: add --sample")
    beams = {"--length-penalty": length_penalty, "--early-stopping": early_stopping}
    given = [name for name, value in beams.items() if value is not None]
    if given and num_beams == 1:
        raise UsageError(f"{', '.join(given)} only {_apply(given)} to beam search: add --num-beams N (N > 1)")
    if show_confidence and (output is not None or fmt == "jsonl" or engine == "ray" or not sys.stdout.isatty()):
        raise UsageError("--show-confidence colours text streamed to a terminal: not with -o, --format jsonl, "
                         "--engine ray or a pipe")
    settings = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                    length_penalty=length_penalty, early_stopping=early_stopping,
                    num_return_sequences=num_return_sequences, sample=sample, temperature=temperature, top_k=top_k,
                    top_p=top_p, min_p=min_p, seed=seed, repetition_penalty=repetition_penalty,
                    no_repeat_ngram_size=no_repeat_ngram_size, stop=stop or [], ban=ban or [], truncate=truncate,
                    logprobs=logprobs, speculate=speculate, draft_tokens=draft_tokens,
                    choices=[c.strip() for c in choices.split(",")] if choices is not None else None)
    if choices is not None and not all(settings["choices"]):
        raise UsageError("--choices needs non-empty texts separated by commas: --choices yes,no,maybe")
    if "" in (stop or []) or any(not b.strip() for b in ban or []):
        raise UsageError(f"--{'stop' if '' in (stop or []) else 'ban'} needs a non-empty text")
    try:
        decoding = generation_options(settings)
        decoding.validate()
    except BioGptError as e:
        raise UsageError(option_names(str(e))) from None
    torch_device = device_or_usage_error(device)
    check_precision(quantize, dtype, torch_device)
    if not graphs:
        os.environ["BIOGPT_GRAPHS"] = "0"  # read where a decoder is made (graphs.py)
    where = Engine(engine, address, workers, cpus_per_worker, gpus_per_worker, quiet)
    if engine == "ray":
        settings["seed"] = seed  # None: the folder's own seed when finishing it, else a new one (cluster.py)
        return run_on_ray("generate", settings, where, model=model, revision=revision, dtype=dtype, device=device,
                          quantize=quantize, input=input, output=output, batch_size=batch_size, force=force, fmt=fmt,
                          input_format=input_format, ignored={"PROMPT": prompt is not None, "--resume": resume,
                                                              "--verbose": verbose, "--errors": errors != "strict"},
                          documents=(text, section_labels))
    fmt = output_format(fmt, output)
    check_batch_options(input, output, fmt, force, resume)
    if logprobs is not None and fmt != "jsonl":
        raise UsageError("--logprobs adds to JSONL records: add --format jsonl (or -o FILE.jsonl)")
    if prompt is not None and input is not None:
        raise UsageError("give a PROMPT or --input, not both")
    if prompt is not None and not prompt.strip():
        raise UsageError("the prompt is empty")
    if prompt is None and input is None:
        if sys.stdin.isatty():  # a person at a terminal: the interactive mode
            if choices is not None:
                raise UsageError("--choices continues given prompts: give a PROMPT or --input")
            from .interactive import interact

            return interact(settings, model=model, revision=revision, dtype=dtype, device=torch_device,
                            quantize=quantize, confidence=show_confidence)
        input = "-"

    # a bad input fails before loading; a literature file's documents are continued from their titles
    with prompt_source(prompt, input, input_format, errors, which=text or "title", labels=section_labels) as prompts:
        check_rows(model, revision, decoding, prompt, batch_size, dtype, torch_device)
        one_row = prompt is not None and decoding.rows_per_prompt == 1
        lm, tokenizer = load_model(model, revision, dtype, torch_device, quantize, verbose, rows=1 if one_row else None,
                                   speculate=speculate)
        settings["seed"] = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        if sample and verbose:
            stderr.print(f"seed {settings['seed']}")
        plan = generate_plan(lm, tokenizer, settings, stderr.print)
        run = {**plan.identity, **model_identity(lm, model, revision, dtype, quantize),
               **input_identity(prompt, input, output)}
        run_batch(lm, tokenizer, prompts, plan, run=run, output=output, fmt=fmt, force=force, resume=resume,
                  batch_size=batch_size, verbose=verbose, total=progress_total(input, output, quiet), quiet=quiet,
                  confidence=show_confidence)


def option_names(message: str) -> str:
    """A library message about `GenerationOptions` fields in the options the user typed
    (`min_new_tokens must be ...` -> `--min-new-tokens must be ...`)."""
    from ..generation import GenerationOptions

    fields = "|".join(f.name for f in dataclasses.fields(GenerationOptions))
    return re.sub(rf"\b({fields})\b", lambda m: "--" + m.group(1).replace("_", "-").replace("do-sample", "sample"),
                  message)


def _apply(options: list[str]) -> str:
    return "applies" if len(options) == 1 else "apply"


def check_batch_options(input: str | None, output: str | None, fmt: str, force: bool, resume: bool) -> None:
    from ..output import check_output

    if resume and (output is None or fmt != "jsonl"):
        raise UsageError("--resume needs --output FILE with JSONL records (a .jsonl name, or --format jsonl)")
    if resume and force:
        raise UsageError("--resume continues the --output file and --force overwrites it: give one")
    check_output(output, force=force, resume=resume, source=input)


def check_rows(model: str, revision: str | None, opts: Any, prompt: str | None, batch_size: int | None, dtype: str,
               device: Any) -> None:
    """Refuse beams x sequences x batch rows that cannot fit in memory, before the model loads. A
    PROMPT's tokens are bounded by its bytes; a file's prompts by the model's positions."""
    from ..batch import default_batch_size

    prompts = 1 if prompt is not None else batch_size or default_batch_size(opts, device)
    named = (("--num-beams", opts.num_beams > 1), ("--num-return-sequences", opts.num_return_sequences > 1),
             ("--batch-size", prompts > 1))
    what = " x ".join(name for name, on in named if on) or "decoding"
    positions = opts.max_new_tokens + (len(prompt.encode()) + 2 if prompt is not None else 1 << 30)
    check_decode_memory(model, revision, prompts * opts.rows_per_prompt, positions, what, dtype, device,
                        opts.max_new_tokens)


def load_model(model: str, revision: str | None, dtype: str, device: Any, quantize: str, verbose: bool,
               rows: int | None = None, heads: bool = False, speculate: str = "auto") -> Any:
    """The model and tokenizer (and, to draft with, its quantized copy: `--speculate int8|int4`)."""
    from ..drafts import SELF, draft_model

    start = time.perf_counter()
    loaded = load(model, revision, dtype, device, quantize, rows, heads=heads)
    if speculate in SELF:
        draft_model(loaded[0], speculate)
    if verbose:
        from ..native import describe

        copy = f" (and its {speculate} copy to draft with)" if speculate in SELF else ""
        stderr.print(f"loaded {model}{copy} in {time.perf_counter() - start:.2f} s")
        if str(device).startswith("cpu"):
            stderr.print(f"linear layers: {loaded[0].kernel}; {describe()}")
    return loaded


def model_identity(lm: Any, model: str, revision: str | None, dtype: str, quantize: str) -> dict[str, Any]:
    from ..identity import model_identity

    return {"model": model, "revision": revision, "model_files": model_identity(lm.source), "dtype": dtype,
            "quantize": quantize}


def input_identity(prompt: str | None, path: str | None, output: str | None) -> dict[str, Any]:
    """What a manifest records of the input: the prompt, the file and its sha256, or stdin. Only
    an output file has a manifest, so without one the input is not read twice to hash it."""
    from ..output import file_digest

    if output is None:
        return {}
    if path is None:
        return {"prompt": prompt}
    if path == "-":
        return {"input": "stdin"}
    if not rereadable(path):  # a pipe: hashing it would consume what the run is to read
        return {"input": path}
    return {"input": str(Path(path).resolve()), "input_sha256": file_digest(path)}


def no_file_options(input_format: str, errors: str) -> None:
    """Input given on the command line: options about reading a file would be ignored, so refused."""
    given = [name for name, on in (("--input-format", input_format != "auto"), ("--errors", errors != "strict")) if on]
    if given:
        raise UsageError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for --input: input on the "
                         "command line is taken as it is")


@contextlib.contextmanager
def prompt_source(prompt: str | None, path: str | None, input_format: InputFormat, errors: str,
                  text_field: str | tuple[str, ...] | None = "prompt", which: str | None = None,
                  labels: bool = False) -> Iterator[Iterator[Prompt]]:
    """The PROMPT argument, or the records of an --input file (opened on entry: a missing one fails
    early): lines, JSONL records, or a literature file's documents read as their `which` text."""
    if path is None:
        no_file_options(input_format, errors)
        yield iter([Prompt(0, prompt or "", fields={"text": prompt or ""})])
        return
    with open_input(path) as f:
        yield read_records(f, input_name(path), input_format, errors, text_field, which or "all", labels,
                           lambda message: stderr.print(f"note: {message}", markup=False, highlight=False))


def progress_total(input: str | None, output: str | None, quiet: bool) -> int | None:
    """What a progress bar counts to: the lines of an input file written to an output file, when a
    bar is shown (a big file, or a gzipped one, costs a pass of its own)."""
    return None if input is None or output is None or not shows_progress(quiet) else count_items(input)


def run_batch(lm: Any, tokenizer: Any, items: Iterable[Prompt], plan: Any, *, run: dict[str, Any],
              output: str | None, fmt: str, force: bool, resume: bool, batch_size: int | None, verbose: bool = False,
              total: int | None = None, quiet: bool = False, confidence: bool = False) -> None:
    """A plan's jobs for `items` (blank ones skipped and counted) through the batch engine into
    the output file (with its manifest) or stdout, live on a terminal; with an output file and a
    `total`, a progress bar on stderr."""
    from .. import batch
    from ..output import CONFIDENCE_LEGEND, Renderer, open_output
    from ..writers import FORMATS, DocumentWriter

    opts, sequences = plan.opts, plan.opts.num_return_sequences
    live = output is None and fmt == "text" and sys.stdout.isatty()
    confidence = confidence and live
    skipped = 0

    def jobs(done: set[Any]) -> Iterator[Any]:
        nonlocal skipped
        for p in items:
            if plan.blank(p):
                skipped += 1
            elif p.key not in done:
                try:
                    yield plan.job(p)
                except InputError as e:
                    raise InputError(f"{p.where}{e}") from None

    existed = output is not None and os.path.exists(output)
    with open_output(output, force=force, resume=resume, group=sequences, run=run) as (writer, done):
        if resume and output is not None:
            stderr.print(f"resuming {output}: {counted(len(done), 'input')} already done" if existed
                         else f"{output} does not exist yet: starting it")
        if confidence:
            stderr.print(CONFIDENCE_LEGEND, style="dim")
        spinner = stderr.status("beam search", spinner="dots") if live and opts.num_beams > 1 else None
        documents = DocumentWriter(fmt, plan.identity.get("task", ""), plan.record) if fmt in FORMATS else None
        render = Renderer("text" if documents else fmt, None if live else writer,
                          Console(highlight=False) if live else None, sequences, plan.record,
                          documents.block if documents else plan.line, plan.summary, confidence,
                          eager=spinner is None)
        if documents is not None:
            writer.write(documents.head(), records=0)
        try:
            with spinner or contextlib.nullcontext(), progress(total, quiet or total is None, "records") as update:
                shown = _Quieting(render, spinner) if spinner else _Counting(render, update, len(done))
                stats = batch.run(lm, tokenizer, jobs(done), opts, shown, batch_size=batch_size, stop=plan.stop,
                                  seed=plan.seed, done=done, progress=_beam_progress(spinner), confidence=confidence,
                                  live=live)
            if documents is not None:
                writer.write(documents.tail(), records=0)
        except (KeyboardInterrupt, Quit) as e:
            if live:
                sys.stdout.write("\n")
            if not isinstance(e, Quit) or e.code in (130, 143):  # not a closed pipe (141)
                _say_interrupted(output, fmt, writer.records + len(done) * sequences)
            raise
        finally:
            note_skipped(skipped)
            if plan.unparsed[0]:
                n, task = plan.unparsed[0], plan.identity.get("task")
                stderr.print(f"note: {counted(n, 'output')} did not parse as a {task} answer (a null result)")
            if plan.ungrounded[0]:
                stderr.print(f"note: {counted(plan.ungrounded[0], 'relation')} named an entity found nowhere in its "
                             "document (kept, grounded: false)")
    if stats.prompts == 0 and not skipped and not done:
        stderr.print("note: the input is empty: nothing was generated")
    if resume and existed and writer.records == 0:
        stderr.print(f"{output} was already complete: nothing was left to do")
    if verbose:
        from ..graphs import CAPTURES, UNCAPTURED

        stderr.print(stats.summary())
        if CAPTURES:
            stderr.print(f"decode step captured in {sum(CAPTURES):.2f} s (once per process, row bucket and capacity)")
        if UNCAPTURED:
            stderr.print(f"decode step not captured ({UNCAPTURED[0]}): decoded eagerly", markup=False)
        if output is not None:
            stderr.print(f"{counted(writer.records, 'record')} written to {output}")


def _beam_progress(spinner: Any) -> Callable[[int], None] | None:
    """On a terminal, beam search shows its step count until its winners are printed."""
    if spinner is None:
        return None

    def show(step: int) -> None:
        spinner.update(f"beam search: step {step}")
        spinner.start()  # again, after a previous batch's winners stopped it
    return show


class _Counting:
    """A renderer that moves the progress bar as prompts finish."""

    def __init__(self, renderer: Any, update: Callable[..., None], done: int) -> None:
        self.renderer, self.update, self.done, self.tokens = renderer, update, done, 0
        self.begin, self.add = renderer.begin, renderer.add

    def event(self, ev: Any) -> None:
        self.renderer.event(ev)
        if ev.done is not None:
            self.done += 1
            self.tokens += len(ev.done.ids)
            self.update(self.done, self.tokens)


class _Quieting:
    """A renderer that stops the spinner before the winners are printed."""

    def __init__(self, renderer: Any, spinner: Any) -> None:
        self.renderer, self.spinner = renderer, spinner
        self.begin, self.add = renderer.begin, renderer.add

    def event(self, ev: Any) -> None:
        self.spinner.stop()
        self.renderer.event(ev)


def _say_interrupted(output: str | None, fmt: str, records: int) -> None:
    """What an interrupted output file holds and, for JSONL (the one `--resume` reads), how to finish it."""
    if output is None:
        return
    held = f"interrupted: {output} holds {counted(records, 'complete record')}"
    if fmt != "jsonl":
        stderr.print(f"{held} (text output cannot be resumed: write JSONL, -o FILE.jsonl, for a run that can)",
                     markup=False)
        return
    args = [a for a in ARGV if a not in ("--force", "--resume")]
    stderr.print(f"{held}; to finish it: biogpt {shlex.join(args)} --resume", markup=False)
