// Child entries of a Linear weight gradient (SDDMM):
//   out[e] (+)= sum_n dy[n, i_e] * x[n, j_e],   i_e = indices[e] / in, j_e = indices[e] % in
// for dy [N, out] and x [N, in], without ever forming the dense dW = dy^T x.
//
// The frames are taken in chunks small enough that the chunk's transposed panels
// ((in + out) x chunk fp32) stay in L2. Per chunk, x and dy are transposed into
// frame-contiguous fp32 panels (rows zero-padded to a multiple of kLanes), then every entry is
// one dot product of a dy row and an x row. Indices are sorted, so consecutive entries share
// their dy row (it stays in L1) and the x rows they read are scattered only within the cached
// panel.
//
// Each entry is summed in a fixed order (lane l takes frames t = l mod kLanes in order, then
// a fixed reduction tree; chunks in order), whatever the thread count or the grouping of
// entries: results are deterministic.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace adtuning {
namespace {

// fp32 lanes per dot-product step: one AVX-512 register (two AVX2 ones).
constexpr int64_t kLanes = 16;
// Entries whose dot products run interleaved: independent FMA chains hide the FMA latency
// when the frame count is small (a 1 s utterance has ~50 frames: 4 steps of 16 lanes).
constexpr int64_t kGroup = 4;
// Bytes of the two transposed panels of one frame chunk: about a core's L2, so the x rows
// the scattered entries read stay cached; it also bounds the scratch memory for any layer
// (the dense dW this op replaces would be out x in floats).
constexpr int64_t kPanelBytes = int64_t{2} << 20;
// Entries per parallel task: a few microseconds of dot products at the smallest chunks.
constexpr int64_t kGrain = 256;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// dst[c * ld + t] = src[(t0 + t) * width + c] for t < frames, and 0 for frames <= t < ld:
// the columns of a frame-major [N, width] matrix as frame-contiguous rows.
template <typename src_t>
void transpose_panel(const src_t* src, int64_t width, int64_t t0, int64_t frames, int64_t ld,
                     float* dst) {
  constexpr int64_t kBlock = 16;  // columns per task: 16 contiguous reads per frame
  const int64_t blocks = (width + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * kBlock, c1 = std::min(width, c0 + kBlock);
      for (int64_t t = 0; t < frames; ++t) {
        const src_t* row = src + (t0 + t) * width;
        for (int64_t c = c0; c < c1; ++c) dst[c * ld + t] = static_cast<float>(row[c]);
      }
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(dst + c * ld + frames, dst + (c + 1) * ld, 0.0f);
      }
    }
  });
}

// kLanes fp32 lanes as one value: GCC/Clang vector extensions, so the dot products are SIMD
// whatever the compiler's auto-vectoriser decides (it leaves the FMA loops of a group scalar).
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat load_lanes(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

inline float reduce_lanes(vfloat acc) {
  float lanes[kLanes], s8[8], s4[4];
  std::memcpy(lanes, &acc, sizeof(lanes));
  for (int l = 0; l < 8; ++l) s8[l] = lanes[l] + lanes[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// sums[g] = dot(a[g], b[g]) over ld (a multiple of kLanes) frames, for kGroup entries at once.
// Lane l of an entry adds the products of frames t = l mod kLanes in order (multiply, then
// add: no contraction), the same order as dot_one: results do not depend on the grouping.
inline void dot_group(const float* const* a, const float* const* b, int64_t ld, float* sums) {
  vfloat acc[kGroup] = {};
  for (int64_t t = 0; t < ld; t += kLanes) {
    for (int64_t g = 0; g < kGroup; ++g) acc[g] += load_lanes(a[g] + t) * load_lanes(b[g] + t);
  }
  for (int64_t g = 0; g < kGroup; ++g) sums[g] = reduce_lanes(acc[g]);
}

inline float dot_one(const float* a, const float* b, int64_t ld) {
  vfloat acc = {};
  for (int64_t t = 0; t < ld; t += kLanes) acc += load_lanes(a + t) * load_lanes(b + t);
  return reduce_lanes(acc);
}

// Row of a flat index without a division per entry: indices are sorted, so a task walks the
// rows forward from the row of its first entry (a 64-bit division costs tens of cycles, as
// much as the dot product of a short utterance). Unsorted input still gets right answers.
struct RowCursor {
  int64_t in, row = 0, start = 0;
  void seek(int64_t flat) {
    if (flat < start || flat - start >= 2 * in) {
      row = flat / in;
      start = row * in;
    } else if (flat - start >= in) {
      ++row;
      start += in;
    }
  }
};

template <typename index_t>
void entries_kernel(const float* dy_t, const float* x_t, int64_t ld, const index_t* idx,
                    int64_t k, int64_t in, float* out, bool add, std::atomic<bool>& bad_index,
                    int64_t numel) {
  at::parallel_for(0, k, kGrain, [&](int64_t begin, int64_t end) {
    RowCursor cursor{in};
    cursor.seek(in_range(idx[begin], numel) ? static_cast<int64_t>(idx[begin]) : 0);
    const float* a[kGroup];
    const float* b[kGroup];
    float sums[kGroup];
    int64_t e = begin;
    for (; e + kGroup <= end; e += kGroup) {
      bool ok = true;
      for (int64_t g = 0; g < kGroup; ++g) {
        const index_t flat = idx[e + g];
        if (!in_range(flat, numel)) {
          ok = false;
          break;
        }
        cursor.seek(static_cast<int64_t>(flat));
        a[g] = dy_t + cursor.row * ld;
        b[g] = x_t + (static_cast<int64_t>(flat) - cursor.start) * ld;
      }
      if (!ok) break;  // the scalar loop below handles (and reports) the bad index
      dot_group(a, b, ld, sums);
      for (int64_t g = 0; g < kGroup; ++g) out[e + g] = add ? out[e + g] + sums[g] : sums[g];
    }
    for (; e < end; ++e) {
      const index_t flat = idx[e];
      if (!in_range(flat, numel)) {
        bad_index.store(true, std::memory_order_relaxed);
        continue;
      }
      cursor.seek(static_cast<int64_t>(flat));
      const float s = dot_one(dy_t + cursor.row * ld,
                              x_t + (static_cast<int64_t>(flat) - cursor.start) * ld, ld);
      out[e] = add ? out[e] + s : s;
    }
  });
}

template <typename dy_t_, typename x_t_>
void sddmm_typed(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
                 const at::Tensor& out, bool accumulate, std::atomic<bool>& bad_index) {
  const int64_t frames = dy.size(0), out_f = dy.size(1), in = x.size(1);
  const int64_t numel = out_f * in, k = indices.numel();
  float* o = out.mutable_data_ptr<float>();
  const int64_t chunk = std::max<int64_t>(
      kLanes, std::min(round_up(frames, kLanes),
                       kPanelBytes / (4 * (in + out_f)) / kLanes * kLanes));
  std::vector<float> x_panel(static_cast<size_t>(in * chunk));
  std::vector<float> dy_panel(static_cast<size_t>(out_f * chunk));
  for (int64_t t0 = 0; t0 < frames; t0 += chunk) {
    const int64_t len = std::min(chunk, frames - t0);
    const int64_t ld = round_up(len, kLanes);
    transpose_panel(x.const_data_ptr<x_t_>(), in, t0, len, ld, x_panel.data());
    transpose_panel(dy.const_data_ptr<dy_t_>(), out_f, t0, len, ld, dy_panel.data());
    const bool add = accumulate || t0 > 0;
    if (indices.scalar_type() == at::kInt) {
      entries_kernel(dy_panel.data(), x_panel.data(), ld, indices.const_data_ptr<int32_t>(), k,
                     in, o, add, bad_index, numel);
    } else {
      entries_kernel(dy_panel.data(), x_panel.data(), ld, indices.const_data_ptr<int64_t>(), k,
                     in, o, add, bad_index, numel);
    }
  }
}

template <typename dy_t_>
void dispatch_x(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& indices,
                const at::Tensor& out, bool accumulate, std::atomic<bool>& bad_index) {
  switch (x.scalar_type()) {
    case at::kFloat:
      sddmm_typed<dy_t_, float>(dy, x, indices, out, accumulate, bad_index);
      break;
    case at::kBFloat16:
      sddmm_typed<dy_t_, c10::BFloat16>(dy, x, indices, out, accumulate, bad_index);
      break;
    case at::kHalf:
      sddmm_typed<dy_t_, c10::Half>(dy, x, indices, out, accumulate, bad_index);
      break;
    default:
      TORCH_CHECK(false, "adtuning::sddmm: x must be float32, bfloat16 or float16, got ",
                  x.scalar_type());
  }
}

void sddmm_cpu(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& indices,
               const at::Tensor& out, bool accumulate) {
  constexpr const char* op = "adtuning::sddmm";
  TORCH_CHECK(dy_in.dim() == 2 && x_in.dim() == 2, op, ": dy and x must be [N, features], got ",
              dy_in.sizes(), " and ", x_in.sizes());
  TORCH_CHECK(dy_in.device().is_cpu() && x_in.device().is_cpu(), op,
              ": dy and x must be CPU tensors");
  TORCH_CHECK(dy_in.size(0) == x_in.size(0), op, ": dy and x must have the same rows, got ",
              dy_in.sizes(), " and ", x_in.sizes());
  check_indices(indices, op);
  check_compact(out, op, "out", at::kFloat, indices.numel());
  const int64_t k = indices.numel();
  if (k == 0) return;
  if (dy_in.size(0) == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  TORCH_CHECK(x_in.size(1) > 0 && dy_in.size(1) > 0, op,
              ": indices given for a weight with no entries");
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  std::atomic<bool> bad_index{false};
  switch (dy.scalar_type()) {
    case at::kFloat:
      dispatch_x<float>(dy, x, indices, out, accumulate, bad_index);
      break;
    case at::kBFloat16:
      dispatch_x<c10::BFloat16>(dy, x, indices, out, accumulate, bad_index);
      break;
    case at::kHalf:
      dispatch_x<c10::Half>(dy, x, indices, out, accumulate, bad_index);
      break;
    default:
      TORCH_CHECK(false, op, ": dy must be float32, bfloat16 or float16, got ", dy.scalar_type());
  }
  TORCH_CHECK(!bad_index.load(), op, ": an index is outside [0, ", dy.size(1) * x.size(1),
              "); the entries with valid indices were written");
}

}  // namespace
}  // namespace adtuning

TORCH_LIBRARY_IMPL(adtuning, CPU, m) {
  m.impl("sddmm", &adtuning::sddmm_cpu);
}
