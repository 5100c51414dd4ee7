"""Model parity with the reference: logits, padding, cache, loss, classification heads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from biogpt_cli import (
    BioGptConfig,
    BioGptForCausalLM,
    BioGptForSequenceClassification,
    BioGptForTokenClassification,
    BioGptModel,
    ConfigError,
    KVCache,
    native,
)
from biogpt_cli.loading import from_state_dict

ATOL = 1e-4


def ours_from(ref, cls=BioGptForCausalLM, fuse=True, kernels=True, **kwargs):
    cfg = BioGptConfig.from_dict(ref.config.to_dict())
    return from_state_dict(cls, cfg, dict(ref.state_dict()), fuse=fuse, kernels=kernels, **kwargs)


def ref_positions(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)  # what the reference's generate() passes


def padded_batch(prompts, side, pad=1):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = torch.tensor(p), 1
    return ids, mask


@pytest.mark.parametrize("fuse,kernels", [(False, False), (True, False), (True, True)])
def test_single_prompt_logits_equal(tiny_ref, fuse, kernels):
    ref, _ = tiny_ref
    ours = ours_from(ref, fuse=fuse, kernels=kernels)
    ids = torch.randint(4, ref.config.vocab_size, (1, 17))
    ids[0, 0] = 2
    with torch.no_grad():
        expected = ref(ids).logits
    assert torch.allclose(ours(ids).logits, expected, atol=ATOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_equal(tiny_ref, side):
    ref, _ = tiny_ref
    ours = ours_from(ref)
    g = torch.Generator().manual_seed(1)
    prompts = [[2, *torch.randint(4, ref.config.vocab_size, (n,), generator=g).tolist()] for n in (3, 11, 7)]
    ids, mask = padded_batch(prompts, side)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=ref_positions(mask)).logits
    got = ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(got[keep], expected[keep], atol=ATOL)
    for i, p in enumerate(prompts):  # and each row equals the prompt run alone
        alone = ours(torch.tensor([p])).logits[0]
        assert torch.allclose(got[i][keep[i]], alone, atol=ATOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_weights_equal_the_reference(tiny_ref, side):
    """output_attentions: each layer's weights, as the reference's eager attention gives them (its
    SDPA keeps none), and the same logits as without them."""
    import copy

    ref = copy.deepcopy(tiny_ref[0])
    ref.set_attn_implementation("eager")
    ours = ours_from(ref)
    ids, mask = padded_batch([[2, 10, 11, 12, 13, 14], [2, 20, 21]], side)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=ref_positions(mask), output_attentions=True)
    got = ours(ids, attention_mask=mask, output_attentions=True)
    assert len(got.attentions) == len(expected.attentions) == ref.config.num_hidden_layers
    real = mask.bool()
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert a.shape == b.shape == (2, ref.config.num_attention_heads, ids.shape[1], ids.shape[1])
        for i in range(2):  # the real queries' rows; padded queries attend as nothing reads them
            assert torch.allclose(a[i][:, real[i]], b[i][:, real[i]], atol=1e-5)
    assert torch.allclose(got.logits[real], ours(ids, attention_mask=mask).logits[real], atol=1e-5)
    assert ours(ids).attentions is None


def test_cached_decoding_equals_full_pass(tiny_ref):
    ref, _ = tiny_ref
    ours = ours_from(ref)
    ids, mask = padded_batch([[2, 9, 8, 7, 6, 5, 4, 30, 31], [2, 40, 41, 42]], "left")
    full = ours(ids, attention_mask=mask).logits
    out = ours(ids[:, :3], attention_mask=mask[:, :3], use_cache=True)
    steps = [out.logits]
    for t in range(3, ids.shape[1]):
        out = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values)
        steps.append(out.logits)
    keep = mask.bool()
    assert torch.allclose(torch.cat(steps, 1)[keep], full[keep], atol=ATOL)


def test_cache_grows_past_its_first_capacity(tiny_ref):
    ref, _ = tiny_ref
    ours = ours_from(ref)
    ids = torch.tensor([[2, *range(10, 30)]])
    out = ours(ids[:, :2], use_cache=True)
    assert out.past_key_values.capacity == 2
    logits = [out.logits]
    for t in range(2, ids.shape[1]):
        out = ours(ids[:, t : t + 1], past_key_values=out.past_key_values)
        logits.append(out.logits)
    assert torch.allclose(torch.cat(logits, 1), ours(ids).logits, atol=ATOL)


def test_beams_inherit_their_parents_keys_and_values():
    """Two prompts of three beams: each new row's slot holds its parent's keys and values (the
    first child in place, others copied into a childless row's slot of the same prompt)."""
    cache = KVCache(2, 6, 1, 1, 8)
    cache.k[:] = torch.arange(6.0)[None, :, None, None, None] * 10 + torch.arange(8.0)[None, None, None, :, None]
    cache.v[:] = -cache.k
    cache.length, old = 8, cache.k.clone()
    slots = [1, 0, 2, 3, 5, 4]  # after an earlier step
    parents = [2, 2, 0, 4, 4, 4]
    new = cache.inherit(slots, parents, start=3)
    assert sorted(new[:3]) == [0, 1, 2] and sorted(new[3:]) == [3, 4, 5]
    assert new[0] == slots[2] and new[3] == slots[4]  # first children keep their parent's slot
    for i, p in enumerate(parents):
        assert torch.equal(cache.k[:, new[i], :, 3:], old[:, slots[p], :, 3:])
        assert torch.equal(cache.v[:, new[i]], -cache.k[:, new[i]])
    assert torch.equal(cache.k[:, :, :, :3], old[:, :, :, :3])  # the prompt is never copied


def test_loss_equals_reference(tiny_ref):
    ref, _ = tiny_ref
    ours = ours_from(ref)
    ids = torch.randint(4, ref.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[1, :4] = -100
    with torch.no_grad():
        expected = ref(ids, labels=labels).loss
    assert torch.allclose(ours(ids, labels=labels).loss, expected, atol=ATOL)


def test_base_model_hidden_states_equal(tiny_ref):
    ref, _ = tiny_ref
    ours = ours_from(ref, BioGptModel)
    ids = torch.randint(4, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = ref.biogpt(ids, output_hidden_states=True)
        got = ours(ids, output_hidden_states=True)
        head = ours_from(ref, BioGptForCausalLM)(ids, output_hidden_states=True).hidden_states
    assert torch.allclose(got.last_hidden_state, expected.last_hidden_state, atol=ATOL)
    assert len(got.hidden_states) == len(expected.hidden_states) == ref.config.num_hidden_layers + 1
    for a, b, c in zip(got.hidden_states, expected.hidden_states, head, strict=True):
        assert torch.allclose(a, b, atol=ATOL) and torch.equal(a, c)
    assert ours(ids).hidden_states is None


@pytest.mark.parametrize("side", ["left", "right"])
def test_classification_heads_equal(tiny_ref, side):
    ref_lm, _ = tiny_ref
    cfg = ref_lm.config
    torch.manual_seed(3)
    seq_ref = transformers.BioGptForSequenceClassification(cfg).eval()
    tok_ref = transformers.BioGptForTokenClassification(cfg).eval()
    ids, mask = padded_batch([[2, 10, 11, 12, 13], [2, 20, 21]], side)
    with torch.no_grad():
        for ref, cls in ((seq_ref, BioGptForSequenceClassification), (tok_ref, BioGptForTokenClassification)):
            ours = ours_from(ref, cls)
            labels = torch.tensor([1, 0]) if ref is seq_ref else torch.randint(0, 2, ids.shape)
            exp = ref(ids, attention_mask=mask, position_ids=ref_positions(mask), labels=labels)
            got = ours(ids, attention_mask=mask, labels=labels)
            keep = mask.bool() if ref is tok_ref else slice(None)
            assert torch.allclose(got.logits[keep], exp.logits[keep], atol=ATOL)
            assert torch.allclose(got.loss, exp.loss, atol=ATOL)


def test_full_size_logits_equal():
    """The real microsoft/biogpt shape (random weights): 24 layers, 1024 hidden, 42384 vocab."""
    torch.manual_seed(0)
    ref = transformers.BioGptForCausalLM(transformers.BioGptConfig()).eval()
    ours = ours_from(ref)
    ids, mask = padded_batch([[2, *range(100, 140)], [2, *range(500, 520)]], "left")
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=ref_positions(mask)).logits
        got = ours(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(got[keep], expected[keep], atol=ATOL)


def test_config_defaults_and_validation():
    cfg = BioGptConfig()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (42384, 1024, 24, 16)
    large = BioGptConfig.from_dict({"vocab_size": 57717, "hidden_size": 1600, "num_hidden_layers": 48,
                                    "num_attention_heads": 25, "intermediate_size": 6400,
                                    "max_position_embeddings": 2048, "unknown_key": 1})
    assert large.head_dim == 64
    with pytest.raises(ConfigError, match="not divisible"):
        BioGptConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ConfigError, match="positive"):
        BioGptConfig(num_hidden_layers=0)
    with pytest.raises(ConfigError, match="hidden_act"):
        BioGptConfig(hidden_act="swish2")


@pytest.mark.parametrize("kwargs,tolerance", [(dict(quantize="int8"), 1e-2), (dict(dtype="float16"), 2e-3),
                                              (dict(dtype="bfloat16"), 1e-2)])
def test_reduced_precision_stays_close(tiny_ref, kwargs, tolerance):
    """int8 / float16 / bfloat16 kernels, prefill and cached decoding: near the float32 logits
    (their real quality on the full-size shape is measured by benchmarks/bench.py)."""
    ref, _ = tiny_ref
    ours = ours_from(ref, **kwargs)
    ids = torch.tensor([[2, *range(10, 30)]])
    with torch.no_grad():
        expected = ref(ids).logits
    out = ours(ids[:, :5], use_cache=True)
    steps = [out.logits]
    for t in range(5, ids.shape[1]):
        out = ours(ids[:, t : t + 1], past_key_values=out.past_key_values)
        steps.append(out.logits)
    got = torch.cat(steps, 1).float()
    assert (got - expected).abs().max() < tolerance  # logits' std is about 0.12 here
    assert not torch.allclose(got, expected, atol=1e-6)  # the reduced precision is really in use


# -- hardening: positions, honest modules, thread-safe loading, bf16 without AVX-512 -----------
def test_positions_both_behaviours(tiny_ref):
    """Ours numbers positions from the mask (left padding is harmless); the reference numbers them
    0..n-1 unless told. Given the same `position_ids`, both agree."""
    ref, _ = tiny_ref
    ours = ours_from(ref)
    ids, mask = padded_batch([[2, 10, 11, 12, 13], [2, 20, 21]], "left")
    with torch.no_grad():
        ref_default = ref(ids, attention_mask=mask).logits
        ref_told = ref(ids, attention_mask=mask, position_ids=ref_positions(mask)).logits
    keep = mask.bool()
    assert torch.allclose(ours(ids, attention_mask=mask).logits[keep], ref_told[keep], atol=ATOL)
    plain = torch.arange(ids.shape[1]).expand_as(ids)
    assert torch.allclose(ours(ids, attention_mask=mask, position_ids=plain).logits[keep], ref_default[keep], atol=ATOL)
    assert not torch.allclose(ref_default[1][keep[1]], ref_told[1][keep[1]], atol=ATOL)  # the two really differ


def test_inference_model_refuses_what_it_cannot_do_and_plain_models_can(tiny_ref, tmp_path):
    import copy

    from biogpt_cli import BioGptError

    ref, folder = tiny_ref
    fast = BioGptForCausalLM.from_pretrained(folder)
    for action in (lambda m: m.state_dict(), lambda m: copy.deepcopy(m), lambda m: m.half(),
                   lambda m: m.to(torch.bfloat16), lambda m: m.to("meta"), lambda m: torch.save(m, tmp_path / "m.pt")):
        with pytest.raises(BioGptError, match="loaded for inference.*kernels=False"):
            action(fast)
    # what a script does on its way in changes nothing here, so it is allowed
    assert fast.to("cpu") is fast and fast.cpu().float().eval() is fast and fast.to(torch.float32) is fast
    with torch.no_grad():
        assert torch.allclose(fast(torch.tensor([[2, 5, 6]])).logits, ref(torch.tensor([[2, 5, 6]])).logits, atol=1e-5)
    plain = BioGptForCausalLM.from_pretrained(folder, kernels=False)
    assert set(plain.state_dict()) == set(ref.state_dict()) and next(plain.parameters()).requires_grad
    copy.deepcopy(plain).half()
    torch.save(plain.state_dict(), tmp_path / "sd.pt")
    heads = BioGptForSequenceClassification.from_pretrained(folder)  # heads default to plain nn.Linear
    assert type(heads.score) is torch.nn.Linear and not heads.inference_kernels


def test_loading_in_threads_leaves_torch_init_alone(tiny_ref):
    import threading

    from torch import nn

    folder = tiny_ref[1]
    originals = {name: getattr(nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "ones_")}
    stop, bad = threading.Event(), []

    def build_layers():
        while not stop.is_set():
            layer = nn.Linear(64, 64)
            if not (0.02 < layer.weight.std() < 0.2) or not torch.isfinite(layer.weight).all():
                bad.append(layer.weight.std().item())

    builder = threading.Thread(target=build_layers)
    builder.start()
    loaders = [threading.Thread(target=BioGptForCausalLM.from_pretrained, args=(folder,)) for _ in range(4)]
    for t in loaders:
        t.start()
    for t in loaders:
        t.join()
    stop.set()
    builder.join()
    assert not bad, "a layer built during a load was not initialised"
    assert {name: getattr(nn.init, name) for name in originals} == originals


def test_bfloat16_falls_back_without_avx512():
    """oneDNN cannot pack bfloat16 on an AVX2-only CPU: emulated with ONEDNN_MAX_CPU_ISA=AVX2."""
    import os
    import subprocess
    import sys

    code = ("import torch; from biogpt_cli.linear import can_pack; "
            "print(torch.ops.mkldnn._is_mkldnn_bf16_supported(), can_pack(torch.bfloat16, torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr


@pytest.mark.parametrize("kernel", ["int4", "int4-native"])
def test_int4_kernel_is_used_and_stays_close(tmp_path, monkeypatch, kernel):
    """int4 needs inputs in groups of 128: a model with 128 hidden units (the tiny one falls back to
    int8). The prompt runs whole (torch's GEMM for ours) and a token at a time (our kernel's rows)."""
    from biogpt_cli.linear import Int4Linear, Int8Linear, NativeInt4Linear, NativeInt8Linear
    from tests.conftest import make_reference

    if kernel.endswith("native") and native.library() is None:
        pytest.skip(f"our kernels: {native.unavailable()}")
    monkeypatch.setenv("BIOGPT_KERNEL", kernel)
    ref = make_reference(tmp_path, seed=2, hidden_size=128, intermediate_size=256)
    ours = BioGptForCausalLM.from_pretrained(tmp_path, quantize="int4")
    int4 = NativeInt4Linear if kernel.endswith("native") else Int4Linear
    assert all(isinstance(m, int4) for m in ours.biogpt.layers.modules() if hasattr(m, "in_features"))
    assert isinstance(ours.output_projection, Int8Linear | NativeInt8Linear)  # the logits stay int8
    ids = torch.tensor([[2, *range(10, 40)]])
    with torch.no_grad():
        expected = ref(ids).logits
        whole = ours(ids).logits
        cache = ours.new_cache(1, ids.shape[1])
        steps = torch.cat([ours(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits
                           for i in range(ids.shape[1])], 1)
    for got in (whole, steps):
        assert (got - expected).abs().max() < 0.25 * expected.std()
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8


def test_kernel_choice_is_measured_once_and_survives_a_bad_cache(tmp_path, monkeypatch):
    from biogpt_cli import linear

    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path))
    monkeypatch.delenv("BIOGPT_KERNEL", raising=False)
    layers = [torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)]
    cache = tmp_path / "kernels.json"
    cache.write_text("{not json")  # corrupt: measured again and rewritten
    first = linear.choose_kernel(layers)
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["kernel"] == first and set(entry["ms"]) == set(linear.candidates(torch.float32, torch.device("cpu")))

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again although cached")

    monkeypatch.setattr(linear, "_time", no_timing)
    assert linear.choose_kernel(layers) == first  # a second start pays nothing
    stale = {k.replace("torch ", "torch 0.0."): v for k, v in json.loads(cache.read_text()).items()}
    cache.write_text(json.dumps(stale))  # another torch version's entry does not apply
    with pytest.raises(AssertionError, match="timed again"):
        linear.choose_kernel(layers)
    monkeypatch.setenv("BIOGPT_KERNEL", "plain")
    assert linear.choose_kernel(layers) == "plain"
    monkeypatch.undo()  # timing again: one row adds the one-row layout, under its own key
    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path))
    monkeypatch.delenv("BIOGPT_KERNEL", raising=False)
    one = linear.choose_kernel(layers, rows=1)
    entries = json.loads(cache.read_text())
    assert any(set(e["ms"]) == set(linear.candidates(torch.float32, torch.device("cpu"), 1)) and e["kernel"] == one
               for e in entries.values())


def test_half_precision_times_the_float32_fallback(tmp_path, monkeypatch):
    """float16 weights: the half kernels and float32 (upcast once) are all timed, and float32's own
    choice on the same shapes decides which float32 variant takes part."""
    from biogpt_cli import linear

    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path))
    monkeypatch.delenv("BIOGPT_KERNEL", raising=False)
    layers = [torch.nn.Linear(64, 128).half(), torch.nn.Linear(128, 64).half()]
    kernel = linear.choose_kernel(layers)
    entries = json.loads((tmp_path / "kernels.json").read_text())
    half = next(v for k, v in entries.items() if "torch.float16 |" in k)
    wide = next(v for k, v in entries.items() if "torch.float32 |" in k)
    packed = wide["kernel"].startswith("packed")
    assert half["kernel"] == kernel and {"plain", "float32" + ("-packed" if packed else "")} <= set(half["ms"])
    x = torch.randn(3, 64).half()
    expected = torch.nn.functional.linear(x.float(), layers[0].weight.float(), layers[0].bias.float())
    for name in linear.candidates(torch.float16, torch.device("cpu")):
        for rows in (x[:1], x):  # one row (decoding) and several (prefill, beams)
            got = linear.as_kernel(layers[0], name)(rows)
            assert got.dtype == torch.float16 and torch.allclose(got.float(), expected[: len(rows)], atol=2e-2)


def test_half_precision_falls_back_to_the_float32_kernel_for_its_own_rows(tmp_path, monkeypatch):
    """Timings as on an Intel Xeon (torch 2.11, 2 threads): plain float32 wins one row, packing wins
    five, and the half kernels lose to float32 at one row. A model that decodes one row must then
    time (and take) float32's one-row winner, not its five-row one."""
    from biogpt_cli import linear

    if not linear.can_pack(torch.float32, torch.device("cpu")):
        pytest.skip("this torch has no oneDNN packing: float32 has one kernel")
    monkeypatch.setenv("BIOGPT_CACHE", str(tmp_path))
    monkeypatch.delenv("BIOGPT_KERNEL", raising=False)

    def fake_time(layers, rows, dtype):
        layer = layers[0]
        inner = getattr(layer, "inner", None)
        kind = {torch.nn.Linear: "plain", linear.PackedLinear: "packed", linear.HalfLinear: "half"}.get(type(layer))
        kind = kind or ("float32-packed" if isinstance(inner, linear.PackedLinear) else "float32")
        ms = {"plain": (12, 24), "packed": (19, 21), "half": (16, 36), "float32": (12.5, 25),
              "float32-packed": (19, 22)}
        return ms[kind][rows != 1]

    monkeypatch.setattr(linear, "_time", fake_time)
    layers = [torch.nn.Linear(64, 128).half(), torch.nn.Linear(128, 64).half()]
    monkeypatch.setattr(linear, "_half_packing", lambda dtype: False)
    assert linear.choose_kernel(layers, rows=1) == "float32"
    assert linear.choose_kernel(layers) == "float32-packed"  # five rows: float32's five-row winner


@pytest.mark.parametrize("kernel,dtype", [("float32", "float16"), ("float32-packed", "bfloat16"),
                                          ("plain", "bfloat16"), ("plain-direct", "float16")])
def test_half_precision_kernels_stay_close(tiny_ref, monkeypatch, kernel, dtype):
    monkeypatch.setenv("BIOGPT_KERNEL", kernel)
    ref, folder = tiny_ref
    ours = BioGptForCausalLM.from_pretrained(folder, dtype=dtype)
    assert any(type(m).__name__ == ("Float32Linear" if "float32" in kernel else "HalfLinear") for m in ours.modules())
    rows = {m.direct_rows for m in ours.modules() if hasattr(m, "direct_rows")}
    assert rows == ({8} if kernel == "plain-direct" else {1} if kernel == "plain" else set())
    ids = torch.tensor([[2, *range(10, 30)]])
    with torch.no_grad():
        assert (ours(ids).logits.float() - ref(ids).logits).abs().max() < 1e-2


@pytest.mark.parametrize("kernel", ["packed", "packed-1", "packed-16", "plain"])
def test_each_kernel_choice_gives_the_reference_logits(tiny_ref, monkeypatch, kernel):
    """Prefill and one-row cached steps, in each oneDNN layout; packed-1 (for one row) is a
    candidate only for a model loaded to decode one row, packed-16 only for one that decodes more."""
    monkeypatch.setenv("BIOGPT_KERNEL", kernel)
    ref, folder = tiny_ref
    ours = BioGptForCausalLM.from_pretrained(folder, rows=1 if kernel == "packed-1" else None)
    layouts = {m.rows for m in ours.modules() if type(m).__name__ == "PackedLinear"}
    assert layouts == {"packed": {None}, "packed-1": {1}, "packed-16": {16}, "plain": set()}[kernel]
    ids = torch.tensor([[2, *range(10, 30)]])
    with torch.no_grad():
        expected = ref(ids).logits
        assert torch.allclose(ours(ids).logits, expected, atol=ATOL)
        out = ours(ids[:, :10], use_cache=True)
        for t in range(10, ids.shape[1]):
            out = ours(ids[:, t:t + 1], past_key_values=out.past_key_values)
            assert torch.allclose(out.logits[0, -1], expected[0, t], atol=ATOL)
    from biogpt_cli import linear

    assert ("packed-1" in linear.candidates(torch.float32, torch.device("cpu"))) is False
    assert ("packed-16" in linear.candidates(torch.float32, torch.device("cpu"), rows=1)) is False
