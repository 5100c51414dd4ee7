"""Quantized weights, prepared once and cached like the converted `.bin` weights.

Quantizing microsoft/biogpt's 24 layers takes seconds at every start (int8's per-channel scales,
int4's groups and packing). The result depends only on the checkpoint's files, the method and
(for int4's packed layout) the CPU and torch version, so the first start saves it as safetensors
under the user cache and later starts map it: no float32 weight of a quantized layer is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .files import write_safetensors
from .identity import cache_limit, model_identity, prune
from .linear import Int4Linear, Int8Linear, cache_dir, cpu_id
from .native.layers import NativeInt4Linear, NativeInt8Linear

FORMAT = 1  # bump when a kernel's tensors change meaning: old files are then never read
KINDS: dict[str, type[nn.Module]] = {"int4": Int4Linear, "int8": Int8Linear, "int4n": NativeInt4Linear,
                                     "int8n": NativeInt8Linear}


def prepared_path(folder: Path, cls: type[nn.Module], quantize: str) -> Path | None:
    """The cache file for these weights: the model's content (identity.py: other weights, even of the
    same sizes and mtime, get another file), the class (task heads), the method, the CPU and torch
    version (the loader adds the kernel to its name). None unquantized."""
    if quantize == "none":
        return None
    content = model_identity(folder)["sha256"]
    key = f"{FORMAT}|{content}|{cls.__name__}|{quantize}|{cpu_id()}|torch {torch.__version__}"
    return cache_dir() / "prepared" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def for_kernel(path: Path, kernel: str) -> Path:
    """The cache file of `prepared_path` for the layers of one kernel (its tensors are its own)."""
    return path.with_stem(f"{path.stem}-{kernel}")


def load_prepared(model: nn.Module, path: Path, read: Callable[[Path], dict[str, torch.Tensor]],
                  release: Callable[[torch.Tensor], None]) -> bool:
    """Put the cached quantized layers into `model` (a fused q/k/v included). False when there is
    no usable file (absent, corrupt, or not this model's): the caller prepares them as usual."""
    if not path.is_file():
        return False
    try:
        tensors = read(path)
        os.utime(path)  # recently used: the last to be pruned
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            module, kind, name = key.rsplit(".", 2)
            groups.setdefault(f"{module}.{kind}", {})[name] = t

        def build(item: tuple[str, dict[str, torch.Tensor]]) -> nn.Module:
            # fbgemm packs a copy of its own; the others keep their tensors, copied out of the mapping
            # (weights read through it stream slower). Either way the file's pages can then go.
            kind, mapped = KINDS[item[0].rpartition(".")[2]], item[1]
            layer = kind.from_tensors(mapped if kind is Int8Linear else {k: t.clone() for k, t in mapped.items()})
            for t in mapped.values():
                release(t)
            return layer

        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:  # int8 packing is single-threaded C++
            layers = dict(zip(groups, pool.map(build, groups.items()), strict=True))
        for key, layer in layers.items():
            parent_name, _, attr = key.rpartition(".")[0].rpartition(".")
            parent = model.get_submodule(parent_name)
            fused = attr == "qkv_proj"
            target = parent.q_proj if fused else getattr(parent, attr)
            if not isinstance(target, nn.Linear) or (layer.in_features, layer.out_features) != (
                    target.in_features, (3 if fused else 1) * target.out_features):
                raise KeyError(key)  # not this model's layer
            if fused:
                parent.fuse_qkv(layer)
            else:
                setattr(parent, attr, layer)
    except (CheckpointError, KeyError, ValueError, AttributeError, RuntimeError):  # not ours: prepared again
        path.unlink(missing_ok=True)
        return False
    return True


def save_prepared(model: nn.Module, path: Path) -> None:
    """Save every quantized layer of `model` (written under a temporary name, then renamed)."""
    from safetensors import SafetensorError

    names = {cls: kind for kind, cls in KINDS.items()}
    tensors = {f"{module}.{names[type(m)]}.{key}": t.contiguous()
               for module, m in model.named_modules() if type(m) in names for key, t in m.tensors().items()}
    with contextlib.suppress(OSError, SafetensorError):  # an unwritable cache only costs time at the next start
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(tensors, path)
        prune(path.parent, cache_limit())
