"""A Tracr-compiled transformer as a native Hugging Face model.

Tracr (Lindner et al. 2023) compiles a RASP program into the weights of a
transformer of its own kind: token and position embeddings added into the
residual stream, no layer norms, attention that is not causal (every
position sees every position), softmax over ``q . k / sqrt(key_size)``,
MLPs ``W2 relu(W1 x + b1) + b2``, and an unembedding that projects the
residual stream onto the program's output space (argmax over it for a
categorical program; its single value for a numerical one).

`TracrForCausalLM` computes exactly that, in PyTorch, and is a
`transformers.PreTrainedModel` with its own `TracrConfig`
(``model_type="tracr"``), registered with the Auto classes when fastedge is
imported, so that ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained``
round-trip offline. Nothing here needs Tracr or JAX: only the conversion
(`fastedge.tracr.convert`) does.

The config also carries what a user needs around the weights: the input
vocabulary in encoding order (with the BOS and PAD tokens), the output
vocabulary in decoding order (categorical) or None (numerical), the names of
the residual stream's directions, and, per writer, the RASP labels it writes
(for drawings). The module names follow GPT-2's layout (``transformer.wte``,
``transformer.wpe``, ``transformer.h``) with Llama-style projections
(``self_attn.q_proj`` ...), so that fastedge's adapter reads the per-head
weights as views.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

MODEL_TYPE = "tracr"


class TracrConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, vocab_size: int = 1, n_positions: int = 1, hidden_size: int = 1,
                 num_hidden_layers: int = 1, num_attention_heads: int = 1, head_dim: int = 1,
                 intermediate_size: int = 1, output_size: int = 1, causal: bool = False,
                 categorical_output: bool = True, input_vocab: Optional[list] = None,
                 output_vocab: Optional[list] = None, bos_token: str = "BOS",
                 pad_token: Optional[str] = None, residual_labels: Optional[list] = None,
                 writer_labels: Optional[dict] = None, program_name: str = "",
                 max_seq_len: Optional[int] = None, **kwargs):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.output_size = output_size
        self.causal = bool(causal)
        self.categorical_output = bool(categorical_output)
        self.input_vocab = list(input_vocab or [])
        self.output_vocab = None if output_vocab is None else list(output_vocab)
        self.bos_token = bos_token
        self.tracr_pad_token = pad_token
        self.residual_labels = list(residual_labels or [])
        self.writer_labels = dict(writer_labels or {})
        self.program_name = program_name
        self.max_seq_len = max_seq_len if max_seq_len is not None else n_positions - 1
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class TracrAttention(nn.Module):
    def __init__(self, config: TracrConfig):
        super().__init__()
        inner = config.num_attention_heads * config.head_dim
        self.n_heads, self.head_dim, self.causal = config.num_attention_heads, config.head_dim, config.causal
        self.q_proj = nn.Linear(config.hidden_size, inner)
        self.k_proj = nn.Linear(config.hidden_size, inner)
        self.v_proj = nn.Linear(config.hidden_size, inner)
        self.o_proj = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = (p(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        allowed = key_mask[:, None, None, :].bool()
        if self.causal:
            allowed = allowed & torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        # a query always sees itself, so that a padded row is never all -inf
        allowed = allowed | torch.eye(S, dtype=torch.bool, device=x.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = scores.softmax(-1) @ v                      # [B, H, S, d]
        return self.o_proj(attn.transpose(1, 2).reshape(B, S, -1))


class TracrMLP(nn.Module):
    def __init__(self, config: TracrConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TracrBlock(nn.Module):
    """Attention then MLP, each added to the residual stream; the norms are
    identities (Tracr compiles without layer norm), kept as modules so that
    the block has the places every other architecture has."""

    def __init__(self, config: TracrConfig):
        super().__init__()
        self.ln_1 = nn.Identity()
        self.self_attn = TracrAttention(config)
        self.ln_2 = nn.Identity()
        self.mlp = TracrMLP(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.ln_1(x), key_mask)
        return x + self.mlp(self.ln_2(x))


class TracrTransformer(nn.Module):
    def __init__(self, config: TracrConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.n_positions, config.hidden_size)
        self.h = nn.ModuleList(TracrBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = nn.Identity()


class TracrForCausalLM(PreTrainedModel):
    """The compiled program's transformer. ``logits`` [B, S, output_size] are
    the residual stream projected onto the output space: argmax decodes a
    categorical program's output (`TracrConfig.output_vocab`); a numerical
    program's value is ``logits[..., 0]``. Padding (attention_mask 0) is
    hidden from every query, so a padded batch gives each sequence the
    outputs Tracr gives it alone."""
    config_class = TracrConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["TracrBlock"]

    def __init__(self, config: TracrConfig):
        super().__init__(config)
        self.transformer = TracrTransformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.output_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        # the weights are always loaded (from Tracr or a saved model); start
        # from zeros rather than random values
        if isinstance(module, (nn.Linear, nn.Embedding)):
            with torch.no_grad():
                module.weight.zero_()
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def residual_stream(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """The residual stream after the embeddings and after each attention
        and MLP block (Tracr's ``residuals``, with the embeddings first)."""
        B, S = input_ids.shape
        key_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(position_ids)
        out = [x]
        for block in t.h:
            x = x + block.self_attn(block.ln_1(x), key_mask)
            out.append(x)
            x = x + block.mlp(block.ln_2(x))
            out.append(x)
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, **kwargs) -> CausalLMOutput:
        if input_ids.max() >= self.config.vocab_size or input_ids.min() < 0:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}) for this Tracr model, "
                             f"got {int(input_ids.min())}..{int(input_ids.max())}")
        if input_ids.shape[1] > self.config.n_positions:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens is longer than this Tracr model's "
                             f"{self.config.n_positions} positions (BOS included)")
        resid = self.residual_stream(input_ids, attention_mask, position_ids)[-1]
        return CausalLMOutput(logits=self.lm_head(self.transformer.ln_f(resid)))


def register() -> None:
    """Register TracrConfig / TracrForCausalLM with the Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    try:
        AutoConfig.register(MODEL_TYPE, TracrConfig)
    except ValueError:  # already registered
        pass
    for auto in (AutoModel, AutoModelForCausalLM):
        try:
            auto.register(TracrConfig, TracrForCausalLM)
        except ValueError:
            pass
