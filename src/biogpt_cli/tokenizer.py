"""BioGptTokenizer: Moses tokenization, then BPE with a `</w>` end-of-word marker.

Id-for-id equal to the reference tokenizer: the special strings `<s> <pad> </s> <unk>` are split
out of the text before Moses sees it, every encoded prompt starts with `</s>` (id 2), and decoding
undoes BPE and then Moses.

A fine-tuned task checkpoint adds N learned prompt tokens `learned1 ... learnedN` at the end of
the vocabulary. They are special: text never encodes to them (BPE has no merges that build them),
and `decode(..., skip_special_tokens=True)` hides them like `</s>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sacremoses import MosesDetokenizer, MosesTokenizer

from .errors import InputError, VocabularyError
from .hub import HUB_FILES, resolve

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3 in every BioGPT vocabulary
BOS_ID, PAD_ID, EOS_ID, UNK_ID = range(4)
BPE_CACHE_SIZE = 200_000  # words; bounds memory, while common words stay cached in practice
MAX_WORD = 10_000  # characters in one Moses token: about half a second of BPE at worst
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
FAIRSEQ_DICTS = ("dict.txt", "dict.x.txt")  # dict.x.txt: the copy in a task's binarized data folder
PROMPT_PATTERN = "learned"  # the release's `--learned-prompt-pattern`: tokens learned1, learned2, ...


class _Moses(MosesTokenizer):
    """sacremoses rebuilds a set of every lowercase / alphabetic Unicode character on each call to
    `islower` / `isanyalpha` (most of its run time on PubMed text); same answers from character
    classes compiled once (faster than sets of the characters, and 1.5 MiB smaller)."""

    def __init__(self) -> None:
        super().__init__(lang="en")
        self._lower = re.compile(f"[{re.escape(self.IsLower)}]*")
        self._alpha = re.compile(f"[{re.escape(self.IsAlpha)}]")

    def islower(self, text: str) -> bool:
        return self._lower.fullmatch(text) is not None

    def isanyalpha(self, text: str) -> bool:
        return self._alpha.search(text) is not None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VocabularyError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise VocabularyError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


_MERGE = re.compile(r"^[^\S\n]*(\S+[^\S\n]+\S+)", re.MULTILINE)  # 'a b [count]', as str.split() splits
_ONE_SPACE = re.compile(r"\S+ \S+")


def _parse_merges(path: Path) -> list[str]:
    """The merges as 'a b' strings, the keys of `bpe_ranks`, in one regular-expression pass:
    building pairs first (or splitting 40k lines one by one) left 4-8 MiB of freed objects resident
    in every process that loads the vocabulary."""
    text = _read_text(path)
    merges = _MERGE.findall(text)  # at most one match per line: no part of the pattern crosses a newline
    if len(merges) != text.count("\n") + bool(text) - text.endswith("\n"):
        n = next(n for n, line in enumerate(_lines(text), 1) if not _MERGE.match(line))
        raise VocabularyError(f"{path}: line {n} is not a BPE merge ('a b [count]')")
    return [m if _ONE_SPACE.fullmatch(m) else " ".join(m.split()) for m in merges]


class BatchEncoding(dict):
    """What calling the tokenizer gives, as the reference's: `input_ids` and `attention_mask`, as
    keys (`model(**enc)`) or attributes (`enc.input_ids`); `.to(device)` moves tensors."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) for k, v in self.items()})


class BioGptTokenizer:
    """Text <-> ids for BioGPT. Build it with `from_pretrained` or one of the `from_*_files` helpers."""

    pad_token_id, eos_token_id, padding_side = PAD_ID, EOS_ID, "right"  # the reference's; "left" to generate

    def __init__(self, encoder: dict[str, int], merges: Sequence[str | tuple[str, str]]) -> None:
        """`merges` in rank order, as 'a b' strings or (a, b) pairs."""
        if [encoder.get(t) for t in SPECIAL_TOKENS] != [0, 1, 2, 3]:
            raise VocabularyError("vocabulary must map <s> <pad> </s> <unk> to ids 0 1 2 3")
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.prompt_ids = self._find_prompt_tokens()
        self.prompt_note: str | None = None  # how the prompt tokens were found, when it needs saying
        # keyed 'a b' (pieces never hold spaces): half the memory of (a, b) tuples
        self.bpe_ranks = {m if isinstance(m, str) else " ".join(m): rank for rank, m in enumerate(merges)}
        self._bpe_cache: dict[str, list[int]] = {}
        self._moses = _Moses()
        self._detok = MosesDetokenizer(lang="en")

    # -- learned prompt tokens ---------------------------------------------------------------
    def _find_prompt_tokens(self) -> list[int]:
        """Ids of `learned1..N` when they are the last N ids of the vocabulary (a converted task
        checkpoint); none otherwise (a base vocabulary has the word `learned`, never `learned1`)."""
        ids: list[int] = []
        while (i := self._prompt_token(len(ids) + 1)) is not None:
            ids.append(i)
        first = len(self.encoder) - len(ids)
        return ids if ids == list(range(first, len(self.encoder))) else []

    def _prompt_token(self, k: int) -> int | None:
        """`learnedK</w>` (how the reference's conversion spells a dictionary word), else `learnedK`."""
        found = self.encoder.get(f"{PROMPT_PATTERN}{k}</w>")
        return self.encoder.get(f"{PROMPT_PATTERN}{k}") if found is None else found

    def add_prompt_tokens(self, count: int) -> None:
        """Append `learned1..count` (the original release adds them to `dict.txt` at start-up)."""
        if self.prompt_ids:
            raise VocabularyError(f"the vocabulary already has {len(self.prompt_ids)} learned prompt tokens")
        for k in range(1, count + 1):
            token, i = f"{PROMPT_PATTERN}{k}</w>", len(self.encoder)
            if token in self.encoder:
                raise VocabularyError(f"cannot add prompt token {token!r}: the vocabulary has it already")
            self.encoder[token], self.decoder[i] = i, token
        self.prompt_ids = self._find_prompt_tokens()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_hub_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> BioGptTokenizer:
        vocab_json = Path(vocab_json)
        try:
            encoder = json.loads(_read_text(vocab_json))
        except json.JSONDecodeError as e:
            raise VocabularyError(f"{vocab_json}: invalid JSON ({e})") from None
        if not isinstance(encoder, dict) or not all(isinstance(i, int) for i in encoder.values()):
            raise VocabularyError(f"{vocab_json}: expected a JSON object of token -> id")
        return cls(encoder, _parse_merges(Path(merges_txt)))

    @classmethod
    def from_fairseq_files(cls, dict_txt: str | Path, bpecodes: str | Path) -> BioGptTokenizer:
        """The original release: dict line i gets id i+4; `w@@` is the piece `w`, any other word `w</w>`."""
        dict_txt = Path(dict_txt)
        encoder = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
        for n, line in enumerate(_lines(_read_text(dict_txt))):
            word = line.rsplit(" ", 1)[0]
            if not word:
                raise VocabularyError(f"{dict_txt}: line {n + 1} is empty")
            encoder.setdefault(word[:-2] if word.endswith("@@") else word + "</w>", n + 4)
        return cls(encoder, _parse_merges(Path(bpecodes)))

    @classmethod
    def from_folder(cls, folder: str | Path) -> BioGptTokenizer:
        folder = Path(folder)
        if all((folder / f).is_file() for f in HUB_FILES):
            return cls.from_hub_files(*(folder / f for f in HUB_FILES))
        for name in FAIRSEQ_DICTS:
            if (folder / name).is_file() and (folder / "bpecodes").is_file():
                return cls.from_fairseq_files(folder / name, folder / "bpecodes")
        raise VocabularyError(f"{folder}: no tokenizer files (vocab.json + merges.txt, or dict.txt + bpecodes)")

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, revision: str | None = None) -> BioGptTokenizer:
        """Load from a local folder or a Hub id (see `hub.resolve`)."""
        return cls.from_folder(resolve(path_or_id, revision, HUB_FILES))

    def save_vocabulary(self, save_directory: str | Path) -> tuple[str, str]:
        """Write `vocab.json` and `merges.txt` (the Hub layout) into an existing folder."""
        folder = Path(save_directory)
        if not folder.is_dir():
            raise VocabularyError(f"{folder}: not a directory")
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        vocab.write_text(json.dumps(self.encoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                         encoding="utf-8")
        merges.write_text("".join(f"{pair}\n" for pair in self.bpe_ranks), encoding="utf-8")
        return str(vocab), str(merges)

    # -- encoding ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> list[int]:
        """Ids of one Moses token; cached, since corpora repeat words endlessly."""
        ids = self._bpe_cache.get(word)
        if ids is not None:
            return ids
        if len(word) > MAX_WORD:
            raise InputError(f"a {len(word):,}-character run without spaces ({word[:12]!r}...) is too long to "
                             f"tokenize: BPE time grows with its square (limit {MAX_WORD:,})")
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                rank = ranks.get(f"{parts[i]} {parts[i + 1]}")
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = i, rank
            if best_rank is None:
                break
            first, second = parts[best], parts[best + 1]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence, left to right, like the reference
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.encoder.get(p, UNK_ID) for p in parts]
        if len(self._bpe_cache) >= BPE_CACHE_SIZE:  # a multi-GB corpus has millions of rare words
            self._bpe_cache.clear()
        self._bpe_cache[word] = ids
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids exactly as the reference's `input_ids`: `</s>` first, then the text."""
        ids = [EOS_ID] if add_special_tokens else []
        for _, word_ids in self.encode_words(text):
            ids.extend(word_ids)
        return ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None) -> BatchEncoding:
        """The reference's call, for scripts written against it: the ids and attention mask of one
        text or a list of them. `truncation=True` keeps each text's first `max_length` ids (the
        reference's side); `padding=True` ("longest") pads a list to its longest with `<pad>`,
        "max_length" to `max_length`, on `padding_side` (set "left" before `model.generate`);
        `return_tensors="pt"` gives tensors."""
        if (truncation or padding == "max_length") and max_length is None:
            raise ValueError("truncation and padding='max_length' need max_length here")
        rows = [self.encode(t, add_special_tokens)[:max_length if truncation else None]
                for t in ([text] if isinstance(text, str) else text)]
        width = 0  # no padding
        if padding == "max_length":
            width = max_length
        elif padding not in (False, "do_not_pad"):
            width = max(map(len, rows), default=0)
        pads = [[self.pad_token_id] * (width - len(r)) for r in rows]
        left, ids, mask = self.padding_side == "left", [], []
        for r, p in zip(rows, pads, strict=True):
            ids.append(p + r if left else r + p)
            mask.append([0] * len(p) + [1] * len(r) if left else [1] * len(r) + [0] * len(p))
        if return_tensors is None:
            return BatchEncoding(input_ids=ids[0] if isinstance(text, str) else ids,
                                 attention_mask=mask[0] if isinstance(text, str) else mask)
        if return_tensors != "pt":
            raise ValueError(f'return_tensors={return_tensors!r}: only "pt" (torch) is supported')
        if len({len(r) for r in ids}) > 1:
            raise ValueError("texts of different lengths make a tensor only with padding=True")
        import torch

        return BatchEncoding(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))

    def encode_words(self, text: str) -> list[tuple[str, list[int]]]:
        """(Moses token, its BPE ids) for each word of `text`: how token labels map back to words."""
        words = []
        for piece in _SPECIAL_SPLIT.split(text):
            if piece in SPECIAL_TOKENS:
                words.append((piece, [self.encoder[piece]]))
            elif piece:
                words.extend((w, self._bpe(w)) for w in self._moses.tokenize(piece, aggressive_dash_splits=True,
                                                                                 escape=True) if w)
        return words

    def tokenize(self, text: str) -> list[str]:
        """BPE pieces of `text` (no leading `</s>`)."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=False))

    # -- decoding ----------------------------------------------------------------------------
    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.decoder.get(int(i), "<unk>") for i in ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Undo BPE (`</w>` ends a word), then Moses detokenization."""
        return self.detokenize(self.words(ids, skip_special_tokens).split())

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        """`decode` of each row (of a list, or of a `[rows, length]` tensor from `model.generate`)."""
        return [self.decode(row, skip_special_tokens) for row in sequences]

    def words(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """BPE undone: Moses tokens separated by spaces; a word still open (no `</w>` yet) has no
        trailing space, which is how the streaming detokenizer tells finished words apart."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            first_prompt = self.prompt_ids[0] if self.prompt_ids else len(self.encoder)
            ids = [i for i in ids if UNK_ID < i < first_prompt]
        return "".join(t.replace(" ", "").replace("</w>", " ") for t in self.convert_ids_to_tokens(ids))

    def detokenize(self, words: list[str]) -> str:
        """Moses detokenization of whole words (unescaping, spacing around punctuation)."""
        return self._detok.detokenize(words)

    def unescape(self, word: str) -> str:
        """A word as Moses' detokenizer sees it once it has undone its escapes (`&quot;` is `"`)."""
        return self._detok.unescape_xml(word)
