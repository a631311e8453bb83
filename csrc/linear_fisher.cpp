// Per-sample Fisher accumulation for a Linear layer:
//   fisher_w[o, i] += sum_n (sum_t dy[n, t, o] * x[n, t, i])^2
//   fisher_b[o]    += sum_n (sum_t dy[n, t, o])^2
// Samples are processed in groups small enough to stay in the last-level cache. A group's
// x and dy (frames < lengths[n] only) are first packed into fp32 panels, each sample once;
// then fisher_w is split into (output tile, input tile) blocks, one per parallel task, and
// for every sample of the group a register-blocked kernel forms kMR x kNR pieces of the
// per-sample gradient dy_n^T x_n, squares them and adds them to the block straight away.
// No more than one such register tile of a per-sample gradient ever exists; the FLOPs are
// those of the ordinary weight-gradient GEMM, and each fisher_w block is read and written
// once per group rather than once per sample.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "common.h"

namespace adtuning {
namespace {

// Register tile: kMR outputs x kNR inputs of fp32 accumulators (12 AVX-512 or 24 AVX2
// registers' worth), fed by one kNR-wide row of x and kMR broadcasts of dy per frame.
constexpr int64_t kMR = 6;
constexpr int64_t kNR = 32;
// Task tile of fisher_w: outputs x inputs (48 KiB of fp32, stays in L2 across a group).
// A kNR-wide x panel is reused from L1 across the kTileO / kMR row blocks of the tile.
constexpr int64_t kTileO = 16 * kMR;
constexpr int64_t kTileI = 4 * kNR;
// Packed bytes per group of samples: about what a core's share of the last-level cache
// holds, so the panels are still cached when the tiles read them.
constexpr int64_t kGroupBytes = int64_t{8} << 20;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Copy rows [0, frames) and columns [c0, c0 + panel) of a row-major [frames, ld] matrix
// with `width` columns into one frame-major, contiguous panel of `panel` floats per frame,
// zero-padding the columns past `width` so the kernel never needs an edge case.
template <typename src_t>
void pack_panel(const src_t* src, int64_t ld, int64_t frames, int64_t c0, int64_t width,
                int64_t panel, float* dst) {
  const int64_t valid = std::min(panel, width - c0);
  for (int64_t t = 0; t < frames; ++t) {
    const src_t* row = src + t * ld + c0;
    float* o = dst + t * panel;
    for (int64_t c = 0; c < valid; ++c) o[c] = static_cast<float>(row[c]);
    for (int64_t c = valid; c < panel; ++c) o[c] = 0.0f;
  }
}

// fisher[r, c] += (sum_t dy_panel[t, r] * x_panel[t, c])^2 for the valid rows and columns
// of one register tile.
inline void square_accumulate_tile(const float* __restrict dy_panel,
                                   const float* __restrict x_panel, int64_t frames,
                                   float* fisher, int64_t ld_fisher, int64_t rows,
                                   int64_t cols) {
  float acc[kMR][kNR] = {};
  for (int64_t t = 0; t < frames; ++t) {
    const float* xr = x_panel + t * kNR;
    const float* dr = dy_panel + t * kMR;
    for (int64_t r = 0; r < kMR; ++r) {
      const float a = dr[r];
      for (int64_t c = 0; c < kNR; ++c) acc[r][c] = std::fma(a, xr[c], acc[r][c]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* f = fisher + r * ld_fisher;
    for (int64_t c = 0; c < cols; ++c) f[c] += acc[r][c] * acc[r][c];
  }
}

template <typename x_t, typename dy_t>
void linear_fisher_kernel(const x_t* x, const dy_t* dy, float* fisher_w, float* fisher_b,
                          const std::vector<int64_t>& valid_frames, int64_t frames,
                          int64_t in, int64_t out) {
  const int64_t batch = static_cast<int64_t>(valid_frames.size());
  const int64_t in_panels = (in + kNR - 1) / kNR;
  const int64_t out_panels = (out + kMR - 1) / kMR;
  const int64_t floats_per_frame = in_panels * kNR + out_panels * kMR;
  const int64_t tiles_o = (out + kTileO - 1) / kTileO;
  // At least one input tile, so that the bias is accumulated even for in == 0.
  const int64_t tiles_i = std::max<int64_t>(1, (in + kTileI - 1) / kTileI);

  // The samples with frames to count, and where each one's panels start in a group buffer.
  std::vector<int64_t> samples, offsets;
  std::vector<float> packed;
  for (int64_t first = 0; first < batch;) {
    samples.clear();
    offsets.assign(1, 0);
    int64_t n = first;
    for (; n < batch; ++n) {
      const int64_t len = valid_frames[n];
      if (len == 0) continue;
      const int64_t size = len * floats_per_frame;
      if (!samples.empty() && (offsets.back() + size) * 4 > kGroupBytes) break;
      samples.push_back(n);
      offsets.push_back(offsets.back() + size);
    }
    first = n;
    const int64_t group = static_cast<int64_t>(samples.size());
    if (group == 0) continue;
    if (static_cast<int64_t>(packed.size()) < offsets.back()) {
      packed.resize(static_cast<size_t>(offsets.back()));
    }
    // Within a sample's block: the x panels (in_panels x len x kNR), then the dy panels.
    auto x_panel = [&](int64_t s, int64_t p) {
      return packed.data() + offsets[s] + p * valid_frames[samples[s]] * kNR;
    };
    auto dy_panel = [&](int64_t s, int64_t p) {
      const int64_t len = valid_frames[samples[s]];
      return packed.data() + offsets[s] + in_panels * len * kNR + p * len * kMR;
    };

    const int64_t panels = in_panels + out_panels;
    at::parallel_for(0, group * panels, 8, [&](int64_t begin, int64_t end) {
      for (int64_t job = begin; job < end; ++job) {
        const int64_t s = job / panels, p = job % panels, n = samples[s];
        const int64_t len = valid_frames[n];
        if (p < in_panels) {
          pack_panel(x + n * frames * in, in, len, p * kNR, in, kNR, x_panel(s, p));
        } else {
          const int64_t q = p - in_panels;
          pack_panel(dy + n * frames * out, out, len, q * kMR, out, kMR, dy_panel(s, q));
        }
      }
    });

    at::parallel_for(0, tiles_o * tiles_i, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t o0 = (tile / tiles_i) * kTileO;
        const int64_t i0 = (tile % tiles_i) * kTileI;
        const int64_t n_o = std::min(kTileO, out - o0);
        const int64_t n_i = std::min(kTileI, in - i0);
        for (int64_t s = 0; s < group; ++s) {
          const int64_t len = valid_frames[samples[s]];
          for (int64_t c0 = 0; c0 < n_i; c0 += kNR) {
            const float* xp = x_panel(s, (i0 + c0) / kNR);
            for (int64_t r0 = 0; r0 < n_o; r0 += kMR) {
              square_accumulate_tile(dy_panel(s, (o0 + r0) / kMR), xp, len,
                                     fisher_w + (o0 + r0) * in + i0 + c0, in,
                                     std::min(kMR, n_o - r0), std::min(kNR, n_i - c0));
            }
          }
          // The bias gradient of this output tile, from the dy panels; one input tile per
          // output tile does it so that no two tasks write the same entry.
          if (fisher_b != nullptr && i0 == 0) {
            for (int64_t r = 0; r < n_o; ++r) {
              const float* panel = dy_panel(s, (o0 + r) / kMR) + (o0 + r) % kMR;
              float sum = 0.0f;
              for (int64_t t = 0; t < len; ++t) sum += panel[t * kMR];
              fisher_b[o0 + r] += sum * sum;
            }
          }
        }
      }
    });
  }
}

template <typename x_t>
void dispatch_dy(const at::Tensor& x, const at::Tensor& dy, float* fisher_w, float* fisher_b,
                 const std::vector<int64_t>& valid_frames) {
  const int64_t frames = x.size(1), in = x.size(2), out = dy.size(2);
  const x_t* xp = x.const_data_ptr<x_t>();
  switch (dy.scalar_type()) {
    case at::kFloat:
      linear_fisher_kernel(xp, dy.const_data_ptr<float>(), fisher_w, fisher_b, valid_frames,
                           frames, in, out);
      break;
    case at::kBFloat16:
      linear_fisher_kernel(xp, dy.const_data_ptr<c10::BFloat16>(), fisher_w, fisher_b,
                           valid_frames, frames, in, out);
      break;
    case at::kHalf:
      linear_fisher_kernel(xp, dy.const_data_ptr<c10::Half>(), fisher_w, fisher_b,
                           valid_frames, frames, in, out);
      break;
    default:
      TORCH_CHECK(false, "adtuning::linear_fisher_: dy must be float32, bfloat16 or float16, got ",
                  dy.scalar_type());
  }
}

void linear_fisher_cpu(const at::Tensor& x_in, const at::Tensor& dy_in, const at::Tensor& fisher_w,
                       const std::optional<at::Tensor>& fisher_b,
                       const std::optional<at::Tensor>& lengths) {
  constexpr const char* op = "adtuning::linear_fisher_";
  TORCH_CHECK(x_in.dim() == 3 && dy_in.dim() == 3, op, ": x and dy must be [B, T, features], got ",
              x_in.sizes(), " and ", dy_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && dy_in.device().is_cpu(), op,
              ": x and dy must be CPU tensors");
  const int64_t batch = x_in.size(0), frames = x_in.size(1), in = x_in.size(2);
  const int64_t out = dy_in.size(2);
  TORCH_CHECK(dy_in.size(0) == batch && dy_in.size(1) == frames, op,
              ": x and dy must agree on [B, T], got ", x_in.sizes(), " and ", dy_in.sizes());
  TORCH_CHECK(fisher_w.device().is_cpu() && fisher_w.scalar_type() == at::kFloat &&
                  fisher_w.is_contiguous() && fisher_w.dim() == 2 && fisher_w.size(0) == out &&
                  fisher_w.size(1) == in,
              op, ": fisher_w must be a contiguous fp32 CPU tensor of shape [", out, ", ", in,
              "], got ", fisher_w.scalar_type(), " ", fisher_w.sizes());
  float* fb = nullptr;
  if (fisher_b.has_value()) {
    check_compact(*fisher_b, op, "fisher_b", at::kFloat, out);
    fb = fisher_b->mutable_data_ptr<float>();
  }
  std::vector<int64_t> valid_frames(static_cast<size_t>(batch), frames);
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->device().is_cpu() && lengths->numel() == batch &&
                    at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false),
                op, ": lengths must be an integer CPU tensor of ", batch, " entries");
    const at::Tensor l = lengths->to(at::kLong).contiguous();
    const int64_t* lp = l.const_data_ptr<int64_t>();
    for (int64_t n = 0; n < batch; ++n) {
      TORCH_CHECK(lp[n] >= 0, op, ": lengths must be non-negative, got ", lp[n]);
      valid_frames[n] = std::min(lp[n], frames);
    }
  }
  if (batch == 0 || frames == 0 || out == 0) return;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.contiguous();
  float* fw = fisher_w.mutable_data_ptr<float>();
  switch (x.scalar_type()) {
    case at::kFloat:
      dispatch_dy<float>(x, dy, fw, fb, valid_frames);
      break;
    case at::kBFloat16:
      dispatch_dy<c10::BFloat16>(x, dy, fw, fb, valid_frames);
      break;
    case at::kHalf:
      dispatch_dy<c10::Half>(x, dy, fw, fb, valid_frames);
      break;
    default:
      TORCH_CHECK(false, op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

}  // namespace
}  // namespace adtuning

TORCH_LIBRARY_IMPL(adtuning, CPU, m) {
  m.impl("linear_fisher_", &adtuning::linear_fisher_cpu);
}
