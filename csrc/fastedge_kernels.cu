// CUDA kernels of fastedge: the masked writer sum (forward, backward into the
// stack, backward into the mask), hard concrete, and the fused mask sampler.
// SPEC sections 2 and 5 say what they compute; kernels/reference.py is the
// plain-PyTorch version they must match.
//
// No PyTorch headers here: `nvcc -c fastedge_kernels.cu` alone compiles it, so
// CI can build it for sm_80 and sm_90 and read `ptxas -v` on a machine whose
// PyTorch is a CPU build (tests/test_cuda_compile.py). binding.cpp calls the
// extern "C" launchers declared in fastedge_kernels.h.
//
// The three matrix ops share one shape: a product whose "M" side is small (R
// readers, or W writers for the stack gradient, at most a few hundred) and
// whose "N" side is huge (N = batch * seq * hidden elements). One tiled kernel
// (`tile_gemm_kernel`) serves them, with a loader per operand layout and an
// epilogue per op:
//
//   forward           out[R, N]  = m[R, W] @ x[W, N] (+ base)    reduce over W
//   backward stack    dx[W, N]  += m^T[W, R] @ dout[R, N]         reduce over R
//   backward mask     dm[R, W]   = dout[R, N] @ x^T[N, W]         reduce over N
//
// A block owns a tile of output rows (all readers of a call when R <= 128) by
// 128 columns; it walks the reduction axis in steps of BK, staging both
// operands through shared memory (converted to fp32 once, at staging), and each
// thread accumulates a register tile of TR rows x 8 columns in fp32. Because a
// block holds every reader of its columns, the forward reads each element of x
// from global memory once per call ("one pass", SPEC section 2). A forward with
// at most 8 readers takes a separate streaming kernel that keeps all readers in
// registers and needs no shared-memory staging of x at all.
//
// Where the time goes (SPEC section 5): per element of x the forward does R
// fmas. An H100 does about 33 T fp32 fma/s on its CUDA cores against about
// 3 TB/s of memory, so these kernels are bound by memory up to about 11 fmas
// per byte: R up to about 22 readers for 16-bit stacks, 44 for fp32. Layers with
// more readers (CodeLlama-13B: 121) are bound by fp32 fma throughput; tensor
// cores (m split into high and low bf16/tf32 parts to keep fp32 accuracy) would
// be the next step for them.
//
// Plain CUDA C++ only (no inline PTX, no warp intrinsics): reductions go through
// shared memory in a fixed order, which also keeps every result deterministic.

#include "fastedge_kernels.h"
#include "philox.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#define FE_DEV __device__ __forceinline__

namespace fastedge {
namespace {

// ---------------------------------------------------------------------------
// Storage dtypes: fp32 arithmetic on fp32, bf16 or fp16 storage.
// Values travel between global memory and registers as raw 32-bit words (a
// 16-byte vector is four words) and are widened to fp32 only when used.
// ---------------------------------------------------------------------------

FE_DEV float word_as_float(uint32_t w) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(w);
#else
  float f;
  memcpy(&f, &w, sizeof f);
  return f;
#endif
}

FE_DEV uint32_t float_as_word(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t w;
  memcpy(&w, &f, sizeof w);
  return w;
#endif
}

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  FE_DEV static float to_float(float v) { return v; }
  FE_DEV static float from_float(float v) { return v; }
  FE_DEV static uint32_t bits(float v) { return float_as_word(v); }
  FE_DEV static float from_bits(uint32_t b) { return word_as_float(b); }
};

template <>
struct Storage<__nv_bfloat16> {
  FE_DEV static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  FE_DEV static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  FE_DEV static uint32_t bits(__nv_bfloat16 v) { return static_cast<__nv_bfloat16_raw>(v).x; }
  // bf16 is the top half of an fp32: widening is a shift.
  FE_DEV static float from_bits(uint32_t b) { return word_as_float(b << 16); }
};

template <>
struct Storage<__half> {
  FE_DEV static float to_float(__half v) { return __half2float(v); }
  FE_DEV static __half from_float(float v) { return __float2half_rn(v); }
  FE_DEV static uint32_t bits(__half v) { return static_cast<__half_raw>(v).x; }
  FE_DEV static float from_bits(uint32_t b) {
    __half_raw raw;
    raw.x = static_cast<unsigned short>(b);
    return __half2float(__half(raw));
  }
};

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int VEC_WIDTH = 16 / static_cast<int>(sizeof(T));

// NEL elements of T packed little-endian in NEL * sizeof(T) / 4 words, to fp32.
template <typename T, int NEL>
FE_DEV void words_to_floats(const uint32_t* w, float (&f)[NEL]) {
#pragma unroll
  for (int e = 0; e < NEL; ++e) {
    if constexpr (sizeof(T) == 4) {
      f[e] = Storage<T>::from_bits(w[e]);
    } else {
      const uint32_t word = w[e / 2];
      f[e] = Storage<T>::from_bits((e % 2) ? (word >> 16) : (word & 0xFFFFu));
    }
  }
}

template <typename T, int NEL>
FE_DEV void floats_to_words(const float (&f)[NEL], uint32_t* w) {
#pragma unroll
  for (int e = 0; e < NEL; ++e) {
    const uint32_t b = Storage<T>::bits(Storage<T>::from_float(f[e]));
    if constexpr (sizeof(T) == 4) {
      w[e] = b;
    } else if (e % 2 == 0) {
      w[e / 2] = b;
    } else {
      w[e / 2] |= b << 16;
    }
  }
}

// One 16-byte vector of a streamed operand, as raw words.
struct Raw16 {
  uint32_t w[4];
};

FE_DEV Raw16 zero_raw() {
  Raw16 r;
#pragma unroll
  for (int q = 0; q < 4; ++q) r.w[q] = 0u;  // all-zero bits are 0.0 in every dtype
  return r;
}

// The vector of T starting at row[col], with the elements at or past `end`
// read as zero. `vec` says the caller checked that the row start is 16-byte
// aligned and that `end` is a multiple of the vector width, so a vector is
// either wholly inside or wholly outside; otherwise (a misaligned prefix view,
// N not a multiple of the width) the vector is assembled element by element.
template <typename T>
FE_DEV Raw16 load_vec(const T* __restrict__ row, int64_t col, int64_t end, bool vec) {
  constexpr int VW = VEC_WIDTH<T>;
  const int64_t valid = end - col;
  Raw16 r = zero_raw();
  if (valid <= 0) return r;
  if (vec && valid >= VW) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + col));
    r.w[0] = v.x;
    r.w[1] = v.y;
    r.w[2] = v.z;
    r.w[3] = v.w;
    return r;
  }
#pragma unroll
  for (int e = 0; e < VW; ++e) {
    if (e < valid) {
      const uint32_t b = Storage<T>::bits(row[col + e]);
      if constexpr (sizeof(T) == 4) {
        r.w[e] = b;
      } else {
        r.w[e / 2] |= b << (16 * (e % 2));
      }
    }
  }
  return r;
}

// NEL consecutive elements p[0..NEL) (those at index >= valid read as 0), with
// one vector access when `vec` (NEL * sizeof(T) bytes, aligned by the caller).
// Used by epilogues, on memory the kernel may also write, so no __ldg.
template <typename T, int NEL>
FE_DEV void load_group(const T* p, int64_t valid, bool vec, float (&f)[NEL]) {
  constexpr int WORDS = NEL * static_cast<int>(sizeof(T)) / 4;
  if (vec && valid >= NEL) {
    uint32_t w[WORDS];
    if constexpr (WORDS % 4 == 0) {
#pragma unroll
      for (int c = 0; c < WORDS / 4; ++c) {
        const uint4 v = reinterpret_cast<const uint4*>(p)[c];
        w[4 * c] = v.x;
        w[4 * c + 1] = v.y;
        w[4 * c + 2] = v.z;
        w[4 * c + 3] = v.w;
      }
    } else {
      static_assert(WORDS == 2, "groups are 8, 16 or 32 bytes");
      const uint2 v = *reinterpret_cast<const uint2*>(p);
      w[0] = v.x;
      w[1] = v.y;
    }
    words_to_floats<T, NEL>(w, f);
    return;
  }
#pragma unroll
  for (int e = 0; e < NEL; ++e) f[e] = (e < valid) ? Storage<T>::to_float(p[e]) : 0.0f;
}

// Stores f[0..NEL) to p[0..NEL) (only the first `valid`), rounding to T once.
template <typename T, int NEL>
FE_DEV void store_group(T* p, int64_t valid, bool vec, const float (&f)[NEL]) {
  constexpr int WORDS = NEL * static_cast<int>(sizeof(T)) / 4;
  if (vec && valid >= NEL) {
    uint32_t w[WORDS];
    floats_to_words<T, NEL>(f, w);
    if constexpr (WORDS % 4 == 0) {
#pragma unroll
      for (int c = 0; c < WORDS / 4; ++c)
        reinterpret_cast<uint4*>(p)[c] = make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]);
    } else {
      static_assert(WORDS == 2, "groups are 8, 16 or 32 bytes");
      *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < NEL; ++e)
    if (e < valid) p[e] = Storage<T>::from_float(f[e]);
}

// out_row[col..] = acc (+ base_row[col..]), NEL columns, rounded once to T: the
// reference adds the base in fp32 and rounds the sum, and so do we.
template <typename T, int NEL>
FE_DEV void write_output(T* out_row, const T* base_row, int64_t col, int64_t end, bool vec,
                         float (&v)[NEL]) {
  const int64_t valid = end - col;
  if (base_row != nullptr) {
    float b[NEL];
    load_group<T, NEL>(base_row + col, valid, vec, b);
#pragma unroll
    for (int e = 0; e < NEL; ++e) v[e] += b[e];
  }
  store_group<T, NEL>(out_row + col, valid, vec, v);
}

FE_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------
// Masked sum forward with at most 8 readers (RMAX in {1, 2, 4, 8}).
//
// With few readers there is nothing to share between threads: a thread owns 8
// columns (one 16-byte vector of a 16-bit dtype, two of fp32) and keeps all
// RMAX readers of them in registers, streaming x straight from global memory
// into registers with UNROLL rows' vector loads in flight. Only m goes through
// shared memory, in chunks of WCHUNK writers, where every thread reads the same
// word (a broadcast). Consecutive threads own consecutive vectors, so each
// warp-wide load is 512 contiguous bytes. This is the path of resid_post (one
// reader over every writer), the largest single read of a step.
// ---------------------------------------------------------------------------

constexpr int FEW_THREADS = 256;
constexpr int FEW_COLS = 8;  // columns per thread
constexpr int FEW_BLOCK_COLS = FEW_THREADS * FEW_COLS;
constexpr int FEW_WCHUNK = 256;  // writers of m staged per chunk

template <typename T>
struct ForwardParams {
  const T* x;
  int64_t ldx;
  const float* m;
  const T* base;
  const int64_t* base_index;
  T* out;
  int64_t R, W, N;
  bool x_vec;    // x rows 16-byte aligned and N a multiple of the vector width
  bool out_vec;  // out (and base) rows likewise
};

template <typename T, int RMAX>
__global__ void __launch_bounds__(FEW_THREADS, 2)
    masked_sum_fwd_few_readers_kernel(const ForwardParams<T> p) {
  constexpr int VW = VEC_WIDTH<T>;
  constexpr int NV = FEW_COLS / VW;  // vectors per thread and row
  constexpr int UNROLL = 8 / NV;     // rows in flight: 8 vector loads per thread
  static_assert(NV * VW == FEW_COLS && FEW_WCHUNK % UNROLL == 0, "tile shape");

  __shared__ __align__(16) float ms[FEW_WCHUNK][RMAX];

  const int t = threadIdx.x;
  // Vector v of this thread starts at column col0 + v * FEW_THREADS * VW.
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * FEW_BLOCK_COLS + t * VW;

  float acc[RMAX][FEW_COLS];
#pragma unroll
  for (int r = 0; r < RMAX; ++r)
#pragma unroll
    for (int c = 0; c < FEW_COLS; ++c) acc[r][c] = 0.0f;

  for (int64_t w0 = 0; w0 < p.W; w0 += FEW_WCHUNK) {
    const int wn = static_cast<int>(min64(FEW_WCHUNK, p.W - w0));
    __syncthreads();  // everyone is done reading the previous chunk
#pragma unroll
    for (int r = 0; r < RMAX; ++r)
      ms[t][r] = (t < wn && r < p.R) ? p.m[r * p.W + w0 + t] : 0.0f;
    __syncthreads();

    for (int w = 0; w < wn; w += UNROLL) {
      Raw16 raw[UNROLL][NV];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const T* row = p.x + (w0 + w + u) * p.ldx;
#pragma unroll
        for (int v = 0; v < NV; ++v)
          raw[u][v] = (w + u < wn) ? load_vec(row, col0 + v * FEW_THREADS * VW, p.N, p.x_vec)
                                   : zero_raw();
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        // Rows past the chunk were loaded as zeros and have zero masks.
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          float f[VW];
          words_to_floats<T, VW>(raw[u][v].w, f);
#pragma unroll
          for (int r = 0; r < RMAX; ++r) {
            const float mv = ms[w + u][r];
#pragma unroll
            for (int e = 0; e < VW; ++e) acc[r][v * VW + e] = fmaf(mv, f[e], acc[r][v * VW + e]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RMAX; ++r) {
    if (r >= p.R) break;
    const T* base_row = nullptr;
    if (p.base != nullptr) base_row = p.base + (p.base_index ? p.base_index[r] : 0) * p.N;
    T* out_row = p.out + r * p.N;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      float o[VW];
#pragma unroll
      for (int e = 0; e < VW; ++e) o[e] = acc[r][v * VW + e];
      write_output<T, VW>(out_row, base_row, col0 + v * FEW_THREADS * VW, p.N, p.out_vec, o);
    }
  }
}

// ---------------------------------------------------------------------------
// The tiled kernel: C[I, J] (op) A[I, K] . B[K, J] for a small I.
//
// Block: TX = 16 threads across columns by TY threads across rows. A thread
// owns TR consecutive rows and two groups of 4 consecutive columns, 64 apart
// (tx * 4 and 64 + tx * 4): each warp then reads 256 contiguous bytes of a
// shared-memory row per float4 access, free of bank conflicts, and the same
// groups make coalesced stores. Block tile BM = TR * TY rows by BN = 128
// columns.
//
// Each step of the reduction stages a BK-deep slice of both operands in shared
// memory as fp32, laid out [k][i] so that a thread reads its TR rows and its 8
// columns at one k as float4s: per k, 2 + TR/4 shared loads feed 8 * TR fmas.
// Staging is double-buffered: the next slice is fetched from global memory
// into registers before the current slice's arithmetic and written to the
// other buffer after it, so one __syncthreads per step suffices and the loads
// overlap the math.
// ---------------------------------------------------------------------------

template <int TR_, int TY_>
struct TileConfig {
  static constexpr int TR = TR_;  // rows per thread
  static constexpr int TY = TY_;  // threads along rows
  static constexpr int TX = 16;   // threads along columns
  static constexpr int BM = TR * TY;
  static constexpr int BN = 128;
  static constexpr int THREADS = TX * TY;
  // Enough resident blocks for 16 warps per SM, which caps registers at 128
  // per thread (checked by tests/test_cuda_compile.py: no spills).
  static constexpr int MIN_BLOCKS = 65536 / (THREADS * 128);
  static_assert(TR % 4 == 0 && TX * 8 == BN, "thread tile shape");
};

// Reduction depth of one shared-memory stage, for tile Cfg streaming a B
// operand of type TB. Tiles of up to 32 rows are bound by memory bandwidth:
// they stage 16 rows of a 16-bit operand (4 KB per block, the same bytes as 8
// rows of fp32) to keep enough loads in flight. Larger tiles are bound by fmas
// and keep 8 rows, which leaves registers for their 8x8 accumulators (16 rows
// there spill).
template <class Cfg, typename TB>
constexpr int STAGE_K = (sizeof(TB) == 2 && Cfg::BM <= 32) ? 16 : 8;

using Tile16 = TileConfig<4, 4>;    //  64 threads, rows <= 16
using Tile32 = TileConfig<4, 8>;    // 128 threads, rows <= 32
using Tile64 = TileConfig<8, 8>;    // 128 threads, rows <= 64
using Tile128 = TileConfig<8, 16>;  // 256 threads, rows <= 128 (or more, tiled)

// Copies a BK x BI slice of one operand from global memory into shared memory
// as fp32 s[k * (BI + 4) + i], through registers. (The 4 floats of padding keep
// rows 16-byte aligned and spread the transposed stores below over banks.)
//
// K_ROWS: element (k, i) at p[k * ld + i] (rows along k, i contiguous): x in the
//         forward, dout and m in the stack gradient.
// else:   element (k, i) at p[i * ld + k] (rows along i, k contiguous): m in the
//         forward, dout and x in the mask gradient.
//
// Loads are 16-byte vectors along the contiguous axis, consecutive threads on
// consecutive vectors.
template <typename T, bool K_ROWS, int BK, int BI, int THREADS>
struct TileLoader {
  static constexpr int VW = VEC_WIDTH<T>;
  static constexpr int ROW_LEN = K_ROWS ? BI : BK;  // contiguous run per row
  static constexpr int VPR = ROW_LEN / VW;         // vectors per row
  static constexpr int VECS = BK * BI / VW;
  static constexpr int PER = (VECS + THREADS - 1) / THREADS;
  static constexpr int LDS = BI + 4;  // row stride of the shared tile
  static_assert(ROW_LEN % VW == 0, "rows are whole vectors");

  Raw16 raw[PER];

  FE_DEV void fetch(const T* __restrict__ p, int64_t ld, int64_t i0, int64_t i_end, int64_t k0,
                    int64_t k_end, bool vec) {
#pragma unroll
    for (int q = 0; q < PER; ++q) {
      const int v = threadIdx.x + q * THREADS;
      if (VECS % THREADS != 0 && v >= VECS) continue;
      const int row = v / VPR;
      const int along = (v % VPR) * VW;
      if (K_ROWS) {
        const int64_t k = k0 + row;
        raw[q] = k < k_end ? load_vec(p + k * ld, i0 + along, i_end, vec) : zero_raw();
      } else {
        const int64_t i = i0 + row;
        raw[q] = i < i_end ? load_vec(p + i * ld, k0 + along, k_end, vec) : zero_raw();
      }
    }
  }

  FE_DEV void store(float* __restrict__ s) const {
#pragma unroll
    for (int q = 0; q < PER; ++q) {
      const int v = threadIdx.x + q * THREADS;
      if (VECS % THREADS != 0 && v >= VECS) continue;
      const int row = v / VPR;
      const int along = (v % VPR) * VW;
      float f[VW];
      words_to_floats<T, VW>(raw[q].w, f);
      if (K_ROWS) {
        float* dst = s + row * LDS + along;
#pragma unroll
        for (int c = 0; c < VW / 4; ++c)
          reinterpret_cast<float4*>(dst)[c] =
              make_float4(f[4 * c], f[4 * c + 1], f[4 * c + 2], f[4 * c + 3]);
      } else {
#pragma unroll
        for (int e = 0; e < VW; ++e) s[(along + e) * LDS + row] = f[e];
      }
    }
  }
};

template <typename TA, typename TB>
struct GemmParams {
  const TA* a;  // [I, K] in the layout of the A loader
  int64_t lda;
  const TB* b;  // [K, J] in the layout of the B loader
  int64_t ldb;
  int64_t I, J, K;
  int64_t k_split;  // K elements per split when K is split (a multiple of 16); else K
  int64_t tiles_i, tiles_j;
  bool a_vec, b_vec;
};

// Block order: row tiles fastest, then column tiles, then splits of K. The
// blocks that share a slice of the big operand (every row tile of the same
// columns) run side by side, so it comes from DRAM once and from L2 after.
template <class Cfg, typename TA, bool A_KROWS, typename TB, bool B_KROWS, class Epilogue>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS)
    tile_gemm_kernel(const GemmParams<TA, TB> p, const Epilogue epi) {
  constexpr int TR = Cfg::TR, BM = Cfg::BM, BN = Cfg::BN, BK = STAGE_K<Cfg, TB>;
  using ALoader = TileLoader<TA, A_KROWS, BK, BM, Cfg::THREADS>;
  using BLoader = TileLoader<TB, B_KROWS, BK, BN, Cfg::THREADS>;
  constexpr int LDA = ALoader::LDS, LDB = BLoader::LDS;

  __shared__ __align__(16) float a_tile[2][BK * LDA];
  __shared__ __align__(16) float b_tile[2][BK * LDB];

  int64_t block = blockIdx.x;
  const int64_t tile_i = block % p.tiles_i;
  block /= p.tiles_i;
  const int64_t tile_j = block % p.tiles_j;
  const int64_t split = block / p.tiles_j;
  const int64_t i0 = tile_i * BM, j0 = tile_j * BN;
  const int64_t k_begin = split * p.k_split;
  const int64_t k_end = min64(p.K, k_begin + p.k_split);
  const int64_t k_steps = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;

  const int tx = threadIdx.x % Cfg::TX, ty = threadIdx.x / Cfg::TX;

  float acc[TR][8];
#pragma unroll
  for (int r = 0; r < TR; ++r)
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[r][c] = 0.0f;

  ALoader a_load;
  BLoader b_load;
  if (k_steps > 0) {
    a_load.fetch(p.a, p.lda, i0, p.I, k_begin, k_end, p.a_vec);
    b_load.fetch(p.b, p.ldb, j0, p.J, k_begin, k_end, p.b_vec);
    a_load.store(a_tile[0]);
    b_load.store(b_tile[0]);
  }
  __syncthreads();

  for (int64_t step = 0; step < k_steps; ++step) {
    const int cur = static_cast<int>(step & 1);
    const bool more = step + 1 < k_steps;
    if (more) {  // global -> registers for the next slice, in flight during the math
      const int64_t k_next = k_begin + (step + 1) * BK;
      a_load.fetch(p.a, p.lda, i0, p.I, k_next, k_end, p.a_vec);
      b_load.fetch(p.b, p.ldb, j0, p.J, k_next, k_end, p.b_vec);
    }
    const float* a_s = a_tile[cur] + ty * TR;
    const float* b_s = b_tile[cur] + tx * 4;
    // Unrolled by 2 only: a full unroll lets the compiler hoist the shared
    // loads of every kk at once and spill the accumulators.
#pragma unroll 2
    for (int kk = 0; kk < BK; ++kk) {
      float a[TR], b[8];
#pragma unroll
      for (int q = 0; q < TR / 4; ++q) {
        const float4 v = *reinterpret_cast<const float4*>(a_s + kk * LDA + 4 * q);
        a[4 * q] = v.x;
        a[4 * q + 1] = v.y;
        a[4 * q + 2] = v.z;
        a[4 * q + 3] = v.w;
      }
      const float4 b0 = *reinterpret_cast<const float4*>(b_s + kk * LDB);
      const float4 b1 = *reinterpret_cast<const float4*>(b_s + kk * LDB + BN / 2);
      b[0] = b0.x, b[1] = b0.y, b[2] = b0.z, b[3] = b0.w;
      b[4] = b1.x, b[5] = b1.y, b[6] = b1.z, b[7] = b1.w;
#pragma unroll
      for (int r = 0; r < TR; ++r)
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
    }
    if (more) {  // the other buffer was last read before the previous barrier
      a_load.store(a_tile[cur ^ 1]);
      b_load.store(b_tile[cur ^ 1]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < TR; ++r) {
    const int64_t i = i0 + ty * TR + r;
    if (i >= p.I) break;
#pragma unroll
    for (int g = 0; g < 2; ++g) {
      const int64_t j = j0 + g * (BN / 2) + tx * 4;
      if (j >= p.J) continue;
      float v[4] = {acc[r][4 * g], acc[r][4 * g + 1], acc[r][4 * g + 2], acc[r][4 * g + 3]};
      epi.apply(split, i, j, p.J - j, v);
    }
  }
}

// -- epilogues: what happens to 4 finished columns (i, j..j+3) ----------------

// Forward: out[i, j..] = acc (+ base[g(i), j..]) in the storage dtype.
template <typename T>
struct ForwardEpilogue {
  T* out;
  const T* base;
  const int64_t* base_index;
  int64_t N;
  bool vec;
  FE_DEV void apply(int64_t, int64_t i, int64_t j, int64_t valid, float (&v)[4]) const {
    const T* base_row = nullptr;
    if (base != nullptr) base_row = base + (base_index ? base_index[i] : 0) * N;
    write_output<T, 4>(out + i * N, base_row, j, j + valid, vec, v);
  }
};

// Stack gradient: dx[i, j..] += acc, in fp32, rounded once to TD.
template <typename TD>
struct AccumulateEpilogue {
  TD* dx;
  int64_t ld;
  bool vec;
  FE_DEV void apply(int64_t, int64_t i, int64_t j, int64_t valid, float (&v)[4]) const {
    TD* p = dx + i * ld + j;
    float old[4];
    load_group<TD, 4>(p, valid, vec, old);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] += old[e];
    store_group<TD, 4>(p, valid, vec, v);
  }
};

// Mask gradient: fp32 partial sums of one split, dst[split][i * si + j * sj];
// the strides also undo the swap of operands (see masked_sum_backward_mask).
struct PartialEpilogue {
  float* dst;
  int64_t si, sj, split_stride;
  FE_DEV void apply(int64_t split, int64_t i, int64_t j, int64_t valid, float (&v)[4]) const {
    float* p = dst + split * split_stride + i * si;
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (e < valid) p[(j + e) * sj] = v[e];
  }
};

// dst[idx] = sum over s of partial[s][idx], s in increasing order: the fixed
// second stage of the deterministic mask gradient.
__global__ void __launch_bounds__(256) sum_splits_kernel(const float* __restrict__ partial,
                                                         int64_t count, int64_t splits,
                                                         float* __restrict__ dst) {
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = partial[idx];
    for (int64_t q = 1; q < splits; ++q) s += partial[q * count + idx];
    dst[idx] = s;
  }
}

// ---------------------------------------------------------------------------
// Launch plumbing.
// ---------------------------------------------------------------------------

#if !defined(FASTEDGE_CPU_EMULATION)
// (tests/test_cuda_compile.py also runs these kernels on the CPU: it defines
// FASTEDGE_CPU_EMULATION and provides launch_kernel and the CUDA built-ins.)
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                          const Args&... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
}
#endif

constexpr int64_t MAX_GRID_X = 2147483647;

template <class Cfg, typename TA, bool A_KROWS, typename TB, bool B_KROWS, class Epilogue>
cudaError_t launch_tiles(GemmParams<TA, TB> p, int64_t splits, const Epilogue& epi,
                         cudaStream_t stream) {
  p.tiles_i = ceil_div(p.I, Cfg::BM);
  p.tiles_j = ceil_div(p.J, Cfg::BN);
  const int64_t blocks = p.tiles_i * p.tiles_j * splits;
  if (blocks == 0) return cudaSuccess;
  if (blocks > MAX_GRID_X) return cudaErrorInvalidConfiguration;
  return launch_kernel(tile_gemm_kernel<Cfg, TA, A_KROWS, TB, B_KROWS, Epilogue>,
                       dim3(static_cast<unsigned>(blocks)), dim3(Cfg::THREADS), stream, p, epi);
}

// The smallest tile that holds `rows` rows (a block then covers every reader
// of a call, so the big operand is read once); past 128 rows, 128-row tiles.
template <typename TA, bool A_KROWS, typename TB, bool B_KROWS, class Epilogue>
cudaError_t launch_tiles_for_rows(const GemmParams<TA, TB>& p, int64_t splits,
                                  const Epilogue& epi, cudaStream_t stream) {
  if (p.I <= 16) return launch_tiles<Tile16, TA, A_KROWS, TB, B_KROWS>(p, splits, epi, stream);
  if (p.I <= 32) return launch_tiles<Tile32, TA, A_KROWS, TB, B_KROWS>(p, splits, epi, stream);
  if (p.I <= 64) return launch_tiles<Tile64, TA, A_KROWS, TB, B_KROWS>(p, splits, epi, stream);
  return launch_tiles<Tile128, TA, A_KROWS, TB, B_KROWS>(p, splits, epi, stream);
}

// -- masked sum forward ----------------------------------------------------------

template <typename T, int RMAX>
cudaError_t launch_few_readers(const ForwardParams<T>& p, cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.N, FEW_BLOCK_COLS);
  if (blocks > MAX_GRID_X) return cudaErrorInvalidConfiguration;
  return launch_kernel(masked_sum_fwd_few_readers_kernel<T, RMAX>,
                       dim3(static_cast<unsigned>(blocks)), dim3(FEW_THREADS), stream, p);
}

template <typename T>
cudaError_t masked_sum_forward(const T* x, int64_t ldx, const float* m, const T* base,
                               const int64_t* base_index, T* out, int64_t R, int64_t W,
                               int64_t N, cudaStream_t stream) {
  if (R == 0 || N == 0) return cudaSuccess;
  constexpr int VW = VEC_WIDTH<T>;
  const int64_t row_bytes = N * static_cast<int64_t>(sizeof(T));
  ForwardParams<T> p;
  p.x = x;
  p.ldx = ldx;
  p.m = m;
  p.base = base;
  p.base_index = base_index;
  p.out = out;
  p.R = R;
  p.W = W;
  p.N = N;
  p.x_vec = aligned16(x) && (ldx * static_cast<int64_t>(sizeof(T))) % 16 == 0 && N % VW == 0;
  p.out_vec = aligned16(out) && row_bytes % 16 == 0 && (base == nullptr || aligned16(base));
  if (R <= 1) return launch_few_readers<T, 1>(p, stream);
  if (R <= 2) return launch_few_readers<T, 2>(p, stream);
  if (R <= 4) return launch_few_readers<T, 4>(p, stream);
  if (R <= 8) return launch_few_readers<T, 8>(p, stream);

  // A = m [R, W] (rows along readers, writers contiguous), B = x [W, N].
  GemmParams<float, T> g;
  g.a = m;
  g.lda = W;
  g.a_vec = aligned16(m) && W % 4 == 0;
  g.b = x;
  g.ldb = ldx;
  g.b_vec = p.x_vec;
  g.I = R;
  g.J = N;
  g.K = W;
  g.k_split = W;
  ForwardEpilogue<T> epi{out, base, base_index, N, p.out_vec};
  return launch_tiles_for_rows<float, false, T, true>(g, 1, epi, stream);
}

// -- masked sum backward into the stack ----------------------------------------------

// Each block owns a tile of dx (rows of writers x 128 columns) and reduces over
// every reader, so each dx element is read and written exactly once: no
// atomics, and the result does not depend on scheduling.
template <typename T, typename TD>
cudaError_t masked_sum_backward_stack(const float* m, const T* dout, TD* dx, int64_t lddx,
                                      int64_t R, int64_t W, int64_t N, cudaStream_t stream) {
  if (R == 0 || W == 0 || N == 0) return cudaSuccess;  // dx += 0
  constexpr int VW = VEC_WIDTH<T>;
  // A = m^T: element (k = r, i = w) at m[r * W + w], rows along k.
  GemmParams<float, T> g;
  g.a = m;
  g.lda = W;
  g.a_vec = aligned16(m) && W % 4 == 0;
  g.b = dout;
  g.ldb = N;
  g.b_vec = aligned16(dout) && (N * static_cast<int64_t>(sizeof(T))) % 16 == 0 && N % VW == 0;
  g.I = W;
  g.J = N;
  g.K = R;
  g.k_split = R;
  const bool dx_vec = aligned16(dx) && (lddx * static_cast<int64_t>(sizeof(TD))) % 16 == 0 &&
                      N % 4 == 0;
  AccumulateEpilogue<TD> epi{dx, lddx, dx_vec};
  return launch_tiles_for_rows<float, true, T, true>(g, 1, epi, stream);
}

// -- masked sum backward into the mask ----------------------------------------------

// dm = dout [R, N] . x^T [N, W] reduces over the long axis. For enough blocks
// to fill the GPU, N is cut into `splits` ranges of k_split columns; each block
// writes the fp32 partial sums of its tile and range, and sum_splits_kernel adds
// the ranges in order. The plan depends on (R, W, N) only, so results are
// bit-identical run to run (and across GPUs of any size).
constexpr int64_t MASK_TARGET_BLOCKS = 512;  // about 4 per SM on an H100
constexpr int64_t MASK_MIN_SPLIT = 4096;     // columns per block, at least
constexpr int64_t MASK_SPLIT_ALIGN = 16;     // multiple of every BK and vector width

struct MaskPlan {
  bool swap;  // rows of the tile are writers (W < R) rather than readers
  int64_t rows, cols, splits, k_split;
};

MaskPlan plan_backward_mask(int64_t R, int64_t W, int64_t N) {
  MaskPlan plan;
  // The smaller of R and W goes along the tile's rows, where tiles are sized to
  // fit; a single reader (resid_post) then wastes no rows.
  plan.swap = W < R;
  plan.rows = plan.swap ? W : R;
  plan.cols = plan.swap ? R : W;
  const int64_t bm = plan.rows <= 16 ? 16 : plan.rows <= 32 ? 32 : plan.rows <= 64 ? 64 : 128;
  const int64_t tiles = ceil_div(plan.rows, bm) * ceil_div(plan.cols, 128);
  int64_t splits = tiles > 0 ? ceil_div(MASK_TARGET_BLOCKS, tiles) : 1;
  const int64_t most = N / MASK_MIN_SPLIT;
  if (splits > most) splits = most;
  if (splits < 1) splits = 1;
  plan.k_split = ceil_div(ceil_div(N, splits), MASK_SPLIT_ALIGN) * MASK_SPLIT_ALIGN;
  plan.splits = N > 0 ? ceil_div(N, plan.k_split) : 1;  // no empty split
  return plan;
}

template <typename T>
cudaError_t masked_sum_backward_mask(const T* x, int64_t ldx, const T* dout, float* dm,
                                     void* workspace, int64_t R, int64_t W, int64_t N,
                                     cudaStream_t stream) {
  if (R == 0 || W == 0) return cudaSuccess;
  const MaskPlan plan = plan_backward_mask(R, W, N);
  constexpr int VW = VEC_WIDTH<T>;
  const bool x_vec =
      aligned16(x) && (ldx * static_cast<int64_t>(sizeof(T))) % 16 == 0 && N % VW == 0;
  const bool dout_vec =
      aligned16(dout) && (N * static_cast<int64_t>(sizeof(T))) % 16 == 0 && N % VW == 0;
  // Both operands have the reduction axis contiguous (rows along i).
  GemmParams<T, T> g;
  g.a = plan.swap ? x : dout;
  g.lda = plan.swap ? ldx : N;
  g.a_vec = plan.swap ? x_vec : dout_vec;
  g.b = plan.swap ? dout : x;
  g.ldb = plan.swap ? N : ldx;
  g.b_vec = plan.swap ? dout_vec : x_vec;
  g.I = plan.rows;
  g.J = plan.cols;
  g.K = N;
  g.k_split = plan.k_split;
  float* dst = plan.splits > 1 ? static_cast<float*>(workspace) : dm;
  // dm[r, w] at r * W + w: tile (i, j) is (r, w), or (w, r) when swapped.
  PartialEpilogue epi{dst, plan.swap ? 1 : W, plan.swap ? W : 1, R * W};
  cudaError_t err = launch_tiles_for_rows<T, false, T, false>(g, plan.splits, epi, stream);
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t count = R * W;
  const int64_t blocks = min64(ceil_div(count, 256), 65535);
  return launch_kernel(sum_splits_kernel, dim3(static_cast<unsigned>(blocks)), dim3(256),
                       stream, static_cast<const float*>(dst), count, plan.splits, dm);
}

// ---------------------------------------------------------------------------
// Hard concrete: elementwise, and the fused sampler of the masked sum.
// ---------------------------------------------------------------------------

constexpr int ELEMENTWISE_THREADS = 256;

unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(min64(ceil_div(n, ELEMENTWISE_THREADS), 65535));
}

__global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    hard_concrete_fwd_kernel(const float* __restrict__ log_alpha, const float* __restrict__ u,
                             bool training, float* __restrict__ z, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    z[i] = hard_concrete_forward(log_alpha[i], training ? u[i] : 0.0f, training);
}

__global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    hard_concrete_bwd_kernel(const float* __restrict__ log_alpha, const float* __restrict__ u,
                             bool training, const float* __restrict__ dz,
                             float* __restrict__ dlog_alpha, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dlog_alpha[i] = hard_concrete_backward(log_alpha[i], training ? u[i] : 0.0f, training, dz[i]);
}

// The sampler's tile: 32 writers (one per lane, so rows of [R, W] are read
// coalesced) by 64 readers (8 per thread, strided by the 8 warps).
constexpr int SAMPLE_TX = 32;
constexpr int SAMPLE_TY = 8;
constexpr int SAMPLE_ROWS = 8;  // readers per thread
constexpr int SAMPLE_THREADS = SAMPLE_TX * SAMPLE_TY;
constexpr int SAMPLE_TILE_R = SAMPLE_TY * SAMPLE_ROWS;

// Sum of one value per thread, in a fixed tree order (deterministic).
FE_DEV float block_sum(float v, float* red) {
  __syncthreads();  // red may still be read by a previous use
  red[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = SAMPLE_THREADS / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

struct SampleParams {
  const float* edge_log_alpha;  // [R, W]
  const float* node_log_alpha;  // [W] or null
  uint64_t seed;
  uint32_t reader_offset;
  bool training;
  int64_t R, W;
};

// The node mask of writer w (1 without node log_alphas): recomputed by each
// thread that needs it, which is cheaper than a round trip through memory.
FE_DEV float node_mask(const SampleParams& p, int64_t w) {
  if (p.node_log_alpha == nullptr) return 1.0f;
  const float u = p.training ? node_noise(p.seed, static_cast<uint32_t>(w)) : 0.0f;
  return hard_concrete_forward(p.node_log_alpha[w], u, p.training);
}

FE_DEV float edge_u(const SampleParams& p, int64_t r, int64_t w) {
  return p.training
             ? edge_noise(p.seed, p.reader_offset, static_cast<uint32_t>(r), static_cast<uint32_t>(w))
             : 0.0f;
}

// m = z_edge * s_node; one fp32 partial of sum(z_edge) per block.
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_masks_kernel(const SampleParams p, float* __restrict__ m, float* __restrict__ partial) {
  __shared__ float red[SAMPLE_THREADS];
  const int tx = threadIdx.x % SAMPLE_TX, ty = threadIdx.x / SAMPLE_TX;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * SAMPLE_TX + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * SAMPLE_TILE_R + ty;
  float local = 0.0f;
  if (w < p.W) {
    const float s_node = node_mask(p, w);
#pragma unroll
    for (int q = 0; q < SAMPLE_ROWS; ++q) {
      const int64_t r = r0 + q * SAMPLE_TY;
      if (r >= p.R) break;
      const int64_t idx = r * p.W + w;
      const float z = hard_concrete_forward(p.edge_log_alpha[idx], edge_u(p, r, w), p.training);
      m[idx] = p.node_log_alpha ? mul_rn(z, s_node) : z;
      local += z;
    }
  }
  const float total = block_sum(local, red);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
}

// out[0] = sum of partial[0..count), in a fixed order; one block.
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sum_partials_kernel(const float* __restrict__ partial, int64_t count, float* __restrict__ out) {
  __shared__ float red[SAMPLE_THREADS];
  float local = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += SAMPLE_THREADS) local += partial[i];
  const float total = block_sum(local, red);
  if (threadIdx.x == 0) out[0] = total;
}

// d_edge = hard_concrete'(dm * s_node + dedge_sum), and per (reader tile, w)
// the partial ds_node[w] = sum_r dm[r, w] * z_edge[r, w] (when there are node
// log_alphas), summed over the tile's readers in a fixed order.
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_masks_bwd_kernel(const SampleParams p, const float* __restrict__ dm,
                            const float* __restrict__ dedge_sum, float* __restrict__ d_edge,
                            float* __restrict__ col_partial) {
  __shared__ float red[SAMPLE_TY][SAMPLE_TX + 1];
  const int tx = threadIdx.x % SAMPLE_TX, ty = threadIdx.x / SAMPLE_TX;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * SAMPLE_TX + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * SAMPLE_TILE_R + ty;
  const bool has_node = p.node_log_alpha != nullptr;
  const float dsum = dedge_sum[0];
  float col = 0.0f;
  if (w < p.W) {
    const float s_node = node_mask(p, w);
#pragma unroll
    for (int q = 0; q < SAMPLE_ROWS; ++q) {
      const int64_t r = r0 + q * SAMPLE_TY;
      if (r >= p.R) break;
      const int64_t idx = r * p.W + w;
      const float la = p.edge_log_alpha[idx];
      const float u = edge_u(p, r, w);
      const float g = dm[idx];
      const float dz = add_rn(has_node ? mul_rn(g, s_node) : g, dsum);
      d_edge[idx] = hard_concrete_backward(la, u, p.training, dz);
      if (has_node) col = add_rn(col, mul_rn(g, hard_concrete_forward(la, u, p.training)));
    }
  }
  if (!has_node) return;  // uniform across the block
  red[ty][tx] = col;
  __syncthreads();
  if (ty == 0 && w < p.W) {
    float s = red[0][tx];
#pragma unroll
    for (int y = 1; y < SAMPLE_TY; ++y) s += red[y][tx];
    col_partial[static_cast<int64_t>(blockIdx.y) * p.W + w] = s;
  }
}

// d_node[w] = hard_concrete'(sum over reader tiles of col_partial[t][w]).
__global__ void __launch_bounds__(ELEMENTWISE_THREADS)
    node_grad_kernel(const SampleParams p, const float* __restrict__ col_partial,
                     int64_t reader_tiles, float* __restrict__ d_node) {
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; w < p.W;
       w += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float ds = 0.0f;
    for (int64_t t = 0; t < reader_tiles; ++t) ds += col_partial[t * p.W + w];
    const float u = p.training ? node_noise(p.seed, static_cast<uint32_t>(w)) : 0.0f;
    d_node[w] = hard_concrete_backward(p.node_log_alpha[w], u, p.training, ds);
  }
}

struct SampleGrid {
  int64_t x, y;
};

SampleGrid sample_grid(int64_t R, int64_t W) {
  return {ceil_div(W, SAMPLE_TX), ceil_div(R, SAMPLE_TILE_R)};
}

}  // namespace
}  // namespace fastedge

// ---------------------------------------------------------------------------
// extern "C" launchers (fastedge_kernels.h): dispatch on dtype.
// ---------------------------------------------------------------------------

extern "C" cudaError_t fe_masked_sum_forward(fe_dtype dtype, const void* x, int64_t ldx,
                                             const float* m, const void* base,
                                             const int64_t* base_index, void* out, int64_t R,
                                             int64_t W, int64_t N, cudaStream_t stream) {
  switch (dtype) {
    case FE_FLOAT32:
      return fastedge::masked_sum_forward(static_cast<const float*>(x), ldx, m,
                                          static_cast<const float*>(base), base_index,
                                          static_cast<float*>(out), R, W, N, stream);
    case FE_BFLOAT16:
      return fastedge::masked_sum_forward(static_cast<const __nv_bfloat16*>(x), ldx, m,
                                          static_cast<const __nv_bfloat16*>(base), base_index,
                                          static_cast<__nv_bfloat16*>(out), R, W, N, stream);
    case FE_FLOAT16:
      return fastedge::masked_sum_forward(static_cast<const __half*>(x), ldx, m,
                                          static_cast<const __half*>(base), base_index,
                                          static_cast<__half*>(out), R, W, N, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t fe_masked_sum_backward_stack(fe_dtype dtype, const float* m,
                                                    const void* dout, void* dx, int64_t lddx,
                                                    int dx_is_float32, int64_t R, int64_t W,
                                                    int64_t N, cudaStream_t stream) {
  switch (dtype) {
    case FE_FLOAT32:
      return fastedge::masked_sum_backward_stack(m, static_cast<const float*>(dout),
                                                 static_cast<float*>(dx), lddx, R, W, N, stream);
    case FE_BFLOAT16: {
      const auto* d = static_cast<const __nv_bfloat16*>(dout);
      if (dx_is_float32)
        return fastedge::masked_sum_backward_stack(m, d, static_cast<float*>(dx), lddx, R, W, N,
                                                   stream);
      return fastedge::masked_sum_backward_stack(m, d, static_cast<__nv_bfloat16*>(dx), lddx, R,
                                                 W, N, stream);
    }
    case FE_FLOAT16: {
      const auto* d = static_cast<const __half*>(dout);
      if (dx_is_float32)
        return fastedge::masked_sum_backward_stack(m, d, static_cast<float*>(dx), lddx, R, W, N,
                                                   stream);
      return fastedge::masked_sum_backward_stack(m, d, static_cast<__half*>(dx), lddx, R, W, N,
                                                 stream);
    }
  }
  return cudaErrorInvalidValue;
}

extern "C" size_t fe_masked_sum_backward_mask_workspace(int64_t R, int64_t W, int64_t N) {
  if (R == 0 || W == 0) return 0;
  const fastedge::MaskPlan plan = fastedge::plan_backward_mask(R, W, N);
  return plan.splits > 1 ? static_cast<size_t>(plan.splits * R * W) * sizeof(float) : 0;
}

extern "C" cudaError_t fe_masked_sum_backward_mask(fe_dtype dtype, const void* x, int64_t ldx,
                                                   const void* dout, float* dm, void* workspace,
                                                   int64_t R, int64_t W, int64_t N,
                                                   cudaStream_t stream) {
  switch (dtype) {
    case FE_FLOAT32:
      return fastedge::masked_sum_backward_mask(static_cast<const float*>(x), ldx,
                                                static_cast<const float*>(dout), dm, workspace, R,
                                                W, N, stream);
    case FE_BFLOAT16:
      return fastedge::masked_sum_backward_mask(static_cast<const __nv_bfloat16*>(x), ldx,
                                                static_cast<const __nv_bfloat16*>(dout), dm,
                                                workspace, R, W, N, stream);
    case FE_FLOAT16:
      return fastedge::masked_sum_backward_mask(static_cast<const __half*>(x), ldx,
                                                static_cast<const __half*>(dout), dm, workspace,
                                                R, W, N, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t fe_hard_concrete_forward(const float* log_alpha, const float* u,
                                                int training, float* z, int64_t n,
                                                cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (training && u == nullptr) return cudaErrorInvalidValue;
  return fastedge::launch_kernel(fastedge::hard_concrete_fwd_kernel,
                                 dim3(fastedge::elementwise_blocks(n)),
                                 dim3(fastedge::ELEMENTWISE_THREADS), stream, log_alpha, u,
                                 training != 0, z, n);
}

extern "C" cudaError_t fe_hard_concrete_backward(const float* log_alpha, const float* u,
                                                 int training, const float* dz,
                                                 float* dlog_alpha, int64_t n,
                                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (training && u == nullptr) return cudaErrorInvalidValue;
  return fastedge::launch_kernel(fastedge::hard_concrete_bwd_kernel,
                                 dim3(fastedge::elementwise_blocks(n)),
                                 dim3(fastedge::ELEMENTWISE_THREADS), stream, log_alpha, u,
                                 training != 0, dz, dlog_alpha, n);
}

extern "C" size_t fe_sample_masks_workspace(int64_t R, int64_t W) {
  const fastedge::SampleGrid g = fastedge::sample_grid(R, W);
  return static_cast<size_t>(g.x * g.y) * sizeof(float);
}

extern "C" cudaError_t fe_sample_masks(const float* edge_log_alpha, const float* node_log_alpha,
                                       uint64_t seed, uint32_t reader_offset, int training,
                                       float* m, float* edge_sum, void* workspace, int64_t R,
                                       int64_t W, cudaStream_t stream) {
  using namespace fastedge;
  const SampleGrid g = sample_grid(R, W);
  if (g.x > MAX_GRID_X || g.y > 65535) return cudaErrorInvalidConfiguration;
  float* partial = static_cast<float*>(workspace);
  const SampleParams p{edge_log_alpha, node_log_alpha, seed, reader_offset, training != 0, R, W};
  if (g.x * g.y > 0) {
    const cudaError_t err =
        launch_kernel(sample_masks_kernel, dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y)),
                      dim3(SAMPLE_THREADS), stream, p, m, partial);
    if (err != cudaSuccess) return err;
  }
  // Also runs for an empty call, so that edge_sum is written (0).
  return launch_kernel(sum_partials_kernel, dim3(1), dim3(SAMPLE_THREADS), stream,
                       static_cast<const float*>(partial), g.x * g.y, edge_sum);
}

extern "C" size_t fe_sample_masks_backward_workspace(int64_t R, int64_t W, int has_node) {
  if (!has_node) return 0;
  return static_cast<size_t>(fastedge::sample_grid(R, W).y * W) * sizeof(float);
}

extern "C" cudaError_t fe_sample_masks_backward(const float* edge_log_alpha,
                                                const float* node_log_alpha, uint64_t seed,
                                                uint32_t reader_offset, int training,
                                                const float* dm, const float* dedge_sum,
                                                float* d_edge, float* d_node, void* workspace,
                                                int64_t R, int64_t W, cudaStream_t stream) {
  using namespace fastedge;
  const SampleGrid g = sample_grid(R, W);
  if (g.x > MAX_GRID_X || g.y > 65535) return cudaErrorInvalidConfiguration;
  float* col_partial = static_cast<float*>(workspace);
  const SampleParams p{edge_log_alpha, node_log_alpha, seed, reader_offset, training != 0, R, W};
  if (g.x * g.y > 0) {
    const cudaError_t err = launch_kernel(
        sample_masks_bwd_kernel, dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y)),
        dim3(SAMPLE_THREADS), stream, p, dm, dedge_sum, d_edge, col_partial);
    if (err != cudaSuccess) return err;
  }
  if (node_log_alpha == nullptr || W == 0) return cudaSuccess;
  return launch_kernel(node_grad_kernel, dim3(elementwise_blocks(W)), dim3(ELEMENTWISE_THREADS),
                       stream, p, static_cast<const float*>(col_partial), g.y, d_node);
}
