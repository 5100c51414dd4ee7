"""`biogpt qa`, `extract`, `classify` and `evaluate`: BioGPT's fine-tuned tasks (see tasks.py).

The task commands read records, build each model input as the original release does, and run
the same batch engine and output machinery as `generate`; records add the parsed result. A
classification checkpoint with a head (`BioGptForSequenceClassification` /
`BioGptForTokenClassification`) is a forward pass instead of generation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ..errors import InputError
from ..inputs import Prompt
from ..jsonl import dumps
from .common import (
    FORWARD_BATCH,
    AddressOpt,
    CpusOpt,
    DebugOpt,
    DeviceOpt,
    DraftTokensOpt,
    DTypeOpt,
    Engine,
    EngineOpt,
    ErrorsOpt,
    ForceOpt,
    GpusOpt,
    InputFormatOpt,
    InputOpt,
    OutputOpt,
    QuantizeOpt,
    QuietOpt,
    ResumeOpt,
    RevisionOpt,
    SectionLabelsOpt,
    SpeculateOpt,
    TaskBatchOpt,
    TaskFormatOpt,
    TaskModelOpt,
    TextOpt,
    UsageError,
    VerboseOpt,
    WorkersOpt,
    check_precision,
    command,
    counted,
    device_or_usage_error,
    out,
    run_on_ray,
    stderr,
)
from .generate import (
    check_batch_options,
    check_rows,
    input_identity,
    load_model,
    model_identity,
    no_file_options,
    progress_total,
    prompt_source,
    run_batch,
)

ExtractTask = Literal["bc5cdr", "ddi", "kd-dti"]
EvalTask = Literal["pubmedqa", "hoc", "ddi", "kd-dti", "bc5cdr"]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", min=0,
                                        help="New tokens at most; 0: until </s> or the positions left.")]
ConstrainedOpt = Annotated[bool, typer.Option(help="Answers can only be what the task allows (docs/tasks.md).")]
RelationsOpt = Annotated[str | None, typer.Option(
    help="With --constrained: the relation words (a file, one a line, or a,b,c); default: the checkpoint's.")]


@dataclasses.dataclass
class TaskRun:
    """Options every task command shares, as given on the command line."""

    model: str | None
    revision: str | None
    input: str | None
    input_format: str
    output: str | None
    fmt: str
    force: bool
    resume: bool
    batch_size: int | None
    max_new_tokens: int
    dtype: str
    device: str
    quantize: str
    errors: str
    verbose: bool
    engine: Engine
    documents: tuple[str | None, bool] = (None, False)  # a literature input's --text and --section-labels
    constrained: bool = False
    relations: str | None = None  # a file or a,b,c
    speculation: tuple[str, int] = ("auto", 8)  # --speculate, --draft-tokens


def _run(command_name: str, task_name: str | None, run: TaskRun, items: contextlib.AbstractContextManager) -> None:
    """Check options, open the input, load the model, then run the task over every record."""
    from ..generation import GenerationOptions
    from ..loading import task_head
    from ..plans import task_plan

    if run.model is None:
        raise UsageError(f"`biogpt {command_name}` runs a fine-tuned task checkpoint: give it with -m MODEL (or "
                         "$BIOGPT_MODEL); microsoft/biogpt is a language model, not one")
    torch_device = device_or_usage_error(run.device)
    check_precision(run.quantize, run.dtype, torch_device)
    settings = {"command": command_name, "task": task_name, "model": run.model, "max_new_tokens": run.max_new_tokens,
                "constrained": run.constrained, "relations": _relations(run.relations, run.constrained),
                "speculate": run.speculation[0], "draft_tokens": run.speculation[1]}
    if run.engine.engine == "ray":
        if run.fmt not in ("auto", "text", "jsonl"):
            raise UsageError(f"--format {run.fmt}: --engine ray writes JSONL records (convert them, or run locally)")
        return run_on_ray(command_name, settings, run.engine, model=run.model, revision=run.revision, dtype=run.dtype,
                          device=run.device, quantize=run.quantize, input=run.input, output=run.output,
                          batch_size=run.batch_size, force=run.force, fmt=run.fmt, input_format=run.input_format,
                          ignored={"--resume": run.resume, "--verbose": run.verbose,
                                   "--errors": run.errors != "strict"}, documents=run.documents)
    fmt = task_output_format(run.fmt, run.output)
    check_batch_options(run.input, run.output, fmt, run.force, run.resume)
    with items as records:
        check_rows(run.model, run.revision, GenerationOptions(), None, run.batch_size, run.dtype, torch_device)
        lm, tok = load_model(run.model, run.revision, run.dtype, torch_device, run.quantize, run.verbose,
                             speculate=run.speculation[0],
                             heads=command_name == "classify")
        if tok.prompt_note:
            stderr.print(f"note: {tok.prompt_note}", markup=False, highlight=False)
        if command_name == "classify" and task_head(lm.config):
            if fmt not in ("text", "jsonl"):
                raise UsageError(f"{run.model} has a classification head: its records are text or JSONL, not {fmt}")
            if run.max_new_tokens or run.constrained:
                raise UsageError(f"{run.model} has a classification head: it generates nothing, so "
                                 f"{'-n' if run.max_new_tokens else '--constrained'} does not apply")
            return _classify_with_head(lm, tok, records, run, fmt)
        plan = task_plan(lm, tok, settings, stderr.print)
        identity = {**plan.identity, **model_identity(lm, run.model, run.revision, run.dtype, run.quantize),
                    **input_identity(None, run.input, run.output)}
        run_batch(lm, tok, records, plan, run=identity, output=run.output, fmt=fmt, force=run.force,
                  resume=run.resume, batch_size=run.batch_size, verbose=run.verbose,
                  total=progress_total(run.input, run.output, run.engine.quiet),
                  quiet=run.engine.quiet)


def _relations(given: str | None, constrained: bool) -> list[str] | None:
    """`--relations`: a file of one relation a line, or a comma-separated list."""
    if given is None:
        return None
    if not constrained:
        raise UsageError("--relations goes with --constrained")
    path = Path(given)
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else given.replace(",", "\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--relations {given}: cannot read it ({e})") from None
    found = [w.strip().lower() for w in text.splitlines() if w.strip()]
    if not found:
        raise UsageError(f"--relations {given}: no relation words in it")
    return found


def task_output_format(fmt: str, output: str | None) -> str:
    """`--format auto` for a task command: by the output file's name (JSONL, BioC, PubTator), else text."""
    if fmt != "auto":
        return fmt
    name = (output or "").removesuffix(".gz")
    kinds = {".jsonl": "jsonl", ".xml": "bioc-xml", ".json": "bioc-json", ".pubtator": "pubtator"}
    return next((kind for suffix, kind in kinds.items() if name.endswith(suffix)), "text")


def _classify_with_head(lm: Any, tok: Any, records: Iterator[Prompt], run: TaskRun, fmt: str) -> None:
    """Sequence or token classification heads: one forward pass per batch, records in input order."""
    from ..batch import batches
    from ..output import open_output
    from ..scoring import classify_sequences, label_tokens
    from ..tasks import text_field

    identity = {"command": "classify", **model_identity(lm, run.model, run.revision, run.dtype, run.quantize),
                **input_identity(None, run.input, run.output)}
    with open_output(run.output, force=run.force, resume=run.resume, run=identity) as (writer, done):
        for batch in batches((p for p in records if p.fields and p.key not in done), run.batch_size or FORWARD_BATCH):
            texts = []
            for p in batch:
                try:
                    texts.append(text_field(p.fields, "text"))
                except InputError as e:
                    raise InputError(f"{p.where}{e}") from None
            if lm.config.architecture == "BioGptForSequenceClassification":
                results = classify_sequences(lm, [tok.encode(t) for t in texts])
            else:
                results = [{"entities": label_tokens(lm, tok, t)} for t in texts]
            lines = []
            for p, res in zip(batch, results, strict=True):
                lines.append(dumps({**res, **p.origin}).rstrip("\n") if fmt == "jsonl"
                             else res.get("label") or dumps(res["entities"]).rstrip("\n"))
            writer.write("".join(line + "\n" for line in lines), records=len(lines))


def _pubmedqa_json(path: str, reasoning_free: bool) -> Iterator[Prompt]:
    """The official PubMedQA file, {pmid: {QUESTION, CONTEXTS, LONG_ANSWER, ...}}: ids are the pmids."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise InputError(f"{path}: not a PubMedQA JSON file ({e}); for JSONL records in it, pass --input-format "
                         "jsonl") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(f"{path}: expected the PubMedQA layout, an object of pmid -> {{QUESTION, CONTEXTS, ...}}")
    for pmid, item in data.items():
        fields = {"question": item.get("QUESTION"), "context": item.get("CONTEXTS")}
        if reasoning_free:
            fields["long_answer"] = item.get("LONG_ANSWER")
        yield Prompt(0, "", pmid, fields)


def _items(text: str | None, fields: dict[str, Any] | None, input: str | None, input_format: str, errors: str,
           plain: bool = True, documents: tuple[str | None, bool] = (None, False)) -> contextlib.AbstractContextManager:
    """A single record from the command line, or the records of --input (stdin when piped); a
    literature file's documents as `documents` (--text, --section-labels) say."""
    if (text is not None or fields) and input is not None:
        raise UsageError("give the input on the command line or with --input, not both")
    if text is None and not fields and input is None:
        if sys.stdin.isatty():
            raise UsageError("no input: give it on the command line, --input FILE, or pipe records on stdin")
        input = "-"
    if input is None:
        no_file_options(input_format, errors)
        fields = fields or {"text": text}
        return contextlib.nullcontext(iter([Prompt(0, "", fields=fields)]))
    if not plain and input_format == "auto":
        input_format = "jsonl"  # qa has no plain-text form
    return prompt_source(None, input, input_format, errors, None, *documents)  # type: ignore[arg-type]


@command
def qa(
    question: Annotated[str | None, typer.Option(help="One question (with --context).")] = None,
    context: Annotated[str | None, typer.Option(help="The abstract that answers --question.")] = None,
    long_answer: Annotated[str | None, typer.Option(help="Reasoning-free form: the abstract's conclusion.")] = None,
    reasoning_free: Annotated[bool, typer.Option(help="PubMedQA JSON input: add LONG_ANSWER (Hub Large model).")]
    = False,
    model: TaskModelOpt = None, revision: RevisionOpt = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="JSONL records, or the official PubMedQA "
                                                                    ".json file ('-': stdin).")] = None,
    input_format: InputFormatOpt = "auto", output: OutputOpt = None, fmt: TaskFormatOpt = "auto",
    force: ForceOpt = False, resume: ResumeOpt = False, batch_size: TaskBatchOpt = None,
    max_new_tokens: MaxNewOpt = 0, constrained: ConstrainedOpt = False,
    speculate: SpeculateOpt = "auto", draft_tokens: DraftTokensOpt = 8,
    dtype: DTypeOpt = "float32", device: DeviceOpt = "cpu", quantize: QuantizeOpt = "none",
    errors: ErrorsOpt = "strict", verbose: VerboseOpt = False, quiet: QuietOpt = False, engine: EngineOpt = "local",
    address: AddressOpt = None, workers: WorkersOpt = 1, cpus_per_worker: CpusOpt = 1.0,
    gpus_per_worker: GpusOpt = 0.0, debug: DebugOpt = False,
) -> None:
    """PubMedQA: yes, no or maybe.

    From a fine-tuned QA checkpoint. Input: JSONL with question,
    context (and long_answer), or the official PubMedQA JSON file."""
    if (question is None) != (context is None):
        raise UsageError("--question and --context go together")
    fields = {k: v for k, v in (("question", question), ("context", context), ("long_answer", long_answer)) if v}
    if long_answer is not None and question is None:
        raise UsageError("--long-answer goes with --question and --context")
    official = input is not None and input.endswith(".json") and input_format == "auto"  # the PubMedQA layout
    if reasoning_free and not official:
        raise UsageError("--reasoning-free reads LONG_ANSWER from a PubMedQA .json file; elsewhere give the long "
                         'answer: --long-answer, or a "long_answer" field in JSONL records')
    run = TaskRun(model, revision, input, input_format, output, fmt, force, resume, batch_size, max_new_tokens,
                  dtype, device, quantize, errors, verbose,
                  Engine(engine, address, workers, cpus_per_worker, gpus_per_worker, quiet), constrained=constrained,
                  speculation=(speculate, draft_tokens))
    if official:
        if fields:
            raise UsageError("give the input on the command line or with --input, not both")
        items: contextlib.AbstractContextManager = contextlib.nullcontext(_pubmedqa_json(input, reasoning_free))
    else:
        items = _items(None, fields or None, input, input_format, errors, plain=False)
    _run("qa", None, run, items)


@command
def extract(
    text: Annotated[str | None, typer.Argument(help="One document. Without it: --input, or stdin when piped.")]
    = None,
    task: Annotated[ExtractTask | None, typer.Option(help="Needed when the checkpoint does not say.")] = None,
    model: TaskModelOpt = None, revision: RevisionOpt = None, input: InputOpt = None,
    input_format: InputFormatOpt = "auto", text_part: TextOpt = None, section_labels: SectionLabelsOpt = False,
    output: OutputOpt = None, fmt: TaskFormatOpt = "auto",
    force: ForceOpt = False, resume: ResumeOpt = False, batch_size: TaskBatchOpt = None,
    max_new_tokens: MaxNewOpt = 0, constrained: ConstrainedOpt = False, relations: RelationsOpt = None,
    speculate: SpeculateOpt = "auto", draft_tokens: DraftTokensOpt = 8,
    dtype: DTypeOpt = "float32", device: DeviceOpt = "cpu", quantize: QuantizeOpt = "none",
    errors: ErrorsOpt = "strict", verbose: VerboseOpt = False, quiet: QuietOpt = False, engine: EngineOpt = "local",
    address: AddressOpt = None, workers: WorkersOpt = 1, cpus_per_worker: CpusOpt = 1.0,
    gpus_per_worker: GpusOpt = 0.0, debug: DebugOpt = False,
) -> None:
    """Relation extraction: BC5CDR, DDI, KD-DTI.

    Relations (head, relation, tail) from an RE checkpoint: BC5CDR, DDI or KD-DTI. Input: JSONL
    with title and abstract (or text), or plain text lines."""
    if text_part is not None:
        raise UsageError(f"--text {text_part}: extract reads each document as its task does (BC5CDR and KD-DTI: "
                         "title and abstract joined as the release joins them; DDI: the abstract), whatever --text "
                         "says: leave it out")
    run = TaskRun(model, revision, input, input_format, output, fmt, force, resume, batch_size, max_new_tokens,
                  dtype, device, quantize, errors, verbose,
                  Engine(engine, address, workers, cpus_per_worker, gpus_per_worker, quiet),
                  (text_part, section_labels), constrained, relations, (speculate, draft_tokens))
    _run("extract", task, run, _items(text, None, input, input_format, errors, documents=run.documents))


@command
def classify(
    text: Annotated[str | None, typer.Argument(help="One document. Without it: --input, or stdin when piped.")]
    = None,
    model: TaskModelOpt = None, revision: RevisionOpt = None, input: InputOpt = None,
    input_format: InputFormatOpt = "auto", text_part: TextOpt = None, section_labels: SectionLabelsOpt = False,
    output: OutputOpt = None, fmt: TaskFormatOpt = "auto",
    force: ForceOpt = False, resume: ResumeOpt = False, batch_size: TaskBatchOpt = None,
    max_new_tokens: MaxNewOpt = 0, constrained: ConstrainedOpt = False,
    speculate: SpeculateOpt = "auto", draft_tokens: DraftTokensOpt = 8,
    dtype: DTypeOpt = "float32", device: DeviceOpt = "cpu", quantize: QuantizeOpt = "none",
    errors: ErrorsOpt = "strict", verbose: VerboseOpt = False, quiet: QuietOpt = False, engine: EngineOpt = "local",
    address: AddressOpt = None, workers: WorkersOpt = 1, cpus_per_worker: CpusOpt = 1.0,
    gpus_per_worker: GpusOpt = 0.0, debug: DebugOpt = False,
) -> None:
    """Document classification: HoC, or a head.

    HoC labels from the DC-HoC checkpoint, or label + scores / entities from a checkpoint with a
    classification head. Input: JSONL with text, or plain text lines."""
    run = TaskRun(model, revision, input, input_format, output, fmt, force, resume, batch_size, max_new_tokens,
                  dtype, device, quantize, errors, verbose,
                  Engine(engine, address, workers, cpus_per_worker, gpus_per_worker, quiet),
                  (text_part, section_labels), constrained, speculation=(speculate, draft_tokens))
    _run("classify", None, run, _items(text, None, input, input_format, errors, documents=run.documents))


@command
def evaluate(
    predictions: Annotated[str, typer.Argument(help="Our JSONL records (qa / extract / classify output).")],
    gold: Annotated[str, typer.Argument(help="The official gold file of the task's test set.")],
    task: Annotated[EvalTask, typer.Option(help="Which task's metric.")],
    entities: Annotated[str | None, typer.Option(help="bc5cdr: test.entities.json (mention -> MeSH id).")] = None,
    fmt: Annotated[Literal["text", "jsonl"], typer.Option("--format", help="A table, or one JSON object.")] = "text",
    debug: DebugOpt = False,
) -> None:
    """A task's metric over predictions and gold.

    The paper's metric for a task, computed as the original evaluation scripts do."""
    from rich.console import Console
    from rich.table import Table

    from ..evaluate import evaluate as compute

    scores = compute(task, predictions, gold, entities)
    if fmt == "jsonl":
        out(dumps({"task": task, **scores}))
        return
    out(f"{task}: {predictions}\n")  # a title of rich's would wrap a long path with padding
    values = [(name, f"{value:.4f}" if isinstance(value, float) else str(value)) for name, value in scores.items()]
    if not sys.stdout.isatty():  # a pipe or a file: plain lines, no box drawing
        out("".join(f"{name}\t{value}\n" for name, value in values))
    else:
        table = Table()
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in values:
            table.add_row(name, value)
        Console(highlight=False).print(table)
    if scores.get("missing"):
        stderr.print(f"note: {counted(scores['missing'], 'gold item')} without a prediction, counted as wrong")
    if scores.get("extra"):
        stderr.print(f"note: {counted(scores['extra'], 'prediction')} with no gold item, not scored")
