"""The decoder's layers in one call of our kernels (`decode_layers` in gemv.c), for decoding.

Layer by layer, a decoding step of a few rows is some fifteen torch ops and four kernel calls a
layer, each a Python call and a start of the threads, for microseconds of work each: with int8 and
int4 weights that costs about as much as reading the weights. Here the threads start once a step
and meet between a layer's parts. It runs what the layer-by-layer path runs on our kernels (the
same GEMVs, attention, GELU and layer norm), so a row's numbers do not depend on which path ran.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn

from ..cache import KVCache
from . import MAX_ROWS, library
from .layers import NativeInt4Linear, NativeInt8Linear, NativeLinear
from .ops import query_mask

_p = ctypes.c_void_p
KINDS = (NativeLinear, NativeInt8Linear, NativeInt4Linear)


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("N", ctypes.c_int), ("K", ctypes.c_int), ("w", _p), ("a", _p), ("c", _p),
                ("bias", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1w", _p), ("ln1b", _p), ("ln2w", _p), ("ln2b", _p), ("qkv", _Linear), ("out", _Linear),
                ("fc1", _Linear), ("fc2", _Linear)]


def _linear(m: nn.Module) -> _Linear:
    bias = m.bias.data_ptr() if m.bias is not None else None
    if isinstance(m, NativeLinear):
        return _Linear(0, m.out_features, m.in_features, m.weight.data_ptr(), None, None, bias)
    if isinstance(m, NativeInt8Linear):
        return _Linear(1, m.out_features, m.in_features, m.packed.data_ptr(), m.sums.data_ptr(),
                       m.scales.data_ptr(), bias)
    return _Linear(2, m.out_features, m.in_features, m.packed.data_ptr(), m.scales.data_ptr(), m.mins.data_ptr(), bias)


def run_linears(layers: list[nn.Module], rows: int) -> Callable[[], None] | None:
    """A pass of `rows` rows through `layers` as the decoder in one call runs them (how
    `choose_kernel` times ours: in one parallel region, no Python between layers); None unless
    every layer is ours."""
    if library() is None or not layers or not all(isinstance(m, KINDS) for m in layers):
        return None
    table = (_Linear * len(layers))(*map(_linear, layers))
    x = torch.randn(rows, max(m.in_features for m in layers))
    y = torch.empty(rows, max(m.out_features for m in layers))

    def run() -> None:  # `layers` held: the table points into their tensors
        library().run_linears(table, len(layers), x.data_ptr(), y.data_ptr(), rows, torch.get_num_threads())
    return run


def _norm(n: nn.Module) -> tuple[int, int] | None:
    ok = (isinstance(n, nn.LayerNorm) and n.elementwise_affine and n.bias is not None
          and n.weight.dtype == torch.float32 and n.weight.is_contiguous() and n.bias.is_contiguous())
    return (n.weight.data_ptr(), n.bias.data_ptr()) if ok else None


class Stack:
    """`decoder.layers` as one call; `build` says whether they can be."""

    def __init__(self, layers: nn.ModuleList, heads: int, eps: float) -> None:
        self.layers = layers  # holds every tensor the pointers below point into
        self.heads, self.eps = heads, eps
        self.table = (_Layer * len(layers))(*(
            _Layer(*_norm(y.self_attn_layer_norm), *_norm(y.final_layer_norm), _linear(y.self_attn.qkv_proj),
                   _linear(y.self_attn.out_proj), _linear(y.fc1), _linear(y.fc2)) for y in layers))

    @classmethod
    def build(cls, layers: nn.ModuleList, heads: int, eps: float) -> Stack | None:
        """A Stack where every layer runs on our kernels with GELU in fc1 (`fuse_activation`), else None."""
        def fits(layer: nn.Module) -> bool:
            a = layer.self_attn
            linears = (a.qkv_proj, a.out_proj, layer.fc1, layer.fc2)
            return (all(isinstance(m, KINDS) for m in linears)
                    and [m.gelu for m in linears] == [False, False, True, False]  # GELU in fc1's kernel
                    and _norm(layer.self_attn_layer_norm) is not None and _norm(layer.final_layer_norm) is not None)
        return cls(layers, heads, eps) if library() is not None and len(layers) and all(map(fits, layers)) else None

    def takes(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> bool:
        """Whether this pass is one for us: a few float32 rows without gradients, a plain KV cache."""
        k = cache.k if isinstance(cache, KVCache) else None
        return (k is not None and x.shape[0] == cache.rows and x.shape[0] * x.shape[1] <= MAX_ROWS
                and x.dtype == k.dtype == torch.float32 and x.device.type == "cpu" and not x.requires_grad
                and k.stride(-1) == 1 and k.stride() == cache.v.stride()
                and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1)))

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Every layer over x [batch, new, hidden]; the new keys and values written at `cache.length`."""
        b, t, h = x.shape
        x, past = x.clone(memory_format=torch.contiguous_format), cache.length
        mask = query_mask(mask, b, t, past + t)
        k = cache.k
        library().decode_layers(self.table, len(self.layers), x.data_ptr(), b, t, k.data_ptr(), cache.v.data_ptr(),
                                *k.stride()[:4], past, None if mask is None else mask.data_ptr(), self.heads,
                                h // self.heads, self.eps, torch.get_num_threads())
        return x
