"""The original fairseq release of BioGPT: `checkpoint.pt` (`decoder.*` tensors) + `dict.txt` + `bpecodes`.

Fine-tuned task checkpoints are the same model with N learned prompt tokens appended to the
dictionary at start-up (`cfg.task.learned_prompt`), so their embedding has N more rows than
`dict.txt` has entries; the task itself is named only by the data folder they were trained on.

Its checkpoint also pickles training state (config objects, optimizer history, meters). An
allow-list unpickler reads it: tensors, containers and argparse namespaces are rebuilt, every
other class becomes an inert stub holding its state as data, and no pickled code ever runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .config import BioGptConfig
from .errors import CheckpointError, ConfigError
from .hub import FAIRSEQ_CHECKPOINTS

# cfg.task.data of the release's training scripts (data/BC5CDR/relis-bin, ...) -> our task names
DATA_TASKS = {"bc5cdr": "bc5cdr", "ddi": "ddi", "kd-dti": "kd-dti", "hoc": "hoc", "pubmedqa": "pubmedqa"}


def find_checkpoint(folder: Path) -> Path | None:
    """The release's checkpoint file in `folder`, if any."""
    return next((folder / name for name in FAIRSEQ_CHECKPOINTS if (folder / name).is_file()), None)


class _Stub:
    """Stands in for any class the fairseq unpickler does not allow; keeps its state as data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _SafeUnpickler(pickle.Unpickler):
    ALLOWED = {
        ("collections", "OrderedDict"), ("collections", "defaultdict"), ("argparse", "Namespace"),
        ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
        ("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"), ("torch", "int64"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        return type(name, (_Stub,), {"__module__": "biogpt_cli.stubbed." + module})


class _SafePickleModule:
    """What `torch.load(pickle_module=...)` needs: our Unpickler, and `load` for legacy files."""

    Unpickler = _SafeUnpickler
    __name__ = "biogpt_safe_pickle"

    @staticmethod
    def load(f: Any, **kwargs: Any) -> Any:
        return _SafeUnpickler(f, **kwargs).load()


def _plain(obj: Any) -> Any:
    """Namespaces, dicts and stubbed omegaconf configs as plain nested dicts."""
    if isinstance(obj, _Stub):
        state = getattr(obj, "state", None)
        if isinstance(state, dict):
            if "_content" in state:
                return _plain(state["_content"])
            if "_val" in state:
                return _plain(state["_val"])
            return _plain(state)
        return None
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        return _plain(vars(obj))
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def read_checkpoint(path: Path) -> tuple[BioGptConfig, dict[str, torch.Tensor]]:
    """The original release: `decoder.*` tensors; shapes from the tensors, heads from the args."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_SafePickleModule)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read fairseq checkpoint ({type(e).__name__}: {e})") from None
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: no 'model' state dict in this fairseq checkpoint")
    state = {}
    for key, value in model.items():
        if not isinstance(value, torch.Tensor) or key.endswith(".version"):
            continue
        if key.endswith("output_projection.weight"):
            state["output_projection.weight"] = value
        elif key.startswith("decoder."):
            state["biogpt." + key[len("decoder."):]] = value
    cfg = _plain(ckpt.get("cfg")) or {}
    cfg = cfg if isinstance(cfg, dict) else {}
    legacy = _plain(ckpt.get("args")) or {}
    args = {**legacy, **(cfg.get("model") or {})}
    task = {**legacy, **(cfg.get("task") or {})}
    learned = int(task.get("learned_prompt") or 0)
    try:
        embed, fc1 = state["biogpt.embed_tokens.weight"], state["biogpt.layers.0.fc1.weight"]
        layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("biogpt.layers."))
        heads = args["decoder_attention_heads"]
        config = BioGptConfig(
            vocab_size=embed.shape[0], hidden_size=embed.shape[1], num_hidden_layers=layers,
            num_attention_heads=int(heads), intermediate_size=fc1.shape[0],
            max_position_embeddings=state["biogpt.embed_positions.weight"].shape[0] - 2,
            hidden_act=args.get("activation_fn", "gelu"),
            scale_embedding=not args.get("no_scale_embedding", False),
            tie_word_embeddings=bool(args.get("share_decoder_input_output_embed", True)),
            learned_prompt=learned,
            max_source_positions=int(task["max_source_positions"]) if learned and task.get("max_source_positions")
            else None,
            task=_task_of(str(task.get("data") or "")) if learned else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a BioGPT fairseq checkpoint (missing or bad {e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return config, state


def _task_of(data: str) -> str | None:
    """The task a checkpoint was fine-tuned for, from its training data folder (data/DDI/relis-bin)."""
    parts = [p.lower() for p in data.replace("\\", "/").split("/")]
    return next((DATA_TASKS[p] for p in parts if p in DATA_TASKS), None)
