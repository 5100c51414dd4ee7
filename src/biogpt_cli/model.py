"""The BioGPT decoder: a pre-LayerNorm GPT with learned positions, in plain PyTorch.

Module names follow the reference (`biogpt.layers.N.self_attn.q_proj`, ...) so a Hub state dict
loads strictly; fusing QKV or quantizing happens after loading. The model's quirks, once:

* Positions come from the cumulative sum of the attention mask (so left padding is harmless) and
  index `embed_positions` with an offset of 2, a fairseq heritage. The reference numbers positions
  0..n-1 whatever the mask unless given `position_ids`; both accept `position_ids` to say.
* Token embeddings are scaled by sqrt(hidden_size) when `scale_embedding` is set.
* LayerNorm eps is torch's default 1e-5: the reference ignores `layer_norm_eps` from config.json.
* Prompts start with `</s>` (id 2), not `<s>`; the tokenizer adds it.
* The output projection is tied to the token embedding, so a checkpoint may omit it.

Modules are pure: no tokenizing, sampling, printing or device policy in here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import KVCache
from .config import BioGptConfig
from .errors import BioGptError, InputError

ARCHITECTURES = ("BioGptForCausalLM", "BioGptForSequenceClassification", "BioGptForTokenClassification", "BioGptModel")
LAYER_NORM_EPS = 1e-5
POSITION_OFFSET = 2

_ACT = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class BioGptOutput:
    """What every model's forward returns; fields a model does not produce stay None."""

    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # with output_hidden_states: the reference's tuple
    attentions: tuple[torch.Tensor, ...] | None = None  # with output_attentions: each layer's weights


class BioGptAttention(nn.Module):
    # torch's SDPA; loading may put our CPU kernel's (native/ops.py, the same arguments) here
    sdpa = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, config: BioGptConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)
        self.qkv_proj: nn.Linear | None = None
        self.dropout = config.attention_probs_dropout_prob

    def fuse_qkv(self, fused: nn.Module | None = None) -> None:
        """Replace the three projections by one (`fused`, else their concatenation): one matrix
        read per step instead of three calls."""
        if fused is None:
            h = self.out_proj.in_features
            fused = nn.Linear(h, 3 * h, device="meta", dtype=self.q_proj.weight.dtype)
            projections = (self.q_proj, self.k_proj, self.v_proj)
            fused.weight = nn.Parameter(torch.cat([p.weight for p in projections]), requires_grad=False)
            fused.bias = nn.Parameter(torch.cat([p.bias for p in projections]), requires_grad=False)
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None,
                layer: int, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        """SDPA, which keeps no attention weights; given a `weights` list, the product is spelled
        out instead and its softmax appended ([batch, heads, new, past + new])."""
        b, t, h = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        if self.qkv_proj is not None:  # one view of the fused output: [3, b, heads, t, head_dim]
            q, k, v = self.qkv_proj(x).view(b, t, 3, *shape[2:]).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        causal = mask is None and t > 1
        if weights is None:
            p = self.dropout if self.training else 0.0
            y = self.sdpa(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
        else:
            if causal:
                mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            probs = (scores if mask is None else scores.masked_fill(~mask, float("-inf"))).softmax(-1).to(v.dtype)
            weights.append(probs)
            y = probs @ v
        return self.out_proj(y.transpose(1, 2).reshape(b, t, h))


class LayerNorm(nn.LayerNorm):
    """torch's, its function swappable: loading may put our CPU kernel's here (native/ops.py)."""

    norm = staticmethod(F.layer_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class BioGptDecoderLayer(nn.Module):
    def __init__(self, config: BioGptConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.self_attn = BioGptAttention(config)
        self.self_attn_layer_norm = LayerNorm(h, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(h, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, h)
        self.final_layer_norm = LayerNorm(h, eps=LAYER_NORM_EPS)
        self.act = _ACT[config.hidden_act]
        self.dropout, self.activation_dropout = config.hidden_dropout_prob, config.activation_dropout

    def fuse_activation(self) -> None:
        """Leave GELU to `fc1` where its kernel applies it as it writes (`gelu`: our CPU kernels),
        saving a pass over the widest activation."""
        if self.act is F.gelu and hasattr(self.fc1, "gelu"):
            self.fc1.gelu, self.act = True, _kept_activation

    def use_ops(self, sdpa: Any, gelu: Any, layer_norm: Any) -> None:
        """Run attention, GELU and the layer norms on other implementations of the same functions
        (native/ops.py)."""
        self.self_attn.sdpa = sdpa
        if self.act is F.gelu:
            self.act = gelu
        self.self_attn_layer_norm.norm = self.final_layer_norm.norm = layer_norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None,
                layer: int, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        drop = _dropout if self.training else _kept  # outside training, no dropout op at all
        x = x + drop(self.self_attn(self.self_attn_layer_norm(x), mask, cache, layer, weights), self.dropout)
        hidden = drop(self.act(self.fc1(self.final_layer_norm(x))), self.activation_dropout)
        return x + drop(self.fc2(hidden), self.dropout)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, True)


def _kept(x: torch.Tensor, p: float) -> torch.Tensor:
    return x


def _kept_activation(x: torch.Tensor) -> torch.Tensor:
    return x


def _unchanged(fn: Any, tensor: torch.Tensor) -> bool:
    """Whether `fn` (what `Module._apply` maps over tensors) returns `tensor` itself."""
    try:
        return fn(tensor) is tensor
    except (RuntimeError, TypeError, ValueError, AssertionError):  # e.g. .cuda() where there is no CUDA
        return False


class BioGptPreTrainedModel(nn.Module):
    """Shared loading and cache plumbing; `base_prefix` maps a Hub key onto this class.

    A model loaded with the fast CPU kernels (`inference_kernels`) runs forward only: its packed or
    quantized weights cannot be saved, copied, moved or trained, and those calls say so instead of
    failing deep inside oneDNN (or silently returning a partial state dict).
    """

    config: BioGptConfig
    inference_kernels = False  # set by loading when linear.py's kernels replaced nn.Linear
    kernel = "plain"  # which of them (linear.choose_kernel's name), set by loading
    default_kernels = False  # task heads and BioGptModel load as plain modules, ready to fine-tune
    base_prefix = "biogpt."
    optional_keys: tuple[str, ...] = ()  # task heads a base checkpoint lacks: freshly initialised
    ignored_keys: tuple[str, ...] = ("output_projection.weight",)  # present in LM checkpoints

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, revision: str | None = None,
                        dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                        fuse: bool = True, kernels: bool | None = None,
                        quantize: str = "none", rows: int | None = None) -> BioGptPreTrainedModel:
        """Load a Hub-layout or fairseq-layout checkpoint from a folder or a Hub id.

        `kernels` swaps in the fast CPU linear layers (`linear.py`; the default for
        `BioGptForCausalLM`, which is then inference-only); `quantize="int8"` makes them int8.
        `rows=1` says that decoding will run one row at a time (one prompt, greedy or sampled):
        the kernels may then use a weight layout that is faster there and slower for more rows.
        """
        from .loading import load_model

        return load_model(cls, path_or_id, revision=revision, dtype=dtype, device=device, fuse=fuse,
                          kernels=kernels, quantize=quantize, rows=rows)

    def _refuse(self, what: str) -> None:
        if self.inference_kernels:
            raise BioGptError(f"{what}: this {type(self).__name__} was loaded for inference, with packed or quantized "
                              "CPU kernels that only run forward; load it with kernels=False "
                              f"({type(self).__name__}.from_pretrained(path, kernels=False)) for a model that can "
                              "be saved, copied, moved to another device or dtype, or trained")

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse("state_dict()")
        return super().state_dict(*args, **kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .half(), .float(), .cuda(), ...
        if self.inference_kernels:  # a move that moves nothing (`model.to("cpu")` in a script) is fine
            if all(_unchanged(fn, t) for t in itertools.chain(self.parameters(), self.buffers())):
                return self
            self._refuse("changing device or dtype")
        vars(self).pop("_decoders", None)  # static decoders (graphs.py) read the weights as they were
        return super()._apply(fn, recurse)

    def __reduce_ex__(self, protocol: Any) -> Any:  # torch.save(model), copy.deepcopy(model)
        self._refuse("pickling or copying")
        return super().__reduce_ex__(protocol)

    def new_cache(self, batch: int, capacity: int, room: int = 0) -> KVCache:
        c, p = self.config, next(self.parameters())
        return KVCache(c.num_hidden_layers, batch, c.num_attention_heads, c.head_dim,
                       min(capacity, c.max_position_embeddings), p.dtype, p.device, room)


class BioGptModel(BioGptPreTrainedModel):
    base_prefix = ""
    gradient_checkpointing = False  # training: trade a second forward pass per layer for activation memory
    stack: Any = None  # loading may set our kernels' runner of all layers in one call (native/stack.py)
    # the decoder of any checkpoint: a language model's, or a task head's (its hidden states, for embed)
    ignored_keys = ("output_projection.weight", "score.weight", "classifier.weight", "classifier.bias")

    def __init__(self, config: BioGptConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.embed_scale = math.sqrt(h) if config.scale_embedding else 1.0
        self.embed_tokens = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, h)
        self.layers = nn.ModuleList(BioGptDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(h, eps=LAYER_NORM_EPS)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> BioGptOutput:
        """`attention_mask` covers the cached positions too ([batch, past + new]), as in the reference.
        `position_ids` ([batch, new], from 0) override the positions the mask implies.
        `output_hidden_states` adds the reference's tuple: the embeddings, each layer's output but
        the last, then the last one after the final layer norm (`last_hidden_state`).
        `output_attentions` adds each layer's attention weights (computed without SDPA, slower)."""
        b, t = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(b, t)
        if getattr(cache, "static", False):  # positions and mask from the device (a capturable step)
            positions, mask = cache.positions_and_mask(t)
        else:
            past = cache.length if cache is not None else 0
            if past + t > self.config.max_position_embeddings:
                raise InputError(f"sequence of {past + t} tokens exceeds the model's "
                                 f"{self.config.max_position_embeddings} positions")
            if cache is not None:
                cache.reserve(t, self.config.max_position_embeddings)
            positions, mask = self._positions_and_mask(attention_mask, b, t, past, input_ids.device)
        if position_ids is not None:
            positions = position_ids.expand(b, t)
        x = self.embed_tokens(input_ids) * self.embed_scale + self.embed_positions(positions + POSITION_OFFSET)
        x = F.dropout(x, self.config.hidden_dropout_prob, self.training)
        states, weights = [], [] if output_attentions else None
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if self.stack is not None and not (output_hidden_states or output_attentions or self.training) \
                and self.stack.takes(x, mask, cache):
            x = self.stack(x, mask, cache)  # every layer in one call of our kernels
        else:
            for i, layer in enumerate(self.layers):
                if output_hidden_states:
                    states.append(x)
                if recompute:  # keep only each layer's input; its insides are recomputed in the backward pass
                    x = checkpoint(layer, x, mask, cache, i, weights, use_reentrant=False)
                else:
                    x = layer(x, mask, cache, i, weights)
        if cache is not None:
            cache.advance(t)
        x = self.layer_norm(x)
        return BioGptOutput(last_hidden_state=x, past_key_values=cache,
                            hidden_states=(*states, x) if output_hidden_states else None,
                            attentions=tuple(weights) if output_attentions else None)

    @staticmethod
    def _positions_and_mask(attention_mask: torch.Tensor | None, b: int, t: int, past: int,
                            device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions count only attended tokens; the boolean SDPA mask joins causality and padding.

        Without padding and without history the mask is None (SDPA's causal kernel), and a
        single new token needs none at all. A padded query still attends to itself, so no row
        of the mask is empty (an empty row would give NaN).
        """
        total = past + t
        if attention_mask is None:
            positions = torch.arange(past, total, device=device).expand(b, t)
            if past == 0 or t == 1:
                return positions, None
            key_ok = torch.ones(b, total, dtype=torch.bool, device=device)
        else:
            if attention_mask.shape != (b, total):
                raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected {(b, total)} (cached + new positions)")
            key_ok = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        query = torch.arange(past, total, device=device)[:, None]
        key = torch.arange(total, device=device)[None, :]
        mask = ((key <= query) & key_ok[:, None, :]) | (key == query)
        return positions, mask[:, None]


class BioGptForCausalLM(BioGptPreTrainedModel):
    ignored_keys = ()
    default_kernels = True

    def __init__(self, config: BioGptConfig) -> None:
        super().__init__()
        self.config = config
        self.biogpt = BioGptModel(config)
        self.output_projection = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.output_projection.weight = self.biogpt.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0,
                position_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False) -> BioGptOutput:
        """`logits_to_keep=1` projects only the last position (42384 x 1024 is costly per row)."""
        out = self.biogpt(input_ids, attention_mask, past_key_values, use_cache, position_ids, output_hidden_states,
                          output_attentions)
        hidden = out.last_hidden_state
        out.logits = self.output_projection(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, labels)
        return out

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """The reference's `model.generate(**tokenizer(texts, padding=True, return_tensors="pt"),
        max_new_tokens=N, ...)`, for scripts written against it: see `generation.generate_padded`."""
        from .generation import generate_padded

        return generate_padded(self, input_ids, attention_mask, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (mean, or `sum` over tokens); labels of -100 are ignored (the
    reference's convention)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)


class BioGptForTokenClassification(BioGptPreTrainedModel):
    optional_keys = ("classifier.weight", "classifier.bias")

    def __init__(self, config: BioGptConfig) -> None:
        super().__init__()
        self.config = config
        self.biogpt = BioGptModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> BioGptOutput:
        out = self.biogpt(input_ids, attention_mask, past_key_values, use_cache, position_ids, output_hidden_states,
                          output_attentions)
        out.logits = self.classifier(out.last_hidden_state)
        if labels is not None:
            if attention_mask is not None:  # padded positions do not count
                labels = labels.masked_fill(attention_mask[:, -labels.shape[1]:] == 0, -100)
            out.loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return out


class BioGptForSequenceClassification(BioGptPreTrainedModel):
    optional_keys = ("score.weight",)

    def __init__(self, config: BioGptConfig) -> None:
        super().__init__()
        self.config = config
        self.biogpt = BioGptModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> BioGptOutput:
        """Pools at the last non-pad token of each row, so left and right padding both work."""
        out = self.biogpt(input_ids, attention_mask, past_key_values, use_cache, position_ids, output_hidden_states,
                          output_attentions)
        logits = self.score(out.last_hidden_state)
        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (index * (input_ids != self.config.pad_token_id)).argmax(-1)
        out.logits = logits[torch.arange(input_ids.shape[0], device=logits.device), last]
        if labels is not None:
            if self.config.num_labels == 1:
                out.loss = F.mse_loss(out.logits.squeeze(), labels.squeeze().to(out.logits.dtype))
            elif labels.dtype in (torch.long, torch.int):
                out.loss = F.cross_entropy(out.logits, labels.view(-1))
            else:
                out.loss = F.binary_cross_entropy_with_logits(out.logits, labels.to(out.logits.dtype))
        return out
