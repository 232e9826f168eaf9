"""The Edge Pruning authors' design of a whole edge-prunable model, for benchmarks.

`bench/step.py` and `bench/memory.py` time and size one pruning step of
fastedge (`fastedge.patch`) against this model: same frozen weights, same
masks, same loss. It rebuilds the design of the authors' forked modeling
files (princeton-nlp/Edge-Pruning, `modeling_fpt2.py` and
`modeling_fllama.py`) around the reads of `bench/naive.py`:

* **A separate corrupted writer tensor.** First a forward over the corrupted
  input, under no_grad, writes every writer's corrupted output into a full
  ``corr_x = [n_writers, batch, seq, hidden]`` tensor.
* **A full writer tensor, written one-hot.** The clean run keeps
  ``x = [n_writers, batch, seq, hidden]`` (zeros where nothing has written
  yet); each write is ``x = x + onehot[:, None, None, None] * y``, a new full
  tensor, and every read (an einsum over ``x``) keeps its own version of it
  for the backward: about two full writer tensors per layer stay alive until
  the backward has passed them.
* **One einsum per kind of reader, over all writers**, clean and corrupted
  (`bench/naive.py`): ``in = einsum(z * common, x) + einsum((1 - z) * common,
  corr_x)``, where ``common`` zeroes the writers a reader may not read.
* **Masks writer-major**: ``[n_writers, n_heads]`` per layer for each of q, k
  and v, ``[n_writers]`` for each MLP and for the final read, sampled by the
  hard-concrete formula in plain PyTorch (torch.rand noise) on every forward.

Edge masks only (no node masks), interchange ablation, models with as many
k/v heads as query heads (GPT-2, CodeLlama-13B, Llama-2). `copy_masks_from`
loads an `EdgeModel`'s ``log_alpha`` values so both models prune the same
masks; with deterministic (eval) masks both compute the same logits (tested
in tests/test_bench_naive_model.py).

Written for this benchmark from the paper and the formulas; not a copy of the
authors' code.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import naive  # noqa: E402  (bench/naive.py: the reads)

from fastedge import constants, ops  # noqa: E402
from fastedge.adapters import Adapter  # noqa: E402
from fastedge.graph import EdgeGraph  # noqa: E402
from fastedge.model import (EdgeModel, _attention_mask, attention_heads,  # noqa: E402
                            position_ids_from_attention_mask)


@dataclass
class NaiveOutput:
    logits: Tensor
    edge_mask_sum: Tensor   # sum of the sampled masks over the edges that exist
    n_edges: int

    @property
    def edge_sparsity(self) -> Tensor:
        return 1 - self.edge_mask_sum / self.n_edges


class NaiveEdgeModel(nn.Module):
    """A frozen Hugging Face causal LM run the authors' way. Its parameters are
    the edge ``log_alpha``s, writer-major."""

    def __init__(self, model: nn.Module):
        super().__init__()
        adapter = Adapter(model)
        if adapter.n_kv_heads != adapter.n_heads:
            raise ValueError(f"the naive design reads one k/v input per query head; this model has "
                             f"{adapter.n_kv_heads} k/v heads for {adapter.n_heads} query heads")
        if adapter.parallel:
            raise ValueError("the naive design here covers sequential blocks only (not parallel GPT-NeoX)")
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "adapter", adapter)
        self.graph = EdgeGraph.from_config(model.config)
        model.requires_grad_(False)
        model.eval()
        W, H, L = self.graph.n_writers, adapter.n_heads, len(adapter.blocks)
        device = adapter.token_embedding.weight.device
        init = dict(device=device, dtype=torch.float32)
        self.q_log_alpha = nn.Parameter(ops.init_log_alpha(L, W, H, **init))
        self.k_log_alpha = nn.Parameter(ops.init_log_alpha(L, W, H, **init))
        self.v_log_alpha = nn.Parameter(ops.init_log_alpha(L, W, H, **init))
        self.mlp_log_alpha = nn.Parameter(ops.init_log_alpha(L, W, **init))
        self.final_log_alpha = nn.Parameter(ops.init_log_alpha(W, **init))
        # the "common" masks: which writers each layer's readers may read
        n_emb = len(self.graph.embeddings)
        attn_common, mlp_common = [], []
        for layer in range(L):
            first_head = n_emb + layer * (H + 1)
            attn_common.append(naive.attn_common_mask(W, first_head, device=device))
            mlp_common.append(naive.mlp_common_mask(W, first_head + H, device=device))
        self.register_buffer("attn_common", torch.stack(attn_common), persistent=False)  # [L, W, 1]
        self.register_buffer("mlp_common", torch.stack(mlp_common), persistent=False)    # [L, W]
        self.n_embeddings = n_emb

    # -- masks --------------------------------------------------------------------------

    def _sample(self, log_alpha: Tensor) -> Tensor:
        if not self.training:
            return ops.hard_concrete_deterministic(log_alpha)
        # the hard-concrete sample in plain PyTorch, as the authors' code draws it
        u = torch.rand_like(log_alpha).clamp(constants.EPS, 1 - constants.EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / constants.BETA)
        return (s * (constants.LIMIT_RIGHT - constants.LIMIT_LEFT) + constants.LIMIT_LEFT).clamp(0, 1)

    @torch.no_grad()
    def copy_masks_from(self, em: EdgeModel) -> None:
        """Take an EdgeModel's edge log_alphas ([R_g, W_g] per reader group)."""
        if em.graph.fingerprint() != self.graph.fingerprint():
            raise ValueError("the EdgeModel was built for another graph")
        H = self.adapter.n_heads
        for layer in range(len(self.adapter.blocks)):
            attn = em.edge_log_alpha[2 * layer]   # [3H, W_attn]: q heads, k heads, v heads
            w = attn.shape[1]
            for kind, dest in enumerate((self.q_log_alpha, self.k_log_alpha, self.v_log_alpha)):
                dest[layer, :w] = attn[kind * H:(kind + 1) * H].t().to(dest.dtype)
            mlp = em.edge_log_alpha[2 * layer + 1]  # [1, W_mlp]
            self.mlp_log_alpha[layer, :mlp.shape[1]] = mlp[0].to(self.mlp_log_alpha.dtype)
        self.final_log_alpha.copy_(em.edge_log_alpha[-1][0].to(self.final_log_alpha.dtype))

    # -- forward -------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, corrupted_input_ids: Tensor,
                attention_mask: Optional[Tensor] = None) -> NaiveOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            corr_x = self._writers(corrupted_input_ids, attention_mask, None)
        return self._writers(input_ids, attention_mask, corr_x)

    def _writers(self, input_ids, attention_mask, corr_x):
        """With corr_x None: the unmasked run, returning its full writer tensor.
        Otherwise: the masked run, returning logits and the mask sum."""
        a, g = self.adapter, self.graph
        B, S = input_ids.shape
        W, H = g.n_writers, a.n_heads
        dtype = a.token_embedding.weight.dtype
        positions = position_ids_from_attention_mask(attention_mask)
        attn_bias = _attention_mask(attention_mask)
        eye = torch.eye(W, dtype=dtype, device=input_ids.device)
        onehot = eye[:, :, None, None, None]
        head_onehot = [eye[self.n_embeddings + layer * (H + 1):][:H] for layer in range(len(a.blocks))]

        x = torch.zeros((W, B, S, a.hidden_size), dtype=dtype, device=input_ids.device)
        embeds = a.embed(input_ids, positions)
        for w, y in enumerate(embeds):
            x = x + onehot[w] * y
        cos_sin = a.rotary_cos_sin(embeds[0], positions)
        masked = corr_x is not None
        mask_sum = torch.zeros((), device=input_ids.device)
        for layer in range(len(a.blocks)):
            first_head = self.n_embeddings + layer * (H + 1)
            common = self.attn_common[layer].to(dtype)
            if masked:
                zq, zk, zv = (self._sample(p[layer]) for p in (self.q_log_alpha, self.k_log_alpha,
                                                               self.v_log_alpha))
                mask_sum = mask_sum + sum((z * self.attn_common[layer]).sum() for z in (zq, zk, zv))
                xq, xk, xv = naive.attn_read(x, corr_x, zq.to(dtype), zk.to(dtype), zv.to(dtype), common)
            else:
                plain = x.sum(0)[None].expand(H, -1, -1, -1)
                xq = xk = xv = plain
            norm = lambda t: a.attn_norm(layer, t)  # noqa: E731
            heads = attention_heads(a, layer, norm(xq), norm(xk), norm(xv), cos_sin, attn_bias)
            # the heads' one-hot write: a new full writer tensor
            x = x + torch.einsum("hbsd,hw->wbsd", heads, head_onehot[layer])
            mlp_common = self.mlp_common[layer].to(dtype)
            if masked:
                zm = self._sample(self.mlp_log_alpha[layer])
                mask_sum = mask_sum + (zm * self.mlp_common[layer]).sum()
                x_mlp = naive.mlp_read(x, corr_x, zm.to(dtype), mlp_common)
            else:
                x_mlp = x.sum(0)
            y = a.mlp(layer, a.mlp_norm(layer, x_mlp))
            x = x + onehot[first_head + H] * y
        if not masked:
            return x
        zf = self._sample(self.final_log_alpha)
        mask_sum = mask_sum + zf.sum()
        logits = a.unembed(naive.final_read(x, corr_x, zf.to(dtype)))
        return NaiveOutput(logits=logits, edge_mask_sum=mask_sum, n_edges=g.n_edges)
