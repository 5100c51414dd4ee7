"""What every command shares: the Typer app, options, the stderr console, usage errors and the
loaded model (kept for the process)."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from ..errors import BioGptError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"max_content_width": 100})
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
ARGV: list[str] = []  # this command's arguments, for the resume command an interrupted run prints


class UsageError(BioGptError):
    """A bad option value or combination: exit 2, before any model is loaded."""


class Quit(BaseException):
    """Leaves through typer untouched (it is no Exception) and ends the process with `code`."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


Format = Literal["text", "jsonl"]
OutputFormat = Literal["auto", "text", "jsonl"]
InputFormat = Literal["auto", "text", "jsonl"]
Errors = Literal["strict", "replace"]
DType = Literal["float32", "bfloat16", "float16"]
Quantize = Literal["none", "int8", "int4"]

ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="BIOGPT_MODEL",
                                       help="Model folder or Hugging Face Hub id.")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
FormatOpt = Annotated[Format, typer.Option("--format", help="Output format.")]
OutputFormatOpt = Annotated[OutputFormat, typer.Option("--format", help="auto: JSONL for -o *.jsonl, else text.")]
ErrorsOpt = Annotated[Errors, typer.Option("--errors", help="Invalid UTF-8 in the input: stop, or replace by U+FFFD.")]
FileArg = Annotated[str, typer.Argument(help="Input file, one item per line; '-' or nothing reads stdin.")]
InputOpt = Annotated[str | None, typer.Option("--input", "-i", help="Input file, one item per line ('-': stdin).")]
InputFormatOpt = Annotated[InputFormat, typer.Option(help="auto: JSONL if the name ends in .jsonl.")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Write here instead of stdout.")]
ForceOpt = Annotated[bool, typer.Option(help="Overwrite an existing --output file.")]
ResumeOpt = Annotated[bool, typer.Option(help="Finish an interrupted --output file of the same run.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Inputs decoded together.")]
DTypeOpt = Annotated[DType, typer.Option(help="Weight precision.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")]
QuantizeOpt = Annotated[Quantize, typer.Option(help="CPU weights: int8 (dynamic) or int4 (group-wise).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Load time, counts and speed on stderr.")]


def command(fn: Callable[..., None]) -> Callable[..., None]:
    """Register a command; a closed stdout ends it quietly."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
            sys.stdout.flush()
        except BrokenPipeError:
            raise Quit(141) from None
    return app.command()(run)


def out(text: str) -> None:
    sys.stdout.write(text)


def output_format(fmt: OutputFormat, output: str | None) -> Format:
    """`--format auto`: JSONL when the output file's name ends in .jsonl, else text."""
    if fmt != "auto":
        return fmt
    return "jsonl" if output is not None and output.endswith(".jsonl") else "text"


def check_precision(quantize: str, dtype: str, device: Any) -> None:
    if quantize != "none" and (dtype != "float32" or device.type != "cpu"):
        raise UsageError(f"--quantize {quantize} runs on the CPU with its own activation precision: "
                         "drop --dtype/--device")


def device_or_usage_error(name: str) -> Any:
    from ..loading import parse_device

    try:
        return parse_device(name)
    except BioGptError as e:
        raise UsageError(str(e)) from None


@functools.lru_cache(maxsize=1)
def load(model: str, revision: str | None, dtype: str, device: Any, quantize: str = "none") -> Any:
    """The model and tokenizer, with a spinner on stderr while it loads (on a terminal only).

    Kept for the life of the process: a second command run in it reuses the model, and `entry`
    exits without freeing 1.4 GB object by object."""
    from ..loading import load_pretrained

    with stderr.status(f"loading {model}", spinner="dots") if stderr.is_terminal else contextlib.nullcontext():
        return load_pretrained(model, revision=revision, dtype=dtype, device=device, quantize=quantize)

