"""`biogpt info`, `convert`, `pull`, `list` and `rm`: what a checkpoint is, the Hub layout from any
layout, and the models kept in the Hugging Face cache (huggingface_hub's own cache functions, so
`list` and `rm` need no network), as `ollama pull` / `list` / `rm` keep theirs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import CheckpointError
from ..hub import DEFAULT_MODEL
from ..jsonl import dumps
from .common import DebugOpt, Format, ModelOpt, RevisionOpt, UsageError, command, out, stderr

FmtOpt = Annotated[Format, typer.Option("--format", help="A table, or JSONL: one object a model.")]


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
    from ..output import check_writable

    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst}: is a file; DST is the folder to write the checkpoint into")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise UsageError(f"{dst}: exists and is not an empty folder (pass --force to write into it)")
    check_writable(dst, dst)
    stderr.print(f"wrote {convert_checkpoint(src, dst)}")


@command
def pull(
    model: Annotated[str, typer.Argument(help="A Hugging Face Hub id (microsoft/biogpt, a fine-tuned task model).")],
    revision: RevisionOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Download a model into the Hugging Face cache.

    Its config, vocabulary and weights (safetensors where the repository has them), with a progress
    bar; what is in the cache already is not fetched again."""
    from ..hub import HUB_FILES, resolve
    from ..loading import WEIGHT_FILES

    if Path(model).expanduser().exists():
        raise UsageError(f"{model}: a local folder is used as it is: nothing to pull")
    try:
        folder = resolve(model, revision, ("config.json", *HUB_FILES, "|".join(WEIGHT_FILES)))
    except CheckpointError as e:  # its hint is the other commands' (`pull` has no --model)
        raise CheckpointError(str(e).replace("pass --model PATH for a local folder", "a local folder needs no "
                                             "pull (give it to the other commands' -m)")) from None
    stderr.print(f"pulled {model} into {folder}", markup=False, highlight=False)


@command(name="list")
def list_models(
    dir: Annotated[list[Path] | None, typer.Option(help="Also list the model folders in DIR (finetune's -o).")]
    = None,
    fmt: FmtOpt = "text",
    debug: DebugOpt = False,
) -> None:
    """The models in the Hugging Face cache (and in --dir folders).

    Id, revision, size on disk and task (a fine-tuned checkpoint says which); no network."""
    from ..store import cached_models, folder_models

    rows = [*cached_models(), *(m for d in dir or () for m in folder_models(d))]
    if fmt == "jsonl":
        out("".join(dumps(r) for r in rows))
        return
    width = max((len(r["id"]) for r in rows), default=5)
    out(f"{'model':{width}}  {'revision':10}  {'size':>9}  task\n")
    out("".join(f"{r['id']:{width}}  {r['revision'][:10]:10}  {r['size']:>9}  {r['task'] or '-'}\n" for r in rows))


@command
def rm(
    model: Annotated[str, typer.Argument(help="A Hub id in the cache.")],
    revision: Annotated[str | None, typer.Option(help="Only this revision (a commit, or a branch or tag).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Remove a model from the Hugging Face cache.

    Every cached revision of it, or --revision's; asks first unless --yes. No network."""
    import sys

    from ..store import remove

    plan = remove(model, revision)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"rm {model}: would free {plan.expected_freed_size_str}; pass --yes to remove it")
        typer.confirm(f"remove {model} ({plan.expected_freed_size_str})?", abort=True, err=True)
    plan.execute()
    stderr.print(f"removed {model}: {plan.expected_freed_size_str} freed", markup=False, highlight=False)
