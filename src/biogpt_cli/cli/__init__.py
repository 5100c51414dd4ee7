"""The `biogpt` command line. Commands only parse, check and render; the work lives in the library.
One module per command family: generate (and the batch plumbing), text (tokenize/detokenize),
score, models (info/convert), tasks (qa/extract/classify/evaluate), finetune, embed; interactive (the
REPL `generate` opens at a terminal); common (shared options, the loaded model, progress bars).

Errors are mapped once, in `main`: one `error: ...` line on stderr, exit 1 (2 for usage errors,
130 for Ctrl-C, 143 for SIGTERM, 141 quietly when the reader of stdout goes away). `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import signal
import sys
import warnings
from typing import Annotated

import typer

from ..errors import BioGptError, Conflict
from . import embed, finetune, generate, models, score, serve, tasks, text  # noqa: F401 -- registers the commands
from .common import ARGV, Quit, UsageError, app, stderr


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"biogpt-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """BioGPT text generation, tasks, tokenization and scoring, token-for-token equal to the reference."""


def _named_values(group: typer.core.TyperGroup) -> typer.core.TyperGroup:
    """Help shows each option's value by its meaning (`--model MODEL`, `-n N`, `--input FILE`),
    not its Python type (`<str>`); choices keep their list."""
    for cmd in group.commands.values():  # typer may vendor click: options and choices are told by shape
        for param in cmd.params:
            if param.param_type_name == "option" and not param.is_flag and param.metavar is None \
                    and not hasattr(param.type, "choices"):
                name = max(param.opts, key=len).lstrip("-")
                kind = getattr(param.type, "name", "")
                param.metavar = ("FILE" if name in ("input", "output", "entities") else "N" if "int" in kind
                                 else "X" if "float" in kind else name.upper().replace("-", "_"))
            elif param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()
    return group


def _terminate(signum: int, frame: object) -> None:
    raise Quit(128 + signum)


def _warning_line(message: Warning | str, category: type, filename: str, lineno: int, file: object = None,
                  line: str | None = None) -> None:
    """A library's warning as one line on stderr, as the CLI's own are."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    ARGV[:] = argv
    if hasattr(sys.stdout, "reconfigure"):  # every command writes UTF-8, whatever the locale says
        sys.stdout.reconfigure(encoding="utf-8")
    debug = "--debug" in argv
    signal.signal(signal.SIGTERM, _terminate)
    warnings.showwarning = _warning_line
    code = 0
    try:
        result = _named_values(typer.main.get_command(app)).main(argv, prog_name="biogpt", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except Quit as q:
        code = q.code
    except BioGptError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = 2 if isinstance(e, UsageError | Conflict) else 1
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        if type(e).__name__ == "Abort":  # click's Ctrl-C
            code = 130
        elif type(e).__name__ == "NoArgsIsHelpError":
            stderr.print(e.format_message(), markup=False)  # the help text
            code = e.exit_code
        elif debug:
            raise
        elif hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
            # click's usage errors (bad option values, unknown options); typer may vendor click, so by shape
            message = re.sub(r"is not a valid (int|integer|float)( range)?", lambda m: "is not a " + (
                "number" if m[1] == "float" else "whole number"), " ".join(e.format_message().split()))
            print("error: " + message, file=sys.stderr)  # choices come tab-indented
            code = e.exit_code
        else:  # a bug, or a failure we did not foresee: still one line
            print(f"error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
            code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = code or 141
    if code in (130, 141, 143):  # nothing more may reach a closed or abandoned stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def entry() -> None:
    """The `biogpt` executable: `main`, then exit without tearing the interpreter down, which
    frees a loaded model object by object (about half a second). Output is flushed first; files
    were closed by the commands.

    The start runs without the cyclic garbage collector (`common.end_startup` turns it back on
    once a model is loaded): importing torch and building the model and vocabulary make about a
    million objects and no garbage, and collections walking them are a large share of a start.
    Commands that load no model (tokenize, info, convert, evaluate) make no cycles and
    run without it to the end."""
    gc.disable()
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
    os._exit(code)


__all__ = ["app", "entry", "main"]
