"""The contract every backend keeps.

The public ops in `fastedge.ops` validate their arguments, flatten the trailing
shape of the stack to one axis and take the prefix view, then hand plain 2-D
tensors to a backend. A backend never sees a malformed call; it only answers
whether it can run a well-formed one (`reasons`) and runs it.

Shapes and dtypes a backend receives (W writers read, R readers, N elements
per writer, G base rows):

* ``x``          [W, N], stride(1) == 1, any stride(0) >= N (a prefix view of a
                 larger stack); float32, bfloat16 or float16 (float64 too for
                 the plain-PyTorch backends).
* ``m``          [R, W] float32 (float64 when x is), contiguous.
* ``base``       None, or [G, N] contiguous in x's dtype.
* ``base_index`` None, or [R] int64 contiguous with values in [0, G). When
                 ``base`` is given without it, G == 1 and every reader uses row 0.
* ``out``        [R, N] contiguous in x's dtype, allocated by the caller (and
                 poisoned with NaN by the tests): every element must be written.
* ``dout``       [R, N] contiguous in x's dtype.
* ``dx``         [W, N], stride(1) == 1, any stride(0) >= N; float32 or x's
                 dtype. Backward-stack *accumulates* into it.
* hard-concrete tensors are 1-D contiguous float32 (``log_alpha``, ``u``,
  ``dz``); the fused sampler takes ``edge_log_alpha`` [R, W] and
  ``node_log_alpha`` [W] (or None), contiguous float32.

Random numbers of the fused sampler follow `fastedge.ops.philox` exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Call:
    """What a backend needs to know to decide whether it can run a call."""
    op: str                   # "masked_sum" | "hard_concrete" | "sample_masks"
    device: torch.device
    dtype: torch.dtype        # storage dtype of the stack (or of log_alpha)
    n_readers: int = 0
    n_writers: int = 0
    n_elements: int = 0       # N (trailing size) of the stack
    grad_dtype: Optional[torch.dtype] = None  # dtype of a caller-owned stack gradient
    # the stack's row stride in elements (None: one row, or unknown); rows
    # overlap when it is below n_elements (0: an expanded stack)
    row_stride: Optional[int] = None
    # the largest |mask| of a caller's mask on a float16 stack, measured
    # because fp16 tensor-core products cannot take masks above 65504
    # (None: not measured; masks the ops sample themselves lie in [0, 1])
    mask_abs_max: Optional[float] = None


class Backend:
    """Base class: subclasses override `reasons` and the op methods."""

    name: str = "?"

    def reasons(self, call: Call) -> list[str]:
        """Why this backend cannot run `call`; empty when it can."""
        raise NotImplementedError

    # -- masked writer sum -------------------------------------------------
    def masked_sum_forward(self, x, m, base, base_index, out, fast: bool = False) -> None:
        """out[r] = base[g(r)] + sum_w m[r, w] * x[w], accumulated in fp32.

        ``fast``: the caller accepts the mask rounded once to the product
        dtype (see `fastedge.ops.masked_writer_sum`'s ``precision``); a
        backend without a faster path ignores it and stays at full precision."""
        raise NotImplementedError

    def masked_sum_backward_stack(self, m, dout, dx, fast: bool = False) -> None:
        """dx[w] += sum_r m[r, w] * dout[r] (in place, accumulated in fp32)."""
        raise NotImplementedError

    def masked_sum_backward_mask(self, x, dout, live_mask=None, fast: bool = False) -> torch.Tensor:
        """[R, W] float32: dm[r, w] = sum_n dout[r, n] * x[w, n], reduced in
        fp32, bit-identical run to run. With ``live_mask`` ([R, W]) the
        backend may skip the writers whose mask is 0 for every reader and
        give them dm = 0 (the caller's gradient through them is 0 anyway).
        ``fast``: an fp32 stack's products may be tf32 ones."""
        raise NotImplementedError

    # -- hard concrete (elementwise) ---------------------------------------
    def hard_concrete_forward(self, log_alpha, u, training: bool) -> torch.Tensor:
        """z for each element (u is None when not training)."""
        raise NotImplementedError

    def hard_concrete_backward(self, log_alpha, u, training: bool, dz) -> torch.Tensor:
        """d log_alpha for each element."""
        raise NotImplementedError

    # -- fused sampling for the masked sum ---------------------------------
    def sample_masks(self, edge_log_alpha, node_log_alpha, seed: int, reader_offset: int,
                     training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(m [R, W] float32, edge_sum [] float32): m = z_edge * s_node (s_node = 1
        without node log_alphas) and edge_sum = sum of z_edge, with noise from
        Philox(seed) under fastedge's counter layout (training), or the
        deterministic values (not training)."""
        raise NotImplementedError

    def sample_masks_backward(self, edge_log_alpha, node_log_alpha, seed: int,
                              reader_offset: int, training: bool, dm, dedge_sum
                              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(d edge_log_alpha [R, W], d node_log_alpha [W] or None) given
        dm = dL/dm [R, W] float32 and dedge_sum = dL/d(edge_sum) [] float32.
        The masks are re-derived from the seed, never saved."""
        raise NotImplementedError
