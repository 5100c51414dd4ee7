"""Every checkpoint layout loads to the same weights; broken ones give one clear error."""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from biogpt_cli import BioGptForCausalLM, BioGptModel, BioGptTokenizer, CheckpointError, ConfigError
from biogpt_cli.hub import resolve
from biogpt_cli.loading import convert, load_pretrained
from tests.conftest import make_reference

IDS = torch.tensor([[2, 10, 20, 30, 40, 50]])


def logits_of(model):
    return model(IDS).logits


@pytest.fixture
def tiny(tiny_ref, tmp_path):
    """A private copy of the tiny checkpoint folder, free to break."""
    ref, folder = tiny_ref
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    with torch.no_grad():
        expected = ref(IDS).logits
    return ref, dst, expected


def test_safetensors_without_and_with_tied_key(tiny):
    ref, folder, expected = tiny
    assert torch.allclose(logits_of(BioGptForCausalLM.from_pretrained(folder)), expected, atol=1e-4)
    save_file({k: v.clone() for k, v in ref.state_dict().items()}, folder / "model.safetensors")
    assert torch.allclose(logits_of(BioGptForCausalLM.from_pretrained(folder)), expected, atol=1e-4)


@pytest.fixture
def big_table(tmp_path):
    """A tiny checkpoint with one tensor above the copying threshold: a 1 MiB position table."""
    make_reference(tmp_path, max_position_embeddings=8192)
    return tmp_path


def test_safetensors_is_memory_mapped_not_copied(big_table):
    """Large tensors are views of the mapped file; small ones (biases, norms) are copied out of it."""
    model = BioGptForCausalLM.from_pretrained(big_table, fuse=False, kernels=False)
    table = model.biogpt.embed_positions.weight
    assert table.nbytes >= 1 << 20
    assert table.untyped_storage().nbytes() >= (big_table / "model.safetensors").stat().st_size - 10_000
    assert model.biogpt.layers[0].fc1.weight.untyped_storage().nbytes() == model.biogpt.layers[0].fc1.weight.nbytes


def _resident_pages(t: torch.Tensor) -> int:
    """Pages wholly inside `t` that this process has mapped (Linux's /proc/self/pagemap, bit 63)."""
    first, last = -(-t.data_ptr() // mmap.PAGESIZE), (t.data_ptr() + t.nbytes) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        raw = f.read((last - first) * 8)
    return sum(int.from_bytes(raw[i:i + 8], "little") >> 63 for i in range(0, len(raw), 8))


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux's /proc/self/pagemap")
def test_mapped_table_keeps_no_pages_behind(big_table):
    """A table that stays mapped hands back the pages each lookup maps (Linux maps the cached pages
    around a fault too: reading a few rows would otherwise keep far more than those rows resident)."""
    model = BioGptForCausalLM.from_pretrained(big_table)
    table = model.biogpt.embed_positions.weight
    with torch.inference_mode():
        model(IDS)
    assert table.untyped_storage().nbytes() > table.nbytes and _resident_pages(table) == 0


def test_pytorch_bin_loads_and_is_converted_once(tiny, tmp_path, monkeypatch):
    ref, folder, expected = tiny
    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path / "cache"))
    (folder / "model.safetensors").unlink()
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    assert torch.allclose(logits_of(BioGptForCausalLM.from_pretrained(folder)), expected, atol=1e-4)
    cached = list((tmp_path / "cache" / "converted").glob("*.safetensors"))
    assert len(cached) == 1
    assert torch.allclose(logits_of(BioGptForCausalLM.from_pretrained(folder)), expected, atol=1e-4)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_pytorch_bin_with_code_is_refused(tiny, monkeypatch):
    _, folder, _ = tiny
    monkeypatch.chdir(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1), "x": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused"):
        BioGptForCausalLM.from_pretrained(folder)
    assert not (folder / "pwned-by-pickle").exists()


def write_fairseq(ref, folder: Path, evil: bool = False, task: dict | None = None,
                  name: str = "checkpoint.pt") -> None:
    """A checkpoint.pt shaped like the original release, with training state beside the weights."""
    meters = types.ModuleType("fake_fairseq_meters")

    class AverageMeter:  # pickled by reference to a module the loader does not have
        def __init__(self):
            self.val, self.sum = 1.5, 3.0

    AverageMeter.__module__ = meters.__name__
    AverageMeter.__qualname__ = "AverageMeter"
    meters.AverageMeter = AverageMeter
    sys.modules[meters.__name__] = meters
    try:
        model = {("decoder." + k.removeprefix("biogpt.") if k.startswith("biogpt.") else "decoder." + k): v
                 for k, v in ref.state_dict().items()}
        model["decoder.version"] = torch.tensor([3.0])
        args = argparse.Namespace(decoder_attention_heads=ref.config.num_attention_heads, activation_fn="gelu",
                                  share_decoder_input_output_embed=True, no_scale_embedding=False)
        ckpt = {"model": model, "args": None, "cfg": {"model": args, "task": task or {}},
                "optimizer_history": [{"optimizer_name": "AdamOptimizer", "num_updates": 200000}],
                "extra_state": {"meters": {"loss": AverageMeter()}}}
        if evil:
            ckpt["extra_state"]["payload"] = _Evil()
        torch.save(ckpt, folder / name)
    finally:
        del sys.modules[meters.__name__]


def fairseq_folder(ref, hub_vocab_folder: Path, dst: Path, evil: bool = False, task: dict | None = None,
                   name: str = "checkpoint.pt") -> Path:
    """The release's layout; a task checkpoint's dict.txt lacks its learned prompt tokens, as the release's does."""
    dst.mkdir()
    write_fairseq(ref, dst, evil, task, name)
    encoder = json.loads((hub_vocab_folder / "vocab.json").read_text())
    words = [w for w in sorted(encoder, key=encoder.get)[4:] if not re.fullmatch(r"learned\d+</w>", w)]
    (dst / "dict.txt").write_text("".join(
        f"{w[:-4] if w.endswith('</w>') else w + '@@'} 1\n" for w in words), encoding="utf-8")
    shutil.copy(hub_vocab_folder / "merges.txt", dst / "bpecodes")
    return dst


def test_fairseq_checkpoint_loads_and_converts(tiny, tmp_path):
    ref, folder, expected = tiny
    src = fairseq_folder(ref, folder, tmp_path / "fairseq")
    model = BioGptForCausalLM.from_pretrained(src)
    assert torch.allclose(logits_of(model), expected, atol=1e-4)
    out = convert(src, tmp_path / "hub")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    assert torch.allclose(logits_of(BioGptForCausalLM.from_pretrained(out)), expected, atol=1e-4)
    assert BioGptTokenizer.from_folder(out).encoder == BioGptTokenizer.from_folder(folder).encoder


def test_fairseq_pickled_code_is_never_run(tiny, tmp_path, monkeypatch):
    ref, folder, expected = tiny
    src = fairseq_folder(ref, folder, tmp_path / "fairseq", evil=True)
    monkeypatch.chdir(tmp_path)
    model = BioGptForCausalLM.from_pretrained(src)
    assert not (tmp_path / "pwned-by-pickle").exists()
    assert torch.allclose(logits_of(model), expected, atol=1e-4)


def test_base_model_loads_from_lm_checkpoint(tiny):
    ref, folder, _ = tiny
    with torch.no_grad():
        expected = ref.biogpt(IDS).last_hidden_state
    assert torch.allclose(BioGptModel.from_pretrained(folder)(IDS).last_hidden_state, expected, atol=1e-4)


def test_dtype_choice(tiny):
    _, folder, expected = tiny
    model = BioGptForCausalLM.from_pretrained(folder, dtype="bfloat16")
    assert model.biogpt.embed_tokens.weight.dtype == torch.bfloat16
    got = logits_of(model).float()
    assert (got - expected).abs().max() < 0.1 * expected.std()  # measured: 0.002 against a std of 0.12
    assert not torch.allclose(got, expected, atol=1e-6)  # bfloat16 is really in use


def test_hub_cache_offline(tiny, tmp_path):
    """A Hub-cache folder under HF_HOME loads by id with HF_HUB_OFFLINE=1 (run in a fresh process)."""
    _, folder, expected = tiny
    snap = tmp_path / "hf" / "hub" / "models--someone--tiny-biogpt" / "snapshots" / ("a" * 40)
    shutil.copytree(folder, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    torch.save(expected, tmp_path / "expected.pt")
    code = ("import torch; from biogpt_cli import BioGptForCausalLM as M; "
            "m = M.from_pretrained('someone/tiny-biogpt'); "
            f"e = torch.load({str(tmp_path / 'expected.pt')!r}); "
            f"assert torch.allclose(m(torch.tensor({IDS.tolist()})).logits, e, atol=1e-4); print('ok')")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "ok", run.stderr


def test_unknown_hub_id_fails_fast_with_advice(tmp_path, monkeypatch):
    code = ("from biogpt_cli.hub import resolve\n"
            "try:\n    resolve('nobody/no-such-model')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    for offline in ("1", "0"):
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": offline,
               "HF_ENDPOINT": "http://127.0.0.1:9"}  # a closed local port: "the Hub is unreachable"
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert run.stdout.startswith("CheckpointError nobody/no-such-model is not in the local"), run
        assert "--model PATH" in run.stdout and "HF_HUB_OFFLINE=1" in run.stdout


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        resolve(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        BioGptForCausalLM.from_pretrained(tmp_path)


def test_truncated_safetensors(tiny):
    _, folder, _ = tiny
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
        BioGptForCausalLM.from_pretrained(folder)


def test_wrong_shapes_and_keys_named(tiny):
    ref, folder, _ = tiny
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "output_projection.weight"}
    state["biogpt.layers.0.fc1.weight"] = torch.zeros(3, 3)
    del state["biogpt.layers.1.fc2.bias"]
    state["biogpt.extra.weight"] = torch.zeros(1)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        BioGptForCausalLM.from_pretrained(folder)
    message = str(err.value)
    assert "missing: biogpt.layers.1.fc2.bias" in message
    assert "unexpected: biogpt.extra.weight" in message
    assert "wrong shape: biogpt.layers.0.fc1.weight (3, 3) != (64, 32)" in message


@pytest.mark.parametrize("text,match", [("{bad json", "invalid JSON"), ('{"hidden_size": 30}', "not divisible"),
                                        ('{"num_hidden_layers": -1}', "positive"), ("[1, 2]", "JSON object")])
def test_bad_config_json(tiny, text, match):
    _, folder, _ = tiny
    (folder / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        BioGptForCausalLM.from_pretrained(folder)
    assert "config.json" in str(err.value)


def test_vocabulary_that_does_not_match_weights(tiny):
    _, folder, _ = tiny
    encoder = json.loads((folder / "vocab.json").read_text())
    size = len(encoder)
    encoder.update({f"extra{i}</w>": size + i for i in range(100)})
    (folder / "vocab.json").write_text(json.dumps(encoder))
    with pytest.raises(CheckpointError, match=f"vocabulary has {size + 100} tokens but the model expects {size}"):
        load_pretrained(folder)
