// Host launch functions of fastedge's CUDA kernels (fastedge_kernels.cu).
//
// Plain C types only (pointers, sizes, strides, a dtype enum, a stream), so the
// kernels build with nvcc alone and the PyTorch binding (binding.cpp) stays a
// thin layer that checks arguments and allocates memory. The shapes, dtypes
// and strides are those of fastedge/backends/base.py; the binding has checked
// them before calling. Every function launches on `stream`, never synchronises,
// and returns the launch status (cudaSuccess, or the error of the first launch
// that failed).
//
// Sizes: R readers, W writers, N elements per writer, G base rows. Strides are
// in elements. Matrices are row-major with the given row stride and unit
// column stride.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Storage dtype of the writer stack (and of base, out, dout).
typedef enum fe_dtype {
  FE_FLOAT32 = 0,
  FE_BFLOAT16 = 1,
  FE_FLOAT16 = 2,
} fe_dtype;

// out[r, :] = base[g(r), :] + sum_w m[r, w] * x[w, :], accumulated in fp32 and
// written in `dtype`. x: [W, N] with row stride ldx; m: [R, W] fp32 contiguous;
// base: NULL or [G, N] contiguous; base_index: NULL (g = 0) or [R] int64;
// out: [R, N] contiguous. Every element of out is written.
cudaError_t fe_masked_sum_forward(fe_dtype dtype, const void* x, int64_t ldx, const float* m,
                                  const void* base, const int64_t* base_index, void* out,
                                  int64_t R, int64_t W, int64_t N, cudaStream_t stream);

// dx[w, :] += sum_r m[r, w] * dout[r, :], accumulated in fp32. m: [R, W] fp32;
// dout: [R, N] contiguous in `dtype`; dx: [W, N] with row stride lddx, in fp32
// (dx_is_float32 != 0) or in `dtype`.
cudaError_t fe_masked_sum_backward_stack(fe_dtype dtype, const float* m, const void* dout,
                                         void* dx, int64_t lddx, int dx_is_float32, int64_t R,
                                         int64_t W, int64_t N, cudaStream_t stream);

// Bytes of scratch that fe_masked_sum_backward_mask needs for this shape (0
// when it needs none). Depends on the shape only, so the split of N, and with
// it every bit of the result, is the same run to run.
size_t fe_masked_sum_backward_mask_workspace(int64_t R, int64_t W, int64_t N);

// dm[r, w] = sum_n dout[r, n] * x[w, n] in fp32, deterministic: N is cut into a
// fixed number of splits, each block writes its partial sums to `workspace`
// (fe_masked_sum_backward_mask_workspace bytes, 16-byte aligned), and a second
// kernel adds the splits in a fixed order. dm: [R, W] fp32 contiguous.
cudaError_t fe_masked_sum_backward_mask(fe_dtype dtype, const void* x, int64_t ldx,
                                        const void* dout, float* dm, void* workspace, int64_t R,
                                        int64_t W, int64_t N, cudaStream_t stream);

// z[i] = hard_concrete(log_alpha[i], u[i]) (training; u != NULL) or the
// deterministic value (training == 0; u is ignored). n elements, fp32.
cudaError_t fe_hard_concrete_forward(const float* log_alpha, const float* u, int training,
                                     float* z, int64_t n, cudaStream_t stream);

// d log_alpha[i] given dz[i], same conventions as the forward.
cudaError_t fe_hard_concrete_backward(const float* log_alpha, const float* u, int training,
                                      const float* dz, float* dlog_alpha, int64_t n,
                                      cudaStream_t stream);

// Bytes of scratch for fe_sample_masks (per-block partial sums of edge_sum).
size_t fe_sample_masks_workspace(int64_t R, int64_t W);

// m[r, w] = z_edge[r, w] * s_node[w] (s_node = 1 when node_log_alpha is NULL)
// and edge_sum[0] = sum of z_edge (fixed-order reduction), from edge_log_alpha
// [R, W] and node_log_alpha [W] (or NULL), with Philox noise under fastedge's
// counter layout (seed is the 64-bit key; reader_offset is taken mod 2^32).
cudaError_t fe_sample_masks(const float* edge_log_alpha, const float* node_log_alpha,
                            uint64_t seed, uint32_t reader_offset, int training, float* m,
                            float* edge_sum, void* workspace, int64_t R, int64_t W,
                            cudaStream_t stream);

// Bytes of scratch for fe_sample_masks_backward (per-tile column sums for the
// node gradient; 0 when node_log_alpha is NULL).
size_t fe_sample_masks_backward_workspace(int64_t R, int64_t W, int has_node);

// d_edge [R, W] and, when node_log_alpha != NULL, d_node [W] given dm [R, W]
// and the scalar dedge_sum (a device pointer to one float). The masks are
// re-derived from the seed; the node gradient's sum over readers runs in a
// fixed order.
cudaError_t fe_sample_masks_backward(const float* edge_log_alpha, const float* node_log_alpha,
                                     uint64_t seed, uint32_t reader_offset, int training,
                                     const float* dm, const float* dedge_sum, float* d_edge,
                                     float* d_node, void* workspace, int64_t R, int64_t W,
                                     cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
