"""Per-architecture adapters: where each piece of a Hugging Face model lives
and how its weights are laid out, as data plus a few lines of code each.

An adapter never copies a weight: per-head projection weights are *views* of
the model's own parameters, reshaped so that head `i` is row `i`:

* ``q_weight`` ``[Hq, d, D]``, ``k_weight`` / ``v_weight`` ``[Hkv, d, D]``
  (input dimension last, so ``q_i = x @ q_weight[i].T``), biases ``[H, d]``;
* ``o_weight`` ``[H, d, D]`` (head ``i``'s slice of the output projection,
  ``y_i = attn_i @ o_weight[i]``), bias ``[D]`` or None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from fastedge.architectures import SUPPORTED_MODEL_TYPES, UnsupportedArchitectureError


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class NormSpec:
    """How a block's norm module computes, for the fused reader norm
    (`fastedge.ops.fused_norm`): its kind (``rms``: Hugging Face's RMSNorm;
    ``layer``: `nn.LayerNorm`), the class it must be (a norm replaced by
    another implementation is not recognised, and the module runs as it is),
    and the attributes that hold its epsilon, weight and bias."""
    kind: str
    module_class: str
    eps: str
    weight: str = "weight"
    bias: Optional[str] = None


@dataclass(frozen=True)
class NormParams:
    """One norm module's parameters, read from the module (never copied)."""
    kind: str
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    eps: float


@dataclass(frozen=True)
class ArchSpec:
    """Where things live, relative to the causal-LM module."""
    model_type: str
    layers: str                 # the ModuleList of blocks
    token_embedding: str
    position_embedding: Optional[str]   # learned absolute positions (GPT-2), else None
    final_norm: str
    attn_norm: str              # relative to a block
    mlp_norm: str
    mlp: str
    rotary: Optional[str]       # the model's rotary embedding module, if rotary
    qkv: Callable               # block -> (q_w, q_b, k_w, k_b, v_w, v_b) views
    out: Callable               # block -> (o_w, o_b)
    norm: Optional[NormSpec] = None  # the attention norm's kind, for the fused reader norm


def _split_heads(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Linear weight [H*d, D] -> [H, d, D] (a view)."""
    return weight.view(n_heads, -1, weight.shape[-1])


def _bias_heads(bias: Optional[torch.Tensor], n_heads: int) -> Optional[torch.Tensor]:
    return None if bias is None else bias.view(n_heads, -1)


def _llama_qkv(block, cfg):
    att = block.self_attn
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    return (_split_heads(att.q_proj.weight, hq), _bias_heads(att.q_proj.bias, hq),
            _split_heads(att.k_proj.weight, hkv), _bias_heads(att.k_proj.bias, hkv),
            _split_heads(att.v_proj.weight, hkv), _bias_heads(att.v_proj.bias, hkv))


def _llama_out(block, cfg):
    o = block.self_attn.o_proj  # weight [D, H*d]
    w = o.weight.view(o.weight.shape[0], cfg.num_attention_heads, -1).permute(1, 2, 0)
    return w, o.bias


def _gpt2_qkv(block, cfg):
    c = block.attn.c_attn  # Conv1D: weight [D, 3D] (input first), columns [q | k | v]
    D, H = c.weight.shape[0], cfg.n_head
    w = c.weight.view(D, 3, H, D // H).permute(1, 2, 3, 0)  # [3, H, d, D]
    b = c.bias.view(3, H, D // H)
    return w[0], b[0], w[1], b[1], w[2], b[2]


def _gpt2_out(block, cfg):
    c = block.attn.c_proj  # Conv1D: weight [H*d, D]
    return c.weight.view(cfg.n_head, -1, c.weight.shape[1]), c.bias


def _neox_qkv(block, cfg):
    lin = block.attention.query_key_value  # weight [H*3*d, D], per head [q | k | v]
    H = cfg.num_attention_heads
    w = lin.weight.view(H, 3, -1, lin.weight.shape[-1])
    b = None if lin.bias is None else lin.bias.view(H, 3, -1)
    pick = (lambda t, i: None if t is None else t[:, i])
    return w[:, 0], pick(b, 0), w[:, 1], pick(b, 1), w[:, 2], pick(b, 2)


def _neox_out(block, cfg):
    d = block.attention.dense
    return d.weight.view(d.weight.shape[0], cfg.num_attention_heads, -1).permute(1, 2, 0), d.bias


_LAYER_NORM = NormSpec("layer", module_class="LayerNorm", eps="eps", bias="bias")


def _rms_norm(prefix: str) -> NormSpec:
    return NormSpec("rms", module_class=f"{prefix}RMSNorm", eps="variance_epsilon")


_LLAMA_LIKE = dict(layers="model.layers", token_embedding="model.embed_tokens",
                   position_embedding=None, final_norm="model.norm",
                   attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", mlp="mlp",
                   rotary="model.rotary_emb", qkv=_llama_qkv, out=_llama_out)

SPECS = {
    "gpt2": ArchSpec("gpt2", layers="transformer.h", token_embedding="transformer.wte",
                     position_embedding="transformer.wpe", final_norm="transformer.ln_f",
                     attn_norm="ln_1", mlp_norm="ln_2", mlp="mlp", rotary=None,
                     qkv=_gpt2_qkv, out=_gpt2_out, norm=_LAYER_NORM),
    "llama": ArchSpec("llama", **_LLAMA_LIKE, norm=_rms_norm("Llama")),
    "mistral": ArchSpec("mistral", **_LLAMA_LIKE, norm=_rms_norm("Mistral")),
    "qwen2": ArchSpec("qwen2", **_LLAMA_LIKE, norm=_rms_norm("Qwen2")),
    # fastedge.tracr.TracrForCausalLM: GPT-2's places, Llama's projections,
    # identity norms (no NormSpec: the module runs), attention not causal
    "tracr": ArchSpec("tracr", layers="transformer.h", token_embedding="transformer.wte",
                      position_embedding="transformer.wpe", final_norm="transformer.ln_f",
                      attn_norm="ln_1", mlp_norm="ln_2", mlp="mlp", rotary=None,
                      qkv=_llama_qkv, out=_llama_out),
    "gpt_neox": ArchSpec("gpt_neox", layers="gpt_neox.layers", token_embedding="gpt_neox.embed_in",
                         position_embedding=None, final_norm="gpt_neox.final_layer_norm",
                         attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                         mlp="mlp", rotary="gpt_neox.rotary_emb", qkv=_neox_qkv, out=_neox_out,
                         norm=_LAYER_NORM),
}
assert tuple(sorted(SPECS)) == SUPPORTED_MODEL_TYPES


def input_limits(model: nn.Module) -> tuple[int, Optional[int]]:
    """(token ids the model's embedding holds, positions its learned position
    embedding holds; None for rotary positions, which have no table)."""
    a = Adapter(model)
    positions = a.position_embedding.num_embeddings if a.position_embedding is not None else None
    return a.token_embedding.num_embeddings, positions


class Adapter:
    """A model and its ArchSpec: the pieces the edge model calls."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SPECS:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} (model type {model_type!r}) is not supported; supported "
                f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if not hasattr(model, "lm_head"):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no lm_head: pass the causal-LM model "
                f"(for example GPT2LMHeadModel, LlamaForCausalLM), not the bare backbone")
        self.model, self.config, self.spec = model, config, SPECS[model_type]
        self._check_supported_options()
        self.blocks = list(_attr(model, self.spec.layers))
        self.token_embedding = _attr(model, self.spec.token_embedding)
        self.position_embedding = (_attr(model, self.spec.position_embedding)
                                   if self.spec.position_embedding else None)
        self.final_norm = _attr(model, self.spec.final_norm)
        self.rotary = _attr(model, self.spec.rotary) if self.spec.rotary else None
        self.lm_head = model.lm_head
        from fastedge.sharding import gathered
        with gathered(self.blocks[0]):  # an FSDP-sharded block: its whole weights, for their shapes
            q_w = self.spec.qkv(self.blocks[0], config)[0]
            self.head_dim = q_w.shape[1]
            self.hidden_size = q_w.shape[2]
            self.n_heads = q_w.shape[0]
            self.n_kv_heads = self.spec.qkv(self.blocks[0], config)[2].shape[0]
        self.scale = self.head_dim ** -0.5
        self.parallel = model_type == "gpt_neox" and bool(getattr(config, "use_parallel_residual", True))
        # every causal LM masks later positions; a Tracr model compiled
        # without `causal` lets every position see every position
        self.causal = bool(getattr(config, "causal", True)) if model_type == "tracr" else True

    def _check_supported_options(self):
        c, t = self.config, self.config.model_type
        if t == "gpt2" and getattr(c, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedArchitectureError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
        if t == "gpt2" and getattr(c, "reorder_and_upcast_attn", False):
            raise UnsupportedArchitectureError("GPT-2 with reorder_and_upcast_attn is not supported")
        if t in ("gpt2",) and not getattr(c, "scale_attn_weights", True):
            raise UnsupportedArchitectureError("GPT-2 with scale_attn_weights=False is not supported")

    # pieces -------------------------------------------------------------------
    def embed(self, input_ids, position_ids) -> list[torch.Tensor]:
        """The embedding writers' outputs, each [B, S, D]."""
        outs = [self.token_embedding(input_ids)]
        if self.position_embedding is not None:
            outs.append(self.position_embedding(position_ids))
        return outs

    def attn_norm(self, layer: int, x):
        return _attr(self.blocks[layer], self.spec.attn_norm)(x)

    def attn_norm_module(self, layer: int) -> nn.Module:
        return _attr(self.blocks[layer], self.spec.attn_norm)

    def attn_norm_params(self, layer: int) -> Optional[NormParams]:
        """The attention norm's kind, weight, bias and epsilon when it is the
        module the architecture's `NormSpec` describes; None otherwise (then
        only the module itself can run it)."""
        spec = self.spec.norm
        module = self.attn_norm_module(layer)
        if spec is None or type(module).__name__ != spec.module_class:
            return None
        weight = getattr(module, spec.weight, None)
        bias = getattr(module, spec.bias, None) if spec.bias else None
        eps = getattr(module, spec.eps, None)
        if not isinstance(weight, torch.Tensor) or not isinstance(eps, (int, float)):
            return None  # e.g. a LayerNorm without elementwise_affine
        if spec.kind == "layer" and tuple(getattr(module, "normalized_shape", ())) != tuple(weight.shape):
            return None
        return NormParams(spec.kind, weight, bias if isinstance(bias, torch.Tensor) else None, float(eps))

    def mlp_norm(self, layer: int, x):
        return _attr(self.blocks[layer], self.spec.mlp_norm)(x)

    def mlp(self, layer: int, x):
        return _attr(self.blocks[layer], self.spec.mlp)(x)

    def qkv(self, layer: int):
        return self.spec.qkv(self.blocks[layer], self.config)

    def out(self, layer: int):
        return self.spec.out(self.blocks[layer], self.config)

    def sliding_window(self, layer: int) -> Optional[int]:
        """Keys a query may see in `layer` (i - j < window), or None for all.
        Mistral windows every layer; Qwen2 the layers its `layer_types` mark."""
        c = self.config
        if c.model_type == "mistral":
            return getattr(c, "sliding_window", None)
        if c.model_type == "qwen2":
            types = getattr(c, "layer_types", None)
            if types is not None and types[layer] == "sliding_attention":
                return c.sliding_window
        return None

    def rotary_cos_sin(self, x, position_ids):
        if self.rotary is None:
            return None
        return self.rotary(x, position_ids)

    def unembed(self, x):
        return self.lm_head(self.final_norm(x))
