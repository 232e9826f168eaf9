"""Error bounds of the op tests, derived from what each backend claims.

Every matrix op of the masked writer sum is a sum of products with an
optional addend, accumulated in fp32 (float64 for float64 inputs) and, for a
16-bit result, rounded once to the result dtype:

    forward   out[r, n] = base[g(r), n] + sum_w m[r, w] x[w, n]       p = m,    q = x
    d stack   dx[w, n]  = dx0[w, n]     + sum_r m[r, w] dout[r, n]    p = m^T,  q = dout
    d mask    dm[r, w]  =                 sum_n dout[r, n] x[w, n]    p = dout, q = x^T

Against the float64 value v of the same sum (exact inputs), each element obeys

    |got - v| <= pre + out_unit * (|v| + pre) + out_abs
    pre        = gamma(n) * growth * (|a| + sum_k |p_k| |q_k|)
               + sum_k (mask_rel |p_k| + mask_abs) |q_k|

* Accumulation. gamma(n) = n u / (1 - n u) bounds the error of an inner
  product of n terms in any order, products rounded or exact (Higham,
  "Accuracy and Stability of Numerical Algorithms", section 3.1), relative to
  the sum of |terms|. n = products_per_term * K + 1 (the addend), and
  u = 2**-23 for fp32: one ulp per operation rather than half, because tensor
  cores add inside an MMA with truncation, not rounding to nearest (Fasi,
  Higham, Mikaitis, Pranesh 2021). float64 takes u = 2**-52 likewise.
* The mask's precision (mask_rel, mask_abs): how far each factor p_k the
  kernel multiplies can be from the exact one, relative and absolute.
    - fp32 FMA (cuda, torch, reference, and Triton's R < 16 paths): the fp32
      mask itself, mask_rel = 0 (the product's rounding is inside gamma).
    - Triton, 16-bit stack: m = hi + lo, hi = rnd(m), lo = rnd(m - hi) in the
      storage dtype (rounded to nearest, on the bits, interpreted or not),
      m - hi exact in fp32. With unit roundoff t of one rounding (2**-8 bf16,
      2**-11 fp16): |m - hi| <= t |m|, |(m - hi) - lo| <= t |m - hi|, so
      |m - hi - lo| <= t**2 |m|: 2**-16 (bf16), 2**-22 (fp16). fp16 also
      underflows: hi and lo below 2**-14 are subnormals spaced 2**-24, hence
      mask_abs = 2**-25 (half a spacing). Both halves' products are exact in
      fp32: products_per_term = 2. (Tiles whose lo is all zero skip the lo
      product: exact, since then m = hi.)
    - Triton, fp32 stack: both operands split into two tf32 parts (11-bit
      significands, rounded to nearest; tf32x3 in the mask backward): each
      split leaves 2**-22, and the dropped lo*lo product is at most 2**-22, so
      each product carries 3 * 2**-22 plus second-order terms:
      mask_rel = 2**-20, products_per_term = 3.
    - Triton with precision="fast": one product, the mask rounded once:
      mask_rel = t (2**-8 bf16, 2**-11 fp16); fp32 rounds both operands to
      tf32: (1 + 2**-11)**2 - 1. The other backends ignore "fast".
    - d mask multiplies two storage-dtype values: exact in fp32 for 16 bits,
      the tf32x3 figure for Triton's fp32.
  `growth` = 1 + 2**-6 bounds |hi| + |lo| (or the tf32 parts) by |m|.
* The result's rounding: out_unit = t of the result dtype (to nearest: half
  an ulp; a truncating store, the interpreter's bf16: a whole ulp), 0 for an
  fp32 result of fp32 accumulation; out_abs covers the subnormal range.

`claim(backend, device, dtype, op, precision=...)` returns the claim of one
backend; it is the only place claims are written. To check another design,
pass a changed claim: `replace(c, mask_rel=2**-8, products_per_term=1)`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

F32_ACC_UNIT = 2.0 ** -23
F64_ACC_UNIT = 2.0 ** -52
SPLIT_GROWTH = 1.0 + 2.0 ** -6

# Significand bits (with the implicit one) of the 16-bit dtypes.
_PRECISION = {torch.bfloat16: 8, torch.float16: 11}
# The Triton interpreter converts fp32 to bf16 by truncation (stores and
# .to() alike); fp16 conversions round to nearest. (STYLE.md; measured.) The
# masked-sum kernels round bf16 on the bits before they narrow (the mask
# split, `rounding.to_storage` for every store), so nothing of theirs truncates: the
# interpreter is held to the half ulp a GPU gives.
_INTERPRETER_TRUNCATES = ()


@dataclass(frozen=True)
class Claim:
    """What a backend claims for one op in one dtype (see the module docstring)."""
    acc_unit: float            # per-operation error of the accumulation
    products_per_term: int     # 1 (fp32 FMA), 2 (hi + lo), 3 (tf32x3)
    mask_rel: float            # relative error of each factor p_k as multiplied
    mask_abs: float            # absolute error of each factor p_k
    out_unit: float = 0.0      # relative error of the final rounding (0: none)
    out_abs: float = 0.0       # absolute error of the final rounding (subnormals)


def rounding_unit(dtype: torch.dtype, truncates: bool = False) -> float:
    """Unit roundoff of one conversion from fp32 to `dtype` (0 for fp32 and wider)."""
    if dtype not in _PRECISION:
        return 0.0
    t = 2.0 ** -_PRECISION[dtype]
    return 2 * t if truncates else t


def _subnormal(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def claim(backend: str, device: str, dtype: torch.dtype, op: str,
          result_dtype: Optional[torch.dtype] = None, precision: str = "full") -> Claim:
    """The claim of `backend` running on `device` ("cpu": the Triton
    interpreter for `triton`) for `op` in ("forward", "d_stack", "d_mask") on
    a stack of `dtype`; `result_dtype` is what the result is stored in
    (default: the stack dtype, fp32 for d_mask); `precision` as
    `fastedge.masked_writer_sum`'s ("full" or "fast")."""
    if op not in ("forward", "d_stack", "d_mask"):
        raise ValueError(f"unknown op {op!r}")
    if precision not in ("full", "fast"):
        raise ValueError(f"unknown precision {precision!r}")
    if result_dtype is None:
        result_dtype = torch.float32 if op == "d_mask" and dtype != torch.float64 else dtype
    interpreted = backend == "triton" and device == "cpu"
    truncates = interpreted and result_dtype in _INTERPRETER_TRUNCATES
    out_unit = rounding_unit(result_dtype, truncates)
    out_abs = 0.0 if out_unit == 0 else _subnormal(result_dtype) * (1.0 if truncates else 0.5)
    if dtype == torch.float64:
        return Claim(F64_ACC_UNIT, 1, 0.0, 0.0)
    base = dict(acc_unit=F32_ACC_UNIT, out_unit=out_unit, out_abs=out_abs)
    if backend in ("reference", "torch", "cuda"):
        return Claim(products_per_term=1, mask_rel=0.0, mask_abs=0.0, **base)
    if backend != "triton":
        raise ValueError(f"no claim for backend {backend!r}")
    fast = precision == "fast"
    if dtype == torch.float32:  # operands split into tf32 halves (d_mask: tf32x3), or one tf32 product
        if fast:
            return Claim(products_per_term=1, mask_rel=(1 + 2.0 ** -11) ** 2 - 1, mask_abs=0.0, **base)
        return Claim(products_per_term=3, mask_rel=2.0 ** -20, mask_abs=0.0, **base)
    if op == "d_mask":  # exact 16-bit products
        return Claim(products_per_term=1, mask_rel=0.0, mask_abs=0.0, **base)
    t = rounding_unit(dtype)
    # bf16 has fp32's exponent range (masks never underflow); fp16's halves do.
    mask_abs = 0.0 if dtype == torch.bfloat16 else 0.5 * _subnormal(dtype)
    if fast:
        return Claim(products_per_term=1, mask_rel=t, mask_abs=mask_abs, **base)
    return Claim(products_per_term=2, mask_rel=t * t, mask_abs=mask_abs, **base)


def gamma(n: int, unit: float) -> float:
    nu = n * unit
    assert nu < 0.5, f"{n} operations at unit {unit}: no useful bound"
    return nu / (1 - nu)


def sum_bound(p: torch.Tensor, q: torch.Tensor, addend: Optional[torch.Tensor],
              c: Claim, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |got - ref| for got = round(addend + p @ q)
    computed under claim `c`; p [I, K], q [K, J], addend [I, J] or None, ref
    [I, J] the float64 value. Every sum of |terms| is taken in float64."""
    p, q, ref = p.double().cpu(), q.double().cpu(), ref.double().cpu()
    K = p.shape[1]
    terms = p.abs() @ q.abs()
    if addend is not None:
        terms = terms + addend.double().cpu().abs()
    n = c.products_per_term * K + (addend is not None)
    growth = SPLIT_GROWTH if c.products_per_term > 1 else 1.0
    pre = gamma(max(n, 1), c.acc_unit) * growth * terms
    if c.mask_rel or c.mask_abs:
        pre = pre + (c.mask_rel * p.abs() + c.mask_abs) @ q.abs()
    return pre + c.out_unit * (ref.abs() + pre) + c.out_abs


def max_error(got: torch.Tensor, ref64: torch.Tensor) -> float:
    return (got.double().cpu() - ref64.double().cpu()).abs().max().item()


def assert_within(got: torch.Tensor, ref64: torch.Tensor, bound: torch.Tensor,
                  what: str = "") -> None:
    """Every element of `got` within `bound` of the float64 `ref64`; the message
    names the worst element and how much of its bound it used."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    got64 = got.detach().double().cpu()
    assert torch.isfinite(got64).all(), f"{what}: non-finite values (an element was not written?)"
    err = (got64 - ref64.double().cpu()).abs()
    bound = bound.double().cpu().expand_as(err)
    over = err - bound
    log = os.environ.get("FASTEDGE_BOUND_LOG")
    if log:  # how much of its bound each check uses, for reports
        with open(log, "a") as f:
            f.write(f"{what}\t{(err / bound.clamp_min(1e-300)).max().item():.4g}\t"
                    f"{err.max().item():.4g}\t{bound.max().item():.4g}\n")
    if (over > 0).any():
        i = int(over.reshape(-1).argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(
            f"{what}: {int((over > 0).sum())} of {err.numel()} elements beyond the claimed bound; "
            f"worst at {idx}: error {err.reshape(-1)[i]:.3g} > bound {bound.reshape(-1)[i]:.3g} "
            f"(value {ref64.reshape(-1)[i].item():.4g})")


def bound_ratio(got: torch.Tensor, ref64: torch.Tensor, bound: torch.Tensor) -> float:
    """max error / bound over the elements (how much of its bound a result uses)."""
    err = (got.detach().double().cpu() - ref64.double().cpu()).abs()
    return (err / bound.double().cpu().clamp_min(1e-300)).max().item()


__all__ = ["Claim", "claim", "gamma", "sum_bound", "assert_within", "bound_ratio", "max_error",
           "rounding_unit", "replace"]


# -- ops without a derived claim (the fused norm): flash-attention's rule ----------------------

# floor, as a multiple of max(1, max |reference|)
PLAIN_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 4e-6,
    torch.bfloat16: 8e-3,
    torch.float16: 1e-3,
}
PLAIN_RATIO = 2.0


def assert_matches_reference(got: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor,
                             dtype: torch.dtype, what: str = "") -> None:
    """The error of `got` against float64 is at most twice the error of plain
    PyTorch computing the same thing in the same dtype, plus a floor of a few
    ulps of the result's scale (a lucky plain result cannot make the bound 0).
    For ops whose every rounding is the plain computation's own (the fused
    norm reproduces Hugging Face's), where no accumulation claim applies."""
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element was not written?)"
    scale = max(1.0, ref64.abs().max().item())
    err = max_error(got, ref64)
    err_plain = max_error(plain, ref64)
    bound = PLAIN_RATIO * err_plain + PLAIN_FLOOR[dtype] * scale
    assert err <= bound, (f"{what}: error {err:.3g} > bound {bound:.3g} "
                          f"(plain PyTorch {dtype} error {err_plain:.3g}, scale {scale:.3g})")
