"""Flattening and backend choice for the registered ops."""
from __future__ import annotations

from typing import Optional

import torch

from fastedge.backends import Backend, Call, select
from fastedge.ops._checks import _has_values


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """[W, *T] -> [W, N] with unit inner stride, as a view when the trailing
    dimensions are contiguous (a prefix of a larger stack stays a view)."""
    rows = t.shape[0]
    flat = t.reshape(rows, -1)
    if flat.shape[1] == 1 and flat.stride(1) != 1:
        flat = flat.as_strided(flat.shape, (flat.stride(0), 1))
    elif flat.stride(1) != 1:
        flat = flat.contiguous()
    return flat


def mask_abs_max(mask: torch.Tensor, stack_dtype: torch.dtype) -> Optional[float]:
    """The largest |mask| of a caller's mask when a backend needs it to decide
    (float16 stacks: the Triton kernels' fp16 products stop at 65504), else
    None. Reading it back is a host sync, so only fp16 stacks pay it, and
    only for masks the ops did not sample themselves; NaN masks give NaN."""
    if stack_dtype != torch.float16 or mask.numel() == 0 or not _has_values(mask):
        return None
    return float(mask.detach().abs().amax())


def masked_sum_backend(x: torch.Tensor, n_readers: int, backend: str,
                       grad_dtype=None, mask_max: Optional[float] = None) -> Backend:
    call = Call(op="masked_sum", device=x.device, dtype=x.dtype, n_readers=n_readers,
                n_writers=x.shape[0], n_elements=x[0].numel() if x.shape[0] else 0,
                grad_dtype=grad_dtype, row_stride=x.stride(0) if x.shape[0] > 1 else None,
                mask_abs_max=mask_max)
    return select(call, backend or None)


def hard_concrete_backend(log_alpha: torch.Tensor, backend: str) -> Backend:
    call = Call(op="hard_concrete", device=log_alpha.device, dtype=log_alpha.dtype,
                n_elements=log_alpha.numel())
    return select(call, backend or None)


def sample_masks_backend(edge_log_alpha: torch.Tensor, backend: str) -> Backend:
    call = Call(op="sample_masks", device=edge_log_alpha.device, dtype=edge_log_alpha.dtype,
                n_readers=edge_log_alpha.shape[0], n_writers=edge_log_alpha.shape[1])
    return select(call, backend or None)
