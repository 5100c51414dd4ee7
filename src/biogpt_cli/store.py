"""The models a user keeps: the Hugging Face cache read with huggingface_hub's own scan (no network),
and folders of fine-tuned checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import InputError
from .hub import FAIRSEQ_CHECKPOINTS


def _task(folder: Path) -> str | None:
    """The task a checkpoint folder was fine-tuned for (its config.json says), or None."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("task") if isinstance(config, dict) else None


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _scan() -> Any:
    """huggingface_hub's scan of its cache ($HF_HUB_CACHE as it is now, else the one it found at
    import), or None when there is none yet."""
    from huggingface_hub import constants, scan_cache_dir

    try:
        return scan_cache_dir(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 -- its CacheNotFound: nothing cached yet
        return None


def cached_models() -> list[dict[str, Any]]:
    """Every model revision in the Hugging Face cache: id, revision (a branch or tag pointing at it,
    else its commit), size on disk, task."""
    cache = _scan()
    if cache is None:
        return []
    rows = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            rows.append({"id": repo.repo_id, "revision": ",".join(sorted(rev.refs)) or rev.commit_hash,
                         "size": _size(rev.size_on_disk), "bytes": rev.size_on_disk, "task": _task(rev.snapshot_path),
                         "path": str(rev.snapshot_path)})
    return rows


def _model_folder(path: Path) -> bool:
    """What `-m` loads: a folder with a config.json, or the release's fairseq checkpoint."""
    return (path / "config.json").is_file() or any((path / name).is_file() for name in FAIRSEQ_CHECKPOINTS)


def folder_models(root: Path) -> list[dict[str, Any]]:
    """The checkpoint folders in `root` (Hub layout or the release's), or `root` itself."""
    if not root.is_dir():
        raise InputError(f"--dir {root}: no such folder")
    folders = [root] if _model_folder(root) else sorted(p for p in root.iterdir() if p.is_dir() and _model_folder(p))
    rows = []
    for f in folders:
        size = sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
        rows.append({"id": str(f), "revision": "local", "size": _size(size), "bytes": size, "task": _task(f),
                     "path": str(f)})
    return rows


def remove(model: str, revision: str | None = None) -> Any:
    """huggingface_hub's deletion plan for `model` (every cached revision, or `revision`'s)."""
    cache = _scan()
    repos = [r for r in cache.repos if r.repo_id == model and r.repo_type == "model"] if cache else []
    revs = [rev for r in repos for rev in r.revisions
            if revision is None or rev.commit_hash.startswith(revision) or revision in rev.refs]
    if not revs:
        held = f" at revision {revision}" if revision else ""
        raise InputError(f"{model}{held} is not in the Hugging Face cache (biogpt list shows what is)")
    return cache.delete_revisions(*(rev.commit_hash for rev in revs))
