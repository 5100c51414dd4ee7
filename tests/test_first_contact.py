"""What a new user meets in an afternoon: values that cannot fit, messages that must be true,
help that reads, and options that do nothing refused."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from rich.console import Console

from biogpt_cli import memory
from biogpt_cli.cli import common
from biogpt_cli.cli.generate import _say_interrupted
from biogpt_cli.cli.interactive import command as slash
from biogpt_cli.cli.score import shown_piece
from biogpt_cli.config import BioGptConfig
from tests.conftest import ROOT, make_reference, one_error_line
from tests.test_cli import run_in_pty


@pytest.fixture
def unloadable(tiny_ref, tmp_path):
    """A copy of the tiny model whose weights cannot load: what fails with it fails before loading."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_ref[1], folder)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    return folder


# -- memory ------------------------------------------------------------------------------------
def test_rows_that_cannot_fit_are_refused_before_loading(cli, unloadable, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**9)
    code, out, err = cli("generate", "x", "-m", unloadable, "--num-beams", "100000", "-n", "2")
    line = one_error_line(err)
    assert code == 2 and out == "" and line.startswith("error: --num-beams: 100000 decoding rows need about")
    fit = int(re.search(r"at most (\d+) rows fit", line).group(1))
    assert 0 < fit < 100000
    (tmp_path / "p.txt").write_text("x\n")
    code, _, err = cli("generate", "-i", tmp_path / "p.txt", "-m", unloadable, "--batch-size", "1000000")
    assert code == 2 and "--batch-size: 1000000 decoding rows" in one_error_line(err)
    code, _, err = cli("generate", "x", "-m", unloadable, "--num-beams", str(fit // 2), "-n", "2")
    assert code == 1 and "not a valid safetensors file" in one_error_line(err)  # it fits: loading is tried


def test_row_estimate_counts_every_layer_and_the_vocabulary():
    config = BioGptConfig()  # microsoft/biogpt
    per_row = memory.row_bytes(config, 1024)
    assert 2 * 24 * 1024 * 1024 * 4 < per_row < 2 * 24 * 1024 * 1024 * 4 + 16 * 4 * 42384
    memory.check_rows_fit(config, 16, 1024, what="x", free=10**11)
    with pytest.raises(memory.InputError, match="at most 3 rows fit"):
        memory.check_rows_fit(config, 16, 1024, what="x", free=10**9)


# -- interrupted runs --------------------------------------------------------------------------
def test_interrupted_text_output_suggests_no_resume(monkeypatch, capsys):
    monkeypatch.setattr(common, "ARGV", ["generate", "-i", "p.txt", "-o", "long.txt"])
    _say_interrupted("long.txt", "text", 3)
    err = capsys.readouterr().err
    assert "long.txt holds 3 complete records" in err and "--resume" not in err and "-o FILE.jsonl" in err
    _say_interrupted("long.jsonl", "jsonl", 3)
    assert capsys.readouterr().err.rstrip().endswith("--resume")


def test_resume_says_what_it_finds(cli, tiny_ref, tmp_path):
    (tmp_path / "p.txt").write_text("the cat\nof the\n")
    out = tmp_path / "o.jsonl"
    args = ("generate", "-m", tiny_ref[1], "-i", tmp_path / "p.txt", "-o", out, "-n", "3", "--resume")
    code, _, err = cli(*args)
    assert code == 0 and "does not exist yet: starting it" in err and "already done" not in err
    code, _, err = cli(*args)
    assert code == 0 and "2 inputs already done" in err and "already complete: nothing was left to do" in err


# -- the test command leaves the user's environment alone -----------------------------------------
def test_ci_builds_its_environments_outside_the_checkout():
    script = (ROOT / ".ci" / "run").read_text()
    targets = re.findall(r"-m venv (\S+)", script)
    assert len(targets) == 3 and all(t.startswith('"$venvs/') for t in targets), targets
    assert ".venv/bin/activate" not in script and "rm -rf \"$venvs\"" in script


# -- progress ----------------------------------------------------------------------------------
def test_eta_follows_the_average_rate_not_the_last_burst(monkeypatch):
    now = [0.0]
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, get_time=lambda: now[0])
    monkeypatch.setattr(common, "stderr", console)
    with common.progress(30, quiet=False) as update:
        for t, done in ((53.0, 8), (54.0, 16)):  # two batches of rows finish in the last second
            now[0] = t
            update(done)
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue()).strip().splitlines()[-1]
    assert "16/30" in last and "ETA 0:00:47" in last, last  # 54 s for 16: 47 s for the other 14
    assert common.eta_seconds(None, 0, 30) is None and common.eta_seconds(10.0, 10, 10) == 0.0


# -- score --show ------------------------------------------------------------------------------
def test_show_on_a_terminal_has_numbers_and_a_legend(tiny_ref, tmp_path):
    (tmp_path / "t.txt").write_text("the cat and the dog\n")
    code, screen = run_in_pty(["score", str(tmp_path / "t.txt"), "-m", str(tiny_ref[1]), "--show"])
    plain = re.sub(r"\x1b\[[0-9;]*m", "", screen)
    assert code == 0 and "surprisal in bits: green < 4" in plain and re.search(r"the\(\d+\.\d\)", plain), plain


def test_shown_pieces_undo_moses_escapes():
    assert [shown_piece(t) for t in ("anti@-@</w>", "&amp;</w>", "&lt;", "cell</w>")] == ["anti-", "&", "<", "cell"]


# -- task commands need a task checkpoint ----------------------------------------------------------
@pytest.mark.parametrize("args", [["qa", "--question", "q", "--context", "c"], ["extract", "text"],
                                  ["classify", "text"]])
def test_task_commands_name_the_checkpoint_they_need(cli, monkeypatch, args):
    monkeypatch.delenv("BIOGPT_MODEL", raising=False)
    code, out, err = cli(*args)
    assert code == 2 and out == "" and "give it with -m MODEL" in one_error_line(err)


def test_info_on_a_checkpoint_without_its_task_names_the_commands(cli, tmp_path):
    make_reference(tmp_path, prompt_tokens=3)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "learned_prompt": 3}))
    code, out, _ = cli("info", "-m", tmp_path)
    assert code == 0 and "pass --task" not in out and "run it with `biogpt qa`" in out
    code, out, _ = cli("info", "-m", tmp_path, "--format", "jsonl")
    facts = json.loads(out)
    assert facts["learned_prompt_tokens"] == 3 and "loaded_from" in facts and all(" " not in k for k in facts)
    plain = tmp_path / "lm"
    plain.mkdir()
    make_reference(plain)
    code, out, _ = cli("info", "-m", plain, "--format", "jsonl")
    assert json.loads(out)["source_limit"] is None


# -- examples ----------------------------------------------------------------------------------
def test_api_example_honours_biogpt_model(tiny_ref):
    env = {**os.environ, "BIOGPT_MODEL": str(tiny_ref[1])}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "api.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("COVID-19 is"), run.stderr
    env = {**os.environ, "BIOGPT_MODEL": "/no/such/model"}
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "api.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and one_error_line(run.stderr) == "error: /no/such/model: no such model folder"


# -- help and wording --------------------------------------------------------------------------
def test_help_reads_at_80_columns(monkeypatch):
    from biogpt_cli.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    for args in (["--help"], *([name, "--help"] for name in ("generate", "qa", "score", "serve", "embed"))):
        screen = io.StringIO()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(sys, "stdout", screen)
            main(args)
        text = screen.getvalue()
        assert not re.search(r"<(str|int|float)( range)?>", text) and "9223372036854775807" not in text
        if args == ["--help"]:
            assert "..." not in text.split("Commands:")[1]
    screen = io.StringIO()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "stdout", screen)
        main(["qa", "--help"])
    assert "beams" not in screen.getvalue() and "one item per line" not in screen.getvalue()


@pytest.mark.parametrize("args, message", [
    (["--min-new-tokens", "9", "-n", "5"], "error: --min-new-tokens must be between 0 and --max-new-tokens"),
    (["--sample", "--temperature", "0"], "error: --temperature must be greater than 0"),
    (["--stop", ""], "error: --stop needs a non-empty text"),
    (["--ban", " "], "error: --ban needs a non-empty text"),
    (["--show-confidence"], "error: --show-confidence colours text streamed to a terminal"),
    (["--seed", str(2**63), "--sample"], "error: --seed 9223372036854775808 is too large"),
])
def test_usage_errors_name_the_options_typed(cli, args, message):
    code, out, err = cli("generate", "x", "-m", "/no/such/model", *args)
    assert code == 2 and out == "" and one_error_line(err).startswith(message)


def test_choices_of_a_missing_option_read_on_one_line(cli):
    code, _, err = cli("evaluate", "a", "b")
    assert code == 2 and "\t" not in err and "Choose from: pubmedqa, hoc" in one_error_line(err)


def test_empty_input_is_noted(cli, tiny_ref, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, out, err = cli("generate", "-m", tiny_ref[1], "-i", tmp_path / "empty.txt")
    assert code == 0 and out == "" and "note: the input is empty" in err


def test_interactive_settings_echo_what_decoding_uses():
    settings = {"max_new_tokens": 5, "sample": True}
    assert slash("/set sample none", settings) == "sample = False"
    assert "sample=False" in slash("/show", settings)
    assert "'/foo'" in slash("/foo", settings)


def test_evaluate_hints_at_swapped_arguments_and_counts(cli, tmp_path):
    gold = tmp_path / "test_ground_truth.json"
    gold.write_text(json.dumps({"1": "yes", "2": "no"}, indent=2))
    preds = tmp_path / "answers.jsonl"
    preds.write_text(json.dumps({"id": "1", "answer": "yes"}) + "\n")
    code, _, err = cli("evaluate", "--task", "pubmedqa", gold, preds)
    assert code == 1 and "the order is PREDICTIONS GOLD" in one_error_line(err)
    code, out, err = cli("evaluate", "--task", "pubmedqa", preds, gold)
    assert code == 0 and "1 gold item without a prediction" in err and out.startswith(f"pubmedqa: {preds}\n")
    assert all(line == line.rstrip() for line in out.splitlines()[:1])


def test_missing_extra_names_installable_packages():
    from biogpt_cli.errors import missing_extra

    message = str(missing_extra("biogpt serve", "serve"))
    assert message.startswith("biogpt serve needs the serve extra: pip install ") and "'fastapi>=" in message


def test_commands_that_write_records_share_their_spellings():
    """Every command with -o takes --format; every command with -i takes --input-format, the same
    spellings everywhere (`embed --format jsonl` was 'No such option')."""
    import typer

    from biogpt_cli.cli import app

    for name, cmd in typer.main.get_command(app).commands.items():
        opts = {o for p in cmd.params for o in p.opts}
        if "--output" in opts and name != "finetune":  # finetune writes a checkpoint folder, not records
            assert {"-o", "--format"} <= opts, name
        if "--input" in opts:
            assert {"-i", "--input-format"} <= opts, name


@pytest.mark.parametrize("command", [
    ["generate", "-i", "{inp}", "-o", "{out}/out.jsonl"], ["score", "{inp}", "-o", "{out}/s.jsonl"],
    ["embed", "-i", "{inp}", "-o", "{out}/e.safetensors"], ["tokenize", "{inp}", "-o", "{out}/ids.txt"],
    ["convert", "{model}", "{out}/converted"], ["extract", "-i", "{inp}", "-o", "{out}/r.jsonl"],
    ["finetune", "{inp}", "--task", "custom", "-o", "{out}/ft"],
], ids=lambda c: c[0])
def test_an_unwritable_output_is_one_line_before_any_model_loads(cli, tiny_ref, tmp_path, monkeypatch, command):
    """Where the output cannot be written (here /sys, which refuses even root), every command says
    so in one line naming the output, before it loads anything: no library error, no temp name."""
    from biogpt_cli import loading

    unwritable = "/sys"
    if not _refuses(unwritable):
        pytest.skip(f"{unwritable} takes files here")
    (tmp_path / "in.jsonl").write_text('{"source": "a", "target": "b", "prompt": "a", "text": "a"}\n')
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [a.format(inp=tmp_path / "in.jsonl", out=unwritable, model=tiny_ref[1]) for a in command]
    code, _, err = cli(*args, "-m", tiny_ref[1]) if command[0] != "convert" else cli(*args)
    assert code in (1, 2) and "cannot write (Permission denied)" in one_error_line(err), err
    assert args[args.index("-o") + 1 if "-o" in args else 2] in err


def _refuses(folder: str) -> bool:
    try:
        os.close(os.open(os.path.join(folder, ".probe"), os.O_CREAT | os.O_WRONLY))
    except OSError:
        return True
    os.unlink(os.path.join(folder, ".probe"))
    return False


def test_help_starts_without_the_tokenizer_or_torch():
    """`biogpt --help` reads neither the Moses tables nor torch: what a command needs is imported
    when it runs. The finetune command's task names are datasets.TASK_NAMES, spelled out."""
    import subprocess
    import sys
    import typing

    from biogpt_cli.cli import finetune
    from biogpt_cli.datasets import TASK_NAMES

    loaded = subprocess.run([sys.executable, "-c", "import sys, biogpt_cli.cli; "
                             "print(' '.join(m for m in ('sacremoses', 'torch') if m in sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
    assert typing.get_args(finetune.TaskName) == TASK_NAMES
