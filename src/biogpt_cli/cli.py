"""The `biogpt` command line. Commands only parse, check and render; the work lives in the library.

Errors are mapped once, in `main`: one `error: ...` line on stderr, exit 1 (2 for usage errors,
130 for Ctrl-C, 143 for SIGTERM, 141 quietly when the reader of stdout goes away). `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from .errors import BioGptError, InputError
from .hub import DEFAULT_MODEL
from .inputs import Prompt, input_name, open_input, read_lines, read_prompts

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="BioGPT text generation, tokenization and scoring, token-for-token equal to the reference.")
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


class UsageError(BioGptError):
    """A bad option value or combination: exit 2, before any model is loaded."""


class _Quit(BaseException):
    """Leaves through typer untouched (it is no Exception) and ends the process with `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


Format = Literal["text", "jsonl"]
InputFormat = Literal["auto", "text", "jsonl"]
Errors = Literal["strict", "replace"]
DType = Literal["float32", "bfloat16", "float16"]
Quantize = Literal["none", "int8"]


ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="BIOGPT_MODEL",
                                       help="Model folder or Hugging Face Hub id.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
FormatOpt = Annotated[Format, typer.Option("--format", help="Output format.")]
ErrorsOpt = Annotated[Errors, typer.Option("--errors", help="Invalid UTF-8 in the input: stop, or replace by U+FFFD.")]
FileArg = Annotated[str, typer.Argument(help="Input file, one item per line; '-' or nothing reads stdin.")]


def command(fn: Callable[..., None]) -> Callable[..., None]:
    """Register a command; a closed stdout ends it quietly."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
            sys.stdout.flush()
        except BrokenPipeError:
            raise _Quit(141) from None
    return app.command()(run)


def _out(text: str) -> None:
    sys.stdout.write(text)


# -- generate ----------------------------------------------------------------------------------
@command
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt. Without it: --input, or stdin when piped.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1)] = 50,
    min_new_tokens: Annotated[int, typer.Option(min=0)] = 0,
    num_beams: Annotated[int, typer.Option(min=1, help="Beam search with this many beams.")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam score = log p / length ** this.")] = 1.0,
    early_stopping: Annotated[bool, typer.Option(help="Stop beam search once num_beams are done.")] = False,
    no_repeat_ngram_size: Annotated[int, typer.Option(min=0)] = 0,
    repetition_penalty: Annotated[float, typer.Option()] = 1.0,
    sample: Annotated[bool, typer.Option("--sample", help="Sample instead of greedy/beam decoding.")] = False,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sampling: keep the k likeliest (0: off).")] = 50,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus mass, in (0, 1].")] = 1.0,
    min_p: Annotated[float | None, typer.Option(min=0, max=1, help="Sampling: drop p < min_p * max p.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling (random without it).")] = None,
    num_return_sequences: Annotated[int, typer.Option(min=1)] = 1,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when the text contains this (repeatable).")] = None,
    ban: Annotated[list[str] | None, typer.Option(help="Never generate this word or phrase (repeatable).")] = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="Prompts, one per line ('-': stdin).")] = None,
    input_format: Annotated[InputFormat, typer.Option(help="auto: JSONL if the name ends in .jsonl.")] = "auto",
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    fmt: FormatOpt = "text",
    force: Annotated[bool, typer.Option(help="Overwrite an existing --output file.")] = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted --output file (JSONL).")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts decoded together.")] = 8,
    truncate: Annotated[bool, typer.Option(help="Cut over-long prompts from the left instead of failing.")] = False,
    dtype: Annotated[DType, typer.Option(help="Weight precision.")] = "float32",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")] = "cpu",
    quantize: Annotated[Quantize, typer.Option(help="int8: dynamic int8 linear layers (CPU).")] = "none",
    errors: ErrorsOpt = "strict",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Timings on stderr.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Continue prompts: streamed to a terminal, whole lines or JSONL records otherwise."""
    import torch

    from .generation import GenerationOptions
    from .loading import parse_device

    opts = GenerationOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             num_return_sequences=num_return_sequences, do_sample=sample, temperature=temperature,
                             top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                             no_repeat_ngram_size=no_repeat_ngram_size)
    try:
        opts.validate()
        torch_device = parse_device(device)
    except BioGptError as e:
        raise UsageError(str(e)) from None
    if quantize == "int8" and (dtype != "float32" or torch_device.type != "cpu"):
        raise UsageError("--quantize int8 runs on the CPU with float32 activations: drop --dtype/--device")
    if resume and (output is None or fmt != "jsonl"):
        raise UsageError("--resume needs --output FILE and --format jsonl")
    if prompt is not None and input is not None:
        raise UsageError("give a PROMPT or --input, not both")
    if prompt is not None and not prompt.strip():
        raise UsageError("the prompt is empty")
    if prompt is None and input is None:
        if sys.stdin.isatty():
            raise UsageError("no prompt: give PROMPT, --input FILE, or pipe prompts on stdin")
        input = "-"

    from .output import Renderer, check_output, open_output

    check_output(output, force=force, resume=resume)
    with _prompt_source(prompt, input, input_format, errors) as prompts:  # a bad input fails before loading
        lm, tokenizer = _load(model, revision, dtype, torch_device, quantize)
        opts.bad_words_ids = [tokenizer.encode(b, add_special_tokens=False) for b in ban or () if b.strip()]
        seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
        generator = torch.Generator(torch_device).manual_seed(seed) if sample else None
        if sample and verbose:
            stderr.print(f"seed {seed}")
        writer, done = open_output(output, force=force, resume=resume, group=num_return_sequences)
        live = output is None and fmt == "text" and sys.stdout.isatty()
        renderer = Renderer(fmt, None if live else writer, Console(highlight=False) if live else None,
                            num_return_sequences)
        skipped = 0
        try:
            for batch in _batches(prompts, batch_size):
                todo = [p for p in batch if p.text.strip() and p.key not in done]
                skipped += sum(not p.text.strip() for p in batch)
                if todo:
                    _generate_batch(lm, tokenizer, todo, opts, stop or (), generator, renderer, truncate, verbose)
        finally:
            writer.close()
            if skipped:
                stderr.print(f"note: skipped {skipped} blank line{'s' * (skipped > 1)}")
            if output is not None and verbose:
                stderr.print(f"{writer.records} records written to {output}")


@functools.lru_cache(maxsize=1)
def _load(model: str, revision: str | None, dtype: str, device: Any, quantize: str = "none") -> Any:
    """The model and tokenizer, with a spinner on stderr while it loads (on a terminal only).

    Kept for the life of the process: a second command run in it reuses the model, and `entry`
    exits without freeing 1.4 GB object by object."""
    from .loading import load_pretrained

    with stderr.status(f"loading {model}", spinner="dots") if stderr.is_terminal else contextlib.nullcontext():
        return load_pretrained(model, revision=revision, dtype=dtype, device=device, quantize=quantize)


@contextlib.contextmanager
def _prompt_source(prompt: str | None, path: str | None, input_format: InputFormat,
                   errors: Errors) -> Iterator[Iterator[Prompt]]:
    """The PROMPT argument, or the prompts of an --input file (opened on entry: a missing one fails early)."""
    if path is None:
        yield iter([Prompt(0, prompt or "")])
        return
    jsonl = input_format == "jsonl" or (input_format == "auto" and path.endswith(".jsonl"))
    with open_input(path) as f:
        yield read_prompts(f, input_name(path), jsonl, errors)


def _batches(items: Iterator[Prompt], size: int) -> Iterator[list[Prompt]]:
    """Groups of `size`; when reading fails (a bad line), the lines before it are still processed."""
    batch: list[Prompt] = []
    try:
        for item in items:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
    except InputError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch


def _generate_batch(lm: Any, tokenizer: Any, prompts: list[Prompt], opts: Any, stop: list[str], generator: Any,
                    renderer: Any, truncate: bool, verbose: bool) -> None:
    from .generation import fit_prompt
    from .streaming import stream_completions

    ids = []
    for p in prompts:
        where = f"line {p.line}: " if p.line else ""
        try:
            full = tokenizer.encode(p.text)
            ids.append(fit_prompt(full, opts.max_new_tokens, lm.config.max_position_embeddings, truncate))
        except InputError as e:
            raise InputError(f"{where}{e}") from None
        if len(ids[-1]) < len(full):
            stderr.print(f"warning: {where}prompt of {len(full)} tokens cut to its last {len(ids[-1]) - 1}")
    renderer.begin(prompts)
    start, first, new_tokens = time.perf_counter(), None, 0
    for ev in stream_completions(lm, tokenizer, ids, opts, stop, generator):
        first = first or time.perf_counter()
        new_tokens += len(ev.done.ids) if ev.done else 0
        renderer.event(ev)
    if verbose:
        end = time.perf_counter()
        rate = (new_tokens - len(ids)) / (end - first) if end > first and new_tokens > len(ids) else 0.0
        stderr.print(f"{len(prompts)} prompt{'s' * (len(prompts) > 1)}, {sum(map(len, ids))} prompt tokens, "
                     f"{new_tokens} new tokens; first token after {first - start:.2f} s, {rate:.1f} tokens/s")


# -- tokenizer commands ------------------------------------------------------------------------
def _tokenizer(model: str, revision: str | None) -> Any:
    from .tokenizer import BioGptTokenizer

    return BioGptTokenizer.from_pretrained(model, revision)


@command
def tokenize(
    file: FileArg = "-",
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="BPE pieces instead of ids.")] = False,
    no_special: Annotated[bool, typer.Option("--no-special", help="Drop the leading </s>.")] = False,
    fmt: FormatOpt = "text",
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes (output order kept).")] = 1,
    errors: ErrorsOpt = "strict",
    debug: DebugOpt = False,
) -> None:
    """Moses + BPE ids (exactly the reference's input_ids), one output line per input line."""
    from .inputs import parallel_map

    name = input_name(file)
    render = functools.partial(_tokenize_line, _tokenizer(model, revision), not no_special,
                               "jsonl" if fmt == "jsonl" else "tokens" if tokens else "ids", name)
    with open_input(file) as f:
        for out in parallel_map(render, read_lines(f, name, errors), jobs):
            _out(out)


def _tokenize_line(tok: Any, special: bool, mode: str, name: str, line: tuple[int, str]) -> str:
    """One output line of `tokenize` (module level, so worker processes can run it)."""
    try:
        ids = tok.encode(line[1], add_special_tokens=special)
    except InputError as e:
        raise InputError(f"{name}: line {line[0]}: {e}") from None
    if mode == "jsonl":
        return json.dumps({"ids": ids, "tokens": tok.convert_ids_to_tokens(ids)}, ensure_ascii=False) + "\n"
    return " ".join(tok.convert_ids_to_tokens(ids) if mode == "tokens" else map(str, ids)) + "\n"


@command
def detokenize(
    file: FileArg = "-",
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Space-separated ids per line back to text (special tokens dropped)."""
    tok = _tokenizer(model, revision)
    name = input_name(file)
    with open_input(file) as f:
        for n, text in read_lines(f, name):
            try:
                ids = [int(x) for x in text.split()]
            except ValueError:
                raise InputError(f"{name}: line {n}: expected space-separated integer ids") from None
            bad = [i for i in ids if not 0 <= i < tok.vocab_size]
            if bad:
                raise InputError(f"{name}: line {n}: id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
            _out(tok.decode(ids, skip_special_tokens=True) + "\n")


# -- score -------------------------------------------------------------------------------------
@command
def score(
    file: FileArg = "-",
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    choices: Annotated[str | None, typer.Option(help="Comma-separated continuations of --prompt to compare.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt the --choices continue.")] = None,
    fmt: FormatOpt = "text",
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    dtype: Annotated[DType, typer.Option()] = "float32",
    device: Annotated[str, typer.Option()] = "cpu",
    errors: ErrorsOpt = "strict",
    debug: DebugOpt = False,
) -> None:
    """Per line: tokens, mean negative log-likelihood, perplexity. With --choices: their probabilities."""
    from .loading import parse_device
    from .scoring import choice_probabilities, sequence_nll

    options = [c.strip() for c in choices.split(",")] if choices is not None else None
    if options is not None and (prompt is None or len(options) < 2 or not all(options)):
        raise UsageError("--choices needs --prompt and at least two non-empty, comma-separated choices")
    if options is None and prompt is not None:
        raise UsageError("--prompt goes with --choices (to score a text, pass it on stdin or in FILE)")
    try:
        torch_device = parse_device(device)
    except BioGptError as e:
        raise UsageError(str(e)) from None
    lm, tok = _load(model, revision, dtype, torch_device)
    if options is not None:
        probs = choice_probabilities(lm, tok.encode(prompt), [tok.encode(c, add_special_tokens=False) for c in options])
        for choice, p in zip(options, probs, strict=True):
            _out(json.dumps({"choice": choice, "probability": p}) + "\n" if fmt == "jsonl"
                 else f"{choice}\t{p:.6f}\n")
        return
    name = input_name(file)
    limit = lm.config.max_position_embeddings
    with open_input(file) as f:
        for batch in _batches((Prompt(n, t) for n, t in read_lines(f, name, errors)), batch_size):
            ids = []
            for p in batch:
                try:
                    ids.append(tok.encode(p.text))
                except InputError as e:
                    raise InputError(f"{name}: line {p.line}: {e}") from None
                if len(ids[-1]) > limit:
                    raise InputError(f"{name}: line {p.line}: {len(ids[-1])} tokens exceed the model's {limit} "
                                     "positions")
            for p, (count, nll) in zip(batch, sequence_nll(lm, ids), strict=True):
                finite = math.isfinite(nll)
                if fmt == "jsonl":
                    _out(json.dumps({"line": p.line, "tokens": count, "nll": nll if finite else None,
                                     "ppl": math.exp(nll) if finite else None}) + "\n")
                else:
                    _out(f"{count}\t{nll:.6f}\t{math.exp(nll) if finite else math.nan:.4f}\n")


# -- info and convert --------------------------------------------------------------------------
@command
def info(
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help="text, or jsonl for one JSON object.")] = "text",
    debug: DebugOpt = False,
) -> None:
    """Config, parameter count, files, dtype and where the model was loaded from."""
    from .loading import describe

    facts = describe(model, revision)
    if fmt == "jsonl":
        _out(json.dumps(facts) + "\n")
        return
    for key, value in facts.items():
        if isinstance(value, dict):
            _out(f"{key}:\n" + "".join(f"  {k}: {v}\n" for k, v in value.items()))
        else:
            _out(f"{key}: {value}\n")


@command
def convert(
    src: Annotated[str, typer.Argument(help="A model folder (fairseq release or Hub layout) or Hub id.")],
    dst: Annotated[Path, typer.Argument(help="Folder to write the Hub layout (safetensors) into.")],
    force: Annotated[bool, typer.Option(help="Write into a non-empty DST.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Write a checkpoint in the Hub layout: config.json, model.safetensors, vocab.json, merges.txt."""
    from .loading import convert as convert_checkpoint

    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not force)):
        raise UsageError(f"{dst}: exists and is not an empty folder (pass --force to write into it)")
    stderr.print(f"wrote {convert_checkpoint(src, dst)}")


# -- entry point -------------------------------------------------------------------------------
def _terminate(signum: int, frame: object) -> None:
    raise _Quit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    signal.signal(signal.SIGTERM, _terminate)
    code = 0
    try:
        result = typer.main.get_command(app).main(argv, prog_name="biogpt", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except _Quit as q:
        code = q.code
    except typer.TyperException as e:  # click's usage errors (bad option values, unknown options)
        if debug:
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            stderr.print(e.format_message(), markup=False)  # the help text
        else:
            print(f"error: {e.format_message()}".replace("\n", " "), file=sys.stderr)
        code = e.exit_code
    except BioGptError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # a bug, or a failure we did not foresee: still one line
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = code or 141
    if code == 141 or code in (130, 143):  # nothing more may reach a closed or abandoned stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code



def entry() -> None:
    """The `biogpt` executable: `main`, then exit without tearing the interpreter down, which
    frees a loaded model object by object (about half a second). Output is flushed first; files
    were closed by the commands."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
    os._exit(code)
