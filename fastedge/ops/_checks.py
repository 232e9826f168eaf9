"""Argument checks shared by the public ops: every malformed call gets an
error that names the argument and the problem, before any backend runs."""
from __future__ import annotations

from typing import Optional

import torch

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASK_DTYPES = (torch.float32, torch.float64)


def _fmt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(**tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_stack(stack: torch.Tensor, n_writers: int) -> None:
    check_tensor("stack", stack, min_ndim=1)
    if stack.dtype not in STORAGE_DTYPES:
        raise TypeError(f"stack must be float32, bfloat16, float16 or float64, got {_fmt(stack.dtype)}")
    if n_writers > stack.shape[0]:
        raise ValueError(f"mask reads {n_writers} writers but stack has only {stack.shape[0]} "
                         f"(stack shape {tuple(stack.shape)})")
    if stack[0].numel() == 0:
        raise ValueError(f"stack has no elements per writer (shape {tuple(stack.shape)})")


def check_mask(mask: torch.Tensor, stack: torch.Tensor, name: str = "mask") -> None:
    check_tensor(name, mask, ndim=2)
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        raise ValueError(f"{name} must be [readers, writers] with at least one of each, "
                         f"got shape {tuple(mask.shape)}")
    want = torch.float64 if stack.dtype == torch.float64 else torch.float32
    if mask.dtype != want:
        raise TypeError(f"{name} must be {_fmt(want)} for a {_fmt(stack.dtype)} stack "
                        f"(masks and their arithmetic stay fp32), got {_fmt(mask.dtype)}")


def check_base(base: Optional[torch.Tensor], base_index: Optional[torch.Tensor],
               stack: torch.Tensor, n_readers: int) -> None:
    trailing = tuple(stack.shape[1:])
    if base is None:
        if base_index is not None:
            raise ValueError("base_index was given without base")
        return
    check_tensor("base", base)
    if base.dtype != stack.dtype:
        raise TypeError(f"base must have the stack's dtype {_fmt(stack.dtype)}, got {_fmt(base.dtype)}")
    if base_index is None:
        if tuple(base.shape) != trailing:
            raise ValueError(f"base must be [*T] = {list(trailing)} (shared by all readers) or "
                             f"[G, *T] with base_index; got shape {tuple(base.shape)}")
        return
    if tuple(base.shape[1:]) != trailing or base.dim() != len(trailing) + 1:
        raise ValueError(f"with base_index, base must be [G, *T] = [G, {', '.join(map(str, trailing))}], "
                         f"got shape {tuple(base.shape)}")
    check_tensor("base_index", base_index, ndim=1)
    if base_index.dtype.is_floating_point or base_index.dtype == torch.bool or base_index.is_complex():
        raise TypeError(f"base_index must be an integer tensor, got {_fmt(base_index.dtype)}")
    if base_index.shape[0] != n_readers:
        raise ValueError(f"base_index must have one entry per reader ({n_readers}), "
                         f"got shape {tuple(base_index.shape)}")
    # A value check reads the indices back (a sync on a GPU); it is skipped
    # while tracing, where the values are not known.
    if _has_values(base_index) and base_index.numel():
        lo, hi = int(base_index.min()), int(base_index.max())
        if lo < 0 or hi >= base.shape[0]:
            raise IndexError(f"base_index values must lie in [0, {base.shape[0]}) (base has "
                             f"{base.shape[0]} rows), got values in [{lo}, {hi}]")


def check_grad_stack(grad_stack: Optional[torch.Tensor], stack: torch.Tensor, n_writers: int) -> None:
    if grad_stack is None:
        return
    check_tensor("grad_stack", grad_stack, min_ndim=1)
    if tuple(grad_stack.shape[1:]) != tuple(stack.shape[1:]) or grad_stack.shape[0] < n_writers:
        raise ValueError(f"grad_stack must be [W', *T] with W' >= {n_writers} and T = "
                         f"{list(stack.shape[1:])}, got shape {tuple(grad_stack.shape)}")
    if grad_stack.dtype not in (torch.float32, stack.dtype):
        raise TypeError(f"grad_stack must be float32 or the stack's dtype {_fmt(stack.dtype)}, "
                        f"got {_fmt(grad_stack.dtype)}")
    if grad_stack.device != stack.device:
        raise ValueError(f"grad_stack is on {grad_stack.device} but stack is on {stack.device}")
    if grad_stack.requires_grad:
        raise ValueError("grad_stack must not require grad (it is a buffer the backward writes into)")
    inner = grad_stack[0]
    if not inner.is_contiguous():
        raise ValueError("grad_stack must be contiguous in its trailing dimensions")


def check_log_alpha(name: str, t: torch.Tensor) -> None:
    check_tensor(name, t)
    if t.dtype not in MASK_DTYPES:
        raise TypeError(f"{name} must be float32 (or float64 for the reference backend), got {_fmt(t.dtype)}")


def check_noise(name: str, u: torch.Tensor) -> None:
    """Hard-concrete noise must lie in the open interval (0, 1): log u - log(1 - u)
    is infinite at 0 and 1 and NaN outside. A value check (a sync on a GPU),
    skipped while tracing."""
    if not _has_values(u) or not u.numel():
        return
    bad = ~((u > 0) & (u < 1))   # also NaN
    if bool(bad.any()):
        flat = bad.reshape(-1).nonzero()
        i = int(flat[0])
        index = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), u.shape))
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {u.reshape(-1)[i].item()!r} "
                         f"at index {index if u.dim() != 1 else index[0]} ({flat.numel()} of {u.numel()} "
                         f"values outside)")


def check_seed(seed) -> int:
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    return seed


def _has_values(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import FakeTensor
    return not isinstance(t, FakeTensor) and not torch._C._functorch.is_functorch_wrapped_tensor(t)
