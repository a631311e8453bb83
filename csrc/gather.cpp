// Gradient gather at a compressed index set: out = float32(grad.flatten()[indices]),
// or out += that (gradient accumulation over micro-batches). Used by the per-parameter
// gradient hook, once per backward, so it must not serialise on the scattered loads.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>

#include "common.h"

namespace adtuning {
namespace {

constexpr int64_t kPrefetchDistance = 32;  // entries ahead: ~32 misses in flight per thread
// Entries per parallel task (~0.1 ms of scattered loads): per-tensor child sets of a few
// thousand entries must still split across cores; a fork/join costs a few microseconds.
constexpr int64_t kGrain = 1 << 12;

template <typename src_t, typename index_t, bool kAccumulate>
void gather_kernel(const src_t* grad, int64_t numel, const index_t* idx, float* out, int64_t k,
                   std::atomic<bool>& bad_index) {
  at::parallel_for(0, k, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (j + kPrefetchDistance < end) {
        const index_t ahead = idx[j + kPrefetchDistance];
        if (in_range(ahead, numel)) prefetch_read(grad + ahead);
      }
      const index_t i = idx[j];
      if (!in_range(i, numel)) {
        bad_index.store(true, std::memory_order_relaxed);
        continue;
      }
      const float value = static_cast<float>(grad[i]);
      out[j] = kAccumulate ? out[j] + value : value;
    }
  });
}

template <typename src_t, typename index_t>
void dispatch_accumulate(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& out,
                         bool accumulate, std::atomic<bool>& bad_index) {
  const auto* g = grad.const_data_ptr<src_t>();
  const auto* idx = indices.const_data_ptr<index_t>();
  auto* o = out.mutable_data_ptr<float>();
  if (accumulate) {
    gather_kernel<src_t, index_t, true>(g, grad.numel(), idx, o, indices.numel(), bad_index);
  } else {
    gather_kernel<src_t, index_t, false>(g, grad.numel(), idx, o, indices.numel(), bad_index);
  }
}

template <typename src_t>
void dispatch_index(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& out,
                    bool accumulate, std::atomic<bool>& bad_index) {
  if (indices.scalar_type() == at::kInt) {
    dispatch_accumulate<src_t, int32_t>(grad, indices, out, accumulate, bad_index);
  } else {
    dispatch_accumulate<src_t, int64_t>(grad, indices, out, accumulate, bad_index);
  }
}

void gather_cpu(const at::Tensor& grad_in, const at::Tensor& indices, const at::Tensor& out,
                bool accumulate) {
  constexpr const char* op = "adtuning::gather";
  check_indices(indices, op);
  check_compact(out, op, "out", at::kFloat, indices.numel());
  TORCH_CHECK(grad_in.device().is_cpu(), op, ": grad must be a CPU tensor");
  const at::Tensor grad = grad_in.contiguous();
  std::atomic<bool> bad_index{false};
  switch (grad.scalar_type()) {
    case at::kFloat:
      dispatch_index<float>(grad, indices, out, accumulate, bad_index);
      break;
    case at::kBFloat16:
      dispatch_index<c10::BFloat16>(grad, indices, out, accumulate, bad_index);
      break;
    case at::kHalf:
      dispatch_index<c10::Half>(grad, indices, out, accumulate, bad_index);
      break;
    default:
      TORCH_CHECK(false, op, ": grad must be float32, bfloat16 or float16, got ",
                  grad.scalar_type());
  }
  TORCH_CHECK(!bad_index.load(), op, ": an index is outside [0, ", grad.numel(),
              "); the entries with valid indices were written");
}

}  // namespace
}  // namespace adtuning

TORCH_LIBRARY_IMPL(adtuning, CPU, m) {
  m.impl("gather", &adtuning::gather_cpu);
}
