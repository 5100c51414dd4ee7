"""The answers a task allows, as constraints (constraints.py): `--constrained` on the task
commands, `generate --choices` and the server's `guided_choice`.

Each grammar is the task's own answer template (tasks.py parses the same text back), spelled in
the tokenizer's ids: BPE works word by word, so a template's words have the same ids alone as in a
sentence. Relation extraction's entities are spans of the row's own source words, each aligned to
the document's text (grounding.py), so every entity it writes is a run of whole words of the
document it read, with the offsets it was copied from (`entity_offsets`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .constraints import Grammar, OneOf, Span, fixed
from .errors import Conflict, InputError
from .grounding import Word, align, document_text
from .tasks import ECHO, HOC_LABELS, Task
from .tokenizer import EOS_ID, UNK_ID, BioGptTokenizer

DDI_RELATIONS = ("advise", "effect", "mechanism", "int")  # the release's DDI labels
MAX_SPAN_WORDS = 16  # an entity name's words at most (`5 @-@ fluorouracil` is three)
LEARNED = re.compile(r"learned[0-9]+")  # a word the release's ECHO prefix cuts at: never in an entity
BRACKETS = {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}


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


def fitted_choices(tok: BioGptTokenizer, texts: Sequence[str], opts: Any, warn: Any) -> tuple[Grammar, list[str]]:
    """`--choices` (`guided_choice`) under the other decoding options, and the choices kept: a
    choice that a ban, a stop token or `--min-new-tokens` would cut short is left out (`warn` says
    so); `Conflict` for options that could contradict every choice, or for none left."""
    if opts.no_repeat_ngram_size:
        raise Conflict("--choices: not with --no-repeat-ngram-size (a choice repeating the prompt's words would be "
                       "cut); leave one out")
    spelled = {t: _ids(tok, t) for t in texts}
    if empty := next((t for t, ids in spelled.items() if not ids), None):
        raise Conflict(f"--choices: {empty!r} has no token (the tokenizer keeps nothing of it)")
    if unknown := next((t for t, ids in spelled.items() if UNK_ID in ids), None):
        raise Conflict(f"--choices: {unknown!r} has characters the vocabulary does not know (<unk>)")
    if (n := max(map(len, spelled.values()))) > opts.max_new_tokens:
        longest = next(t for t, ids in spelled.items() if len(ids) == n)
        raise InputError(f"the choice {longest!r} takes {n} tokens: raise -n (max_new_tokens) to at least {n}")
    kept, left = [], []
    for text, ids in spelled.items():
        why = _cut(ids, opts)
        (left if why else kept).append(f"{text!r} ({why})" if why else text)
    if not kept:
        raise Conflict(f"--choices: none is left: {'; '.join(left)}")
    for reason in left:
        warn(f"note: --choices: {reason}: left out")
    return choices(tok, kept), kept


def _cut(ids: tuple[int, ...], opts: Any) -> str | None:
    """What would stop a choice's tokens from being written whole, then `</s>`; None: nothing."""
    for bad in opts.bad_words_ids:
        if any(tuple(bad) == ids[k:k + len(bad)] for k in range(len(ids))):
            return "it holds a banned word (--ban)"
        if any(tuple(bad[k:]) == ids[:len(bad) - k] for k in range(1, len(bad))):
            raise Conflict("--choices: a choice may end a banned word begun by the prompt (--ban): leave one out")
    if stop := next((t for t in ids if t in opts.stop_token_ids), None):
        return f"it holds the stop token {stop} (stop_token_ids)"
    if len(ids) < opts.min_new_tokens:
        return f"{len(ids)} tokens, fewer than --min-new-tokens {opts.min_new_tokens}"
    return None


def relation_words(task: Task, configured: Sequence[str], given: Sequence[str] | None) -> tuple[str, ...]:
    """The relation words `extract --constrained` may write: given (`--relations`), else the
    checkpoint's (kept by `finetune`), else DDI's four; KD-DTI has no fixed set."""
    found = tuple(given or configured or (DDI_RELATIONS if task.name == "ddi" else ()))
    if task.name == "kd-dti" and not found:
        raise InputError("extract --constrained on kd-dti needs the relation words of its training data: this "
                         "checkpoint does not keep them (biogpt finetune does); give --relations FILE or a,b,c")
    return found


def source_words(task: Task, tok: BioGptTokenizer, fields: Mapping[str, Any], ids: Sequence[int],
                 pieces: Sequence[tuple[str, Sequence[int]]] | None = None) -> list[Word]:
    """The words of a row's source that its model input `ids` (`</s> source learned1..N`) holds
    (a truncated source's cut word and `...` left out), each aligned to the document's text.
    `pieces`: the source's `encode_words`, when the caller has them."""
    kept, words, n = ids[1:len(ids) - len(tok.prompt_ids)], [], 0
    for text, word in tok.encode_words(task.source(fields)) if pieces is None else pieces:
        if list(kept[n:n + len(word)]) != list(word):
            break
        words.append((text, word))
        n += len(word)
    return align(words, document_text(fields), *task.region(fields), unescape=tok.unescape)


def entity_span(tok: BioGptTokenizer, words: Sequence[Word], barred: Sequence[tuple[int, ...]],
                phrases: Sequence[tuple[str, ...]] = ()) -> Span:
    """Entities as runs of whole words of the text (docs/tasks.md). A span starts on a word whose
    first character is a letter or digit, where a word of the text begins or after a hyphen or
    slash joining two words (`irinotecan` of `bevacizumab/irinotecan`); it ends on a word whose
    last character is one (or on a bracket it opened), where a word of the text ends, before such
    a hyphen or slash, or before a clitic (`aspirin` of `aspirin's`); it holds only words aligned
    to the text, none a template joint or unknown to BPE, nor any of `phrases` (word texts) whole."""
    n = len(words)
    usable = [w.at is not None and UNK_ID not in w.ids and w.ids not in barred and not LEARNED.fullmatch(w.text)
              for w in words]
    cut = [-1] * n
    for phrase in phrases:
        for k in range(n - len(phrase) + 1):
            if tuple(w.text for w in words[k:k + len(phrase)]) == phrase:
                cut[k + len(phrase) - 1] = max(cut[k + len(phrase) - 1], k)
    wordy = [any(c.isalnum() for c in w.text) for w in words]
    after = [k + 1 < n and words[k + 1].glued for k in range(n)]
    joint = [w.text in ("-", "/") and w.glued and after[k] and wordy[k - 1] and wordy[k + 1]
             for k, w in enumerate(words)]
    lead, trail = [True] * n, [True] * n  # every earlier (later) piece of its word of the text is punctuation
    for k in range(1, n):
        lead[k] = not words[k].glued or (lead[k - 1] and not wordy[k - 1])
    for k in range(n - 2, -1, -1):
        trail[k] = not after[k] or (trail[k + 1] and not wordy[k + 1]) or words[k + 1].text.startswith("'")
    depth = [BRACKETS.get(w.text, 0) for w in words]
    bare = [w.text[:-1] if w.bare else w.text for w in words]  # as an entity spells it
    start = [usable[k] and bare[k][:1].isalnum() and (lead[k] or (k > 0 and joint[k - 1])) for k in range(n)]
    end = [usable[k] and (bare[k][-1:].isalnum() or depth[k] < 0) and (trail[k] or (k + 1 < n and joint[k + 1]))
           for k in range(n)]
    bare_ids = {w.text: _ids(tok, w.text[:-1]) for w in words if w.bare}
    spelled = [bare_ids[w.text] if w.bare else w.ids for w in words]
    return Span(spelled, usable, start, end, depth, [w.bare for w in words], MAX_SPAN_WORDS, cut)


def entity_offsets(grammar: Grammar, words: Sequence[Word], tokens: Sequence[int]) -> list[list[list[list[int]]]]:
    """For each relation of a constrained answer, in order, the [start, end] offsets in the
    document's text of every place its head, then its tail, was copied from."""
    span = next(p for p in grammar.items if isinstance(p, Span))
    found = grammar.spans(tokens) or ()
    places = [sorted({(words[a].at[0], words[b].at[1]) for a, b in span.occurrences(t)}) for t in found]
    return [[[list(r) for r in places[k]], [list(r) for r in places[k + 1]]] for k in range(0, len(places) - 1, 2)]


def task_grammar(task: Task, tok: BioGptTokenizer, words: Sequence[Word] = (), relations: Sequence[str] = (),
                 limit: int | None = None) -> Grammar:
    """The answer `task` allows, in at most `limit` new tokens; relation extraction's entities are
    spans of the source `words` (`source_words`)."""
    end, period, sep = EOS_ID, (fixed(_ids(tok, ".")),), (fixed(_ids(tok, ";")),)
    if task.name == "pubmedqa":
        return Grammar(task.name, end, items=(one_of(tok, ("yes", "no", "maybe")),),
                       head=(fixed(_ids(tok, "the answer to the question given the context is")),), tail=period,
                       limit=limit)
    if task.name == "hoc":
        return Grammar(task.name, end, items=(one_of(tok, HOC_LABELS),), head=(fixed(_ids(tok, "the type of this "
                       "document is")),), sep=(fixed(_ids(tok, "|")),), tail=period, unique=True, limit=limit)
    if task.name == "bc5cdr":
        verb, last = "exists", ()
        lead = "the relation between"
    else:
        verb, last = "is", (one_of(tok, relations),)
        lead = "the interaction between"
    barred = [_ids(tok, w) for w in ("and", verb, ";", ".")]  # the template's joints: parsing stays unambiguous
    # the release's answer prefixes (`in conclusion ,`) would cut the answer where they stand
    phrases = [tuple(w for w, _ in tok.encode_words(p)) for p in task.prefixes if p != ECHO]
    span = entity_span(tok, words, barred, phrases)
    item = (fixed(_ids(tok, lead)), span, fixed(_ids(tok, "and")), span, fixed(_ids(tok, verb)), *last)
    return Grammar(task.name, end, items=item, sep=sep, tail=period, unique=True, limit=limit)
