// Host entry points of the unshuffle_with_mask_token CUDA kernels (implemented in
// unshuffle_with_mask_token.cu, registered as fastvl::unshuffle_with_mask_token_fwd_cuda /
// fastvl::unshuffle_with_mask_token_bwd_cuda in registration.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastvl {

// x (B, P + K, D), ids_restore (B, L) int64, mask_token (D,), pos_embed (P + L, D) or none;
// float16 / bfloat16 / float32 each -> (B, P + L, D) contiguous in their promoted dtype.
at::Tensor unshuffle_with_mask_token_fwd_cuda(const at::Tensor& x, const at::Tensor& ids_restore,
                                              const at::Tensor& mask_token,
                                              const std::optional<at::Tensor>& pos_embed,
                                              int64_t num_prefix_tokens);

// grad_out (B, P + L, D) -> (dx (B, P + num_visible, D) in grad_out's dtype, float32 mask-token
// gradient rows (batch_chunks * (P + L), D), float32 position-gradient partials
// (batch_chunks * (P + L), D) or (0,)): sum both over their batch_chunks blocks of P + L rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_with_mask_token_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& ids_restore, int64_t num_prefix_tokens,
    int64_t num_visible, bool compute_dpos, int64_t batch_chunks);

}  // namespace fastvl
