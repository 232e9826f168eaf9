"""`reference` backend: the plain-PyTorch reference in `fastedge.kernels.reference`
(one einsum per reader). Runs on any device, in float64 too; slow by design."""
from __future__ import annotations

import torch

from fastedge.backends.base import Backend, Call
from fastedge.kernels import reference as ref

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ReferenceBackend(Backend):
    name = "reference"

    def reasons(self, call: Call) -> list[str]:
        if call.dtype not in _DTYPES:
            return [f"dtype {call.dtype} is not one of float32, bfloat16, float16, float64"]
        return []

    def masked_sum_forward(self, x, m, base, base_index, out, fast=False):
        ref.masked_sum_forward(x, m, base, base_index, out)

    def masked_sum_backward_stack(self, m, dout, dx, fast=False):
        ref.masked_sum_backward_stack(m, dout, dx)

    def masked_sum_backward_mask(self, x, dout, live_mask=None, fast=False):
        return ref.masked_sum_backward_mask(x, dout)

    def hard_concrete_forward(self, log_alpha, u, training):
        return ref.hard_concrete_forward(log_alpha, u, training)

    def hard_concrete_backward(self, log_alpha, u, training, dz):
        return ref.hard_concrete_backward(log_alpha, u, training, dz)

    def sample_masks(self, edge_log_alpha, node_log_alpha, seed, reader_offset, training):
        return ref.sample_masks(edge_log_alpha, node_log_alpha, seed, reader_offset, training)

    def sample_masks_backward(self, edge_log_alpha, node_log_alpha, seed, reader_offset,
                              training, dm, dedge_sum):
        return ref.sample_masks_backward(edge_log_alpha, node_log_alpha, seed, reader_offset,
                                         training, dm, dedge_sum)
