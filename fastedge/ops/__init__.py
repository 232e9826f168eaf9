"""fastedge's two fused operations, as drop-in functions on plain tensors.

* `masked_writer_sum(stack, mask, base=None, base_index=None, *, grad_stack=None)`
* `sampled_masked_writer_sum(stack, edge_log_alpha, node_log_alpha=None, ..., seed=...)`
  (the fused form: masks sampled from a seed inside the op)
* `fused_norm(x, weight, bias=None, *, eps, kind)`: a reader norm (RMSNorm or
  LayerNorm) in one kernel each way (`fastedge.ops.norm`)
* `hard_concrete(log_alpha, *, training, u=None, generator=None)`,
  `hard_concrete_l0(log_alpha)`, `hard_concrete_deterministic(log_alpha)`

See the README's "The operations". Each is registered with `torch.library` (namespace
`fastedge`), so it works with autograd, fake tensors and `torch.compile`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastedge import constants
from fastedge.kernels.reference import EPS_HIGH, EPS_LOW, clamp_noise, edge_noise, node_noise
from fastedge.ops import _checks
from fastedge.ops.hard_concrete import hard_concrete_op
from fastedge.ops import norm
from fastedge.ops.masked_sum import (masked_writer_sum_op, sample_masks_op,
                                     sampled_masked_writer_sum_op)
from fastedge.ops.norm import fused_norm
from fastedge.ops.philox import edge_uniform, node_uniform

__all__ = [
    "masked_writer_sum", "sampled_masked_writer_sum", "sample_masks", "hard_concrete",
    "hard_concrete_l0", "hard_concrete_deterministic", "draw_noise", "edge_noise", "node_noise",
    "edge_uniform", "node_uniform", "init_log_alpha", "constants", "PRECISIONS", "fused_norm",
]


def _backend_arg(backend: Optional[str]) -> str:
    if backend is None:
        return ""
    from fastedge.backends import BACKEND_NAMES
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
    return backend


PRECISIONS = ("full", "fast")


def _fast_arg(precision: str) -> bool:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, "
                         f"got {precision!r}")
    return precision == "fast"


def masked_writer_sum(stack: Tensor, mask: Tensor, base: Optional[Tensor] = None,
                      base_index: Optional[Tensor] = None, *, grad_stack: Optional[Tensor] = None,
                      backend: Optional[str] = None, precision: str = "full",
                      unit_mask: bool = False) -> Tensor:
    """Every reader's input as a masked sum of the writers it reads.

    ``out[r] = base[g(r)] + sum_{w < W} mask[r, w] * stack[w]``, accumulated in fp32.

    Args:
        stack: ``[W_total, *T]`` writer stack, float32, bfloat16 or float16
            (float64 on the ``reference`` and ``torch`` backends); any
            trailing shape ``T``. Readers read its first ``W`` writers, taken
            as a view (never copied when ``T`` is contiguous).
        mask: ``[R, W]`` float32 (float64 with a float64 stack), ``W <= W_total``.
        base: ``None``; ``[*T]`` shared by all readers; or ``[G, *T]`` with
            ``base_index``. Same dtype as ``stack``.
        base_index: ``[R]`` integers in ``[0, G)``: the base row of each reader.
        grad_stack: optional caller-owned ``[W', *T]`` buffer (``W' >= W``,
            float32 or the stack's dtype). When given, the backward pass
            *accumulates* ``mask^T @ dout`` into ``grad_stack[:W]`` and gives
            no gradient to ``stack`` itself, so one buffer can collect the
            stack gradient of every layer of a model.
        backend: force a backend (``reference``, ``torch``, ``triton``,
            ``cuda``); default: ``FASTEDGE_BACKEND`` or the automatic choice.
        precision: ``"full"`` (default): the fp32 mask is carried to about
            2^-16 relative per term in a bf16 product (two roundings; 2^-22
            in fp16, about 2^-20 for fp32 stacks), then accumulated in fp32.
            ``"fast"``: one tensor-core product, with the mask rounded once
            to the stack's dtype (2^-8 relative in bf16, as in the authors'
            bf16 code; 2^-11 in fp16), and for fp32 stacks mask and stack
            rounded to tf32 (2^-11 each). Applies to the forward and the stack's gradient on
            the ``triton`` backend; the others always compute at full
            precision. The mask's gradient is exact products reduced in
            fp32 for 16-bit stacks; for fp32 stacks tf32x3 in full, one
            tf32 product (2^-11 in each operand) in fast.
        unit_mask: the caller promises mask values in ``[0, 1]`` (hard-concrete
            samples, a fixed circuit). With a float16 stack the call otherwise
            reads the mask's largest magnitude back (a host sync), because
            the ``triton`` backend's fp16 products cannot take masks above
            65504 and must then leave the call to another backend.

    Returns:
        ``[R, *T]`` in the stack's dtype. Differentiable in ``stack``,
        ``mask`` and ``base``.
    """
    _checks.check_tensor("mask", mask, ndim=2)
    _checks.check_stack(stack, mask.shape[1])
    _checks.check_mask(mask, stack)
    _checks.check_base(base, base_index, stack, mask.shape[0])
    _checks.check_grad_stack(grad_stack, stack, mask.shape[1])
    _checks.check_same_device(stack=stack, mask=mask, base=base, base_index=base_index)
    prefix = stack[: mask.shape[1]]
    return masked_writer_sum_op(prefix, mask, base, base_index, grad_stack, _backend_arg(backend),
                                _fast_arg(precision), bool(unit_mask))


def sampled_masked_writer_sum(stack: Tensor, edge_log_alpha: Tensor,
                              node_log_alpha: Optional[Tensor] = None, base: Optional[Tensor] = None,
                              base_index: Optional[Tensor] = None, *, seed: int,
                              reader_offset: int = 0, training: bool = True,
                              grad_stack: Optional[Tensor] = None,
                              backend: Optional[str] = None,
                              precision: str = "full") -> tuple[Tensor, Tensor]:
    """The masked writer sum with hard-concrete masks sampled inside the op.

    ``mask[r, w] = z(edge_log_alpha[r, w]) * s(node_log_alpha[w])`` where
    ``z`` and ``s`` are hard-concrete samples (``training``) drawn from
    Philox(``seed``) under fastedge's counter layout (`fastedge.ops.philox`),
    or the deterministic soft values (not ``training``). The mask is never
    saved: the backward re-derives it from the seed.

    Args:
        stack, base, base_index, grad_stack, backend, precision: as `masked_writer_sum`.
        edge_log_alpha: ``[R, W]`` float32. ``-inf`` marks a structural zero
            (mask exactly 0, gradient 0).
        node_log_alpha: optional ``[W]`` float32, one per writer read.
        seed: non-negative int < 2**63; one seed per training step.
        reader_offset: global index of this call's first reader, so that
            every edge of a model draws its own noise from one seed; node
            noise depends on (seed, writer) only, so a writer's node mask is
            the same for every layer that reads it.
        training: sample (True) or use the deterministic values (False).

    Returns:
        ``(out [R, *T] in the stack's dtype, edge_sum [] float32)`` where
        ``edge_sum`` is the sum of the sampled edge masks ``z`` (for the
        sparsity term). Differentiable in ``stack``, ``edge_log_alpha``,
        ``node_log_alpha`` and ``base``.

    The same masks are available without the sum through `sample_masks`, and
    the noise itself through `edge_noise` / `node_noise`.
    """
    _checks.check_log_alpha("edge_log_alpha", edge_log_alpha)
    _checks.check_tensor("edge_log_alpha", edge_log_alpha, ndim=2)
    _checks.check_stack(stack, edge_log_alpha.shape[1])
    _checks.check_mask(edge_log_alpha, stack, name="edge_log_alpha")
    _check_node(node_log_alpha, edge_log_alpha)
    _checks.check_base(base, base_index, stack, edge_log_alpha.shape[0])
    _checks.check_grad_stack(grad_stack, stack, edge_log_alpha.shape[1])
    _checks.check_same_device(stack=stack, edge_log_alpha=edge_log_alpha,
                              node_log_alpha=node_log_alpha, base=base, base_index=base_index)
    seed = _checks.check_seed(seed)
    reader_offset = _check_offset(reader_offset)
    prefix = stack[: edge_log_alpha.shape[1]]
    return sampled_masked_writer_sum_op(prefix, edge_log_alpha, node_log_alpha, base, base_index,
                                        grad_stack, seed, reader_offset, bool(training),
                                        _backend_arg(backend), _fast_arg(precision))


def sample_masks(edge_log_alpha: Tensor, node_log_alpha: Optional[Tensor] = None, *, seed: int,
                 reader_offset: int = 0, training: bool = True,
                 backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """``(mask [R, W], edge_sum [])``: the masks `sampled_masked_writer_sum`
    uses for the same arguments, materialised (differentiable)."""
    _checks.check_log_alpha("edge_log_alpha", edge_log_alpha)
    _checks.check_tensor("edge_log_alpha", edge_log_alpha, ndim=2)
    _check_node(node_log_alpha, edge_log_alpha)
    _checks.check_same_device(edge_log_alpha=edge_log_alpha, node_log_alpha=node_log_alpha)
    return sample_masks_op(edge_log_alpha, node_log_alpha, _checks.check_seed(seed),
                           _check_offset(reader_offset), bool(training), _backend_arg(backend))


def _check_node(node_log_alpha: Optional[Tensor], edge_log_alpha: Tensor) -> None:
    if node_log_alpha is None:
        return
    _checks.check_log_alpha("node_log_alpha", node_log_alpha)
    if node_log_alpha.shape != (edge_log_alpha.shape[1],):
        raise ValueError(f"node_log_alpha must be [W] = [{edge_log_alpha.shape[1]}] (one per writer "
                         f"read), got shape {tuple(node_log_alpha.shape)}")
    if node_log_alpha.dtype != edge_log_alpha.dtype:
        raise TypeError(f"node_log_alpha ({node_log_alpha.dtype}) and edge_log_alpha "
                        f"({edge_log_alpha.dtype}) must share a dtype")


def _check_offset(reader_offset) -> int:
    if not isinstance(reader_offset, int) or isinstance(reader_offset, bool) or not 0 <= reader_offset < 2 ** 32:
        raise ValueError(f"reader_offset must be an int in [0, 2**32), got {reader_offset!r}")
    return reader_offset


def draw_noise(shape, *, generator: Optional[torch.Generator] = None, device=None,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Hard-concrete noise ``u ~ U(eps, 1 - eps)`` from PyTorch's generator."""
    return clamp_noise(torch.rand(shape, generator=generator, device=device, dtype=dtype))


def hard_concrete(log_alpha: Tensor, *, training: bool, u: Optional[Tensor] = None,
                  generator: Optional[torch.Generator] = None,
                  backend: Optional[str] = None) -> Tensor:
    """Hard-concrete masks ``z`` (docs/CONCEPTS.md section 3), elementwise.

    Training: ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
    ``z = clamp(s * (r - l) + l, 0, 1)`` with ``u`` given (same shape as
    ``log_alpha``, every value in the open interval (0, 1): a ValueError
    names the first one outside it) or drawn from ``generator``. A NaN
    ``log_alpha`` gives a NaN ``z`` on every backend. Not training:
    the deterministic value ``hard_concrete_deterministic(log_alpha)``.
    ``log_alpha`` is float32 (float64 on the reference and torch backends);
    ``z`` has its shape and dtype and is differentiable in ``log_alpha``.
    """
    _checks.check_log_alpha("log_alpha", log_alpha)
    if training:
        if u is None:
            u = draw_noise(log_alpha.shape, generator=generator, device=log_alpha.device,
                           dtype=log_alpha.dtype)
        else:
            _checks.check_tensor("u", u)
            if u.shape != log_alpha.shape:
                raise ValueError(f"u must have log_alpha's shape {tuple(log_alpha.shape)}, got {tuple(u.shape)}")
            if u.dtype != log_alpha.dtype:
                raise TypeError(f"u must have log_alpha's dtype {log_alpha.dtype}, got {u.dtype}")
            _checks.check_same_device(log_alpha=log_alpha, u=u)
            _checks.check_noise("u", u)
    else:
        u = None
    return hard_concrete_op(log_alpha, u, bool(training), _backend_arg(backend))


def hard_concrete_l0(log_alpha: Tensor) -> Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))``: the expected
    number of kept masks, differentiable in ``log_alpha``."""
    return torch.sigmoid(log_alpha - constants.L0_SHIFT)


def hard_concrete_deterministic(log_alpha: Tensor) -> Tensor:
    """The evaluation mask ``sigmoid(0.8 * log_alpha / beta)`` (before the
    circuit threshold of docs/CONCEPTS.md section 4)."""
    return torch.sigmoid(log_alpha * (constants.DETERMINISTIC_SCALE / constants.BETA))


def init_log_alpha(*shape, generator: Optional[torch.Generator] = None, device=None,
                   dtype: torch.dtype = torch.float32, mean: float = constants.INIT_MEAN) -> Tensor:
    """``log_alpha ~ N(10, 0.01)`` (float32 unless asked): every mask starts at 1."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.normal_(mean, constants.INIT_STD, generator=generator)
