"""The masked writer sum in Triton (README: "The operations").

    forward          out[r, n] = base[g(r), n] + sum_w m[r, w] * x[w, n]
    backward stack   dx[w, n] += sum_r m[r, w] * dout[r, n]
    backward mask    dm[r, w]  = sum_n dout[r, n] * x[w, n]   (deterministic)

Layers (STYLE.md): `@triton.jit` helpers and private kernels, then the block
size heuristics (`forward_config`, `backward_stack_config`,
`backward_mask_config`; the compile test uses the same functions), then the
launchers.

Design
------
* Mask preparation, once per call (`_split_mask`, `live_columns`): the fp32
  mask is split into its halves in the product dtype with one flag per tile
  (is its lo half all zero?), and the live writers (a nonzero mask for some
  reader) are listed first, on the device, without a host sync. The dot
  kernels walk only the live writers (a dead writer would add exact zeros:
  skipping it only regroups the fp32 sums) and load a tile's lo half only
  where its flag is set.
* Forward: a 1-D grid over column tiles of N. Each program holds every reader
  of the call (BLOCK_R >= R, up to `MAX_BLOCK_R`; beyond that the readers are
  tiled too) and walks the live writers in chunks of BLOCK_W, so each live
  row of the stack prefix is read once per call. R >= 16 uses `tl.dot`
  (tensor cores); R < 16 (the MLP / resid_post reader alone) uses a
  broadcast multiply-add over BLOCK_W rows unrolled per step, in fp32 with
  the fp32 mask itself.
* Backward stack, 16 to 128 readers filling 3/4 of their tile: one program
  per column tile holds every reader's dout and walks the live writer tiles
  (`_masked_sum_bwd_stack_by_columns_kernel`: dout read once). Otherwise a
  grid over (writer tile, column tile) that sums the readers 16 at a time.
  Each dx tile has one owner (no atomics) and one read-modify-write.
* Backward mask: the N axis is cut into a fixed number S of slices (chosen
  from the shapes only, never the device); each program reduces one slice of
  one [BLOCK_R, BLOCK_W] tile into a scratch [S, R, W], and a second kernel
  adds the slices in order s = 0..S-1. Bit-identical run to run. Given the
  mask (the fused op), dead writers are not read and get 0.

Precision
---------
Accumulation is always fp32. The mask is fp32 while the stack may be bf16 or
fp16, so a plain tensor-core dot would round the mask to 8 (or 11) bits.
Instead it is split, m = hi + lo with hi = m rounded to the storage dtype and
lo = (m - hi) rounded again, and two dots are accumulated: the products of
storage-dtype values are exact in fp32, so the result carries the mask to two
roundings (2^-16 relative in bf16, 2^-22 in fp16). fp32 stacks split the
stack tile into two tf32 halves by hand and take hi x both, plus lo x high
(about 2^-20). Tiles whose lo is all zero (0/1 masks) skip the lo product;
`split=False` (``precision="fast"``) never takes it. The fp16 split assumes
masks within fp16 range (masks are in [0, 1]). Every narrowing to bf16
rounds to nearest on the bits (`rounding.round_low_bits`), so interpreted and
compiled kernels round alike.

Under TRITON_INTERPRET=1 bf16 arithmetic and bf16 `tl.dot` are unreliable, so
the launchers pass DOT_IN_FP32=True there: the same halves are formed and
the dots run in fp32, which gives the same products as the tensor cores.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .rounding import round_low_bits, to_storage

# -- jit helpers -------------------------------------------------------------------


@triton.jit
def _live_rows(cols_ptr, offs, valid, HAS_COLS: tl.constexpr):
    """The writers at positions `offs` of a call's walk: cols[offs] (the live
    writers first, `live_columns`) with HAS_COLS, else `offs` itself; in
    offs's dtype either way."""
    if HAS_COLS:
        return tl.load(cols_ptr + offs, mask=valid, other=0).to(offs.dtype)
    return offs


@triton.jit
def _add_into(dx_ptr, rows, offs_n, valid, stride_dx, acc):
    """dx[rows, offs_n] += acc: one read-modify-write, the sum in fp32, then
    rounded once to dx's dtype."""
    dx_ptrs = dx_ptr + rows[:, None].to(tl.int64) * stride_dx + offs_n[None, :]
    dx = tl.load(dx_ptrs, mask=valid, other=0.0).to(tl.float32)
    tl.store(dx_ptrs, to_storage(dx + acc, dx_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _narrow(v, dtype: tl.constexpr):
    """fp32 `v` rounded to nearest in `dtype`'s precision: a bf16/fp16 tensor,
    or for fp32 a tf32 value kept in fp32."""
    if dtype == tl.float32:
        return round_low_bits(v, 13)
    return to_storage(v, dtype)


@triton.jit
def _split_mask_kernel(m_ptr, hi_ptr, lo_ptr, flag_ptr, cols_ptr, count_ptr, R, W,
                       KEEP_LO: tl.constexpr, HAS_COLS: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_W: tl.constexpr):
    """Split one [BLOCK_R, BLOCK_W] tile of the fp32 mask into the operands of
    the tensor-core products: hi = m rounded to the product dtype (hi_ptr's:
    bf16/fp16, or fp32 holding a tf32 value), lo = (m - hi) rounded again
    (KEEP_LO), and flag = whether any lo of the tile is nonzero. A mask of 0s
    and 1s (a fixed circuit, clamped hard-concrete samples) has lo = 0, and the
    kernels then skip the lo product of that tile exactly.

    With HAS_COLS the halves are compacted: column j of hi and lo is column
    cols[j] of m, for j < count (the live columns, `live_columns`)."""
    pid = tl.program_id(0)
    n_w_tiles = tl.cdiv(W, BLOCK_W)
    offs_r = (pid // n_w_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = (pid % n_w_tiles) * BLOCK_W + tl.arange(0, BLOCK_W)
    n_cols = tl.load(count_ptr) if HAS_COLS else W
    w_valid = offs_w < n_cols
    src_w = _live_rows(cols_ptr, offs_w, w_valid, HAS_COLS)
    valid = (offs_r < R)[:, None] & w_valid[None, :]
    offs = offs_r[:, None].to(tl.int64) * W + offs_w[None, :]
    m = tl.load(m_ptr + offs_r[:, None].to(tl.int64) * W + src_w[None, :], mask=valid, other=0.0)
    hi = _narrow(m, hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + offs, hi, mask=valid)
    if KEEP_LO:
        lo = _narrow(m - hi.to(tl.float32), hi_ptr.dtype.element_ty)
        tl.store(lo_ptr + offs, lo, mask=valid)
        nonzero = tl.sum(tl.sum((lo != 0).to(tl.int32), axis=1), axis=0)
        tl.store(flag_ptr + pid, nonzero)


@triton.jit
def _split_operand(b):
    """(b_hi, b_lo) of a storage-dtype tile for `_dot_halves`: fp32 as two
    tf32 values held in fp32 (b = b_hi + b_lo to about 2^-22), a 16-bit tile
    as itself (b_lo unused)."""
    if b.dtype == tl.float32:
        b_hi = round_low_bits(b, 13)
        return b_hi, round_low_bits(b - b_hi, 13)
    return b, b


@triton.jit
def _dot_halves(m_hi, lo_ptrs, lo_valid, flag, b_hi, b_lo, acc, SPLIT: tl.constexpr,
                DOT_IN_FP32: tl.constexpr):
    """acc + m @ b for a mask tile given as its product-dtype halves (see
    `_split_mask_kernel`) and a storage-dtype tile b given as `_split_operand`
    makes it:

    * 16 bits: hi @ b, plus lo @ b when SPLIT and the tile's flag is set;
      products of 16-bit values are exact in fp32, so the mask is carried to
      two roundings (at most 2^-16 relative in bf16, 2^-22 in fp16), or to
      one (2^-8, 2^-11) without SPLIT.
    * fp32: hi @ b_hi + hi @ b_lo, plus lo @ b_hi when SPLIT and flagged (the
      dropped lo @ b_lo and the two roundings leave about 2^-20 relative per
      term); without SPLIT, one tf32 product hi @ b_hi (2^-11 relative in
      each operand).

    The lo tile is loaded only when it is used."""
    acc = _dot_exact(m_hi, b_hi, acc, DOT_IN_FP32)
    if SPLIT:
        if b_hi.dtype == tl.float32:
            acc = _dot_exact(m_hi, b_lo, acc, DOT_IN_FP32)
        if flag != 0:
            m_lo = tl.load(lo_ptrs, mask=lo_valid, other=0.0)
            acc = _dot_exact(m_lo, b_hi, acc, DOT_IN_FP32)
    return acc


@triton.jit
def _dot_exact(a, b, acc, DOT_IN_FP32: tl.constexpr):
    """acc + a @ b where every product of an element of a and of b is exact in
    fp32 (16-bit values, or tf32 values held in fp32): the tensor cores in the
    operands' own dtype (tf32 for fp32), or, interpreted, fp32 products, which
    are then the same."""
    if DOT_IN_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot_storage(a, b, acc, DOT_IN_FP32: tl.constexpr, ONE_PRODUCT: tl.constexpr):
    """acc + a @ b for two storage-dtype tiles: their products are exact in
    fp32 for bf16/fp16; fp32 tiles use tf32x3 (about fp32-accurate), or with
    ONE_PRODUCT (``precision="fast"``) one product of both tiles rounded to
    tf32 (2^-11 relative in each)."""
    if a.dtype != tl.float32:
        return _dot_exact(a, b, acc, DOT_IN_FP32)
    if ONE_PRODUCT:
        return _dot_exact(round_low_bits(a, 13), round_low_bits(b, 13), acc, DOT_IN_FP32)
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _block1(v, dtype: tl.constexpr):
    """A scalar (loop counter, kernel argument) as a 1-element block of
    `dtype`. Blocks behave the same compiled and interpreted (the interpreter
    gives plain ints for loop counters, and mishandles `block & scalar` masks),
    and int64 keeps row offsets from overflowing."""
    return tl.zeros([1], dtype=dtype) + v


# -- forward ---------------------------------------------------------------------------


@triton.jit
def _masked_sum_fwd_kernel(x_ptr, m_ptr, hi_ptr, lo_ptr, flag_ptr, cols_ptr, count_ptr, base_ptr,
                           index_ptr, out_ptr, R, W, N, stride_x,
                           HAS_BASE: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_COLS: tl.constexpr,
                           USE_DOT: tl.constexpr, SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    # Reader tiles vary fastest, so with more than one they read the same
    # columns of x at about the same time (from L2).
    pid = tl.program_id(0)
    n_r_tiles = tl.cdiv(R, BLOCK_R)
    pid_r = pid % n_r_tiles
    pid_n = pid // n_r_tiles
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_valid = offs_r < R
    n_valid = offs_n < N
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    # With HAS_COLS only the live writers are read: cols[0:count] lists the
    # writers whose mask is nonzero for some reader (`live_columns`); the rest
    # would add exact zeros.
    n_cols = tl.load(count_ptr) if HAS_COLS else W

    if USE_DOT:
        # The mask comes split once per call (`_split_mask_kernel`, tiles of
        # BLOCK_R x BLOCK_W, compacted to the live columns with HAS_COLS): hi
        # in the product dtype, lo loaded only for the tiles whose flag says
        # it is not all zero.
        n_w_tiles = tl.cdiv(W, BLOCK_W)
        for w0 in range(0, n_cols, BLOCK_W):
            offs_w = w0 + tl.arange(0, BLOCK_W)
            w_valid = offs_w < n_cols
            # Rows w >= W of a prefix view exist in memory but are not ours
            # (they may hold NaN): mask them, never multiply them by 0.
            rows = _live_rows(cols_ptr, offs_w, w_valid, HAS_COLS)
            m_offs = offs_r[:, None] * W + offs_w[None, :]
            m_valid = r_valid[:, None] & w_valid[None, :]
            m_hi = tl.load(hi_ptr + m_offs, mask=m_valid, other=0.0)
            flag = tl.load(flag_ptr + pid_r * n_w_tiles + w0 // BLOCK_W) if SPLIT else 0
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + offs_n[None, :],
                        mask=w_valid[:, None] & n_valid[None, :], other=0.0)
            x_hi, x_lo = _split_operand(x)
            acc = _dot_halves(m_hi, lo_ptr + m_offs, m_valid, flag, x_hi, x_lo, acc, SPLIT,
                              DOT_IN_FP32)
    else:
        # Vector path (R < 16, where a dot would be mostly padding): BLOCK_W
        # rows per step, unrolled so that their loads are all in flight
        # together; one fp32 FMA per reader and element.
        for w0 in range(0, n_cols, BLOCK_W):
            for k in tl.static_range(BLOCK_W):
                j = _block1(w0 + k, tl.int64)
                w_ok = j < n_cols
                w = _live_rows(cols_ptr, j, w_ok, HAS_COLS)
                m_col = tl.load(m_ptr + offs_r * W + w, mask=r_valid & w_ok, other=0.0)
                x_row = tl.load(x_ptr + w * stride_x + offs_n, mask=n_valid & w_ok,
                                other=0.0).to(tl.float32)
                acc += m_col[:, None] * x_row[None, :]

    valid = r_valid[:, None] & n_valid[None, :]
    if HAS_BASE:
        if HAS_INDEX:
            g = tl.load(index_ptr + offs_r, mask=r_valid, other=0)
        else:
            g = tl.zeros([BLOCK_R], dtype=tl.int64)
        b = tl.load(base_ptr + g[:, None].to(tl.int64) * N + offs_n[None, :], mask=valid,
                    other=0.0)
        acc += b.to(tl.float32)
    out_offs = offs_r[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptr + out_offs, to_storage(acc, out_ptr.dtype.element_ty), mask=valid)


# -- backward: stack -----------------------------------------------------------------


@triton.jit
def _masked_sum_bwd_stack_kernel(m_ptr, hi_ptr, lo_ptr, flag_ptr, cols_ptr, count_ptr, dout_ptr,
                                 dx_ptr, R, W, N, stride_dx, HAS_COLS: tl.constexpr,
                                 USE_DOT: tl.constexpr, SPLIT: tl.constexpr,
                                 DOT_IN_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    # Writer tiles vary fastest: programs running together share dout columns in L2.
    # With HAS_COLS the writer tiles are tiles of the live columns cols[0:count]
    # (the mask's halves compacted alike); programs past them have nothing to
    # add (their writers' masks are all 0) and return at once.
    pid = tl.program_id(0)
    n_w_tiles = tl.cdiv(W, BLOCK_W)
    pid_w = pid % n_w_tiles
    pid_n = pid // n_w_tiles
    n_cols = tl.load(count_ptr) if HAS_COLS else W
    if pid_w * BLOCK_W >= n_cols:
        return
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_valid = offs_w < n_cols
    rows = _live_rows(cols_ptr, offs_w, w_valid, HAS_COLS)
    n_valid = offs_n < N
    acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)

    if USE_DOT:
        # the mask's halves as in the forward, split in tiles of BLOCK_R x BLOCK_W
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_valid = offs_r < R
            # loaded transposed, [BLOCK_W, BLOCK_R]: the writers are the rows of the product
            m_offs = offs_r[None, :] * W + offs_w[:, None]
            m_valid = r_valid[None, :] & w_valid[:, None]
            m_hi = tl.load(hi_ptr + m_offs, mask=m_valid, other=0.0)
            flag = tl.load(flag_ptr + (r0 // BLOCK_R) * n_w_tiles + pid_w) if SPLIT else 0
            d = tl.load(dout_ptr + offs_r[:, None].to(tl.int64) * N + offs_n[None, :],
                        mask=r_valid[:, None] & n_valid[None, :], other=0.0)
            d_hi, d_lo = _split_operand(d)
            acc = _dot_halves(m_hi, lo_ptr + m_offs, m_valid, flag, d_hi, d_lo, acc, SPLIT,
                              DOT_IN_FP32)
    else:
        for r0 in range(0, R):
            r = _block1(r0, tl.int64)
            m_row = tl.load(m_ptr + r * W + rows, mask=w_valid, other=0.0)
            d_row = tl.load(dout_ptr + r * N + offs_n, mask=n_valid, other=0.0).to(tl.float32)
            acc += m_row[:, None] * d_row[None, :]

    _add_into(dx_ptr, rows, offs_n, w_valid[:, None] & n_valid[None, :], stride_dx, acc)


@triton.jit
def _masked_sum_bwd_stack_by_columns_kernel(hi_ptr, lo_ptr, flag_ptr, cols_ptr, count_ptr, dout_ptr,
                                            dx_ptr, R, W, N, stride_dx, HAS_COLS: tl.constexpr,
                                            SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                                            BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
                                            BLOCK_N: tl.constexpr):
    """dx[w] += sum_r m[r, w] * dout[r] with one program per column tile: it
    loads every reader's dout of its columns once (BLOCK_R >= R), split once,
    and walks the (live) writer tiles, one product over all readers each. So
    dout is read once in all, where the writer-tile grid of
    `_masked_sum_bwd_stack_kernel` reloads it for every writer tile (25 times
    at CodeLlama-13B's last layer). The mask's halves come as in the forward
    (`_split_mask_kernel`, one reader tile: flag w0 // BLOCK_W)."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_valid = offs_n < N
    r_valid = offs_r < R
    d = tl.load(dout_ptr + offs_r[:, None].to(tl.int64) * N + offs_n[None, :],
                mask=r_valid[:, None] & n_valid[None, :], other=0.0)
    d_hi, d_lo = _split_operand(d)
    n_cols = tl.load(count_ptr) if HAS_COLS else W
    for w0 in range(0, n_cols, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        w_valid = offs_w < n_cols
        rows = _live_rows(cols_ptr, offs_w, w_valid, HAS_COLS)
        # loaded transposed, [BLOCK_W, BLOCK_R]: the writers are the rows of the product
        m_offs = offs_r[None, :] * W + offs_w[:, None]
        m_valid = r_valid[None, :] & w_valid[:, None]
        m_hi = tl.load(hi_ptr + m_offs, mask=m_valid, other=0.0)
        flag = tl.load(flag_ptr + w0 // BLOCK_W) if SPLIT else 0
        acc = tl.zeros([BLOCK_W, BLOCK_N], dtype=tl.float32)
        acc = _dot_halves(m_hi, lo_ptr + m_offs, m_valid, flag, d_hi, d_lo, acc, SPLIT, DOT_IN_FP32)
        _add_into(dx_ptr, rows, offs_n, w_valid[:, None] & n_valid[None, :], stride_dx, acc)


# -- backward: mask --------------------------------------------------------------------


@triton.jit
def _masked_sum_bwd_mask_kernel(x_ptr, dout_ptr, part_ptr, cols_ptr, count_ptr, R, W, N,
                                stride_x, slice_len, HAS_COLS: tl.constexpr, FAST: tl.constexpr,
                                DOT_IN_FP32: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[s, r, w] = sum over n in slice s of dout[r, n] * x[w, n].

    Computed transposed, acc[w, r] = x[w, :] @ dout[r, :]^T, so that the
    writers (the long side) are the M dimension of the dot: a single reader
    still fills an sm_90 warpgroup MMA (M = 64 per warpgroup, N >= 8), and both
    operands are K-major in memory (what tf32 MMAs need).

    With HAS_COLS the writer tiles are tiles of the live columns cols[0:count]
    (`live_columns`); programs past them return, and the columns of dead
    writers are left as the launcher filled them (zeros)."""
    pid = tl.program_id(0)
    n_w_tiles = tl.cdiv(W, BLOCK_W)
    n_r_tiles = tl.cdiv(R, BLOCK_R)
    pid_w = pid % n_w_tiles
    pid_r = (pid // n_w_tiles) % n_r_tiles
    pid_s = pid // (n_w_tiles * n_r_tiles)
    n_cols = tl.load(count_ptr) if HAS_COLS else W
    if pid_w * BLOCK_W >= n_cols:
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_j = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    r_valid = offs_r < R
    w_valid = offs_j < n_cols
    offs_w = _live_rows(cols_ptr, offs_j, w_valid, HAS_COLS)
    # 64-bit: start + slice_len passes 2**31 for N near it (tests/test_large_offsets.py)
    start = pid_s.to(tl.int64) * slice_len
    end = tl.minimum(start + slice_len, N)
    acc = tl.zeros([BLOCK_W, BLOCK_R], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_valid = offs_k < end
        x = tl.load(x_ptr + offs_w[:, None].to(tl.int64) * stride_x + offs_k[None, :],
                    mask=w_valid[:, None] & k_valid[None, :], other=0.0)
        d = tl.load(dout_ptr + offs_r[:, None].to(tl.int64) * N + offs_k[None, :],
                    mask=r_valid[:, None] & k_valid[None, :], other=0.0)
        acc = _dot_storage(x, tl.trans(d), acc, DOT_IN_FP32, FAST)
    offs = (_block1(pid_s, tl.int64) * R * W + offs_r[None, :] * W + offs_w[:, None])
    tl.store(part_ptr + offs, acc, mask=w_valid[:, None] & r_valid[None, :])


@triton.jit
def _sum_slices_kernel(part_ptr, out_ptr, S, RW, BLOCK: tl.constexpr):
    """out[i] = sum_{s = 0..S-1} part[s, i], in that order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < RW
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(part_ptr + _block1(s, tl.int64) * RW + offs, mask=valid, other=0.0)
    tl.store(out_ptr + offs, acc, mask=valid)


# -- block sizes (shared by the launchers and tests/test_triton_kernels_compile.py) ---

MAX_BLOCK_R = 128      # readers one program holds; more readers are tiled
DOT_MIN_READERS = 16   # tl.dot needs every dimension >= 16 on a GPU
SUM_SLICES_BLOCK = 1024
# backward-mask slicing: aim for this many programs (about two per SM of an
# H100), with at most MAX_SLICES slices and MAX_SCRATCH fp32 scratch elements.
TARGET_PROGRAMS = 264
MAX_SLICES = 128
MAX_SCRATCH = 1 << 22


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def forward_config(R: int, W: int, N: int, dtype: torch.dtype, arch: int = 0) -> dict:
    """Kernel constexprs and launch options of the forward for R readers, W
    writers, N columns, storage dtype `dtype`, on a GPU of compute capability
    `arch` (90 for sm_90; 0 when unknown or interpreted)."""
    if R < DOT_MIN_READERS:
        block_r = _pow2(R)
        # Keep about 32 accumulator registers per thread (128 threads).
        block_n = min(1024, max(256, 4096 // block_r))
        block_n = min(block_n, max(128, _pow2(N)))
        if dtype == torch.float32:
            # a [8, 1024] fp32 stack tile is 64 registers a thread: Triton 3.8
            # spills 4 bytes of it on sm_80 (3.6, 3.7 and 3.9 do not)
            block_n = min(block_n, 512)
        return dict(USE_DOT=False, BLOCK_R=block_r, BLOCK_W=8, BLOCK_N=block_n,
                    num_warps=4, num_stages=1)
    block_r = min(MAX_BLOCK_R, _pow2(R))
    # Chosen with ptxas -v for sm_80 and sm_90 (tests/test_triton_kernels_compile.py):
    # fp32 accumulators of BLOCK_R x BLOCK_N take 32-64 registers a thread, and
    # the hi/lo (or tf32x3) operand splits most of the rest; wider tiles spill.
    # fp32 takes half the K step: tf32x3 also splits the stack tile.
    block_n = 256 if block_r <= 16 else 128
    block_w = 16 if dtype == torch.float32 else 32
    num_warps = 8 if block_r >= 128 else 4
    # Measured on an H200 (bench/tune.py, bench/results/tune-*.log): a wider
    # column tile halves the re-reads of the mask tile per stack byte for 65+
    # readers in 16 bits (CodeLlama-13B: 1.5-1.6x faster than 128 columns), and
    # a narrower one with a longer K step suits fp32 at 17-64 readers (GPT-2:
    # 1.1-1.4x).
    # The wide tile keeps its accumulators in registers on sm_90 (wgmma) but
    # spills on sm_80 (ptxas), so it is Hopper's only.
    if block_r == 128 and dtype != torch.float32 and arch >= 90:
        block_n = 256
    elif dtype == torch.float32 and 16 < block_r <= 64:
        block_n, block_w = 64, 32
    return dict(USE_DOT=True, BLOCK_R=block_r, BLOCK_W=block_w, BLOCK_N=block_n,
                num_warps=num_warps, num_stages=3)


def backward_stack_config(R: int, W: int, N: int, dtype: torch.dtype,
                          grad_dtype: torch.dtype) -> dict:
    """Kernel constexprs and launch options of the stack backward.
    BY_COLUMNS picks `_masked_sum_bwd_stack_by_columns_kernel` (every reader
    in one tile, dout read once), for 16 to MAX_BLOCK_R readers; the
    writer-tile grid of `_masked_sum_bwd_stack_kernel` otherwise."""
    if R < DOT_MIN_READERS:
        return dict(USE_DOT=False, BY_COLUMNS=False, BLOCK_R=1, BLOCK_W=16, BLOCK_N=256,
                    num_warps=4, num_stages=1)
    if R <= MAX_BLOCK_R and 4 * R >= 3 * _pow2(R):
        # Every reader in one product, so the reader tile (a power of two)
        # must be mostly full: 121 readers fill 95% of 128 (CodeLlama-13B),
        # GPT-2's 37 only 58% of 64, where the padding would cost more than
        # the re-reads of dout it saves (the writer-tile grid steps 16 at a
        # time: 77%). dout [BLOCK_R, 128] stays on chip for the whole program; 64-writer
        # tiles keep the fp32 accumulator at 64 registers a thread over 4
        # warps (ptxas: no spills on sm_80 and sm_90,
        # tests/test_triton_kernels_compile.py). Not yet timed on a GPU:
        # bench/tune.py --variants compares it with the writer-tile grid.
        return dict(USE_DOT=True, BY_COLUMNS=True, BLOCK_R=_pow2(R), BLOCK_W=64, BLOCK_N=128,
                    num_warps=8, num_stages=3)
    # 128 x 128 dx tile over 8 warps; readers (the reduction) in steps of 16,
    # which keeps the hi/lo split of the mask small enough not to spill. In 16
    # bits a 64 x 128 tile over 4 warps measured 1.13-1.15x faster on an H200
    # (bench/tune.py at CodeLlama-13B shapes); fp32 was mixed, so it keeps 128.
    if dtype != torch.float32:
        return dict(USE_DOT=True, BY_COLUMNS=False, BLOCK_R=16, BLOCK_W=64, BLOCK_N=128,
                    num_warps=4, num_stages=3)
    return dict(USE_DOT=True, BY_COLUMNS=False, BLOCK_R=16, BLOCK_W=128, BLOCK_N=128, num_warps=8,
                num_stages=3)


def backward_mask_config(R: int, W: int, N: int, dtype: torch.dtype) -> dict:
    """Kernel constexprs, launch options and the number of N slices S of the
    mask backward (a function of the shapes only, so results never depend on
    the device)."""
    block_r = min(MAX_BLOCK_R, max(DOT_MIN_READERS, _pow2(R)))
    block_w = 128
    # 32 columns a step in every dtype: at 64 the 16-bit kernel with live
    # columns (HAS_COLS) spills on sm_80 at 121 readers (ptxas); not by
    # architecture, so that the slicing (and the result) never depends on it
    block_k = 32
    num_warps = 8 if block_r * block_w >= 8192 else 4
    tiles = triton.cdiv(max(R, 1), block_r) * triton.cdiv(max(W, 1), block_w)
    slices = triton.cdiv(TARGET_PROGRAMS, tiles)
    slices = min(slices, MAX_SLICES, max(1, MAX_SCRATCH // max(1, R * W)),
                 max(1, triton.cdiv(N, 4 * block_k)))
    slices = max(1, slices)
    # Slices are whole multiples of BLOCK_K; recount so none is empty.
    slice_len = triton.cdiv(triton.cdiv(max(N, 1), slices), block_k) * block_k
    slices = max(1, triton.cdiv(N, slice_len))
    return dict(BLOCK_R=block_r, BLOCK_W=block_w, BLOCK_K=block_k, num_warps=num_warps,
                num_stages=3, SLICES=slices, SLICE_LEN=slice_len)


# -- launchers ---------------------------------------------------------------------

_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _arch(device: torch.device) -> int:
    """Compute capability as an integer (90 for sm_90); 0 off CUDA."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _interpreted(kernel) -> bool:
    """Whether `kernel` runs under TRITON_INTERPRET (decided when it was defined)."""
    return type(kernel).__name__ == "InterpretedFunction"


def _check_rows(name: str, t: torch.Tensor, rows: int, cols: int) -> None:
    if t.dim() != 2 or tuple(t.shape) != (rows, cols):
        raise ValueError(f"{name} must be [{rows}, {cols}], got {tuple(t.shape)}")
    if cols > 1 and rows > 0 and t.stride(1) != 1:
        raise ValueError(f"{name} must have unit inner stride, got strides {t.stride()}")
    if rows > 1 and t.stride(0) < cols:
        raise ValueError(f"{name} rows overlap (stride {t.stride(0)} < {cols})")


def _check_contiguous(name: str, t: torch.Tensor, shape, dtype) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {dtype} {list(shape)}, "
                         f"got {t.dtype} {list(t.shape)} strides {t.stride()}")


def _check_x(x: torch.Tensor) -> tuple[int, int]:
    if x.dtype not in _STORAGE_DTYPES:
        raise TypeError(f"stack dtype {x.dtype} is not float32, bfloat16 or float16")
    if x.dim() != 2:
        raise ValueError(f"stack must be 2-D [W, N], got {tuple(x.shape)}")
    W, N = x.shape
    _check_rows("stack", x, W, N)
    if N >= 2 ** 31:
        raise ValueError(f"{N} elements per writer: at most 2**31 - 1 are supported")
    return W, N


def _check_device(ref: torch.Tensor, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device}, expected {ref.device}")


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def live_columns(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols, count) for a mask m [R, W]: cols [W] int32 lists first, in
    order, the `count` ([1] int32) writers whose mask is nonzero for some
    reader, then the others. Made on the device without a host sync; the
    kernels read only cols[:count]. A dead writer would only add exact zeros,
    so skipping it changes the result only by the grouping of the live
    products into chunks (fp32 accumulation order; none when every writer is
    live, where cols is 0..W-1), and its values, even inf or NaN, never reach
    the result."""
    live = (m != 0).any(dim=0)
    count = live.sum(dtype=torch.int32).reshape(1)
    cols = torch.argsort(torch.logical_not(live).to(torch.int8), stable=True).to(torch.int32)
    return cols, count


def _split_mask(m: torch.Tensor, dtype: torch.dtype, cfg: dict, split: bool, live):
    """(hi, lo, flags) of the fp32 mask `m` for a dot kernel with tiles
    cfg["BLOCK_R"] x cfg["BLOCK_W"] over [R, W] (`_split_mask_kernel`), made
    once per call: hi and lo in `dtype` (fp32 holding tf32 values for an fp32
    stack), compacted to the live columns (`live` = (cols, count)), one int32
    flag per tile. Without `split`, lo and flags are placeholders the kernel
    never reads. The vector path reads the fp32 mask itself: then all three
    are placeholders."""
    if not cfg["USE_DOT"]:
        return m, m, m
    R, W = m.shape
    tiles = triton.cdiv(R, cfg["BLOCK_R"]) * triton.cdiv(W, cfg["BLOCK_W"])
    hi = torch.empty((R, W), dtype=dtype, device=m.device)
    lo = torch.empty((R, W), dtype=dtype, device=m.device) if split else hi
    flags = torch.empty((tiles,), dtype=torch.int32, device=m.device) if split else hi
    cols, count = live or (flags, flags)
    _split_mask_kernel[(tiles,)](m, hi, lo, flags, cols, count, R, W, KEEP_LO=split,
                                 HAS_COLS=live is not None,
                                 BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], num_warps=4)
    return hi, lo, flags


def masked_sum_fwd(x: torch.Tensor, m: torch.Tensor, base: Optional[torch.Tensor] = None,
                   base_index: Optional[torch.Tensor] = None,
                   out: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                   split: bool = True, skip_dead: bool = True) -> torch.Tensor:
    """out[r] = base[g(r)] + sum_w m[r, w] * x[w] (fp32 accumulation).

    x [W, N] (unit inner stride, any row stride), m [R, W] fp32 contiguous,
    base None or [G, N] contiguous in x's dtype, base_index None or [R] int64
    (None with base means G == 1), out [R, N] contiguous in x's dtype
    (allocated when None). `split` (default) carries the mask to two
    roundings in the tensor-core products; without it, one product (see
    `_dot_halves`). `skip_dead` (default) reads only the writers whose mask is
    nonzero for some reader (`live_columns`); False reads every row (same
    result for a finite stack; bench/tune.py compares the two). `config`
    overrides `forward_config` (bench/tune.py sweeps it). Returns out."""
    W, N = _check_x(x)
    if m.dim() != 2 or m.shape[1] != W:
        raise ValueError(f"mask must be [R, {W}], got {tuple(m.shape)}")
    R = m.shape[0]
    _check_contiguous("mask", m, (R, W), torch.float32)
    if base is not None:
        G = base.shape[0] if base.dim() == 2 else -1
        _check_contiguous("base", base, (G, N), x.dtype)
        if base_index is None:
            if G != 1:
                raise ValueError(f"base has {G} rows but no base_index")
        else:
            _check_contiguous("base_index", base_index, (R,), torch.int64)
    elif base_index is not None:
        raise ValueError("base_index without base")
    if out is None:
        out = torch.empty((R, N), dtype=x.dtype, device=x.device)
    _check_contiguous("out", out, (R, N), x.dtype)
    _check_device(x, mask=m, base=base, base_index=base_index, out=out)
    if R == 0 or N == 0:
        return out
    cfg = config or forward_config(R, W, N, x.dtype, arch=_arch(x.device))
    grid = (triton.cdiv(R, cfg["BLOCK_R"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    live = live_columns(m) if skip_dead else None
    hi, lo, flags = _split_mask(m, x.dtype, cfg, split, live)
    _masked_sum_fwd_kernel[grid](
        x, m, hi, lo, flags, *(live or (m, m)), out if base is None else base,
        out if base_index is None else base_index, out,
        R, W, N, _row_stride(x),
        HAS_BASE=base is not None, HAS_INDEX=base_index is not None, HAS_COLS=skip_dead,
        USE_DOT=cfg["USE_DOT"], SPLIT=split, DOT_IN_FP32=_interpreted(_masked_sum_fwd_kernel),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def masked_sum_bwd_stack(m: torch.Tensor, dout: torch.Tensor, dx: torch.Tensor,
                         config: Optional[dict] = None, split: bool = True,
                         skip_dead: bool = True) -> None:
    """dx[w] += sum_r m[r, w] * dout[r], in place, accumulated in fp32.

    m [R, W] fp32 contiguous, dout [R, N] contiguous (storage dtype), dx [W, N]
    (unit inner stride, any row stride) fp32 or dout's dtype. `split` and
    `skip_dead` as in `masked_sum_fwd` (rows of dead writers are left
    untouched). `config` overrides `backward_stack_config`."""
    if dout.dtype not in _STORAGE_DTYPES or dout.dim() != 2:
        raise TypeError(f"dout must be 2-D float32/bfloat16/float16, got {dout.dtype} "
                        f"{tuple(dout.shape)}")
    R, N = dout.shape
    _check_contiguous("dout", dout, (R, N), dout.dtype)
    if m.dim() != 2 or m.shape[0] != R:
        raise ValueError(f"mask must be [{R}, W], got {tuple(m.shape)}")
    W = m.shape[1]
    _check_contiguous("mask", m, (R, W), torch.float32)
    if dx.dtype not in (torch.float32, dout.dtype):
        raise TypeError(f"stack gradient dtype {dx.dtype}: must be float32 or {dout.dtype}")
    _check_rows("stack gradient", dx, W, N)
    _check_device(dout, mask=m, stack_gradient=dx)
    if N >= 2 ** 31:
        raise ValueError(f"{N} elements per writer: at most 2**31 - 1 are supported")
    if R == 0 or W == 0 or N == 0:
        return
    cfg = config or backward_stack_config(R, W, N, dout.dtype, dx.dtype)
    live = live_columns(m) if skip_dead else None
    hi, lo, flags = _split_mask(m, dout.dtype, cfg, split, live)
    if cfg.get("BY_COLUMNS"):
        if cfg["BLOCK_R"] < R:
            raise ValueError(f"BY_COLUMNS needs BLOCK_R >= R, got {cfg['BLOCK_R']} < {R}")
        _masked_sum_bwd_stack_by_columns_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            hi, lo, flags, *(live or (m, m)), dout, dx, R, W, N, _row_stride(dx),
            HAS_COLS=skip_dead, SPLIT=split,
            DOT_IN_FP32=_interpreted(_masked_sum_bwd_stack_by_columns_kernel),
            BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return
    grid = (triton.cdiv(W, cfg["BLOCK_W"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _masked_sum_bwd_stack_kernel[grid](
        m, hi, lo, flags, *(live or (m, m)), dout, dx, R, W, N, _row_stride(dx),
        HAS_COLS=skip_dead, USE_DOT=cfg["USE_DOT"], SPLIT=split,
        DOT_IN_FP32=_interpreted(_masked_sum_bwd_stack_kernel),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def masked_sum_bwd_mask(x: torch.Tensor, dout: torch.Tensor,
                        mask: Optional[torch.Tensor] = None, split: bool = True) -> torch.Tensor:
    """dm [R, W] fp32 = dout @ x^T, reduced over N in fp32 in a fixed order
    (bit-identical run to run). x [W, N] (unit inner stride, any row stride),
    dout [R, N] contiguous in x's dtype.

    With `mask` ([R, W]), the writers whose mask is 0 for every reader are
    not read and get dm = 0: for callers whose gradient through such a mask
    is 0 whatever dm is (the hard-concrete sampler at a clamped 0).
    `split` False (``precision="fast"``): fp32 stacks take one tf32 product
    instead of tf32x3; 16-bit products are exact either way."""
    W, N = _check_x(x)
    if dout.dim() != 2 or dout.shape[1] != N:
        raise ValueError(f"dout must be [R, {N}], got {tuple(dout.shape)}")
    R = dout.shape[0]
    _check_contiguous("dout", dout, (R, N), x.dtype)
    _check_device(x, dout=dout)
    dm = torch.empty((R, W), dtype=torch.float32, device=x.device)
    if R == 0 or W == 0:
        return dm
    if N == 0:
        return dm.zero_()
    cfg = backward_mask_config(R, W, N, x.dtype)
    S = cfg["SLICES"]
    live = None
    if mask is not None:
        if tuple(mask.shape) != (R, W):
            raise ValueError(f"mask must be [{R}, {W}], got {tuple(mask.shape)}")
        live = live_columns(mask)
        dm.zero_()  # dead writers' columns (the kernels skip them)
    new_part = torch.empty if live is None else torch.zeros
    part = dm if S == 1 else new_part((S, R, W), dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(R, cfg["BLOCK_R"]) * triton.cdiv(W, cfg["BLOCK_W"])
    _masked_sum_bwd_mask_kernel[(tiles * S,)](
        x, dout, part, *(live or (dm, dm)), R, W, N, _row_stride(x), cfg["SLICE_LEN"],
        HAS_COLS=live is not None, FAST=not split,
        DOT_IN_FP32=_interpreted(_masked_sum_bwd_mask_kernel),
        BLOCK_R=cfg["BLOCK_R"], BLOCK_W=cfg["BLOCK_W"], BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if S > 1:
        RW = R * W
        _sum_slices_kernel[(triton.cdiv(RW, SUM_SLICES_BLOCK),)](
            part, dm, S, RW, BLOCK=SUM_SLICES_BLOCK, num_warps=4)
    return dm
