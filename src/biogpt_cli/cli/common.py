"""What every command shares: the Typer app, options, the stderr console, usage errors and the
loaded model (kept for the process)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import linecache
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from ..errors import BioGptError, InputError

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"max_content_width": 100})
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
ARGV: list[str] = []  # this command's arguments, for the resume command an interrupted run prints


class UsageError(BioGptError):
    """A bad option value or combination: exit 2, before any model is loaded."""


class Quit(BaseException):
    """Leaves through typer untouched (it is no Exception) and ends the process with `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


Format = Literal["text", "jsonl"]
OutputFormat = Literal["auto", "text", "jsonl"]
InputFormat = Literal["auto", "text", "jsonl", "pubmed", "bioc", "bioc-json", "pubtator", "release"]
TextPart = Literal["title", "abstract", "all"]
Errors = Literal["strict", "replace"]
DType = Literal["float32", "bfloat16", "float16"]
Quantize = Literal["none", "int8", "int4"]

ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="BIOGPT_MODEL",
                                       help="Model folder or Hugging Face Hub id.")]
TaskModelOpt = Annotated[str | None, typer.Option("--model", "-m", envvar="BIOGPT_MODEL", show_default=False,
                                                   help="The fine-tuned task checkpoint: folder or Hub id "
                                                        "(required).")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
OutputFormatOpt = Annotated[OutputFormat, typer.Option("--format", help="auto: JSONL for -o *.jsonl, else text.")]
TaskFormat = Literal["auto", "text", "jsonl", "pubtator", "bioc-json", "bioc-xml"]
TaskFormatOpt = Annotated[TaskFormat, typer.Option(
    "--format", help="auto: by -o's name: JSONL for *.jsonl, BioC for *.xml or *.json, PubTator for *.pubtator, "
                     "else text.")]
ErrorsOpt = Annotated[Errors, typer.Option("--errors", help="Invalid UTF-8 in the input: stop, or replace by U+FFFD.")]
FileArg = Annotated[str | None, typer.Argument(help="Input file, one item per line; '-' or nothing reads stdin.")]
SameInputOpt = Annotated[str | None, typer.Option("--input", "-i", help="The same as FILE, as the other commands "
                                                                        "take it.")]
InputOpt = Annotated[str | None, typer.Option("--input", "-i", help="Input file, one item per line ('-': stdin).")]
InputFormatOpt = Annotated[InputFormat, typer.Option(
    help="auto: by content and name: PubMed/MEDLINE XML, BioC XML or JSON, PubTator, the release's task files "
         "(.json, .tsv), JSONL (.jsonl), else lines of text.")]
TextOpt = Annotated[TextPart | None, typer.Option(
    "--text", show_default=False, help="Literature input: which text of each document: title, abstract or all "
                                       "(title and abstract as the release joins them) [all; generate: title].")]
SectionLabelsOpt = Annotated[bool, typer.Option(
    help="PubMed structured abstracts: keep each section's label (LABEL: text).")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Write here instead of stdout.")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite an existing --output file.")]
ResumeOpt = Annotated[bool, typer.Option(help="Finish an interrupted --output file of the same run.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Texts read in one forward pass (of similar length: less padding).")]
FORWARD_BATCH = 8  # texts read whole in one forward pass (score, embed, a classification head)
LENGTH_WINDOW = 16  # batches of texts read ahead and grouped by length (score, embed): less padding
DecodeBatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1, show_default=False,
    help="Inputs decoded together [16; 8 with beams, several sequences or a head; 4x that on a GPU].")]
TaskBatchOpt = Annotated[int | None, typer.Option(
    "--batch-size", min=1, show_default=False, help="Inputs decoded together [16; 64 on a GPU].")]
DTypeOpt = Annotated[DType, typer.Option(help="Weight precision.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")]
QuantizeOpt = Annotated[Quantize, typer.Option(help="CPU weights: int8 (dynamic) or int4 (group-wise).")]
SpeculateOpt = Annotated[Literal["auto", "ngram", "int8", "int4", "off"], typer.Option(
    help="Several tokens a forward pass, the same tokens: auto (what the grammar forces; drafts from the text "
         "for a prompt decoding alone), ngram (drafts from the text always), int8 / int4 (drafts from the model "
         "quantized, CPU), off.")]
DraftTokensOpt = Annotated[int, typer.Option(min=1, max=16, help="Tokens drafted from the text at most a pass.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Load time, counts and speed on stderr.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar on a terminal.")]
EngineOpt = Annotated[Literal["local", "ray"], typer.Option(help="ray: a Ray cluster (-i JSONL, -o FOLDER).")]
AddressOpt = Annotated[str | None, typer.Option(help="Ray cluster address [RAY_ADDRESS, else a local one].")]
WorkersOpt = Annotated[int, typer.Option(min=1, help="Ray: worker actors, each with the model loaded.")]
CpusOpt = Annotated[float, typer.Option(min=0, help="Ray: CPUs per worker (also its torch threads).")]
GpusOpt = Annotated[float, typer.Option(min=0, help="Ray: GPUs per worker (0: CPU workers).")]


@dataclasses.dataclass
class Engine:
    """Where a batch command runs: here, or on a Ray cluster (cluster.py)."""

    engine: str = "local"
    address: str | None = None
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    quiet: bool = False

    def __post_init__(self) -> None:  # a Ray option on a local run would be ignored: refused instead
        ray_only = {"--address": self.address is not None, "--workers": self.workers != 1,
                    "--cpus-per-worker": self.cpus_per_worker != 1.0, "--gpus-per-worker": self.gpus_per_worker != 0.0}
        given = [name for name, differs in ray_only.items() if differs]
        if self.engine == "local" and given:
            raise UsageError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to --engine ray")


def counted(n: int, noun: str) -> str:
    """`1 record`, `2 records`."""
    return f"{n} {noun}{'s' * (n != 1)}"


def note_skipped(blank: int) -> None:
    """The note a command that skips blank input lines ends with."""
    if blank:
        stderr.print(f"note: skipped {counted(blank, 'blank line')}")


def shows_progress(quiet: bool) -> bool:
    """Whether `progress` draws a bar: on a terminal, unless `quiet`. A caller counts a bar's total
    only then (counting reads the input once more)."""
    return not quiet and stderr.is_terminal


def eta_seconds(elapsed: float | None, done: float, total: float | None) -> float | None:
    """Time left at the run's average rate so far. Rows finish in bursts (a batch's rows end
    together), so rich's rate over the last seconds swings from zero to many times the truth."""
    if not elapsed or not done or total is None:
        return None
    return max(0.0, elapsed * (total - done) / done)


@contextlib.contextmanager
def progress(total: int | None, quiet: bool, unit: str = "items") -> Iterator[Callable[..., None]]:
    """A progress bar on stderr (done / total, a note, rate, elapsed, ETA) when `shows_progress`;
    `update(done, tokens=..., note=...)` moves it. Nothing at all otherwise: stdout stays clean."""
    if not shows_progress(quiet):
        yield lambda done, tokens=0, total=None, note="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Eta(ProgressColumn):
        def render(self, task: Any) -> Text:
            left = eta_seconds(task.elapsed, task.completed, task.total)
            minutes, seconds = divmod(round(left or 0), 60)
            shown = "-:--:--" if left is None else f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
            return Text(shown, style="progress.remaining")

    columns = [TextColumn(unit), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), Eta()]
    start = time.perf_counter()
    with Progress(*columns, console=stderr, transient=False, redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(unit, total=total, rate="", note="")

        def update(done: int, tokens: int = 0, total: int | None = None, note: str = "") -> None:
            rate = f"{tokens / (time.perf_counter() - start):.1f} tok/s" if tokens else ""
            bar.update(task, completed=done, rate=rate, note=note, **({"total": total} if total is not None else {}))
        yield update


@contextlib.contextmanager
def line_progress(path: str | None, output: str | None, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A bar of input records done (lines, or a literature file's documents), for a command that
    reads the file `path` into `output` (or a piped stdout: results on a terminal need no bar).
    None for a pipe, which cannot be counted without consuming it, or for no file (a PROMPT)."""
    from ..inputs import count_items

    shown = path is not None and shows_progress(quiet) and (output is not None or not sys.stdout.isatty())
    total = count_items(path) if shown else None
    with progress(total, total is None, "lines") as update:
        yield update


def command(fn: Callable[..., None] | None = None, *, name: str | None = None) -> Any:
    """Register a command (`name`: when it is not the function's, `list` say); a closed stdout
    ends it quietly."""
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                fn(*args, **kwargs)
                sys.stdout.flush()
            except BrokenPipeError:
                raise Quit(141) from None
        return app.command(name)(run)
    return register(fn) if fn is not None else register


def out(text: str) -> None:
    sys.stdout.write(text)


def file_or_input(file: str | None, input: str | None) -> str | None:
    """The input of a command that takes FILE or, like the others, -i FILE (None: neither)."""
    if file is not None and input is not None:
        raise UsageError("give FILE or --input, not both")
    return file if input is None else input


def output_format(fmt: OutputFormat, output: str | None) -> Format:
    """`--format auto`: JSONL when the output file's name ends in .jsonl, else text."""
    if fmt != "auto":
        return fmt
    return "jsonl" if output is not None and output.endswith(".jsonl") else "text"


def check_precision(quantize: str, dtype: str, device: Any) -> None:
    if quantize != "none" and (dtype != "float32" or device.type != "cpu"):
        raise UsageError(f"--quantize {quantize} runs on the CPU with its own activation precision: "
                         "drop --dtype/--device")


def device_or_usage_error(name: str) -> Any:
    from ..loading import parse_device

    try:
        return parse_device(name)
    except BioGptError as e:
        raise UsageError(str(e)) from None


def check_decode_memory(model: str, revision: str | None, rows: int, positions: int, what: str, dtype: str,
                        device: Any, new_tokens: int = 0) -> None:
    """Refuse, before the model loads, a run whose decoding rows cannot fit in memory (the config
    alone says what a row costs), or whose `-n` alone is past the model's positions. A checkpoint
    without config.json (the fairseq layout) is not checked here."""
    from ..config import BioGptConfig
    from ..hub import resolve
    from ..memory import check_rows_fit

    path = resolve(model, revision, ("config.json",)) / "config.json"
    if not path.is_file():
        return
    try:
        config = BioGptConfig.from_json(path)
        if new_tokens >= config.max_position_embeddings:
            raise InputError(f"-n {new_tokens}: more new tokens than the model's {config.max_position_embeddings} "
                             "positions, which the prompt and the new tokens share")
        check_rows_fit(config, rows, positions, what=what, dtype_bytes=2 if dtype != "float32" else 4, device=device)
    except InputError as e:
        raise UsageError(str(e)) from None


def load(model: str, revision: str | None, dtype: str, device: Any, quantize: str = "none",
         rows: int | None = None, cls: Any = None, kernels: bool | None = None, heads: bool = False) -> Any:
    """The model and tokenizer, with a spinner on stderr while it loads (on a terminal only);
    `rows=1` when one row is decoded at a time (the kernels may use a one-row layout); `cls` and
    `kernels` as `load_pretrained` takes them. A checkpoint with a classification head is refused
    unless `heads` (the task commands run it).

    Kept for the life of the process: a second command run in it reuses the model, and `entry`
    exits without freeing 1.4 GB object by object."""
    from ..loading import task_head

    loaded = _load(model, revision, dtype, device, quantize, rows, cls, kernels)
    end_startup()
    if cls is None and not heads and (head := task_head(loaded[0].config)):
        raise InputError(f"{model} has a {head} head: run it with `biogpt classify`")
    return loaded


@functools.lru_cache(maxsize=1)
def _load(model: str, revision: str | None, dtype: str, device: Any, quantize: str, rows: int | None,
          cls: Any, kernels: bool | None) -> Any:
    from ..loading import load_pretrained

    # importing torch formats stack traces (torch.cuda's lazy calls), which reads 1 MB of source
    # files into linecache: freed here, the vocabulary takes its place in the heap (2 MiB less peak)
    linecache.clearcache()
    with stderr.status(f"loading {model}", spinner="dots") if stderr.is_terminal else contextlib.nullcontext():
        return load_pretrained(model, revision=revision, dtype=dtype, device=device, quantize=quantize, rows=rows,
                               cls=cls, kernels=kernels)


def end_startup() -> None:
    """Turn the garbage collector back on once the start is over, if `entry` turned it off. What
    was built so far (torch, the model, the vocabulary) lives until exit: frozen, it is skipped
    by every later collection."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def run_on_ray(command: str, settings: dict[str, Any], engine: Engine, *, model: str, revision: str | None,
               dtype: str, device: str, quantize: str, input: str | None, output: str | None,
               batch_size: int | None, force: bool = False, fmt: str = "auto", input_format: str = "auto",
               ignored: dict[str, bool] | None = None, documents: tuple[str | None, bool] = (None, False)) -> None:
    """A batch command on Ray: the same plan in every worker, part files in the -o folder (emptied
    first with `force`). Every option takes effect in the workers or is refused here, before any
    work: `ignored` names the command's options that a Ray run has no use for, and whether given.
    `documents`: a literature input's `--text` and `--section-labels`."""
    from .. import cluster
    from ..config import BioGptConfig
    from ..identity import model_identity
    from ..loading import describe, task_head
    from ..plans import TEXT_FIELDS

    if "text" in (fmt, input_format):
        raise UsageError("--engine ray reads and writes JSONL records: drop --format text and --input-format text")
    if given := [name for name, on in (ignored or {}).items() if on]:
        raise UsageError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --engine ray: drop "
                         f"{'it' if len(given) == 1 else 'them'} (a re-run of the same command finishes a folder)")
    if quantize != "none" and engine.gpus_per_worker:
        raise UsageError(f"--quantize {quantize} runs on CPU workers: drop --gpus-per-worker, or --quantize")
    if device != "cpu" and not engine.gpus_per_worker:
        raise UsageError(f"--device {device}: Ray places workers on GPUs itself: give --gpus-per-worker N instead")
    if input is None or input == "-":
        raise UsageError("--engine ray reads a JSONL or literature file, or a folder of them: give -i PATH")
    if output is None:
        raise UsageError("--engine ray writes a folder of JSONL part files: give -o FOLDER")
    if output.removesuffix("/").endswith((".jsonl", ".json", ".txt")) and not os.path.isdir(output):
        raise UsageError(f"-o {output}: --engine ray writes a folder of part files, not one file: name a folder "
                         "(they join to one file with `cat FOLDER/part-*.jsonl`)")
    end_startup()  # the driver loads no model, and Ray's client makes garbage
    cluster.ray_module()
    described = describe(model, revision)  # a model that cannot load fails now
    config = BioGptConfig.from_dict(described["config"])
    if head := task_head(config):
        raise UsageError(f"{model} has a {head} head: it runs without --engine ray")
    check = None
    if command in ("qa", "extract", "classify"):
        from ..tasks import task_for

        source = task_for(command, settings.get("task"), config, model).source
        check = lambda p: source(p.fields)  # noqa: E731 -- each record's fields, checked before any work
    load = {"path_or_id": model, "revision": revision, "dtype": dtype, "quantize": quantize,
            "device": "cuda" if engine.gpus_per_worker else device}
    with progress(None, engine.quiet, "records") as update:
        now, before = cluster.run(command, settings, load, input, output, address=engine.address,
                                  workers=engine.workers, cpus_per_worker=engine.cpus_per_worker,
                                  gpus_per_worker=engine.gpus_per_worker, batch_size=batch_size,
                                  progress=lambda done, total: update(done, total=total), force=force,
                                  model_files=model_identity(described["loaded_from"]), check=check,
                                  reading=cluster.Reading(TEXT_FIELDS.get(command), input_format,
                                                          documents[0] or ("title" if command == "generate" else "all"),
                                                          documents[1]))
    already = f" ({before} were there already)" if before else ""
    stderr.print(f"{counted(now, 'record')} written to {output}{already}")
