"""What decoding needs in memory, estimated from the config before anything is allocated, so that
a value that cannot fit (100,000 beams, a batch of thousands) is refused with one line instead of
ending in the kernel's out-of-memory killer.

The estimate counts what grows with rows: keys and values for every position a row may reach,
its token history and attention mask, and the per-step float32 score tensors (beam search keeps a
few of `[rows, vocabulary]`). Weights are not counted: they are mapped, and a model that loads
at all has room for them.
"""

from __future__ import annotations

import os
from typing import Any

from .config import BioGptConfig
from .errors import InputError

SCORE_COPIES = 8  # [rows, vocab] float32 tensors alive in a beam step (logits, log-softmax, processed scores, top-k)
HEADROOM = 0.8  # of the memory available: the rest is for the weights' pages, activations and the allocator


def row_bytes(config: BioGptConfig, positions: int, dtype_bytes: int = 4) -> int:
    """Bytes one decoding row holds: keys and values of every layer at `positions`, the history and
    mask (int64 each), and its score vectors."""
    kv = 2 * config.num_hidden_layers * positions * config.hidden_size * dtype_bytes
    return kv + 2 * 8 * positions + SCORE_COPIES * 4 * config.vocab_size


def available_bytes(device: Any = "cpu") -> int | None:
    """Memory free for new allocations on `device` (None where it cannot be told)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def check_rows_fit(config: BioGptConfig, rows: int, positions: int, *, what: str, dtype_bytes: int = 4,
                   device: Any = "cpu", free: int | None = None) -> None:
    """Raise `InputError` naming `what` (the options that make the rows) when `rows` decoding rows
    of up to `positions` positions would not fit in the memory available."""
    positions = max(1, min(positions, config.max_position_embeddings))
    free = available_bytes(device) if free is None else free
    per_row = row_bytes(config, positions, dtype_bytes)
    if free is None or rows * per_row <= HEADROOM * free:
        return
    fit = int(HEADROOM * free // per_row)
    raise InputError(f"{what}: {rows} decoding rows need about {_gb(rows * per_row)} ({_gb(per_row)} each for up "
                     f"to {positions} positions), and {_gb(free)} is available: at most {fit} rows fit")


def batch_rows(rows: int, device: Any) -> int:
    """The rows a batch of `rows` holds: on a GPU its static cache rounds them up to a bucket."""
    from .graphs import bucket_of  # here: the commands that never decode start without torch

    return bucket_of(rows) if str(device).startswith("cuda") else rows


def check_batch_fits(model: Any, rows: int, free: int | None = None) -> None:
    """Refuse a server whose batch could not hold `rows` rows (`--max-rows`) at the model's full
    length: its requests' rows share one batch, so admitting each request by its own rows would
    not bound the whole."""
    p = next(model.parameters())
    check_rows_fit(model.config, batch_rows(rows, p.device), model.config.max_position_embeddings,
                   what="serve --max-rows", dtype_bytes=p.element_size(), device=p.device, free=free)


def check_draft_fits(config: BioGptConfig, precision: str, free: int | None = None) -> None:
    """Refuse a quantized copy of the model for drafting (drafts.py) that would not fit beside it:
    its linear weights at a byte (int8) or half a byte (int4) each, its embeddings in float32, and
    one decoding row."""
    h, layers = config.hidden_size, config.num_hidden_layers
    linear = layers * (4 * h * h + 2 * h * config.intermediate_size) + h * config.vocab_size
    embed = (config.vocab_size + config.max_position_embeddings) * h * 4
    need = linear * (1.0 if precision == "int8" else 0.6) + embed + row_bytes(config, config.max_position_embeddings)
    free = available_bytes("cpu") if free is None else free
    if free is not None and need > HEADROOM * free:
        raise InputError(f"--speculate {precision}: the model's {precision} copy for drafting needs about "
                         f"{_gb(need)}, and {_gb(free)} is available: use --speculate auto or ngram")


ACTIVATION_FLOATS = 20  # float32 values a layer keeps per token for the backward pass (a rough count)


def training_bytes(config: BioGptConfig, trained: int, batch_tokens: int) -> int:
    """Bytes a fine-tuning run takes beyond its loaded weights (they are in memory when the free
    memory is read, so they are not counted again): gradient, Adam's two moments and the epoch
    average of what trains; one micro-batch's activations and its float32 logits (3 copies)."""
    activations = batch_tokens * (config.num_hidden_layers * ACTIVATION_FLOATS * config.hidden_size
                                  + 3 * config.vocab_size) * 4
    return 16 * trained + activations


def check_training_fits(config: BioGptConfig, trained: int, batch_tokens: int, device: Any = "cpu",
                        free: int | None = None) -> None:
    """Refuse, before training starts (with the model loaded), a run that would not fit in the
    memory still available."""
    need = training_bytes(config, trained, batch_tokens)
    free = available_bytes(device) if free is None else free
    if free is not None and need > HEADROOM * free:
        raise InputError(f"training needs about {_gb(need)} more ({_gb(16 * trained)} for what trains, "
                         f"{_gb(need - 16 * trained)} for a micro-batch of {batch_tokens} tokens) "
                         f"and {_gb(free)} is available: try --method lora or prompt, or a smaller --batch-tokens")


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
