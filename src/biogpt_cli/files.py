"""Files written whole or not at all: every file the package writes goes through `replacing`, so
a reader (a resumed run, another process, the next start) finds the old content or the new one,
never a torn or empty file. A kill leaves at most a temporary beside the target (named by the
writer's PID), which nothing reads and the next write of the same file removes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # torch is imported where a tensor is written: the tokenizer's commands run without it
    import torch


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` for the block to write; it becomes `path` when the block ends
    without an error, and is removed when it raises."""
    path = Path(path)
    _clean_stale(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")  # two threads: two names
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _clean_stale(path: Path) -> None:
    """Remove the temporaries of `path` that processes killed mid-write left (their PID is gone)."""
    with contextlib.suppress(OSError):
        for old in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):
            pid = old.name[len(path.name) + 1:].split(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                old.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


@contextlib.contextmanager
def output_errors(name: str | Path) -> Iterator[None]:
    """A write of an output (not a cache's) that fails, a full disk say, as one line naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as e:
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        raise InputError(f"{name}: {'disk full' if full else f'cannot write ({e})'}; free space, then run the same "
                         "command again") from None


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, whole or not at all, leaving the file the mode `open()` would give
    it (safetensors creates it 0600: a checkpoint written into a shared folder was its owner's
    alone). The mode is read from a file `open()` creates, never by setting the process's umask."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        tmp.touch()
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)


def save_torch(obj: object, path: str | Path) -> None:
    """`torch.save`, whole or not at all (read back with `torch.load(weights_only=True)`)."""
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)
