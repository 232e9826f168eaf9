// Philox4x32-10 and the hard-concrete formulas, for device (and host) code.
//
// This is the CUDA twin of fastedge/ops/philox.py and of the hard-concrete
// reference in kernels/reference.py: the tests check that the noise agrees bit
// for bit with the Python generator, so every constant and the counter layout
// below must stay in step with philox.py:
//
//   key                = (seed mod 2^32, (seed >> 32) mod 2^32)
//   edge (r, w) noise  : counter (w, reader_offset + r, 0, 0)
//   node w noise       : counter (w, 0, 1, 0)
//   uniform            = (first output word >> 8) * 2^-24, exact in fp32, in [0, 1)
//   noise              = uniform clamped to [EPS_LOW, EPS_HIGH] (fp32 values)
//
// No PyTorch headers: this file is included by fastedge_kernels.cu, which nvcc
// must compile on its own.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FE_HD __host__ __device__ __forceinline__
#else
#define FE_HD inline
#endif

namespace fastedge {

// -- Philox4x32-10 -------------------------------------------------------------

constexpr uint32_t PHILOX_ROUND_A = 0xD2511F53u;
constexpr uint32_t PHILOX_ROUND_B = 0xCD9E8D57u;
constexpr uint32_t PHILOX_KEY_A = 0x9E3779B9u;
constexpr uint32_t PHILOX_KEY_B = 0xBB67AE85u;
constexpr int PHILOX_ROUNDS = 10;

constexpr uint32_t EDGE_STREAM = 0;  // c2 of an edge counter
constexpr uint32_t NODE_STREAM = 1;  // c2 of a node counter

// First 32-bit output word of Philox4x32-10 for counter (c0, c1, c2, c3) under
// the 64-bit key `seed`. The 64-bit product is written portably; nvcc turns it
// into one mul.lo and one mul.hi.
FE_HD uint32_t philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2,
                                 uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < PHILOX_ROUNDS; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(PHILOX_ROUND_A) * c0;
    const uint64_t p1 = static_cast<uint64_t>(PHILOX_ROUND_B) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += PHILOX_KEY_A;  // unsigned: wraps mod 2^32 as in philox.py
    k1 += PHILOX_KEY_B;
  }
  return c0;
}

// (x >> 8) * 2^-24: 24 random bits, exactly representable in fp32.
FE_HD float uint32_to_unit_float(uint32_t x) {
  return static_cast<float>(x >> 8) * 0x1p-24f;
}

// -- Hard-concrete constants (fastedge/constants.py), as the fp32 values that
// PyTorch uses when it multiplies a float32 tensor by the Python constant. Hex
// literals so that they are bit-identical to the reference, not re-rounded.

// float32(1e-6) and float32(1 - 1e-6): the noise clamp of kernels/reference.py.
constexpr float EPS_LOW = 0x1.0c6f7ap-20f;   // 9.99999997e-07
constexpr float EPS_HIGH = 0x1.ffffdep-1f;   // 0.999998987
// 1 / BETA with BETA = 2/3. PyTorch on CUDA divides by a scalar as a multiply
// by its fp32 reciprocal, 1 / float32(2/3), which rounds to exactly 1.5f.
constexpr float INV_BETA = 1.5f;
constexpr float STRETCH_SCALE = 0x1.333334p+0f;     // float32(1.1 - (-0.1)) = 1.2f
constexpr float LIMIT_LEFT = -0x1.99999ap-4f;       // float32(-0.1)
constexpr float DETERMINISTIC_GAIN = 0x1.333334p+0f;  // float32(0.8 / BETA) = 1.2f
constexpr float STRETCH_GRAD = 0x1.ccccccp+0f;      // float32(1.2 / BETA) = 1.8f

FE_HD float clamp_noise(float u) { return fminf(fmaxf(u, EPS_LOW), EPS_HIGH); }

// Hard-concrete noise of edge (reader r, writer w) of a call whose first reader
// has the global index `reader_offset` (already reduced mod 2^32).
FE_HD float edge_noise(uint64_t seed, uint32_t reader_offset, uint32_t r, uint32_t w) {
  return clamp_noise(uint32_to_unit_float(
      philox_first_word(seed, w, reader_offset + r, EDGE_STREAM, 0u)));
}

// Hard-concrete noise of writer w's node mask (shared by all calls of a step).
FE_HD float node_noise(uint64_t seed, uint32_t w) {
  return clamp_noise(uint32_to_unit_float(philox_first_word(seed, w, 0u, NODE_STREAM, 0u)));
}

// -- Hard-concrete formulas ------------------------------------------------------
//
// Each operation is rounded separately, in the order the reference writes them
// (the _rn intrinsics keep nvcc from contracting a*b+c into an fma), so the
// results match PyTorch's elementwise kernels up to the libm ulp of exp/log.

#if defined(__CUDA_ARCH__)
FE_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
FE_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
FE_HD float sub_rn(float a, float b) { return __fsub_rn(a, b); }
#else
FE_HD float mul_rn(float a, float b) { return a * b; }
FE_HD float add_rn(float a, float b) { return a + b; }
FE_HD float sub_rn(float a, float b) { return a - b; }
#endif

// 1 / (1 + exp(-x)) as torch.sigmoid computes it; exact 0 at -inf and 1 at +inf.
FE_HD float sigmoid(float x) { return 1.0f / add_rn(1.0f, expf(-x)); }

// s = sigmoid((log u - log(1 - u) + log_alpha) / beta) and its stretched value
// s * (r - l) + l (before the clamp to [0, 1]).
struct Concrete {
  float s;
  float stretched;
};

FE_HD Concrete concrete(float log_alpha, float u) {
  const float logit = sub_rn(logf(u), log1pf(-u));
  Concrete c;
  c.s = sigmoid(mul_rn(add_rn(logit, log_alpha), INV_BETA));
  c.stretched = add_rn(mul_rn(c.s, STRETCH_SCALE), LIMIT_LEFT);
  return c;
}

// x clamped to [0, 1], NaN kept NaN (both comparisons are false for NaN):
// fminf/fmaxf return the non-NaN operand and would turn a NaN mask into 0.
FE_HD float clamp01_keep_nan(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// z: the training sample (noise u) or the deterministic evaluation value. A NaN
// log_alpha (or noise) gives NaN, as on every backend.
FE_HD float hard_concrete_forward(float log_alpha, float u, bool training) {
  if (!training) return sigmoid(mul_rn(log_alpha, DETERMINISTIC_GAIN));
  return clamp01_keep_nan(concrete(log_alpha, u).stretched);
}

// d log_alpha given dz. Where the stretched sample is clamped the gradient is 0
// by selection, not by a product, so log_alpha = -inf (a structural zero) gives
// exactly 0, never NaN.
FE_HD float hard_concrete_backward(float log_alpha, float u, bool training, float dz) {
  if (!training) {
    const float z = sigmoid(mul_rn(log_alpha, DETERMINISTIC_GAIN));
    return mul_rn(mul_rn(mul_rn(dz, z), sub_rn(1.0f, z)), DETERMINISTIC_GAIN);
  }
  const Concrete c = concrete(log_alpha, u);
  const bool inside = c.stretched > 0.0f && c.stretched < 1.0f;
  const float grad = mul_rn(mul_rn(mul_rn(dz, c.s), sub_rn(1.0f, c.s)), STRETCH_GRAD);
  return inside ? grad : 0.0f;
}

}  // namespace fastedge
