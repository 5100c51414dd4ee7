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
