"""Faster CPU kernels for the linear layers, swapped in after loading (module names unchanged).

Decoding a token reads every weight once, so its speed is memory bandwidth and kernel quality:

* float32 and bfloat16 use oneDNN's prepacked (blocked) weight layout. On AVX2 it streams weights
  about twice as fast as MKL's GEMV, and 3-4x as fast at 2-8 rows (beams, batches), where MKL's
  small-M GEMM is a trap. Packing microsoft/biogpt takes about 0.5 s per start (two threads).
* float16 has no oneDNN path without AVX-512-FP16: one row uses `F.linear` (fast), several rows
  upcast to float32 for the call (prefill; beams and batches are better served by float32).
* int8 is torch's dynamic quantized Linear (fbgemm): per-channel int8 weights, activations
  quantized per call. The tied output projection stays in float32: it decides the next token.

Packing copies a weight, so the mapped original's pages are handed back to the OS at once
(`release`) and peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE = ("none", "int8")


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
def _bf16_packing() -> bool:
    """oneDNN packs bfloat16 only where the CPU computes it (AVX-512 BF16 / AMX); on AVX2 it cannot."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    if device.type != "cpu" or not _packing_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _bf16_packing())


def is_kernel(module: nn.Module) -> bool:
    """One of the inference-only layers `optimize` swaps in."""
    return isinstance(module, PackedLinear | HalfLinear) or type(module).__module__.startswith("torch.ao.")


def optimize(model: nn.Module, quantize: str = "none", release: Callable[[torch.Tensor], None] = lambda t: None,
             recurse: bool = True) -> nn.Module:
    """Swap every `nn.Linear` of an inference model (only its direct children without `recurse`)
    for the fastest kernel its dtype and device allow.

    `release(weight)` is called for each original weight once it is no longer needed.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}")
    for parent in list(model.modules()) if recurse else [model]:
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            w = child.weight
            if quantize == "int8" and name != "output_projection" and w.device.type == "cpu":
                fast = _int8(child.float())
            elif can_pack(w.dtype, w.device):
                fast = PackedLinear(child)
            elif w.dtype == torch.float16 and w.device.type == "cpu":
                fast = HalfLinear(child)
            else:
                continue
            setattr(parent, name, fast)
            if not isinstance(fast, HalfLinear):
                release(w)
    return model
