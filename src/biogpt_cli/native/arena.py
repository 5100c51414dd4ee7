"""The weights our kernels stream, moved into one buffer that the OS backs with 2 MB pages.

A decoding step reads every weight once, front to back. In 4 KB pages the hardware prefetcher
stops at every page's end and each page costs a TLB entry; Linux backs an anonymous mapping with
2 MB pages when asked (`MADV_HUGEPAGE`: transparent huge pages in their usual "madvise" mode),
and the same kernels then stream faster (docs/performance.md). Where the OS has no such advice the
tensors stay where they are.
"""

from __future__ import annotations

import mmap

import torch
from torch import nn

HUGE = 2 << 20  # bytes: the buffer starts on a 2 MB boundary
ALIGN = 64  # bytes: each tensor starts on a cache line


def settle(model: nn.Module) -> int:
    """Copy every CPU tensor that a layer names in its `streams` into one buffer, in the layers'
    order, and point the layers at the copies (a tensor two layers share is copied once). Returns
    the bytes moved. Run before anything keeps the tensors' addresses (`Stack.build`)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    places = [(m, name) for m in model.modules() for name in getattr(m, "streams", ())
              if isinstance(getattr(m, name, None), torch.Tensor) and getattr(m, name).device.type == "cpu"]
    sizes = {getattr(m, name).data_ptr(): _padded(getattr(m, name)) for m, name in places}
    total = sum(sizes.values())
    if not total:
        return 0
    buffer = mmap.mmap(-1, total + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(buffer, dtype=torch.uint8)  # the tensors keep the mapping alive
    offset, copies = -arena.data_ptr() % HUGE, {}
    for m, name in places:  # each original freed as soon as its last layer lets it go
        t = getattr(m, name)
        if t.data_ptr() not in copies:
            copies[t.data_ptr()] = arena[offset:offset + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
            offset += sizes[t.data_ptr()]
        setattr(m, name, copies[t.data_ptr()])
    return total


def _padded(t: torch.Tensor) -> int:
    return -(-t.nbytes // ALIGN) * ALIGN
