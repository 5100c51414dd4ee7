"""Writing results: in input order, whole lines only, resumable, and live text on a terminal.

Rows of a batch finish out of order; records go out in input order. A record (or the group of
records of one prompt) is written whole: a SIGINT or SIGTERM that arrives meanwhile is recorded by
a stand-in handler and delivered once the write is done, so an interrupted run leaves only
complete lines, and `--resume` can trust every line it finds (a `kill -9` can still cut a write
short; `--resume` drops that torn last line).

Beside an output file, a manifest (`FILE.manifest.json`) records what defines the run (model and
its files, options, seed, input) for `--resume` to compare, and for a paper's methods section.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from .errors import BioGptError, InputError
from .files import replacing, write_text
from .inputs import Prompt
from .jsonl import dumps

if TYPE_CHECKING:
    from .streaming import Completion, TextEvent

Key = tuple[str, str | int]
_HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM arriving inside the block are delivered after it.

    Python runs signal handlers in the main thread between bytecodes, whichever thread the OS
    interrupted (torch has several), so swapping the handlers for ones that only take note holds
    for every thread. Handlers can be swapped only from the main thread; elsewhere, where no
    handler can interrupt the code anyway, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in pending:
            signal.raise_signal(signum)


class LineWriter:
    """Writes whole lines to a file descriptor, uninterrupted by Ctrl-C or SIGTERM. A write that
    fails (a full disk) takes back what it wrote of its record, so the file ends with whole ones."""

    def __init__(self, fd: int, name: str | Path = "stdout") -> None:
        self.fd, self.records, self.name = fd, 0, str(name)

    def write(self, text: str, records: int = 1) -> None:
        data = memoryview(text.encode("utf-8"))
        with signals_deferred():
            start = os.fstat(self.fd).st_size if self.fd > 2 else None  # a file is written at its end
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except BrokenPipeError:  # a reader that went away (`| head`): a quiet end, not an error
                raise
            except OSError as e:
                if start is not None:
                    os.ftruncate(self.fd, start)
                what = "disk full" if e.errno == errno.ENOSPC else f"cannot write ({e.strerror})"
                raise InputError(f"{self.name}: {what} after {self.records} records; free space, then run the "
                                 "same command again (with --resume for a JSONL output)") from None
            self.records += records

    @classmethod
    def create(cls, path: Path | None, append: bool = False, name: str | Path | None = None) -> LineWriter:
        """A writer to a new (or emptied, or with `append` continued) file, which messages call
        `name` (the file a temporary one becomes); to stdout without a path."""
        if path is None:
            return cls(1)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
        except OSError as e:
            raise InputError(f"{name or path}: cannot write ({e.strerror})") from None
        return cls(fd, name or path)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)


@contextlib.contextmanager
def whole_file(path: str | None, run: dict[str, Any] | None = None,
               records: Callable[[], int] = lambda: 0) -> Iterator[Path | None]:
    """For a command that cannot resume (`score`, `embed`, `tokenize`): a temporary file beside
    `path` that takes its name only when the block ends without an error, so a failed or
    interrupted run leaves no half-written file under that name, and the file `--force` was to
    replace intact; with `run`, its manifest beside it once it is in place (a file that was
    never written has none: a failed run leaves the old file and its manifest as they were).
    None (stdout) without a path."""
    if path is None or path == "-":
        yield None
        return
    with replacing(path) as tmp:
        yield tmp
    if run is not None:
        manifest_path(Path(path)).unlink(missing_ok=True)
        write_manifest(Path(path), run, status="complete", records=records(),
                       updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


@contextlib.contextmanager
def whole_output(path: str | None, run: dict[str, Any] | None = None) -> Iterator[LineWriter]:
    """A writer to `path` through `whole_file` (stdout without one), closed when the block ends."""
    with whole_file(path, run, lambda: writer.records) as target:  # counted once the file is whole
        writer = LineWriter.create(target, name=path)
        try:
            yield writer
        finally:
            writer.close()


def record_key(record: dict) -> Key:
    """A record's `Prompt.key`: its id, else its line (0, absent: the PROMPT argument's)."""
    return ("id", record["id"]) if "id" in record else ("line", record.get("line", 0))


@contextlib.contextmanager
def open_output(path: str | None, *, force: bool = False, resume: bool = False, group: int = 1,
                run: dict[str, Any] | None = None) -> Iterator[tuple[LineWriter, set[Key]]]:
    """The writer for `-o PATH` (stdout without one) and, when resuming, the keys already done;
    when the block ends, the manifest gets the run's status (complete, failed or interrupted) and
    record count (`group` records per input).

    An existing file is never clobbered silently: `--force` overwrites, `--resume` continues it,
    and only when `run` (what defines the run) equals the manifest the file was written under.
    """
    if path is None or path == "-":
        yield LineWriter(1), set()
        return
    check_output(path, force=force, resume=resume)
    target = Path(path)
    if resume and target.exists():
        check_manifest(target, run or {})
    done = _recover(target, group) if resume and target.exists() else set()
    writer = LineWriter.create(target, append=resume)
    with manifested(target, run or {}, lambda: writer.records + len(done) * group, fresh=not resume):
        try:
            yield writer, done
        finally:
            writer.close()


@contextlib.contextmanager
def manifested(output: Path, run: dict[str, Any], records: Callable[[], int], fresh: bool,
               **state: Any) -> Iterator[None]:
    """The run manifest of `output` around a block that writes it: `running` (with `state`), then
    `complete`; `failed` with the error's first line for any exception (ours, a bug, out of
    memory); `interrupted` only for what is no exception (Ctrl-C, SIGTERM, a closed pipe). A
    `fresh` run keeps nothing of an earlier manifest (its start time); a resumed one keeps it. A
    manifest that cannot be written then never hides the error that ended the block."""
    if fresh:
        manifest_path(output).unlink(missing_ok=True)
    write_manifest(output, run, status="running", **state)
    outcome: dict[str, Any] = {"status": "interrupted", "error": None}
    try:
        yield
        outcome["status"] = "complete"
    except Exception as e:
        lines = str(e).strip().splitlines()
        message = lines[0] if lines else ""
        outcome = {"status": "failed", "error": message if isinstance(e, BioGptError) else
                   f"{type(e).__name__}: {message}".rstrip(": ")}
        raise
    finally:
        try:
            write_manifest(output, run, **outcome, records=records(), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        except BioGptError:
            if outcome["status"] == "complete":
                raise


def check_output(path: str | None, *, force: bool = False, resume: bool | None = None,
                 source: str | None = None) -> None:
    """Refuse an output path that cannot be used, before any work is done: one that is the input
    file `source` too would be emptied before its first line was read. `resume` None: the command
    cannot resume, so its hint offers --force only."""
    if path is None or path == "-":
        return
    target = Path(path)
    if not target.parent.is_dir():
        raise InputError(f"{path}: no folder {target.parent} to write it in")
    check_writable(target.parent, path)
    if not target.exists():
        return
    if not target.is_file():
        raise InputError(f"{path}: not a regular file")
    if source not in (None, "-") and Path(source).exists() and os.path.samefile(source, path):
        raise InputError(f"{path}: is also the input; write the output to another file")
    if not (force or resume):
        raise InputError(f"{path}: already exists; pass --force to overwrite it"
                         + (" or --resume to finish it" if resume is not None else ""))


def check_writable(folder: str | Path, name: str | Path) -> None:
    """Refuse, before any model loads, an output whose folder (or, for one not made yet, the
    nearest folder above it) cannot take a file: a file is made there and removed, which the
    permission bits alone cannot tell (root, a read-only mount, a full quota)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = folder / f".biogpt-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        raise InputError(f"{name}: cannot write ({e.strerror})") from None


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def write_manifest(output: Path, run: dict[str, Any], **state: Any) -> None:
    """Record the run beside its output (atomically); `state` adds status, record counts, times."""
    from . import __version__

    path = manifest_path(output)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    data = {"tool": f"biogpt-cli {__version__}", "started": old.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run": run, **{k: v for k, v in old.items() if k not in ("tool", "started", "run")}, **state}
    data = {k: v for k, v in data.items() if v is not None}  # a None in `state` removes an old value
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    try:
        write_text(path, text)
    except OSError as e:
        if e.errno != errno.ENOSPC or not path.is_file():
            raise InputError(f"{path}: cannot write the run manifest ({e.strerror})") from None
        with open(path, "r+b") as f:  # a full disk: over the old manifest's own space, so the run says it failed
            f.write(text.encode())
            f.truncate()


def check_manifest(output: Path, run: dict[str, Any]) -> None:
    """Refuse to resume `output` under a run that differs from the one that wrote it, naming what differs."""
    path = manifest_path(output)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["run"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{output}: no readable run manifest ({path.name}) beside it, so a resume cannot tell "
                         "whether it is the same run; pass --force to start over") from None
    differ = list(differences(recorded, run))
    if differ:
        raise InputError(f"{output}: written by a different run ({'; '.join(differ)}); resume with the same "
                         "settings, or pass --force to start over")


NOT_IDENTITY = ("speculation", "speculate", "draft_tokens")  # the speed of a run, never its tokens


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """`key old -> new` for each value that differs, nested keys dotted (`options.max_new_tokens`);
    settings that change only the speed (`NOT_IDENTITY`) may differ."""
    for key in sorted((set(old) | set(new)) - set(NOT_IDENTITY)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key} {_show(a)} -> {_show(b)}"


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: the identity of an input file in a run manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _recover(path: Path, group: int) -> set[Key]:
    """Keys of the prompts whose records are all in `path`. A torn last line and an incomplete
    last group (a run killed mid-write) are cut off; damage anywhere else is refused."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    keys: list[tuple[Key, int]] = []  # (key, byte offset of the line)
    offset = 0
    for n, line in enumerate(lines[:-1], 1):  # the part after the last newline is torn (or empty)
        try:
            keys.append((record_key(json.loads(line)), offset))
        except (ValueError, AttributeError, TypeError):
            if n < len(lines) - 1:
                raise InputError(f"{path}: line {n} is not a record this tool wrote; cannot resume it") from None
            break
        offset += len(line) + 1
    counts: dict[Key, int] = {}
    for key, _ in keys:
        counts[key] = counts.get(key, 0) + 1
    if keys and counts[keys[-1][0]] < group:
        offset = next(o for k, o in keys if k == keys[-1][0])
        del counts[keys[-1][0]]
    if offset < len(data):
        os.truncate(path, offset)
    return {k for k, c in counts.items() if c >= group}


def generation_record(prompt: Prompt, done: Completion) -> dict[str, Any]:
    """`generate`'s record: the prompt first (as used: a `--truncate`d one as cut, with the length
    it was given), then what every record has."""
    given = prompt.fields.get("prompt_tokens_given")
    return {"prompt": prompt.text, **({"prompt_tokens_given": given} if given else {}), **base_record(prompt, done)}


def base_record(prompt: Prompt, done: Completion) -> dict[str, Any]:
    return {"text": done.text, "ids": done.ids, "finish_reason": done.finish_reason, **prompt.origin}


def generation_line(prompt: Prompt, done: Completion) -> str:
    return prompt.text.rstrip() + done.text


CONFIDENCE = ((0.9, "green"), (0.5, "yellow"), (0.2, "dark_orange"), (0.0, "red"))
CONFIDENCE_LEGEND = ("confidence: green >= 90%, yellow >= 50%, orange >= 20%, red < 20% "
                     "(the probability of the least likely token of each piece of text)")


def confidence_style(p: float | None) -> str | None:
    """The colour of text whose least likely token had probability `p`."""
    return None if p is None else next(colour for floor, colour in CONFIDENCE if p >= floor)


RecordFn = Callable[[Prompt, "Completion"], dict[str, Any]]
LineFn = Callable[[Prompt, "Completion"], str]


class Renderer:
    """Shows one batch's `TextEvent`s in input order.

    On a terminal (`console`), the current sequence streams live after its prompt in bold and later
    ones wait their turn; with `eager` False a row's prompt waits for its first text (a spinner
    that shares the terminal until then would erase it). Otherwise each prompt's sequences go out
    as whole lines once all are done: `prompt + text` lines, or JSONL records.

    What it keeps is what is still to show: a prompt, its text and its sequences are dropped once
    written, so a run over a million prompts holds no more than one over a thousand.
    """

    def __init__(self, fmt: str, writer: LineWriter | None, console: Console | None, sequences: int = 1,
                 record: RecordFn = generation_record, line: LineFn = generation_line,
                 summary: LineFn | None = None, confidence: bool = False, eager: bool = True) -> None:
        self.fmt, self.writer, self.console, self.k = fmt, writer, console, sequences
        self.record, self.line, self.summary = record, line, summary  # summary: shown after live text
        self.confidence = confidence  # colour live text by the events' confidence
        self.eager = eager
        self.prompts: dict[int, Prompt] = {}
        self.count = 0

    def begin(self, prompts: Sequence[Prompt]) -> None:
        self.prompts, self.count, self.cur, self.opened = dict(enumerate(prompts)), len(prompts), 0, -1
        self.text: dict[int, str] = {}
        self.done: dict[int, Completion] = {}
        if self.console is not None and self.eager:
            self._open_row()

    def add(self, prompt: Prompt) -> None:
        """One more prompt (continuous batching reads them as rows free up)."""
        self.prompts[self.count] = prompt
        self.count += 1
        if self.console is not None and self.eager:
            self._open_row()

    def event(self, ev: TextEvent) -> None:
        if ev.done is not None:
            self.done[ev.row] = ev.done
        if self.console is not None:
            if ev.row != self.cur or self.opened < self.cur:  # shown when its turn comes
                self.text[ev.row] = self.text.get(ev.row, "") + ev.text
            if ev.row == self.cur:
                if self.opened < self.cur:  # a row that waited for its text
                    self._open_row()
                else:
                    style = confidence_style(ev.confidence) if self.confidence else None
                    self.console.print(ev.text, end="", markup=False, highlight=False, soft_wrap=True, style=style)
            while self.cur in self.done:
                suffix = self.summary(self.prompts[self.cur // self.k], self.done[self.cur]) if self.summary else ""
                self.console.print(f"  [{suffix}]" if suffix else "", style="dim", markup=False, highlight=False)
                self._forget(self.cur)
                self.cur += 1
                if self.eager or self.cur in self.done:
                    self._open_row()
            return
        while self.cur < self.count and all(r in self.done for r in range(self.cur * self.k, (self.cur + 1) * self.k)):
            self._write_prompt(self.cur)
            for r in range(self.cur * self.k, (self.cur + 1) * self.k):
                self._forget(r)
            self.cur += 1

    def _forget(self, row: int) -> None:
        """Drop what row `row` kept, and its prompt with its last row."""
        self.done.pop(row, None)
        self.text.pop(row, None)
        if (row + 1) % self.k == 0:
            self.prompts.pop(row // self.k, None)

    def _record(self, prompt: Prompt, done: Completion, sequence: int) -> dict[str, Any]:
        record = self.record(prompt, done)
        if self.k > 1:
            record["sequence"] = sequence
        return record

    def _open_row(self) -> None:
        if self.opened < self.cur < self.count * self.k:
            self.opened = self.cur
            text = Text()  # the prompt in bold, what the row made while it waited its turn not
            text.append(self.prompts[self.cur // self.k].text.rstrip(), style="bold")
            text.append(self.text.get(self.cur, ""))
            self.console.print(text, end="", soft_wrap=True)

    def _write_prompt(self, i: int) -> None:
        prompt, rows = self.prompts[i], range(i * self.k, (i + 1) * self.k)
        if self.fmt == "jsonl":
            records = [self._record(prompt, self.done[r], r - i * self.k) for r in rows]
            lines = [dumps(record) for record in records]
        else:
            lines = [self.line(prompt, self.done[r]) + "\n" for r in rows]
        self.writer.write("".join(lines), records=self.k)
