"""Files are written whole or not at all, in the mode `open()` gives, without touching the umask."""

from __future__ import annotations

import os

import pytest
import torch

from biogpt_cli import files
from biogpt_cli.loading import read_safetensors


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    files.write_text(path, "old")
    with pytest.raises(KeyboardInterrupt), files.replacing(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt  # a Ctrl-C in the middle of the write
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["run.json"]


def test_safetensors_get_the_mode_open_gives_without_setting_the_umask(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("the process-wide umask was changed"))
        files.write_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o640
    assert torch.equal(read_safetensors(tmp_path / "m.safetensors")["w"], torch.ones(2))


def test_a_killed_writers_temporary_is_cleaned_and_threads_do_not_collide(tmp_path):
    """A temporary left by a process that is gone is removed by the next write of the file (one of
    a running process is not); two threads writing one path each write their own temporary."""
    import subprocess
    import sys
    import threading

    path = tmp_path / "run.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"run.json.{gone.stdout.strip()}.tmp"
    live = tmp_path / f"run.json.{os.getppid()}.abc.tmp"
    stale.write_text("torn")
    live.write_text("being written")
    files.write_text(path, "new")
    assert path.read_text() == "new" and not stale.exists() and live.exists()
    names, ready = [], threading.Barrier(2)

    def write(text: str) -> None:
        with files.replacing(path) as tmp:
            names.append(tmp.name)
            ready.wait(timeout=600)  # both inside at once
            tmp.write_text(text)

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 2 and path.read_text() in ("a", "b")
