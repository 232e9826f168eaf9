"""`torch` backend: one matrix product per call, in plain PyTorch.

Writers whose mask is 0 for every reader of a call are left out (their rows
gathered away), as the Triton kernels skip them.

The CPU default. Storage dtypes below fp32 are widened chunk by chunk (at most
`CHUNK_ELEMENTS` columns of the stack at a time) so that the fp32 copy never
grows with the stack. Hard-concrete math reuses the reference formulas, which
are already vectorised.
"""
from __future__ import annotations

import torch

from fastedge.backends.reference import ReferenceBackend
from fastedge.kernels import reference as ref

CHUNK_ELEMENTS = 1 << 16  # columns of N per chunk when widening to fp32


def _chunks(n: int, dtype: torch.dtype):
    if dtype in (torch.float32, torch.float64):
        yield slice(0, n)
        return
    for start in range(0, n, CHUNK_ELEMENTS):
        yield slice(start, min(n, start + CHUNK_ELEMENTS))


def _live_writers(m: torch.Tensor):
    """Indices of the writers (columns of m) with a nonzero mask for some
    reader, or None when every writer is live (then nothing is compacted)."""
    live = (m != 0).any(dim=0)
    if bool(live.all()):
        return None
    return torch.nonzero(live).flatten()


class TorchBackend(ReferenceBackend):
    """The masked sum as matrix products; the hard-concrete and sampling
    methods are the reference's (already vectorised)."""

    name = "torch"

    def masked_sum_forward(self, x, m, base, base_index, out, fast=False):
        live = _live_writers(m)
        if live is not None:  # dead writers add exact zeros: leave them unread
            x, m = x.index_select(0, live), m.index_select(1, live)
        acc_dtype = ref.accumulation_dtype(x.dtype)
        m = m.to(acc_dtype)
        if x.dtype == acc_dtype:
            # fp32 / fp64: write the base rows into `out`, then one in-place
            # matrix product: no temporary of the output's size.
            if base is None:
                torch.mm(m, x, out=out)
            else:
                if base_index is None:
                    out.copy_(base.expand(out.shape[0], -1))
                else:
                    torch.index_select(base, 0, base_index, out=out)
                out.addmm_(m, x)
            return
        for cols in _chunks(x.shape[1], x.dtype):
            acc = m @ x[:, cols].to(acc_dtype)
            if base is not None:
                rows = base[:, cols].to(acc_dtype)
                acc += rows[0] if base_index is None else rows.index_select(0, base_index)
            out[:, cols].copy_(acc)

    def masked_sum_backward_stack(self, m, dout, dx, fast=False):
        live = _live_writers(m)
        if live is not None:  # dead writers' rows get nothing: leave them untouched
            rows = dx.index_select(0, live)
            self.masked_sum_backward_stack(m.index_select(1, live), dout, rows)
            dx.index_copy_(0, live, rows)
            return
        acc_dtype = ref.accumulation_dtype(dout.dtype)
        mt = m.to(acc_dtype).t()
        for cols in _chunks(dout.shape[1], dout.dtype):
            if dx.dtype == acc_dtype:
                dx[:, cols].addmm_(mt, dout[:, cols].to(acc_dtype))
            else:
                dx[:, cols].copy_(torch.addmm(dx[:, cols].to(acc_dtype), mt, dout[:, cols].to(acc_dtype)))

    def masked_sum_backward_mask(self, x, dout, live_mask=None, fast=False):
        acc_dtype = ref.accumulation_dtype(x.dtype)
        dm = torch.zeros(dout.shape[0], x.shape[0], dtype=acc_dtype, device=x.device)
        live = None if live_mask is None else _live_writers(live_mask)
        if live is not None:  # dead writers keep dm = 0, unread
            dm[:, live] = self.masked_sum_backward_mask(x.index_select(0, live), dout)
            return dm
        for cols in _chunks(x.shape[1], x.dtype):
            dm.addmm_(dout[:, cols].to(acc_dtype), x[:, cols].to(acc_dtype).t())
        return dm
