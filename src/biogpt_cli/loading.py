"""Reading checkpoints (Hub layout; the fairseq release via `fairseq.py`) and building models
ready for inference from them.

Nothing here ever executes pickled code: `pytorch_model.bin` goes through
`torch.load(weights_only=True)`, the fairseq `checkpoint.pt` through an allow-list unpickler.
Safetensors files are memory-mapped, and pages that have been copied (packed, converted) are
handed back to the OS, so a loaded model costs about one copy of its weights.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import mmap
import os
import pickle
import shutil
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import fairseq, native
from .config import BioGptConfig
from .errors import BioGptError, CheckpointError, VocabularyError
from .files import output_errors, write_safetensors
from .hub import HUB_FILES, resolve
from .identity import cache_limit, file_sha256, prune
from .linear import cache_dir, choose_kernel, is_kernel, optimize
from .model import LAYER_NORM_EPS, BioGptDecoderLayer, BioGptModel
from .native import ops
from .native.stack import Stack
from .prepared import for_kernel, load_prepared, prepared_path, save_prepared
from .tokenizer import BioGptTokenizer

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- reading weights ---------------------------------------------------------------------------
def read_checkpoint(folder: Path) -> tuple[BioGptConfig, dict[str, torch.Tensor]]:
    """Config and state dict (Hub key names) from a Hub-layout or fairseq-layout folder."""
    checkpoint = fairseq.find_checkpoint(folder)
    if checkpoint is not None and not (folder / "config.json").is_file():
        return fairseq.read_checkpoint(checkpoint)
    config = BioGptConfig.from_json(folder / "config.json")
    if (folder / WEIGHT_FILES[0]).is_file():
        return config, read_safetensors(folder / WEIGHT_FILES[0])
    if (folder / WEIGHT_FILES[1]).is_file():
        return config, read_torch_bin(folder / WEIGHT_FILES[1], config)
    raise CheckpointError(f"{folder}: no weights (expected {' or '.join(WEIGHT_FILES)})")


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-mapped: every tensor is a view of one private (copy-on-write) mapping of the file,
    so loading costs no copy and pages are read only when first touched (see `release`)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupted?): {why}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise bad("bad header length")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON ({e})") from None
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never writes the file
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data = torch.frombuffer(mapped, dtype=torch.uint8)  # the tensors keep the mapping alive
    _MAPPED[:] = [m for m in _MAPPED if m[0]() is not None]
    _MAPPED.append((weakref.ref(mapped), data.data_ptr(), size))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
            start, end = (8 + n + o for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {name!r} is malformed") from None
        count = 1
        for dim in shape:
            count *= dim
        if end > size or end - start != count * dtype.itemsize:
            raise bad(f"tensor {name!r} lies outside the file")
        raw = data[start:end]
        if start % dtype.itemsize:  # a misaligned tensor (rare writers): copy it rather than map it
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(shape)
    return tensors


def _converted_cache(path: Path) -> Path:
    """Where a `.bin`'s weights are kept as safetensors: named by the file's content."""
    return cache_dir() / "converted" / f"{file_sha256(path)[:32]}.safetensors"


def read_torch_bin(path: Path, config: BioGptConfig) -> dict[str, torch.Tensor]:
    """`weights_only=True` refuses anything but tensors. The result is saved once as safetensors
    in the user cache, so the next start maps it instead of unpickling 1.5 GB."""
    cached = _converted_cache(path)
    if cached.is_file():
        try:
            tensors = read_safetensors(cached)
            os.utime(cached)  # recently used: the last to be pruned
            return tensors
        except CheckpointError:
            cached.unlink(missing_ok=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: refused: it pickles objects other than tensors, and loading it "
                              "could run code (only plain weight files are accepted)") from None
    except Exception as e:  # noqa: BLE001 -- torch raises many types for a bad zip/pickle
        raise CheckpointError(f"{path}: cannot read PyTorch weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    _save_converted(state, cached, config)
    return state


def _save_converted(state: dict[str, torch.Tensor], target: Path, config: BioGptConfig) -> None:
    from safetensors import SafetensorError

    tensors = {k: v.contiguous() for k, v in state.items()
               if not (config.tie_word_embeddings and k == "output_projection.weight")}
    with contextlib.suppress(OSError, SafetensorError):  # an unwritable cache only costs speed
        target.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(tensors, target)
        prune(target.parent, cache_limit())


# -- building a model --------------------------------------------------------------------------
def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BioGptError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_model(cls: type[nn.Module], path_or_id: str | Path, *, revision: str | None = None,
               dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               fuse: bool = True, kernels: bool | None = None, quantize: str = "none", rows: int | None = None) -> Any:
    """Build `cls` on the meta device and assign the checkpoint's tensors (no second copy)."""
    folder = resolve(path_or_id, revision, ("config.json", "|".join(WEIGHT_FILES)))
    config, state = read_checkpoint(folder)
    return from_state_dict(cls, config, state, dtype=dtype, device=device, fuse=fuse, kernels=kernels,
                           quantize=quantize, source=str(folder), prepared=prepared_path(folder, cls, quantize),
                           rows=rows)


_INIT_NAMES = ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_")
_init_lock = threading.Lock()
_init_users = 0
_init_originals: dict[str, Callable[..., Any]] = {}


def _meta_noop(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return tensor if tensor.is_meta else fn(tensor, *args, **kwargs)
    return init


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip random initialisation of meta tensors while a model is built on the meta device: it is
    pointless there, and `normal_` on meta tensors imports torch._dynamo (over a second of every
    start). The stand-ins skip meta tensors only, so a layer built meanwhile in another thread is
    initialised as usual; loads in several threads share one installation (counted under a lock),
    and the last to finish puts torch's own functions back."""
    global _init_users
    with _init_lock:
        if _init_users == 0:
            for name in _INIT_NAMES:
                _init_originals[name] = getattr(nn.init, name)
                setattr(nn.init, name, _meta_noop(_init_originals[name]))
        _init_users += 1
    try:
        yield
    finally:
        with _init_lock:
            _init_users -= 1
            if _init_users == 0:
                for name, fn in _init_originals.items():
                    setattr(nn.init, name, fn)


def check_state_dict(cls: type[nn.Module], config: BioGptConfig, state: dict[str, torch.Tensor],
                     source: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """`cls` built on the meta device, and the part of `state` it takes under its own key names.
    Raises one error that names every missing, unexpected and mis-shaped key."""
    with torch.device("meta"), _no_init():
        model = cls(config)
    if cls.base_prefix == "":  # BioGptModel takes the decoder part of any checkpoint
        state = {k.removeprefix("biogpt."): v for k, v in state.items()}
    expected = model.state_dict()
    optional = set(cls.optional_keys)
    if config.tie_word_embeddings:
        optional.add("output_projection.weight")
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected and k not in cls.ignored_keys]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
                if keys]
    if problems:
        raise CheckpointError(f"{source}: weights do not match the config ({'; '.join(problems)})")
    return model, {k: v for k, v in state.items() if k in expected}


def from_state_dict(cls: type[nn.Module], config: BioGptConfig, state: dict[str, torch.Tensor], *,
                    dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                    fuse: bool = True, kernels: bool | None = None, quantize: str = "none",
                    source: str = "state dict", prepared: Path | None = None, rows: int | None = None) -> Any:
    """Check every key and shape, then assign (no copy).

    Then, for inference: convert dtype/device, fuse QKV and (`kernels`) swap in the fast linear
    layers of `linear.py`, handing each mapped original back to the OS as soon as it is copied.
    Quantized layers come from `prepared` (`prepared.py`) when it holds them, and are saved there
    when it does not. `rows=1`: the caller decodes one row at a time (see `choose_kernel`).
    """
    kernels = cls.default_kernels if kernels is None else kernels
    model, state = check_state_dict(cls, config, state, source)
    # Small tensors (biases, norms) leave the mapped file, and its pages go back once everything is
    # prepared: a read of a mapped page maps its neighbours too (see `_release_after_lookups`).
    small = {k: v for k, v in state.items() if v.nbytes < SMALL_TENSOR}
    state = {**state, **{k: v.clone() for k, v in small.items()}}
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, param in list(model.named_parameters()):
        if param.is_meta:  # a task head the checkpoint lacks: the reference's N(0, 0.02) init
            module_name, _, attr = name.rpartition(".")
            fresh = torch.zeros(param.shape) if attr == "bias" else torch.randn(param.shape) * 0.02
            setattr(model.get_submodule(module_name), attr, nn.Parameter(fresh))
    # The fastest kernel on this CPU (measured once, then cached: see linear.py); a quantized model's
    # choice names its prepared file, so it is made first (unquantized: after the dtype conversion).
    # oneDNN-packed q/k/v are as fast unfused (measured), and the concatenation would leave ~110 MB
    # of freed heap that glibc keeps: fuse only for the other inference kernels. A plain model (no
    # kernels) keeps the reference's module names, for training and state dicts.
    linears = [m for layer in model.modules() if isinstance(layer, BioGptDecoderLayer)
               for m in layer.modules() if isinstance(m, nn.Linear)]  # the modules: _convert swaps their weights
    quantized = kernels and quantize != "none" and torch.device(device).type == "cpu"
    kernel = choose_kernel(linears, rows, quantize) if quantized and linears else "plain"
    prepared = prepared and for_kernel(prepared, kernel)
    cached = quantized and prepared is not None and load_prepared(model, prepared, read_safetensors, release)
    _convert(model, parse_dtype(dtype), torch.device(device))
    model.eval()
    if kernels and quantize == "none" and linears:
        kernel = choose_kernel(linears, rows)
    fuse = fuse and kernels and not kernel.startswith("packed")

    def prepare(layer: nn.Module) -> None:  # a layer at a time, so few are ever held twice
        if isinstance(layer, BioGptDecoderLayer) and fuse and layer.self_attn.qkv_proj is None:
            old = [p.weight for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)]
            layer.self_attn.fuse_qkv()
            for w in old:
                release(w)
        if kernels:
            optimize(layer, quantize, release, recurse=layer is not model, kernel=kernel)
            if isinstance(layer, BioGptDecoderLayer):
                layer.fuse_activation()
                if native.library() is not None and torch.device(device).type == "cpu":
                    layer.use_ops(ops.attention, ops.gelu, ops.layer_norm)

    # the model's own linear children (the output projection, a task head) first: the largest
    units = [model, *(m for m in model.modules() if isinstance(m, BioGptDecoderLayer))]
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:  # packing is single-threaded C++
        list(pool.map(prepare, units))
    for m in model.modules() if kernels and native.library() is not None else ():
        if isinstance(m, BioGptModel):
            m.stack = Stack.build(m.layers, m.config.num_attention_heads, LAYER_NORM_EPS)
    if quantized and prepared is not None and not cached:
        save_prepared(model, prepared)
    _trim_heap()
    for t in small.values():
        release(t)
    _release_after_lookups(model)
    model.inference_kernels = fuse or any(is_kernel(m) for m in model.modules())
    model.requires_grad_(not model.inference_kernels)
    model.source, model.kernel = source, kernel if kernels else "plain"
    return model


def _convert(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """`model.to(...)` one parameter at a time, keeping ties and releasing each mapped original."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in done:
                new = p.detach().to(device=device, dtype=dtype)
                copied = new.data_ptr() != p.data_ptr()
                done[id(p)] = nn.Parameter(new, requires_grad=False) if copied else p
                if copied:
                    release(p)
            setattr(module, name, done[id(p)])


def _trim_heap() -> None:
    """Give the OS back the heap that preparing layers freed (glibc keeps it otherwise: about 0.9 GB
    after quantizing to int4 the first time). Elsewhere than glibc, nothing to do."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_MAPPED: list[tuple[weakref.ref, int, int]] = []  # (mapping, address, size) of mapped safetensors files
SMALL_TENSOR = 1 << 20  # bytes: copied out of the mapping at load


def _mapping(t: torch.Tensor) -> tuple[mmap.mmap, int] | None:
    """The mapped safetensors file `t` lives in, and the mapping's address; None elsewhere."""
    start, end = t.data_ptr(), t.data_ptr() + t.nbytes
    for ref, address, size in _MAPPED:
        mapped = ref()
        if mapped is not None and address <= start and end <= address + size and hasattr(mapped, "madvise"):
            return mapped, address
    return None


def release(t: torch.Tensor) -> None:
    """Hand back the resident pages of a tensor that lives in a mapped safetensors file, once it
    has been copied, the pages it shares with its neighbours included: the mapping is private and
    never written, so a later read (of a neighbour still in use) simply faults the pages in again
    from the file. Tensors anywhere else are left alone."""
    if found := _mapping(t):
        mapped, address = found
        first = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
        last = -(-(t.data_ptr() + t.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, first - address, min(last, address + len(mapped)) - first)


def _release_after_lookups(model: nn.Module) -> None:
    """Embeddings that stay in the mapped file hand their pages back after every lookup, unless a
    linear layer reads the same weight whole (a plain tied output projection).

    Reading one row of a mapped file maps far more than the row: Linux maps the pages around a
    fault that are already cached (large folios), so looking up token rows would slowly map the
    whole embedding. Handing the pages back costs little next to a step."""
    read_whole = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and _mapping(m.weight) and m.weight.data_ptr() not in read_whole:
            release(m.weight)
            m.register_forward_hook(lambda module, args, out: release(module.weight))


def parse_device(name: str | torch.device) -> torch.device:
    """A device this machine has: cpu, cuda[:N] (when CUDA is available) or mps."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BioGptError(f"unknown device {name!r} (cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BioGptError(f"device {name!r}: this machine has no CUDA device (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BioGptError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise BioGptError(f"device {name!r}: MPS is not available here (use --device cpu)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise BioGptError(f"device {name!r} is not supported (cpu, cuda, cuda:N or mps)")
    return device


MAX_PROMPT_TOKENS = 64  # extra embedding rows beyond the vocabulary taken as a learned prompt


def open_checkpoint(folder: Path) -> tuple[BioGptConfig, dict[str, torch.Tensor], BioGptTokenizer]:
    """Config, state dict and tokenizer of a model folder, checked against each other (e.g.
    BioGPT-Large weights with the base vocabulary).

    A task checkpoint's learned prompt tokens are reconciled here: a vocabulary without them
    (`dict.txt`, a Hub folder whose config.json names `learned_prompt`, or one whose embedding has
    1-64 rows more than its vocabulary) gets them appended, and a vocabulary that has them (a
    converted checkpoint, spelled `learnedK</w>` or `learnedK`) sets the config's count.
    """
    tokenizer = BioGptTokenizer.from_folder(folder)
    config, state = read_checkpoint(folder)
    n = config.learned_prompt
    extra = config.vocab_size - tokenizer.vocab_size
    if not n and not tokenizer.prompt_ids and 0 < extra <= MAX_PROMPT_TOKENS:
        # the release appends learned1..N to the dictionary at start-up: a converted task checkpoint
        # whose vocabulary was saved without them has N embedding rows more than it has tokens
        n = extra
        config = dataclasses.replace(config, learned_prompt=n)
        tokenizer.prompt_note = (f"{folder.name}: its embedding has {n} rows beyond its vocabulary of "
                                 f"{tokenizer.vocab_size}: taken as learned prompt tokens learned1..{n}")
    if n and not tokenizer.prompt_ids and tokenizer.vocab_size + n == config.vocab_size:
        tokenizer.add_prompt_tokens(n)
    if tokenizer.vocab_size != config.vocab_size:
        extra = config.vocab_size - tokenizer.vocab_size
        if n:
            raise CheckpointError(f"{folder}: the checkpoint says {n} learned prompt tokens, but its embedding has "
                                  f"{config.vocab_size} rows for a vocabulary of {tokenizer.vocab_size} "
                                  f"({extra:+d} rows)")
        raise CheckpointError(f"{folder}: the vocabulary has {tokenizer.vocab_size} tokens but the model expects "
                              f"{config.vocab_size}: tokenizer files and weights do not match")
    if len(tokenizer.prompt_ids) != n:
        if n:
            raise CheckpointError(f"{folder}: config.json says {n} learned prompt tokens but the vocabulary has "
                                  f"{len(tokenizer.prompt_ids)}")
        config = dataclasses.replace(config, learned_prompt=len(tokenizer.prompt_ids))
    return config, state, tokenizer


def _task(config: BioGptConfig) -> str:
    """What `info` says a checkpoint does."""
    if config.task or config.learned_prompt:
        return config.task or ("not recorded: run it with `biogpt qa`, `biogpt extract --task bc5cdr|ddi|kd-dti` "
                               "or `biogpt classify`")
    if head := task_head(config):
        return f"labels from a {head} head (biogpt classify)"
    return "none (a language model)"


def model_class(config: BioGptConfig) -> type[nn.Module]:
    """The class config.json's `architectures` names (a causal LM unless it names a task head)."""
    from . import model

    return getattr(model, config.architecture if config.architecture in model.ARCHITECTURES else "BioGptForCausalLM")


def task_head(config: BioGptConfig) -> str | None:
    """The class a checkpoint with a classification head loads as; None for a language model."""
    name = model_class(config).__name__
    return None if name == "BioGptForCausalLM" else name


def load_pretrained(path_or_id: str | Path, *, revision: str | None = None, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu", quantize: str = "none",
                    cls: type[nn.Module] | None = None, kernels: bool | None = None,
                    rows: int | None = None) -> tuple[Any, BioGptTokenizer]:
    """A model ready for inference (`cls`, else the class its config names) and its tokenizer;
    `rows=1` for a caller that decodes one row at a time (see `choose_kernel`)."""
    folder = resolve(path_or_id, revision, ("config.json", *HUB_FILES, "|".join(WEIGHT_FILES)))
    config, state, tokenizer = open_checkpoint(folder)
    cls = cls or model_class(config)
    model = from_state_dict(cls, config, state, dtype=dtype, device=device, quantize=quantize, kernels=kernels,
                            source=str(folder), prepared=prepared_path(folder, cls, quantize), rows=rows)
    return model, tokenizer


def describe(path_or_id: str | Path, revision: str | None = None) -> dict[str, Any]:
    """What `biogpt info` shows: where the model is, its shape, parameter count, dtypes and files.
    Reads the mapped checkpoint only: no weights are copied or converted."""
    folder = resolve(path_or_id, revision, ("config.json", *HUB_FILES, "|".join(WEIGHT_FILES)))
    try:
        config, state, tokenizer = open_checkpoint(folder)
        vocabulary: int | str = tokenizer.vocab_size
    except VocabularyError as e:
        (config, state), vocabulary = read_checkpoint(folder), f"unusable ({e})"
    check_state_dict(model_class(config), config, state, str(folder))
    tied = config.tie_word_embeddings
    counted = {k: t for k, t in state.items() if not (tied and k == "output_projection.weight")}
    return {
        "model": str(path_or_id),
        "loaded_from": str(folder.resolve()),
        "parameters": sum(t.numel() for t in counted.values()),
        "weight_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in counted.values()}),
        "weight_bytes": sum(t.numel() * t.element_size() for t in counted.values()),
        "vocabulary": vocabulary,
        "task": _task(config),
        "learned_prompt_tokens": config.learned_prompt,
        "source_limit": config.max_source_positions or "the task's default" if config.learned_prompt else None,
        "config": config.to_dict(),
        "files": {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()},
        **({"training": training} if (training := _training_summary(folder)) else {}),
    }


def _training_summary(folder: Path) -> dict[str, Any] | None:
    """How `biogpt finetune` made the checkpoint (its training.json), in brief."""
    try:
        manifest = json.loads((folder / "training.json").read_text(encoding="utf-8"))
        recipe, last = manifest["recipe"], manifest["history"][-1]
        return {"base_model": manifest["base_model"], "base_sha256": manifest["base_sha256"],
                "data": f"{manifest['train']['file']} ({manifest['train']['examples']} examples, sha256 "
                        f"{manifest['train']['sha256'][:16]})",
                "recipe": f"{recipe['method']}, lr {recipe['lr']}, warm-up {recipe['warmup']}, "
                          f"{recipe['tokens_per_update']} tokens per update, seed {recipe['seed']}",
                "trained": f"{last['epoch']} epochs, {last['updates']} updates"
                           + ("" if manifest["complete"] else " (incomplete: --resume continues)"),
                "averaged_epochs": manifest["averaged_epochs"],
                "final": ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("epoch", "updates"))}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


# -- conversion --------------------------------------------------------------------------------
def convert(src: str | Path, dst: str | Path) -> Path:
    """Write any loadable checkpoint (fairseq release included) in the Hub layout, as safetensors.

    A task checkpoint keeps its learned prompt tokens in vocab.json and its task, prompt length and
    source limit in config.json, so the converted folder needs no flags.
    """
    folder = resolve(src, None, ("config.json", "|".join(WEIGHT_FILES)))
    config, state, tokenizer = open_checkpoint(folder)
    check_state_dict(model_class(config), config, state, str(folder))
    return write_checkpoint(dst, config, state, tokenizer)


def _alive(pid: str) -> bool:
    """Whether process `pid` (a folder name's digits) still runs: its staging folder is in use."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_checkpoint(dst: str | Path, config: BioGptConfig, state: dict[str, torch.Tensor],
                     tokenizer: BioGptTokenizer, extra: dict[str, str] | None = None) -> Path:
    """A Hub-layout folder (safetensors, config.json, vocabulary, and `extra` text files by name).
    Files are written under temporary names and renamed at the end: a failed write leaves nothing
    of its own behind, and what a killed one left is removed by the next."""
    dst = Path(dst)
    created = not dst.exists()
    for stale in dst.glob(".biogpt-convert-*"):
        if not _alive(stale.name.rsplit("-", 1)[1]):
            shutil.rmtree(stale, ignore_errors=True)
    tensors = {k: v.contiguous() for k, v in state.items()
               if not (config.tie_word_embeddings and k == "output_projection.weight")}
    staging = dst / f".biogpt-convert-{os.getpid()}"
    with output_errors(dst):  # a full disk: one line naming the folder
        try:
            staging.mkdir(parents=True)
            write_safetensors(tensors, staging / "model.safetensors", metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
            tokenizer.save_vocabulary(staging)
            for name, text in (extra or {}).items():
                (staging / name).write_text(text, encoding="utf-8")
            for path in staging.iterdir():
                os.replace(path, dst / path.name)
            staging.rmdir()
        except BaseException:
            shutil.rmtree(dst if created else staging, ignore_errors=True)
            raise
    return dst
