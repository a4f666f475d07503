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
// zeros, then out[b, index[b, k], :] += grad[b, k, :] (duplicates accumulate; rows whose
// index is outside [0, num_tokens) are skipped). fp16/bf16 accumulate in fp32.
at::Tensor scatter_add_tokens_cuda(const at::Tensor& grad, const at::Tensor& index,
                                   int64_t num_tokens);

}  // namespace fastvl
