// CUDA entry points of unshuffle_with_mask_token (the kernels and their host side:
// unshuffle_with_mask_token_impl.h).

#include "unshuffle_with_mask_token.h"

#include <c10/cuda/CUDAGuard.h>

#include "cuda_rows.cuh"
#include "unshuffle_with_mask_token_impl.h"

namespace fastvl {

at::Tensor unshuffle_with_mask_token_fwd_cuda(const at::Tensor& x, const at::Tensor& ids_restore,
                                              const at::Tensor& mask_token,
                                              const std::optional<at::Tensor>& pos_embed,
                                              int64_t num_prefix_tokens) {
  const char* op = "unshuffle_with_mask_token_fwd_cuda";
  if (pos_embed.has_value()) {
    check_same_cuda_device(op, x, "x", {{&ids_restore, "ids_restore"},
                                        {&mask_token, "mask_token"},
                                        {&*pos_embed, "pos_embed"}});
  } else {
    check_same_cuda_device(op, x, "x", {{&ids_restore, "ids_restore"},
                                        {&mask_token, "mask_token"}});
  }
  const c10::cuda::CUDAGuard guard(x.device());
  return unshuffle_with_mask_token_rows(x, ids_restore, mask_token, pos_embed,
                                        num_prefix_tokens, CudaRowLauncher(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_with_mask_token_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& ids_restore, int64_t num_prefix_tokens,
    int64_t num_visible, bool compute_dpos, int64_t batch_chunks) {
  check_same_cuda_device("unshuffle_with_mask_token_bwd_cuda", grad_out, "grad_out",
                         {{&ids_restore, "ids_restore"}});
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return unshuffle_with_mask_token_backward_rows(grad_out, ids_restore, num_prefix_tokens,
                                                 num_visible, compute_dpos, batch_chunks,
                                                 CudaRowLauncher(grad_out));
}

}  // namespace fastvl
