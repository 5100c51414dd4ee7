"""Where a model's files are: a local folder as is, or a Hub id via huggingface_hub.

Kept free of torch so that commands needing only the tokenizer start quickly.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import CheckpointError

DEFAULT_MODEL = "microsoft/biogpt"
HUB_TIMEOUT_S = 5.0
HUB_FILES = ("vocab.json", "merges.txt")  # the tokenizer in the Hub layout
FAIRSEQ_CHECKPOINTS = ("checkpoint.pt", "checkpoint_avg.pt", "checkpoint_last.pt")  # what the release's scripts load


def resolve(path_or_id: str | Path, revision: str | None = None,
            files: tuple[str, ...] = ("config.json", *HUB_FILES)) -> Path:
    """A local folder as is; otherwise a Hub id, from the local Hub cache first, then the network.

    `files` are fetched from the Hub (weights are fetched by `load_model`). Honours `HF_HOME` and
    `HF_HUB_OFFLINE` through huggingface_hub.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a model folder, found a file")
    name = str(path_or_id)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not re.fullmatch(r"[\w.\-/]+", name):
        raise CheckpointError(f"{name}: no such model folder")
    return _hub_folder(name, revision, files)


def _hub_folder(repo_id: str, revision: str | None, files: tuple[str, ...]) -> Path:
    """Download (or find cached) `files`; a group 'a|b' takes the first of its names that exists.

    huggingface_hub writes a file under its final name only when it is complete, so a broken
    download never looks like a cached model.
    """
    from huggingface_hub import hf_hub_download, model_info

    def fetch(local_only: bool) -> Path:
        folder = None
        for group in files:
            names = group.split("|")
            for i, filename in enumerate(names):
                try:
                    folder = Path(hf_hub_download(repo_id, filename, revision=revision,
                                                  local_files_only=local_only)).parent
                    break
                except Exception as e:  # noqa: BLE001 -- many error types, all mean "not here"
                    if i == len(names) - 1 or "EntryNotFound" not in type(e).__name__:
                        raise
        assert folder is not None
        return folder

    try:
        return fetch(local_only=True)
    except Exception:  # noqa: BLE001 -- not (completely) cached: ask the network
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    hint = ("is not in the local Hugging Face cache" + (" and HF_HUB_OFFLINE is set" if offline else "")
            + "; pass --model PATH for a local folder, or download it once while online "
              "(then HF_HUB_OFFLINE=1 works)")
    if offline:
        raise CheckpointError(f"{repo_id} {hint}")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would break our one-line errors
    try:
        # One quick request first: huggingface_hub retries a failing download for ~25 s.
        model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
        return fetch(local_only=False)
    except Exception as e:  # noqa: BLE001 -- network, auth, unknown repo: one message
        reason = type(e).__name__
        if "RepositoryNotFound" in reason:
            raise CheckpointError(f"{repo_id}: no such model on the Hugging Face Hub (or it is private); "
                                  "pass --model PATH for a local folder") from None
        if "RevisionNotFound" in reason:
            raise CheckpointError(f"{repo_id}: no revision {revision!r} on the Hugging Face Hub") from None
        raise CheckpointError(f"{repo_id} {hint} (the Hub did not answer: {reason})") from None
    finally:
        hub_log.setLevel(level)
