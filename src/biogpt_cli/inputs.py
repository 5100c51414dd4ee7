"""Reading lines and prompts (files or stdin, line numbers kept, bad bytes named) and mapping work
over lines in worker processes, in order and in constant memory."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from .errors import InputError
from .jsonl import loads
from .literature import GZIP_ERRORS, documents, sniff, text_of


@dataclass(frozen=True)
class Prompt:
    line: int  # 1-based line of the input (0: a command-line argument)
    text: str
    id: str | int | None = None  # the "id" field of a JSONL input line
    fields: dict[str, Any] = field(default_factory=dict, compare=False)  # a JSONL line's whole object

    @property
    def where(self) -> str:
        """How a message names it: `line N: `, `id X: `, or nothing for a command-line argument."""
        return f"line {self.line}: " if self.line else f"id {self.id}: " if self.id is not None else ""

    @property
    def origin(self) -> dict[str, Any]:
        """Its output record's fields naming it: `line` (read from a file) and `id` (JSONL), as present."""
        return {**({"line": self.line} if self.line else {}), **({"id": self.id} if self.id is not None else {})}

    @property
    def key(self) -> tuple[str, str | int]:
        """What `--resume` matches an output record on: the JSONL id, else the line number."""
        return ("id", self.id) if self.id is not None else ("line", self.line)


def input_name(path: str) -> str:
    """How messages name an input: `-` is stdin."""
    return "stdin" if path == "-" else path


@contextmanager
def open_input(path: str) -> Iterator[BinaryIO]:
    """`-` is stdin. Binary, so that undecodable bytes are found per line, not at the first read."""
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 -- closed below
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    with f:
        if f.peek(2)[:2] == b"\x1f\x8b":  # gzip's magic: read through it (`-i prompts.txt.gz`)
            with gzip.open(f) as unzipped:
                yield unzipped
        else:
            yield f




def jsonl_input(path: str, input_format: str) -> bool:
    """`--input-format auto`: JSONL records when the name ends in .jsonl (or .jsonl.gz)."""
    return input_format == "jsonl" or (input_format == "auto" and path.removesuffix(".gz").endswith(".jsonl"))


def rereadable(path: str | None) -> bool:
    """A regular file, which can be read once to count or hash it and again for its lines; stdin,
    a pipe (`-i <(zcat x.gz)`) or a device would be emptied by the first read."""
    return path not in (None, "-") and os.path.isfile(path)


MARKERS = {"text": (b"\n",), "jsonl": (b"\n",), "pubtator": (b"|t|",), "bioc": (b"</document>",),
           "pubmed": (b"</PubmedArticle>", b"</PubmedBookArticle>", b"</MedlineCitation>")}


def record_format(f: BinaryIO, name: str, input_format: str = "auto") -> str:
    """What an input holds: the format forced, else the literature format its first bytes and name
    say (`literature.sniff`), else JSONL by its name, else lines of text. `f` is peeked at, not read."""
    if input_format != "auto":
        return input_format
    return sniff(f.peek(1 << 12)[:1 << 12], name) or ("jsonl" if jsonl_input(name, "auto") else "text")


def count_items(path: str) -> int | None:
    """A progress bar's total: the lines of a file, or the documents of a literature file (counted
    by their closing tags), read in large chunks; None for one not `rereadable`, or a JSON document."""
    if not rereadable(path):
        return None
    with open_input(path) as f:
        fmt = record_format(f, path)
        if fmt not in MARKERS:
            return None
        markers, tail = MARKERS[fmt], b""
        counts = [0] * len(markers)
        try:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # a tag split between two chunks counts once
                counts = [c + (tail + chunk).count(m) - tail.count(m) for c, m in zip(counts, markers, strict=True)]
                tail = chunk[-20:]
        except GZIP_ERRORS:
            return None  # reading it will say what is wrong, and where
    # a PubmedArticle holds a MedlineCitation: the older MedlineCitationSet has only the latter
    return counts[0] + counts[1] if fmt == "pubmed" and counts[0] + counts[1] else sum(counts)


def read_lines(f: BinaryIO, name: str, errors: str = "strict") -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending or a leading byte-order mark, which Windows
    editors write). Invalid UTF-8 names the line unless `errors` is "replace" (U+FFFD for each bad
    byte)."""
    try:
        for n, raw in enumerate(f, 1):
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield n, raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise InputError(f"{name}: line {n}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); pass --errors replace to substitute U+FFFD") from None
    except GZIP_ERRORS as e:  # click would take an EOFError for Ctrl-D
        raise InputError(f"{name}: a damaged or truncated gzip file ({e})") from None


def read_prompts(f: BinaryIO, name: str, jsonl: bool, errors: str = "strict",
                 text_field: str | tuple[str, ...] | None = "prompt") -> Iterator[Prompt]:
    """Prompts, one per line: plain text, or JSON objects as `parse_record` reads them.

    A blank line comes out as a blank prompt: the caller decides whether to skip or report it.
    """
    ids: dict[str | int, str] = {}  # id -> where it was first
    for n, text in read_lines(f, name, errors):
        if not jsonl or not text.strip():
            yield Prompt(n, text, fields={"text": text} if text.strip() else {})  # a blank line has no fields
        else:
            yield parse_record(n, text, name, text_field, ids)


def read_records(f: BinaryIO, name: str, input_format: str, errors: str = "strict",
                 text_field: str | tuple[str, ...] | None = "prompt", which: str = "all", labels: bool = False,
                 note: Callable[[str], None] | None = None) -> Iterator[Prompt]:
    """An input's records: the documents of a literature file (PubMed XML, BioC, PubTator, the
    release's task files; `--input-format auto` tells them by content and name), each keyed by its
    id and read as its `which` text (title, abstract or all), else lines of text or JSONL records
    (`read_prompts`). `note` hears, at the end, what was not a document and the title-only ones."""
    f = f if hasattr(f, "peek") else io.BufferedReader(f)  # a look at its start, which stays to be read
    fmt = record_format(f, name, input_format)
    if fmt in ("text", "jsonl"):
        yield from read_prompts(f, name, fmt == "jsonl", errors, text_field)
        return
    counts: dict[str, int] = {}
    for doc in documents(f, name, fmt, labels, counts):
        text = text_of(doc, which)
        yield Prompt(0, text, doc["id"], {**doc, "text": text})
    if note is not None:
        if counts.get("deleted"):
            note(f"{name}: {counts['deleted']} DeleteCitation entr{'y' if counts['deleted'] == 1 else 'ies'} "
                 "(PMIDs to delete, not citations) left out")
        if counts.get("title only") and which != "title":  # with --text title every document is read so
            note(f"{name}: {counts['title only']} title-only document{'s' * (counts['title only'] != 1)} (no "
                 "abstract): read as their title")


def parse_record(n: int, text: str, name: str, text_field: str | tuple[str, ...] | None,
                 ids: dict[str | int, str], seen_as: str | None = None) -> Prompt:
    """Line `n` of a JSONL input: an object with `text_field` (the first of several that it has;
    with None any object is taken, its fields being the caller's to check) and optionally an "id",
    which may not repeat (`ids`: those seen, with where, `seen_as` or `line N`): `--resume` matches
    records on it, and would take a repeat for done. Every reader of records, local or on Ray, checks them here."""
    try:
        obj = loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{name}: line {n}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{name}: line {n}: expected a JSON object")
    wanted = (text_field,) if isinstance(text_field, str) else text_field or ()
    field = next((k for k in wanted if isinstance(obj.get(k), str)), None)
    if wanted and field is None:
        names = " or ".join(f'"{k}"' for k in wanted)
        raise InputError(f"{name}: line {n}: expected an object with a string {names}")
    pid = obj.get("id")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, str | int)):
        raise InputError(f'{name}: line {n}: "id" must be a string or an integer')
    here = seen_as or f"line {n}"
    if pid is not None and ids.setdefault(pid, here) != here:
        raise InputError(f"{name}: line {n}: id {pid!r} is repeated (first at {ids[pid]})")
    return Prompt(n, obj[field] if field else "", pid, obj)


T = TypeVar("T")
_WORK: Callable[[Any], str] | None = None  # the function a worker process applies


def _start_worker(fn: Callable[[Any], str]) -> None:
    global _WORK
    _WORK = fn
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, once


def _work(chunk: list[Any]) -> list[str]:
    return [_WORK(item) for item in chunk]


def parallel_map(fn: Callable[[T], str], items: Iterable[T], jobs: int = 1, chunk: int = 256) -> Iterator[str]:
    """`map(fn, items)` in input order. With `jobs` > 1, worker processes take chunks of items and
    at most two chunks per worker are in flight, so memory stays constant on any input size."""
    if jobs == 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(fn,)) as pool:
        pending: deque[Future[list[str]]] = deque()
        batch: list[T] = []
        for item in items:
            batch.append(item)
            if len(batch) == chunk:
                pending.append(pool.submit(_work, batch))
                batch = []
                if len(pending) >= 2 * jobs:
                    yield from pending.popleft().result()
        if batch:
            pending.append(pool.submit(_work, batch))
        while pending:
            yield from pending.popleft().result()
