"""`biogpt generate` at a terminal without a prompt: the model loads once, each line typed is a
prompt whose continuation streams. Line editing and history come from readline (the history is kept
between sessions); Ctrl-C stops the current generation, Ctrl-D or /exit leaves, /set changes a
decoding setting, /help lists them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import BioGptError, PromptTooLong
from .common import load, stderr

# /set NAME VALUE: the settings a person changes between prompts, with their types
SETTINGS = {"max_new_tokens": int, "min_new_tokens": int, "num_beams": int, "num_return_sequences": int,
            "sample": bool, "temperature": float, "top_k": int, "top_p": float, "min_p": float, "seed": int,
            "repetition_penalty": float, "no_repeat_ngram_size": int, "length_penalty": float}
ALIASES = {"n": "max_new_tokens", "beams": "num_beams", "k": "top_k", "p": "top_p", "t": "temperature"}
HELP = ("type a prompt and press Enter; Ctrl-C stops a generation, Ctrl-D or /exit leaves.\n"
        "/set NAME VALUE changes a setting (" + ", ".join(SETTINGS) + "; /set NAME none resets it); "
        "/show lists them; /help shows this")


def _value(kind: type, text: str) -> Any:
    if text.lower() in ("none", "default"):
        return None
    if kind is bool:
        if text.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{text!r} is not on or off")
        return text.lower() in ("on", "true", "1", "yes")
    return kind(text)


def command(line: str, settings: dict[str, Any]) -> str | None:
    """A /command's reply, or None to leave."""
    from ..plans import generation_options

    words = line.split()
    if words[0] in ("/exit", "/quit"):
        return None
    if words[0] == "/help":
        return HELP
    if words[0] == "/show":
        used = _used(settings)
        return "  ".join(f"{k}={used[k]}" for k in SETTINGS)
    if words[0] != "/set" or len(words) != 3:
        return f"unknown command {line.strip()!r}: /set NAME VALUE, /show, /help or /exit"
    name = ALIASES.get(words[1], words[1])
    if name not in SETTINGS:
        return f"no setting {words[1]!r}: one of {', '.join(SETTINGS)}"
    try:
        trial = {**settings, name: _value(SETTINGS[name], words[2])}
        if name == "max_new_tokens" and trial[name] is None:
            raise ValueError("max_new_tokens needs a number")
        generation_options(trial).validate()
    except (ValueError, BioGptError) as e:
        return f"not changed: {e}"
    settings.update(trial)
    return f"{name} = {_used(settings)[name]}"


def _used(settings: dict[str, Any]) -> dict[str, Any]:
    """The values decoding will use, defaults included (what /show lists and /set echoes)."""
    from ..plans import generation_options

    opts = generation_options(settings)
    return {k: getattr(opts, k, None) for k in SETTINGS} | {"sample": opts.do_sample, "seed": settings.get("seed")}


def history_file() -> Path | None:
    """Where the lines typed are kept between sessions: `$BIOGPT_HISTORY` (empty: nowhere), else
    `$XDG_STATE_HOME/biogpt-cli/history` (`~/.local/state/...`)."""
    given = os.environ.get("BIOGPT_HISTORY")
    if given is not None:
        return Path(given).expanduser() if given else None
    state = os.environ.get("XDG_STATE_HOME") or Path("~/.local/state").expanduser()
    return Path(state) / "biogpt-cli" / "history"


@contextlib.contextmanager
def kept_history() -> Iterator[None]:
    """readline's history, read from `history_file()` and written back at the end (the last 1000
    lines). A file that cannot be read or written costs only the history."""
    import readline  # input() gets line editing and history

    path = history_file()
    with contextlib.suppress(OSError):
        if path is not None:
            readline.read_history_file(path)
    readline.set_history_length(1000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(path)


def interact(settings: dict[str, Any], *, model: str, revision: str | None, dtype: str, device: Any, quantize: str,
             confidence: bool = False) -> None:
    from .. import batch
    from ..inputs import Prompt
    from ..output import CONFIDENCE_LEGEND, Renderer
    from ..plans import generate_plan, generation_options

    one_row = generation_options(settings).rows_per_prompt == 1
    lm, tok = load(model, revision, dtype, device, quantize, rows=1 if one_row else None)
    stderr.print(f"biogpt {model}: " + HELP.splitlines()[0], style="dim")
    if confidence:
        stderr.print(CONFIDENCE_LEGEND, style="dim")
    console = Console(highlight=False)
    turn = 0
    with kept_history():
        while True:
            try:
                line = input("> ")
            except EOFError:  # Ctrl-D
                console.print()
                return
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
                console.print()
                continue
            if not line.strip():
                continue
            if line.startswith("/"):
                reply = command(line, settings)
                if reply is None:
                    return
                stderr.print(reply, style="dim", markup=False)
                continue
            turn += 1  # each prompt its own random stream (reproducible with /set seed)
            try:
                plan = generate_plan(lm, tok, {**settings, "seed": settings.get("seed") or 0}, stderr.print)
                renderer = Renderer("text", None, console, plan.opts.num_return_sequences, confidence=confidence)
                batch.run(lm, tok, [plan.job(Prompt(turn, line))], plan.opts, renderer, batch_size=1, stop=plan.stop,
                          seed=plan.seed, confidence=confidence)
            except KeyboardInterrupt:
                console.print("\n[stopped]", style="dim", markup=False)
            except PromptTooLong as e:
                stderr.print(f"error: {e.hinted('shorten it or /set n lower')}", markup=False)
            except BioGptError as e:
                stderr.print(f"error: {e}", markup=False)
