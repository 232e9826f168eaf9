"""Row norms in Triton: RMSNorm (Llama, Mistral, Qwen2) and LayerNorm (GPT-2,
GPT-NeoX), forward and input gradient, for the readers' norms.

    RMSNorm     n = cast(x * rsqrt(mean(x^2) + eps))        y = w * n
    LayerNorm   y = (x - mean(x)) * rsqrt(var(x) + eps) * w + b

over the last dimension D of x [M, D]. A layer's readers each apply the
layer's norm to their own input, so at CodeLlama-13B shape one call normalises
R x B x S = 120 x 8 x 72 rows of 5,120. Hugging Face's RMSNorm is a chain of
seven float32 elementwise ops (cast, pow, mean, rsqrt, mul, cast, mul) and
its autograd backward about as many again; here a row is read once, its
statistics kept in registers, and written once.

Layers (STYLE.md): `@triton.jit` helpers and the two kernels, then the launch
heuristic (`norm_config`, which the compile test uses too), the launchers
(`norm_fwd`, `norm_bwd`) and the cost contract (`norm_cost`) for the roofline
model.

Design
------
* Blocks of BLOCK_M rows with the whole hidden dimension in one block
  (BLOCK_D = D rounded up to a power of two, at most `MAX_D`): x is loaded
  once, the statistics are two row reductions in registers, and the output
  is stored once. Narrow rows (GPT-2's 768) take several rows per block so
  that each block moves a few thousand elements. A program walks up to
  `MAX_ROW_BLOCKS` blocks, reading the weight from L2 once.
* The backward gives dx only, from x and dy: it recomputes the statistics
  (one more reduction over the row it has loaded anyway), so the forward
  saves nothing but x. The weight and bias get no gradient: fastedge's model
  is frozen, and its readers' norms are the model's own modules (the public
  op refuses a weight that requires grad rather than return a wrong zero).
* Math in fp32; x, dy, y and dx are in the storage dtype (float32, bfloat16
  or float16), the weight and bias in the same dtype.

Rounding (matching Hugging Face where it shows)
-----------------------------------------------
* RMSNorm (`LlamaRMSNorm.forward`): the normalised value is rounded to the
  input dtype *before* the weight multiplies it (``weight *
  hidden_states.to(input_dtype)``), then the product is rounded again. The
  kernel does the same two roundings. In its backward, autograd forms the
  normalised value's gradient ``dy * w`` in the input dtype, rounded once;
  the kernel rounds it the same way before the rsqrt chain.
* LayerNorm (`torch.nn.functional.layer_norm`): PyTorch computes in fp32
  with the weight and bias applied in fp32 and rounds once at the end (also
  its backward, where ``dy * w`` stays fp32); so does the kernel.
* Rounding to bfloat16 is done on the bits (round to nearest, ties to even),
  because the Triton interpreter truncates fp32-to-bf16 conversions; the
  value is then exactly representable and the store is exact everywhere.
* What is left is the order of the fp32 row sums and the rsqrt (the GPU's is
  approximate, as in PyTorch's CUDA kernels): a few fp32 ulps of the
  statistics, which can move an output by one ulp of its dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .rounding import round_to

MAX_D = 8192                # the widest row held in one block (Llama-70B's hidden size)
ELEMENTS_PER_BLOCK = 4096  # narrow rows are batched up to this many elements per block
MAX_ROW_BLOCKS = 16          # blocks of rows one program walks (the weight from L2 once)
MIN_PROGRAMS = 1024          # ... as long as the grid keeps this many programs (8 per SM of an H200)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# -- jit helpers -------------------------------------------------------------------


@triton.jit
def _row_stats(x, mask, D, eps, RMS: tl.constexpr):
    """(x centred, or x itself for RMSNorm; rstd per row) of a [BLOCK_M,
    BLOCK_D] fp32 tile whose masked lanes hold 0. Sums are divided by D, as
    `mean` does."""
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    return xc, tl.rsqrt(var + eps)


@triton.jit
def _row_block(x_ptr, w_ptr, i, row_blocks, M, D, stride_x, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """(rows, mask, x, w) of this program's i-th block of BLOCK_M rows: x in
    fp32 (masked lanes 0) and the weight, loaded again per block (from L1)."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    rows = (tl.program_id(0).to(tl.int64) * row_blocks + i) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return rows, mask, x, w


# -- kernels -------------------------------------------------------------------------


@triton.jit
def _norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, D, stride_x, eps, row_blocks,
                     RMS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """y[m] = norm(x[m]) for `row_blocks` blocks of BLOCK_M rows; y
    contiguous [M, D]. The weight and bias are loaded per block, not held
    across blocks: after the first they come from this SM's L1, and holding
    them would take 16 more registers per thread at D = 8192."""
    dtype = y_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    for i in range(0, row_blocks):
        rows, mask, x, w = _row_block(x_ptr, w_ptr, i, row_blocks, M, D, stride_x, BLOCK_M, BLOCK_D)
        xc, rstd = _row_stats(x, mask, D, eps, RMS)
        if RMS:
            # Hugging Face: weight * (x * rstd).to(input_dtype)
            y = w[None, :] * round_to(xc * rstd[:, None], dtype)
        else:
            y = xc * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = round_to(y, dtype)
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(dtype), mask=mask)


@triton.jit
def _norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, M, D, stride_x, eps, row_blocks,
                     RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx[m] = d norm(x[m]) / dx applied to dy[m], the statistics recomputed
    from x; dy and dx contiguous [M, D].

    With g = dy * w and n = xc * rstd (xc = x, or x - mean for LayerNorm):
        RMSNorm     dx = rstd * (g - n * mean(g * n))
        LayerNorm   dx = rstd * (g - mean(g) - n * mean(g * n))
    """
    dtype = dx_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    for i in range(0, row_blocks):
        rows, mask, x, w = _row_block(x_ptr, w_ptr, i, row_blocks, M, D, stride_x, BLOCK_M, BLOCK_D)
        dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        xc, rstd = _row_stats(x, mask, D, eps, RMS)
        g = dy * w[None, :]
        if RMS:
            # autograd through `weight * n16` forms dL/dn16 in the input dtype
            g = round_to(g, dtype)
        n = xc * rstd[:, None]
        inner = g - n * (tl.sum(g * n, axis=1) / D)[:, None]
        if not RMS:
            inner -= (tl.sum(g, axis=1) / D)[:, None]
        dx = round_to(inner * rstd[:, None], dtype)
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dtype), mask=mask)


# -- launch heuristic ------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def norm_config(D: int, M: int = 0) -> dict:
    """Block sizes and warps for M rows of D elements (the compile test and
    the cost contract use this too): the whole row in one block, rows batched
    to about `ELEMENTS_PER_BLOCK` elements per block, one warp per 512
    elements (8 to 16 fp32 values of x per thread, 16 more of dy in the
    backward). Each program walks `ROW_BLOCKS` blocks of rows, so that the
    weight it re-reads per block (as large as a row) comes from its own L1
    after the first, not from L2, while keeping at least `MIN_PROGRAMS`
    programs to fill the GPU."""
    if not 1 <= D <= MAX_D:
        raise ValueError(f"rows of {D} elements: the norm kernels hold a row in one block of "
                         f"at most {MAX_D}")
    block_d = _pow2(D)
    block_m = max(1, ELEMENTS_PER_BLOCK // block_d)
    num_warps = min(16, max(1, block_m * block_d // 512))
    blocks = -(-max(0, int(M)) // block_m)
    row_blocks = max(1, min(MAX_ROW_BLOCKS, blocks // MIN_PROGRAMS))
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, ROW_BLOCKS=row_blocks,
                programs=-(-blocks // row_blocks), num_warps=num_warps, num_stages=1)


# -- launchers -----------------------------------------------------------------------------


def _interpreted(kernel) -> bool:
    """Whether `kernel` runs under TRITON_INTERPRET (decided when it was defined)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [M, D], got shape {tuple(x.shape)}")
    M, D = x.shape
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if D > 1 and M > 0 and x.stride(1) != 1:
        raise ValueError(f"x must have unit inner stride, got strides {x.stride()}")
    if M > 1 and x.stride(0) < D:
        raise ValueError(f"x rows overlap (stride {x.stride(0)} < {D})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if tuple(t.shape) != (D,) or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{D}], got shape {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")


def _check_out(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.dtype != like.dtype or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {tuple(like.shape)} {like.dtype}, got "
                         f"{tuple(t.shape)} {t.dtype}")


def norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
             rms: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y [M, D] = RMSNorm (`rms`) or LayerNorm of x [M, D] (unit inner stride,
    any row stride; float32, bfloat16 or float16) with weight [D] and, for
    LayerNorm, bias [D] or None, in x's dtype. `out`: contiguous [M, D] in
    x's dtype, allocated when None."""
    _check_args(x, weight, bias)
    if rms and bias is not None:
        raise ValueError("RMSNorm takes no bias")
    M, D = x.shape
    if out is None:
        out = torch.empty((M, D), dtype=x.dtype, device=x.device)
    _check_out("out", out, torch.empty((M, D), dtype=x.dtype, device="meta"))
    if M == 0:
        return out
    cfg = norm_config(D, M)
    _norm_fwd_kernel[(cfg["programs"],)](
        x, weight, bias if bias is not None else weight, out, M, D, x.stride(0), float(eps),
        cfg["ROW_BLOCKS"], RMS=bool(rms), HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def norm_bwd(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, eps: float, rms: bool,
             dx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dx [M, D] (x's dtype) of the norm `norm_fwd` computes, given dy
    (contiguous [M, D], x's dtype), recomputing the row statistics from x."""
    _check_args(x, weight, None)
    M, D = x.shape
    like = torch.empty((M, D), dtype=x.dtype, device="meta")
    _check_out("dy", dy, like)
    if dx is None:
        dx = torch.empty((M, D), dtype=x.dtype, device=x.device)
    _check_out("dx", dx, like)
    if M == 0:
        return dx
    cfg = norm_config(D, M)
    _norm_bwd_kernel[(cfg["programs"],)](
        x, weight, dy, dx, M, D, x.stride(0), float(eps), cfg["ROW_BLOCKS"], RMS=bool(rms),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return dx


# -- cost contract (for bench/roofline.py) -----------------------------------------------

# fp32 SIMT operations per element, counted from the kernels above (the bf16
# rounding on the bits is 4 integer ops, counted as fp32 work):
# forward: square and add (2), scale (1), round (4), weight (1), round (4)
# for RMSNorm; LayerNorm: sum (1), centre (1), square and add (2), scale (1),
# weight and bias (2), round (4).
FWD_OPS_PER_ELEMENT = {"rms": 12, "layer": 11}
# backward: the statistics again (2 or 4), g = dy * w and its rounding (5 or
# 1), n (1), g * n and its sum (2), the inner term (2, LayerNorm 1 more and a
# sum), scale (1), round (4).
BWD_OPS_PER_ELEMENT = {"rms": 17, "layer": 17}


def norm_cost(rows: int, D: int, dtype: torch.dtype, *, kind: str = "rms",
              backward: bool = False, has_bias: bool = False) -> dict:
    """The cost of one `norm_fwd` (or, `backward`, `norm_bwd`) launch over
    `rows` rows of D elements in `dtype`, in the fields of the roofline's
    `kernels.costs.Cost`: ``Cost(**norm_cost(...))``.

    DRAM bytes: forward reads x and writes y (2 x rows x D x e); backward
    reads x and dy and writes dx (3 x rows x D x e); the weight (and bias) is
    read from DRAM once and from L2 by every other program (once per
    program: a program walks `ROW_BLOCKS` blocks of rows, re-reading it from
    its L1, which is not counted). Nothing else touches memory: the
    statistics live in registers. FLOPs are fp32 SIMT
    work, `FWD_OPS_PER_ELEMENT` / `BWD_OPS_PER_ELEMENT` per element."""
    if kind not in FWD_OPS_PER_ELEMENT:
        raise ValueError(f"kind must be one of {', '.join(FWD_OPS_PER_ELEMENT)}, got {kind!r}")
    rows, D = int(rows), int(D)
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    cfg = norm_config(D, rows)
    e = torch.empty((), dtype=dtype).element_size()
    programs = cfg["programs"]
    params = (1 + (has_bias and not backward and kind == "layer")) * D * e
    n = rows * D
    if backward:
        read, write, ops = 2 * n * e, n * e, BWD_OPS_PER_ELEMENT[kind]
    else:
        read, write, ops = n * e, n * e, FWD_OPS_PER_ELEMENT[kind]
    launches = 1 if rows else 0
    return dict(kernel="norm_bwd" if backward else "norm_fwd",
                dram_read=read + (params if rows else 0), dram_write=write,
                l2_read=max(0, programs - 1) * params, flops={"fp32": ops * n} if n else {},
                launches=launches, config=cfg)
