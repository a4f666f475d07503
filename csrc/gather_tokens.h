// Host entry points of the gather_tokens CUDA kernels (implemented in gather_tokens.cu,
// registered as fastvl::gather_tokens_cuda / fastvl::scatter_add_tokens_cuda in
// registration.cpp).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace fastvl {

// x (B, N, C) floating, index (B, K) int64 -> out (B, K, C) contiguous, with
// out[b, k, :] = x[b, index[b, k], :]; rows whose index is outside [0, N) are zeros.
at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index);

// grad (B, K, C) floating, index (B, K) int64 -> out (B, num_tokens, C) of grad's dtype:
// out[b, n, :] = sum of grad[b, k, :] over the k with index[b, k] == n, in ascending k
// (deterministic, no atomics; fp16/bf16 sum in fp32 and round once; indices outside
// [0, num_tokens) are skipped).
at::Tensor scatter_add_tokens_cuda(const at::Tensor& grad, const at::Tensor& index,
                                   int64_t num_tokens);

}  // namespace fastvl
