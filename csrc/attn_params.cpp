// Argument checks and parameter packing shared by the CPU and CUDA implementations.
// The Python wrapper validates first with friendlier messages; these checks protect callers
// who use torch.ops.self_reasoning_tokens.* directly.
#include "attn_params.h"

namespace srt {
namespace {

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q must have shape (batch, heads, n, head_dim); got ", q.dim(), " dims");
  TORCH_CHECK(k.dim() == 4, "k must have shape (batch, heads, m, head_dim); got ", k.dim(), " dims");
  TORCH_CHECK(v.dim() == 4, "v must have shape (batch, heads, m, head_dim); got ", v.dim(), " dims");
  TORCH_CHECK(q.is_floating_point(), "q must be a floating tensor, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share a dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(),
              "q, k and v must be on one device; got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "k and v must have q's batch size ",
              q.size(0));
  TORCH_CHECK(k.size(1) == q.size(1) && v.size(1) == q.size(1), "k and v must have q's head count ",
              q.size(1));
  TORCH_CHECK(k.size(3) == q.size(3) && v.size(3) == q.size(3), "k and v must have q's head_dim ",
              q.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "v must have as many positions as k (", k.size(2), "), got ",
              v.size(2));
}

int32_t kind_of(at::ScalarType t) {
  switch (t) {
    case at::kBool: return kBool;
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default: return kNone;
  }
}

// A (B,H,N,M) strided view of a broadcastable mask; no memory is expanded.
MaskView view4(const char* name, const std::optional<at::Tensor>& mask, const at::Tensor& q,
               int64_t B, int64_t H, int64_t N, int64_t M, bool bool_only) {
  MaskView mv;
  if (!mask.has_value() || !mask->defined()) return mv;
  const at::Tensor& t = *mask;
  TORCH_CHECK(t.device() == q.device(), name, " must be on q's device ", q.device(), ", got ", t.device());
  if (bool_only) {
    TORCH_CHECK(t.scalar_type() == at::kBool, name, " must be a bool tensor (True = may attend), got ",
                t.scalar_type());
  } else {
    TORCH_CHECK(kind_of(t.scalar_type()) != kNone, name,
                " must be bool (True = stop gradient) or floating (a gradient factor), got ",
                t.scalar_type());
  }
  TORCH_CHECK(t.dim() <= 4, name, " must broadcast to (batch, heads, n, m) = (", B, ", ", H, ", ", N,
              ", ", M, "); got shape ", t.sizes());
  const std::vector<int64_t> full{B, H, N, M};
  const int64_t off = 4 - t.dim();
  for (int64_t d = 0; d < t.dim(); ++d) {
    TORCH_CHECK(t.size(d) == 1 || t.size(d) == full[off + d], name,
                " must broadcast to (batch, heads, n, m) = (", B, ", ", H, ", ", N, ", ", M,
                "); got shape ", t.sizes());
  }
  at::Tensor e = t.expand({B, H, N, M});  // a view: broadcast dims get stride 0
  mv.ptr = e.data_ptr();
  mv.kind = kind_of(t.scalar_type());
  mv.sb = e.stride(0);
  mv.sh = e.stride(1);
  mv.si = e.stride(2);
  mv.sj = e.stride(3);
  return mv;
}

}  // namespace

AttnParams make_forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_padding,
                               const std::optional<at::Tensor>& attn_mask, bool causal,
                               double scale, int64_t num_reason_tokens, int64_t reason_window,
                               bool reason_stop_grad,
                               const std::optional<at::Tensor>& reason_heads) {
  check_qkv(q, k, v);
  AttnParams p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.N = q.size(2);
  p.M = k.size(2);
  p.D = q.size(3);
  p.scale = scale;
  p.causal = causal;
  p.shift = p.M - p.N;
  if (key_padding.has_value() && key_padding->defined()) {
    const at::Tensor& kp = *key_padding;
    TORCH_CHECK(kp.device() == q.device(), "mask must be on q's device ", q.device());
    TORCH_CHECK(kp.scalar_type() == at::kBool, "mask (key padding) must be a bool tensor (True = real key), got ",
                kp.scalar_type());
    TORCH_CHECK(kp.dim() == 2 && (kp.size(0) == p.B || kp.size(0) == 1) && kp.size(1) == p.M,
                "mask (key padding) must have shape (batch, m) = (", p.B, ", ", p.M, "), got ", kp.sizes());
    at::Tensor e = kp.expand({p.B, p.M});
    p.key_padding.ptr = e.data_ptr();
    p.key_padding.kind = kBool;
    p.key_padding.sb = e.stride(0);
    p.key_padding.sj = e.stride(1);
  }
  p.attn_mask = view4("attn_mask", attn_mask, q, p.B, p.H, p.N, p.M, /*bool_only=*/true);
  TORCH_CHECK(num_reason_tokens >= 0, "num_reason_tokens must be >= 0, got ", num_reason_tokens);
  TORCH_CHECK(reason_window >= 0, "num_steps_future_can_use_reason must be >= 0, got ", reason_window);
  p.reasoning.num_reason = num_reason_tokens;
  p.reasoning.window = reason_window;
  p.reasoning.stop_grad = reason_stop_grad;
  if (reason_heads.has_value() && reason_heads->defined()) {
    const at::Tensor& rh = *reason_heads;
    TORCH_CHECK(rh.scalar_type() == at::kBool && rh.dim() == 1 && rh.size(0) == p.H,
                "reasoning heads must be a bool tensor of shape (heads,) = (", p.H, ",), got ",
                rh.scalar_type(), " ", rh.sizes());
    TORCH_CHECK(rh.device() == q.device() && rh.is_contiguous(),
                "reasoning heads must be a contiguous tensor on q's device");
    p.reasoning.heads = rh.data_ptr<bool>();
  }
  return p;
}

void add_stop_masks(AttnParams& p, const at::Tensor& q, const std::optional<at::Tensor>& q_stop,
                    const std::optional<at::Tensor>& k_stop,
                    const std::optional<at::Tensor>& v_stop) {
  p.q_stop = view4("q_stop_grad_mask", q_stop, q, p.B, p.H, p.N, p.M, false);
  p.k_stop = view4("k_stop_grad_mask", k_stop, q, p.B, p.H, p.N, p.M, false);
  p.v_stop = view4("v_stop_grad_mask", v_stop, q, p.B, p.H, p.N, p.M, false);
}

void check_backward_inputs(const AttnParams& p, const at::Tensor& dout, const at::Tensor& q,
                           const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "grad_out and out must have q's shape ", q.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "grad_out and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "grad_out, out and lse must be on q's device");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == p.B && lse.size(1) == p.H && lse.size(2) == p.N,
              "lse must have shape (batch, heads, n) = (", p.B, ", ", p.H, ", ", p.N, "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q.scalar_type()), "lse must be ",
              lse_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs, got ", lse.scalar_type());
}

AttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& key_padding,
                       const std::optional<at::Tensor>& attn_mask,
                       const std::optional<at::Tensor>& q_stop,
                       const std::optional<at::Tensor>& k_stop,
                       const std::optional<at::Tensor>& v_stop, bool causal, double scale,
                       int64_t num_reason_tokens, int64_t reason_window, bool reason_stop_grad,
                       const std::optional<at::Tensor>& reason_heads) {
  AttnParams p = make_forward_params(q, k, v, key_padding, attn_mask, causal, scale,
                                     num_reason_tokens, reason_window, reason_stop_grad,
                                     reason_heads);
  add_stop_masks(p, q, q_stop, k_stop, v_stop);  // bad masks fail before any work
  return p;
}

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
                                const std::optional<at::Tensor>& reason_heads) {
  AttnParams p = make_params(q, k, v, key_padding, attn_mask, q_stop, k_stop, v_stop, causal,
                             scale, num_reason_tokens, reason_window, reason_stop_grad,
                             reason_heads);
  check_backward_inputs(p, grad_out, q, out, lse);
  return p;
}

}  // namespace srt
