"""Rounding fp32 to a narrower format on the bits, shared by the kernels.

Compiled kernels round fp32 to bf16 to nearest (ties to even); the Triton
interpreter's own conversion truncates. Rounding on the bits first makes the
two agree, and the result, exactly representable, then converts exactly.
"""
import triton
import triton.language as tl


@triton.jit
def round_low_bits(v, LOW_BITS: tl.constexpr):
    """fp32 `v` rounded to nearest (ties to even) with its LOW_BITS lowest
    mantissa bits cleared: 16 gives a bfloat16 value, 13 a tf32 value, exactly
    representable in the narrower format (so a later narrowing, or a tensor
    core reading only the top bits, is exact). Infinities and NaN stay so; a
    value past the format's largest rounds to infinity."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + ((1 << (LOW_BITS - 1)) - 1) + ((bits >> LOW_BITS) & 1)
    bits = bits & (0xFFFFFFFF ^ ((1 << LOW_BITS) - 1))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_storage(v, dtype: tl.constexpr):
    """fp32 `v` rounded to nearest in `dtype`, as a tensor of `dtype`."""
    if dtype == tl.bfloat16:
        return round_low_bits(v, 16).to(dtype)
    return v.to(dtype)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 `v` rounded to nearest in `dtype`, kept in fp32 (exactly
    representable in `dtype`, so storing it is exact)."""
    if dtype == tl.float32:
        return v
    return to_storage(v, dtype).to(tl.float32)
