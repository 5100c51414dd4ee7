"""A task's metric on held-out examples during fine-tuning: the model answers them as the task
command would (same input, greedy, same post-processing), and `evaluate` scores the answers
against the examples' own targets, parsed by the same task parser."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .datasets import Example, task_of
from .evaluate import evaluate
from .inputs import Prompt
from .jsonl import dumps
from .tasks import parse
from .tokenizer import BioGptTokenizer

HEADLINE = ("accuracy", "f1", "precision", "recall")


Metrics = Callable[[nn.Module], dict[str, float]]


def dev_metrics(task: str, examples: Sequence[Example], tok: BioGptTokenizer) -> Metrics:
    """A function of the model being trained that returns `dev_accuracy` or `dev_f1`, ... ."""
    from .plans import generated_records, task_plan

    spec = task_of(task)
    new = max(len(tok.encode(e.target, add_special_tokens=False)) for e in examples) + 8
    items = [Prompt(i + 1, "", e.id, dict(e.fields)) for i, e in enumerate(examples)]
    settings = {"command": spec.command, "task": task, "model": "the model being fine-tuned", "max_new_tokens": new}

    def metrics(model: nn.Module) -> dict[str, float]:
        plan = task_plan(model, tok, settings, lambda message: None)
        records = [line for lines in generated_records(model, tok, plan, items, None) for line in lines]
        with tempfile.TemporaryDirectory() as tmp:
            predictions = Path(tmp) / "predictions.jsonl"
            predictions.write_text("".join(records), encoding="utf-8")
            scores = evaluate(task, predictions, *_gold_files(task, examples, Path(tmp)))
        return {f"dev_{k}": round(float(v), 4) for k, v in scores.items() if k in HEADLINE}

    return metrics


def _gold_files(task: str, examples: Sequence[Example], tmp: Path) -> tuple[Path, Path | None]:
    """The examples' targets in the gold format `evaluate` reads for the task (and BC5CDR's
    name -> id map, here each name its own id: names are matched as written)."""
    spec = task_of(task)
    gold = [(e.id, parse(spec, e.target)) for e in examples]
    path, entities = tmp / "gold", None
    if task == "pubmedqa":
        path.write_text(json.dumps(dict(gold)))
    elif task == "hoc":
        path.write_text("".join(f"x\t{'|'.join(labels or [])}\n" for _, labels in gold))
    elif task in ("ddi", "kd-dti"):
        path.write_text(json.dumps({i: {"triples": [{"drug": r["head"], "target": r["tail"],
                                                     "interaction": r["relation"]} for r in rels or []]}
                                    for i, rels in gold}))
    else:
        path.write_text("".join(f"{i}|t|\n" + "".join(f"{i}\tCID\t{r['head']}\t{r['tail']}\n" for r in rels or [])
                                for i, rels in gold))
        names: dict[str, Any] = {"chemical2id": {}, "disease2id": {}}
        for _, rels in gold:
            for r in rels or []:
                names["chemical2id"][r["head"]], names["disease2id"][r["tail"]] = r["head"], r["tail"]
        entities = tmp / "entities.json"
        entities.write_text(dumps(names))
    return path, entities
