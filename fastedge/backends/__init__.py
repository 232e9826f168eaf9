"""Backends and the dispatcher that chooses one per call.

Priority: on a CUDA device `triton` (the GPU default), then `cuda`, `torch`,
`reference`; on the CPU `torch`, then `reference` (and `triton` under
TRITON_INTERPRET=1). `FASTEDGE_BACKEND=<name>` forces one backend. Every
backend answers `reasons(call)`; the first with no reasons runs the call, and
when none can, the error lists every backend with its reasons.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from fastedge.backends.base import Backend, Call

BACKEND_NAMES = ("reference", "torch", "triton", "cuda")
_MODULES = {
    "reference": ("fastedge.backends.reference", "ReferenceBackend"),
    "torch": ("fastedge.backends.torch_backend", "TorchBackend"),
    "triton": ("fastedge.backends.triton_backend", "TritonBackend"),
    "cuda": ("fastedge.backends.cuda_backend", "CudaBackend"),
}
_instances: dict[str, Backend] = {}


class NoBackendError(RuntimeError):
    """No backend can run a call; the message lists each backend's reasons."""


def get_backend(name: str) -> Backend:
    if name not in _MODULES:
        raise ValueError(f"unknown fastedge backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name not in _instances:
        module_name, class_name = _MODULES[name]
        _instances[name] = getattr(importlib.import_module(module_name), class_name)()
    return _instances[name]


def forced_backend_name() -> Optional[str]:
    name = os.environ.get("FASTEDGE_BACKEND", "").strip().lower()
    if not name or name == "auto":
        return None
    if name not in _MODULES:
        raise ValueError(f"FASTEDGE_BACKEND={name!r} is not a backend; choose one of "
                         f"{', '.join(BACKEND_NAMES)} (or leave it unset)")
    return name


def priority(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["triton", "cuda", "torch", "reference"]
    return ["torch", "reference", "triton", "cuda"]


def _describe(call: Call) -> str:
    parts = [f"op={call.op}", f"device={call.device}", f"dtype={call.dtype}"]
    if call.op != "hard_concrete":
        parts += [f"readers={call.n_readers}", f"writers={call.n_writers}"]
    if call.n_elements:
        parts.append(f"elements={call.n_elements}")
    return ", ".join(parts)


def select(call: Call, backend: Optional[str] = None) -> Backend:
    """The backend that runs `call`: `backend` if given, else FASTEDGE_BACKEND,
    else the first backend in priority order that accepts the call."""
    forced = backend or forced_backend_name()
    names = [forced] if forced else priority(call.device)
    refusals = []
    for name in names:
        try:
            candidate = get_backend(name)
            reasons = candidate.reasons(call)
        except Exception as exc:  # a backend that fails to load refuses with the reason
            reasons = [f"failed to load: {type(exc).__name__}: {exc}"]
        if not reasons:
            return candidate
        refusals.append(f"  {name}: " + "; ".join(reasons))
    how = f"the forced backend {forced!r} cannot" if forced else "no fastedge backend can"
    raise NoBackendError(f"{how} run this call ({_describe(call)}):\n" + "\n".join(refusals))


def explain(call: Call) -> dict[str, list[str]]:
    """Every backend's reasons for refusing `call` (empty list: it would run it)."""
    out = {}
    for name in BACKEND_NAMES:
        try:
            out[name] = get_backend(name).reasons(call)
        except Exception as exc:
            out[name] = [f"failed to load: {type(exc).__name__}: {exc}"]
    return out


__all__ = ["Backend", "Call", "NoBackendError", "BACKEND_NAMES", "get_backend", "select",
           "explain", "priority", "forced_backend_name"]
