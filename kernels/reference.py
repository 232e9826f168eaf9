"""Plain-PyTorch reference of fastedge's ops, written for clarity.

Masked writer sum: one einsum per reader. Hard concrete: the formulas of
docs/CONCEPTS.md section 3 as written. Works in float64 as well as in the storage dtypes
(accumulating in float32 for those). This is the `reference` backend and the
starting point of every test and benchmark.
"""
from __future__ import annotations

import torch

from fastedge import constants as C
from fastedge.ops import philox

# The noise clamp as float32 values, identical on every backend.
EPS_LOW = float(torch.tensor(C.EPS, dtype=torch.float32))
EPS_HIGH = float(torch.tensor(1.0 - C.EPS, dtype=torch.float32))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- masked writer sum --------------------------------------------------------

def masked_sum_forward(x, m, base, base_index, out) -> None:
    acc_dtype = accumulation_dtype(x.dtype)
    xs = x.to(acc_dtype)
    for r in range(m.shape[0]):
        acc = torch.einsum("w,wn->n", m[r].to(acc_dtype), xs)
        if base is not None:
            g = 0 if base_index is None else int(base_index[r])
            acc = acc + base[g].to(acc_dtype)
        out[r].copy_(acc)


def masked_sum_backward_stack(m, dout, dx) -> None:
    acc_dtype = accumulation_dtype(dout.dtype)
    acc = dx.to(acc_dtype)
    for r in range(m.shape[0]):
        acc = acc + torch.einsum("w,n->wn", m[r].to(acc_dtype), dout[r].to(acc_dtype))
    dx.copy_(acc)


def masked_sum_backward_mask(x, dout) -> torch.Tensor:
    acc_dtype = accumulation_dtype(x.dtype)
    xs = x.to(acc_dtype)
    rows = [torch.einsum("n,wn->w", dout[r].to(acc_dtype), xs) for r in range(dout.shape[0])]
    if not rows:
        return torch.zeros(0, x.shape[0], dtype=acc_dtype, device=x.device)
    return torch.stack(rows)


# -- hard concrete --------------------------------------------------------------

def hard_concrete_stretched(log_alpha, u):
    """(s, s * (r - l) + l): the concrete sample and its stretched value,
    computed in log_alpha's dtype (float64 stays float64 throughout)."""
    u = u.to(log_alpha.dtype)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / C.BETA)
    return s, s * (C.LIMIT_RIGHT - C.LIMIT_LEFT) + C.LIMIT_LEFT


def hard_concrete_forward(log_alpha, u, training: bool):
    if not training:
        return torch.sigmoid(log_alpha * (C.DETERMINISTIC_SCALE / C.BETA))
    _, stretched = hard_concrete_stretched(log_alpha, u)
    return stretched.clamp(0.0, 1.0)


def hard_concrete_backward(log_alpha, u, training: bool, dz):
    if not training:
        z = torch.sigmoid(log_alpha * (C.DETERMINISTIC_SCALE / C.BETA))
        return dz * z * (1 - z) * (C.DETERMINISTIC_SCALE / C.BETA)
    s, stretched = hard_concrete_stretched(log_alpha, u)
    inside = (stretched > 0) & (stretched < 1)
    grad = dz * s * (1 - s) * ((C.LIMIT_RIGHT - C.LIMIT_LEFT) / C.BETA)
    # where, not a product: log_alpha = -inf (a structural zero) must give 0, not NaN
    return torch.where(inside, grad, torch.zeros_like(grad))


def hard_concrete_l0(log_alpha):
    return torch.sigmoid(log_alpha - C.L0_SHIFT)


def clamp_noise(uniform):
    return uniform.clamp(EPS_LOW, EPS_HIGH)


def edge_noise(seed, n_readers, n_writers, reader_offset, device):
    return clamp_noise(philox.edge_uniform(seed, n_readers, n_writers, reader_offset, device))


def node_noise(seed, n_writers, device):
    return clamp_noise(philox.node_uniform(seed, n_writers, device))


def _masks(edge_log_alpha, node_log_alpha, seed, reader_offset, training):
    R, W = edge_log_alpha.shape
    dev = edge_log_alpha.device
    u_edge = edge_noise(seed, R, W, reader_offset, dev) if training else None
    z_edge = hard_concrete_forward(edge_log_alpha, u_edge, training)
    u_node = s_node = None
    if node_log_alpha is not None:
        u_node = node_noise(seed, W, dev) if training else None
        s_node = hard_concrete_forward(node_log_alpha, u_node, training)
    return u_edge, z_edge, u_node, s_node


def sample_masks(edge_log_alpha, node_log_alpha, seed, reader_offset, training):
    _, z_edge, _, s_node = _masks(edge_log_alpha, node_log_alpha, seed, reader_offset, training)
    m = z_edge if s_node is None else z_edge * s_node[None, :]
    return m, z_edge.sum()


def sample_masks_backward(edge_log_alpha, node_log_alpha, seed, reader_offset, training,
                          dm, dedge_sum):
    u_edge, z_edge, u_node, s_node = _masks(edge_log_alpha, node_log_alpha, seed,
                                            reader_offset, training)
    dz_edge = (dm if s_node is None else dm * s_node[None, :]) + dedge_sum
    d_edge = hard_concrete_backward(edge_log_alpha, u_edge, training, dz_edge)
    d_node = None
    if node_log_alpha is not None:
        ds_node = (dm * z_edge).sum(dim=0)
        d_node = hard_concrete_backward(node_log_alpha, u_node, training, ds_node)
    return d_edge, d_node
