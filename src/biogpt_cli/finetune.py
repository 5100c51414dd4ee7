"""`biogpt finetune`: the original release's fine-tuning recipe (its `examples/*/train.sh`), in
plain PyTorch.

Each example is the task command's own input (`</s>`, the source, `learned1..N`) followed by
the verbalised target and `</s>`; the loss is cross-entropy over the whole sequence, as fairseq's
criterion takes it. Adam (0.9, 0.98) with decoupled weight decay, fairseq's inverse-square-root
schedule, updates of about 32k tokens made of micro-batches of `batch_tokens` (sorted by length,
in a seeded random order each epoch), and at the end the average of the last K epochs' weights.

A run keeps its state in `OUT/.finetune/`: each epoch's trained tensors (the last K) and the
optimizer, schedule and random state after it. The folder holds a usable checkpoint after every
epoch, and `resume` continues from the last complete epoch to the same weights an uninterrupted
run gives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import TrainedRows, add_lora, merged_weights, plain_state, train_rows_from
from .datasets import Example, task_of
from .errors import InputError
from .files import output_errors, save_torch, write_safetensors, write_text
from .model import causal_lm_loss
from .tasks import TASKS, build_input, parse, source_limit
from .tokenizer import EOS_ID, PAD_ID, BioGptTokenizer

STATE = ".finetune"


@dataclass(frozen=True)
class Recipe:
    """How to train; the defaults are each task's `train.sh` (see RECIPES)."""

    lr: float
    warmup: int
    epochs: int | None = None  # stop after this many epochs ...
    updates: int | None = None  # ... or this many updates
    prompt_tokens: int = 9
    average: int = 5  # the last K epochs' weights are averaged into the checkpoint
    tokens_per_update: int = 32768  # fairseq's --max-tokens 1024 x --update-freq 32
    batch_tokens: int = 1024  # padded tokens per forward pass: what bounds activation memory
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_init_lr: float = 1e-7
    seed: int = 1
    method: str = "full"  # full | prompt | lora
    rank: int = 8
    alpha: float = 16.0
    source_limit: int | None = None  # the task's default when None
    recompute: bool = False  # recompute each layer's activations in the backward pass (less memory)
    keep: str = "average"  # the checkpoint: the last `average` epochs' mean (the release's), or the best dev epoch
    patience: int | None = None  # stop once the dev metric has not improved for this many epochs

    @property
    def accumulate(self) -> int:
        return max(1, self.tokens_per_update // self.batch_tokens)


RECIPES = {
    "pubmedqa": Recipe(1e-5, 100, epochs=100),
    "bc5cdr": Recipe(1e-5, 100, epochs=100),
    "ddi": Recipe(1e-4, 500, epochs=100),
    "kd-dti": Recipe(1e-5, 1000, epochs=30),
    "hoc": Recipe(1e-5, 1000, updates=20000, prompt_tokens=1, average=1),
    "custom": Recipe(1e-5, 100, epochs=10, average=1),
}


def learning_rate(r: Recipe, update: int) -> float:
    """fairseq's inverse_sqrt: linear warm-up from `warmup_init_lr`, then lr * sqrt(warmup / update)."""
    if update < r.warmup:
        return r.warmup_init_lr + update * (r.lr - r.warmup_init_lr) / r.warmup
    return r.lr * math.sqrt(r.warmup / max(update, 1))


# -- data --------------------------------------------------------------------------------------
def encode(task: str, examples: Sequence[Example], tok: BioGptTokenizer, limit: int, positions: int) -> list[list[int]]:
    """Each example's ids: the task command's input, then the target and `</s>` (the source is
    cut further when the target would not fit the model's positions)."""
    seqs = []
    for ex in examples:
        target = [*tok.encode(ex.target, add_special_tokens=False), EOS_ID]
        room = min(limit, positions - 1 - len(tok.prompt_ids) - len(target))
        if room < 2:
            raise InputError(f"record {ex.id}: its target takes {len(target)} of the model's {positions} positions")
        try:
            seqs.append(build_input(task_of(task), tok, ex.fields, room) + target)
        except InputError as e:
            raise InputError(f"record {ex.id}: {e}") from None
    return seqs


def relation_vocabulary(task: str, examples: Sequence[Example]) -> tuple[str, ...]:
    """DDI / KD-DTI: the relation words the targets use, which `extract --constrained` allows."""
    if task not in ("ddi", "kd-dti"):
        return ()
    return tuple(sorted({r["relation"] for ex in examples for r in parse(task_of(task), ex.target) or ()}))


def epoch_batches(lengths: Sequence[int], epoch: int, r: Recipe) -> list[list[int]]:
    """Micro-batches of example indices for one epoch: a seeded shuffle, sorted by length (so
    little is padding), cut at `batch_tokens` padded tokens, in a seeded random order."""
    g = torch.Generator().manual_seed(r.seed * 1_000_003 + epoch)
    order = sorted(torch.randperm(len(lengths), generator=g).tolist(), key=lambda i: lengths[i])
    batches: list[list[int]] = [[]]
    for i in order:
        if batches[-1] and max(lengths[i], max(lengths[j] for j in batches[-1])) * (len(batches[-1]) + 1) \
                > r.batch_tokens:
            batches.append([])
        batches[-1].append(i)
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def collate(seqs: Sequence[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Right-padded ids, the attention mask (None when no row is padded) and labels (-100 at pads)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = labels[i, :len(s)] = torch.tensor(s)
    mask = None if all(len(s) == width for s in seqs) else (labels != -100).long().to(device)
    return ids.to(device), mask, labels.to(device)


# -- the model being trained -------------------------------------------------------------------
def with_prompt_rows(model: nn.Module, tok: BioGptTokenizer, n: int, seed: int) -> int:
    """Append `n` learned prompt tokens to the vocabulary and rows to the (tied) embedding,
    initialised as fairseq initialises embeddings; returns the first new row. A checkpoint that
    has its prompt already keeps it (n must then match)."""
    have = len(tok.prompt_ids)
    if have:
        if have != n:
            raise InputError(f"the base model already has {have} learned prompt tokens, not {n}: "
                             f"pass --prompt-tokens {have}")
        return tok.prompt_ids[0]
    old = model.biogpt.embed_tokens.weight
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(n, old.shape[1], generator=g, dtype=torch.float32) * old.shape[1] ** -0.5
    model.biogpt.embed_tokens.weight = nn.Parameter(torch.cat([old.detach(), new.to(old.dtype)]))
    model.biogpt.embed_tokens.num_embeddings = old.shape[0] + n
    model.tie_weights()
    tok.add_prompt_tokens(n)
    return old.shape[0]


def trainable(model: nn.Module, r: Recipe, first_prompt_row: int) -> list[dict[str, Any]]:
    """Set which tensors train (by method) and return the optimizer's parameter groups."""
    from .loading import release

    embedding = model.biogpt.embed_tokens.weight
    model.biogpt.gradient_checkpointing = r.recompute
    if r.method == "full":
        model.requires_grad_(True)
        for p in model.parameters():  # owned memory (a mapped checkpoint is read-only); the file's pages go back
            mapped, p.data = p.data, p.data.clone()
            release(mapped)
        return [{"params": list(model.parameters()), "weight_decay": r.weight_decay}]
    if r.method == "lora":
        add_lora(model, r.rank, r.alpha)
    else:
        model.requires_grad_(False)
    embedding.data = embedding.data.clone()
    train_rows_from(embedding, first_prompt_row)
    adapters = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    groups = [{"params": [embedding], "weight_decay": 0.0}, {"params": adapters, "weight_decay": r.weight_decay}]
    return [g for g in groups if g["params"]]


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an epoch changed: each trained tensor, and of an embedding that trains only its learned
    prompt rows (`prompt`, `lora`), those rows (its last ones)."""
    return {n: p.detach()[getattr(p, "trained_from", 0):] for n, p in model.named_parameters() if p.requires_grad}


def with_trained(whole: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """`whole` with a snapshot's trained tensor in place: all of it, or its last rows."""
    if trained.shape == whole.shape:
        return trained
    merged = whole.clone()
    merged[whole.shape[0] - trained.shape[0]:] = trained
    return merged


@dataclass
class Progress:
    """What a front end shows: after each update (`update`), and after each epoch (`epoch_done`)."""

    epoch: int
    update: int
    total_updates: int
    loss: float
    tokens: int = 0  # trained this run (for tokens/s)
    seconds: float = 0.0
    dev: dict[str, float] = field(default_factory=dict)
    epoch_done: bool = False
    resumed: bool = False  # the run's state was read back: it goes on after `epoch`


class Trainer:
    """The optimizer, the schedule and one update at a time over micro-batches."""

    def __init__(self, model: nn.Module, r: Recipe, groups: list[dict[str, Any]], device: torch.device) -> None:
        self.model, self.r, self.device = model, r, device
        self.rows = [TrainedRows(p) for g in groups for p in g["params"] if hasattr(p, "trained_from")]
        stepped = {id(t.embedding): t.rows for t in self.rows}  # an embedding's trained rows stand in for it
        groups = [{**g, "params": [stepped.get(id(p), p) for p in g["params"]]} for g in groups]
        self.opt = torch.optim.AdamW(groups, lr=r.warmup_init_lr, betas=r.betas, eps=1e-8)
        self.updates = 0

    def update(self, batches: Sequence[Sequence[list[int]]]) -> tuple[float, int]:
        """One optimizer step over `batches`; the loss is the mean over all their target tokens."""
        tokens = sum(len(s) - 1 for b in batches for s in b)
        for g in self.opt.param_groups:
            g["lr"] = learning_rate(self.r, self.updates)
        total = 0.0
        for b in batches:
            ids, mask, labels = collate(b, self.device)
            with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = self.model(ids, attention_mask=mask).logits
            loss = causal_lm_loss(logits, labels, "sum")
            (loss / tokens).backward()
            total += loss.item()
        for t in self.rows:
            t.gather()
        self.opt.step()
        for t in self.rows:
            t.scatter()
        self.opt.zero_grad(set_to_none=True)
        self.updates += 1
        return total / tokens, tokens

    def save(self, folder: Path, epoch: int, history: list[dict[str, Any]], identity: dict[str, Any]) -> None:
        """The epoch's trained tensors, then (atomically) the state that makes them resumable."""
        state_dir = folder / STATE
        cuda = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []
        state = {"epoch": epoch, "updates": self.updates, "optimizer": self.opt.state_dict(),
                 "rng": torch.get_rng_state(), "cuda_rng": cuda, "history": history}
        with output_errors(folder):  # a full disk: one line; the last complete epoch stays resumable
            state_dir.mkdir(parents=True, exist_ok=True)
            write_safetensors({k: v.contiguous() for k, v in trained_tensors(self.model).items()},
                              state_dir / f"epoch-{epoch}.safetensors")
            write_text(state_dir / "run.json", json.dumps(identity))
            save_torch(state, state_dir / "state.pt")
        best = best_epoch(history, identity["task"])
        for old in snapshots(folder)[:-self.r.average]:
            if int(old.stem.split("-")[1]) != best:  # the best dev epoch is kept for `keep best`
                old.unlink()

    def restore(self, folder: Path, identity: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        """Continue after the last complete epoch; refused when the run was another one."""
        from .loading import read_safetensors

        check_same_run(folder, identity)
        state = read_state(folder / STATE / "state.pt")
        saved = read_safetensors(folder / STATE / f"epoch-{state['epoch']}.safetensors")
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in saved:
                    p.copy_(with_trained(p, saved[name]))
        for t in self.rows:
            t.pull()
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.updates = state["updates"]
        return state["epoch"], state["history"]


def read_state(path: Path) -> dict[str, Any]:
    """A run's state (tensors, numbers, lists, dicts), read without running any pickled code: a
    state file that pickles anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: refused: it pickles objects other than a run's state, and loading it could "
                         "run code; --force starts the run over") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise InputError(f"{path}: cannot read the run's state ({e}); --force starts the run over") from None


def best_epoch(history: list[dict[str, Any]], task: str) -> int | None:
    """The epoch of the best dev score in the task's headline metric (F1; PubMedQA's accuracy),
    the earliest of equals."""
    key = f"dev_{TASKS[task].headline}"
    scored = [(h[key], -h["epoch"]) for h in history if key in h]
    return -max(scored)[1] if scored else None


def stalled(history: list[dict[str, Any]], patience: int | None, task: str) -> bool:
    """Whether the dev metric has not improved for `patience` epochs (early stopping)."""
    best = best_epoch(history, task)
    return bool(patience and best is not None and history[-1]["epoch"] - best >= patience)


def check_same_run(folder: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume `folder` as the run `identity` describes when it was another run."""
    path = folder / STATE / "run.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        _same_run(saved)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{path}: unreadable, so a resume cannot tell whether it is the same run; --force starts "
                         "it over") from None
    theirs, ours = _same_run(saved), _same_run(json.loads(json.dumps(identity)))  # as JSON keeps it
    if theirs != ours:
        from .output import differences

        raise InputError(f"{folder} was trained with other settings or data ({'; '.join(differences(theirs, ours))}): "
                         "--resume continues the same run; use another -o to start a new one")


def _same_run(identity: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the one it continues: base weights, data and recipe; its
    length may grow (more epochs or updates), and paths may be spelled differently."""
    recipe = {k: v for k, v in identity["recipe"].items() if k not in ("epochs", "updates")}
    return {"base_sha256": identity["base_sha256"], "task": identity["task"], "train": identity["train"]["sha256"],
            "recipe": recipe}


def snapshots(folder: Path) -> list[Path]:
    """The kept epochs' trained tensors, oldest first."""
    return sorted((folder / STATE).glob("epoch-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))


def averaged_state(model: nn.Module, paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The plain model's weights with each trained tensor the mean of its kept epochs (adapters
    merged first: the mean of the merged weights, not of A and B apart)."""
    from .loading import read_safetensors

    sums: dict[str, torch.Tensor] = {}
    for path in paths:
        for name, value in merged_weights(model, read_safetensors(path)).items():
            sums[name] = sums[name] + value.float() if name in sums else value.float().clone()
    state = plain_state(model)
    return {**state, **{k: with_trained(state[k], (v / len(paths)).to(state[k].dtype)) for k, v in sums.items()}}


# -- a run -------------------------------------------------------------------------------------
@dataclass
class Run:
    """A fine-tuning run: the base model loaded for training, the data encoded, where it goes."""

    task: str
    model: nn.Module
    tok: BioGptTokenizer
    recipe: Recipe
    train: list[list[int]]
    out: Path
    identity: dict[str, Any]  # base model, data and recipe: what makes two runs the same
    groups: list[dict[str, Any]]  # the optimizer's parameter groups
    device: torch.device = torch.device("cpu")
    dev: Callable[[nn.Module], dict[str, float]] | None = None  # metrics of the model being trained

    def updates_per_epoch(self) -> int:
        return math.ceil(len(epoch_batches([len(s) for s in self.train], 0, self.recipe)) / self.recipe.accumulate)

    def total_updates(self) -> int:
        r = self.recipe
        return r.updates if r.updates else (r.epochs or 1) * self.updates_per_epoch()

    def finished(self, epoch: int, updates: int) -> bool:
        r = self.recipe
        return updates >= self.total_updates() or (not r.updates and epoch >= (r.epochs or 1))


def prepare(task: str, base: str, examples: Sequence[Example], out: Path, r: Recipe, device: torch.device,
            identity: dict[str, Any]) -> Run:
    """Load `base` for training (float32, plain modules), add the prompt, encode the data."""
    from .loading import load_pretrained

    torch.manual_seed(r.seed)
    model, tok = load_pretrained(base, kernels=False, dtype="float32")
    first = with_prompt_rows(model, tok, r.prompt_tokens, r.seed)
    limit = r.source_limit or source_limit(task_of(task), model.config)
    model.config = dataclasses.replace(model.config, vocab_size=tok.vocab_size, learned_prompt=r.prompt_tokens,
                                       task=None if task == "custom" else task, max_source_positions=limit,
                                       relations=relation_vocabulary(task, examples))
    seqs = encode(task, examples, tok, limit, model.config.max_position_embeddings)
    groups = trainable(model, r, first)
    model.to(device)
    return Run(task, model, tok, r, seqs, out, identity, groups, device)


def train(run: Run, resume: bool = False, on_progress: Callable[[Progress], None] = lambda p: None) -> list[dict]:
    """Train to the recipe's end, saving after every epoch; returns each epoch's loss and metrics."""
    r, model = run.recipe, run.model
    trainer = Trainer(model, r, run.groups, run.device)
    epoch, history = trainer.restore(run.out, run.identity) if resume else (0, [])
    lengths, total = [len(s) for s in run.train], run.total_updates()
    if resume:
        on_progress(Progress(epoch, trainer.updates, total, history[-1]["loss"] if history else 0.0, resumed=True))
    started, trained = time.perf_counter(), 0
    while not run.finished(epoch, trainer.updates) and not stalled(history, r.patience, run.task):
        epoch += 1
        model.train()
        batches, losses = epoch_batches(lengths, epoch, r), []
        for k in range(0, len(batches), r.accumulate):
            if trainer.updates >= total:
                break
            loss, tokens = trainer.update([[run.train[i] for i in b] for b in batches[k:k + r.accumulate]])
            losses.append(loss)
            trained += tokens
            on_progress(Progress(epoch, trainer.updates, total, loss, trained, time.perf_counter() - started))
        model.eval()
        with torch.no_grad():
            dev = run.dev(model) if run.dev else {}
        history.append({"epoch": epoch, "updates": trainer.updates, "loss": sum(losses) / max(len(losses), 1), **dev})
        trainer.save(run.out, epoch, history, run.identity)
        export(run, history, complete=run.finished(epoch, trainer.updates) or stalled(history, r.patience, run.task))
        on_progress(Progress(epoch, trainer.updates, total, history[-1]["loss"], trained,
                             time.perf_counter() - started, dev, epoch_done=True))
    return history


def export(run: Run, history: list[dict[str, Any]], complete: bool) -> None:
    """The Hub-layout checkpoint of the kept epochs' average, and its training manifest."""
    from .loading import write_checkpoint

    kept = snapshots(run.out)
    if run.recipe.keep == "best" and (best := best_epoch(history, run.task)) is not None:
        kept = [p for p in kept if int(p.stem.split("-")[1]) == best]
    else:  # the last `average` epochs (a best epoch kept beside them is not among them)
        kept = kept[-run.recipe.average:]
    state = averaged_state(run.model, kept)
    manifest = {**run.identity, "complete": complete, "averaged_epochs": [int(p.stem.split("-")[1]) for p in kept],
                "history": history}
    write_checkpoint(run.out, run.model.config, {k: v.cpu() for k, v in state.items()}, run.tok,
                     extra={"training.json": json.dumps(manifest, indent=2) + "\n"})
