"""A fused row norm (RMSNorm or LayerNorm) as a `torch.library` custom op,
for the readers' norms of `fastedge.model.EdgeModel`.

Layers (STYLE.md): the Triton kernels and launchers in `fastedge.kernels.norms`;
the plain-PyTorch reference (`norm_reference`), the backend choice, and the
registered ops with their fake kernels and autograd here; the public
function `fused_norm` at the bottom.

Registered ops (namespace `fastedge`):

* `norm(x, weight, bias, eps, rms, backend) -> y`
* `norm_backward(x, weight, dy, eps, rms, backend) -> dx`

The autograd formula saves only x (and the weight): the backward recomputes
the row statistics, as `EdgeModel(lean_norm=True)` does for the module.
The weight and bias get no gradient (see `fused_norm`).

Backends: ``triton`` (the kernels; on a CUDA device, or on the CPU under
TRITON_INTERPRET=1) and ``torch`` (`norm_reference`: the same ops Hugging
Face's modules run). The automatic choice is ``triton`` on a CUDA device when
it can run the call, else ``torch``; FASTEDGE_BACKEND=triton (or torch,
reference) forces it, and FASTEDGE_BACKEND=cuda, which has no norm kernel,
leaves the automatic choice.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_KINDS = ("rms", "layer")
NORM_BACKENDS = ("triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_D = 8192  # fastedge.kernels.norms.MAX_D (not imported here: importing it imports Triton)


# -- the plain-PyTorch reference -------------------------------------------------------


def norm_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                   rms: bool) -> Tensor:
    """The norm by the ops Hugging Face's modules run, over the last dimension.

    RMSNorm, as `LlamaRMSNorm.forward` (Mistral's and Qwen2's are the same):
    float32 statistics, the normalised value cast back to x's dtype, then
    multiplied by the weight. LayerNorm: `torch.nn.functional.layer_norm`,
    as `nn.LayerNorm` (GPT-2, GPT-NeoX). Differentiable by autograd."""
    if not rms:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def norm_reference_backward(x: Tensor, weight: Tensor, dy: Tensor, eps: float, rms: bool) -> Tensor:
    """dx of `norm_reference` given dy, by the very ops autograd runs through
    it (so equal to autograd's dx bit for bit), written out: the registered
    backward runs below autograd and cannot record a graph of its own.

    RMSNorm, step by step backwards through `norm_reference`: ``weight *
    n16`` gives ``dy * weight`` (in x's dtype); the cast, float32; ``h *
    r`` gives ``g * r`` to h and ``sum(g * h)`` to r; ``rsqrt`` gives ``-0.5
    * grad * r^3``; ``mean`` spreads it divided by D; ``pow(2)`` multiplies by
    ``2 * h``; the two gradients of h add, and the first cast takes them back
    to x's dtype. LayerNorm: ATen's own layer-norm backward."""
    if not rms:
        D = x.shape[-1]
        _, mean, rstd = torch.ops.aten.native_layer_norm(x, [D], weight, None, eps)
        return torch.ops.aten.native_layer_norm_backward(dy, x, [D], mean, rstd, weight, None,
                                                         [True, False, False])[0]
    h = x.to(torch.float32)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    g = (dy * weight).to(torch.float32)
    grad_r = (g * h).sum(-1, keepdim=True)
    grad_var = -0.5 * grad_r * r.pow(3)
    grad_sq = grad_var.expand(h.shape) / h.shape[-1]
    return (g * r + grad_sq * (2 * h)).to(x.dtype)


# -- backend choice ------------------------------------------------------------------------


def _kernels():
    return importlib.import_module("fastedge.kernels.norms")


def triton_reasons(x: Tensor, weight: Tensor) -> list[str]:
    """Why the Triton kernels cannot run this call (empty when they can)."""
    from fastedge.backends.triton_backend import _interpret_env, _triton_import_error
    err = _triton_import_error()
    if err:
        return [err]
    why = []
    if x.device.type == "cpu":
        loaded = sys.modules.get("fastedge.kernels.norms")
        if not _interpret_env():
            why.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
        elif loaded is not None and not loaded._interpreted(loaded._norm_fwd_kernel):
            why.append("the Triton norm kernels were compiled for the GPU (imported before "
                       "TRITON_INTERPRET=1 was set); CPU tensors cannot run them")
    elif x.device.type != "cuda":
        why.append(f"device type {x.device.type!r} is not supported (CUDA, or CPU under "
                   "TRITON_INTERPRET=1)")
    if x.dtype not in _TRITON_DTYPES:
        why.append(f"dtype {x.dtype} is not float32, bfloat16 or float16")
    if x.shape[-1] > MAX_D:
        why.append(f"rows of {x.shape[-1]} elements: the kernels hold a row in one block of "
                   f"at most {MAX_D}")
    return why


def auto_backend(x: Tensor, weight: Tensor) -> str:
    """The backend a call without one runs on: FASTEDGE_BACKEND when it names
    a backend with a norm (triton; torch or reference both mean ``torch``),
    else ``triton`` on a CUDA device that it can run, else ``torch``."""
    from fastedge.backends import forced_backend_name
    forced = forced_backend_name()
    if forced == "triton":
        return "triton"
    if forced in ("torch", "reference"):
        return "torch"
    if x.device.type == "cuda" and not triton_reasons(x, weight):
        return "triton"
    return "torch"


def _choose(x: Tensor, weight: Tensor, backend: str) -> str:
    name = backend or auto_backend(x, weight)
    if name == "triton":
        reasons = triton_reasons(x, weight)
        if reasons:
            raise RuntimeError(f"the triton backend cannot run this norm (x {tuple(x.shape)} "
                               f"{x.dtype} on {x.device}): " + "; ".join(reasons))
    return name


def _rows(x: Tensor) -> Tensor:
    """[*, D] -> [M, D] with unit inner stride (a view when it can be)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


# -- registered ops ----------------------------------------------------------------------


@torch.library.custom_op("fastedge::norm", mutates_args=())
def norm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool,
            backend: str) -> Tensor:
    if _choose(x, weight, backend) == "torch":
        return norm_reference(x, weight, bias, eps, rms).contiguous()
    y = _kernels().norm_fwd(_rows(x), weight.contiguous(),
                            None if bias is None else bias.contiguous(), eps, rms)
    return y.view(x.shape)


@norm_op.register_fake
def _(x, weight, bias, eps, rms, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastedge::norm_backward", mutates_args=())
def norm_backward_op(x: Tensor, weight: Tensor, dy: Tensor, eps: float, rms: bool,
                     backend: str) -> Tensor:
    """dx (x's shape and dtype) of `norm` at x, given dy."""
    if _choose(x, weight, backend) == "torch":
        return norm_reference_backward(x, weight, dy, eps, rms).contiguous()
    dx = _kernels().norm_bwd(_rows(x), weight.contiguous(), dy.reshape(-1, x.shape[-1]).contiguous(),
                             eps, rms)
    return dx.view(x.shape)


@norm_backward_op.register_fake
def _(x, weight, dy, eps, rms, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, weight, bias, eps, rms, backend = inputs
    ctx.eps, ctx.rms, ctx.backend = eps, rms, backend
    ctx.save_for_backward(x, weight)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = norm_backward_op(x, weight, dy, ctx.eps, ctx.rms, ctx.backend)
    return dx, None, None, None, None, None


norm_op.register_autograd(_backward, setup_context=_setup)


# -- the public function ---------------------------------------------------------------


def fused_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, eps: float,
               kind: str, backend: Optional[str] = None) -> Tensor:
    """RMSNorm or LayerNorm over the last dimension, forward and input
    gradient in one kernel each, with Hugging Face's roundings.

    ``kind="rms"``: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``
    with fp32 statistics (`LlamaRMSNorm`, Mistral's, Qwen2's).
    ``kind="layer"``: ``(x - mean) * rsqrt(var + eps) * weight + bias`` in
    fp32, rounded once (`nn.LayerNorm`: GPT-2, GPT-NeoX).

    Args:
        x: ``[*, D]``, float32, bfloat16 or float16 (float64 on the ``torch``
            backend); D at most 8,192 on the ``triton`` backend.
        weight: ``[D]`` in x's dtype; must not require grad (the op gives the
            weight and bias no gradient: fastedge's models are frozen).
        bias: ``[D]`` in x's dtype (LayerNorm only), or None.
        eps: the module's epsilon (``variance_epsilon`` or ``eps``).
        backend: ``triton`` or ``torch``; default: `auto_backend`.

    Returns:
        ``[*, D]`` contiguous, in x's dtype; differentiable in x. Its
        backward saves only x and recomputes the row statistics.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(NORM_KINDS)}, got {kind!r}")
    if backend is not None and backend not in NORM_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(NORM_BACKENDS)} (or None), "
                         f"got {backend!r}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be a tensor [*, D] with D >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    D = x.shape[-1]
    rms = kind == "rms"
    if rms and bias is not None:
        raise ValueError("an RMSNorm has no bias")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != (D,):
            raise ValueError(f"{name} must be a [{D}] tensor (x is {tuple(x.shape)}), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.requires_grad:
            raise ValueError(f"{name} requires grad, but the fused norm gives the weight and bias "
                             f"no gradient (it is for frozen models); use the module")
    return norm_op(x, weight, bias, float(eps), rms, backend or "")
