"""Decoding's small ops on our kernels (gemv.c): attention over the cache, GELU and layer norm.

A decoding step attends one query (or a draft's few) per head over the cache and applies GELU to
one row of 4096: microseconds of work, which torch's ops spend mostly setting up and splitting
across threads. Anything else (a prompt's attention, training, other dtypes or devices) goes to
torch's own op, whose arguments these take. The layer norm is ours so that a layer's numbers are
those of the decoder in one call (stack.py), whichever path a pass takes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import MAX_ROWS, library


def query_mask(attn_mask: torch.Tensor | None, b: int, t: int, keys: int) -> torch.Tensor | None:
    """An SDPA boolean mask [b or 1, 1, t or 1, keys] as the bytes our attention reads: [b, t, keys]."""
    return None if attn_mask is None else attn_mask.expand(b, 1, t, keys).reshape(b, t, keys).contiguous()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for q [b, heads, t, head_dim] and k, v [b, heads, T, head_dim]."""
    b, h, t, d = q.shape
    keys = k.shape[2]
    lib = library()
    if (lib is None or t > MAX_ROWS or dropout_p or q.requires_grad or q.device.type != "cpu"
            or q.dtype != torch.float32 or k.dtype != q.dtype or v.dtype != q.dtype
            or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride() != k.stride()
            or (is_causal and keys != t) or (attn_mask is None and t > 1 and not is_causal)
            or (attn_mask is not None and (attn_mask.dtype != torch.bool or attn_mask.shape[1] != 1))):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
    mask = query_mask(attn_mask, b, t, keys)
    out = torch.empty(b, t, h, d)
    lib.attend(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr(), v.data_ptr(), k.stride(0),
               k.stride(1), k.stride(2), None if mask is None else mask.data_ptr(), out.data_ptr(), b, h, t, keys, d,
               1 / math.sqrt(d), torch.get_num_threads())
    return out.transpose(1, 2)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu` (its erf form, to within 1.5e-7 of erf) for float32 on the CPU."""
    lib = library()
    if lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.requires_grad:
        return F.gelu(x)
    x = x.contiguous()
    y = torch.empty_like(x)
    lib.gelu(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
    return y


def layer_norm(x: torch.Tensor, normalized_shape: tuple[int, ...], weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """`F.layer_norm` over the last dimension, with weight and bias, for float32 on the CPU."""
    lib = library()
    if (lib is None or weight is None or bias is None or tuple(normalized_shape) != x.shape[-1:]
            or x.dtype != torch.float32
            or x.device.type != "cpu" or x.requires_grad or weight.requires_grad or weight.dtype != x.dtype
            or bias.dtype != x.dtype):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    y = torch.empty_like(x)
    d = x.shape[-1]
    lib.layer_norm(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), x.numel() // d, d, eps,
                   torch.get_num_threads())
    return y
