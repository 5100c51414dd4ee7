"""Faster CPU kernels for the linear layers, swapped in after loading (module names unchanged).

Decoding a token reads every weight once, so its speed is memory bandwidth and kernel quality,
and which kernel is best depends on the CPU:

* float32 and bfloat16: oneDNN's prepacked (blocked) weight layout, or plain `F.linear` (MKL).
  On an AMD Zen 3 (AVX2) the packed layout streams weights about twice as fast as MKL's GEMV and
  3-4x as fast at 2-8 rows (beams, batches), where MKL's small-M GEMM is a trap; on an Intel Xeon
  with AVX-512 MKL is already at the memory bandwidth and the packed layout is slower. So the
  first load on a machine times both on the model's own weights (`choose_packing`) and keeps the
  winner, cached per CPU, torch version and shape; later starts read the cache.
* float16 packs where the CPU has AVX-512-FP16 (timed like the others); elsewhere one row uses
  `F.linear` (fast on AVX2), several rows upcast to float32 for the call (prefill; beams and
  batches are better served by float32).
* int8 is torch's dynamic quantized Linear (fbgemm): per-channel int8 weights, activations
  quantized per call, the output projection included (a quarter of the bytes read per token).
* int4 is group-wise (128 columns) asymmetric int4 weights with bfloat16 activations, torch's CPU
  int4 kernel; the output projection is int8 (the logits decide the next token).

Packing copies a weight, so the mapped original's pages are handed back to the OS at once
(`release`) and peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE = ("none", "int8", "int4")
INT4_GROUP = 128


class PackedLinear(nn.Module):
    """`nn.Linear` on a oneDNN-prepacked weight (float32 or bfloat16)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class HalfLinear(nn.Module):
    """float16 weights: fast single-row GEMV; several rows upcast to float32 for the call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 weights (w = (q - 8) * scale + zero per group of 128 inputs),
    bfloat16 activations: torch's CPU int4 GEMV, an eighth of float32's bytes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float().view(self.out_features, -1, INT4_GROUP)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = (high - low).clamp(min=1e-8) / 15
        q = ((w - low) / scale).round().clamp(0, 15).to(torch.int32).view(self.out_features, self.in_features)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        zero = low + 8 * scale
        self.scales_zeros = torch.stack([scale[..., 0], zero[..., 0]], -1).transpose(0, 1).contiguous().bfloat16()
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_zeros).to(x.dtype)
        y = y if self.bias is None else y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def can_int4(linear: nn.Linear) -> bool:
    return (linear.weight.device.type == "cpu" and linear.in_features % INT4_GROUP == 0
            and linear.out_features % 8 == 0 and hasattr(torch, "_weight_int4pack_mm_for_cpu"))


def _int8(linear: nn.Linear) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linear.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch.ao.quantization announces its successor (torchao) on use
        warnings.simplefilter("ignore")
        return DynamicInt8Linear.from_float(linear)


@functools.cache
def _packing_available() -> bool:
    """oneDNN's prepacked linear ops are private to torch: a build without them falls back to F.linear."""
    try:
        return torch.backends.mkldnn.is_available() and all(
            hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _half_packing(dtype: torch.dtype) -> bool:
    """oneDNN packs bfloat16 and float16 only where the CPU computes them (AVX-512 BF16 / AMX,
    AVX-512 FP16); on AVX2 it cannot."""
    check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 else "_is_mkldnn_fp16_supported"
    try:
        return bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not _packing_available():
        return False
    return dtype == torch.float32 or (dtype in (torch.bfloat16, torch.float16) and _half_packing(dtype))


def is_kernel(module: nn.Module) -> bool:
    """One of the inference-only layers `optimize` swaps in."""
    return isinstance(module, PackedLinear | HalfLinear | Int4Linear) or type(module).__module__.startswith("torch.ao.")


def optimize(model: nn.Module, quantize: str = "none", release: Callable[[torch.Tensor], None] = lambda t: None,
             recurse: bool = True, pack: bool = True) -> nn.Module:
    """Swap every `nn.Linear` of an inference model (only its direct children without `recurse`)
    for the fastest kernel its dtype and device allow (`pack`: whether packing won on this CPU).

    `release(weight)` is called for each original weight once it is no longer needed.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}")
    for parent in list(model.modules()) if recurse else [model]:
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            w = child.weight
            if quantize == "int4" and name != "output_projection" and can_int4(child):
                fast = Int4Linear(child)
            elif quantize != "none" and w.device.type == "cpu":
                fast = _int8(child.float())
            elif pack and can_pack(w.dtype, w.device):
                fast = PackedLinear(child)
            elif w.dtype == torch.float16 and w.device.type == "cpu" and not can_pack(w.dtype, w.device):
                fast = HalfLinear(child)
            else:
                continue
            setattr(parent, name, fast)
            if not isinstance(fast, HalfLinear):
                release(w)
    return model


# -- choosing by measurement -------------------------------------------------------------------
def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and ISA flags (Linux; elsewhere what `platform` knows)."""
    model, flags = platform.processor() or "unknown CPU", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    return model, flags


def cpu_id() -> str:
    """The CPU model and its ISA flags: a kernel timing holds for this, and nothing else."""
    model, flags = cpu_info()
    return f"{model} [{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:8]}]"


def _cache_file() -> Path:
    base = os.environ.get("BIOGPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "biogpt-cli"
    return Path(base).expanduser() / "kernels.json"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or corrupt: measured again and rewritten
        return {}
    return data if isinstance(data, dict) else {}


def _time(layers: list[nn.Module], rows: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best seconds of one pass of `rows` rows through every layer (all distinct weights, as
    decoding reads them: one small matrix timed alone would sit in the cache and flatter)."""
    best = float("inf")
    with torch.inference_mode():
        xs = {layer.in_features: torch.randn(rows, layer.in_features, dtype=dtype) for layer in layers}
        for _ in range(repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            for layer in layers:
                layer(xs[layer.in_features])
            best = min(best, time.perf_counter() - start)
    return best


def choose_packing(linears: list[nn.Linear]) -> bool:
    """Whether oneDNN-packed weights beat plain `F.linear` for these layers on this CPU, timed
    once per CPU, torch version, dtype and shape, then cached. One decoding step (1 row) decides:
    plain `F.linear` is what the reference runs, so where it wins no figure falls below the
    reference's, and where packing wins one row it wins more at 5 rows (beams, batches; both are
    recorded). `BIOGPT_KERNEL=packed|plain` overrides (benchmarks, tests)."""
    forced = os.environ.get("BIOGPT_KERNEL", "").strip().lower()
    if forced in ("packed", "plain"):
        return forced == "packed"
    dtype = linears[0].weight.dtype
    shapes = sorted({tuple(m.weight.shape) for m in linears})
    key = f"{cpu_id()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {dtype} | {shapes}"
    path = _cache_file()
    cache = _read_cache(path)
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("kernel") in ("packed", "plain"):
        return entry["kernel"] == "packed"
    packed = [PackedLinear(m) for m in linears]
    seconds = {name: [_time(layers, rows, dtype) for rows in (1, 5)]
               for name, layers in (("plain", linears), ("packed", packed))}
    del packed
    kernel = "packed" if seconds["packed"][0] <= seconds["plain"][0] else "plain"
    cache[key] = {"kernel": kernel, "ms": {k: [round(s * 1e3, 2) for s in v] for k, v in seconds.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # an unwritable cache: measured again next time
        pass
    return kernel == "packed"
