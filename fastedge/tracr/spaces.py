"""Which residual dimensions each writer of a Tracr model writes and each
reader reads, from the weights alone (float64), and the weight-composition
edges where the two meet.

Tracr lays every RASP value out on its own named residual directions, so
"writer w can change what reader r computes" is a question of supports: the
edge ``w -> r`` is in the weight-composition circuit when some dimension
that `w` writes with a nonzero weight is read by `r` with a nonzero weight.

Conventions: residual vectors are rows (``q = x @ W_Q``), so for head ``h``
``W_Q[h]``, ``W_K[h]``, ``W_V[h]`` are ``[D, d]`` and ``W_O[h]`` is ``[d, D]``
(PyTorch's ``q_proj.weight`` is ``W_Q^T``); an MLP is
``W2 relu(W1 x + b1) + b2`` with ``fc1.weight`` ``[hidden, D]``.

"Nonzero" for a product of weights: float32 weights multiplied in float64
have exact products, but their sums round, so an entry whose exact value is 0
can come out as a few ulps. An entry counts as nonzero when it exceeds the
rounding bound of its dot product, ``n * 2**-53 * sum_k |a_ik| |b_kj|``
(times 4 for margin); an exact zero stays zero, and a true entry that small
(none in Tracr's weights, whose entries are O(1) to O(100)) could not change
any output either.
"""
from __future__ import annotations

import numpy as np
import torch

from fastedge.graph import EdgeGraph
from fastedge.tracr.modeling import TracrForCausalLM

_UNIT_ROUNDOFF = 2.0 ** -53
_MARGIN = 4.0


def product_support(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bool ``[m, n]``: where ``a @ b`` (``[m, k] @ [k, n]``, computed in
    float64) is nonzero beyond its rounding bound."""
    a, b = a.detach().double(), b.detach().double()
    value = a @ b
    bound = _MARGIN * a.shape[1] * _UNIT_ROUNDOFF * (a.abs() @ b.abs())
    return value.abs() > bound


def _heads(model: TracrForCausalLM, layer: int):
    """Per-head ``W_Q, W_K, W_V`` ``[H, D, d]``, ``W_O`` ``[H, d, D]`` and the
    q/v biases ``[H, d]`` of one layer, in float64."""
    cfg = model.config
    H, d = cfg.num_attention_heads, cfg.head_dim
    att = model.transformer.h[layer].self_attn

    def per_head(linear):
        return linear.weight.detach().double().view(H, d, -1).transpose(1, 2)

    wo = att.o_proj.weight.detach().double().t().reshape(H, d, -1)
    bq = att.q_proj.bias.detach().double().view(H, d)
    return per_head(att.q_proj), per_head(att.k_proj), per_head(att.v_proj), wo, bq


def write_dims(model: TracrForCausalLM) -> dict[str, np.ndarray]:
    """Per writer (the names of docs/CONCEPTS.md), the residual dimensions it writes with a
    nonzero weight: `fastedge.tracr.convert.writer_output_dims`."""
    from fastedge.tracr.convert import writer_output_dims
    return writer_output_dims(model)


def read_dims(model: TracrForCausalLM, writes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per reader (the names of docs/CONCEPTS.md), the residual dimensions whose value can change
    what the reader computes.

    * ``a{l}.h{i}.q`` and ``.k``: the head's attention pattern is
      ``softmax_k(s_qk)`` with ``s_qk = (x_q W_Q + b_Q)(x_k W_K + b_K)^T``
      ``= x_q W_QK x_k^T + x_q W_Q b_K^T + b_Q W_K^T x_k^T + b_Q b_K^T``
      (``W_QK = W_Q W_K^T``, ``[D, D]``, rows on the query side). The softmax
      over keys ignores anything that is the same for every key of a query:
      the ``x_q W_Q b_K`` and ``b_Q b_K`` terms change nothing. So the query
      side reads the rows of ``W_QK`` only (not the rows of ``W_Q``: a
      direction of ``W_Q``'s image orthogonal to every key direction is
      invisible), and the key side reads the columns of ``W_QK`` plus where
      ``W_K b_Q`` is nonzero (a key term the query bias alone brings).
      A row ``i`` of ``W_QK`` only matters through columns where the key can
      be nonzero, and the key input is a sum of writers upstream of the
      layer, so rows and columns are taken against the dimensions those
      writers write (and symmetrically for the key side).
    * ``a{l}.h{i}.v``: the head's output is ``attn (x_v W_V + b_V) W_O``;
      ``x_v`` matters through the nonzero rows of ``W_OV = W_V W_O`` (a
      dimension ``W_V`` reads but ``W_O`` cancels does not), and ``b_V``
      reads nothing (attention rows sum to 1: it adds ``b_V W_O``).
    * ``m{l}``: ``W1``'s nonzero columns over the hidden units whose ``W2``
      column is nonzero (a unit nothing reads out does not matter; ``b1``
      reads nothing).
    * ``resid_post``: the unembedding's nonzero columns (the output space).
    """
    cfg, t = model.config, model.transformer
    D = cfg.hidden_size
    written = torch.zeros(D, dtype=torch.bool)
    for name in ("tok_embeds", "pos_embeds"):
        written[torch.as_tensor(writes[name], dtype=torch.long)] = True
    reads = {}
    for layer, block in enumerate(t.h):
        upstream = written.clone()      # what the layer's q/k/v inputs can hold
        wq, wk, wv, wo, bq = _heads(model, layer)
        for h in range(cfg.num_attention_heads):
            qk = product_support(wq[h], wk[h].t())                     # [D query, D key]
            q = (qk & upstream[None, :]).any(1)
            k = (qk & upstream[:, None]).any(0) | product_support(wk[h], bq[h][:, None])[:, 0]
            v = product_support(wv[h], wo[h]).any(1)
            for suffix, dims in (("q", q), ("k", k), ("v", v)):
                reads[f"a{layer}.h{h}.{suffix}"] = np.flatnonzero(dims.numpy())
            written[torch.as_tensor(writes[f"a{layer}.h{h}"], dtype=torch.long)] = True
        fc1 = block.mlp.fc1.weight.detach().double()                 # [hidden, D]
        live = (block.mlp.fc2.weight.detach() != 0).any(0)            # hidden units read out
        reads[f"m{layer}"] = np.flatnonzero((fc1[live] != 0).any(0).numpy())
        written[torch.as_tensor(writes[f"m{layer}"], dtype=torch.long)] = True
    reads["resid_post"] = np.flatnonzero((model.lm_head.weight.detach() != 0).any(0).numpy())
    return reads


def composition_edges(graph: EdgeGraph, writes: dict[str, np.ndarray],
                      reads: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """The edges of `graph` (in graph order) whose writer's dimensions meet
    their reader's."""
    missing = [n for n in graph.writers if n not in writes] + [n for n in graph.readers if n not in reads]
    if missing:
        raise ValueError(f"no residual dimensions for {missing}: the spaces are not this graph's")
    return [(w, r) for w, r in graph.edges() if np.intersect1d(writes[w], reads[r]).size]
