// CUDA entry points of gather_tokens / scatter_add_tokens (the kernels and their host side:
// gather_tokens_impl.h).

#include "gather_tokens.h"

#include <c10/cuda/CUDAGuard.h>

#include "cuda_rows.cuh"
#include "gather_tokens_impl.h"

namespace fastvl {

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_same_cuda_device("gather_tokens_cuda", x, "x", {{&index, "index"}});
  const c10::cuda::CUDAGuard guard(x.device());
  return gather_tokens_rows(x, index, CudaRowLauncher(x));
}

at::Tensor scatter_add_tokens_cuda(const at::Tensor& grad, const at::Tensor& index,
                                   int64_t num_tokens) {
  check_same_cuda_device("scatter_add_tokens_cuda", grad, "grad", {{&index, "index"}});
  const c10::cuda::CUDAGuard guard(grad.device());
  return scatter_add_tokens_rows(grad, index, num_tokens, CudaRowLauncher(grad));
}

}  // namespace fastvl
