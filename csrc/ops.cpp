// Operator schemas of the self_reasoning_tokens namespace, and the pybind11 module
// `self_reasoning_tokens._C` whose import loads this shared library (and so registers the ops).
//
// Path of a call: srt.stop_graddable_attn (Python, validates) -> torch.ops.self_reasoning_tokens
// .attn_fwd / .attn_bwd -> the CPU kernels in cpu/attn_cpu.cpp or the CUDA kernels in
// cuda/attn_cuda.cu. Autograd and fake (meta) kernels are registered in Python
// (self_reasoning_tokens/_ops.py), as in pytorch/extension-cpp.
#include <torch/extension.h>
#include <torch/library.h>

#include "attn_params.h"

namespace srt {

bool compiled_with_cuda() {
#ifdef SRT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace srt

// The pybind11 module: importing it is what loads the library and runs the TORCH_LIBRARY blocks.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Compiled kernels of self_reasoning_tokens; the ops live in torch.ops.self_reasoning_tokens.";
  m.def("compiled_with_cuda", &srt::compiled_with_cuda,
        "Whether the library was built with its CUDA kernels.");
}

TORCH_LIBRARY(self_reasoning_tokens, m) {
  // Forward: returns (out (B,H,N,D), lse (B,H,N)); lse is float64 for float64 inputs and float32
  // otherwise, -inf on rows with no allowed key. The stop-gradient masks do not change the
  // forward; the op takes (and checks) them so that autograd, registered on this op, can hand
  // them to attn_bwd.
  m.def(
      "attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding, Tensor? attn_mask, "
      "Tensor? q_stop_grad_mask, Tensor? k_stop_grad_mask, Tensor? v_stop_grad_mask, "
      "bool causal, float scale, int num_reason_tokens=0, int reason_window=0, "
      "bool reason_stop_grad=True, Tensor? reason_heads=None) -> (Tensor, Tensor)");
  // Backward with per-element stop-gradient factors for q, k and v (SPEC 2).
  m.def(
      "attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding, Tensor? attn_mask, Tensor? q_stop_grad_mask, "
      "Tensor? k_stop_grad_mask, Tensor? v_stop_grad_mask, bool causal, float scale, "
      "int num_reason_tokens=0, int reason_window=0, bool reason_stop_grad=True, "
      "Tensor? reason_heads=None) -> (Tensor, Tensor, Tensor)");
  // Whether the library was built with its CUDA kernels.
  m.def("compiled_with_cuda() -> bool", []() { return srt::compiled_with_cuda(); });
}
