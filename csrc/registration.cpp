// The schemas of the adtuning native ops, declared once for the whole library.
// Kernels live one op per file and attach with TORCH_LIBRARY_IMPL(adtuning, CPU, m);
// the fake (meta) implementations are registered from Python in adtuning/native.py.
#include <torch/library.h>

TORCH_LIBRARY(adtuning, m) {
  // One AdamW step on param.flatten()[indices] (or on the fp32 master copy of those
  // entries); bias corrections come from the host so the kernel is step-agnostic.
  m.def(
      "sparse_adamw_(Tensor(a!) param, Tensor grad, Tensor indices, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!)? master, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, float bias_correction1, float bias_correction2) -> ()");
  // sparse_adamw_ on every position of the lists in turn (bit for bit), in one call and one
  // parallel region; one pair of bias corrections per tensor (their steps may differ).
  // masters holds only the master copies that exist: tensor t's is masters[master_index[t]],
  // or none when master_index[t] is -1. (Not a Tensor(d!)?[] with None entries: torch.compile's
  // auto-functionalization of a mutable optional-tensor list fails on a None, torch 2.14.)
  m.def(
      "sparse_adamw_multi_(Tensor(a!)[] params, Tensor[] grads, Tensor[] indices, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, "
      "int[] master_index, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float[] bias_correction1, float[] bias_correction2) -> ()");
  // out = float32(grad.flatten()[indices]), or out += that when accumulate.
  m.def("gather(Tensor grad, Tensor indices, Tensor(a!) out, bool accumulate) -> ()");
  // fisher_w += sum_n (dy_n^T x_n)^2 and fisher_b += sum_n (sum_t dy_n,t)^2.
  m.def(
      "linear_fisher_(Tensor x, Tensor dy, Tensor(a!) fisher_w, Tensor(b!)? fisher_b, "
      "Tensor? lengths) -> ()");
  // out = float32((dy^T @ x).flatten()[indices]) (or out += that) for dy [N, out_features]
  // and x [N, in_features]: the child entries of a Linear weight gradient, no dense dW.
  m.def("sddmm(Tensor dy, Tensor x, Tensor indices, Tensor(a!) out, bool accumulate) -> ()");
}
