"""Philox4x32-10 counter-based random numbers in plain PyTorch.

The fused hard-concrete ops draw their noise from a counter-based generator so
that the masks can be re-derived in the backward pass (nothing is saved) and so
that every backend produces the same noise from the same seed. Triton
(`fastedge.kernels.philox`) and CUDA (`csrc/philox.cuh`) carry the same
generator; the tests check that all of them agree bit for bit.

The generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011): a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) go
through ten rounds of

    hi0, lo0 = mulhilo(0xD2511F53, c0);  hi1, lo1 = mulhilo(0xCD9E8D57, c2)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    k0 += 0x9E3779B9;  k1 += 0xBB67AE85            (mod 2**32)

and the first output word c0 is used.

fastedge's counter layout (the contract shared by every backend):

* key = (seed mod 2**32, (seed >> 32) mod 2**32)
* an edge mask at (reader r, writer w) of a call: counter (w, reader_offset + r, 0, 0)
* a node mask of writer w:                        counter (w, 0, 1, 0)

so one seed per training step gives every edge of the model its own stream
(callers pass the global index of a call's first reader as `reader_offset`)
and gives each writer one node-mask sample shared by all layers.

A 32-bit output x becomes a uniform float as (x >> 8) * 2**-24, exact in fp32
and in [0, 1); the hard-concrete noise is that value clamped to
[eps, 1 - eps].
"""
from __future__ import annotations

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

EDGE_STREAM = 0
NODE_STREAM = 1

_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product a * b, for uint32 values
    held in int64 tensors. The product can exceed int64, so b is split into
    16-bit halves whose partial products stay below 2**48."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo
    p_hi = a * b_hi
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox_uint32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: int = 0,
                  c3: int = 0) -> torch.Tensor:
    """First 32-bit word of Philox4x32-10 for each counter, as int64 in
    [0, 2**32). `c0` and `c1` are integer tensors (broadcast together)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = c0.to(torch.int64) & _MASK32
    c1 = c1.to(torch.int64) & _MASK32
    c0, c1 = torch.broadcast_tensors(c0, c1)
    c2 = torch.full_like(c0, c2 & _MASK32)
    c3 = torch.full_like(c0, c3 & _MASK32)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_ROUND_A, c0)
        hi1, lo1 = _mulhilo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0


def uint32_to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in [0, 1) from 32-bit words: (x >> 8) * 2**-24."""
    return (x >> 8).to(torch.float32) * (2.0 ** -24)


def edge_uniform(seed: int, n_readers: int, n_writers: int, reader_offset: int = 0,
                 device=None) -> torch.Tensor:
    """[R, W] float32 uniforms in [0, 1) for the edge masks of one call."""
    r = torch.arange(n_readers, device=device, dtype=torch.int64)[:, None] + int(reader_offset)
    w = torch.arange(n_writers, device=device, dtype=torch.int64)[None, :]
    return uint32_to_unit_float(philox_uint32(seed, w, r, EDGE_STREAM))


def node_uniform(seed: int, n_writers: int, device=None) -> torch.Tensor:
    """[W] float32 uniforms in [0, 1) for the node masks of writers 0..W-1."""
    w = torch.arange(n_writers, device=device, dtype=torch.int64)
    return uint32_to_unit_float(philox_uint32(seed, w, torch.zeros_like(w), NODE_STREAM))
