"""BioGPT's fine-tuned tasks, as data: how the original release builds each model input and reads
its answer back out of the generated text (`shared/tasks_spec.md` has the sources).

A task checkpoint continues `</s> source learned1 ... learnedN` greedily until `</s>` with one of
four answer templates. A `Task` is the few plain functions that differ between tasks: which input
fields make the source text, and how the answer text parses. Everything else (batching, output,
resume) is the same engine `generate` uses.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import BioGptConfig
from .errors import InputError
from .grounding import document_text
from .literature import joined
from .tokenizer import EOS_ID, BioGptTokenizer

TRUNCATION_TOKEN = "...</w>"  # the last kept source token of a truncated source
HOC_LABELS = ("tumor promoting inflammation", "inducing angiogenesis", "evading growth suppressors",
              "resisting cell death", "cellular energetics", "empty", "genomic instability and mutation",
              "sustaining proliferative signaling", "avoiding immune destruction",
              "activating invasion and metastasis", "enabling replicative immortality")
# The release's `strip_prefix`: the first of these found in the answer is cut off with all before it.
# The learned tokens come first and always match an echoed prompt; the rest are from a prompt ablation.
ECHO = r"(learned[0-9]+ )+"
PREFIXES = (ECHO, "we can conclude that", "we have that", "in conclusion,")
BC5CDR_PREFIXES = (ECHO, "in conclusion ,", "we can conclude that", "we have that")


@dataclass(frozen=True)
class Task:
    name: str
    command: str  # the biogpt command that runs it
    result: str  # the output record's field for the parsed answer
    source: Callable[[Mapping[str, Any]], str]  # input fields -> source text, as the release's rebuild_data.py
    parse: Callable[[str], Any]  # answer text (post-processed) -> result; None when it does not parse
    max_source: int  # source limit in BPE tokens when the checkpoint does not say (the release's train.sh)
    prefixes: tuple[str, ...] = PREFIXES
    region: Callable[[Mapping[str, Any]], tuple[int, int]] = lambda f: (0, len(document_text(f)))  # the source's
    # characters in the document's text (grounding.py), for relation extraction
    checkpoint: str = ""  # the release's checkpoint name, for messages
    hub: str = ""  # a Hub model fine-tuned for it too, if any
    headline: str = "f1"  # the metric (of `evaluate`'s) the paper reports, which fine-tuning ranks epochs by


def text_field(fields: Mapping[str, Any], name: str, required: bool = True) -> str:
    """A string field of an input record; a list of strings (PubMedQA CONTEXTS) is joined."""
    value = fields.get(name)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = " ".join(v.strip() for v in value)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "" if value is None else f", got {type(value).__name__}"
        raise InputError(f'expected a string field "{name}"{got}')
    if required and not value.strip():
        raise InputError(f'the field "{name}" is empty')
    return value


# -- sources -----------------------------------------------------------------------------------
def _title_abstract(fields: Mapping[str, Any]) -> str:
    """RE-BC5CDR / RE-DTI: title and abstract joined as the release does, lowercased (or `text`); a
    title-only document is `title. `, as the release's rebuild_data.py builds it."""
    if "text" in fields and "abstract" not in fields:
        return text_field(fields, "text").lower()
    return joined(*_title_and_abstract(fields)).lower()


def _title_and_abstract(fields: Mapping[str, Any]) -> tuple[str, str]:
    title, abstract = text_field(fields, "title", required=False), text_field(fields, "abstract", required=False)
    if not title.strip() and not abstract.strip():
        raise InputError('the fields "title" and "abstract" are both empty')
    return title, abstract


def _abstract(fields: Mapping[str, Any]) -> str:
    """RE-DDI: the abstract alone (no title), newlines as spaces, lowercased (or `text`); the
    title where a document has no abstract."""
    if "abstract" not in fields:
        return text_field(fields, "text").strip().replace("\n", " ").lower()
    title, abstract = _title_and_abstract(fields)
    return (abstract if abstract.strip() else title).strip().replace("\n", " ").lower()


def _abstract_region(fields: Mapping[str, Any]) -> tuple[int, int]:
    """Where `_abstract`'s source is in the document's text: the abstract, else the title."""
    if "abstract" not in fields:
        return 0, len(document_text(fields))
    title, abstract = fields.get("title") or "", fields.get("abstract") or ""
    return (len(title) + 1, len(title) + 1 + len(abstract)) if abstract.strip() else (0, len(title))


def _question_context(fields: Mapping[str, Any]) -> str:
    """PubMedQA: `question: Q context: C ` (reasoning required), or with a long answer the reasoning-free
    `question: Q context: C answer: A.` the Hub's BioGPT-Large-PubMedQA was trained on. Not lowercased."""
    question = text_field(fields, "question").strip()
    context = re.sub(r"\s+", " ", text_field(fields, "context").replace("\n", " ")).strip()
    long_answer = text_field(fields, "long_answer", required=False).strip()
    if not long_answer:
        return f"question: {question} context: {context} "
    source = f"question: {question} context: {context} answer: {long_answer}"
    return source if source.endswith(".") else source + "."


def _sentence(fields: Mapping[str, Any]) -> str:
    """HoC: the text with a final `.` added when missing. Not lowercased."""
    text = text_field(fields, "text").strip()
    return text if text.endswith(".") else text + "."


# -- parsers -----------------------------------------------------------------------------------
def _unique(items: list[Any]) -> list[Any]:
    return [x for i, x in enumerate(items) if x not in items[:i]]


def _bc5cdr(text: str) -> list[dict[str, str]] | None:
    found = [re.match(r"the relation between (.*) and (.*) exists", s.strip()) for s in text.split(";")]
    relations = [{"head": m[1].strip(), "relation": "CID", "tail": m[2].strip()} for m in found if m]
    return _unique(relations) or None


def _interactions(text: str) -> list[dict[str, str]] | None:
    """DDI and KD-DTI: `the interaction between DRUG and TARGET is RELATION`, joined by `; `."""
    found = [re.match(r"the interaction between (.*) and (.*) is (.*)", s) for s in text.split("; ")]
    relations = [{"head": m[1].strip(), "relation": m[3].strip(), "tail": m[2].strip()} for m in found if m]
    return _unique(relations) or None


def _answer(text: str) -> str | None:
    m = re.search(r"the answer to the question given the context is(.*)", text)
    answer = m[1].strip() if m else None
    return answer if answer in ("yes", "no", "maybe") else None


def _labels(text: str) -> list[str] | None:
    m = re.search(r"the type of this document is(.*)", text)
    labels = _unique([label.strip() for label in m[1].split("|") if label.strip()]) if m else []
    return labels or None


RELEASE = "from the original release's checkpoints (github.com/microsoft/BioGPT, README)"
TASKS = {t.name: t for t in (
    Task("pubmedqa", "qa", "answer", _question_context, _answer, 900, checkpoint="QA-PubMedQA-BioGPT(-Large)",
         hub="microsoft/BioGPT-Large-PubMedQA", headline="accuracy"),
    Task("bc5cdr", "extract", "relations", _title_abstract, _bc5cdr, 640, BC5CDR_PREFIXES,
         checkpoint="RE-BC5CDR-BioGPT"),
    Task("ddi", "extract", "relations", _abstract, _interactions, 640, checkpoint="RE-DDI-BioGPT",
         region=_abstract_region),
    Task("kd-dti", "extract", "relations", _title_abstract, _interactions, 640, checkpoint="RE-DTI-BioGPT"),
    Task("hoc", "classify", "labels", _sentence, _labels, 900, checkpoint="DC-HoC-BioGPT"),
)}
LARGE_PUBMEDQA_SOURCE = 1900  # BioGPT-Large (2048 positions) was fine-tuned with a longer source


def task_for(command: str, requested: str | None, config: BioGptConfig, source: str) -> Task:
    """The task a command runs on a checkpoint: the one it was fine-tuned for, checked against `--task`."""
    names = [t.name for t in TASKS.values() if t.command == command]
    if not config.learned_prompt:
        *others, last = [TASKS[n].checkpoint for n in names]
        raise InputError(f"{source} is a language model without learned prompt tokens, not a fine-tuned "
                         f"{'/'.join(names)} checkpoint; `biogpt {command}` needs one: "
                         f"{', '.join(others) + ' or ' if others else ''}{last} {RELEASE}"
                         + "".join(f", or {TASKS[n].hub} on the Hub" for n in names if TASKS[n].hub)
                         + f"; or make one from the task's data: biogpt finetune TRAIN --task {names[0]} -m "
                           f"{source} -o FOLDER")
    if requested is not None and config.task is not None and requested != config.task:
        raise InputError(f"--task {requested} does not match {source}, fine-tuned for {config.task}")
    name = requested or config.task or (names[0] if len(names) == 1 else None)
    if name is None:
        raise InputError(f"{source} does not say which task it was fine-tuned for: pass --task {'|'.join(names)}")
    if TASKS[name].command != command:
        raise InputError(f"{source} is fine-tuned for {name}: run it with `biogpt {TASKS[name].command}`")
    return TASKS[name]


def own_task(command: str, default: str | None) -> str | None:
    """`default` (`serve --task`, `mcp --task`) where it is a task of `command`, else None: the
    other commands' tasks are their checkpoint's own."""
    return default if default is not None and TASKS[default].command == command else None


def answered(config: BioGptConfig, default: str | None, source: str) -> list[Task]:
    """The tasks a checkpoint answers, one per command (`default`: its task when its config does
    not name it), the default's first: none for a language model."""
    tasks = []
    for command in sorted({t.command for t in TASKS.values()}, key=lambda c: own_task(c, default) is None):
        with contextlib.suppress(InputError):
            tasks.append(task_for(command, own_task(command, default), config, source))
    return tasks


def source_limit(task: Task, config: BioGptConfig) -> int:
    if config.max_source_positions:
        return config.max_source_positions
    large = task.name == "pubmedqa" and config.max_position_embeddings >= 2048
    return LARGE_PUBMEDQA_SOURCE if large else task.max_source


def build_input(task: Task, tokenizer: BioGptTokenizer, fields: Mapping[str, Any], limit: int,
                words: Sequence[tuple[str, Sequence[int]]] | None = None) -> list[int]:
    """`</s>`, the source's BPE ids (cut to `limit` with `...` as the last kept token), then the
    learned prompt ids: the release's `[eos] + source + prompt` with its truncation rule. `words`:
    the source's `encode_words`, when the caller has them."""
    words = tokenizer.encode_words(task.source(fields)) if words is None else words
    source = [i for _, ids in words for i in ids]
    if len(source) > limit:  # a vocabulary without the one `...` token (a home-made one) spells it out
        marker = [tokenizer.encoder[TRUNCATION_TOKEN]] if TRUNCATION_TOKEN in tokenizer.encoder else \
            tokenizer.encode("...", add_special_tokens=False)
        source = [*source[:limit - len(marker)], *marker]
    return [EOS_ID, *source, *tokenizer.prompt_ids]


def answer_text(task: Task, text: str) -> str:
    """The release's post-processing: strip, drop one final `.`, cut at the first prefix found."""
    line = text.strip()
    line = line[:-1] if line.endswith(".") else line
    for prefix in task.prefixes:
        if re.search(prefix, line):
            return re.split(prefix, line)[-1].strip()
    return line


def parse(task: Task, text: str) -> Any:
    """The parsed result of a generated continuation (learned tokens shown), or None."""
    return task.parse(answer_text(task, text))


def render(task: Task, result: Any) -> str:
    """One plain-text line for a result: `yes`, `label|label`, `head<TAB>relation<TAB>tail; ...`;
    `null` for an answer that did not parse (as JSONL says it), never an empty line."""
    if result is None:
        return "null"
    if task.result == "relations":
        return "; ".join(f"{r['head']}\t{r['relation']}\t{r['tail']}" for r in result)
    return "|".join(result) if isinstance(result, list) else str(result)
