// Launching row kernels (row_kernels.h) on the current CUDA stream.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "row_kernels.h"

namespace fastvl {

template <class Body>
__global__ void __launch_bounds__(kBlockThreads) row_kernel(const Body body) {
  body(RowThread{static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y,
                 static_cast<int64_t>(gridDim.x) * blockDim.y, static_cast<int64_t>(threadIdx.x),
                 static_cast<int64_t>(blockDim.x)});
}

// The device's multiprocessor count, asked once per device.
inline int64_t cuda_sm_count(int device) {
  constexpr int kMaxCachedDevices = 64;
  static std::atomic<int> cache[kMaxCachedDevices] = {};
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      return cached;
    }
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  count = std::max(count, 1);
  if (cacheable) {
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Runs row kernels on the current stream of `like`'s device.
class CudaRowLauncher {
 public:
  explicit CudaRowLauncher(const at::Tensor& like)
      : device_(like.get_device()),
        stream_(c10::cuda::getCurrentCUDAStream(like.get_device()).stream()) {}

  int64_t sm_count() const { return cuda_sm_count(device_); }

  template <class Body>
  void operator()(const RowLaunch& geometry, const Body& body) const {
    row_kernel<Body><<<dim3(static_cast<unsigned int>(geometry.blocks)),
                       dim3(geometry.lanes, geometry.rows_per_block), 0, stream_>>>(body);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

 private:
  int device_;
  cudaStream_t stream_;
};

// Every tensor on x's CUDA device (names for the message).
inline void check_same_cuda_device(const char* op, const at::Tensor& x, const char* x_name,
                                   std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  TORCH_CHECK(x.is_cuda(), op, ": ", x_name, " must be a CUDA tensor, got device ", x.device());
  for (const auto& [tensor, name] : others) {
    TORCH_CHECK(tensor->device() == x.device(), op, ": ", x_name, " is on ", x.device(),
                " but ", name, " is on ", tensor->device());
  }
}

}  // namespace fastvl
