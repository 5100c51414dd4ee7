"""Writing results: in input order, whole lines only, resumable, and live text on a terminal.

Rows of a batch finish out of order; records go out in input order. A record (or the group of
records of one prompt) is written with one `write` while SIGINT and SIGTERM are held back, so an
interrupted run leaves only complete lines, and `--resume` can trust every line it finds.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.text import Text

from .errors import InputError
from .inputs import Prompt
from .streaming import Completion, TextEvent

Key = tuple[str, str | int]
_HELD = {signal.SIGINT, signal.SIGTERM}


class LineWriter:
    """Writes whole lines to a file descriptor, uninterrupted by Ctrl-C or SIGTERM."""

    def __init__(self, fd: int) -> None:
        self.fd, self.records = fd, 0

    def write(self, text: str, records: int = 1) -> None:
        data = memoryview(text.encode("utf-8"))
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD) if hasattr(signal, "pthread_sigmask") else None
        try:
            while data:
                data = data[os.write(self.fd, data):]
            self.records += records
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)


def record_key(record: dict) -> Key:
    return ("id", record["id"]) if "id" in record else ("line", record["line"])


def open_output(path: str | None, *, force: bool = False, resume: bool = False,
                group: int = 1) -> tuple[LineWriter, set[Key]]:
    """The writer for `-o PATH` (stdout without one) and, when resuming, the keys already done.

    An existing file is never clobbered silently: `--force` overwrites, `--resume` continues it.
    """
    if path is None or path == "-":
        return LineWriter(1), set()
    check_output(path, force=force, resume=resume)
    target = Path(path)
    done = _recover(target, group) if resume and target.exists() else set()
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if resume else os.O_TRUNC), 0o644)
    except OSError as e:
        raise InputError(f"{target}: cannot write ({e.strerror})") from None
    return LineWriter(fd), done


def check_output(path: str | None, *, force: bool = False, resume: bool = False) -> None:
    """Refuse an output path that cannot be used, before any work is done."""
    if path is None or path == "-" or not Path(path).exists():
        return
    if not Path(path).is_file():
        raise InputError(f"{path}: not a regular file")
    if not (force or resume):
        raise InputError(f"{path}: already exists; pass --force to overwrite it or --resume to finish it")


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
        except (ValueError, KeyError, TypeError):
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


def format_record(prompt: Prompt, done: Completion, sequence: int, sequences: int) -> str:
    record: dict = {"prompt": prompt.text, "text": done.text, "ids": done.ids, "finish_reason": done.finish_reason}
    if prompt.line:
        record["line"] = prompt.line
    if prompt.id is not None:
        record["id"] = prompt.id
    if sequences > 1:
        record["sequence"] = sequence
    return json.dumps(record, ensure_ascii=False) + "\n"


class Renderer:
    """Shows one batch's `TextEvent`s in input order.

    On a terminal (`console`), the current sequence streams live after its prompt in bold and later
    ones wait their turn. Otherwise each prompt's sequences go out as whole lines once all are done:
    `prompt + text` lines, or JSONL records.
    """

    def __init__(self, fmt: str, writer: LineWriter | None, console: Console | None, sequences: int) -> None:
        self.fmt, self.writer, self.console, self.k = fmt, writer, console, sequences
        self.prompts: Sequence[Prompt] = ()

    def begin(self, prompts: Sequence[Prompt]) -> None:
        self.prompts, self.cur = prompts, 0
        self.text: dict[int, str] = {}
        self.done: dict[int, Completion] = {}
        if self.console is not None:
            self._open_row()

    def event(self, ev: TextEvent) -> None:
        self.text[ev.row] = self.text.get(ev.row, "") + ev.text
        if ev.done is not None:
            self.done[ev.row] = ev.done
        if self.console is not None:
            if ev.row == self.cur:
                self.console.print(ev.text, end="", markup=False, highlight=False, soft_wrap=True)
            while self.cur in self.done:
                self.console.print()
                self.cur += 1
                self._open_row()
            return
        while self.cur < len(self.prompts) and all(r in self.done for r in range(self.cur * self.k,
                                                                                 (self.cur + 1) * self.k)):
            self._write_prompt(self.cur)
            self.cur += 1

    def _open_row(self) -> None:
        if self.cur < len(self.prompts) * self.k:
            text = Text(self.prompts[self.cur // self.k].text.rstrip(), style="bold")
            text.append(self.text.get(self.cur, ""))
            self.console.print(text, end="", soft_wrap=True)

    def _write_prompt(self, i: int) -> None:
        prompt, rows = self.prompts[i], range(i * self.k, (i + 1) * self.k)
        if self.fmt == "jsonl":
            lines = [format_record(prompt, self.done[r], r - i * self.k, self.k) for r in rows]
        else:
            lines = [prompt.text.rstrip() + self.done[r].text + "\n" for r in rows]
        self.writer.write("".join(lines), records=self.k)
