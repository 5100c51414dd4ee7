"""`biogpt embed`: one vector per input line, from the final hidden state."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Literal

import typer

from ..hub import DEFAULT_MODEL
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
    InputOpt,
    ModelOpt,
    QuantizeOpt,
    QuietOpt,
    RevisionOpt,
    SectionLabelsOpt,
    TextOpt,
    UsageError,
    WorkersOpt,
    check_precision,
    command,
    device_or_usage_error,
    line_progress,
    load,
    note_skipped,
    run_on_ray,
    stderr,
)


@command
def embed(
    prompt: Annotated[str | None, typer.Argument(help="One text. Without it: --input, or stdin when piped.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    pool: Annotated[Literal["mean", "last"], typer.Option(help="Mean of the text's tokens, or the last token.")]
    = "mean",
    normalize: Annotated[bool, typer.Option(help="Scale each vector to length 1 (as the server's /v1/embeddings).")]
    = False,
    input: InputOpt = None,
    input_format: InputFormatOpt = "auto",
    text: TextOpt = None,
    section_labels: SectionLabelsOpt = False,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Write here instead of stdout (a FOLDER with "
                                                "--engine ray).")] = None,
    fmt: Annotated[Literal["auto", "text", "jsonl", "safetensors"], typer.Option(
        "--format", help="auto: a safetensors matrix for -o *.safetensors, else JSONL records; text: a line of "
                         "numbers per text.")] = "auto",
    force: ForceOpt = False,
    truncate: Annotated[bool, typer.Option(help="Embed the end of over-long lines instead of failing.")] = False,
    batch_size: BatchOpt = FORWARD_BATCH,
    dtype: DTypeOpt = "float32",
    device: DeviceOpt = "cpu",
    quantize: QuantizeOpt = "none",
    errors: ErrorsOpt = "strict",
    quiet: QuietOpt = False,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = 1,
    cpus_per_worker: CpusOpt = 1.0,
    gpus_per_worker: GpusOpt = 0.0,
    debug: DebugOpt = False,
) -> None:
    """One vector per text, for search and clustering.

    Embeddings: the final hidden state (after the last layer norm), pooled per text; JSONL
    records {"line"/"id", "embedding"} or one safetensors matrix, rows in input order."""
    import torch

    from ..batch import batches
    from ..model import BioGptModel
    from ..output import LineWriter, check_output, whole_file
    from ..plans import TEXT_FIELDS, embed_records, embed_vectors
    from .generate import input_identity, model_identity, prompt_source

    torch_device = device_or_usage_error(device)
    check_precision(quantize, dtype, torch_device)
    settings = {"pool": pool, "normalize": normalize, "truncate": truncate}
    where = Engine(engine, address, workers, cpus_per_worker, gpus_per_worker, quiet)
    if engine == "ray":
        if prompt is not None:
            raise UsageError("--engine ray reads a JSONL file or a folder of them: give -i PATH, not a PROMPT")
        return run_on_ray("embed", settings, where, model=model, revision=revision, dtype=dtype, device=device,
                          quantize=quantize, input=input, output=output, batch_size=batch_size, force=force,
                          fmt="text" if fmt in ("text", "safetensors") else "auto", input_format=input_format,
                          ignored={"--errors": errors != "strict"}, documents=(text, section_labels))
    if fmt == "auto":
        fmt = "safetensors" if output is not None and output.endswith(".safetensors") else "jsonl"
    matrix = fmt == "safetensors"
    if matrix and output in (None, "-"):
        raise UsageError("--format safetensors writes a matrix to a file: give -o FILE.safetensors")
    check_output(output, force=force, source=input)
    if prompt is not None and input is not None:
        raise UsageError("give a PROMPT or --input, not both")
    if prompt is None and input is None:
        if sys.stdin.isatty():
            raise UsageError("no text: give PROMPT, --input FILE, or pipe texts on stdin")
        input = "-"
    source = prompt_source(prompt, input, input_format, errors, TEXT_FIELDS["embed"], text, section_labels)
    with source as items:
        lm, tok = load(model, revision, dtype, torch_device, quantize, cls=BioGptModel, kernels=True)
        run = {"command": "embed", **settings, "format": fmt, **model_identity(lm, model, revision, dtype, quantize),
               **input_identity(prompt, input, output)}
        with whole_file(output, run, lambda: done - skipped) as target:  # records: lines, or rows of the matrix
            writer = None if matrix else LineWriter.create(target, name=output)
            rows, keys, skipped, done = [], [], 0, 0
            try:
                with line_progress(input, output, quiet) as update:
                    for group in batches(items, batch_size * LENGTH_WINDOW):
                        kept = [p for p in group if p.text.strip()]
                        skipped, done = skipped + len(group) - len(kept), done + len(group)
                        if matrix and kept:
                            rows.append(embed_vectors(lm, tok, kept, batch_size, settings, stderr.print))
                            keys.extend(p.origin for p in kept)
                        elif kept:
                            for r in embed_records(lm, tok, kept, batch_size, settings, stderr.print):
                                writer.write(dumps(r) if fmt == "jsonl" else " ".join(map(str, r["embedding"])) + "\n")
                        update(done)
            finally:
                if writer is not None:
                    writer.close()
            if matrix:
                from ..files import output_errors, write_safetensors

                with output_errors(output):
                    matrix_of = torch.cat(rows) if rows else torch.empty(0, lm.config.hidden_size)
                    write_safetensors({"embeddings": matrix_of}, target, metadata={
                        "keys": json.dumps(keys), **{k: str(v).lower() for k, v in settings.items()}})
        note_skipped(skipped)
