"""Hard-concrete sampling as a `torch.library` custom op, with autograd.

`fastedge::hard_concrete(log_alpha, u, training, backend) -> z` is elementwise;
the backward `fastedge::hard_concrete_backward` gives d log_alpha. The noise
`u` is an explicit input, so a call is a pure function of its arguments and
can be reproduced exactly; the public function draws it when not given.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastedge.ops._dispatch import hard_concrete_backend


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous().view(-1)


@torch.library.custom_op("fastedge::hard_concrete", mutates_args=())
def hard_concrete_op(log_alpha: Tensor, u: Optional[Tensor], training: bool, backend: str) -> Tensor:
    impl = hard_concrete_backend(log_alpha, backend)
    z = impl.hard_concrete_forward(_flat(log_alpha), _flat(u) if training else None, training)
    return z.to(log_alpha.dtype).view(log_alpha.shape)


@hard_concrete_op.register_fake
def _(log_alpha, u, training, backend):
    return torch.empty_like(log_alpha)


@torch.library.custom_op("fastedge::hard_concrete_backward", mutates_args=())
def hard_concrete_backward_op(log_alpha: Tensor, u: Optional[Tensor], training: bool, dz: Tensor,
                              backend: str) -> Tensor:
    impl = hard_concrete_backend(log_alpha, backend)
    d = impl.hard_concrete_backward(_flat(log_alpha), _flat(u) if training else None, training,
                                    _flat(dz.to(log_alpha.dtype)))
    return d.to(log_alpha.dtype).view(log_alpha.shape)


@hard_concrete_backward_op.register_fake
def _(log_alpha, u, training, dz, backend):
    return torch.empty_like(log_alpha)


def _setup(ctx, inputs, output):
    log_alpha, u, training, backend = inputs
    ctx.training = training
    ctx.backend = backend
    ctx.save_for_backward(log_alpha, u)


def _backward(ctx, dz):
    log_alpha, u = ctx.saved_tensors
    d = hard_concrete_backward_op(log_alpha, u, ctx.training, dz, ctx.backend)
    return d, None, None, None


hard_concrete_op.register_autograd(_backward, setup_context=_setup)
