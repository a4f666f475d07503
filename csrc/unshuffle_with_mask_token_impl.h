// unshuffle_with_mask_token (MAE's decoder input) as row kernels (row_kernels.h) and their
// host side, templated over the launcher. Same contract as the Triton kernels
// (kernels/masking.py, layouts in fastvl/reference/masking.py):
//
// forward: out[b, n] = (n < P ? x[b, n] : r < K ? x[b, P + r] : mask_token) + pos[n], with
//   r = ids_restore[b, n - P], summed in float32 and rounded once into the promotion of the
//   input dtypes. One row group per output row; x and out rows move as 16-byte vectors when
//   the layouts allow, the mask token and positions (small, cached) are read by element in
//   their own dtype.
// backward: one row group per (batch chunk, position n) loops over its chunk's samples in
//   order: dx[b, source(b, n)] = grad[b, n] where n came from x (each dx row written once,
//   since ids_restore rows are permutations), and float32 partial sums per chunk of the
//   gradient rows that came from the mask token (dtoken_rows) and of all rows (dpos). The
//   caller sums the chunks' partials (and dtoken_rows over positions): fixed order, no
//   atomics. Chunks exist to give the GPU enough row groups when P + L is small (MAE's
//   decoder: 197 positions); the caller picks their number from the shapes.
#pragma once

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "row_kernels.h"

namespace fastvl {

// Where decoder row n of sample b comes from: row n of x for a prefix token, row
// P + ids_restore[b, n - P] of x for a visible patch, the mask token (-1) otherwise.
struct RestoreMap {
  const int64_t* ids_restore;
  int64_t i_sb, i_sl, num_prefix, num_visible;

  FASTVL_HOST_DEVICE int64_t x_row(int64_t b, int64_t n) const {
    if (n < num_prefix) {
      return n;
    }
    const int64_t restore = ids_restore[b * i_sb + (n - num_prefix) * i_sl];
    return restore >= 0 && restore < num_visible ? num_prefix + restore : -1;
  }
};

// One row group per output row (b, n); x_sd == 1 when VEC > 1.
template <typename X, typename Out, int VEC>
struct UnshuffleRows {
  static constexpr int kVec = VEC;  // elements per access (1: the strided path)

  const X* x;
  RestoreMap restore;
  const void* mask_token;
  const void* pos;  // nullptr: no positions
  Out* out;
  ParamDtype token_dtype, pos_dtype;
  int64_t rows, num_rows, D;
  int64_t x_sb, x_sn, x_sd, t_sd, p_sn, p_sd;

  FASTVL_HOST_DEVICE void operator()(const RowThread& t) const {
    const int64_t vectors = D / VEC;
    for (int64_t row = t.first_row; row < rows; row += t.row_step) {
      const int64_t b = row / num_rows;
      const int64_t n = row - b * num_rows;
      const int64_t source = restore.x_row(b, n);
      for (int64_t v = t.lane; v < vectors; v += t.lanes) {
        const int64_t c0 = v * VEC;
        float value[VEC];
        if (source >= 0) {
          const Pack<X, VEC> p = load_pack<X, VEC>(x + b * x_sb + source * x_sn + c0 * x_sd);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            value[i] = static_cast<float>(p.v[i]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            value[i] = load_param(mask_token, (c0 + i) * t_sd, token_dtype);
          }
        }
        if (pos != nullptr) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            value[i] += load_param(pos, n * p_sn + (c0 + i) * p_sd, pos_dtype);
          }
        }
        Pack<Out, VEC> result;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          result.v[i] = static_cast<Out>(value[i]);
        }
        store_pack<Out, VEC>(out + row * D + c0, result);
      }
    }
  }
};

// One row group per (batch chunk, position n); g_sd == 1 when VEC > 1.
template <typename G, int VEC>
struct UnshuffleBackwardRows {
  static constexpr int kVec = VEC;  // elements per access (1: the strided path)

  const G* grad;
  RestoreMap restore;
  G* dx;               // (B, P + K, D) contiguous
  float* dtoken_rows;  // (chunks * (P + L), D)
  float* dpos;         // (chunks * (P + L), D), or nullptr
  int64_t rows, batch, batch_per_chunk, num_rows, D;
  int64_t g_sb, g_sn, g_sd;

  FASTVL_HOST_DEVICE void operator()(const RowThread& t) const {
    const int64_t vectors = D / VEC;
    const int64_t num_x_rows = restore.num_prefix + restore.num_visible;
    for (int64_t row = t.first_row; row < rows; row += t.row_step) {
      const int64_t chunk = row / num_rows;
      const int64_t n = row - chunk * num_rows;
      const int64_t first = chunk * batch_per_chunk;
      const int64_t last = std::min(batch, first + batch_per_chunk);
      for (int64_t v = t.lane; v < vectors; v += t.lanes) {
        const int64_t c0 = v * VEC;
        float pos_sum[VEC];
        float token_sum[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          pos_sum[i] = 0.0f;
          token_sum[i] = 0.0f;
        }
#pragma unroll 2  // (deeper unrolling spills on sm_90 for float32 rows of 1-element vectors)
        for (int64_t b = first; b < last; ++b) {
          const Pack<G, VEC> g = load_pack<G, VEC>(grad + b * g_sb + n * g_sn + c0 * g_sd);
          const int64_t target = restore.x_row(b, n);
          if (target >= 0) {
            store_pack<G, VEC>(dx + (b * num_x_rows + target) * D + c0, g);
          }
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float value = static_cast<float>(g.v[i]);
            pos_sum[i] += value;
            token_sum[i] += target >= 0 ? 0.0f : value;
          }
        }
        Pack<float, VEC> token_pack;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          token_pack.v[i] = token_sum[i];
        }
        store_pack<float, VEC>(dtoken_rows + row * D + c0, token_pack);
        if (dpos != nullptr) {
          Pack<float, VEC> pos_pack;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            pos_pack.v[i] = pos_sum[i];
          }
          store_pack<float, VEC>(dpos + row * D + c0, pos_pack);
        }
      }
    }
  }
};

inline bool to_param_dtype(at::ScalarType t, ParamDtype* out) {
  switch (t) {
    case at::kHalf:
      *out = ParamDtype::kHalf;
      return true;
    case at::kBFloat16:
      *out = ParamDtype::kBFloat16;
      return true;
    case at::kFloat:
      *out = ParamDtype::kFloat;
      return true;
    default:
      return false;
  }
}

inline ParamDtype checked_param_dtype(const char* op, const at::Tensor& t, const char* name) {
  ParamDtype dtype;
  TORCH_CHECK(to_param_dtype(t.scalar_type(), &dtype), op, ": ", name,
              " must be float16, bfloat16 or float32, got ", t.scalar_type());
  return dtype;
}

// Calls f(X{}) with X the C++ type of a float16 / bfloat16 / float32 tensor.
template <class F>
void dispatch_kernel_float(const char* op, const at::Tensor& t, const char* name, F&& f) {
  switch (checked_param_dtype(op, t, name)) {
    case ParamDtype::kHalf:
      f(c10::Half{});
      break;
    case ParamDtype::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      f(float{});
  }
}

// x (B, P + K, D), ids_restore (B, L) int64, mask_token (D,), pos (P + L, D) or none
// -> (B, P + L, D) contiguous in the promotion of the three dtypes.
template <class Launcher>
at::Tensor unshuffle_with_mask_token_rows(const at::Tensor& x, const at::Tensor& ids_restore,
                                          const at::Tensor& mask_token,
                                          const std::optional<at::Tensor>& pos_embed,
                                          int64_t num_prefix, const Launcher& launch) {
  constexpr const char* op = "unshuffle_with_mask_token";
  TORCH_CHECK(x.dim() == 3, op, ": x must be 3-D (B, P + K, D), got shape ", x.sizes());
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.size(0) == x.size(0) &&
                  ids_restore.scalar_type() == at::kLong,
              op, ": ids_restore must be int64 (B, L) with B = ", x.size(0), ", got ",
              ids_restore.scalar_type(), " ", ids_restore.sizes());
  const int64_t B = x.size(0), D = x.size(2), L = ids_restore.size(1);
  TORCH_CHECK(num_prefix >= 0 && num_prefix <= x.size(1), op,
              ": num_prefix_tokens must lie in [0, ", x.size(1), "], got ", num_prefix);
  const int64_t num_visible = x.size(1) - num_prefix;
  TORCH_CHECK(num_visible <= L, op, ": x holds ", num_visible, " patch tokens, more than L = ", L);
  TORCH_CHECK(mask_token.dim() == 1 && mask_token.size(0) == D, op,
              ": mask_token must be (D,) with D = ", D, ", got ", mask_token.sizes());
  const int64_t num_rows = num_prefix + L;
  const ParamDtype token_dtype = checked_param_dtype(op, mask_token, "mask_token");
  at::ScalarType out_dtype = c10::promoteTypes(x.scalar_type(), mask_token.scalar_type());
  ParamDtype pos_dtype = ParamDtype::kFloat;
  const void* pos = nullptr;
  int64_t p_sn = 0, p_sd = 0;
  if (pos_embed.has_value()) {
    const at::Tensor& p = *pos_embed;
    TORCH_CHECK(p.dim() == 2 && p.size(0) == num_rows && p.size(1) == D, op,
                ": pos_embed must be (P + L, D) = (", num_rows, ", ", D, "), got ", p.sizes());
    pos_dtype = checked_param_dtype(op, p, "pos_embed");
    out_dtype = c10::promoteTypes(out_dtype, p.scalar_type());
    pos = p.const_data_ptr();
    p_sn = p.stride(0);
    p_sd = p.stride(1);
  }
  at::Tensor out = at::empty({B, num_rows, D}, x.options().dtype(out_dtype));
  if (out.numel() == 0) {
    return out;
  }
  const RestoreMap restore{ids_restore.const_data_ptr<int64_t>(), ids_restore.stride(0),
                           ids_restore.stride(1), num_prefix, num_visible};
  dispatch_kernel_float(op, x, "x", [&](auto x_value) {
    using X = decltype(x_value);
    auto run = [&](auto out_value, auto vec_constant) {
      using Out = decltype(out_value);
      constexpr int VEC = decltype(vec_constant)::value;
      const UnshuffleRows<X, Out, VEC> body{
          x.const_data_ptr<X>(), restore, mask_token.const_data_ptr(), pos,
          out.mutable_data_ptr<Out>(), token_dtype, pos_dtype, B * num_rows, num_rows, D,
          effective_stride(x, 0), effective_stride(x, 1), VEC > 1 ? 1 : x.stride(2),
          mask_token.stride(0), p_sn, p_sd};
      launch(make_row_launch(B * num_rows, D / VEC, launch.sm_count()), body);
    };
    constexpr int kVec = vector_width<X>();
    const bool vectors = rows_are_vectors(x, kVec) && rows_are_vectors(out, kVec);
    if (out_dtype == x.scalar_type()) {
      with_vector_width<kVec>(vectors, [&](auto vec) { run(X{}, vec); });
    } else {
      TORCH_CHECK(out_dtype == at::kFloat, op, ": unexpected output dtype ", out_dtype);
      with_vector_width<kVec>(vectors, [&](auto vec) { run(float{}, vec); });
    }
  });
  return out;
}

// grad (B, P + L, D), ids_restore (B, L) -> (dx (B, P + num_visible, D) in grad's dtype,
// dtoken_rows (chunks * (P + L), D) float32, dpos (chunks * (P + L), D) float32 or (0,)).
template <class Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> unshuffle_with_mask_token_backward_rows(
    const at::Tensor& grad, const at::Tensor& ids_restore, int64_t num_prefix,
    int64_t num_visible, bool compute_dpos, int64_t batch_chunks, const Launcher& launch) {
  constexpr const char* op = "unshuffle_with_mask_token_backward";
  TORCH_CHECK(grad.dim() == 3, op, ": grad must be 3-D (B, P + L, D), got shape ", grad.sizes());
  const int64_t B = grad.size(0), num_rows = grad.size(1), D = grad.size(2);
  TORCH_CHECK(ids_restore.dim() == 2 && ids_restore.size(0) == B &&
                  ids_restore.scalar_type() == at::kLong,
              op, ": ids_restore must be int64 (B, L) with B = ", B, ", got ",
              ids_restore.scalar_type(), " ", ids_restore.sizes());
  const int64_t L = ids_restore.size(1);
  TORCH_CHECK(num_prefix >= 0 && num_prefix + L == num_rows, op, ": grad has ", num_rows,
              " rows, expected num_prefix_tokens + L = ", num_prefix, " + ", L);
  TORCH_CHECK(num_visible >= 0 && num_visible <= L, op, ": num_visible must lie in [0, ", L,
              "], got ", num_visible);
  TORCH_CHECK(batch_chunks >= 1 && batch_chunks <= std::max<int64_t>(B, 1), op,
              ": batch_chunks must lie in [1, max(B, 1)] = [1, ", std::max<int64_t>(B, 1),
              "], got ", batch_chunks);
  const at::TensorOptions floats = grad.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({B, num_prefix + num_visible, D}, grad.options());
  at::Tensor dtoken_rows = at::empty({batch_chunks * num_rows, D}, floats);
  at::Tensor dpos = compute_dpos ? at::empty({batch_chunks * num_rows, D}, floats)
                                 : at::empty({0}, floats);
  if (dtoken_rows.numel() == 0) {
    return {dx, dtoken_rows, dpos};
  }
  const int64_t batch_per_chunk = (B + batch_chunks - 1) / batch_chunks;
  const RestoreMap restore{ids_restore.const_data_ptr<int64_t>(), ids_restore.stride(0),
                           ids_restore.stride(1), num_prefix, num_visible};
  dispatch_kernel_float(op, grad, "grad", [&](auto grad_value) {
    using G = decltype(grad_value);
    auto run = [&](auto vec_constant) {
      constexpr int VEC = decltype(vec_constant)::value;
      const UnshuffleBackwardRows<G, VEC> body{
          grad.const_data_ptr<G>(), restore, dx.mutable_data_ptr<G>(),
          dtoken_rows.mutable_data_ptr<float>(),
          compute_dpos ? dpos.mutable_data_ptr<float>() : nullptr, batch_chunks * num_rows, B,
          batch_per_chunk, num_rows, D, effective_stride(grad, 0), effective_stride(grad, 1),
          VEC > 1 ? 1 : grad.stride(2)};
      launch(make_row_launch(batch_chunks * num_rows, D / VEC, launch.sm_count()), body);
    };
    constexpr int kVec = vector_width<G>();
    with_vector_width<kVec>(rows_are_vectors(grad, kVec) && rows_are_vectors(dx, kVec) &&
                                rows_are_vectors(dtoken_rows, kVec) &&
                                (!compute_dpos || rows_are_vectors(dpos, kVec)),
                            run);
  });
  return {dx, dtoken_rows, dpos};
}

}  // namespace fastvl
