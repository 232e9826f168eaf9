"""The masked writer sum as `torch.library` custom ops, with autograd.

Layers (STYLE.md): kernels in `fastedge.kernels` / `csrc`, backends in
`fastedge.backends`, the registered ops and their autograd formulas here, the
public functions in `fastedge.ops`.

Registered ops (namespace `fastedge`):

* `masked_writer_sum(stack, mask, base, base_index, grad_stack, backend, fast, unit_mask) -> out`
* `masked_writer_sum_backward_stack(mask, dout, backend, fast) -> dstack`
* `masked_writer_sum_backward_mask(stack, dout, backend) -> dmask`
* `masked_writer_sum_accumulate_grad_(grad_stack, mask, dout, backend, fast)` (in place)
* `sample_masks(edge_log_alpha, node_log_alpha, seed, reader_offset, training, backend) -> (mask, edge_sum)`
* `sample_masks_backward(...) -> (d_edge_log_alpha, d_node_log_alpha)`
* `sampled_masked_writer_sum(stack, edge_log_alpha, node_log_alpha, base, base_index,
   grad_stack, seed, reader_offset, training, backend, fast) -> (out, edge_sum)`

`fast` is the public ``precision="fast"``: the backend may round the mask once
to the product dtype (`fastedge.backends.base.Backend.masked_sum_forward`).

`stack` is always the prefix the readers read ([W, *T]); the public functions
take that view. When `grad_stack` (a caller-owned buffer) is given, the
backward accumulates the stack's gradient into it and gives None for `stack`.

The in-place stack protocol. A model writes its writers' rows into one
preallocated stack as layers run, so rows *beyond* a call's prefix are written
after the call. Those writes bump the version counter that every view of the
stack shares, and autograd's usual check on saved tensors would then refuse
the backward although the rows the call read never changed. So when
`grad_stack` is given (the protocol's signal), the prefix is kept on the
autograd context without that check; the caller promises not to modify rows
below the prefix before the backward (fastedge's models write each row once
per forward). Without `grad_stack`, the stack is saved the usual way.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastedge.ops._dispatch import (flat_rows, mask_abs_max, masked_sum_backend, sample_masks_backend)

# -- forward ------------------------------------------------------------------


def _forward(stack: Tensor, mask: Tensor, base: Optional[Tensor], base_index: Optional[Tensor],
             backend: str, fast: bool, unit_mask: bool = False) -> Tensor:
    """`unit_mask`: the mask is known to lie in [0, 1] (sampled by
    `sample_masks_op`, or promised by the caller), so its range need not be
    measured (`mask_abs_max`)."""
    n_readers = mask.shape[0]
    x = flat_rows(stack)
    impl = masked_sum_backend(x, n_readers, backend,
                              mask_max=None if unit_mask else mask_abs_max(mask, x.dtype))
    out = torch.empty((n_readers, x.shape[1]), dtype=stack.dtype, device=stack.device)
    base2d = None
    index = None
    if base is not None:
        base2d = base.reshape(-1 if base_index is not None else 1, x.shape[1]).contiguous()
        if base_index is not None:
            index = base_index.to(torch.int64).contiguous()
    impl.masked_sum_forward(x, mask.contiguous(), base2d, index, out, fast=fast)
    return out.view((n_readers,) + tuple(stack.shape[1:]))


@torch.library.custom_op("fastedge::masked_writer_sum", mutates_args=())
def masked_writer_sum_op(stack: Tensor, mask: Tensor, base: Optional[Tensor],
                         base_index: Optional[Tensor], grad_stack: Optional[Tensor],
                         backend: str, fast: bool = False, unit_mask: bool = False) -> Tensor:
    return _forward(stack, mask, base, base_index, backend, fast, unit_mask)


@masked_writer_sum_op.register_fake
def _(stack, mask, base, base_index, grad_stack, backend, fast=False, unit_mask=False):
    return stack.new_empty((mask.shape[0],) + tuple(stack.shape[1:]))


# -- backward pieces (ops themselves, so fake tensors flow through the backward) --


@torch.library.custom_op("fastedge::masked_writer_sum_backward_stack", mutates_args=())
def backward_stack_op(mask: Tensor, dout: Tensor, n_writers_like: Tensor, backend: str,
                      fast: bool = False, unit_mask: bool = False) -> Tensor:
    """dstack [W, *T] (dtype of dout) = mask^T @ dout. `n_writers_like` is the
    stack prefix itself; only its shape is used. `unit_mask`: as in `_forward`."""
    dx = torch.zeros(n_writers_like.shape, dtype=dout.dtype, device=dout.device)
    d2 = flat_rows(dout.contiguous())
    impl = masked_sum_backend(d2, mask.shape[0], backend, grad_dtype=dx.dtype,
                              mask_max=None if unit_mask else mask_abs_max(mask, d2.dtype))
    impl.masked_sum_backward_stack(mask.contiguous(), d2, dx.view(dx.shape[0], -1), fast=fast)
    return dx


@backward_stack_op.register_fake
def _(mask, dout, n_writers_like, backend, fast=False, unit_mask=False):
    return dout.new_empty(n_writers_like.shape)


@torch.library.custom_op("fastedge::masked_writer_sum_accumulate_grad_",
                         mutates_args=("grad_stack",))
def accumulate_grad_op(grad_stack: Tensor, mask: Tensor, dout: Tensor, backend: str,
                       fast: bool = False, unit_mask: bool = False) -> None:
    """grad_stack[:W] += mask^T @ dout, in place (W = mask.shape[1])."""
    d2 = flat_rows(dout.contiguous())
    prefix = grad_stack[: mask.shape[1]].reshape(mask.shape[1], -1)
    impl = masked_sum_backend(d2, mask.shape[0], backend, grad_dtype=grad_stack.dtype,
                              mask_max=None if unit_mask else mask_abs_max(mask, d2.dtype))
    impl.masked_sum_backward_stack(mask.contiguous(), d2, prefix, fast=fast)


@accumulate_grad_op.register_fake
def _(grad_stack, mask, dout, backend, fast=False, unit_mask=False):
    return None


@torch.library.custom_op("fastedge::masked_writer_sum_backward_mask", mutates_args=())
def backward_mask_op(stack: Tensor, dout: Tensor, mask_like: Tensor, backend: str,
                     live_mask: Optional[Tensor] = None, fast: bool = False) -> Tensor:
    """dmask [R, W] (dtype of mask_like) = dout @ stack^T, reduced in fp32.
    With `live_mask`, columns where it is 0 for every reader may be skipped
    and given 0 (`Backend.masked_sum_backward_mask`)."""
    x = flat_rows(stack)
    d2 = flat_rows(dout.contiguous())
    impl = masked_sum_backend(x, d2.shape[0], backend)
    return impl.masked_sum_backward_mask(x, d2, live_mask=live_mask, fast=fast).to(mask_like.dtype)


@backward_mask_op.register_fake
def _(stack, dout, mask_like, backend, live_mask=None, fast=False):
    return mask_like.new_empty(mask_like.shape)


def _base_grad(ctx, dout: Tensor, base_index: Optional[Tensor]) -> Tensor:
    """Sum of dout over the readers of each base row, in fp32, as one fixed
    contraction (no atomics, so it is deterministic on every device). The
    shared base (no index) reduces 16-bit dout with an fp32 accumulator
    directly: on CUDA the reduction reads the 16-bit values, with no fp32
    copy of the whole [R, *T] gradient. The indexed base (not used by
    fastedge's models) still contracts an fp32 copy with a one-hot matrix."""
    acc_dtype = torch.float64 if dout.dtype == torch.float64 else torch.float32
    flat = dout.reshape(dout.shape[0], -1)
    if base_index is None:
        rows = torch.sum(flat, dim=0, dtype=acc_dtype)
    else:
        one_hot = torch.nn.functional.one_hot(base_index.to(torch.int64), ctx.base_shape[0])
        rows = one_hot.t().to(acc_dtype) @ flat.to(acc_dtype)
    return rows.to(ctx.base_dtype).reshape(ctx.base_shape)


def _stack_grad(ctx, mask: Tensor, dout: Tensor, stack: Tensor, unit_mask: bool):
    if ctx.has_grad_buffer:
        accumulate_grad_op(ctx.grad_stack, mask, dout, ctx.backend, ctx.fast, unit_mask)
        return None
    return backward_stack_op(mask, dout, stack, ctx.backend, ctx.fast, unit_mask)


def _setup_context(ctx, inputs, output):
    stack, mask, base, base_index, grad_stack, backend, fast, unit_mask = inputs
    ctx.backend, ctx.fast, ctx.unit_mask = backend, fast, unit_mask
    _record_base_and_buffer(ctx, base, grad_stack)
    _save(ctx, stack, mask, base_index)


def _record_base_and_buffer(ctx, base: Optional[Tensor], grad_stack: Optional[Tensor]) -> None:
    """What both masked-sum backwards need to know about base and the buffer."""
    ctx.has_base = base is not None
    ctx.base_shape = None if base is None else base.shape
    ctx.base_dtype = None if base is None else base.dtype
    ctx.has_grad_buffer = grad_stack is not None
    ctx.grad_stack = grad_stack


def _save(ctx, stack: Tensor, *others) -> None:
    """Save `others` for the backward, and the stack prefix too: checked as
    usual, or unchecked under the in-place stack protocol (module docstring)."""
    if ctx.has_grad_buffer:
        ctx.unchecked_stack = stack
        ctx.save_for_backward(*others)
    else:
        ctx.unchecked_stack = None
        ctx.save_for_backward(*others, stack)


def _saved(ctx):
    """(stack, *others) as given to `_save`."""
    saved = ctx.saved_tensors
    if ctx.has_grad_buffer:
        if ctx.unchecked_stack is None:
            raise RuntimeError("Trying to backward through the graph a second time: with grad_stack, "
                               "the stack and the buffer are released after the first backward")
        return (ctx.unchecked_stack, *saved)
    return (saved[-1], *saved[:-1])


def _release(ctx) -> None:
    """Drop the references to the stack and the buffer once the backward has
    used them, as autograd frees saved tensors: a graph that stays alive after
    its backward (its output still referenced, as in a gradient-accumulation
    loop until the next micro-batch's forward returns) must not keep them.
    Like autograd's own saved tensors, they stay when the backward runs with
    ``retain_graph=True``."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is not None and keep_graph():
        return
    ctx.unchecked_stack = None
    ctx.grad_stack = None


def _backward(ctx, dout):
    stack, mask, base_index = _saved(ctx)
    dout = dout.contiguous()
    dstack = dmask = dbase = None
    if ctx.needs_input_grad[0] or ctx.has_grad_buffer:  # the buffer is filled even for a stack outside autograd
        dstack = _stack_grad(ctx, mask, dout, stack, ctx.unit_mask)
    if ctx.needs_input_grad[1]:
        dmask = backward_mask_op(stack, dout, mask, ctx.backend, None, ctx.fast)
    if ctx.has_base and ctx.needs_input_grad[2]:
        dbase = _base_grad(ctx, dout, base_index)
    _release(ctx)
    return dstack, dmask, dbase, None, None, None, None, None


masked_writer_sum_op.register_autograd(_backward, setup_context=_setup_context)


# -- the fused hard-concrete form ------------------------------------------------


@torch.library.custom_op("fastedge::sample_masks", mutates_args=())
def sample_masks_op(edge_log_alpha: Tensor, node_log_alpha: Optional[Tensor], seed: int,
                    reader_offset: int, training: bool, backend: str) -> tuple[Tensor, Tensor]:
    impl = sample_masks_backend(edge_log_alpha, backend)
    m, edge_sum = impl.sample_masks(edge_log_alpha.contiguous(),
                                    None if node_log_alpha is None else node_log_alpha.contiguous(),
                                    seed, reader_offset, training)
    return m.to(edge_log_alpha.dtype), edge_sum.to(edge_log_alpha.dtype).reshape(())


@sample_masks_op.register_fake
def _(edge_log_alpha, node_log_alpha, seed, reader_offset, training, backend):
    return edge_log_alpha.new_empty(edge_log_alpha.shape), edge_log_alpha.new_empty(())


@torch.library.custom_op("fastedge::sample_masks_backward", mutates_args=())
def sample_masks_backward_op(edge_log_alpha: Tensor, node_log_alpha: Optional[Tensor], seed: int,
                             reader_offset: int, training: bool, dmask: Tensor, dedge_sum: Tensor,
                             backend: str) -> tuple[Tensor, Tensor]:
    """(d edge_log_alpha, d node_log_alpha); the second is empty without node log_alphas."""
    impl = sample_masks_backend(edge_log_alpha, backend)
    d_edge, d_node = impl.sample_masks_backward(
        edge_log_alpha.contiguous(),
        None if node_log_alpha is None else node_log_alpha.contiguous(),
        seed, reader_offset, training, dmask.contiguous().to(edge_log_alpha.dtype),
        dedge_sum.to(edge_log_alpha.dtype).reshape(()))
    if d_node is None:
        d_node = edge_log_alpha.new_empty((0,))
    return d_edge.to(edge_log_alpha.dtype), d_node.to(edge_log_alpha.dtype)


@sample_masks_backward_op.register_fake
def _(edge_log_alpha, node_log_alpha, seed, reader_offset, training, dmask, dedge_sum, backend):
    n_node = 0 if node_log_alpha is None else node_log_alpha.shape[0]
    return edge_log_alpha.new_empty(edge_log_alpha.shape), edge_log_alpha.new_empty((n_node,))


def _sample_masks_setup(ctx, inputs, output):
    edge_log_alpha, node_log_alpha, seed, reader_offset, training, backend = inputs
    ctx.args = (seed, reader_offset, training, backend)
    ctx.has_node = node_log_alpha is not None
    ctx.save_for_backward(edge_log_alpha, node_log_alpha)


def _sample_masks_backward(ctx, dmask, dedge_sum):
    edge_log_alpha, node_log_alpha = ctx.saved_tensors
    seed, reader_offset, training, backend = ctx.args
    if dmask is None:
        dmask = torch.zeros_like(edge_log_alpha)
    if dedge_sum is None:
        dedge_sum = edge_log_alpha.new_zeros(())
    d_edge, d_node = sample_masks_backward_op(edge_log_alpha, node_log_alpha, seed, reader_offset,
                                              training, dmask, dedge_sum, backend)
    return d_edge, (d_node if ctx.has_node else None), None, None, None, None


sample_masks_op.register_autograd(_sample_masks_backward, setup_context=_sample_masks_setup)


@torch.library.custom_op("fastedge::sampled_masked_writer_sum", mutates_args=())
def sampled_masked_writer_sum_op(stack: Tensor, edge_log_alpha: Tensor,
                                 node_log_alpha: Optional[Tensor], base: Optional[Tensor],
                                 base_index: Optional[Tensor], grad_stack: Optional[Tensor],
                                 seed: int, reader_offset: int, training: bool,
                                 backend: str, fast: bool = False) -> tuple[Tensor, Tensor]:
    mask, edge_sum = sample_masks_op(edge_log_alpha, node_log_alpha, seed, reader_offset,
                                     training, backend)
    return _forward(stack, mask, base, base_index, backend, fast, unit_mask=True), edge_sum


@sampled_masked_writer_sum_op.register_fake
def _(stack, edge_log_alpha, node_log_alpha, base, base_index, grad_stack, seed, reader_offset,
      training, backend, fast=False):
    return (stack.new_empty((edge_log_alpha.shape[0],) + tuple(stack.shape[1:])),
            edge_log_alpha.new_empty(()))


def _fused_setup(ctx, inputs, output):
    (stack, edge_log_alpha, node_log_alpha, base, base_index, grad_stack, seed, reader_offset,
     training, backend, fast) = inputs
    ctx.args = (seed, reader_offset, training, backend)
    ctx.backend, ctx.fast = backend, fast
    ctx.has_node = node_log_alpha is not None
    _record_base_and_buffer(ctx, base, grad_stack)
    # The masks are not saved: the backward re-derives them from the seed.
    _save(ctx, stack, edge_log_alpha, node_log_alpha, base_index)


def _fused_backward(ctx, dout, dedge_sum):
    stack, edge_log_alpha, node_log_alpha, base_index = _saved(ctx)
    seed, reader_offset, training, backend = ctx.args
    if dout is None:
        dout = torch.zeros((edge_log_alpha.shape[0],) + tuple(stack.shape[1:]),
                           dtype=stack.dtype, device=stack.device)
    dout = dout.contiguous()
    if dedge_sum is None:
        dedge_sum = edge_log_alpha.new_zeros(())
    dstack = d_edge = d_node = dbase = None
    with torch.no_grad():
        mask, _ = sample_masks_op(edge_log_alpha, node_log_alpha, seed, reader_offset, training,
                                  backend)
    if ctx.needs_input_grad[0] or ctx.has_grad_buffer:  # the buffer is filled even for a stack outside autograd
        dstack = _stack_grad(ctx, mask, dout, stack, unit_mask=True)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # A writer whose sampled mask is 0 for every reader gets no gradient
        # through this call whatever dmask is there: each of its masks z * s is
        # 0 through a clamp (training: hard-concrete's gradient is 0 outside
        # (0, 1)) or a sigmoid that underflowed (eval: its derivative is 0
        # too). So the backends may skip reading it (live_mask).
        dmask = backward_mask_op(stack, dout, edge_log_alpha, backend, live_mask=mask, fast=ctx.fast)
        d_edge, d_node = sample_masks_backward_op(edge_log_alpha, node_log_alpha, seed,
                                                  reader_offset, training, dmask, dedge_sum,
                                                  backend)
        if not ctx.has_node:
            d_node = None
    if ctx.has_base and ctx.needs_input_grad[3]:
        dbase = _base_grad(ctx, dout, base_index)
    _release(ctx)
    return dstack, d_edge, d_node, dbase, None, None, None, None, None, None, None


sampled_masked_writer_sum_op.register_autograd(_fused_backward, setup_context=_fused_setup)
