// CUDA kernels for gather_tokens (out[b, k, :] = x[b, index[b, k], :]) and its adjoint
// scatter_add_tokens (out[b, index[b, k], :] += grad[b, k, :]).
//
// Launch layout (both ops): a block of kBlockThreads threads is split into rows_per_block
// groups of threads_per_row threads (threadIdx.x = lane within the row, threadIdx.y = row
// slot). Each group handles one (b, k) row at a time and walks the channel axis with a
// stride of threads_per_row, so consecutive lanes touch consecutive addresses. Rows are
// visited with a grid-stride loop over B * K on a 1-D grid, so no grid-dimension limit
// applies. All offsets are int64.
//
// Index values outside [0, N) are never dereferenced: gather writes a zero row, the
// scatter-add skips the row. (The Python layer validates ranges; this only keeps the
// kernels memory-safe.)

#include "gather_tokens.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace fastvl {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kMinThreadsPerRow = 32;
constexpr int kUnroll = 4;        // independent loads in flight per thread
constexpr int kBlocksPerSm = 8;   // 8 x 256 threads = a full SM on sm_80 / sm_90
constexpr int kVecBytes = 16;     // uint4

struct LaunchConfig {
  dim3 grid;
  dim3 block;
};

int multiprocessor_count(int device) {
  constexpr int kMaxCachedDevices = 64;
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  if (device >= 0 && device < kMaxCachedDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      return cached;
    }
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  count = std::max(count, 1);
  if (device >= 0 && device < kMaxCachedDevices) {
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// items_per_row: how many elements (or 16-byte vectors) one row holds.
LaunchConfig make_launch_config(int64_t rows, int64_t items_per_row, int device) {
  int threads_per_row = kMinThreadsPerRow;
  while (threads_per_row < kBlockThreads && threads_per_row < items_per_row) {
    threads_per_row *= 2;
  }
  const int rows_per_block = kBlockThreads / threads_per_row;
  const int64_t blocks_needed = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count(device)) * kBlocksPerSm;
  const int64_t blocks = std::max<int64_t>(1, std::min(blocks_needed, max_blocks));
  LaunchConfig cfg;
  cfg.grid = dim3(static_cast<unsigned int>(blocks));
  cfg.block = dim3(static_cast<unsigned int>(threads_per_row),
                   static_cast<unsigned int>(rows_per_block));
  return cfg;
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  return static_cast<T>(0.0f);
}

template <>
__device__ __forceinline__ uint4 zero_value<uint4>() {
  return make_uint4(0u, 0u, 0u, 0u);
}

// Copies rows of T elements. T is the tensor's scalar type (scalar path, any strides) or
// uint4 (vector path: last dim contiguous, rows 16-byte aligned; all strides and the
// row width are then in units of 16-byte vectors and x_sc == 1).
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ index,
                                   T* __restrict__ out, int64_t rows, int64_t K, int64_t N,
                                   int64_t width, int64_t x_sb, int64_t x_sn, int64_t x_sc,
                                   int64_t i_sb, int64_t i_sk) {
  const int64_t lanes = blockDim.x;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += row_step) {
    const int64_t b = row / K;
    const int64_t k = row - b * K;
    const int64_t token = index[b * i_sb + k * i_sk];
    T* dst = out + row * width;
    int64_t c = threadIdx.x;
    if (token < 0 || token >= N) {
      for (; c < width; c += lanes) {
        dst[c] = zero_value<T>();
      }
      continue;
    }
    const T* src = x + b * x_sb + token * x_sn;
    for (; c + (kUnroll - 1) * lanes < width; c += kUnroll * lanes) {
      T v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        v[u] = src[(c + u * lanes) * x_sc];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        dst[c + u * lanes] = v[u];
      }
    }
    for (; c < width; c += lanes) {
      dst[c] = src[c * x_sc];
    }
  }
}

// acc (B, N, C) contiguous of acc_t; acc[b, index[b, k], :] += grad[b, k, :].
template <typename scalar_t, typename acc_t>
__global__ void scatter_add_rows_kernel(const scalar_t* __restrict__ grad,
                                        const int64_t* __restrict__ index, acc_t* acc,
                                        int64_t rows, int64_t K, int64_t N, int64_t C,
                                        int64_t g_sb, int64_t g_sk, int64_t g_sc, int64_t i_sb,
                                        int64_t i_sk) {
  const int64_t lanes = blockDim.x;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows;
       row += row_step) {
    const int64_t b = row / K;
    const int64_t k = row - b * K;
    const int64_t token = index[b * i_sb + k * i_sk];
    if (token < 0 || token >= N) {
      continue;
    }
    const scalar_t* src = grad + b * g_sb + k * g_sk;
    acc_t* dst = acc + (b * N + token) * C;
    int64_t c = threadIdx.x;
    for (; c + (kUnroll - 1) * lanes < C; c += kUnroll * lanes) {
      acc_t v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        v[u] = static_cast<acc_t>(src[(c + u * lanes) * g_sc]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        atomicAdd(dst + c + u * lanes, v[u]);
      }
    }
    for (; c < C; c += lanes) {
      atomicAdd(dst + c, static_cast<acc_t>(src[c * g_sc]));
    }
  }
}

// out[i] = (scalar_t) acc[i], both contiguous.
template <typename scalar_t>
__global__ void cast_from_float_kernel(const float* __restrict__ acc, scalar_t* __restrict__ out,
                                       int64_t numel) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += step) {
    out[i] = static_cast<scalar_t>(acc[i]);
  }
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// The stride of a size-1 dimension never moves the pointer; treat it as 0 so that it does
// not spoil the alignment test.
int64_t effective_stride(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

void check_common(const char* op, const at::Tensor& data, const char* data_name,
                  const at::Tensor& index) {
  TORCH_CHECK(data.is_cuda(), op, ": ", data_name, " must be a CUDA tensor, got device ",
              data.device());
  TORCH_CHECK(index.is_cuda(), op, ": index must be a CUDA tensor, got device ", index.device());
  TORCH_CHECK(data.device() == index.device(), op, ": ", data_name, " is on ", data.device(),
              " but index is on ", index.device());
  TORCH_CHECK(data.dim() == 3, op, ": ", data_name, " must be 3-D (B, *, C), got ", data.dim(),
              "-D with shape ", data.sizes());
  TORCH_CHECK(index.dim() == 2, op, ": index must be 2-D (B, K), got ", index.dim(),
              "-D with shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(is_supported_float(data.scalar_type()), op, ": ", data_name,
              " must be float16, bfloat16, float32 or float64, got ", data.scalar_type());
  TORCH_CHECK(data.size(0) == index.size(0), op, ": batch sizes differ: ", data_name, " has ",
              data.size(0), ", index has ", index.size(0));
}

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_common("gather_tokens_cuda", x, "x", index);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t B = x.size(0);
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  const int64_t K = index.size(1);
  at::Tensor out = at::empty({B, K, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }

  const int64_t rows = B * K;
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const int64_t* index_ptr = index.const_data_ptr<int64_t>();
  const int64_t i_sb = index.stride(0);
  const int64_t i_sk = index.stride(1);

  const int64_t es = static_cast<int64_t>(x.element_size());
  const int64_t x_sb = effective_stride(x, 0);
  const int64_t x_sn = effective_stride(x, 1);
  const bool vectorizable = (C * es) % kVecBytes == 0 && effective_stride(x, 2) == 1 &&
                            (x_sb * es) % kVecBytes == 0 && (x_sn * es) % kVecBytes == 0 &&
                            is_aligned(x.const_data_ptr(), kVecBytes) &&
                            is_aligned(out.const_data_ptr(), kVecBytes);

  if (vectorizable) {
    const int64_t per_vec = kVecBytes / es;
    const int64_t width = C / per_vec;
    const LaunchConfig cfg = make_launch_config(rows, width, device);
    gather_rows_kernel<uint4><<<cfg.grid, cfg.block, 0, stream>>>(
        static_cast<const uint4*>(x.const_data_ptr()), index_ptr,
        static_cast<uint4*>(out.mutable_data_ptr()), rows, K, N, width, x_sb / per_vec,
        x_sn / per_vec, 1, i_sb, i_sk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }

  const LaunchConfig cfg = make_launch_config(rows, C, device);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens_cuda", [&] {
        gather_rows_kernel<scalar_t><<<cfg.grid, cfg.block, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), index_ptr, out.mutable_data_ptr<scalar_t>(), rows,
            K, N, C, x_sb, x_sn, x.stride(2), i_sb, i_sk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

at::Tensor scatter_add_tokens_cuda(const at::Tensor& grad, const at::Tensor& index,
                                   int64_t num_tokens) {
  check_common("scatter_add_tokens_cuda", grad, "grad", index);
  TORCH_CHECK(grad.size(1) == index.size(1), "scatter_add_tokens_cuda: grad has ", grad.size(1),
              " rows per sample but index has ", index.size(1));
  TORCH_CHECK(num_tokens >= 0, "scatter_add_tokens_cuda: num_tokens must be >= 0, got ",
              num_tokens);
  const c10::cuda::CUDAGuard guard(grad.device());

  const int64_t B = grad.size(0);
  const int64_t K = grad.size(1);
  const int64_t C = grad.size(2);
  const int64_t N = num_tokens;
  const at::ScalarType dtype = grad.scalar_type();
  const bool accumulate_in_output = dtype == at::kFloat || dtype == at::kDouble;

  const int64_t rows = B * K;
  if (rows == 0 || B * N * C == 0) {
    return at::zeros({B, N, C}, grad.options());
  }
  // Atomic accumulation makes the summation order of duplicate indices run-dependent.
  at::globalContext().alertNotDeterministic("scatter_add_tokens_cuda");

  // fp32 / fp64 accumulate straight into the zeroed output; fp16 / bf16 into a zeroed fp32
  // buffer that is rounded once into the output at the end.
  at::Tensor out;
  at::Tensor acc;
  if (accumulate_in_output) {
    out = at::zeros({B, N, C}, grad.options());
    acc = out;
  } else {
    acc = at::zeros({B, N, C}, grad.options().dtype(at::kFloat));
    out = at::empty({B, N, C}, grad.options());
  }

  const int device = grad.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const LaunchConfig cfg = make_launch_config(rows, C, device);
  const int64_t* index_ptr = index.const_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "scatter_add_tokens_cuda", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        scatter_add_rows_kernel<scalar_t, acc_t><<<cfg.grid, cfg.block, 0, stream>>>(
            grad.const_data_ptr<scalar_t>(), index_ptr, acc.mutable_data_ptr<acc_t>(), rows, K,
            N, C, grad.stride(0), grad.stride(1), grad.stride(2), index.stride(0),
            index.stride(1));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });

  if (!accumulate_in_output) {
    const int64_t numel = out.numel();
    const int64_t blocks_needed = (numel + kBlockThreads - 1) / kBlockThreads;
    const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count(device)) * kBlocksPerSm;
    const unsigned int blocks =
        static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks_needed, max_blocks)));
    AT_DISPATCH_REDUCED_FLOATING_TYPES(dtype, "scatter_add_tokens_cuda_cast", [&] {
      cast_from_float_kernel<scalar_t><<<blocks, kBlockThreads, 0, stream>>>(
          acc.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), numel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

}  // namespace fastvl
