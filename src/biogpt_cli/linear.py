"""Faster CPU kernels for the linear layers, swapped in after loading (module names unchanged).

Decoding a token reads every weight once, so its speed is memory bandwidth and kernel quality,
and which kernel is best depends on the CPU:

* float32: oneDNN's prepacked (blocked) weight layout, or plain `F.linear` (MKL). Which streams
  weights faster depends on the CPU and on the rows (MKL's small-M GEMM can be far slower than its
  GEMV), so both are timed. oneDNN also lays weights out for a given row count: for one row
  (`packed-1`, a candidate when the caller decodes one row: a single prompt, greedy or sampled)
  and for 16 (`packed-16`, for beams and batches). docs/performance.md has the measurements.
* float16 and bfloat16: packed where oneDNN computes them (AVX-512 FP16 / BF16, AMX); plain
  (`HalfLinear`: one row, or up to 8 where that is faster, through `F.linear`, more rows upcast
  for the call); or `float32`
  (`Float32Linear`: weights upcast once, for CPUs with no fast half kernel at all, where the
  half precision would otherwise run slower than float32).
* int8 is fbgemm's dynamic quantized linear: per-channel int8 weights, activations quantized per
  call, the output projection included (a quarter of the bytes read per token).
* int4 is group-wise (128 columns) asymmetric int4 weights with bfloat16 activations, torch's CPU
  int4 kernel; the output projection is int8 (the logits decide the next token).
* `native`, `int8-native`, `int4-native`: our own kernels (`native/`), compiled for this CPU at
  first use, where a compiler is at hand: the same weights streamed in blocks, activations
  quantized to int8 per call for int8 and int4.

For every precision the first load on a machine times the candidates on the model's own weights
(`choose_kernel`) and keeps the winner, cached per CPU, torch version, dtype and shape; later
starts read the cache.

Packing copies a weight, so the mapped original's pages are handed back to the OS at once
(`release`) and peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import contextlib
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

from .files import write_text
from .native import library
from .native import version as native_version
from .native.layers import G4, NativeInt4Linear, NativeInt8Linear, NativeLinear, fits
from .native.stack import run_linears

QUANTIZE = ("none", "int8", "int4")
INT4_GROUP = 128
HALF = (torch.float16, torch.bfloat16)
# torch 2.13 announces the end of its quantized tensors (for torchao) at every use; fbgemm's int8
# kernel is still what it ships, and the tests fail when it goes. Only that message is hidden (a
# filter, not catch_warnings, which is not thread-safe and the layers are built in threads).
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                        category=UserWarning)


class PackedLinear(nn.Module):
    """`nn.Linear` on a oneDNN-prepacked weight (float32 or bfloat16); `rows`: the layout for that
    many rows (None: any)."""

    def __init__(self, linear: nn.Linear, rows: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed, self.rows = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows), rows
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class HalfLinear(nn.Module):
    """float16/bfloat16 weights through `F.linear`, up to `direct_rows` rows; more rows are upcast
    to float32 for the call (half-precision GEMM over many rows is slow on CPUs without half
    packing, while over a few rows it beats upcasting)."""

    def __init__(self, linear: nn.Linear, direct_rows: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.direct_rows = direct_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.direct_rows * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


def widened(linear: nn.Linear) -> nn.Linear:
    """A float32 copy of a (half-precision) layer."""
    wide = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    wide.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
    if linear.bias is not None:
        wide.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    return wide


class Float32Linear(nn.Module):
    """float16/bfloat16 weights upcast once: float32's speed (and memory) where no half kernel beats
    it, the model's dtype outside this layer. The weights' values are unchanged (exact in float32)."""

    def __init__(self, linear: nn.Linear, packed: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        wide = widened(linear)
        self.inner = PackedLinear(wide) if packed else wide

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


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

    def tensors(self) -> dict[str, torch.Tensor]:
        """What rebuilds this layer (`from_tensors`): saved in the prepared-weights cache."""
        extra = {} if self.bias is None else {"bias": self.bias}
        return {"packed": self.packed, "scales_zeros": self.scales_zeros, **extra}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Int4Linear:
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.packed, self.scales_zeros, self.bias = t["packed"], t["scales_zeros"], t.get("bias")
        self.out_features, self.in_features = self.scales_zeros.shape[1], self.scales_zeros.shape[0] * INT4_GROUP
        return self


class Int8Linear(nn.Module):
    """int8 weights with one scale per output row (symmetric), activations quantized per call:
    fbgemm's dynamic linear, the numbers of `torch.ao`'s `quantize_dynamic` (per-channel qconfig)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(weight, scales.double(), zeros, 0)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())

    @classmethod
    def quantize(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        scales = torch.maximum(-w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)) / 127.5
        scales = scales.clamp(min=torch.finfo(torch.float32).eps).double()
        zeros = torch.zeros(w.shape[0], dtype=torch.long)
        weight = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8).int_repr()
        return cls(weight, scales, None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)  # reduce_range, as torch.ao runs it

    def tensors(self) -> dict[str, torch.Tensor]:
        """What rebuilds this layer (`from_tensors`): saved in the prepared-weights cache."""
        qweight, bias = torch.ops.quantized.linear_unpack(self.packed)
        extra = {} if bias is None else {"bias": bias}
        return {"weight": qweight.int_repr(), "scales": qweight.q_per_channel_scales(), **extra}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Int8Linear:
        return cls(t["weight"], t["scales"], t.get("bias"))


def can_int4(linear: nn.Linear) -> bool:
    return (linear.weight.device.type == "cpu" and linear.in_features % INT4_GROUP == 0
            and linear.out_features % 8 == 0 and hasattr(torch, "_weight_int4pack_mm_for_cpu"))


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
    return dtype == torch.float32 or (dtype in HALF and _half_packing(dtype))


def candidates(dtype: torch.dtype, device: torch.device, rows: int | None = None, quantize: str = "none") -> list[str]:
    """The kernels worth timing for weights of this dtype on this device (`rows=1`: for a caller
    that decodes one row at a time, the one-row packed layout too), or for `quantize`'s weights."""
    if device.type != "cpu":
        return ["plain"]
    native = library() is not None
    if quantize != "none":
        return [quantize, *([f"{quantize}-native"] if native else [])]
    packed = ["packed", "packed-1" if rows == 1 else "packed-16"] if can_pack(dtype, device) else []
    if dtype not in HALF:
        return ["plain", *packed, *(["native"] if native and dtype == torch.float32 else [])]
    wide = ["float32", *(["float32-packed"] if can_pack(torch.float32, device) else [])]
    return ["plain", *([] if rows == 1 else ["plain-direct"]), *packed, *wide]


def is_kernel(module: nn.Module) -> bool:
    """One of the inference-only layers `optimize` swaps in."""
    return isinstance(module, PackedLinear | HalfLinear | Float32Linear | Int4Linear | Int8Linear | NativeLinear
                      | NativeInt8Linear | NativeInt4Linear)


def as_kernel(linear: nn.Linear, kernel: str, head: bool = False) -> nn.Module:
    """`linear` run by `kernel`, one of `candidates` (float32-packed: upcast once, then packed;
    plain-direct: a few rows in the half precision too; packed-N: the layout for N rows). A layer
    that int4 or our kernels cannot take, and an int4 model's output projection (`head`: the logits
    decide the next token), is int8."""
    if kernel.startswith(("int8", "int4")):
        return _quantized(linear, kernel, head)
    if kernel == "native":
        return NativeLinear(linear) if fits(linear) and linear.weight.dtype == torch.float32 else linear
    half = linear.weight.dtype in HALF and linear.weight.device.type == "cpu"
    if kernel.startswith("packed"):
        rows = kernel.partition("-")[2]
        return PackedLinear(linear, int(rows) if rows else None)
    if kernel.startswith("float32") and half:
        return Float32Linear(linear, packed=kernel == "float32-packed")
    return HalfLinear(linear, DIRECT_ROWS if kernel == "plain-direct" else 1) if half else linear


def _quantized(linear: nn.Linear, kernel: str, head: bool) -> nn.Module:
    native = kernel.endswith("-native")
    if kernel.startswith("int4") and not head:
        if native and fits(linear, G4):
            return NativeInt4Linear.quantize(linear)
        if not native and can_int4(linear):
            return Int4Linear(linear)
    return NativeInt8Linear.quantize(linear) if native and fits(linear) else Int8Linear.quantize(linear)


def optimize(model: nn.Module, quantize: str = "none", release: Callable[[torch.Tensor], None] = lambda t: None,
             recurse: bool = True, kernel: str = "plain") -> nn.Module:
    """Swap every `nn.Linear` of an inference model (only its direct children without `recurse`)
    for `kernel` (see `choose_kernel`), or for int8/int4 under `quantize` (`kernel` then one of
    its candidates, else torch's own).

    `release(weight)` is called for each original weight once it is no longer needed.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}")
    if quantize != "none" and not kernel.startswith(quantize):
        kernel = quantize
    for parent in list(model.modules()) if recurse else [model]:
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            cpu = child.weight.device.type == "cpu"
            fast = as_kernel(child, kernel if cpu else "plain", head=name == "output_projection")
            if fast is not child:
                setattr(parent, name, fast)
            if not isinstance(fast, nn.Linear | HalfLinear):
                release(child.weight)
    return model


# -- choosing by measurement -------------------------------------------------------------------
@functools.cache
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


def cache_dir() -> Path:
    """The user cache: kernel choices, converted `.bin` weights, prepared quantized weights."""
    base = os.environ.get("BIOGPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "biogpt-cli"
    return Path(base).expanduser()


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or corrupt: measured again and rewritten
        return {}
    return data if isinstance(data, dict) else {}


def _time(layers: list[nn.Module], rows: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """Best seconds of one pass of `rows` rows through every layer (all distinct weights, as
    decoding reads them: one small matrix timed alone would sit in the cache and flatter). Ours
    run as decoding runs them: in one call (`native.stack`)."""
    best = float("inf")
    with torch.inference_mode():
        xs = {layer.in_features: torch.randn(rows, layer.in_features, dtype=dtype) for layer in layers}
        one_pass = run_linears(layers, rows) or (lambda: [layer(xs[layer.in_features]) for layer in layers])
        for _ in range(repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            one_pass()
            best = min(best, time.perf_counter() - start)
    return best


DIRECT_ROWS = 8  # plain-direct: half-precision GEMM up to this many rows (beams, batches), not prompts
MARGIN = 0.95  # a kernel replaces the one before it in `candidates` only when 5 % faster
SAMPLE_BYTES = 384 << 20  # far beyond any last-level cache, a third of microsoft/biogpt in float32


def choose_kernel(linears: list[nn.Linear], rows: int | None = None, quantize: str = "none") -> str:
    """The fastest of `candidates` for these layers (`quantize`d) on this CPU, timed once per CPU,
    torch version, threads, dtype, shape and candidates, then cached. The rows the caller decodes
    decide: one row for `rows=1` (a single prompt, greedy or sampled), else 5 (beams, batches; a
    prompt's many rows run the same kernels). Both timings are recorded: one CPU's winner at one
    row can lose at five. A kernel replaces plain `F.linear`, the reference's own (or torch's
    quantized kernel), only when clearly faster. The timing runs on the first layers, up to
    `SAMPLE_BYTES` of float32. `BIOGPT_KERNEL=` one of the candidates (plain, packed, packed-1,
    packed-16, float32, float32-packed, plain-direct, native, int8, int8-native, int4, int4-native)
    overrides where that kernel applies (benchmarks, tests)."""
    dtype, device = linears[0].weight.dtype, linears[0].weight.device
    names = candidates(dtype, device, rows, quantize)
    forced = os.environ.get("BIOGPT_KERNEL", "").strip().lower()
    if forced in names or len(names) == 1:
        return forced if forced in names else names[0]
    shapes = sorted({tuple(m.weight.shape) for m in linears})
    precision = dtype if quantize == "none" else quantize
    key = f"{cpu_id()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {precision} | {shapes}"
    decide = 0 if rows == 1 else 1  # which of the timings, at 1 and 5 rows, decides
    key += f" | {names} | decided at {(1, 5)[decide]} rows"  # new candidates, a new rule: timed again
    if any(name.endswith("native") for name in names):
        key += f" | our kernels {native_version()}"  # and new kernels of ours
    path = cache_dir() / "kernels.json"
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and entry.get("kernel") in names:
        return entry["kernel"]
    sample, total = [], 0
    for m in linears:
        sample.append(m)
        total += m.weight.numel() * 4
        if total >= SAMPLE_BYTES:
            break
    if "float32-packed" in names:  # float32's own choice, for the same shapes and rows, decides which is timed
        names.remove("float32" if choose_kernel([widened(m) for m in sample], rows).startswith("packed")
                     else "float32-packed")
    seconds = {}
    for name in names:
        layers = [as_kernel(m, name) for m in sample]
        seconds[name] = [_time(layers, rows, dtype if quantize == "none" else torch.float32) for rows in (1, 5)]
        del layers
    kernel = names[0]  # plain unless another is clearly faster: a tie in the noise goes to the reference's kernel
    for name in names[1:]:
        if seconds[name][decide] < MARGIN * seconds[kernel][decide]:
            kernel = name
    cache = _read_cache(path)  # again: float32's own choice may have been added meanwhile
    cache[key] = {"kernel": kernel, "ms": {k: [round(s * 1e3, 2) for s in v] for k, v in seconds.items()}}
    with contextlib.suppress(OSError):  # an unwritable cache: measured again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(cache, indent=1))
    return kernel
