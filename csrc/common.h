// Helpers shared by the native ops: argument checks and software prefetch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace adtuning {

// Request the cache line holding `p` ahead of use. Scattered accesses at a compressed
// index set defeat the hardware prefetcher; issuing them early lets many misses overlap
// instead of paying the full memory latency one after another.
inline void prefetch_read(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

inline void prefetch_write(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 1, 3);
#else
  (void)p;
#endif
}

// A 1-D, contiguous CPU tensor of `dtype` with `numel` entries.
inline void check_compact(const at::Tensor& t, const char* op, const char* name,
                          at::ScalarType dtype, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have ", numel, " entries, got ",
              t.numel());
}

// Flat indices: 1-D contiguous int32 or int64.
inline void check_indices(const at::Tensor& indices, const char* op) {
  TORCH_CHECK(indices.device().is_cpu(), op, ": indices must be a CPU tensor");
  TORCH_CHECK(indices.dim() == 1, op, ": indices must be 1-D, got ", indices.dim(), "-D");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
              ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.is_contiguous(), op, ": indices must be contiguous");
}

// True when `i` is a valid flat index into a tensor of `numel` entries (negative values
// wrap to huge unsigned ones, so one comparison covers both ends).
template <typename index_t>
inline bool in_range(index_t i, int64_t numel) {
  return static_cast<uint64_t>(static_cast<int64_t>(i)) < static_cast<uint64_t>(numel);
}

}  // namespace adtuning
