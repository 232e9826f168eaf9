"""Philox4x32-10 in Triton, bit for bit the generator of `fastedge.ops.philox`.

Everything here is a `@triton.jit` helper, inlined into the kernels that draw
noise (`kernels/hard_concrete.py`). The counter layout is fastedge's contract
(see `fastedge.ops.philox`):

* key = (seed mod 2**32, (seed >> 32) mod 2**32)
* edge mask (reader r, writer w): counter (w, reader_offset + r, 0, 0)
* node mask of writer w:          counter (w, 0, 1, 0)

The first output word x becomes the uniform (x >> 8) * 2**-24 (exact in fp32),
and the hard-concrete noise is that value clamped to [EPS_LOW, EPS_HIGH]
(`kernels.reference`), which the launchers pass as fp32 kernel arguments so
that the clamp is bit-identical to the PyTorch one.

All integer math is uint32: products wrap modulo 2**32 (`*`) and `tl.umulhi`
gives the high word, so no 64-bit arithmetic is needed.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastedge.ops import philox as _spec

_ROUND_A = tl.constexpr(_spec.PHILOX_ROUND_A)
_ROUND_B = tl.constexpr(_spec.PHILOX_ROUND_B)
_KEY_A = tl.constexpr(_spec.PHILOX_KEY_A)
_KEY_B = tl.constexpr(_spec.PHILOX_KEY_B)
_ROUNDS = tl.constexpr(_spec.PHILOX_ROUNDS)
_EDGE_STREAM = tl.constexpr(_spec.EDGE_STREAM)
_NODE_STREAM = tl.constexpr(_spec.NODE_STREAM)
# 2**-24: (x >> 8) has 24 significant bits, so the product is exact in fp32.
_TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key (k0, k1) of a non-negative seed, as Python ints < 2**32."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


@triton.jit
def philox_uint32(c0, c1, c2, c3, k0, k1):
    """First 32-bit output word of Philox4x32-10 for counter (c0, c1, c2, c3)
    and key (k0, k1). Every argument is a uint32 tensor (blocks broadcast
    together) or scalar; the result is uint32."""
    for _ in tl.static_range(_ROUNDS):
        hi0 = tl.umulhi(c0, _ROUND_A)
        lo0 = c0 * _ROUND_A
        hi1 = tl.umulhi(c2, _ROUND_B)
        lo1 = c2 * _ROUND_B
        c0_next = hi1 ^ c1 ^ k0
        c2_next = hi0 ^ c3 ^ k1
        c0 = c0_next
        c1 = lo1
        c2 = c2_next
        c3 = lo0
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0


@triton.jit
def uint32_to_unit_float(x):
    """Uniform fp32 in [0, 1) from uint32 words: (x >> 8) * 2**-24."""
    return (x >> 8).to(tl.float32) * _TWO_POW_M24


@triton.jit
def _as_u32(v):
    # Kernel integer arguments arrive as int32 or int64 depending on their
    # value; both hold a number < 2**32 here, so truncation is the identity.
    return v.to(tl.uint32)


@triton.jit
def edge_uniform(offs_r, offs_w, reader_offset, k0, k1):
    """[BLOCK_R, BLOCK_W] uniforms of the edge masks (reader_offset + r, w).
    offs_r / offs_w: int32 index blocks; reader_offset, k0, k1: kernel
    integer arguments (< 2**32)."""
    c1 = offs_r.to(tl.uint32) + _as_u32(reader_offset)  # wraps mod 2**32 like the spec
    c0 = offs_w.to(tl.uint32)
    zero = tl.zeros([1, 1], dtype=tl.uint32)
    bits = philox_uint32(c0[None, :], c1[:, None], zero + _EDGE_STREAM, zero,
                         _as_u32(k0), _as_u32(k1))
    return uint32_to_unit_float(bits)


@triton.jit
def node_uniform(offs_w, k0, k1):
    """[BLOCK_W] uniforms of the node masks of writers offs_w."""
    c0 = offs_w.to(tl.uint32)
    zero = tl.zeros_like(c0)
    bits = philox_uint32(c0, zero, zero + _NODE_STREAM, zero, _as_u32(k0), _as_u32(k1))
    return uint32_to_unit_float(bits)


@triton.jit
def clamp_noise(u, eps_low, eps_high):
    """The hard-concrete noise: u clamped to [eps_low, eps_high] (fp32 args)."""
    return tl.minimum(tl.maximum(u, eps_low), eps_high)


@triton.jit
def edge_noise(offs_r, offs_w, reader_offset, k0, k1, eps_low, eps_high):
    """Clamped hard-concrete noise of the edge masks, [BLOCK_R, BLOCK_W] fp32."""
    return clamp_noise(edge_uniform(offs_r, offs_w, reader_offset, k0, k1), eps_low, eps_high)


@triton.jit
def node_noise(offs_w, k0, k1, eps_low, eps_high):
    """Clamped hard-concrete noise of the node masks, [BLOCK_W] fp32."""
    return clamp_noise(node_uniform(offs_w, k0, k1), eps_low, eps_high)


# -- a tiny test kernel: the raw generator, so tests can compare words -----------

@triton.jit(do_not_specialize=["c2", "c3", "k0", "k1"])
def _philox_words_kernel(c0_ptr, c1_ptr, out_ptr, n, c2, c3, k0, k1, BLOCK: tl.constexpr):
    """out[i] = philox_uint32(c0[i], c1[i], c2, c3; k0, k1) for int64 inputs
    holding uint32 values; out is int64."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    c0 = tl.load(c0_ptr + offs, mask=valid, other=0).to(tl.uint32)
    c1 = tl.load(c1_ptr + offs, mask=valid, other=0).to(tl.uint32)
    zero = tl.zeros_like(c0)
    bits = philox_uint32(c0, c1, zero + _as_u32(c2), zero + _as_u32(c3), _as_u32(k0), _as_u32(k1))
    tl.store(out_ptr + offs, bits.to(tl.int64), mask=valid)


def philox_words(seed: int, c0, c1, c2: int = 0, c3: int = 0):
    """Triton counterpart of `fastedge.ops.philox.philox_uint32` (for tests):
    int64 tensor of the first output word for each (c0[i], c1[i])."""
    import torch

    k0, k1 = split_seed(seed)
    c0, c1 = torch.broadcast_tensors(c0.to(torch.int64) & 0xFFFFFFFF,
                                     c1.to(torch.int64) & 0xFFFFFFFF)
    shape = c0.shape
    c0 = c0.contiguous().reshape(-1)
    c1 = c1.contiguous().reshape(-1)
    out = torch.empty_like(c0)
    n = c0.numel()
    if n:
        block = 1024
        _philox_words_kernel[(triton.cdiv(n, block),)](
            c0, c1, out, n, int(c2) & 0xFFFFFFFF, int(c3) & 0xFFFFFFFF, k0, k1, BLOCK=block)
    return out.reshape(shape)
