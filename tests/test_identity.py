"""A model is known by its content: resumes and the weights caches tell apart weights rewritten
in place with the same shapes, sizes and modification time (what `cp -p`, `rsync -a` and `tar x`
leave behind)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from biogpt_cli import BioGptForCausalLM, identity
from tests.conftest import make_reference, one_error_line


def rewrite_in_place(folder: Path, layer: int = 0) -> None:
    """New values for one layer's weights, same shapes, and the file's old mtime put back."""
    path = folder / "model.safetensors"
    before = path.stat()
    state = load_file(path)
    key = f"biogpt.layers.{layer}.fc1.weight"
    state[key] = torch.randn_like(state[key])
    save_file(state, path, metadata={"format": "pt"})
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.fixture
def model(tiny_ref, tmp_path):
    return Path(shutil.copytree(tiny_ref[1], tmp_path / "model"))


def test_identity_follows_content_not_names_sizes_or_mtime(model):
    first = identity.model_identity(model)
    assert identity.model_identity(model) == first and "commit" not in first
    rewrite_in_place(model)
    assert identity.model_identity(model)["sha256"] != first["sha256"]


def test_digests_are_cached_until_a_file_changes(model, monkeypatch):
    identity.model_identity(model)
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(Path(p).name) or real_open(p, *a, **k))
    identity.model_identity(model)
    assert "model.safetensors" not in reads  # a warm start only stats the files
    monkeypatch.undo()
    rewrite_in_place(model)
    reads.clear()
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: reads.append(Path(p).name) or real_open(p, *a, **k))
    identity.model_identity(model)
    assert "model.safetensors" in reads


def test_a_hub_snapshot_names_its_commit(model, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--x--y" / "snapshots" / commit
    shutil.copytree(model, snapshot)
    assert identity.model_identity(snapshot)["commit"] == commit


def test_resume_against_rewritten_weights_is_refused(cli, model, tmp_path):
    (tmp_path / "p.txt").write_text("the cat\nof the\nand then\n")
    out = tmp_path / "o.jsonl"
    args = ("generate", "-m", model, "-i", tmp_path / "p.txt", "-o", out, "-n", "3")
    assert cli(*args)[0] == 0
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:1]))  # as if interrupted after one
    rewrite_in_place(model)
    code, _, err = cli(*args, "--resume")
    assert code == 1 and "written by a different run (model_files.sha256 " in one_error_line(err)
    assert len(out.read_text().splitlines()) == 1  # nothing of the other model mixed in


def test_the_prepared_cache_never_serves_other_content(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    make_reference(folder, seed=3, hidden_size=128, intermediate_size=256)
    ids = torch.tensor([[2, *range(10, 40)]])
    with torch.no_grad():
        old = BioGptForCausalLM.from_pretrained(folder, quantize="int8")(ids).logits
        rewrite_in_place(folder, layer=1)
        new = BioGptForCausalLM.from_pretrained(folder, quantize="int8")(ids).logits
        shutil.rmtree(tmp_path / "cache")  # prepared from nothing: what the cache must have given
        fresh = BioGptForCausalLM.from_pretrained(folder, quantize="int8")(ids).logits
    assert not torch.allclose(new, old, atol=1e-3) and torch.equal(new, fresh)


def test_caches_keep_a_bounded_size(tmp_path):
    for i, size in enumerate((300, 300, 300)):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(b"x" * size)
        os.utime(path, (i, i))
    identity.prune(tmp_path, 650)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.safetensors", "2.safetensors"]
    identity.prune(tmp_path, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["2.safetensors"]  # the newest stays


def test_prepared_files_beyond_the_limit_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BIOGPT_CACHE_GB", "0")
    for seed in (1, 2):
        folder = tmp_path / f"m{seed}"
        folder.mkdir()
        make_reference(folder, seed=seed, hidden_size=128, intermediate_size=256)
        BioGptForCausalLM.from_pretrained(folder, quantize="int8")
    assert len(list((tmp_path / "cache" / "prepared").glob("*.safetensors"))) == 1
    assert json.loads((tmp_path / "cache" / "digests.json").read_text())
