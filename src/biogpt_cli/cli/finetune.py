"""`biogpt finetune`: a task checkpoint from a base model and a task's training data (finetune.py)."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ..errors import InputError
from ..hub import DEFAULT_MODEL
from .common import (
    ARGV,
    DebugOpt,
    DeviceOpt,
    ModelOpt,
    QuietOpt,
    UsageError,
    command,
    counted,
    device_or_usage_error,
    progress,
    stderr,
)

# datasets.TASK_NAMES, spelled out: importing it reads the tokenizer's Moses tables, which `--help` need not
TaskName = Literal["pubmedqa", "bc5cdr", "ddi", "kd-dti", "hoc", "custom"]
Method = Literal["full", "prompt", "lora"]


@command
def finetune(
    train: Annotated[Path, typer.Argument(metavar="TRAIN", help="Training data, in the form the task's release "
                                                                "ships it.")],
    task: Annotated[TaskName, typer.Option(help="custom: JSONL records {\"source\", \"target\"}.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="FOLDER",
                                                   help="Folder to write the checkpoint into.")],
    model: ModelOpt = DEFAULT_MODEL,
    dev: Annotated[Path | None, typer.Option(metavar="FILE", help="Held-out data (same form): the task's "
                                                                  "metric each epoch.")] = None,
    method: Annotated[Method, typer.Option(help="What trains: everything, the prompt rows, or LoRA adapters "
                                                "(+ prompt rows).")] = "full",
    rank: Annotated[int, typer.Option(min=1, max=256, help="LoRA rank.")] = 8,
    lr: Annotated[float | None, typer.Option("--lr", min=0, show_default=False,
                                             help="Peak learning rate [the task's].")] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="Warm-up updates [the task's].")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Epochs [the task's].")] = None,
    updates: Annotated[int | None, typer.Option(min=1, help="Updates, instead of epochs (HoC: 20000).")] = None,
    tokens_per_update: Annotated[int | None, typer.Option(
        min=1, show_default=False, help="Tokens per optimizer update [32768; data smaller than that: about an "
                                        "eighth of an epoch, with a 10-update warm-up].")] = None,
    batch_tokens: Annotated[int, typer.Option(min=16, help="Padded tokens per forward pass (memory); an update "
                                                          "accumulates TOKENS_PER_UPDATE / BATCH_TOKENS.")] = 1024,
    prompt_tokens: Annotated[int | None, typer.Option(min=1, max=64, help="Learned prompt tokens [9; HoC 1].")] = None,
    source_limit: Annotated[int | None, typer.Option(min=2, help="Source tokens kept [the task's].")] = None,
    average: Annotated[int | None, typer.Option(min=1, help="Average the last K epochs' weights [5; HoC 1].")] = None,
    keep: Annotated[Literal["average", "best"], typer.Option(
        help="The checkpoint: the last --average epochs' mean (the release's), or the epoch best on --dev.")]
    = "average",
    patience: Annotated[int | None, typer.Option(min=1, help="Stop once --dev's metric has not improved for N "
                                                             "epochs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shuffles, new rows and dropout.")] = 1,
    recompute: Annotated[bool | None, typer.Option(show_default=False, help="Recompute activations in the backward "
                                                   "pass: less memory, more time [on for lora and prompt].")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in OUTPUT.")] = False,
    force: Annotated[bool, typer.Option(help="Start over in an OUTPUT that holds a run.")] = False,
    device: DeviceOpt = "cpu",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune a task checkpoint (the paper's recipe).

    The output folder is a checkpoint that `qa`, `extract` and `classify` run with no flag."""
    from .. import finetune as ft
    from ..datasets import read_examples
    from ..identity import file_sha256, model_identity
    from ..memory import check_training_fits

    torch_device = device_or_usage_error(device)
    if dev is not None and task == "custom":
        raise UsageError("--dev scores a task's answers with its metric: --task custom has none")
    if dev is None and (keep == "best" or patience):
        raise UsageError(f"{'--keep best' if keep == 'best' else '--patience'} goes by the dev metric: add --dev FILE")
    examples = read_examples(task, train)
    held_out = read_examples(task, dev) if dev is not None else []
    title_only = sum(1 for e in examples if e.fields.get("title") and not str(e.fields.get("abstract", "x")).strip())
    if title_only:
        stderr.print(f"note: {train}: {counted(title_only, 'title-only document')} (no abstract): trained on its "
                     "title, as the release's rebuild_data.py builds it", markup=False, highlight=False)
    _check_output(output, resume, force)
    given = {"lr": lr, "warmup": warmup, "epochs": epochs, "updates": updates, "prompt_tokens": prompt_tokens,
             "source_limit": source_limit, "average": average}
    recipe = dataclasses.replace(ft.RECIPES[task], **{k: v for k, v in given.items() if v is not None},
                                 **({"epochs": None} if updates else {"updates": None} if epochs else {}),
                                 tokens_per_update=tokens_per_update or ft.Recipe.tokens_per_update,
                                 batch_tokens=batch_tokens, seed=seed,
                                 method=method, rank=rank, keep=keep, patience=patience,
                                 recompute=method != "full" if recompute is None else recompute)
    identity = {"base_model": model, "base_sha256": model_identity(_folder(model))["sha256"], "task": task,
                "train": {"file": train.name, "sha256": file_sha256(train.resolve()), "examples": len(examples)}}
    run = ft.prepare(task, model, examples, output, recipe, torch_device, identity)
    fitted = _fit_small_data(run, warmup is None) if tokens_per_update is None else None
    identity["recipe"] = dataclasses.asdict(run.recipe)  # the run's own: resumed only by the same
    if resume:
        ft.check_same_run(output, identity)
    # what the optimizer holds moments of: an embedding's trained rows only
    trained = sum(p[getattr(p, "trained_from", 0):].numel() for g in run.groups for p in g["params"])
    try:
        check_training_fits(run.model.config, trained, batch_tokens, torch_device)
    except InputError as e:  # a value that cannot fit is a usage error, found before any training
        raise UsageError(str(e)) from None
    changing = sum(v.numel() for v in ft.trained_tensors(run.model).values())  # prompt, lora: the rows that train
    if held_out:
        from ..devset import dev_metrics

        run.dev = dev_metrics(task, held_out, run.tok)
    stderr.print(f"fine-tuning {model} on {counted(len(examples), 'example')} ({recipe.method}: "
                 f"{changing:,} parameters train), {counted(run.total_updates(), 'update')} to {output}",
                 markup=False, highlight=False)
    if fitted:
        stderr.print(fitted, markup=False, highlight=False)
    _note_small_data(run)
    try:
        _train(run, resume, quiet)
    except KeyboardInterrupt:
        args = shlex.join(a for a in ARGV if a not in ("--force", "--resume"))
        stderr.print(f"interrupted: {output} holds the last complete epoch; to continue: biogpt {args} --resume",
                     markup=False, highlight=False)
        raise


def _fit_small_data(run: Any, warmup: bool) -> str | None:
    """The release's updates are sized for its thousands of examples: a lab's few dozen would make
    one small step an epoch, and learn nothing. Data smaller than an update gets updates of about
    an eighth of an epoch (and, unless --warmup was given, a 10-update warm-up) where that makes
    several an epoch; the line that says so, or None."""
    small, r = _small_epoch(run), run.recipe
    if small is None:
        return None
    said, fit = small
    run.recipe = dataclasses.replace(r, tokens_per_update=fit, warmup=min(r.warmup, 10) if warmup else r.warmup)
    if run.updates_per_epoch() < 2:  # one forward pass holds the epoch: only a smaller --batch-tokens helps
        run.recipe = r
        return None
    return (f"{said}updates of {fit:,} tokens instead (about {run.updates_per_epoch()} an epoch)"
            f"{' and a warm-up of 10' if warmup and r.warmup > 10 else ''}; --tokens-per-update "
            f"{r.tokens_per_update} keeps the recipe's")


def _note_small_data(run: Any) -> None:
    """Say so when an epoch is still less than one update (--tokens-per-update given)."""
    small = _small_epoch(run)
    if small is None:
        return
    said, fit = small
    warmup = run.recipe.warmup
    outlasts = (f", and the warm-up of {warmup} updates outlasts all {run.total_updates()}"
                if warmup >= run.total_updates() else "")
    stderr.print(f"{said}each epoch makes a single small step{outlasts}. For data this small set "
                 f"--tokens-per-update {fit} --warmup 10 (about 8 updates an epoch)", markup=False, highlight=False)


def _small_epoch(run: Any) -> tuple[str, int] | None:
    """When an epoch is less than one update: the note's opening, and the update size that makes
    about eight an epoch (one --batch-tokens pass at least)."""
    tokens, r = sum(len(s) - 1 for s in run.train), run.recipe
    if tokens >= r.tokens_per_update:
        return None
    return (f"note: an epoch of these examples is {tokens:,} target tokens, less than one update of "
            f"{r.tokens_per_update:,}: ", max(r.batch_tokens, 1 << max(tokens // 8, 1).bit_length() - 1))


def _train(run: Any, resume: bool, quiet: bool) -> None:
    from .. import finetune as ft

    with progress(run.total_updates(), quiet, "updates") as update:
        def show(p: ft.Progress) -> None:
            if p.resumed:  # said once its state is read back, never before a state file is refused
                stderr.print(f"resuming {run.out} at epoch {p.epoch + 1} (epochs 1-{p.epoch} done)" if p.epoch else
                             f"resuming {run.out}", markup=False, highlight=False)
                return
            update(p.update, p.tokens, note=f"epoch {p.epoch} loss {p.loss:.3f}")
            if p.epoch_done:  # a line an epoch, above the bar on a terminal: the run's history at a glance
                dev = "".join(f", {k} {v:.4f}" for k, v in p.dev.items())
                stderr.print(f"epoch {p.epoch}: {p.update}/{p.total_updates} updates, loss {p.loss:.4f}, "
                             f"{p.tokens / max(p.seconds, 1e-9):,.0f} tok/s{dev}", markup=False, highlight=False)

        history = ft.train(run, resume, show)
    if not history:
        stderr.print(f"{run.out}: nothing left to train", markup=False)
        return
    last = history[-1]
    scores = "".join(f", {k} {v:.4f}" for k, v in last.items() if k.startswith("dev_"))
    stderr.print(f"wrote {run.out} (epoch {last['epoch']}, loss {last['loss']:.4f}{scores})", markup=False,
                 highlight=False)


def _folder(model: str) -> Path:
    from ..hub import resolve
    from ..loading import WEIGHT_FILES

    return resolve(model, None, ("config.json", "|".join(WEIGHT_FILES)))


def _check_output(output: Path, resume: bool, force: bool) -> None:
    from ..finetune import STATE
    from ..output import check_writable

    if output.exists() and not output.is_dir():
        raise UsageError(f"{output}: is a file; --output is the folder to write the checkpoint into")
    check_writable(output, output)
    has_run = (output / STATE / "state.pt").exists()
    if resume and force:
        raise UsageError("--resume continues a run and --force starts it over: pass one")
    if resume and not has_run:
        raise UsageError(f"{output}: holds no run to resume (no {STATE}/state.pt)")
    if not resume and output.exists() and any(output.iterdir()):
        if not force:
            hint = "--resume continues it, --force starts over" if has_run else "--force writes into it"
            raise UsageError(f"{output}: is not empty ({hint})")
        import shutil

        shutil.rmtree(output / STATE, ignore_errors=True)
