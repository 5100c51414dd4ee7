"""Our CPU kernels (native/): numbers against torch's, every ISA path this machine can run, the
build cached, one OpenMP runtime, and torch's kernels where ours cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from biogpt_cli import native
from biogpt_cli.native import layers, ops, stack
from biogpt_cli.native.layers import NativeInt4Linear, NativeInt8Linear, NativeLinear

pytestmark = pytest.mark.skipif(native.library() is None and not os.environ.get("BIOGPT_CI"),
                                reason=f"our kernels: {native.unavailable()}")
SHAPES = [(64, 128), (256, 256), (8, 512)]  # (out, in): int4 needs inputs in groups of 128
ROWS = [1, 3, 5, native.MAX_ROWS]  # 16 = 6 + 6 + 4: with 3 and 5, the row counts a pass takes here (2: AVX2)


def _isa_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def _arches() -> list[str]:
    """The ISA paths of gemv.c this CPU can run: its own, AVX2 and plain C (x86-64)."""
    arches = ["native"]
    if native.compiler() and os.uname().machine == "x86_64":
        arches += ["x86-64", *(["haswell"] if {"avx2", "fma"} <= _isa_flags() else [])]
    return arches


@pytest.fixture(scope="session")
def libraries(tmp_path_factory):
    """Each ISA path's library, built once a session."""
    folder, built = tmp_path_factory.mktemp("native"), {}

    def library(arch: str):
        if arch not in built:
            built[arch] = native.build(native.compiler(), folder / f"gemv-{arch}.so", arch)
        return built[arch]
    return library


@pytest.fixture(params=_arches())
def built(request, libraries, monkeypatch):
    """Layers running the library built for one ISA path."""
    if request.param != "native":
        lib = libraries(request.param)
        monkeypatch.setattr(layers, "library", lambda: lib)
        monkeypatch.setattr(stack, "library", lambda: lib)
        monkeypatch.setattr(ops, "library", lambda: lib)
    return request.param


def activations(x: torch.Tensor) -> torch.Tensor:
    """What the int8 and int4 kernels multiply: each row rounded to int8 steps of max|x| / 127."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
    return (x / scale).round() * scale


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_equals_f_linear(built, shape, rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(shape[1], shape[0], bias=rows != 3)
    x = torch.randn(rows, shape[1])
    assert relative(NativeLinear(linear)(x), F.linear(x, linear.weight, linear.bias)) < 1e-5


@pytest.mark.parametrize("kind", [NativeInt8Linear, NativeInt4Linear])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_equals_their_dequantized_weights(built, kind, shape, rows):
    """Exact but for float rounding against the dequantized weights times the rounded activations;
    within the activations' rounding against the float activations."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(shape[1], shape[0])
    layer = kind.quantize(linear)
    x = torch.randn(rows, shape[1]) * 3
    got = layer(x)
    assert relative(got, F.linear(activations(x).double(), layer.dense().double(), linear.bias.double())) < 1e-5
    assert relative(got, F.linear(x, layer.dense(), linear.bias)) < 0.05
    assert relative(layer.dense(), linear.weight) < (0.01 if kind is NativeInt8Linear else 0.1)


@pytest.mark.parametrize("kind", [NativeInt8Linear, NativeInt4Linear])
def test_a_prompts_rows_give_what_decoding_gives(kind):
    """Beyond the kernel's rows (int8: torch's int8 GEMM; int4: still ours) each row's output is
    what that row alone gives: a prompt and decoding compute the same numbers. Weights stay within
    +-127 (AVX2's sign trick needs it); a zero row gives the bias."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 16)
    layer = kind.quantize(linear)
    many = torch.randn(2, native.MAX_ROWS, 256)
    alone = torch.cat([layer(row[None]) for row in many.reshape(-1, 256)]).view(2, native.MAX_ROWS, 16)
    assert relative(layer(many), alone) < 1e-5
    assert relative(layer(many), F.linear(activations(many).double(), layer.dense().double(),
                                          linear.bias.double())) < 1e-5
    assert torch.allclose(layer(torch.zeros(1, 256)), linear.bias.detach()[None], atol=1e-6)
    if kind is NativeInt8Linear:
        assert layer.unpacked().abs().max() <= 127


def test_one_openmp_runtime_and_any_thread_count():
    """The library uses the OpenMP runtime torch loaded (two runtimes would fight over 2 cores)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc here")
    gomp = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(gomp) <= 1, gomp
    linear, x = torch.nn.Linear(256, 64), torch.randn(2, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = NativeLinear(linear)(x)
    finally:
        torch.set_num_threads(threads)
    assert relative(one, F.linear(x, linear.weight, linear.bias)) < 1e-5


def _describe(env: dict[str, str]) -> str:
    code = "from biogpt_cli import native; print(native.describe())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_the_build_is_cached_and_its_absence_falls_back(tmp_path):
    cache = {"BIOGPT_CACHE": str(tmp_path)}
    assert "compiled for this CPU in" in _describe(cache)
    assert _describe(cache) == "our CPU kernels loaded from the cache"
    assert _describe({**cache, "CC": str(tmp_path / "no-such-cc")}) == "our CPU kernels loaded from the cache"
    assert len(list((tmp_path / "native").glob("gemv-*.so"))) == 1
    off = _describe({**cache, "BIOGPT_NATIVE": "0"})
    assert off == "our CPU kernels are unavailable (BIOGPT_NATIVE=0): torch's kernels run"
    broken = _describe({"BIOGPT_CACHE": str(tmp_path / "other"), "CC": str(tmp_path / "no-such-cc")})
    assert broken.startswith("our CPU kernels are unavailable (could not build gemv.c") and "torch's" in broken


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_a_model_without_our_kernels_decodes_the_same(tmp_path, quantize):
    """`generate -v` names the kernels; with ours unavailable, torch's run, with one line to say so,
    and float32 greedy text is unchanged (int8's activations are rounded differently: it runs)."""
    from tests.conftest import make_reference

    folder = tmp_path / "model"
    folder.mkdir()
    make_reference(folder, seed=1, hidden_size=64, intermediate_size=128)

    def generate(env: dict[str, str]) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "biogpt_cli", "generate", "the cell", "-m", str(folder),
                   "--max-new-tokens", "12", "--quantize", quantize, "-v"]
        return subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "BIOGPT_CACHE": str(tmp_path), **env})

    ours = generate({"BIOGPT_KERNEL": "native" if quantize == "none" else "int8-native"})
    theirs = generate({"BIOGPT_NATIVE": "0"})
    assert ours.returncode == theirs.returncode == 0, ours.stderr + theirs.stderr
    assert "linear layers: " + ("native" if quantize == "none" else "int8-native") in ours.stderr
    assert "our CPU kernels are unavailable (BIOGPT_NATIVE=0): torch's kernels run" in theirs.stderr
    if quantize == "none":
        assert ours.stdout == theirs.stdout


def test_a_model_on_our_kernels_equals_the_plain_model(tmp_path, monkeypatch):
    """GELU left to fc1's kernel; the logits of a prompt (torch's GEMM) and of a token at a time
    (our kernels) equal the plain model's."""
    from biogpt_cli import BioGptForCausalLM
    from tests.conftest import make_reference

    make_reference(tmp_path, seed=6, hidden_size=64, intermediate_size=128, vocab_size=200)
    plain = BioGptForCausalLM.from_pretrained(tmp_path, kernels=False)
    monkeypatch.setenv("BIOGPT_KERNEL", "native")
    ours = BioGptForCausalLM.from_pretrained(tmp_path, rows=1)
    layer = ours.biogpt.layers[0]
    assert ours.kernel == "native" and isinstance(layer.fc1, NativeLinear) and layer.fc1.gelu
    assert isinstance(ours.output_projection, NativeLinear)
    ids = torch.tensor([[2, *range(10, 40)]])
    with torch.no_grad():
        expected = plain(ids).logits
        cache = ours.new_cache(1, ids.shape[1])
        steps = torch.cat([ours(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits
                           for i in range(ids.shape[1])], 1)
        assert torch.allclose(ours(ids).logits, expected, atol=1e-5)
    assert torch.allclose(steps, expected, atol=1e-5)


@pytest.mark.parametrize("case", ["one token", "drafts, causal mask", "padded batch", "no mask, whole prompt"])
def test_attention_equals_sdpa(built, case, monkeypatch):
    """Decoding's attention (a few new tokens over a cache buffer's strided view) equals torch's SDPA."""
    from biogpt_cli.native.ops import attention

    torch.manual_seed(7)
    b, heads, t, keys, d = {"one token": (1, 4, 1, 37, 64), "drafts, causal mask": (1, 4, 5, 40, 64),
                            "padded batch": (3, 2, 2, 20, 32), "no mask, whole prompt": (1, 2, 9, 9, 16)}[case]
    cache = torch.randn(2, b, heads, 64, d)  # [k/v, batch, heads, capacity, head_dim], as KVCache holds them
    k, v = cache[0, :, :, :keys], cache[1, :, :, :keys]
    q = torch.randn(b, t, 3, heads, d).permute(2, 0, 3, 1, 4)[0]  # a fused q/k/v projection's view
    mask, causal = None, case == "no mask, whole prompt"
    if case != "one token" and not causal:
        query, key = torch.arange(keys - t, keys)[:, None], torch.arange(keys)[None, :]
        mask = (key <= query).expand(b, t, keys).clone()
        mask[1:, :, :3] = False  # left padding of the other rows
        mask = (mask | (key == query))[:, None]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def refuse(*args, **kwargs):
        raise AssertionError("torch's SDPA ran: our kernel was skipped")
    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    got = attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got.transpose(1, 2).is_contiguous()  # what the output projection reads, without a copy


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_speculation_on_our_kernels_keeps_every_token(tmp_path, monkeypatch, precision):
    """A verifier on our kernels (a pass of several drafted rows: each row's numbers are its own)
    and a quantized copy on ours drafting: the same events as one token a pass."""
    from dataclasses import replace

    from biogpt_cli import drafts
    from biogpt_cli.drafts import DraftStats
    from biogpt_cli.generation import GenerationOptions
    from tests.conftest import make_reference
    from tests.test_drafts import MORE, decode, same
    from tests.test_generation import PROMPTS
    from tests.test_model import ours_from

    ref = make_reference(tmp_path, seed=8, hidden_size=128, intermediate_size=256, vocab_size=200)
    monkeypatch.setenv("BIOGPT_KERNEL", "native")
    ours = ours_from(ref, rows=1)
    monkeypatch.setenv("BIOGPT_KERNEL", f"{precision}-native")
    copy = ours_from(ref, quantize=precision, rows=1)
    assert ours.kernel == "native" and copy.kernel == f"{precision}-native"
    drafts.attach(ours, precision, copy)
    stats = DraftStats()
    opts = GenerationOptions(max_new_tokens=30, repetition_penalty=1.2)
    for prompt in PROMPTS + MORE:
        for setting in (precision, "ngram"):
            on = decode(ours, [prompt], replace(opts, speculate=setting, draft_tokens=4), stats)
            same(on, decode(ours, [prompt], replace(opts, speculate="off")))
    assert stats.drafted and stats.kept


def test_gelu_equals_torchs(built, monkeypatch):
    from biogpt_cli.native.ops import gelu

    x = torch.linspace(-12, 12, 4099).view(1, 1, -1) * torch.rand(4099)
    expected = F.gelu(x)
    monkeypatch.setattr(F, "gelu", lambda *a: pytest.fail("torch's GELU ran"))
    assert torch.allclose(gelu(x), expected, atol=2e-6)


def test_layer_norm_equals_torchs(built, monkeypatch):
    from biogpt_cli.native.ops import layer_norm

    torch.manual_seed(4)
    x, w, b = torch.randn(3, 5, 1024) * 4 + 1, torch.randn(1024), torch.randn(1024)
    expected = F.layer_norm(x, (1024,), w, b, 1e-5)
    monkeypatch.setattr(F, "layer_norm", lambda *a: pytest.fail("torch's layer norm ran"))
    assert torch.allclose(layer_norm(x, (1024,), w, b, 1e-5), expected, atol=1e-5)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_attention_does_not_depend_on_the_batchs_padding(built, head_dim):
    """A row padded on the left inside a batch gets exactly the numbers it gets alone (a batch's
    records equal each prompt's, whatever Ray or the server puts beside it)."""
    from biogpt_cli.native.ops import attention

    torch.manual_seed(head_dim)
    for t in (1, 5, 9):
        q, k, v = (torch.randn(1, 4, t, head_dim) for _ in range(3))
        alone = attention(q, k, v, is_causal=t > 1)
        for pad in (1, 3, 5):
            qp, kp, vp = (torch.cat([torch.randn(1, 4, pad, head_dim), x], 2) for x in (q, k, v))
            query, key = torch.arange(t + pad)[:, None], torch.arange(t + pad)[None, :]
            mask = ((key <= query) & (key >= pad)) | (key == query)
            assert torch.equal(attention(qp, kp, vp, attn_mask=mask[None, None])[:, :, pad:], alone), (t, pad)


@pytest.mark.parametrize("kernel", ["native", "int8-native", "int4-native"])
def test_the_layers_in_one_call_equal_layer_by_layer(built, kernel, tmp_path, monkeypatch):
    """The decoder in one call (native/stack.py) gives exactly the logits and cache of its layers
    one by one: a left-padded batch's tokens after its prompt, then a draft's four tokens a row;
    a short prompt alone (causal, no mask)."""
    from tests.conftest import make_reference
    from tests.test_model import ours_from, padded_batch

    ref = make_reference(tmp_path, seed=9, hidden_size=128, intermediate_size=256, vocab_size=200)
    monkeypatch.setenv("BIOGPT_KERNEL", kernel)
    model = ours_from(ref, quantize=kernel.removesuffix("-native").replace("native", "none"), rows=1)
    fused = model.biogpt.stack
    assert model.kernel == kernel and fused is not None
    ids, mask = padded_batch([[2, 5, 6, 7, 8, 9], [2, 11, 12], [2, 13, 14, 15, 16]], "left")
    steps = [torch.tensor([[20], [21], [22]]), torch.tensor([[23], [24], [25]]), torch.arange(30, 42).view(3, 4)]
    calls = []

    class Counted:
        def takes(self, *args):
            return fused.takes(*args)

        def __call__(self, *args):
            calls.append(args[0].shape)
            return fused(*args)

    def run(runner):
        model.biogpt.stack, seen = runner, mask
        cache, alone = model.new_cache(3, 20), model.new_cache(1, 6)
        logits = [model(ids, attention_mask=seen, past_key_values=cache, use_cache=True).logits]
        for step in steps:
            seen = torch.cat([seen, torch.ones_like(step)], 1)
            logits.append(model(step, attention_mask=seen, past_key_values=cache, use_cache=True).logits)
        short = model(ids[:1], past_key_values=alone, use_cache=True).logits
        return torch.cat(logits, 1), cache.k[:, :3, :, :cache.length], cache.v[:, :3, :, :cache.length], short

    with torch.inference_mode():
        one, layered = run(Counted()), run(None)
    assert calls == [(3, 1, 128), (3, 1, 128), (3, 4, 128), (1, 6, 128)]  # the batch's 18 rows: layer by layer
    for a, b in zip(one, layered, strict=True):
        assert torch.equal(a, b)


def test_choose_kernel_times_ours_as_decoding_runs_them(monkeypatch):
    """Ours are timed in one call, as the decoder runs them; a list with any other layer, as modules."""
    from torch import nn

    from biogpt_cli import linear
    from biogpt_cli.native.stack import run_linears

    torch.manual_seed(3)
    ours = [NativeInt8Linear.quantize(nn.Linear(256, 128)), NativeInt4Linear.quantize(nn.Linear(128, 256))]
    assert run_linears(ours, 5) is not None and run_linears([*ours, nn.Linear(8, 8)], 5) is None
    called = []
    monkeypatch.setattr(linear, "run_linears", lambda layers, rows: lambda: called.append(rows))
    monkeypatch.setattr(NativeInt8Linear, "forward", lambda *a: pytest.fail("timed layer by layer"))
    assert linear._time(ours, 5, torch.float32) >= 0 and called == [5] * 4
