// Operator schemas of the rlhf_engine kernel library, declared once.
//
// Backends register their implementations in their own files:
//   csrc/cpu/*.cpp   TORCH_LIBRARY_IMPL(rlhf_engine, CPU, m)
//   csrc/cuda/*.cu   TORCH_LIBRARY_IMPL(rlhf_engine, CUDA, m)
// Fake (meta) kernels and autograd formulas are registered from Python in
// rlhf_engine/ops/, which is the only supported way to call these ops.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// `import rlhf_engine._C` loads this shared object, which runs the static
// TORCH_LIBRARY initializers below. The module itself has no attributes.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace rlhf_engine {

namespace cpu {
int64_t compiled_vector_bits();  // csrc/cpu/logprobs.cpp
}

std::string build_info() {
  std::string info = "cpu";
#ifdef RLHF_ENGINE_WITH_CUDA
  info += "+cuda";
#endif
  return info;
}

TORCH_LIBRARY(rlhf_engine, m) {
  m.def("build_info() -> str", &build_info);
  // Width in bits of the float vectors the CPU kernels were compiled with (512, 256, or 32 = scalar).
  m.def("cpu_vector_bits() -> int", &cpu::compiled_vector_bits);

  // Fused log-softmax + gather (+ entropy) over rows of logits [N, V].
  // z = logits * inv_temperature; lse = logsumexp(z); logprob = z[label] - lse;
  // entropy = lse - sum(softmax(z) * z) (zeros unless with_entropy).
  // Rows whose label == ignore_index give logprob = entropy = 0.
  // Outputs are fp32 [N] (fp64 for fp64 logits).
  m.def(
      "logprobs_fwd(Tensor logits, Tensor labels, float inv_temperature, int ignore_index, "
      "bool with_entropy) -> (Tensor logprob, Tensor entropy, Tensor lse)");
  // grad_logits[n, j] = inv_T * ( g_lp[n] * (onehot(label)_j - p_j)
  //                              - g_ent[n] * p_j * (z_j - lse[n] + entropy[n]) )
  // computed in one pass from the saved lse; ignored rows get 0.
  // grad_entropy may be an empty tensor when the entropy output has no gradient.
  m.def(
      "logprobs_bwd(Tensor grad_logprob, Tensor grad_entropy, Tensor logits, Tensor labels, "
      "Tensor lse, Tensor entropy, float inv_temperature, int ignore_index) -> Tensor");
  // The same backward written over the logits buffer (logits is overwritten with grad_logits),
  // for callers that no longer need the logits: saves the [N, V] gradient allocation.
  m.def(
      "logprobs_bwd_inplace(Tensor grad_logprob, Tensor grad_entropy, Tensor(a!) logits, "
      "Tensor labels, Tensor lse, Tensor entropy, float inv_temperature, int ignore_index) -> ()");

  // Per-token KL estimators between log-probs of the policy and the reference.
  // kind: 0 = kl (k1: logp - ref), 1 = abs (|logp - ref|), 2 = mse (k2: 0.5 (logp - ref)^2),
  //       3 = k3 (exp(ref - logp) - (ref - logp) - 1).
  m.def("token_kl_fwd(Tensor logp, Tensor ref_logp, int kind) -> Tensor");
  m.def("token_kl_bwd(Tensor grad, Tensor logp, Tensor ref_logp, int kind) -> (Tensor, Tensor)");

  // Exact KL(pi || pi_ref) over the vocabulary from two logit tensors [N, V], fused:
  // kl[n] = sum_j p_j (log p_j - log q_j), p = softmax(logits * inv_T), q = softmax(ref_logits * inv_T).
  m.def(
      "full_kl_fwd(Tensor logits, Tensor ref_logits, float inv_temperature) "
      "-> (Tensor kl, Tensor lse, Tensor ref_lse)");
  // grad_logits[n, j] = g[n] * inv_T * p_j * (log p_j - log q_j - kl[n]);
  // grad_ref_logits[n, j] = g[n] * inv_T * (q_j - p_j), only when ref_grad (else an empty tensor).
  m.def(
      "full_kl_bwd(Tensor grad, Tensor logits, Tensor ref_logits, Tensor kl, Tensor lse, "
      "Tensor ref_lse, float inv_temperature, bool ref_grad) -> (Tensor, Tensor)");

  // Generalized advantage estimation, reverse scan over T per row of [B, T].
  // Valid positions (mask true) form the sequence; masked positions give 0 and are skipped
  // (the recursion carries over them); the value after the last valid token is 0.
  // delta_t = r_t + gamma * V_{t+1} - V_t ; A_t = delta_t + gamma * lam * A_{t+1} ; R_t = A_t + V_t
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  // Packed form over concatenated sequences [L]; sequence i spans [offsets[i], offsets[i+1]).
  m.def(
      "gae_packed(Tensor rewards, Tensor values, Tensor offsets, float gamma, float lam) "
      "-> (Tensor, Tensor)");
}

}  // namespace rlhf_engine
