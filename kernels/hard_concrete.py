"""Hard-concrete masks in Triton: elementwise forward/backward and the fused
sampler of the masked writer sum (docs/CONCEPTS.md section 3; `kernels.reference`).

Layers (STYLE.md): `@triton.jit` math helpers, then private kernels, then
plain launchers that check inputs, allocate, pick blocks and launch.

Training:  s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
           z = clamp(s * (r - l) + l, 0, 1); dz/dlog_alpha = s (1 - s) (r - l) / beta
           where 0 < s * (r - l) + l < 1, else 0.
Eval:      z = sigmoid(0.8 * log_alpha / beta); dz/dlog_alpha = z (1 - z) 0.8 / beta.

A NaN log_alpha gives a NaN z (and a zero gradient), as on every backend:
NaN in, NaN out, so the loss guard of `fastedge.prune` stops the run.
log_alpha = -inf (a structural zero) gives z = 0 and a zero gradient, never
NaN: sigmoid is written 1 / (1 + exp(-x)), which is 0 at x = -inf and 1 at
+inf, and the clamped gradient is selected with `tl.where`, not multiplied.

Reductions (`edge_sum`, the node gradient over readers) are deterministic:
each program owns a block of writers (columns) and walks every reader of the
call in a fixed order; the per-program partial edge sums are added by one
more single-program kernel in a fixed order. No atomics.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastedge import constants as C

from . import reference as _ref
from .philox import edge_noise, node_noise, split_seed

_INV_BETA = tl.constexpr(1.0 / C.BETA)
_STRETCH = tl.constexpr(C.LIMIT_RIGHT - C.LIMIT_LEFT)        # r - l
_LEFT = tl.constexpr(C.LIMIT_LEFT)                           # l
_EVAL_SCALE = tl.constexpr(C.DETERMINISTIC_SCALE / C.BETA)   # 0.8 / beta
_TRAIN_GRAD_SCALE = tl.constexpr((C.LIMIT_RIGHT - C.LIMIT_LEFT) / C.BETA)

# -- math helpers ----------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    # exp(-x) is inf for x = -inf (-> 0) and 0 for x = +inf (-> 1): no NaN.
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def hc_train_forward(log_alpha, u):
    """(s, stretched, z) of the training sample for fp32 noise u in (0, 1).
    log(1 - u) stands in for log1p(-u) (no libdevice): for u >= 1e-6 the two
    differ by far less than an fp32 ulp of the logit."""
    logit = tl.log(u) - tl.log(1.0 - u) + log_alpha
    s = _sigmoid(logit * _INV_BETA)
    stretched = s * _STRETCH + _LEFT
    # PropagateNan.ALL: a NaN log_alpha (or noise) gives a NaN mask, as on the
    # other backends; the default (min/max that return the non-NaN operand)
    # would turn it into a silent 0.
    z = tl.minimum(tl.maximum(stretched, 0.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                   propagate_nan=tl.PropagateNan.ALL)
    return s, stretched, z


@triton.jit
def hc_train_backward(s, stretched, dz):
    """d log_alpha of the training sample; zero where z was clamped (and at
    log_alpha = +-inf, where s (1 - s) would meet an infinite dz)."""
    inside = (stretched > 0.0) & (stretched < 1.0)
    return tl.where(inside, dz * s * (1.0 - s) * _TRAIN_GRAD_SCALE, 0.0)


@triton.jit
def hc_eval_forward(log_alpha):
    """The deterministic (evaluation) mask sigmoid(0.8 * log_alpha / beta)."""
    return _sigmoid(log_alpha * _EVAL_SCALE)


@triton.jit
def hc_eval_backward(z, dz):
    return dz * z * (1.0 - z) * _EVAL_SCALE


# -- elementwise kernels -------------------------------------------------------------


@triton.jit
def _hard_concrete_fwd_kernel(la_ptr, u_ptr, z_ptr, n, TRAINING: tl.constexpr,
                              BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # past 2**31 elements
    valid = offs < n
    la = tl.load(la_ptr + offs, mask=valid, other=0.0)
    if TRAINING:
        u = tl.load(u_ptr + offs, mask=valid, other=0.5)
        s, stretched, z = hc_train_forward(la, u)
    else:
        z = hc_eval_forward(la)
    tl.store(z_ptr + offs, z, mask=valid)


@triton.jit
def _hard_concrete_bwd_kernel(la_ptr, u_ptr, dz_ptr, dla_ptr, n, TRAINING: tl.constexpr,
                              BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # past 2**31 elements
    valid = offs < n
    la = tl.load(la_ptr + offs, mask=valid, other=0.0)
    dz = tl.load(dz_ptr + offs, mask=valid, other=0.0)
    if TRAINING:
        u = tl.load(u_ptr + offs, mask=valid, other=0.5)
        s, stretched, z = hc_train_forward(la, u)
        dla = hc_train_backward(s, stretched, dz)
    else:
        dla = hc_eval_backward(hc_eval_forward(la), dz)
    tl.store(dla_ptr + offs, dla, mask=valid)


# -- fused sampler kernels -------------------------------------------------------------
# One program per block of BLOCK_W writers (columns of the [R, W] masks); it
# loops over all R readers in chunks of BLOCK_R, so the node masks of its
# writers are sampled once and every column reduction has a fixed order.


@triton.jit
def _node_masks(nla_ptr, offs_w, w_valid, k0, k1, eps_low, eps_high, TRAINING: tl.constexpr):
    """(s_node, node log_alpha, concrete s, stretched) of writers offs_w; the
    last two are only meaningful when training."""
    nla = tl.load(nla_ptr + offs_w, mask=w_valid, other=0.0)
    if TRAINING:
        u = node_noise(offs_w, k0, k1, eps_low, eps_high)
        s, stretched, s_node = hc_train_forward(nla, u)
    else:
        s_node = hc_eval_forward(nla)
        s = s_node
        stretched = s_node
    return s_node, nla, s, stretched


# k0, k1, reader_offset: never specialised (a value of 1 would become a constexpr)
@triton.jit(do_not_specialize=["k0", "k1", "reader_offset"])
def _sample_masks_kernel(ela_ptr, nla_ptr, m_ptr, partial_ptr, R, W, k0, k1, reader_offset,
                         eps_low, eps_high, HAS_NODE: tl.constexpr, TRAINING: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    offs_w = pid * BLOCK_W + tl.arange(0, BLOCK_W)
    w_valid = offs_w < W
    if HAS_NODE:
        s_node, nla, s_n, stretched_n = _node_masks(nla_ptr, offs_w, w_valid, k0, k1,
                                                    eps_low, eps_high, TRAINING)
    z_acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        valid = (offs_r[:, None] < R) & w_valid[None, :]
        idx = offs_r[:, None] * W + offs_w[None, :]
        ela = tl.load(ela_ptr + idx, mask=valid, other=0.0)
        if TRAINING:
            u = edge_noise(offs_r, offs_w, reader_offset, k0, k1, eps_low, eps_high)
            # (unique names: `_` reused in a loop would be a loop-carried variable)
            s_e, stretched_e, z = hc_train_forward(ela, u)
        else:
            z = hc_eval_forward(ela)
        z = tl.where(valid, z, 0.0)
        z_acc += z
        if HAS_NODE:
            m = z * s_node[None, :]
        else:
            m = z
        tl.store(m_ptr + idx, m, mask=valid)
    tl.store(partial_ptr + pid, tl.sum(tl.sum(z_acc, axis=1), axis=0))


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[0] = sum of partial[0:n], one program, fixed order."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["k0", "k1", "reader_offset"])
def _sample_masks_bwd_kernel(ela_ptr, nla_ptr, dm_ptr, dsum_ptr, dela_ptr, dnla_ptr, R, W,
                             k0, k1, reader_offset, eps_low, eps_high,
                             HAS_NODE: tl.constexpr, TRAINING: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    offs_w = pid * BLOCK_W + tl.arange(0, BLOCK_W)
    w_valid = offs_w < W
    dsum = tl.load(dsum_ptr)  # dL/d(edge_sum), read on the device: no host sync
    if HAS_NODE:
        s_node, nla, s_n, stretched_n = _node_masks(nla_ptr, offs_w, w_valid, k0, k1,
                                                    eps_low, eps_high, TRAINING)
    ds_acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        valid = (offs_r[:, None] < R) & w_valid[None, :]
        idx = offs_r[:, None] * W + offs_w[None, :]
        ela = tl.load(ela_ptr + idx, mask=valid, other=0.0)
        dm = tl.load(dm_ptr + idx, mask=valid, other=0.0)
        if HAS_NODE:
            dz = dm * s_node[None, :] + dsum
        else:
            dz = dm + dsum
        if TRAINING:
            u = edge_noise(offs_r, offs_w, reader_offset, k0, k1, eps_low, eps_high)
            s, stretched, z = hc_train_forward(ela, u)
            dela = hc_train_backward(s, stretched, dz)
        else:
            z = hc_eval_forward(ela)
            dela = hc_eval_backward(z, dz)
        tl.store(dela_ptr + idx, dela, mask=valid)
        if HAS_NODE:
            ds_acc += tl.where(valid, dm * z, 0.0)
    if HAS_NODE:
        ds_node = tl.sum(ds_acc, axis=0)
        if TRAINING:
            dnla = hc_train_backward(s_n, stretched_n, ds_node)
        else:
            dnla = hc_eval_backward(s_node, ds_node)
        tl.store(dnla_ptr + offs_w, dnla, mask=w_valid)


# -- block sizes ----------------------------------------------------------------------

ELEMENTWISE_BLOCK = 1024
PARTIALS_BLOCK = 1024


def elementwise_config(n: int) -> dict:
    """Launch parameters of the elementwise hard-concrete kernels."""
    return dict(BLOCK=ELEMENTWISE_BLOCK, num_warps=4)


def sampler_config(n_readers: int, n_writers: int) -> dict:
    """Launch parameters of the fused sampler kernels (forward and backward).
    BLOCK_W writers per program (the grid is cdiv(W, BLOCK_W) programs; 64
    keeps a few dozen programs busy at CodeLlama-13B's 1,641 writers) and
    BLOCK_R readers per step of the loop over readers."""
    block_w = 64 if n_writers > 32 else 32
    block_r = 16 if n_readers > 8 else 8
    return dict(BLOCK_R=block_r, BLOCK_W=block_w, num_warps=4)


# -- launchers ------------------------------------------------------------------------


def _check_fp32_1d(name: str, t: torch.Tensor, n: Optional[int] = None) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be 1-D contiguous, got shape {tuple(t.shape)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} elements, expected {n}")


def _check_same_device(ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, expected {ref.device}")


def hard_concrete_forward(log_alpha: torch.Tensor, u: Optional[torch.Tensor],
                          training: bool) -> torch.Tensor:
    """z for each element of 1-D fp32 log_alpha (u: the noise, 1-D fp32, only
    when training)."""
    _check_fp32_1d("log_alpha", log_alpha)
    n = log_alpha.numel()
    if training:
        if u is None:
            raise ValueError("training needs the noise u")
        _check_fp32_1d("u", u, n)
        _check_same_device(log_alpha, u=u)
    z = torch.empty_like(log_alpha)
    if n:
        cfg = elementwise_config(n)
        _hard_concrete_fwd_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
            log_alpha, u if training else log_alpha, z, n, TRAINING=bool(training),
            BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return z


def hard_concrete_backward(log_alpha: torch.Tensor, u: Optional[torch.Tensor], training: bool,
                           dz: torch.Tensor) -> torch.Tensor:
    """d log_alpha for each element, given dz = dL/dz (1-D fp32)."""
    _check_fp32_1d("log_alpha", log_alpha)
    n = log_alpha.numel()
    _check_fp32_1d("dz", dz, n)
    if training:
        if u is None:
            raise ValueError("training needs the noise u")
        _check_fp32_1d("u", u, n)
    _check_same_device(log_alpha, u=u, dz=dz)
    dla = torch.empty_like(log_alpha)
    if n:
        cfg = elementwise_config(n)
        _hard_concrete_bwd_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
            log_alpha, u if training else log_alpha, dz, dla, n, TRAINING=bool(training),
            BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return dla


def _check_sampler_inputs(edge_log_alpha, node_log_alpha):
    if edge_log_alpha.dtype != torch.float32 or edge_log_alpha.dim() != 2:
        raise TypeError(f"edge_log_alpha must be 2-D float32, got {edge_log_alpha.dtype} "
                        f"{tuple(edge_log_alpha.shape)}")
    if not edge_log_alpha.is_contiguous():
        raise ValueError("edge_log_alpha must be contiguous")
    R, W = edge_log_alpha.shape
    if R * W >= 2 ** 31:
        raise ValueError(f"{R} x {W} masks: more than 2**31 elements in one call")
    if node_log_alpha is not None:
        _check_fp32_1d("node_log_alpha", node_log_alpha, W)
        _check_same_device(edge_log_alpha, node_log_alpha=node_log_alpha)
    return R, W


def sample_masks(edge_log_alpha: torch.Tensor, node_log_alpha: Optional[torch.Tensor], seed: int,
                 reader_offset: int, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(m [R, W] fp32, edge_sum [] fp32): m = z_edge * s_node (or z_edge) and
    edge_sum = sum of z_edge, exactly as `kernels.reference.sample_masks`."""
    R, W = _check_sampler_inputs(edge_log_alpha, node_log_alpha)
    dev = edge_log_alpha.device
    m = torch.empty((R, W), dtype=torch.float32, device=dev)
    edge_sum = torch.empty((), dtype=torch.float32, device=dev)
    if R == 0 or W == 0:
        edge_sum.zero_()
        return m, edge_sum
    k0, k1 = split_seed(seed) if training else (0, 0)
    cfg = sampler_config(R, W)
    n_prog = triton.cdiv(W, cfg["BLOCK_W"])
    # With one program its partial is the sum itself: write it in place.
    partials = edge_sum.view(1) if n_prog == 1 else torch.empty(n_prog, dtype=torch.float32,
                                                                 device=dev)
    _sample_masks_kernel[(n_prog,)](
        edge_log_alpha, edge_log_alpha if node_log_alpha is None else node_log_alpha, m,
        partials, R, W, k0, k1, int(reader_offset) & 0xFFFFFFFF, _ref.EPS_LOW, _ref.EPS_HIGH,
        HAS_NODE=node_log_alpha is not None, TRAINING=bool(training),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"])
    if n_prog > 1:
        _sum_partials_kernel[(1,)](partials, edge_sum, n_prog, BLOCK=PARTIALS_BLOCK, num_warps=4)
    return m, edge_sum


def sample_masks_backward(edge_log_alpha: torch.Tensor, node_log_alpha: Optional[torch.Tensor],
                          seed: int, reader_offset: int, training: bool, dm: torch.Tensor,
                          dedge_sum: torch.Tensor
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(d edge_log_alpha [R, W], d node_log_alpha [W] or None), as
    `kernels.reference.sample_masks_backward`; the masks are re-derived from
    the seed."""
    R, W = _check_sampler_inputs(edge_log_alpha, node_log_alpha)
    if dm.shape != (R, W) or dm.dtype != torch.float32 or not dm.is_contiguous():
        raise ValueError(f"dm must be contiguous float32 [{R}, {W}]")
    if dedge_sum.numel() != 1 or dedge_sum.dtype != torch.float32:
        raise ValueError("dedge_sum must be a float32 scalar")
    _check_same_device(edge_log_alpha, dm=dm, dedge_sum=dedge_sum)
    dev = edge_log_alpha.device
    d_edge = torch.empty((R, W), dtype=torch.float32, device=dev)
    d_node = None if node_log_alpha is None else torch.empty(W, dtype=torch.float32, device=dev)
    if W == 0:
        return d_edge, d_node
    if R == 0 and node_log_alpha is None:
        return d_edge, d_node
    k0, k1 = split_seed(seed) if training else (0, 0)
    cfg = sampler_config(R, W)
    _sample_masks_bwd_kernel[(triton.cdiv(W, cfg["BLOCK_W"]),)](
        edge_log_alpha, edge_log_alpha if node_log_alpha is None else node_log_alpha, dm,
        dedge_sum.reshape(1).contiguous(), d_edge, d_edge if d_node is None else d_node,
        R, W, k0, k1, int(reader_offset) & 0xFFFFFFFF, _ref.EPS_LOW, _ref.EPS_HIGH,
        HAS_NODE=node_log_alpha is not None, TRAINING=bool(training),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], num_warps=cfg["num_warps"])
    return d_edge, d_node
