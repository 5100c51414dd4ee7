"""`biogpt pull`, `list` and `rm` over a Hugging Face cache laid out as huggingface_hub lays it
out (refs, snapshots linking to blobs), built here: no network."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import one_error_line


def cached(cache, repo: str, commit: str, files: dict[str, bytes], ref: str | None = "main") -> None:
    """One model revision in a Hub cache: blobs, a snapshot of links to them, and a ref."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / commit).mkdir(parents=True)
    for name, data in files.items():
        blob = root / "blobs" / f"{abs(hash((commit, name))):x}"
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, root / "snapshots" / commit), root / "snapshots" / commit / name)
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    cached(folder, "microsoft/biogpt", "a" * 40, {"config.json": b"{}", "model.safetensors": b"x" * 2_000_000})
    cached(folder, "lab/biogpt-ddi", "b" * 40, {"config.json": json.dumps({"task": "ddi"}).encode(),
                                                 "model.safetensors": b"y" * 3_000_000})
    return folder


def test_list_shows_cached_models_and_local_folders(cli, cache, tmp_path):
    (tmp_path / "runs" / "qa-model").mkdir(parents=True)
    (tmp_path / "runs" / "qa-model" / "config.json").write_text(json.dumps({"task": "pubmedqa"}))
    (tmp_path / "runs" / "RE-DDI-BioGPT").mkdir()  # the release's fairseq layout, which -m loads too
    (tmp_path / "runs" / "RE-DDI-BioGPT" / "checkpoint_avg.pt").write_bytes(b"z" * 1_000_000)
    (tmp_path / "runs" / "notes").mkdir()
    code, out, err = cli("list", "--dir", tmp_path / "runs", "--format", "jsonl")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0, err
    assert [(r["id"], r["revision"], r["size"], r["task"]) for r in rows] == [
        ("lab/biogpt-ddi", "main", "3.0 MB", "ddi"), ("microsoft/biogpt", "main", "2.0 MB", None),
        (str(tmp_path / "runs" / "RE-DDI-BioGPT"), "local", "1.0 MB", None),
        (str(tmp_path / "runs" / "qa-model"), "local", "0.0 MB", "pubmedqa")]
    code, out, _ = cli("list")
    assert code == 0 and out.splitlines()[1].split() == ["lab/biogpt-ddi", "main", "3.0", "MB", "ddi"]


def test_rm_asks_or_takes_yes_and_frees_the_space(cli, cache):
    code, _, err = cli("rm", "lab/biogpt-ddi")  # no terminal to ask on
    assert code == 2 and "would free 3.0M" in one_error_line(err) and "--yes" in err
    code, _, err = cli("rm", "lab/biogpt-ddi", "--yes")
    assert code == 0 and "removed lab/biogpt-ddi" in err
    assert not (cache / "models--lab--biogpt-ddi" / "blobs").exists() or not any(
        (cache / "models--lab--biogpt-ddi" / "blobs").iterdir())
    code, out, _ = cli("list", "--format", "jsonl")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["microsoft/biogpt"]
    code, _, err = cli("rm", "lab/biogpt-ddi", "--yes")
    assert code == 1 and "is not in the Hugging Face cache" in one_error_line(err)


def test_pull_offline_says_so_in_one_line(cli, cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli("pull", "someone/not-cached")
    assert code == 1 and "someone/not-cached" in one_error_line(err)
    code, _, err = cli("pull", str(cache))
    assert code == 2 and "a local folder is used as it is" in one_error_line(err)
