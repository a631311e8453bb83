// Fused AdamW over a compressed index set: gather the child entries of a dense parameter,
// apply one AdamW step with compact fp32 moments (and an fp32 master copy for bf16/fp16
// parameters), scatter the result back. Every other entry of the parameter is untouched.
//
// The per-entry code (the rounding of every operation, the block gather / update / scatter,
// the argument checks) lives in sparse_adamw.h, shared with adtuning::sparse_adamw_multi_;
// its top comment says how each operation rounds.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <optional>

#include "sparse_adamw.h"

namespace adtuning {
namespace {

using sparse_adamw::Operand;

void sparse_adamw_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& indices,
                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const std::optional<at::Tensor>& master, double lr, double beta1,
                      double beta2, double eps, double weight_decay, double bias_correction1,
                      double bias_correction2) {
  constexpr const char* op = "adtuning::sparse_adamw_";
  const Operand o = sparse_adamw::check_operand(
      op, /*position=*/-1, param, grad, indices, exp_avg, exp_avg_sq,
      master.has_value() ? &*master : nullptr, lr, beta1, beta2, eps, weight_decay,
      bias_correction1, bias_correction2);
  std::atomic<bool> bad_index{false};
  at::parallel_for(0, o.k, sparse_adamw::kGrain, [&](int64_t begin, int64_t end) {
    sparse_adamw::update_operand(o, begin, end, /*warm_up=*/false, bad_index);
  });
  TORCH_CHECK(!bad_index.load(), op, ": an index is outside [0, ", param.numel(),
              "); the parameter was left unwritten at those indices");
}

}  // namespace
}  // namespace adtuning

TORCH_LIBRARY_IMPL(adtuning, CPU, m) {
  m.impl("sparse_adamw_", &adtuning::sparse_adamw_cpu);
}
