// Fused AdamW over the compressed index sets of a list of tensors (an optimizer parameter
// group) in one call and one parallel region: exactly adtuning::sparse_adamw_ applied to each
// tensor in turn, bit for bit (the per-entry code is shared, sparse_adamw.h), without a
// dispatcher call, a fork/join and a cold prefetch pipeline per tensor.
//
// The masters that exist come as one list, tensor t's at masters[master_index[t]] (-1: none);
// the argument checks name it masters[t], its place in the wrapper's per-tensor list
// (adtuning/native.py). Every tensor's arguments are checked before anything is written.
//
// The child entries of all tensors then form one flat range of K = sum k_t entries (tensor t
// owning [offset_t, offset_t + k_t)), which one at::parallel_for splits across threads exactly
// as the single op splits one tensor of K entries (tasks of at least kGrain entries, balanced
// by entries, not by tensors: most wav2vec2-base tensors hold a few child entries, a few hold
// tens of thousands). A task walks the tensors its range overlaps; on each piece it first
// requests the parameter lines of the first kPrefetchDistance entries (warm-up), then runs the
// single op's block gather / update / scatter.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "sparse_adamw.h"

namespace adtuning {
namespace {

using sparse_adamw::Operand;

void sparse_adamw_multi_cpu(at::TensorList params, at::TensorList grads, at::TensorList indices,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList masters, at::IntArrayRef master_index, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            at::ArrayRef<double> bias_correction1,
                            at::ArrayRef<double> bias_correction2) {
  constexpr const char* op = "adtuning::sparse_adamw_multi_";
  const int64_t n = static_cast<int64_t>(params.size());
  const auto check_length = [&](const char* name, size_t size) {
    TORCH_CHECK(static_cast<int64_t>(size) == n, op, ": ", name, " has ", size,
                " entries, params has ", n, "; every list needs one entry per tensor");
  };
  check_length("grads", grads.size());
  check_length("indices", indices.size());
  check_length("exp_avgs", exp_avgs.size());
  check_length("exp_avg_sqs", exp_avg_sqs.size());
  check_length("master_index", master_index.size());
  check_length("bias_correction1", bias_correction1.size());
  check_length("bias_correction2", bias_correction2.size());

  // All checks first: a bad argument anywhere leaves every tensor unwritten.
  const int64_t n_masters = static_cast<int64_t>(masters.size());
  std::vector<int64_t> master_owner(n_masters, -1);
  std::vector<Operand> operands;
  operands.reserve(n);
  std::vector<int64_t> offsets(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t j = master_index[t];
    TORCH_CHECK(j >= -1 && j < n_masters, op, ": master_index[", t, "] is ", j,
                "; it must be -1 (no master) or a position in masters (", n_masters,
                " entries)");
    if (j >= 0) {
      TORCH_CHECK(master_owner[j] < 0, op, ": masters[", j, "] is the master of tensors ",
                  master_owner[j], " and ", t, "; each master belongs to one tensor");
      master_owner[j] = t;
    }
    operands.push_back(sparse_adamw::check_operand(
        op, t, params[t], grads[t], indices[t], exp_avgs[t], exp_avg_sqs[t],
        j >= 0 ? &masters[j] : nullptr, lr, beta1, beta2, eps, weight_decay,
        bias_correction1[t], bias_correction2[t]));
    offsets[t + 1] = offsets[t] + operands.back().k;
  }
  for (int64_t j = 0; j < n_masters; ++j) {
    TORCH_CHECK(master_owner[j] >= 0, op, ": masters[", j,
                "] is no tensor's master (master_index)");
  }
  // The tensors are updated concurrently: one parameter at two positions would race.
  std::vector<std::pair<uintptr_t, int64_t>> by_address;
  by_address.reserve(n);
  for (int64_t t = 0; t < n; ++t) {
    if (operands[t].k > 0) by_address.emplace_back(reinterpret_cast<uintptr_t>(operands[t].param), t);
  }
  std::sort(by_address.begin(), by_address.end());
  for (size_t j = 1; j < by_address.size(); ++j) {
    TORCH_CHECK(by_address[j].first != by_address[j - 1].first, op, ": params[",
                std::min(by_address[j - 1].second, by_address[j].second), "] and params[",
                std::max(by_address[j - 1].second, by_address[j].second),
                "] are the same tensor; the tensors are updated concurrently, so each may "
                "appear once (nothing was written)");
  }

  // The lowest position at which an (unsorted) index set held an out-of-range index.
  std::atomic<int64_t> bad_position{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, offsets[n], sparse_adamw::kGrain, [&](int64_t begin, int64_t end) {
    // The tensor holding flat entry `begin`: the last t with offsets[t] <= begin (never an
    // empty tensor, whose offset equals the next one's).
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; t < n && offsets[t] < end; ++t) {
      const int64_t lo = std::max(begin, offsets[t]) - offsets[t];
      const int64_t hi = std::min(end, offsets[t + 1]) - offsets[t];
      if (lo >= hi) continue;
      std::atomic<bool> bad_index{false};
      sparse_adamw::update_operand(operands[t], lo, hi, /*warm_up=*/true, bad_index);
      if (bad_index.load(std::memory_order_relaxed)) {
        int64_t seen = bad_position.load();
        while (t < seen && !bad_position.compare_exchange_weak(seen, t)) {
        }
      }
    }
  });
  const int64_t bad = bad_position.load();
  TORCH_CHECK(bad == std::numeric_limits<int64_t>::max(), op, ": an index of indices[", bad,
              "] is outside [0, ", bad < n ? operands[bad].numel : 0,
              "); params[", bad, "] was left unwritten at those indices");
}

}  // namespace
}  // namespace adtuning

TORCH_LIBRARY_IMPL(adtuning, CPU, m) {
  m.impl("sparse_adamw_multi_", &adtuning::sparse_adamw_multi_cpu);
}
