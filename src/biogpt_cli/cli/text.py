"""`biogpt tokenize` and `biogpt detokenize`: the tokenizer alone (torch is never imported)."""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import typer

from ..errors import InputError
from ..hub import DEFAULT_MODEL
from ..inputs import Prompt, input_name, jsonl_input, open_input, parallel_map, read_lines, read_records
from ..jsonl import dumps, loads
from ..output import whole_output
from .common import (
    DebugOpt,
    ErrorsOpt,
    FileArg,
    ForceOpt,
    InputFormatOpt,
    ModelOpt,
    OutputFormatOpt,
    OutputOpt,
    QuietOpt,
    RevisionOpt,
    SameInputOpt,
    SectionLabelsOpt,
    TextOpt,
    command,
    file_or_input,
    line_progress,
    output_format,
)


def _tokenizer(model: str, revision: str | None) -> Any:
    from ..tokenizer import BioGptTokenizer

    return BioGptTokenizer.from_pretrained(model, revision)


@command
def tokenize(
    file: FileArg = None,
    input: SameInputOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    tokens: Annotated[bool, typer.Option("--tokens", help="BPE pieces instead of ids.")] = False,
    no_special: Annotated[bool, typer.Option("--no-special", help="Drop the leading </s>.")] = False,
    input_format: InputFormatOpt = "auto",
    text: TextOpt = None,
    section_labels: SectionLabelsOpt = False,
    output: OutputOpt = None,
    fmt: OutputFormatOpt = "auto",
    force: ForceOpt = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes (output order kept).")] = 1,
    errors: ErrorsOpt = "strict",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Text to token ids, one line per line.

    Moses + BPE ids (exactly the reference's input_ids), one output line per input line (or per
    document of a literature file)."""
    file, fmt = _files(file, input, output, force), output_format(fmt, output)
    name = input_name(file)
    with open_input(file) as f, whole_output(output) as writer:  # a missing input is named before the vocabulary
        render = functools.partial(_tokenize_line, _tokenizer(model, revision), not no_special,
                                   "jsonl" if fmt == "jsonl" else "tokens" if tokens else "ids", name)
        items = read_records(f, name, input_format, errors, "text", text or "all", section_labels)
        with line_progress(file, output, quiet) as update:
            n = 0
            for n, line in enumerate(parallel_map(render, items, jobs), 1):
                writer.write(line)
                if n % 256 == 0:
                    update(n)
            update(n)


def _files(file: str | None, input: str | None, output: str | None, force: bool) -> str:
    """The input (stdin without one), with the output file checked against it."""
    from ..output import check_output

    file = file_or_input(file, input) or "-"
    check_output(output, force=force, source=file)
    return file


def _tokenize_line(tok: Any, special: bool, mode: str, name: str, item: Prompt) -> str:
    """One output line of `tokenize` (module level, so worker processes can run it)."""
    try:
        ids = tok.encode(item.text, add_special_tokens=special)
    except InputError as e:
        raise InputError(f"{name}: {item.where}{e}") from None
    if mode == "jsonl":
        return dumps({"ids": ids, "tokens": tok.convert_ids_to_tokens(ids), **item.origin})
    return " ".join(tok.convert_ids_to_tokens(ids) if mode == "tokens" else map(str, ids)) + "\n"


@command
def detokenize(
    file: FileArg = None,
    input: SameInputOpt = None,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    input_format: Annotated[Literal["auto", "text", "jsonl"], typer.Option(
        help="text: ids per line; jsonl: records with \"ids\"; auto: JSONL for *.jsonl(.gz), else either, line "
             "by line.")]
    = "auto",
    output: OutputOpt = None,
    fmt: OutputFormatOpt = "auto",
    force: ForceOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Token ids back to text.

    Ids back to text (special tokens dropped), per line: space-separated, or the "ids" of a JSONL
    record (`tokenize --format jsonl`, `generate --format jsonl`)."""
    file, fmt = _files(file, input, output, force), output_format(fmt, output)
    name = input_name(file)
    kind = "jsonl" if jsonl_input(file, input_format) else input_format  # auto: JSON or ids, line by line
    with open_input(file) as f, whole_output(output) as writer:
        tok = _tokenizer(model, revision)
        for n, text in read_lines(f, name):
            try:
                ids, origin = _ids(text, kind)
            except ValueError:
                raise InputError(f'{name}: line {n}: expected space-separated integer ids, or a JSON record with '
                                 '"ids"') from None
            bad = [i for i in ids if not 0 <= i < tok.vocab_size]
            if bad:
                raise InputError(f"{name}: line {n}: id {bad[0]} is outside the vocabulary (0..{tok.vocab_size - 1})")
            decoded = tok.decode(ids, skip_special_tokens=True)
            writer.write(dumps({"text": decoded, "line": n, **origin}) if fmt == "jsonl" else decoded + "\n")


def _ids(text: str, kind: str) -> tuple[list[int], dict[str, Any]]:
    """A line's ids and, for a record, its "id"; ValueError when it holds none."""
    if kind == "text" or (kind == "auto" and not text.lstrip().startswith("{")):
        return [int(x) for x in text.split()], {}
    record = loads(text)
    ids = record.get("ids") if isinstance(record, dict) else None
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise ValueError("no list of integer ids")
    return ids, {"id": record["id"]} if "id" in record else {}
