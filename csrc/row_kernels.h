// What fastvl's row kernels (gather_tokens, unshuffle_with_mask_token) share, written once for
// the GPU and for the host.
//
// A row kernel is a functor `body(const RowThread&)` run by every thread of a launch: a block
// of kBlockThreads threads is split into groups of `lanes` threads, each group takes one row
// at a time (rows visited with a grid-stride loop, so no grid-dimension limit applies) and
// its lanes walk the row's channel vectors. The host side of an op (allocation, checks,
// dtype dispatch, launch geometry) is a template over a launcher: csrc/*.cu launch the body
// as a CUDA kernel (`CudaRowLauncher`), and tests/csrc/emulated_row_kernels.cpp runs the very
// same body and host code on CPU tensors, one thread after another, which is how the kernels
// are tested on machines without a GPU. Bodies must therefore be race-free: no shared memory,
// no atomics, each output element written by one thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef __CUDACC__
#define FASTVL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTVL_HOST_DEVICE inline
#endif

// The emulator defines this to check that every vector access is aligned (a misaligned
// 16-byte load faults on the GPU but not on the host).
#ifndef FASTVL_CHECK_VECTOR_ALIGNMENT
#define FASTVL_CHECK_VECTOR_ALIGNMENT(pointer, bytes)
#endif

namespace fastvl {

constexpr int kBlockThreads = 256;
constexpr int kMinLanes = 32;    // a warp per row at least
constexpr int kBlocksPerSm = 8;  // 8 x 256 threads fill an SM on sm_80 / sm_90
constexpr int kVectorBytes = 16;

// Where one thread is in a row launch.
struct RowThread {
  int64_t first_row;  // the first row its group takes
  int64_t row_step;   // rows between its group's visits (groups in the grid)
  int64_t lane;       // its position in the group, 0 <= lane < lanes
  int64_t lanes;
};

// Launch geometry: `blocks` blocks of `lanes` x `rows_per_block` threads.
struct RowLaunch {
  int64_t blocks;
  int lanes;
  int rows_per_block;
};

// items_per_row: the vectors one row holds (its lanes' work); sm_count: the device's SMs.
inline RowLaunch make_row_launch(int64_t rows, int64_t items_per_row, int64_t sm_count) {
  int lanes = kMinLanes;
  while (lanes < kBlockThreads && lanes < items_per_row) {
    lanes *= 2;
  }
  const int rows_per_block = kBlockThreads / lanes;
  const int64_t blocks_needed = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t max_blocks = std::max<int64_t>(sm_count, 1) * kBlocksPerSm;
  return RowLaunch{std::max<int64_t>(1, std::min(blocks_needed, max_blocks)), lanes,
                   rows_per_block};
}

// VEC elements of T loaded or stored as one access (16 bytes for the vector paths).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
FASTVL_HOST_DEVICE Pack<T, VEC> load_pack(const T* pointer) {
  FASTVL_CHECK_VECTOR_ALIGNMENT(pointer, sizeof(Pack<T, VEC>));
  return *reinterpret_cast<const Pack<T, VEC>*>(pointer);
}

template <typename T, int VEC>
FASTVL_HOST_DEVICE void store_pack(T* pointer, const Pack<T, VEC>& pack) {
  FASTVL_CHECK_VECTOR_ALIGNMENT(pointer, sizeof(Pack<T, VEC>));
  *reinterpret_cast<Pack<T, VEC>*>(pointer) = pack;
}

// run(std::integral_constant<int, VEC>{}): VEC = kVec on the vector path, else 1.
template <int kVec, class Run>
void with_vector_width(bool vectors, Run&& run) {
  if (vectors) {
    run(std::integral_constant<int, kVec>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

// The number of elements per 16-byte vector of T.
template <typename T>
constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(sizeof(T));
}

// The first position in the ascending keys[0, count) whose key is >= value.
FASTVL_HOST_DEVICE int64_t lower_bound(const int64_t* keys, int64_t count, int64_t value) {
  int64_t low = 0;
  while (count > 0) {
    const int64_t half = count / 2;
    if (keys[low + half] < value) {
      low += half + 1;
      count -= half + 1;
    } else {
      count = half;
    }
  }
  return low;
}

// Reads element i of a small parameter tensor (mask token, position table) whose dtype is
// only known at run time: kernels template on the big tensor's dtype only.
enum class ParamDtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

FASTVL_HOST_DEVICE float load_param(const void* data, int64_t i, ParamDtype dtype) {
  switch (dtype) {
    case ParamDtype::kHalf:
      return static_cast<float>(static_cast<const c10::Half*>(data)[i]);
    case ParamDtype::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(data)[i]);
    default:
      return static_cast<const float*>(data)[i];
  }
}

// ---- host side -----------------------------------------------------------------------

inline bool is_aligned(const void* pointer, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % static_cast<uintptr_t>(bytes) == 0;
}

// A size-1 dimension never moves the pointer: its stride counts as 0, so that it cannot
// spoil an alignment test.
inline int64_t effective_stride(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

// Whether t's rows can be read as VEC-element vectors: the last dimension contiguous and of
// a multiple of VEC elements, the other strides multiples of VEC, the data aligned to a
// whole vector.
inline bool rows_are_vectors(const at::Tensor& t, int64_t vec) {
  const int64_t last = t.dim() - 1;
  if (t.size(last) % vec != 0 || (t.size(last) > 1 && t.stride(last) != 1)) {
    return false;
  }
  for (int64_t d = 0; d < last; ++d) {
    if (effective_stride(t, d) % vec != 0) {
      return false;
    }
  }
  return is_aligned(t.const_data_ptr(), vec * static_cast<int64_t>(t.element_size()));
}

}  // namespace fastvl
