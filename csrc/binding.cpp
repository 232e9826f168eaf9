// PyTorch binding of fastedge's CUDA kernels: operator namespace `fastedge_cuda`.
//
// A thin layer: check every argument against the contract of
// fastedge/backends/base.py (device, dtype, shape, strides), allocate outputs
// and scratch through PyTorch's caching allocator, and call the plain-C
// launchers of fastedge_kernels.h on the current stream. The Python-level custom
// ops (namespace `fastedge`, with fake kernels and autograd) call these through
// fastedge.backends.cuda_backend; these operators have CUDA kernels only.
//
// Built by setup.py as `fastedge._cuda`, or just in time by cuda_backend.py as
// `fastedge_cuda_jit`; importing either module registers the operators.

#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "fastedge_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// -- argument checks ----------------------------------------------------------

void check_device(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "fastedge_cuda: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "fastedge_cuda: ", name, " is on ", t.device(),
              " but the other arguments are on ", like.device());
}

void check_dtype(const Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "fastedge_cuda: ", name, " must be ", want, ", got ",
              t.scalar_type());
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "fastedge_cuda: ", name, " must have shape ", want, ", got ",
              t.sizes());
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "fastedge_cuda: ", name, " must be contiguous");
}

fe_dtype storage_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FE_FLOAT32;
    case at::kBFloat16:
      return FE_BFLOAT16;
    case at::kHalf:
      return FE_FLOAT16;
    default:
      break;
  }
  TORCH_CHECK(false, "fastedge_cuda: ", name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
}

// [rows, N] with unit column stride and a row stride of at least N: a prefix
// view of a larger stack. (Rows may not overlap: dx is written row by row.)
void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "fastedge_cuda: ", name, " must be 2-D, got ", t.dim(), "-D");
  const int64_t rows = t.size(0), n = t.size(1);
  TORCH_CHECK(n <= 1 || t.stride(1) == 1, "fastedge_cuda: ", name,
              " must have unit stride along its last axis, got strides ", t.strides());
  TORCH_CHECK(rows <= 1 || t.stride(0) >= n, "fastedge_cuda: ", name,
              " rows must not overlap (stride(0) >= size(1)), got strides ", t.strides(),
              " for shape ", t.sizes());
}

int64_t row_stride(const Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastedge_cuda.", op, ": CUDA error: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Scratch memory from the caching allocator (its blocks are 512-byte aligned).
Tensor scratch(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* ptr_or_null(const Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

// -- masked writer sum --------------------------------------------------------

void masked_sum_forward(const Tensor& x, const Tensor& m, const OptTensor& base,
                        const OptTensor& base_index, const Tensor& out) {
  check_device(x, "x", x);
  const fe_dtype dtype = storage_dtype(x, "x");
  check_rows(x, "x");
  const int64_t W = x.size(0), N = x.size(1);
  check_device(m, "m", x);
  check_dtype(m, "m", at::kFloat);
  TORCH_CHECK(m.dim() == 2 && m.size(1) == W, "fastedge_cuda: m must be [R, ", W,
              "] (one column per writer of x), got ", m.sizes());
  check_contiguous(m, "m");
  const int64_t R = m.size(0);
  check_device(out, "out", x);
  check_dtype(out, "out", x.scalar_type());
  check_shape(out, "out", {R, N});
  check_contiguous(out, "out");
  const void* base_ptr = nullptr;
  const int64_t* index_ptr = nullptr;
  if (base.has_value()) {
    const Tensor& b = *base;
    check_device(b, "base", x);
    check_dtype(b, "base", x.scalar_type());
    TORCH_CHECK(b.dim() == 2 && b.size(1) == N && b.size(0) >= 1,
                "fastedge_cuda: base must be [G, ", N, "] with G >= 1, got ", b.sizes());
    check_contiguous(b, "base");
    base_ptr = b.data_ptr();
    if (base_index.has_value()) {
      const Tensor& bi = *base_index;
      check_device(bi, "base_index", x);
      check_dtype(bi, "base_index", at::kLong);
      check_shape(bi, "base_index", {R});
      check_contiguous(bi, "base_index");
      // Values must lie in [0, G); checking them here would synchronise.
      index_ptr = bi.data_ptr<int64_t>();
    } else {
      TORCH_CHECK(b.size(0) == 1, "fastedge_cuda: base without base_index must have one row, got ",
                  b.sizes());
    }
  } else {
    TORCH_CHECK(!base_index.has_value(), "fastedge_cuda: base_index given without base");
  }
  if (R == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(fe_masked_sum_forward(dtype, ptr_or_null(x), row_stride(x), m.data_ptr<float>(),
                                     base_ptr, index_ptr, out.data_ptr(), R, W, N, stream_of(x)),
               "masked_sum_forward");
}

void masked_sum_backward_stack(const Tensor& m, const Tensor& dout, const Tensor& dx) {
  check_device(dout, "dout", dout);
  const fe_dtype dtype = storage_dtype(dout, "dout");
  TORCH_CHECK(dout.dim() == 2, "fastedge_cuda: dout must be [R, N], got ", dout.sizes());
  check_contiguous(dout, "dout");
  const int64_t R = dout.size(0), N = dout.size(1);
  check_device(dx, "dx", dout);
  TORCH_CHECK(dx.scalar_type() == at::kFloat || dx.scalar_type() == dout.scalar_type(),
              "fastedge_cuda: dx must be float32 or dout's dtype ", dout.scalar_type(), ", got ",
              dx.scalar_type());
  check_rows(dx, "dx");
  TORCH_CHECK(dx.size(1) == N, "fastedge_cuda: dx must be [W, ", N, "], got ", dx.sizes());
  const int64_t W = dx.size(0);
  check_device(m, "m", dout);
  check_dtype(m, "m", at::kFloat);
  check_shape(m, "m", {R, W});
  check_contiguous(m, "m");
  if (R == 0 || W == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(dout.device());
  check_launch(fe_masked_sum_backward_stack(dtype, m.data_ptr<float>(), dout.data_ptr(),
                                            dx.data_ptr(), row_stride(dx),
                                            dx.scalar_type() == at::kFloat, R, W, N,
                                            stream_of(dout)),
               "masked_sum_backward_stack");
}

Tensor masked_sum_backward_mask(const Tensor& x, const Tensor& dout) {
  check_device(x, "x", x);
  const fe_dtype dtype = storage_dtype(x, "x");
  check_rows(x, "x");
  const int64_t W = x.size(0), N = x.size(1);
  check_device(dout, "dout", x);
  check_dtype(dout, "dout", x.scalar_type());
  TORCH_CHECK(dout.dim() == 2 && dout.size(1) == N, "fastedge_cuda: dout must be [R, ", N,
              "], got ", dout.sizes());
  check_contiguous(dout, "dout");
  const int64_t R = dout.size(0);
  Tensor dm = at::empty({R, W}, x.options().dtype(at::kFloat));
  if (R == 0 || W == 0) return dm;
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor work = scratch(fe_masked_sum_backward_mask_workspace(R, W, N), x);
  check_launch(fe_masked_sum_backward_mask(dtype, ptr_or_null(x), row_stride(x),
                                           ptr_or_null(dout), dm.data_ptr<float>(),
                                           ptr_or_null(work), R, W, N, stream_of(x)),
               "masked_sum_backward_mask");
  return dm;
}

// -- hard concrete --------------------------------------------------------------

void check_hard_concrete(const Tensor& log_alpha, const OptTensor& u, bool training) {
  check_device(log_alpha, "log_alpha", log_alpha);
  check_dtype(log_alpha, "log_alpha", at::kFloat);
  check_contiguous(log_alpha, "log_alpha");
  if (training) {
    TORCH_CHECK(u.has_value(), "fastedge_cuda: training hard concrete needs the noise u");
    check_device(*u, "u", log_alpha);
    check_dtype(*u, "u", at::kFloat);
    check_shape(*u, "u", log_alpha.sizes());
    check_contiguous(*u, "u");
  }
}

const float* noise_ptr(const OptTensor& u, bool training) {
  return training ? u->data_ptr<float>() : nullptr;
}

Tensor hard_concrete_forward(const Tensor& log_alpha, const OptTensor& u, bool training) {
  check_hard_concrete(log_alpha, u, training);
  Tensor z = at::empty_like(log_alpha);
  if (log_alpha.numel() == 0) return z;
  const c10::cuda::CUDAGuard guard(log_alpha.device());
  check_launch(fe_hard_concrete_forward(log_alpha.data_ptr<float>(), noise_ptr(u, training),
                                        training, z.data_ptr<float>(), log_alpha.numel(),
                                        stream_of(log_alpha)),
               "hard_concrete_forward");
  return z;
}

Tensor hard_concrete_backward(const Tensor& log_alpha, const OptTensor& u, bool training,
                              const Tensor& dz) {
  check_hard_concrete(log_alpha, u, training);
  check_device(dz, "dz", log_alpha);
  check_dtype(dz, "dz", at::kFloat);
  check_shape(dz, "dz", log_alpha.sizes());
  check_contiguous(dz, "dz");
  Tensor grad = at::empty_like(log_alpha);
  if (log_alpha.numel() == 0) return grad;
  const c10::cuda::CUDAGuard guard(log_alpha.device());
  check_launch(fe_hard_concrete_backward(log_alpha.data_ptr<float>(), noise_ptr(u, training),
                                         training, dz.data_ptr<float>(),
                                         grad.data_ptr<float>(), log_alpha.numel(),
                                         stream_of(log_alpha)),
               "hard_concrete_backward");
  return grad;
}

// -- fused sampler ----------------------------------------------------------------

// edge_log_alpha [R, W] and node_log_alpha [W] (or none), float32 contiguous.
void check_sampler(const Tensor& edge_log_alpha, const OptTensor& node_log_alpha) {
  check_device(edge_log_alpha, "edge_log_alpha", edge_log_alpha);
  check_dtype(edge_log_alpha, "edge_log_alpha", at::kFloat);
  TORCH_CHECK(edge_log_alpha.dim() == 2, "fastedge_cuda: edge_log_alpha must be [R, W], got ",
              edge_log_alpha.sizes());
  check_contiguous(edge_log_alpha, "edge_log_alpha");
  if (node_log_alpha.has_value()) {
    check_device(*node_log_alpha, "node_log_alpha", edge_log_alpha);
    check_dtype(*node_log_alpha, "node_log_alpha", at::kFloat);
    check_shape(*node_log_alpha, "node_log_alpha", {edge_log_alpha.size(1)});
    check_contiguous(*node_log_alpha, "node_log_alpha");
  }
}

// The schema's int is signed 64-bit: the caller passes the seed's 64 bits
// (seed mod 2^64, as a signed value) and the reader offset mod 2^32 or as is;
// both are reduced here exactly as fastedge/ops/philox.py reduces them.
uint64_t philox_key(int64_t seed) { return static_cast<uint64_t>(seed); }
uint32_t philox_offset(int64_t reader_offset) { return static_cast<uint32_t>(reader_offset); }

std::tuple<Tensor, Tensor> sample_masks(const Tensor& edge_log_alpha,
                                        const OptTensor& node_log_alpha, int64_t seed,
                                        int64_t reader_offset, bool training) {
  check_sampler(edge_log_alpha, node_log_alpha);
  const int64_t R = edge_log_alpha.size(0), W = edge_log_alpha.size(1);
  Tensor m = at::empty({R, W}, edge_log_alpha.options());
  Tensor edge_sum = at::empty({}, edge_log_alpha.options());
  const c10::cuda::CUDAGuard guard(edge_log_alpha.device());
  Tensor work = scratch(fe_sample_masks_workspace(R, W), edge_log_alpha);
  check_launch(
      fe_sample_masks(edge_log_alpha.data_ptr<float>(),
                      node_log_alpha.has_value() ? node_log_alpha->data_ptr<float>() : nullptr,
                      philox_key(seed), philox_offset(reader_offset), training,
                      m.data_ptr<float>(), edge_sum.data_ptr<float>(), ptr_or_null(work), R, W,
                      stream_of(edge_log_alpha)),
      "sample_masks");
  return {m, edge_sum};
}

// Returns (d_edge [R, W], d_node [W]); d_node is an empty [0] tensor when there
// are no node log_alphas (the Python side turns it into None).
std::tuple<Tensor, Tensor> sample_masks_backward(const Tensor& edge_log_alpha,
                                                 const OptTensor& node_log_alpha, int64_t seed,
                                                 int64_t reader_offset, bool training,
                                                 const Tensor& dm, const Tensor& dedge_sum) {
  check_sampler(edge_log_alpha, node_log_alpha);
  const int64_t R = edge_log_alpha.size(0), W = edge_log_alpha.size(1);
  check_device(dm, "dm", edge_log_alpha);
  check_dtype(dm, "dm", at::kFloat);
  check_shape(dm, "dm", {R, W});
  check_contiguous(dm, "dm");
  check_device(dedge_sum, "dedge_sum", edge_log_alpha);
  check_dtype(dedge_sum, "dedge_sum", at::kFloat);
  TORCH_CHECK(dedge_sum.numel() == 1, "fastedge_cuda: dedge_sum must hold one value, got shape ",
              dedge_sum.sizes());
  const bool has_node = node_log_alpha.has_value();
  Tensor d_edge = at::empty({R, W}, edge_log_alpha.options());
  Tensor d_node = at::empty({has_node ? W : 0}, edge_log_alpha.options());
  const c10::cuda::CUDAGuard guard(edge_log_alpha.device());
  Tensor work = scratch(fe_sample_masks_backward_workspace(R, W, has_node), edge_log_alpha);
  check_launch(fe_sample_masks_backward(
                   edge_log_alpha.data_ptr<float>(),
                   has_node ? node_log_alpha->data_ptr<float>() : nullptr, philox_key(seed),
                   philox_offset(reader_offset), training, dm.data_ptr<float>(),
                   dedge_sum.data_ptr<float>(), d_edge.data_ptr<float>(),
                   has_node ? d_node.data_ptr<float>() : nullptr, ptr_or_null(work), R, W,
                   stream_of(edge_log_alpha)),
               "sample_masks_backward");
  return {d_edge, d_node};
}

}  // namespace

TORCH_LIBRARY(fastedge_cuda, m) {
  m.def("masked_sum_forward(Tensor x, Tensor m, Tensor? base, Tensor? base_index, "
        "Tensor(a!) out) -> ()");
  m.def("masked_sum_backward_stack(Tensor m, Tensor dout, Tensor(a!) dx) -> ()");
  m.def("masked_sum_backward_mask(Tensor x, Tensor dout) -> Tensor");
  m.def("hard_concrete_forward(Tensor log_alpha, Tensor? u, bool training) -> Tensor");
  m.def("hard_concrete_backward(Tensor log_alpha, Tensor? u, bool training, Tensor dz) -> Tensor");
  m.def("sample_masks(Tensor edge_log_alpha, Tensor? node_log_alpha, int seed, "
        "int reader_offset, bool training) -> (Tensor, Tensor)");
  m.def("sample_masks_backward(Tensor edge_log_alpha, Tensor? node_log_alpha, int seed, "
        "int reader_offset, bool training, Tensor dm, Tensor dedge_sum) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastedge_cuda, CUDA, m) {
  m.impl("masked_sum_forward", &masked_sum_forward);
  m.impl("masked_sum_backward_stack", &masked_sum_backward_stack);
  m.impl("masked_sum_backward_mask", &masked_sum_backward_mask);
  m.impl("hard_concrete_forward", &hard_concrete_forward);
  m.impl("hard_concrete_backward", &hard_concrete_backward);
  m.impl("sample_masks", &sample_masks);
  m.impl("sample_masks_backward", &sample_masks_backward);
}

// -- Python module ------------------------------------------------------------------
//
// An empty module whose import loads this library (and with it the operator
// registrations above). Its name is the extension's: `_cuda` when built by
// setup.py (fastedge._cuda), `fastedge_cuda_jit` when built just in time.

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _cuda
#endif
#define FE_STRINGIFY_(x) #x
#define FE_STRINGIFY(x) FE_STRINGIFY_(x)
#define FE_CONCAT_(a, b) a##b
#define FE_CONCAT(a, b) FE_CONCAT_(a, b)

PyMODINIT_FUNC FE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      FE_STRINGIFY(TORCH_EXTENSION_NAME),
      "fastedge's CUDA kernels; importing this module registers torch.ops.fastedge_cuda.*",
      -1,       // no per-module state
      nullptr,  // no methods
      nullptr,
      nullptr,
      nullptr,
      nullptr,
  };
  return PyModule_Create(&module);
}
