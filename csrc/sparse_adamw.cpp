// Fused AdamW over a compressed index set: gather the child entries of a dense parameter,
// apply one AdamW step with compact fp32 moments (and an fp32 master copy for bf16/fp16
// parameters), scatter the result back. Every other entry of the parameter is untouched.
//
// Per entry, in the order of torch.optim.AdamW, each scalar rounded to float once on the host
// as ATen does with Python scalars:
//   w = w * float(1 - lr*wd)                                  (param.mul_)
//   m = fma(c, g - m, base)                                   (exp_avg.lerp_, ATen's vector form)
//   v = fma(float(1 - beta2) * g, g, v * float(beta2))        (mul_, then addcmul_)
//   w = w + float(-lr/bc1) * m / (sqrt(v) / float(sqrt(bc2)) + float(eps))   (addcdiv_)
// This rounds exactly like the vectorised body of torch.optim.AdamW(fused=True) on CPU. The
// single-tensor path (and the reference) differ by an ulp on a few entries, because their
// sqrt goes through a vector-math library that is not correctly rounded.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>

#include "common.h"

namespace adtuning {
namespace {

// Entries per block: the gathered weights (1 KiB) and the parameter lines they came from
// (256 lines, 16 KiB) stay in L1 between the gather and the scatter of one block.
constexpr int64_t kBlock = 256;
// Entries ahead for which the scattered parameter line is requested: enough misses in
// flight to cover memory latency, few enough not to evict the current block.
constexpr int64_t kPrefetchDistance = 64;
// Entries per parallel task (~0.1 ms of scattered traffic): at P=0.01 most wav2vec2-base
// tensors hold 6k-24k child entries, which must still split across cores; a fork/join costs
// a few microseconds on an idle machine.
constexpr int64_t kGrain = 1 << 12;

// The AdamW scalars, each rounded to float exactly once.
struct Scalars {
  float decay;          // 1 - lr * weight_decay (1 when there is no decay: w * 1 == w)
  float lerp_coeff;     // lerp weight 1 - beta1, or (1 - beta1) - 1 on the large-weight branch
  bool lerp_small;      // ATen's lerp: |weight| < 0.5 selects the start-based formula
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
};

Scalars make_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                     double bias_correction1, double bias_correction2) {
  Scalars s{};
  s.decay = weight_decay != 0 ? static_cast<float>(1 - lr * weight_decay) : 1.0f;
  const float weight = static_cast<float>(1 - beta1);
  s.lerp_small = std::abs(weight) < 0.5f;
  s.lerp_coeff = s.lerp_small ? weight : weight - 1.0f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1 - beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  s.eps = static_cast<float>(eps);
  s.neg_step_size = static_cast<float>(-(lr / bias_correction1));
  return s;
}

// One AdamW step on n compact entries; the loop has no gathers, so it vectorises.
inline void update_block(float* __restrict w, const float* __restrict g, float* __restrict m,
                         float* __restrict v, int64_t n, const Scalars& s) {
  for (int64_t j = 0; j < n; ++j) {
    const float gj = g[j];
    const float wj = w[j] * s.decay;
    const float mj = std::fma(s.lerp_coeff, gj - m[j], s.lerp_small ? m[j] : gj);
    const float vj = std::fma(s.one_minus_beta2 * gj, gj, v[j] * s.beta2);
    const float denom = std::sqrt(vj) / s.bc2_sqrt + s.eps;
    m[j] = mj;
    v[j] = vj;
    w[j] = wj + (s.neg_step_size * mj) / denom;
  }
}

template <typename param_t, typename index_t>
void sparse_adamw_kernel(param_t* param, int64_t numel, const float* grad, const index_t* idx,
                         float* exp_avg, float* exp_avg_sq, float* master, int64_t k,
                         const Scalars& s, std::atomic<bool>& bad_index) {
  at::parallel_for(0, k, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float w[kBlock];
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t n = std::min(kBlock, end - b0);
      const index_t* bidx = idx + b0;
      // Gather: from the master copy (sequential), or from the scattered parameter lines.
      if (master != nullptr) {
        std::copy(master + b0, master + b0 + n, w);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          if (b0 + j + kPrefetchDistance < end) {
            const index_t ahead = bidx[j + kPrefetchDistance];
            if (in_range(ahead, numel)) prefetch_write(param + ahead);
          }
          const index_t i = bidx[j];
          w[j] = in_range(i, numel) ? static_cast<float>(param[i]) : 0.0f;
        }
      }
      update_block(w, grad + b0, exp_avg + b0, exp_avg_sq + b0, n, s);
      if (master != nullptr) std::copy(w, w + n, master + b0);
      // Scatter; with a master copy this is the first touch of the lines, so prefetch here.
      for (int64_t j = 0; j < n; ++j) {
        if (master != nullptr && b0 + j + kPrefetchDistance < end) {
          const index_t ahead = bidx[j + kPrefetchDistance];
          if (in_range(ahead, numel)) prefetch_write(param + ahead);
        }
        const index_t i = bidx[j];
        if (in_range(i, numel)) {
          param[i] = static_cast<param_t>(w[j]);  // round-to-nearest-even for bf16/fp16
        } else {
          bad_index.store(true, std::memory_order_relaxed);
        }
      }
    }
  });
}

template <typename param_t>
void dispatch_index(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& indices,
                    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, float* master,
                    const Scalars& s, std::atomic<bool>& bad_index) {
  auto* p = param.mutable_data_ptr<param_t>();
  const auto* g = grad.const_data_ptr<float>();
  auto* m = exp_avg.mutable_data_ptr<float>();
  auto* v = exp_avg_sq.mutable_data_ptr<float>();
  const int64_t k = indices.numel();
  if (indices.scalar_type() == at::kInt) {
    sparse_adamw_kernel<param_t, int32_t>(p, param.numel(), g,
                                          indices.const_data_ptr<int32_t>(), m, v, master, k,
                                          s, bad_index);
  } else {
    sparse_adamw_kernel<param_t, int64_t>(p, param.numel(), g,
                                          indices.const_data_ptr<int64_t>(), m, v, master, k,
                                          s, bad_index);
  }
}

void sparse_adamw_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& indices,
                      const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                      const std::optional<at::Tensor>& master, double lr, double beta1,
                      double beta2, double eps, double weight_decay, double bias_correction1,
                      double bias_correction2) {
  constexpr const char* op = "adtuning::sparse_adamw_";
  check_indices(indices, op);
  const int64_t k = indices.numel();
  TORCH_CHECK(param.device().is_cpu(), op, ": param must be a CPU tensor");
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous");
  check_compact(grad, op, "grad", at::kFloat, k);
  check_compact(exp_avg, op, "exp_avg", at::kFloat, k);
  check_compact(exp_avg_sq, op, "exp_avg_sq", at::kFloat, k);
  float* master_ptr = nullptr;
  if (master.has_value()) {
    check_compact(*master, op, "master", at::kFloat, k);
    master_ptr = master->mutable_data_ptr<float>();
  } else {
    TORCH_CHECK(param.scalar_type() == at::kFloat, op, ": a ", param.scalar_type(),
                " param needs an fp32 master copy of its child entries");
  }
  TORCH_CHECK(bias_correction1 != 0 && bias_correction2 > 0, op,
              ": bias corrections must be positive (step >= 1)");
  const Scalars s =
      make_scalars(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2);
  std::atomic<bool> bad_index{false};
  switch (param.scalar_type()) {
    case at::kFloat:
      dispatch_index<float>(param, grad, indices, exp_avg, exp_avg_sq, master_ptr, s, bad_index);
      break;
    case at::kBFloat16:
      dispatch_index<c10::BFloat16>(param, grad, indices, exp_avg, exp_avg_sq, master_ptr, s,
                                    bad_index);
      break;
    case at::kHalf:
      dispatch_index<c10::Half>(param, grad, indices, exp_avg, exp_avg_sq, master_ptr, s,
                                bad_index);
      break;
    default:
      TORCH_CHECK(false, op, ": param must be float32, bfloat16 or float16, got ",
                  param.scalar_type());
  }
  TORCH_CHECK(!bad_index.load(), op, ": an index is outside [0, ", param.numel(),
              "); the parameter was left unwritten at those indices");
}

}  // namespace
}  // namespace adtuning

TORCH_LIBRARY_IMPL(adtuning, CPU, m) {
  m.impl("sparse_adamw_", &adtuning::sparse_adamw_cpu);
}
