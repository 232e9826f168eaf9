"""A naive, float64 edge-pruned transformer forward pass: the test oracle of
fastedge (docs/CONCEPTS.md sections 1-3, written out as code).

It shares no code with fastedge (only `EdgeGraph`, for the names and order of
writers and readers) and does not call the Hugging Face modules' forward: it
reads the weight tensors and config values of the model and computes every
step straight from the math, in float64.

The design is deliberately the naive one of the Edge Pruning authors:

1. Run the FULL, unmasked model on the corrupted input and keep every writer's
   output `y~_w` (or zeros for the zero ablation, or given means).
2. Run the clean input with masks. Keep every writer's masked output
   `y'_w = s_w * y_w + (1 - s_w) * y~_w`. Each reader `r` builds its own input
   from a FULL stack of clean writer outputs and a FULL stack of corrupted ones:

       in_r = sum over w -> r of [ z_wr * y'_w + (1 - z_wr) * y~_w ]

   (one einsum per reader), then applies its own copy of what the model does at
   its place: the layer norm and its own head's slice of the q/k/v projection
   for attention readers, the MLP's norm and MLP for `m{l}`, the final norm and
   unembedding for `resid_post`.

Step 1 is step 2 with every mask 1 (then the corrupted stack does not matter),
so both runs go through the same code.

Everything is differentiable in the masks (no in-place writes into tensors
autograd saves), so gradients of the oracle can be compared too.

Supported: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, GPTNeoXForCausalLM (model types gpt2, llama, mistral, qwen2,
gpt_neox), default rotary embeddings only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

F64 = torch.float64


# -----------------------------------------------------------------------------
# Positions and attention masks
# -----------------------------------------------------------------------------

def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding: `cumsum(attention_mask) - 1`, clamped at 0.

    Left padding `[0, 0, 1, 1, 1]` gives `[0, 0, 0, 1, 2]`; right padding
    `[1, 1, 1, 0, 0]` gives `[0, 1, 2, 2, 2]`. Pass the same `position_ids` to a
    Hugging Face model to get the same positions there.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def allowed_keys(attention_mask: torch.Tensor, seq_len: int,
                 sliding_window: Optional[int] = None) -> torch.Tensor:
    """[B, S, S] bool: may query i attend to key j? Causal (j <= i), key not
    padding, and within the sliding window (i - j < window) if there is one."""
    i = torch.arange(seq_len).view(-1, 1)
    j = torch.arange(seq_len).view(1, -1)
    allowed = j <= i
    if sliding_window is not None:
        allowed = allowed & (i - j < sliding_window)
    return allowed.unsqueeze(0) & attention_mask.bool().unsqueeze(1)


# -----------------------------------------------------------------------------
# The math of the pieces (float64, no Hugging Face modules)
# -----------------------------------------------------------------------------

def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)      # biased variance
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * weight


def _gelu(x):                      # exact, with erf
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):                 # GPT-2's "gelu_new"
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x * torch.sigmoid(x)


_ACTIVATIONS = {
    "gelu": _gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,        # the same formula, written differently
    "silu": _silu,
    "swish": _silu,
    "relu": torch.relu,
}


def activation(name: str) -> Callable:
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    from transformers.activations import ACT2FN   # anything else: the library's function
    return ACT2FN[name]


def rotary(x, positions, inv_freq):
    """Rotary embedding on the first `2 * len(inv_freq)` features of x [B, S, d]
    (GPT-NeoX / Llama "rotate half" convention); the rest pass through."""
    rot_dim = 2 * inv_freq.shape[0]
    angles = positions.to(F64).unsqueeze(-1) * inv_freq          # [B, S, rot_dim / 2]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot[..., : rot_dim // 2], x_rot[..., rot_dim // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def attention_head(q, k, v, allowed, scale):
    """One head: q, k, v [B, S, d]; allowed [B, S, S]. Rows with no allowed key
    (padded queries under left padding) give zeros, not NaN."""
    scores = torch.einsum("bid,bjd->bij", q, k) * scale
    empty_row = ~allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    return torch.einsum("bij,bjd->bid", probs, v)


def linear(x, weight, bias=None):
    """x @ weight (+ bias); weight is [in, out]."""
    y = x @ weight
    return y if bias is None else y + bias


# -----------------------------------------------------------------------------
# The model, read into one float64 layout
# -----------------------------------------------------------------------------

@dataclass
class Layer:
    attn_norm: Callable              # the layer's input norm (what q/k/v readers apply)
    mlp_norm: Callable               # the norm before the MLP (what the m{l} reader applies)
    W_Q: torch.Tensor                # [H, D, d]    head i's slice of the query projection
    b_Q: Optional[torch.Tensor]      # [H, d]
    W_K: torch.Tensor                # [H_kv, D, d]
    b_K: Optional[torch.Tensor]      # [H_kv, d]
    W_V: torch.Tensor                # [H_kv, D, d]
    b_V: Optional[torch.Tensor]      # [H_kv, d]
    W_O: torch.Tensor                # [H, d, D]    head i's slice of the output projection
    b_O: Optional[torch.Tensor]      # [D]          split evenly over the heads
    mlp: Callable                    # [.., D] -> [.., D]
    attn_scale: float
    sliding_window: Optional[int] = None

    def __post_init__(self):
        # contiguous copies: a float64 matmul with a transposed (strided) weight
        # can be orders of magnitude slower on CPU
        for name in ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.contiguous())


@dataclass
class Model:
    model_type: str
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    embed: Callable                  # (input_ids, position_ids) -> list of embedding writer outputs
    embedding_names: tuple
    layers: list
    final: Callable                  # residual [.., D] -> logits [.., V]
    inv_freq: Optional[torch.Tensor]  # rotary frequencies, None for learned positions
    parallel: bool


def _w(t):
    return t.detach().to(F64)


def _wT(linear_module):
    """An nn.Linear's weight as [in, out] (nn.Linear computes x @ weight.T + bias)."""
    return _w(linear_module.weight).T.contiguous()


def _b(module):
    return None if getattr(module, "bias", None) is None else _w(module.bias)


def _heads_in(weight_in_out, n, d):
    """[D, n * d] (input, output) -> [n, D, d]: head h takes output columns h*d:(h+1)*d."""
    D = weight_in_out.shape[0]
    return weight_in_out.reshape(D, n, d).permute(1, 0, 2).contiguous()


def _heads_bias(bias, n, d):
    return None if bias is None else bias.reshape(n, d)


def _heads_out(weight_in_out, n, d):
    """[n * d, D] (input, output) -> [n, d, D]: head h owns input rows h*d:(h+1)*d."""
    return weight_in_out.reshape(n, d, weight_in_out.shape[1])


def _unembed(model):
    head = model.get_output_embeddings()
    W, b = _wT(head), _b(head)
    return lambda x: linear(x, W, b)


def _rope_params(config):
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"naive oracle: only default rotary embeddings, got {rope_type!r}")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None)
                     or getattr(config, "rotary_emb_base", None) or 10000.0)
    return float(theta), rope


def _inv_freq(theta, rot_dim):
    return 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=F64) / rot_dim)


def _read_gpt2(model) -> Model:
    # (config.reorder_and_upcast_attn only changes rounding, not the math)
    cfg = model.config
    D, H = cfg.hidden_size, cfg.num_attention_heads
    d = D // H
    eps = cfg.layer_norm_epsilon
    act = activation(cfg.activation_function)
    tr = model.transformer
    wte, wpe = _w(tr.wte.weight), _w(tr.wpe.weight)

    def norm_of(ln):
        w, b = _w(ln.weight), _w(ln.bias)
        return lambda x: layer_norm(x, w, b, eps)

    layers = []
    for l, block in enumerate(tr.h):
        c_attn = _w(block.attn.c_attn.weight)          # Conv1D: [D, 3D], y = x @ W + b
        c_attn_b = _w(block.attn.c_attn.bias)
        Wq, Wk, Wv = c_attn[:, :D], c_attn[:, D:2 * D], c_attn[:, 2 * D:]
        bq, bk, bv = c_attn_b[:D], c_attn_b[D:2 * D], c_attn_b[2 * D:]
        scale = d ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(l + 1)
        fc_w, fc_b = _w(block.mlp.c_fc.weight), _w(block.mlp.c_fc.bias)
        pr_w, pr_b = _w(block.mlp.c_proj.weight), _w(block.mlp.c_proj.bias)
        layers.append(Layer(
            attn_norm=norm_of(block.ln_1), mlp_norm=norm_of(block.ln_2),
            W_Q=_heads_in(Wq, H, d), b_Q=_heads_bias(bq, H, d),
            W_K=_heads_in(Wk, H, d), b_K=_heads_bias(bk, H, d),
            W_V=_heads_in(Wv, H, d), b_V=_heads_bias(bv, H, d),
            W_O=_heads_out(_w(block.attn.c_proj.weight), H, d), b_O=_w(block.attn.c_proj.bias),
            mlp=lambda x, fc_w=fc_w, fc_b=fc_b, pr_w=pr_w, pr_b=pr_b: linear(act(linear(x, fc_w, fc_b)), pr_w, pr_b),
            attn_scale=scale))
    final_norm, unembed = norm_of(tr.ln_f), _unembed(model)
    return Model(
        model_type="gpt2", n_heads=H, n_kv_heads=H, head_dim=d, hidden=D,
        embed=lambda ids, pos: [wte[ids], wpe[pos]], embedding_names=("tok_embeds", "pos_embeds"),
        layers=layers, final=lambda x: unembed(final_norm(x)), inv_freq=None, parallel=False)


def _read_llama_like(model) -> Model:
    """Llama, Mistral, Qwen2: RMSNorm, separate q/k/v projections (Qwen2: with
    biases), grouped k/v heads, gated MLP, full rotary."""
    cfg = model.config
    D, H = cfg.hidden_size, cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", None) or H
    d = getattr(cfg, "head_dim", None) or D // H
    eps = cfg.rms_norm_eps
    act = activation(cfg.hidden_act)
    theta, _ = _rope_params(cfg)
    inner = model.model
    emb = _w(inner.embed_tokens.weight)

    def norm_of(n):
        w = _w(n.weight)
        return lambda x: rms_norm(x, w, eps)

    def window(l):
        if cfg.model_type == "mistral":
            return getattr(cfg, "sliding_window", None)
        if cfg.model_type == "qwen2":
            types = getattr(cfg, "layer_types", None)
            if types is not None and types[l] == "sliding_attention":
                return cfg.sliding_window
        return None

    layers = []
    for l, block in enumerate(inner.layers):
        at, mlp = block.self_attn, block.mlp
        gate_w, gate_b = _wT(mlp.gate_proj), _b(mlp.gate_proj)
        up_w, up_b = _wT(mlp.up_proj), _b(mlp.up_proj)
        down_w, down_b = _wT(mlp.down_proj), _b(mlp.down_proj)

        def gated_mlp(x, gate_w=gate_w, gate_b=gate_b, up_w=up_w, up_b=up_b, down_w=down_w, down_b=down_b):
            return linear(act(linear(x, gate_w, gate_b)) * linear(x, up_w, up_b), down_w, down_b)

        layers.append(Layer(
            attn_norm=norm_of(block.input_layernorm), mlp_norm=norm_of(block.post_attention_layernorm),
            W_Q=_heads_in(_wT(at.q_proj), H, d), b_Q=_heads_bias(_b(at.q_proj), H, d),
            W_K=_heads_in(_wT(at.k_proj), H_kv, d), b_K=_heads_bias(_b(at.k_proj), H_kv, d),
            W_V=_heads_in(_wT(at.v_proj), H_kv, d), b_V=_heads_bias(_b(at.v_proj), H_kv, d),
            W_O=_heads_out(_wT(at.o_proj), H, d), b_O=_b(at.o_proj),
            mlp=gated_mlp, attn_scale=d ** -0.5, sliding_window=window(l)))
    final_norm, unembed = norm_of(inner.norm), _unembed(model)
    return Model(
        model_type=cfg.model_type, n_heads=H, n_kv_heads=H_kv, head_dim=d, hidden=D,
        embed=lambda ids, pos: [emb[ids]], embedding_names=("embeds",),
        layers=layers, final=lambda x: unembed(final_norm(x)), inv_freq=_inv_freq(theta, d), parallel=False)


def _read_gpt_neox(model) -> Model:
    """GPT-NeoX: LayerNorm, one fused query_key_value projection whose output is
    laid out head by head ([q_h | k_h | v_h] for h = 0..H-1), partial rotary,
    parallel or sequential attention and MLP."""
    cfg = model.config
    D, H = cfg.hidden_size, cfg.num_attention_heads
    d = D // H
    eps = cfg.layer_norm_eps
    act = activation(cfg.hidden_act)
    theta, rope = _rope_params(cfg)
    pct = rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0))
    # frequencies 1 / theta^(2i / rot_dim) for 2i < rot_dim; with an odd
    # rot_dim (head 6 * 0.5 = 3) that is ceil(rot_dim / 2) frequencies, and
    # 2 * ceil(rot_dim / 2) features rotate, as in Hugging Face
    rot_dim = int(d * pct)
    inner = model.gpt_neox
    emb = _w(inner.embed_in.weight)

    def norm_of(ln):
        w, b = _w(ln.weight), _w(ln.bias)
        return lambda x: layer_norm(x, w, b, eps)

    layers = []
    for block in inner.layers:
        at = block.attention
        qkv_w = _wT(at.query_key_value).reshape(D, H, 3, d)    # [in, head, q/k/v, d]
        qkv_b = _b(at.query_key_value)
        qkv_b = None if qkv_b is None else qkv_b.reshape(H, 3, d)
        in_w, in_b = _wT(block.mlp.dense_h_to_4h), _b(block.mlp.dense_h_to_4h)
        out_w, out_b = _wT(block.mlp.dense_4h_to_h), _b(block.mlp.dense_4h_to_h)
        layers.append(Layer(
            attn_norm=norm_of(block.input_layernorm), mlp_norm=norm_of(block.post_attention_layernorm),
            W_Q=qkv_w[:, :, 0].permute(1, 0, 2).contiguous(), b_Q=None if qkv_b is None else qkv_b[:, 0],
            W_K=qkv_w[:, :, 1].permute(1, 0, 2).contiguous(), b_K=None if qkv_b is None else qkv_b[:, 1],
            W_V=qkv_w[:, :, 2].permute(1, 0, 2).contiguous(), b_V=None if qkv_b is None else qkv_b[:, 2],
            W_O=_heads_out(_wT(at.dense), H, d), b_O=_b(at.dense),
            mlp=lambda x, in_w=in_w, in_b=in_b, out_w=out_w, out_b=out_b: linear(act(linear(x, in_w, in_b)), out_w, out_b),
            attn_scale=d ** -0.5))
    final_norm, unembed = norm_of(inner.final_layer_norm), _unembed(model)
    return Model(
        model_type="gpt_neox", n_heads=H, n_kv_heads=H, head_dim=d, hidden=D,
        embed=lambda ids, pos: [emb[ids]], embedding_names=("embeds",),
        layers=layers, final=lambda x: unembed(final_norm(x)), inv_freq=_inv_freq(theta, rot_dim),
        parallel=bool(getattr(cfg, "use_parallel_residual", True)))


_READERS = {
    "gpt2": _read_gpt2,
    "llama": _read_llama_like,
    "mistral": _read_llama_like,
    "qwen2": _read_llama_like,
    "gpt_neox": _read_gpt_neox,
}


def read_model(model) -> Model:
    model_type = model.config.model_type
    if model_type not in _READERS:
        raise NotImplementedError(f"naive oracle: model type {model_type!r} not supported "
                                  f"({', '.join(sorted(_READERS))})")
    return _READERS[model_type](model)


def _check_graph(m: Model, graph) -> None:
    expected = dict(n_layers=len(m.layers), n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                    embeddings=tuple(m.embedding_names), parallel_blocks=m.parallel)
    got = dict(n_layers=graph.n_layers, n_heads=graph.n_heads, n_kv_heads=graph.n_kv_heads,
               embeddings=tuple(graph.embeddings), parallel_blocks=graph.parallel_blocks)
    if expected != got:
        raise ValueError(f"graph {got} does not describe the model {expected}")


def _writer_place(name):
    """(layer, part) of a writer: embeddings (-1, "embed"), a{l}.h{i} (l, "attn"), m{l} (l, "mlp")."""
    if name.startswith("a") and ".h" in name:
        return int(name[1:name.index(".")]), "attn"
    if name.startswith("m") and name[1:].isdigit():
        return int(name[1:]), "mlp"
    return -1, "embed"


def upstream_writers(m: Model, graph, reader: str) -> torch.Tensor:
    """[n_writers] float64, 1 where writer w -> reader is an edge (docs/CONCEPTS.md section
    1), from the names alone: q/k/v readers of layer l read every writer of an
    earlier layer and the embeddings; m{l} also reads layer l's heads in a
    sequential block; resid_post reads everything. Checked against the graph's
    prefixes, which must say the same."""
    places = [_writer_place(w) for w in graph.writers]
    if reader == "resid_post":
        up = [True] * len(places)
    elif reader.startswith("m"):
        l = int(reader[1:])
        up = [k < l or (k == l and part == "attn" and not m.parallel) for k, part in places]
    else:
        l = int(reader[1:reader.index(".")])
        up = [k < l for k, _ in places]
    up = torch.tensor(up, dtype=F64)
    prefix = graph.reader_prefix[graph.reader_index[reader]]
    if not torch.equal(up, (torch.arange(len(places)) < prefix).to(F64)):
        raise ValueError(f"graph prefix {prefix} of reader {reader} disagrees with the edge rule")
    return up


# -----------------------------------------------------------------------------
# The edge-masked forward pass
# -----------------------------------------------------------------------------

def _masked_run(m: Model, graph, input_ids, attention_mask, position_ids,
                edge_mask, node_mask, corrupted, override=None, offsets=None):
    """One run of the clean input with masks, against the corrupted writer
    outputs `corrupted` [W, B, S, D]. Returns (logits, writer outputs y_w
    [W, B, S, D] before node masking).

    For attribution references: `override(name, y)` replaces writer
    `name`'s output (return `y` to keep it); `offsets[reader]` ([B, S, D]) is
    added to that reader's input, so that its gradient is the gradient at
    the reader's input."""
    B, S = input_ids.shape
    D, H, H_kv, d = m.hidden, m.n_heads, m.n_kv_heads, m.head_dim
    n_w = graph.n_writers
    group_size = H // H_kv
    zeros = torch.zeros(B, S, D, dtype=F64)

    outputs = []      # y_w, in writer order
    masked = []       # y'_w = s_w * y_w + (1 - s_w) * y~_w

    def write(name, y):
        if override is not None:
            y = override(name, y)
        w = graph.writer_index[name]
        assert w == len(outputs), f"writer {name} computed out of order"
        outputs.append(y)
        masked.append(node_mask[w] * y + (1 - node_mask[w]) * corrupted[w])

    def reader_input(name):
        """in_r = sum over w -> r of [z_wr * y'_w + (1 - z_wr) * y~_w], with the
        FULL stacks (writers not upstream of r, not computed yet, count as 0)."""
        r = graph.reader_index[name]
        upstream = upstream_writers(m, graph, name)
        z = edge_mask[r] * upstream
        clean_stack = torch.stack(masked + [zeros] * (n_w - len(masked)))
        x = (torch.einsum("w,wbsd->bsd", z, clean_stack)
             + torch.einsum("w,wbsd->bsd", (1 - edge_mask[r]) * upstream, corrupted))
        return x if offsets is None else x + offsets[name]

    for name, y in zip(m.embedding_names, m.embed(input_ids, position_ids)):
        write(name, y)

    for l, layer in enumerate(m.layers):
        allowed = allowed_keys(attention_mask, S, layer.sliding_window)

        def project(kind, head, W, b):
            x = layer.attn_norm(reader_input(f"a{l}.h{head}.{kind}"))
            y = linear(x, W[head], None if b is None else b[head])
            if m.inv_freq is not None and kind in ("q", "k"):
                y = rotary(y, position_ids, m.inv_freq)
            return y

        qs = [project("q", i, layer.W_Q, layer.b_Q) for i in range(H)]
        ks = [project("k", j, layer.W_K, layer.b_K) for j in range(H_kv)]
        vs = [project("v", j, layer.W_V, layer.b_V) for j in range(H_kv)]
        for i in range(H):
            kv = i // group_size
            z_i = attention_head(qs[i], ks[kv], vs[kv], allowed, layer.attn_scale)
            y = z_i @ layer.W_O[i]
            if layer.b_O is not None:
                y = y + layer.b_O / H
            write(f"a{l}.h{i}", y)
        # a parallel block's m{l} reads only writers before layer l (upstream_writers)
        write(f"m{l}", layer.mlp(layer.mlp_norm(reader_input(f"m{l}"))))

    logits = m.final(reader_input("resid_post"))
    return logits, torch.stack(outputs)


def _prepare(model, graph, input_ids, attention_mask):
    m = read_model(model)
    _check_graph(m, graph)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = position_ids_from_attention_mask(attention_mask)
    return m, attention_mask, position_ids


def _unmasked_outputs(m, graph, input_ids, attention_mask, position_ids):
    B, S = input_ids.shape
    ones_e = torch.ones(graph.n_readers, graph.n_writers, dtype=F64)
    ones_n = torch.ones(graph.n_writers, dtype=F64)
    nothing = torch.zeros(graph.n_writers, B, S, m.hidden, dtype=F64)
    return _masked_run(m, graph, input_ids, attention_mask, position_ids, ones_e, ones_n, nothing)


@torch.no_grad()
def naive_writer_outputs(model, graph, input_ids, attention_mask=None) -> torch.Tensor:
    """Every writer's output [n_writers, B, S, D] (float64) when the full,
    unmasked model runs on `input_ids` (for mean ablation: average these)."""
    m, attention_mask, position_ids = _prepare(model, graph, input_ids, attention_mask)
    return _unmasked_outputs(m, graph, input_ids, attention_mask, position_ids)[1]


def naive_edge_forward(model, graph, input_ids, corrupted_input_ids, edge_mask, node_mask=None,
                       attention_mask=None, ablation="interchange", mean_outputs=None) -> torch.Tensor:
    """Logits [B, S, V] (float64) of the edge-masked model (docs/CONCEPTS.md section 2).

    edge_mask: [n_readers, n_writers], graph order; entries for non-edges
        (w >= graph.reader_prefix[r]) are ignored.
    node_mask: [n_writers] or None (all 1).
    attention_mask: [B, S], 1 for tokens and 0 for padding (left or right), or
        None. Positions skip padding (`position_ids_from_attention_mask`); the
        same mask is used for the corrupted run. Outputs at padded positions
        are finite but meaningless.
    ablation: "interchange" (corrupted writer outputs from the full model on
        `corrupted_input_ids`), "zero" (they are 0) or "mean" (`mean_outputs`,
        [n_writers, S, D] or [n_writers, D], the same for every example).
    """
    m, attention_mask, position_ids = _prepare(model, graph, input_ids, attention_mask)
    B, S = input_ids.shape
    n_w = graph.n_writers
    if tuple(edge_mask.shape) != (graph.n_readers, n_w):
        raise ValueError(f"edge_mask must be [{graph.n_readers}, {n_w}], got {tuple(edge_mask.shape)}")
    edge_mask = edge_mask.to(F64)
    node_mask = torch.ones(n_w, dtype=F64) if node_mask is None else node_mask.to(F64)

    if ablation == "interchange":
        if tuple(corrupted_input_ids.shape) != (B, S):
            raise ValueError("corrupted_input_ids must have the shape of input_ids")
        with torch.no_grad():
            corrupted = _unmasked_outputs(m, graph, corrupted_input_ids, attention_mask, position_ids)[1]
    elif ablation == "zero":
        corrupted = torch.zeros(n_w, B, S, m.hidden, dtype=F64)
    elif ablation == "mean":
        if mean_outputs is None:
            raise ValueError("mean ablation needs mean_outputs")
        mean = mean_outputs.to(F64)
        if mean.dim() == 2:                       # [W, D]: the same at every position
            mean = mean[:, None, :].expand(n_w, S, m.hidden)
        corrupted = mean[:, None].expand(n_w, B, S, m.hidden)
    else:
        raise ValueError(f"unknown ablation {ablation!r} (interchange, zero, mean)")

    logits, _ = _masked_run(m, graph, input_ids, attention_mask, position_ids,
                            edge_mask, node_mask, corrupted)
    return logits


def naive_hooked_run(model, graph, input_ids, attention_mask=None, *, override=None, offsets=None):
    """Logits [B, S, V] (float64) of the full model (every mask 1) on
    `input_ids`, with `_masked_run`'s attribution hooks: `override(name, y)`
    replaces writer outputs, `offsets[reader]` is added to reader inputs."""
    m, attention_mask, position_ids = _prepare(model, graph, input_ids, attention_mask)
    B, S = input_ids.shape
    ones_e = torch.ones(graph.n_readers, graph.n_writers, dtype=F64)
    ones_n = torch.ones(graph.n_writers, dtype=F64)
    nothing = torch.zeros(graph.n_writers, B, S, m.hidden, dtype=F64)
    return _masked_run(m, graph, input_ids, attention_mask, position_ids, ones_e, ones_n, nothing,
                       override=override, offsets=offsets)[0]
