"""`biogpt embed`: one vector per input line, from the final hidden state."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Literal

import typer

from ..errors import InputError, NothingToEmbed
from ..hub import DEFAULT_MODEL
from .common import (
    FORWARD_BATCH,
    LENGTH_WINDOW,
    BatchOpt,
    DebugOpt,
    DeviceOpt,
    DTypeOpt,
    ErrorsOpt,
    ForceOpt,
    InputFormatOpt,
    InputOpt,
    ModelOpt,
    RevisionOpt,
    UsageError,
    command,
    device_or_usage_error,
    load,
    note_skipped,
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
    output: Annotated[str | None, typer.Option("--output", "-o", help="FILE.jsonl, or FILE.safetensors (a matrix).")]
    = None,
    force: ForceOpt = False,
    truncate: Annotated[bool, typer.Option(help="Embed the end of over-long lines instead of failing.")] = False,
    batch_size: BatchOpt = FORWARD_BATCH,
    dtype: DTypeOpt = "float32",
    device: DeviceOpt = "cpu",
    errors: ErrorsOpt = "strict",
    debug: DebugOpt = False,
) -> None:
    """Embeddings: the final hidden state (after the last layer norm), pooled per text; JSONL
    records {"line"/"id", "embedding"} or one safetensors matrix, rows in input order."""
    import torch

    from ..batch import batches
    from ..model import BioGptModel
    from ..output import LineWriter, check_output, whole_file
    from ..plans import text_ids
    from ..scoring import embed as pooled
    from .generate import prompt_source

    torch_device = device_or_usage_error(device)
    if output is not None and not output.endswith((".jsonl", ".safetensors")):
        raise UsageError(f"-o {output}: embed writes FILE.jsonl (records) or FILE.safetensors (a matrix)")
    matrix = output is not None and output.endswith(".safetensors")
    check_output(output, force=force, source=input)
    if prompt is not None and input is not None:
        raise UsageError("give a PROMPT or --input, not both")
    if prompt is None and input is None:
        if sys.stdin.isatty():
            raise UsageError("no text: give PROMPT, --input FILE, or pipe texts on stdin")
        input = "-"
    with prompt_source(prompt, input, input_format, errors, ("text", "prompt")) as items, whole_file(output) as target:
        lm, tok = load(model, revision, dtype, torch_device, cls=BioGptModel, kernels=True)
        writer = None if matrix else LineWriter.create(target)
        rows, keys, skipped = [], [], 0
        try:
            for group in batches(items, batch_size * LENGTH_WINDOW):
                kept = [p for p in group if p.text.strip()]
                skipped += len(group) - len(kept)
                if not kept:
                    continue
                ids = [text_ids(lm, tok, p, truncate, stderr.print, "embed") for p in kept]
                try:
                    vectors = pooled(lm, ids, pool, normalize=normalize, batch_size=batch_size)
                except NothingToEmbed as e:
                    raise InputError(f"{kept[e.index].where}{e.reason}") from None
                for p, v in zip(kept, vectors, strict=True):
                    key = {"id": p.id} if p.id is not None else {"line": p.line} if p.line else {}
                    if matrix:
                        rows.append(v)
                        keys.append(key)
                    else:
                        writer.write(json.dumps({**key, "embedding": [round(x, 6) for x in v.tolist()]}) + "\n")
        finally:
            if writer is not None:
                writer.close()
        if matrix:
            from ..loading import save_safetensors

            matrix = torch.stack(rows) if rows else torch.empty(0, lm.config.hidden_size)
            save_safetensors({"embeddings": matrix}, target,
                             metadata={"keys": json.dumps(keys), "pool": pool, "normalize": str(normalize).lower()})
        note_skipped(skipped)
