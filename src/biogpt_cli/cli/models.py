"""`biogpt info` and `biogpt convert`: what a checkpoint is, and the Hub layout from any layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..hub import DEFAULT_MODEL
from ..jsonl import dumps
from .common import DebugOpt, Format, ModelOpt, RevisionOpt, UsageError, command, out, stderr


@command
def info(
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help="text, or jsonl for one JSON object.")] = "text",
    debug: DebugOpt = False,
) -> None:
    """What a checkpoint is.

    Config, task, parameter count, files, dtype and where the model was loaded from."""
    from ..loading import describe

    facts = describe(model, revision)
    if fmt == "jsonl":
        out(dumps(facts))
        return
    for key, value in facts.items():  # JSON's keys and values, as a person reads them
        name = key.replace("_", " ")
        if isinstance(value, dict):
            out(f"{name}:\n" + "".join(f"  {k}: {v}\n" for k, v in value.items()))
        else:
            out(f"{name}: {', '.join(value) if isinstance(value, list) else '-' if value is None else value}\n")


@command
def convert(
    src: Annotated[str, typer.Argument(help="A model folder (fairseq release or Hub layout) or Hub id.")],
    dst: Annotated[Path, typer.Argument(help="Folder to write the Hub layout (safetensors) into.")],
    force: Annotated[bool, typer.Option(help="Write into a non-empty DST.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Any checkpoint to the Hub layout (safetensors).

    Write a checkpoint in the Hub layout: config.json, model.safetensors, vocab.json, merges.txt."""
    from ..loading import convert as convert_checkpoint

    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst}: is a file; DST is the folder to write the checkpoint into")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise UsageError(f"{dst}: exists and is not an empty folder (pass --force to write into it)")
    stderr.print(f"wrote {convert_checkpoint(src, dst)}")
