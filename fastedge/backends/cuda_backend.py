"""`cuda` backend: the hand-written CUDA kernels of `csrc/`, called through the
PyTorch operators `torch.ops.fastedge_cuda.*` (registered by csrc/binding.cpp).

The extension is found lazily, on the first call that could use it (from
`reasons` or an op), never at import time:

1. `fastedge._cuda`, built by setup.py when a CUDA build of PyTorch and nvcc
   were present at install time;
2. otherwise, on a machine with a CUDA build of PyTorch and a CUDA toolkit, a
   just-in-time build of csrc/ with `torch.utils.cpp_extension.load` (through
   ninja; cached under TORCH_EXTENSIONS_DIR), unless `FASTEDGE_CUDA_JIT=0`.
   `FASTEDGE_CUDA_ARCHS` ("80;90" by default) picks the target architectures,
   as in setup.py; `FASTEDGE_CUDA_JIT_VERBOSE=1` shows the build.

When neither works, `reasons` says why and the dispatcher moves on to the next
backend. Kernel design and the numbers behind it: csrc/fastedge_kernels.cu.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import torch

from fastedge.backends.base import Backend, Call

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_SOURCES = ("binding.cpp", "fastedge_kernels.cu")
JIT_NAME = "fastedge_cuda_jit"
# The fused sampler tiles readers by 64 along a grid axis limited to 65535 blocks.
MAX_SAMPLER_READERS = 65535 * 64

_lock = threading.Lock()
_load_state: dict = {"done": False, "error": None, "source": None}


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension cannot be loaded here; the message says why."""


def _cuda_archs() -> list[str]:
    raw = os.environ.get("FASTEDGE_CUDA_ARCHS", "80;90")
    archs = [a.strip().replace("sm_", "") for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ExtensionUnavailable(f"FASTEDGE_CUDA_ARCHS={raw!r}: expected a list like '80;90'")
    return archs


def _jit_build() -> None:
    from torch.utils.cpp_extension import CUDA_HOME, load

    if CUDA_HOME is None:
        raise ExtensionUnavailable("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    sources = [_CSRC / name for name in _SOURCES]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise ExtensionUnavailable(f"the CUDA sources are not installed ({', '.join(missing)} "
                                   "missing; use an editable install)")
    archs = _cuda_archs()
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the newest target too, so that a newer GPU can still run the kernels
    # (compiled by the driver on first use); the cubins cover the listed ones.
    newest = max(archs, key=int)
    gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    load(
        name=JIT_NAME,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(_CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", *gencode],
        verbose=os.environ.get("FASTEDGE_CUDA_JIT_VERBOSE", "") == "1",
    )


def _short(exc: BaseException) -> str:
    """First line of an exception's message (build logs are long)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load() -> str:
    if torch.version.hip is not None:
        raise ExtensionUnavailable("this PyTorch is a ROCm build (the kernels are CUDA only)")
    if torch.version.cuda is None:
        raise ExtensionUnavailable("this PyTorch is a CPU build")
    try:
        import fastedge._cuda  # noqa: F401  (importing registers torch.ops.fastedge_cuda)
        return "fastedge._cuda"
    except ImportError as exc:
        not_built = _short(exc)
    if os.environ.get("FASTEDGE_CUDA_JIT", "").strip() == "0":
        raise ExtensionUnavailable(f"the extension is not built ({not_built}) and "
                                   "FASTEDGE_CUDA_JIT=0 forbids building it just in time")
    try:
        _jit_build()
    except ExtensionUnavailable as exc:
        raise ExtensionUnavailable(f"the extension is not built and JIT is unavailable: {exc}") from exc
    except Exception as exc:  # compiler errors, missing ninja, ...
        raise ExtensionUnavailable(f"the extension is not built and the JIT build failed: "
                                   f"{_short(exc)}") from exc
    return JIT_NAME


def load_extension() -> str:
    """Load the extension once (thread-safe); return where it came from, or
    raise ExtensionUnavailable with the reason (remembered for later calls)."""
    with _lock:
        if not _load_state["done"]:
            try:
                _load_state["source"] = _load()
            except ExtensionUnavailable as exc:
                _load_state["error"] = str(exc)
            _load_state["done"] = True
        if _load_state["error"] is not None:
            raise ExtensionUnavailable(_load_state["error"])
        return _load_state["source"]


def _ops():
    load_extension()
    return torch.ops.fastedge_cuda


def _seed_arg(seed: int) -> int:
    """The seed's 64 key bits as the signed 64-bit int the operator schema takes
    (philox.py uses seed mod 2**64 as the key)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _offset_arg(reader_offset: int) -> int:
    """Reader offsets only matter mod 2**32 (philox.py masks the counter word)."""
    return int(reader_offset) & 0xFFFFFFFF


class CudaBackend(Backend):
    name = "cuda"

    def reasons(self, call: Call) -> list[str]:
        reasons = []
        if call.device.type != "cuda":
            reasons.append(f"device is {call.device.type} (needs a CUDA tensor)")
        if torch.version.cuda is None and torch.version.hip is None:
            reasons.append("this PyTorch is a CPU build")
        if call.op == "masked_sum":
            if call.dtype not in _STORAGE_DTYPES:
                reasons.append(f"dtype {call.dtype} is not supported (float32, bfloat16, float16)")
            elif call.grad_dtype is not None and call.grad_dtype not in (torch.float32, call.dtype):
                reasons.append(f"stack gradient dtype {call.grad_dtype} must be float32 or "
                               f"{call.dtype}")
            if call.row_stride is not None and call.row_stride < call.n_elements:
                reasons.append(f"the stack's rows overlap in memory (row stride {call.row_stride} "
                               f"< {call.n_elements} elements per writer, as in an expanded tensor)")
        elif call.op in ("hard_concrete", "sample_masks"):
            if call.dtype != torch.float32:
                reasons.append(f"log_alpha dtype {call.dtype} is not supported (float32 only)")
            if call.op == "sample_masks" and call.n_readers > MAX_SAMPLER_READERS:
                reasons.append(f"{call.n_readers} readers in one call; the sampler takes at most "
                               f"{MAX_SAMPLER_READERS}")
        else:
            reasons.append(f"unknown op {call.op!r}")
        if reasons:  # no need to load (or build) anything to refuse
            return reasons
        try:
            load_extension()
        except ExtensionUnavailable as exc:
            return [str(exc)]
        return []

    # -- masked writer sum -------------------------------------------------
    def masked_sum_forward(self, x, m, base, base_index, out, fast=False) -> None:
        _ops().masked_sum_forward(x, m, base, base_index, out)

    def masked_sum_backward_stack(self, m, dout, dx, fast=False) -> None:
        _ops().masked_sum_backward_stack(m, dout, dx)

    def masked_sum_backward_mask(self, x, dout, live_mask=None, fast=False) -> torch.Tensor:
        return _ops().masked_sum_backward_mask(x, dout)

    # -- hard concrete (elementwise) ---------------------------------------
    def hard_concrete_forward(self, log_alpha, u, training: bool) -> torch.Tensor:
        return _ops().hard_concrete_forward(log_alpha, u if training else None, bool(training))

    def hard_concrete_backward(self, log_alpha, u, training: bool, dz) -> torch.Tensor:
        return _ops().hard_concrete_backward(log_alpha, u if training else None, bool(training),
                                             dz)

    # -- fused sampling for the masked sum ---------------------------------
    def sample_masks(self, edge_log_alpha, node_log_alpha, seed: int, reader_offset: int,
                     training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        m, edge_sum = _ops().sample_masks(edge_log_alpha, node_log_alpha, _seed_arg(seed),
                                          _offset_arg(reader_offset), bool(training))
        return m, edge_sum

    def sample_masks_backward(self, edge_log_alpha, node_log_alpha, seed: int,
                              reader_offset: int, training: bool, dm, dedge_sum
                              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if isinstance(dedge_sum, torch.Tensor):
            dedge_sum = dedge_sum.detach().to(device=dm.device, dtype=torch.float32).reshape(())
        else:
            dedge_sum = torch.tensor(float(dedge_sum), dtype=torch.float32, device=dm.device)
        d_edge, d_node = _ops().sample_masks_backward(
            edge_log_alpha, node_log_alpha, _seed_arg(seed), _offset_arg(reader_offset),
            bool(training), dm.contiguous(), dedge_sum)
        return d_edge, (d_node if node_log_alpha is not None else None)
