"""The Edge Pruning authors' formulation of the reader inputs, for benchmarks.

This is the baseline that `bench/ops.py` times fastedge against. It follows
the reads of the authors' GPT-2 model (princeton-nlp/Edge-Pruning,
`src/modeling/modeling_fpt2.py`: `FPT2Block.attn_read`, `FPT2Block.mlp_read`
and `FPT2Model.read`, with embedding nodes, so GPT-2 small has 158 writers):

* Two full writer tensors are kept, each ``[n_writers, batch, seq, hidden]``:
  ``x``, the clean writers' outputs (zero where a writer has not written
  yet), and ``corr_x``, the corrupted run's outputs. Every read runs over
  **all** writers of the model, not a prefix; writers a reader may not read
  are zeroed by a fixed 0/1 "common" mask.
* Edge masks are stored writer-major, ``[n_writers, n_heads]`` for each of
  q, k and v and ``[n_writers]`` for the MLP and the final read.
* Each kind of reader is one einsum over the clean tensor plus one over the
  corrupted tensor:
  ``in = einsum(z * common, x) + einsum((1 - z) * common, corr_x)``;
  a layer's reads are 8 einsums (q, k, v, MLP; clean and corrupted), each
  reading ``n_writers * batch * seq * hidden`` elements.

The masks are given (already sampled); sampling and the sparsity sums the
authors compute beside the reads are not part of what is timed here.
Every function returns the reader inputs as separate tensors, like the
authors' code; `bench/ops.py` concatenates them (outside the timed region)
to compare them with fastedge's ``[R, *T]`` output.

Written for this benchmark from the formulas; not a copy of the authors' code.
"""
from __future__ import annotations

import torch
from torch import Tensor


def attn_common_mask(n_writers: int, first_writer_of_layer: int, dtype=torch.float32,
                     device=None) -> Tensor:
    """``[n_writers, 1]``: 1 for the writers a layer's q/k/v heads may read
    (every writer before the layer), 0 for the rest."""
    common = torch.zeros(n_writers, 1, dtype=dtype, device=device)
    common[:first_writer_of_layer] = 1
    return common


def mlp_common_mask(n_writers: int, mlp_writer: int, dtype=torch.float32, device=None) -> Tensor:
    """``[n_writers]``: 1 for the writers a layer's MLP may read (everything
    before the MLP, including the layer's own heads), 0 for the rest."""
    common = torch.zeros(n_writers, dtype=dtype, device=device)
    common[:mlp_writer] = 1
    return common


def attn_read(x: Tensor, corr_x: Tensor, q_m: Tensor, k_m: Tensor, v_m: Tensor,
              common: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs of one layer's q, k and v heads.

    Args:
        x, corr_x: ``[n_writers, batch, seq, hidden]`` clean and corrupted writers.
        q_m, k_m, v_m: ``[n_writers, n_heads]`` edge masks (one column per head).
        common: ``[n_writers, 1]`` from `attn_common_mask`.

    Returns:
        ``(x_q, x_k, x_v)``, each ``[n_heads, batch, seq, hidden]``.
    """
    reads = []
    for m in (q_m, k_m, v_m):
        clean = torch.einsum("wbsd,wh->hbsd", x, m * common)
        corrupted = torch.einsum("wbsd,wh->hbsd", corr_x, (1 - m) * common)
        reads.append(clean + corrupted)
    return reads[0], reads[1], reads[2]


def mlp_read(x: Tensor, corr_x: Tensor, m: Tensor, common: Tensor) -> Tensor:
    """Input of one layer's MLP: ``[batch, seq, hidden]``.

    ``m`` is ``[n_writers]``; ``common`` from `mlp_common_mask`."""
    clean = torch.einsum("wbsd,w->bsd", x, m * common)
    return clean + torch.einsum("wbsd,w->bsd", corr_x, (1 - m) * common)


def final_read(x: Tensor, corr_x: Tensor, z: Tensor) -> Tensor:
    """Input of the final norm and unembedding (``resid_post``):
    ``[batch, seq, hidden]``; ``z`` is ``[n_writers]`` and every writer is read."""
    return torch.einsum("wbsd,w->bsd", x, z) + torch.einsum("wbsd,w->bsd", corr_x, 1 - z)


def layer_reads(x: Tensor, corr_x: Tensor, q_m: Tensor, k_m: Tensor, v_m: Tensor, mlp_m: Tensor,
                attn_common: Tensor, mlp_common: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every read of one layer, as the authors' block does them:
    ``(x_q, x_k, x_v, x_mlp)``."""
    x_q, x_k, x_v = attn_read(x, corr_x, q_m, k_m, v_m, attn_common)
    return x_q, x_k, x_v, mlp_read(x, corr_x, mlp_m, mlp_common)
