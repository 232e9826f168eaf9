"""`triton` backend: the kernels of `kernels/` (installed as `fastedge.kernels`).

The default on a CUDA GPU. Under TRITON_INTERPRET=1 it also runs CPU tensors
(slowly), so the op tests can run it without a GPU.

Triton is imported lazily, when a call is first checked or run, so that
`import fastedge` never needs it. Whether the kernels run interpreted is
fixed when their modules are first imported (Triton reads TRITON_INTERPRET
when a kernel is defined); `reasons` reports a mismatch rather than failing.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional

import torch

from fastedge.backends.base import Backend, Call

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2 ** 31 - 1
_FP16_MAX = 65504.0  # the largest finite float16: the fp16 products' mask halves stop there


def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # ImportError, or a broken installation
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def _kernels_interpreted() -> Optional[bool]:
    """Whether the kernels (if already imported) were defined under the
    interpreter; None when they are not imported yet."""
    import sys
    mod = sys.modules.get("fastedge.kernels.masked_sum")
    if mod is None:
        return None
    return mod._interpreted(mod._masked_sum_fwd_kernel)


def _on_device(t: torch.Tensor):
    """Launch on `t`'s GPU (Triton launches on the current CUDA device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        self._import_error: Optional[str] = None
        self._checked_import = False

    # -- what it can run ---------------------------------------------------------

    def _import_reason(self) -> Optional[str]:
        if not self._checked_import:
            self._import_error = _triton_import_error()
            self._checked_import = True
        return self._import_error

    def reasons(self, call: Call) -> list[str]:
        why = []
        err = self._import_reason()
        if err:
            return [err]
        dev = torch.device(call.device)
        interpreted = _kernels_interpreted()
        if dev.type == "cpu":
            if not _interpret_env():
                why.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
            elif interpreted is False:
                why.append("the Triton kernels were compiled for the GPU (imported before "
                           "TRITON_INTERPRET=1 was set); CPU tensors cannot run them")
        elif dev.type == "cuda":
            if interpreted is None and not _interpret_env() and not torch.cuda.is_available():
                why.append("CUDA is not available to this PyTorch")
        else:
            why.append(f"device type {dev.type!r} is not supported (CUDA, or CPU under "
                       "TRITON_INTERPRET=1)")

        if call.op == "masked_sum":
            if call.dtype not in _STORAGE_DTYPES:
                why.append(f"stack dtype {call.dtype} is not float32, bfloat16 or float16")
            elif call.grad_dtype is not None and call.grad_dtype not in (torch.float32,
                                                                         call.dtype):
                why.append(f"stack gradient dtype {call.grad_dtype} is neither float32 nor "
                           f"the stack dtype {call.dtype}")
            if call.n_elements > _INT32_MAX:
                why.append(f"{call.n_elements} elements per writer: the kernels index a row "
                           f"with 32 bits (at most {_INT32_MAX})")
            if call.row_stride is not None and call.row_stride < call.n_elements:
                why.append(f"the stack's rows overlap in memory (row stride {call.row_stride} < "
                           f"{call.n_elements} elements per writer, as in an expanded tensor); "
                           f"the kernels need separate rows")
            if (call.dtype == torch.float16 and call.mask_abs_max is not None
                    and call.mask_abs_max > _FP16_MAX):
                why.append(f"mask values up to {call.mask_abs_max:.6g} with a float16 stack: the "
                           f"kernels multiply the mask in float16, whose largest value is 65504")
        elif call.op in ("hard_concrete", "sample_masks"):
            if call.dtype != torch.float32:
                why.append(f"log_alpha dtype {call.dtype} is not float32")
            if call.op == "sample_masks" and call.n_readers * call.n_writers > _INT32_MAX:
                why.append(f"{call.n_readers} x {call.n_writers} masks: more than 2**31 - 1 "
                           "in one call")
        else:
            why.append(f"unknown op {call.op!r}")
        return why

    # -- kernels (imported on first use) -----------------------------------------

    @staticmethod
    def _ms():
        return importlib.import_module("fastedge.kernels.masked_sum")

    @staticmethod
    def _hc():
        return importlib.import_module("fastedge.kernels.hard_concrete")

    # -- masked writer sum ---------------------------------------------------------

    def masked_sum_forward(self, x, m, base, base_index, out, fast: bool = False) -> None:
        with _on_device(x):
            self._ms().masked_sum_fwd(x, m, base, base_index, out, split=not fast)

    def masked_sum_backward_stack(self, m, dout, dx, fast: bool = False) -> None:
        with _on_device(dout):
            self._ms().masked_sum_bwd_stack(m, dout, dx, split=not fast)

    def masked_sum_backward_mask(self, x, dout, live_mask=None, fast: bool = False) -> torch.Tensor:
        with _on_device(x):
            return self._ms().masked_sum_bwd_mask(x, dout, mask=live_mask, split=not fast)

    # -- hard concrete ---------------------------------------------------------------

    def hard_concrete_forward(self, log_alpha, u, training: bool) -> torch.Tensor:
        with _on_device(log_alpha):
            return self._hc().hard_concrete_forward(log_alpha, u, training)

    def hard_concrete_backward(self, log_alpha, u, training: bool, dz) -> torch.Tensor:
        with _on_device(log_alpha):
            return self._hc().hard_concrete_backward(log_alpha, u, training, dz)

    def sample_masks(self, edge_log_alpha, node_log_alpha, seed: int, reader_offset: int,
                     training: bool):
        with _on_device(edge_log_alpha):
            return self._hc().sample_masks(edge_log_alpha, node_log_alpha, seed,
                                           reader_offset, training)

    def sample_masks_backward(self, edge_log_alpha, node_log_alpha, seed: int,
                              reader_offset: int, training: bool, dm, dedge_sum):
        with _on_device(edge_log_alpha):
            return self._hc().sample_masks_backward(edge_log_alpha, node_log_alpha, seed,
                                                    reader_offset, training, dm, dedge_sum)
