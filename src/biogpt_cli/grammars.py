"""The answers a task allows, as constraints (constraints.py): `--constrained` on the task
commands, `generate --choices` and the server's `guided_choice`.

Each grammar is the task's own answer template (tasks.py parses the same text back), spelled in
the tokenizer's ids: BPE works word by word, so a template's words have the same ids alone as in a
sentence. Relation extraction's entities are spans of the row's own source ids, so every entity
it writes is a run of whole words of the document it read, after the task's lowercasing.
"""

from __future__ import annotations

from collections.abc import Sequence

from .constraints import Grammar, OneOf, Span, words
from .errors import InputError
from .tasks import HOC_LABELS, Task
from .tokenizer import EOS_ID, BioGptTokenizer

DDI_RELATIONS = ("advise", "effect", "mechanism", "int")  # the release's DDI labels
MAX_SPAN_WORDS = 16  # an entity name's words at most (`5 @-@ fluorouracil` is three)


def _ids(tok: BioGptTokenizer, text: str) -> tuple[int, ...]:
    return tuple(tok.encode(text, add_special_tokens=False))


def one_of(tok: BioGptTokenizer, texts: Sequence[str]) -> OneOf:
    return OneOf(tuple(_ids(tok, t) for t in texts))


def choices(tok: BioGptTokenizer, texts: Sequence[str]) -> Grammar:
    """A continuation that is exactly one of `texts`, then `</s>`."""
    texts = [t.strip() for t in texts]
    if not texts or not all(texts):
        raise InputError("choices: give one or more non-empty texts")
    return Grammar("choices", EOS_ID, items=(one_of(tok, texts),))


def relation_words(task: Task, configured: Sequence[str], given: Sequence[str] | None) -> tuple[str, ...]:
    """The relation words `extract --constrained` may write: given (`--relations`), else the
    checkpoint's (kept by `finetune`), else DDI's four; KD-DTI has no fixed set."""
    found = tuple(given or configured or (DDI_RELATIONS if task.name == "ddi" else ()))
    if task.name == "kd-dti" and not found:
        raise InputError("extract --constrained on kd-dti needs the relation words of its training data: this "
                         "checkpoint does not keep them (biogpt finetune does); give --relations FILE or a,b,c")
    return found


def source_words(tok: BioGptTokenizer, ids: Sequence[int]) -> tuple[list[tuple[int, ...]], dict[int, tuple]]:
    """A source's words (their ids), and for a word Moses kept with a sentence's period (`tremor.`
    before a lowercase word) its spelling in an entity: without the period, and last."""
    found: list[tuple[int, ...]] = []
    start = 0
    for i, piece in enumerate(tok.convert_ids_to_tokens(ids)):
        if piece.endswith("</w>"):
            found.append(tuple(ids[start:i + 1]))
            start = i + 1
    if start < len(ids):
        found.append(tuple(ids[start:]))
    bare = {}
    for w, word in enumerate(found):
        text = "".join(tok.convert_ids_to_tokens(word)).removesuffix("</w>")
        if len(text) > 1 and text.endswith("."):
            bare[w] = _ids(tok, text[:-1])
    return found, bare


def task_grammar(task: Task, tok: BioGptTokenizer, ids: Sequence[int], relations: Sequence[str] = ()) -> Grammar:
    """The answer `task` allows after model input `ids` (`</s> source learned1..N`)."""
    end, period, sep = EOS_ID, (words(_ids(tok, ".")),), (words(_ids(tok, ";")),)
    if task.name == "pubmedqa":
        return Grammar(task.name, end, items=(one_of(tok, ("yes", "no", "maybe")),),
                       head=(words(_ids(tok, "the answer to the question given the context is")),), tail=period)
    if task.name == "hoc":
        return Grammar(task.name, end, items=(one_of(tok, HOC_LABELS),), head=(words(_ids(tok, "the type of this "
                       "document is")),), sep=(words(_ids(tok, "|")),), tail=period, unique=True)
    if task.name == "bc5cdr":
        verb, last = "exists", ()
        lead = "the relation between"
    else:
        verb, last = "is", (one_of(tok, relations),)
        lead = "the interaction between"
    barred = [_ids(tok, w) for w in ("and", verb, ";", ".")]  # the template's joints: parsing stays unambiguous
    span = Span(*source_words(tok, ids[1:len(ids) - len(tok.prompt_ids)]), barred, MAX_SPAN_WORDS)
    item = (words(_ids(tok, lead)), span, words(_ids(tok, "and")), span, words(_ids(tok, verb)), *last)
    return Grammar(task.name, end, items=item, sep=sep, tail=period, unique=True)
