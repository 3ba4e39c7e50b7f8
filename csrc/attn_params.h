// Plain parameter struct that every kernel (CPU and CUDA) reads, and the one function that
// checks the op's arguments and packs them. Kernels never see at::Tensor masks, only MaskViews.
#pragma once

#include <torch/types.h>

#include "mask_semantics.h"

namespace srt {

struct AttnParams {
  int64_t B = 0, H = 0, N = 0, M = 0, D = 0;  // q (B,H,N,D); k, v (B,H,M,D)
  double scale = 1.0;
  bool causal = false;
  int64_t shift = 0;  // M - N: absolute position of query row i is i + shift
  MaskView key_padding;  // (B, M) bool, True = real key
  MaskView attn_mask;    // (B, H, N, M) bool view, True = may attend
  MaskView q_stop, k_stop, v_stop;  // (B, H, N, M) views: bool (True = stop) or floating factors
  ReasoningSpec reasoning;

  bool any_mask_in_forward(int64_t h) const {
    return key_padding.present() || attn_mask.present() ||
           (!reasoning.stop_grad && reasoning.on_head(h));
  }
};

// Validates shapes/dtypes/devices of q, k, v and the forward masks, and packs them.
// `heads_holder` keeps an owned copy of the reasoning head flags alive for the kernel.
AttnParams make_forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_padding,
                               const std::optional<at::Tensor>& attn_mask, bool causal,
                               double scale, int64_t num_reason_tokens, int64_t reason_window,
                               bool reason_stop_grad,
                               const std::optional<at::Tensor>& reason_heads);

// Adds the three stop-gradient masks to params made by make_forward_params.
void add_stop_masks(AttnParams& p, const at::Tensor& q,
                    const std::optional<at::Tensor>& q_stop,
                    const std::optional<at::Tensor>& k_stop,
                    const std::optional<at::Tensor>& v_stop);

// Checks the saved tensors handed to a backward kernel.
void check_backward_inputs(const AttnParams& p, const at::Tensor& dout, const at::Tensor& q,
                           const at::Tensor& out, const at::Tensor& lse);

// The op-level entry points used by every implementation: all of the above in one call.
// Forward: q, k, v, the forward masks and (checked, for the backward's sake) the stop masks.
AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& key_padding,
                       const std::optional<at::Tensor>& attn_mask,
                       const std::optional<at::Tensor>& q_stop,
                       const std::optional<at::Tensor>& k_stop,
                       const std::optional<at::Tensor>& v_stop, bool causal, double scale,
                       int64_t num_reason_tokens, int64_t reason_window, bool reason_stop_grad,
                       const std::optional<at::Tensor>& reason_heads);
// Backward: the same plus the saved tensors grad_out, out and lse.
AttnParams make_backward_params(const at::Tensor& grad_out, const at::Tensor& q,
                                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse,
                                const std::optional<at::Tensor>& key_padding,
                                const std::optional<at::Tensor>& attn_mask,
                                const std::optional<at::Tensor>& q_stop,
                                const std::optional<at::Tensor>& k_stop,
                                const std::optional<at::Tensor>& v_stop, bool causal,
                                double scale, int64_t num_reason_tokens, int64_t reason_window,
                                bool reason_stop_grad,
                                const std::optional<at::Tensor>& reason_heads);

// dtype of the saved log-sum-exp: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType lse_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace srt
