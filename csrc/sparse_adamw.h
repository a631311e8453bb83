// The per-entry code of the fused sparse AdamW ops, shared by adtuning::sparse_adamw_
// (sparse_adamw.cpp, one tensor) and adtuning::sparse_adamw_multi_ (sparse_adamw_multi.cpp,
// a list of tensors in one parallel region): the argument checks, the AdamW scalars and the
// block gather / update / scatter over a range of one tensor's child entries. Both ops run
// exactly this code per entry, so they agree bit for bit.
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
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <ostream>

#include "common.h"

namespace adtuning {
namespace sparse_adamw {

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

inline Scalars make_scalars(double lr, double beta1, double beta2, double eps,
                            double weight_decay, double bias_correction1,
                            double bias_correction2) {
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

// The update of child entries [begin, end) of one tensor: blocks of kBlock entries gathered
// (from the master copy, or from the scattered parameter lines), updated, scattered back.
// Out-of-range indices are skipped and reported through bad_index. warm_up requests the
// parameter lines of the first kPrefetchDistance entries before the first block, so that the
// prefetch pipeline is full from the first entry on (it has no effect on the values).
template <typename param_t, typename index_t>
void update_range(param_t* param, int64_t numel, const float* grad, const index_t* idx,
                  float* exp_avg, float* exp_avg_sq, float* master, int64_t begin, int64_t end,
                  const Scalars& s, bool warm_up, std::atomic<bool>& bad_index) {
  if (warm_up) {
    const int64_t stop = std::min(end, begin + kPrefetchDistance);
    for (int64_t j = begin; j < stop; ++j) {
      if (in_range(idx[j], numel)) prefetch_write(param + idx[j]);
    }
  }
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
}

// One tensor's operands, checked, as raw pointers: what update_range needs.
struct Operand {
  void* param;
  at::ScalarType param_type;
  int64_t numel;
  const void* idx;
  bool idx32;
  int64_t k;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* master;  // nullptr without a master copy
  Scalars s;
};

// The name of an argument in a message: `single` for the one-tensor op (position < 0), else
// `list[position]` for the multi-tensor op. Streamed only when a check fails, so a passing
// check builds no string.
struct ArgName {
  const char* single;
  const char* list;
  int64_t position;
};

inline std::ostream& operator<<(std::ostream& out, const ArgName& name) {
  if (name.position < 0) return out << name.single;
  return out << name.list << "[" << name.position << "]";
}

// A 1-D, contiguous CPU tensor of fp32 with `k` entries (common.h's check_compact, with
// the argument named by position).
inline void check_compact_arg(const at::Tensor& t, const char* op, const ArgName& name,
                              int64_t k) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be ", at::kFloat, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == k, op, ": ", name, " must have ", k, " entries, got ", t.numel());
}

// Checks one tensor's arguments and returns its operands; nothing is written. position < 0:
// the arguments of adtuning::sparse_adamw_; else position `position` of the lists of
// adtuning::sparse_adamw_multi_ (the messages name "params[3]", "grads[3]", ...).
// Indices are sorted (the contract), so the first and the last one bound them all: an index
// set reaching outside the parameter is refused here, before anything is written. (The kernel
// still checks every index, so an unsorted set cannot write out of bounds.)
inline Operand check_operand(const char* op, int64_t position, const at::Tensor& param,
                             const at::Tensor& grad, const at::Tensor& indices,
                             const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                             const at::Tensor* master, double lr, double beta1, double beta2,
                             double eps, double weight_decay, double bias_correction1,
                             double bias_correction2) {
  const ArgName idx_name{"indices", "indices", position};
  const ArgName param_name{"param", "params", position};
  TORCH_CHECK(indices.device().is_cpu(), op, ": ", idx_name, " must be a CPU tensor");
  TORCH_CHECK(indices.dim() == 1, op, ": ", idx_name, " must be 1-D, got ", indices.dim(), "-D");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op, ": ",
              idx_name, " must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.is_contiguous(), op, ": ", idx_name, " must be contiguous");
  const int64_t k = indices.numel();
  TORCH_CHECK(param.device().is_cpu(), op, ": ", param_name, " must be a CPU tensor");
  TORCH_CHECK(param.is_contiguous(), op, ": ", param_name, " must be contiguous");
  const at::ScalarType type = param.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, op, ": ",
              param_name, " must be float32, bfloat16 or float16, got ", type);
  check_compact_arg(grad, op, ArgName{"grad", "grads", position}, k);
  check_compact_arg(exp_avg, op, ArgName{"exp_avg", "exp_avgs", position}, k);
  check_compact_arg(exp_avg_sq, op, ArgName{"exp_avg_sq", "exp_avg_sqs", position}, k);
  if (master != nullptr) {
    check_compact_arg(*master, op, ArgName{"master", "masters", position}, k);
  } else {
    TORCH_CHECK(type == at::kFloat, op, ": a ", type, " ", param_name,
                " needs an fp32 master copy of its child entries");
  }
  TORCH_CHECK(bias_correction1 != 0 && bias_correction2 > 0, op, ": bias corrections",
              ArgName{"", "", position}, " must be positive (step >= 1)");
  const int64_t numel = param.numel();
  const bool idx32 = indices.scalar_type() == at::kInt;
  if (k > 0) {
    const int64_t first = idx32 ? indices.const_data_ptr<int32_t>()[0]
                                : indices.const_data_ptr<int64_t>()[0];
    const int64_t last = idx32 ? indices.const_data_ptr<int32_t>()[k - 1]
                               : indices.const_data_ptr<int64_t>()[k - 1];
    TORCH_CHECK(in_range(first, numel) && in_range(last, numel), op, ": ", idx_name,
                " holds an index outside [0, ", numel, ") (first ", first, ", last ", last,
                "); nothing was written");
  }
  Operand o{};
  o.param = param.mutable_data_ptr();
  o.param_type = type;
  o.numel = numel;
  o.idx = indices.const_data_ptr();
  o.idx32 = idx32;
  o.k = k;
  o.grad = grad.const_data_ptr<float>();
  o.exp_avg = exp_avg.mutable_data_ptr<float>();
  o.exp_avg_sq = exp_avg_sq.mutable_data_ptr<float>();
  o.master = master != nullptr ? master->mutable_data_ptr<float>() : nullptr;
  o.s = make_scalars(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2);
  return o;
}

template <typename param_t>
void update_range_index(const Operand& o, int64_t begin, int64_t end, bool warm_up,
                        std::atomic<bool>& bad_index) {
  auto* p = static_cast<param_t*>(o.param);
  if (o.idx32) {
    update_range<param_t, int32_t>(p, o.numel, o.grad, static_cast<const int32_t*>(o.idx),
                                   o.exp_avg, o.exp_avg_sq, o.master, begin, end, o.s, warm_up,
                                   bad_index);
  } else {
    update_range<param_t, int64_t>(p, o.numel, o.grad, static_cast<const int64_t*>(o.idx),
                                   o.exp_avg, o.exp_avg_sq, o.master, begin, end, o.s, warm_up,
                                   bad_index);
  }
}

// update_range for a checked operand, dispatched on its parameter and index types.
inline void update_operand(const Operand& o, int64_t begin, int64_t end, bool warm_up,
                           std::atomic<bool>& bad_index) {
  switch (o.param_type) {
    case at::kFloat:
      update_range_index<float>(o, begin, end, warm_up, bad_index);
      break;
    case at::kBFloat16:
      update_range_index<c10::BFloat16>(o, begin, end, warm_up, bad_index);
      break;
    default:  // at::kHalf: check_operand admits nothing else
      update_range_index<c10::Half>(o, begin, end, warm_up, bad_index);
      break;
  }
}

}  // namespace sparse_adamw
}  // namespace adtuning
