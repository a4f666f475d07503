// gather_tokens (out[b, k, :] = x[b, index[b, k], :]) and its adjoint scatter_add_tokens
// (out[b, n, :] = sum of grad[b, k, :] over the k with index[b, k] == n), as row kernels
// (row_kernels.h) and their host side, templated over the launcher.
//
// The scatter-add is deterministic and has no atomics: the index is sorted per sample
// (stable, so equal tokens keep ascending k), and one row group per output row (b, n) finds
// its segment by binary search and sums it in that order in float32 (float64 for float64),
// rounding once into the output. Output rows no index points at get zeros from the same
// pass: no zero-fill or cast launch, and rows are read and written as 16-byte vectors
// whenever the layouts allow.
//
// Index values outside [0, N) are never dereferenced: gather writes a zero row, the
// scatter-add skips them (the Python layer validates ranges; this keeps the kernels
// memory-safe).
#pragma once

#include <tuple>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/util/Exception.h>

#include "row_kernels.h"

namespace fastvl {

constexpr int kGatherUnroll = 4;  // independent vector loads in flight per thread

// One row group per gathered row (b, k); x_sc == 1 when VEC > 1.
template <typename T, int VEC>
struct GatherRows {
  static constexpr int kVec = VEC;  // elements per access (1: the strided path)

  const T* x;
  const int64_t* index;
  T* out;
  int64_t rows, K, N, C;
  int64_t x_sb, x_sn, x_sc, i_sb, i_sk;

  FASTVL_HOST_DEVICE void operator()(const RowThread& t) const {
    const int64_t vectors = C / VEC;
    for (int64_t row = t.first_row; row < rows; row += t.row_step) {
      const int64_t b = row / K;
      const int64_t token = index[b * i_sb + (row - b * K) * i_sk];
      T* dst = out + row * C;
      int64_t v = t.lane;
      if (token < 0 || token >= N) {
        Pack<T, VEC> zeros;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          zeros.v[i] = static_cast<T>(0.0f);
        }
        for (; v < vectors; v += t.lanes) {
          store_pack<T, VEC>(dst + v * VEC, zeros);
        }
        continue;
      }
      const T* src = x + b * x_sb + token * x_sn;
      for (; v + (kGatherUnroll - 1) * t.lanes < vectors; v += kGatherUnroll * t.lanes) {
        Pack<T, VEC> packs[kGatherUnroll];
#pragma unroll
        for (int u = 0; u < kGatherUnroll; ++u) {
          packs[u] = load_pack<T, VEC>(src + (v + u * t.lanes) * VEC * x_sc);
        }
#pragma unroll
        for (int u = 0; u < kGatherUnroll; ++u) {
          store_pack<T, VEC>(dst + (v + u * t.lanes) * VEC, packs[u]);
        }
      }
      for (; v < vectors; v += t.lanes) {
        store_pack<T, VEC>(dst + v * VEC, load_pack<T, VEC>(src + v * VEC * x_sc));
      }
    }
  }
};

// One row group per output row (b, n): the sum of grad[b, k] over its segment of the sorted
// index (keys, with the k of each entry in order). g_sc == 1 when VEC > 1.
template <typename T, typename Acc, int VEC>
struct SegmentSumRows {
  static constexpr int kVec = VEC;  // elements per access (1: the strided path)

  const T* grad;
  const int64_t* keys;
  const int64_t* order;
  T* out;
  int64_t rows, N, K, C;
  int64_t g_sb, g_sk, g_sc;

  FASTVL_HOST_DEVICE void operator()(const RowThread& t) const {
    const int64_t vectors = C / VEC;
    for (int64_t row = t.first_row; row < rows; row += t.row_step) {
      const int64_t b = row / N;
      const int64_t n = row - b * N;
      const int64_t* sample_keys = keys + b * K;
      const int64_t begin = lower_bound(sample_keys, K, n);
      const int64_t end = begin + lower_bound(sample_keys + begin, K - begin, n + 1);
      const int64_t* sample_order = order + b * K;
      const T* sample_grad = grad + b * g_sb;
      for (int64_t v = t.lane; v < vectors; v += t.lanes) {
        Acc acc[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          acc[i] = Acc(0);
        }
        for (int64_t j = begin; j < end; ++j) {
          const Pack<T, VEC> g =
              load_pack<T, VEC>(sample_grad + sample_order[j] * g_sk + v * VEC * g_sc);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            acc[i] += static_cast<Acc>(g.v[i]);
          }
        }
        Pack<T, VEC> result;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          result.v[i] = static_cast<T>(acc[i]);
        }
        store_pack<T, VEC>(out + row * C + v * VEC, result);
      }
    }
  }
};

inline bool is_token_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Shapes and dtypes (devices are the caller's): data (B, *, C) floating, index (B, K) int64.
inline void check_token_rows(const char* op, const at::Tensor& data, const char* data_name,
                             const at::Tensor& index) {
  TORCH_CHECK(data.dim() == 3, op, ": ", data_name, " must be 3-D (B, *, C), got ", data.dim(),
              "-D with shape ", data.sizes());
  TORCH_CHECK(index.dim() == 2, op, ": index must be 2-D (B, K), got ", index.dim(),
              "-D with shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(is_token_float(data.scalar_type()), op, ": ", data_name,
              " must be float16, bfloat16, float32 or float64, got ", data.scalar_type());
  TORCH_CHECK(data.size(0) == index.size(0), op, ": batch sizes differ: ", data_name, " has ",
              data.size(0), ", index has ", index.size(0));
}

// x (B, N, C), index (B, K) -> (B, K, C) contiguous.
template <class Launcher>
at::Tensor gather_tokens_rows(const at::Tensor& x, const at::Tensor& index,
                              const Launcher& launch) {
  check_token_rows("gather_tokens", x, "x", index);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_tokens", [&] {
    auto run = [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      const GatherRows<scalar_t, VEC> body{
          x.const_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(),
          out.mutable_data_ptr<scalar_t>(), B * K, K, N, C,
          effective_stride(x, 0), effective_stride(x, 1), VEC > 1 ? 1 : x.stride(2),
          index.stride(0), index.stride(1)};
      launch(make_row_launch(B * K, C / VEC, launch.sm_count()), body);
    };
    constexpr int kVec = vector_width<scalar_t>();
    with_vector_width<kVec>(rows_are_vectors(x, kVec) && rows_are_vectors(out, kVec), run);
  });
  return out;
}

// grad (B, K, C), index (B, K) -> (B, num_tokens, C) in grad's dtype, contiguous.
template <class Launcher>
at::Tensor scatter_add_tokens_rows(const at::Tensor& grad, const at::Tensor& index,
                                   int64_t num_tokens, const Launcher& launch) {
  check_token_rows("scatter_add_tokens", grad, "grad", index);
  TORCH_CHECK(grad.size(1) == index.size(1), "scatter_add_tokens: grad has ", grad.size(1),
              " rows per sample but index has ", index.size(1));
  TORCH_CHECK(num_tokens >= 0, "scatter_add_tokens: num_tokens must be >= 0, got ",
              num_tokens);
  const int64_t B = grad.size(0), K = grad.size(1), C = grad.size(2), N = num_tokens;
  at::Tensor out = at::empty({B, N, C}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  at::Tensor keys, order;
  std::tie(keys, order) = at::sort(index, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  keys = keys.contiguous();
  order = order.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "scatter_add_tokens", [&] {
        using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        auto run = [&](auto vec_constant) {
          constexpr int VEC = decltype(vec_constant)::value;
          const SegmentSumRows<scalar_t, Acc, VEC> body{
              grad.const_data_ptr<scalar_t>(), keys.const_data_ptr<int64_t>(),
              order.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), B * N, N, K, C,
              effective_stride(grad, 0), effective_stride(grad, 1),
              VEC > 1 ? 1 : grad.stride(2)};
          launch(make_row_launch(B * N, C / VEC, launch.sm_count()), body);
        };
        constexpr int kVec = vector_width<scalar_t>();
        with_vector_width<kVec>(rows_are_vectors(grad, kVec) && rows_are_vectors(out, kVec),
                                run);
      });
  return out;
}

}  // namespace fastvl
