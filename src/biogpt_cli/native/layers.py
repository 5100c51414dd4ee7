"""Linear layers on our kernels (`gemv.c`), and torch's GEMM where a prompt's many rows make it win.

Decoding multiplies one row (or the few of beams, drafts and small batches) by every weight; a
prompt multiplies hundreds, where a blocked GEMM wins: float32 goes to oneDNN's GEMM on the layer's
own weight (which takes it unpacked, as fast as packed; MKL's `F.linear` where torch lacks it),
int8 to torch's int8 GEMM on the same integers (activations rounded per row, as ours are), and
int4, which torch has no GEMM for on these weights, stays on our kernel.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import MAX_ROWS, library
from .ops import gelu

R, C8, G4 = 4, 64, 128  # as gemv.c: rows a block, int8 columns a chunk, int4 columns a group


def fits(linear: nn.Linear, group: int = C8) -> bool:
    """Whether our kernels take this layer: on the CPU, rows in blocks of 4, columns in whole chunks."""
    return (library() is not None and linear.weight.device.type == "cpu"
            and linear.out_features % R == 0 and linear.in_features % group == 0)


@functools.cache
def _onednn() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _as(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(x.dtype)


class _Native(nn.Module):
    """The shared call: rows flattened, float32, contiguous; `kernel(x, y, rows)` fills `y`. With
    `gelu` set (`BioGptDecoderLayer.fuse_activation`), the layer applies GELU as it writes: one
    pass over the output instead of a separate op."""

    in_features: int
    out_features: int
    gelu = False
    max_rows = MAX_ROWS  # more rows a call: `many`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.requires_grad:
            return self.activate(F.linear(x, self.dense().to(x.dtype), _as(self.bias, x)))
        rows, x = x.numel() // self.in_features, x.contiguous()
        if rows > self.max_rows:
            return self.many(x.view(rows, self.in_features)).view(*x.shape[:-1], self.out_features)
        y = torch.empty((*x.shape[:-1], self.out_features))
        self.kernel(x, y, rows)
        return y

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        return gelu(y) if self.gelu else y

    def many(self, x: torch.Tensor) -> torch.Tensor:
        """A prompt's rows [rows, in]: torch's GEMM."""
        return self.activate(F.linear(x, self.dense(), self.bias))

    def dense(self) -> torch.Tensor:
        raise NotImplementedError

    def kernel(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        raise NotImplementedError


class NativeLinear(_Native):
    """float32: the weight row-major, shared with oneDNN's GEMM for prompts; copied out of the
    checkpoint's mapping, which streams far slower than memory of our own (docs/development.md)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight.detach().clone(memory_format=torch.contiguous_format)
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def dense(self) -> torch.Tensor:
        return self.weight

    def many(self, x: torch.Tensor) -> torch.Tensor:
        if not _onednn():
            return super().many(x)
        return self.activate(torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], ""))

    def kernel(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        library().f32_gemv(self.weight.data_ptr(), _ptr(self.bias), x.data_ptr(), y.data_ptr(), rows,
                           self.out_features, self.in_features, self.gelu, torch.get_num_threads())


class NativeInt8Linear(_Native):
    """Symmetric int8 weights, one scale a row (|q| <= 127), in blocks of 4 rows by 64 columns."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed, self.scales, self.bias = packed, scales.float().contiguous(), bias
        self.out_features, self.in_features = packed.shape[0] * R, packed.shape[1] * C8
        self.sums = self.unpacked().sum(1, dtype=torch.int32)  # dpbusd's offset, taken back

    @classmethod
    def quantize(cls, linear: nn.Linear) -> NativeInt8Linear:
        w = linear.weight.detach().float()
        scales = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).eps)
        q = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        n, k = q.shape
        packed = q.view(n // R, R, k // C8, C8).transpose(1, 2).contiguous()
        return cls(packed, scales, None if linear.bias is None else linear.bias.detach().float().contiguous())

    def unpacked(self) -> torch.Tensor:
        """The int8 weights row-major [out, in]."""
        return self.packed.transpose(1, 2).reshape(self.out_features, self.in_features)

    def dense(self) -> torch.Tensor:
        return self.unpacked().float() * self.scales[:, None]

    def many(self, x: torch.Tensor) -> torch.Tensor:
        """torch's int8 GEMM on the same integers, the activations rounded and the products scaled
        (bias, GELU) by our kernels, as a row alone is."""
        if not hasattr(torch, "_int_mm") or self.out_features % 8:
            return super().many(x)
        rows, threads = x.shape[0], torch.get_num_threads()
        xq, sx = torch.empty(rows, self.in_features, dtype=torch.int8), torch.empty(rows)
        library().quantize_rows(x.data_ptr(), rows, self.in_features, xq.data_ptr(), sx.data_ptr(), threads)
        acc = torch._int_mm(xq, self.unpacked().t())
        y = torch.empty(rows, self.out_features)
        library().q8_finish(acc.data_ptr(), sx.data_ptr(), self.scales.data_ptr(), _ptr(self.bias), y.data_ptr(),
                            rows, self.out_features, self.gelu, threads)
        return y

    def kernel(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        library().q8_gemv(self.packed.data_ptr(), self.sums.data_ptr(), self.scales.data_ptr(), _ptr(self.bias),
                          x.data_ptr(), y.data_ptr(), rows, self.out_features, self.in_features,
                          self.gelu, torch.get_num_threads())

    def tensors(self) -> dict[str, torch.Tensor]:
        """What rebuilds this layer (`from_tensors`): saved in the prepared-weights cache."""
        return {"packed": self.packed, "scales": self.scales, **({} if self.bias is None else {"bias": self.bias})}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> NativeInt8Linear:
        return cls(t["packed"], t["scales"], t.get("bias"))


class NativeInt4Linear(_Native):
    """Asymmetric int4 weights, w = q * scale + min per group of 128 columns (q in 0..15), in blocks
    of 4 rows; a group's byte j holds column j (low nibble) and column j + 64. Every call runs our
    kernel, a prompt's rows included (torch's int4 GEMM is no faster on them)."""

    max_rows = 1 << 62

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.packed, self.scales, self.mins, self.bias = packed, scales, mins, bias
        self.out_features, self.in_features = packed.shape[0] * R, packed.shape[1] * G4

    @classmethod
    def quantize(cls, linear: nn.Linear) -> NativeInt4Linear:
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.view(n, k // G4, G4)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = (high - low).clamp(min=1e-8) / 15
        q = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
        halves = q.view(n // R, R, k // G4, 2, G4 // 2)
        packed = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).transpose(1, 2).contiguous()

        def blocked(t: torch.Tensor) -> torch.Tensor:  # [n, groups] -> [n / R, groups, R]
            return t.view(n // R, R, k // G4).transpose(1, 2).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        return cls(packed, blocked(scales), blocked(low), bias)

    def dense(self) -> torch.Tensor:
        """The dequantized weights [out, in] (what the kernel multiplies, up to the activations' rounding)."""
        q = torch.stack([self.packed & 15, self.packed >> 4], 3).float()  # [n/R, groups, R, 2, 64]
        w = q * self.scales[..., None, None] + self.mins[..., None, None]
        return w.permute(0, 2, 1, 3, 4).reshape(self.out_features, self.in_features)

    def kernel(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        library().q4_gemv(self.packed.data_ptr(), self.scales.data_ptr(), self.mins.data_ptr(), _ptr(self.bias),
                          x.data_ptr(), y.data_ptr(), rows, self.out_features, self.in_features,
                          self.gelu, torch.get_num_threads())

    def tensors(self) -> dict[str, torch.Tensor]:
        """What rebuilds this layer (`from_tensors`): saved in the prepared-weights cache."""
        extra = {} if self.bias is None else {"bias": self.bias}
        return {"packed": self.packed, "scales": self.scales, "mins": self.mins, **extra}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> NativeInt4Linear:
        return cls(t["packed"], t["scales"], t["mins"], t.get("bias"))
