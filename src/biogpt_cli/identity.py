"""A model's identity by content, shared by run manifests, `--resume`, Ray folders and the caches
of converted and quantized weights.

Names, sizes and modification times cannot tell weights apart: a retrained checkpoint of the same
shape has the same sizes, and `cp -p`, `rsync -a` or `tar x` restore the old mtime. So the identity
is a sha256 of every file's content. Hashing 1.5 GB takes seconds, so each file's digest is kept in
the user cache under its path, size, mtime, ctime and inode: writing a file's content always moves
its ctime (no tool can set it back), so a digest found under the same five is the file's own, and a
warm start only stats the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from .files import write_text
from .linear import cache_dir

KEPT_DIGESTS = 512  # files whose digests the cache remembers (the most recent)


def file_sha256(path: Path, known: dict[str, str] | None = None) -> str:
    """sha256 of a file's bytes, from the digest cache (`known`: as already read) when the file is
    unchanged since."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}"
    known = _read_digests() if known is None else known
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    known[key] = digest.hexdigest()
    _write_digests(dict(list(known.items())[-KEPT_DIGESTS:]))
    return known[key]


def model_identity(folder: str | Path) -> dict[str, str]:
    """`sha256`: of every file of the model folder (name and content), and `commit`: the Hub
    revision's commit, for a folder of the Hub cache."""
    folder = Path(folder)
    digest, known = hashlib.sha256(), _read_digests()  # the cache is read once for all the files
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            digest.update(f"{path.name}:{file_sha256(path, known)};".encode())
    identity = {"sha256": digest.hexdigest()}
    if folder.parent.name == "snapshots":  # huggingface_hub's layout: snapshots/<commit>/
        identity["commit"] = folder.name
    return identity


def _digests_path() -> Path:
    return cache_dir() / "digests.json"


def _read_digests() -> dict[str, str]:
    try:
        data = json.loads(_digests_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: computed again
        return {}
    return data if isinstance(data, dict) else {}


def _write_digests(data: dict[str, str]) -> None:
    path = _digests_path()
    with contextlib.suppress(OSError):  # an unwritable cache only costs hashing again
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(data))


def prune(folder: Path, limit_bytes: int) -> None:
    """Remove the least recently used files of a cache folder until it holds at most `limit_bytes`
    (the newest file is always kept). Users set the limit with BIOGPT_CACHE_GB."""
    with contextlib.suppress(OSError):
        files = sorted((p for p in folder.glob("*.safetensors") if p.is_file()), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files[:-1]:
            if total <= limit_bytes:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)


def cache_limit() -> int:
    """Bytes each weights cache (converted, prepared) may hold: BIOGPT_CACHE_GB, default 4."""
    try:
        return int(float(os.environ.get("BIOGPT_CACHE_GB", "4")) * 1e9)
    except ValueError:
        return int(4e9)
