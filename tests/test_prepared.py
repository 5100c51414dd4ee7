"""Quantized kernels: our int8 against torch.ao's, and the prepared-weights cache (issue 11)."""

from __future__ import annotations

import os

import pytest
import torch

from biogpt_cli import BioGptForCausalLM, native
from biogpt_cli.linear import Int4Linear, Int8Linear, NativeInt4Linear, NativeInt8Linear
from tests.conftest import make_reference


def test_int8_equals_torch_ao_dynamic_quantization():
    """Our int8 layer is torch.ao's `quantize_dynamic` (per-channel qconfig) without torch.ao:
    the same integers, the same scales, the same outputs, for one row and for a batch."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    with pytest.warns(DeprecationWarning):  # torch.ao says it is going: all the more reason for our own
        ao = quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear: per_channel_dynamic_qconfig})[0]
    ours = Int8Linear.quantize(linear)
    expected_weight, _ = ao._packed_params._weight_bias()
    assert torch.equal(ours.tensors()["weight"], expected_weight.int_repr())
    assert torch.equal(ours.tensors()["scales"], expected_weight.q_per_channel_scales())
    for shape in [(1, 96), (3, 5, 96)]:
        x = torch.randn(shape)
        assert torch.equal(ours(x), ao(x))


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A model wide enough for int4 (128 inputs per group), and an empty user cache."""
    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    make_reference(folder, seed=3, hidden_size=128, intermediate_size=256)
    return folder


def logits(model: BioGptForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[2, *range(10, 40)]])).logits


def refuse_to_quantize(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("quantized again although the prepared weights are cached")
    for cls in (Int8Linear, NativeInt8Linear, NativeInt4Linear):
        monkeypatch.setattr(cls, "quantize", refuse)
    monkeypatch.setattr(Int4Linear, "__init__", refuse)


KERNELS = ["torch", "native"]


def use(monkeypatch, method: str, kernel: str) -> str:
    """Load `method` with torch's kernel or ours (skipped where ours cannot be built)."""
    if kernel == "native" and native.library() is None:
        pytest.skip(f"our kernels: {native.unavailable()}")
    name = method if kernel == "torch" else f"{method}-native"
    monkeypatch.setenv("BIOGPT_KERNEL", name)
    return name


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_weights_are_prepared_once(checkpoint, tmp_path, monkeypatch, method, kernel):
    use(monkeypatch, method, kernel)
    first = BioGptForCausalLM.from_pretrained(checkpoint, quantize=method)
    files = list((tmp_path / "cache" / "prepared").glob("*.safetensors"))
    assert len(files) == 1
    refuse_to_quantize(monkeypatch)
    second = BioGptForCausalLM.from_pretrained(checkpoint, quantize=method)
    assert torch.equal(logits(second), logits(first))
    assert [type(m) for m in second.modules()] == [type(m) for m in first.modules()]
    assert second.biogpt.layers[0].self_attn.qkv_proj is not None  # q/k/v fused from the cache as well


def test_a_bad_or_stale_prepared_file_is_prepared_again(checkpoint, tmp_path, monkeypatch):
    expected = logits(BioGptForCausalLM.from_pretrained(checkpoint, quantize="int8"))
    [prepared] = (tmp_path / "cache" / "prepared").glob("*.safetensors")
    prepared.write_bytes(prepared.read_bytes()[: prepared.stat().st_size // 2])  # truncated
    assert torch.equal(logits(BioGptForCausalLM.from_pretrained(checkpoint, quantize="int8")), expected)
    assert prepared.stat().st_size > 0 and len(list(prepared.parent.iterdir())) == 1  # rewritten whole

    # new weights under the same name: their own prepared file, never the old one
    make_reference(checkpoint, seed=4, hidden_size=128, intermediate_size=256)
    os.utime(checkpoint / "model.safetensors", ns=(1, 1))
    changed = logits(BioGptForCausalLM.from_pretrained(checkpoint, quantize="int8"))
    assert not torch.allclose(changed, expected, atol=1e-3)
    assert len(list(prepared.parent.iterdir())) == 2


@pytest.mark.parametrize("kernel", KERNELS)
def test_another_models_prepared_file_is_refused(checkpoint, tmp_path, monkeypatch, kernel):
    """A file whose layers do not fit this model (copied over, or a hash collision) is prepared again."""
    from biogpt_cli.prepared import for_kernel, prepared_path

    name = use(monkeypatch, "int8", kernel)

    expected = logits(BioGptForCausalLM.from_pretrained(checkpoint, quantize="int8"))
    other = tmp_path / "other"
    other.mkdir()
    make_reference(other, seed=5, hidden_size=64, intermediate_size=128)
    BioGptForCausalLM.from_pretrained(other, quantize="int8")
    mine = for_kernel(prepared_path(checkpoint, BioGptForCausalLM, "int8"), name)
    mine.write_bytes(for_kernel(prepared_path(other, BioGptForCausalLM, "int8"), name).read_bytes())
    assert torch.equal(logits(BioGptForCausalLM.from_pretrained(checkpoint, quantize="int8")), expected)
