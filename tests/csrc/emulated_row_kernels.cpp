// The CUDA row kernels of csrc/ (gather_tokens, scatter_add_tokens, unshuffle_with_mask_token)
// run on the host, for tests on machines without a GPU: the same kernel bodies and the same
// host code (allocation, checks, dtype dispatch, vector-path choice, launch geometry) as
// fastvl._C, with a launcher that runs every thread of the launch one after another, in
// launch order or reversed. Only the CUDA launch itself and the device compiler are not
// exercised here. Every vector access is checked for alignment (on the GPU a misaligned
// 16-byte access faults); each launch's geometry and vector width is logged for the tests.
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace fastvl_emulation {
inline void check_alignment(const void* pointer, std::size_t bytes) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % bytes != 0) {
    throw std::runtime_error("misaligned " + std::to_string(bytes) + "-byte vector access");
  }
}
}  // namespace fastvl_emulation

#define FASTVL_CHECK_VECTOR_ALIGNMENT(pointer, bytes) \
  ::fastvl_emulation::check_alignment(pointer, bytes)

#include <torch/extension.h>

#include "gather_tokens_impl.h"
#include "unshuffle_with_mask_token_impl.h"

namespace {

// (blocks, lanes, rows_per_block, elements per vector access) of each launch.
std::vector<std::tuple<int64_t, int, int, int>> launch_log;

struct HostRowLauncher {
  int64_t sms;
  bool reverse;

  int64_t sm_count() const { return sms; }

  template <class Body>
  void operator()(const fastvl::RowLaunch& geometry, const Body& body) const {
    TORCH_CHECK(geometry.blocks >= 1 && geometry.blocks <= INT32_MAX, "grid of ",
                geometry.blocks, " blocks");
    TORCH_CHECK(geometry.lanes >= 1 && geometry.rows_per_block >= 1 &&
                    geometry.lanes * geometry.rows_per_block == fastvl::kBlockThreads,
                "block of ", geometry.lanes, " x ", geometry.rows_per_block, " threads");
    launch_log.emplace_back(geometry.blocks, geometry.lanes, geometry.rows_per_block, Body::kVec);
    const int64_t per_block = static_cast<int64_t>(geometry.lanes) * geometry.rows_per_block;
    const int64_t threads = geometry.blocks * per_block;
    for (int64_t i = 0; i < threads; ++i) {
      const int64_t id = reverse ? threads - 1 - i : i;
      const int64_t block = id / per_block;
      const int64_t slot = (id % per_block) / geometry.lanes;
      const int64_t lane = id % geometry.lanes;
      body(fastvl::RowThread{block * geometry.rows_per_block + slot,
                             geometry.blocks * geometry.rows_per_block, lane, geometry.lanes});
    }
  }
};

at::Tensor gather_tokens(const at::Tensor& x, const at::Tensor& index, int64_t sms,
                         bool reverse) {
  return fastvl::gather_tokens_rows(x, index, HostRowLauncher{sms, reverse});
}

at::Tensor scatter_add_tokens(const at::Tensor& grad, const at::Tensor& index,
                              int64_t num_tokens, int64_t sms, bool reverse) {
  return fastvl::scatter_add_tokens_rows(grad, index, num_tokens, HostRowLauncher{sms, reverse});
}

at::Tensor unshuffle_with_mask_token(const at::Tensor& x, const at::Tensor& ids_restore,
                                     const at::Tensor& mask_token,
                                     const std::optional<at::Tensor>& pos_embed,
                                     int64_t num_prefix_tokens, int64_t sms, bool reverse) {
  return fastvl::unshuffle_with_mask_token_rows(x, ids_restore, mask_token, pos_embed,
                                                num_prefix_tokens, HostRowLauncher{sms, reverse});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_with_mask_token_backward(
    const at::Tensor& grad, const at::Tensor& ids_restore, int64_t num_prefix_tokens,
    int64_t num_visible, bool compute_dpos, int64_t batch_chunks, int64_t sms, bool reverse) {
  return fastvl::unshuffle_with_mask_token_backward_rows(grad, ids_restore, num_prefix_tokens,
                                                         num_visible, compute_dpos, batch_chunks,
                                                         HostRowLauncher{sms, reverse});
}

std::vector<std::tuple<int64_t, int, int, int>> take_launch_log() {
  std::vector<std::tuple<int64_t, int, int, int>> log;
  log.swap(launch_log);
  return log;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gather_tokens", &gather_tokens);
  m.def("scatter_add_tokens", &scatter_add_tokens);
  m.def("unshuffle_with_mask_token", &unshuffle_with_mask_token);
  m.def("unshuffle_with_mask_token_backward", &unshuffle_with_mask_token_backward);
  m.def("take_launch_log", &take_launch_log,
        "[(blocks, lanes, rows_per_block, elements per access)] of the launches since the "
        "last call");
}
