"""Where a benchmark ran: the CPU (model, ISA level), threads, torch, and a measured memory-read
bandwidth, which bounds how fast any kernel can decode (a step reads every weight once)."""

from __future__ import annotations

import re
import time

import torch
from torch import nn

from biogpt_cli.linear import cpu_info


def isa(flags: set[str]) -> str:
    extras = [f for f in ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8") if f in flags]
    level = "amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "-"
    return level + (f" ({', '.join(extras)})" if extras else "")


def bandwidth(gib: float = 1.0, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes per second of a `sum` over a buffer far larger than any cache (best of `repeats`),
    in the memory the model's weights live in."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def describe(device: str = "cpu") -> dict:
    """What a result file records of where it ran."""
    from importlib.metadata import PackageNotFoundError, version

    model, flags = cpu_info()
    try:
        reference = version("transformers")
    except PackageNotFoundError:
        reference = None
    info = {"date": time.strftime("%Y-%m-%d"), "cpu": model, "isa": isa(set(flags)), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": reference,
            "read_bandwidth_gbps": round(bandwidth(device=device) / 1e9, 1)}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def slug(info: dict) -> str:
    """A file name's part for the machine: the GPU where one ran, else the CPU and its threads."""
    name = info.get("gpu") or f"{info['cpu']}-{info['threads']}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every linear layer (whatever its kernel) once."""
    total = 0
    for m in model.modules():
        name = type(m).__name__
        if not (hasattr(m, "in_features") and hasattr(m, "out_features")) or name == "BioGptForCausalLM":
            continue
        n = m.in_features * m.out_features
        if name == "Int4Linear":
            total += n // 2 + m.scales_zeros.numel() * 2
        elif name == "NativeInt4Linear":
            total += n // 2 + (m.scales.numel() + m.mins.numel()) * 4
        elif name == "PackedLinear":
            total += n * m.packed.element_size()
        elif name == "Float32Linear":
            total += 0  # its inner layer (PackedLinear or nn.Linear) is counted
        elif hasattr(m, "weight"):  # nn.Linear, HalfLinear
            total += n * m.weight.element_size()
        else:  # Int8Linear, NativeInt8Linear
            total += n
    return total
