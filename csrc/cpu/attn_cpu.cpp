// CPU implementation of self_reasoning_tokens::attn_fwd / attn_bwd.
//
// Flash-style: queries and keys are cut into blocks; the forward keeps a running row max and
// row sum (online softmax) and saves the log-sum-exp, the backward recomputes P block by block
// from it. Only per-thread tiles and O(B*H*N) row statistics are ever allocated: never an
// N x M matrix. Block products run on the BLAS behind at::cpu::mm_out; masks are read through
// their strides (csrc/mask_semantics.h) one tile at a time.
//
// float32 and float64 compute in their own precision; bfloat16/float16 inputs are converted to
// float32 once (O(N) memory) and the results converted back, so accumulation is always fp32+.
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../attn_params.h"
#include "../mask_semantics.h"
#include "row_ops.h"

namespace srt::cpu {
namespace {

// Tile sizes: large enough for the BLAS to run near its peak, small enough that the three
// Bq x Bk fp32 tiles of the backward stay in L2.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;

template <typename T>
at::Tensor wrap(const T* ptr, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(ptr), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// c (rows x cols, contiguous with leading dim ldc) = a @ b, or += when accumulate.
void matmul_into(at::Tensor c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    at::cpu::addmm_out(c, c, a, b);
  } else {
    at::cpu::mm_out(c, a, b);
  }
}

// c = alpha * (a @ b): the scale rides in the GEMM's alpha instead of a second pass over c
// (beta = 0, so c's previous contents are never read, NaN or not). alpha = 0 is the exception:
// a BLAS may then skip the product and write zeros, so that a NaN or inf in a or b would not
// reach c as it does in the reference (0 * NaN = NaN); the product is formed and scaled instead.
void scaled_matmul_into(at::Tensor c, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 0) {
    at::cpu::mm_out(c, a, b);
    c.mul_(0);
  } else {
    at::cpu::addmm_out(c, c, a, b, /*beta=*/0, /*alpha=*/alpha);
  }
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Sets to -inf every score of the tile that the forward attention does not allow.
// s: rows x cols tile (leading dim ld) for query rows i0.. and keys j0.., head (b, h).
template <typename T>
void mask_scores_tile(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t rows,
                      int64_t j0, int64_t cols, T* s, int64_t ld) {
  const bool hard_region = !p.reasoning.stop_grad && p.reasoning.on_head(h);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    T* row = s + r * ld;
    if (p.causal) {
      const int64_t first_hidden = i + p.shift + 1 - j0;  // keys >= this column are in the future
      for (int64_t c = std::max<int64_t>(first_hidden, 0); c < cols; ++c) row[c] = neg_inf<T>();
    }
    if (p.key_padding.present()) {
      const bool* kp = static_cast<const bool*>(p.key_padding.ptr) + b * p.key_padding.sb;
      for (int64_t c = 0; c < cols; ++c)
        if (!kp[(j0 + c) * p.key_padding.sj]) row[c] = neg_inf<T>();
    }
    if (p.attn_mask.present()) {
      const bool* am = static_cast<const bool*>(p.attn_mask.ptr) + p.attn_mask.offset(b, h, i, j0);
      const int64_t sj = p.attn_mask.sj;
      for (int64_t c = 0; c < cols; ++c)
        if (!am[c * sj]) row[c] = neg_inf<T>();
    }
    if (hard_region) {
      int64_t lo, hi;
      region_key_range(p.reasoning, i + p.shift, &lo, &hi);
      lo = std::max(lo, j0);
      hi = std::min(hi, j0 + cols);
      for (int64_t j = lo; j < hi; ++j)
        if (p.reasoning.is_reason(j)) row[j - j0] = neg_inf<T>();
    }
  }
}

// Does any element of the tile need a mask test? (False lets the row loop skip mask_scores_tile.)
bool tile_needs_masking(const AttnParams& p, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                        int64_t cols) {
  if (p.any_mask_in_forward(h)) return true;
  return p.causal && (j0 + cols - 1 > i0 + p.shift);  // the tile crosses the diagonal
}

// Hard mode: is the whole tile hidden by the reasoning region?
bool tile_hidden_by_region(const AttnParams& p, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                           int64_t cols) {
  return !p.reasoning.stop_grad && p.reasoning.on_head(h) &&
         p.reasoning.tile_inside_region(i0 + p.shift, i0 + rows - 1 + p.shift, j0, j0 + cols - 1);
}

// Number of keys any query row in [i0, i0 + rows) may see under causality.
int64_t key_end(const AttnParams& p, int64_t i0, int64_t rows) {
  if (!p.causal) return p.M;
  return std::clamp<int64_t>(i0 + rows - 1 + p.shift + 1, 0, p.M);
}

// dst = F * src over a rows x cols tile (leading dim cols), where F is the stop-gradient factor
// of mask `mv` at (b, h, i0 + r, j0 + c), times the reasoning pattern's 0 on the region for k and
// v (with_region). Returns false, touching nothing, when every factor is 1 (the caller then uses
// src as is). The mask is read through its strides one row at a time; never expanded.
template <typename T>
bool apply_factor_tile(const MaskView& mv, bool with_region, const AttnParams& p, int64_t b,
                       int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols,
                       const T* src, T* dst) {
  // the pattern's region is a band just below the diagonal: most tiles do not meet it
  const bool region = with_region && p.reasoning.stop_grad && p.reasoning.on_head(h) &&
                      tile_may_touch_region(p.reasoning, i0 + p.shift, i0 + rows - 1 + p.shift, j0,
                                            j0 + cols - 1);
  if (!mv.present() && !region) return false;
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * cols;
    T* out = dst + r * cols;
    const int64_t i = i0 + r;
    if (mv.present()) {
      const int64_t base = mv.offset(b, h, i, j0);
      const int64_t sj = mv.sj;
      switch (mv.kind) {  // the type switch stays outside the column loop
        case kBool: {
          const bool* m = static_cast<const bool*>(mv.ptr) + base;
          if (sj == 1) {
            stop_row(out, in, m, cols);
          } else {
            for (int64_t c = 0; c < cols; ++c) out[c] = m[c * sj] ? T(0) : in[c];
          }
          break;
        }
        case kFloat32: {
          const float* m = static_cast<const float*>(mv.ptr) + base;
          for (int64_t c = 0; c < cols; ++c) out[c] = in[c] * static_cast<T>(m[c * sj]);
          break;
        }
        case kFloat64: {
          const double* m = static_cast<const double*>(mv.ptr) + base;
          for (int64_t c = 0; c < cols; ++c) out[c] = in[c] * static_cast<T>(m[c * sj]);
          break;
        }
        default:
          for (int64_t c = 0; c < cols; ++c) out[c] = in[c] * stop_factor_at<T>(mv, base + c * sj);
      }
    } else {
      std::copy(in, in + cols, out);
    }
    if (region) {
      int64_t lo, hi;
      region_key_range(p.reasoning, i + p.shift, &lo, &hi);
      lo = std::max(lo, j0);
      hi = std::min(hi, j0 + cols);
      for (int64_t j = lo; j < hi; ++j)
        if (p.reasoning.is_reason(j)) out[j - j0] = T(0);
    }
  }
  return true;
}

template <typename T>
void forward_kernel(const AttnParams& p, const T* Q, const T* K, const T* V, T* O, T* LSE) {
  const int64_t B = p.B, H = p.H, N = p.N, M = p.M, D = p.D;
  const int64_t nqb = (N + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s_buf(kBlockQ * kBlockK), acc_buf(kBlockQ * D), m_buf(kBlockQ), l_buf(kBlockQ);
    at::Tensor s_t = wrap(s_buf.data(), kBlockQ, kBlockK, kBlockK);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / nqb, qb = idx % nqb;
      const int64_t b = bh / H, h = bh % H;
      const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, N - i0);
      const T* q = Q + (bh * N + i0) * D;
      const T* k = K + bh * M * D;
      const T* v = V + bh * M * D;
      std::fill(acc_buf.begin(), acc_buf.end(), T(0));
      std::fill(m_buf.begin(), m_buf.end(), neg_inf<T>());
      std::fill(l_buf.begin(), l_buf.end(), T(0));
      at::Tensor acc_t = wrap(acc_buf.data(), rows, D, D);
      at::Tensor q_t = wrap(q, rows, D, D);
      const int64_t jend = key_end(p, i0, rows);
      for (int64_t j0 = 0; j0 < jend; j0 += kBlockK) {
        const int64_t cols = std::min(kBlockK, jend - j0);
        if (tile_hidden_by_region(p, h, i0, rows, j0, cols)) continue;
        at::Tensor s = wrap(s_buf.data(), rows, cols, cols);
        scaled_matmul_into(s, q_t, wrap(k + j0 * D, cols, D, D).t(), p.scale);
        T* sp = s_buf.data();
        if (tile_needs_masking(p, h, i0, rows, j0, cols))
          mask_scores_tile(p, b, h, i0, rows, j0, cols, sp, cols);
        for (int64_t r = 0; r < rows; ++r) {
          T* row = sp + r * cols;
          const T m_old = m_buf[r];
          const T m_new = std::max(m_old, row_max(row, cols));
          // Nothing visible to this row yet, unless a score is NaN (a NaN in q or k: max ignores
          // it). Such a row goes on below, so that the NaN reaches its output, lse and gradients
          // as in the reference, instead of passing for a row with no allowed key.
          if (m_new == neg_inf<T>() && !std::any_of(row, row + cols, [](T x) { return std::isnan(x); })) {
            std::fill(row, row + cols, T(0));
            continue;
          }
          const T sum = exp_sub_sum(row, cols, m_new);
          const T alpha = m_old == neg_inf<T>() ? T(0) : std::exp(m_old - m_new);
          if (alpha != T(1)) scale_row(acc_buf.data() + r * D, D, alpha);
          l_buf[r] = l_buf[r] * alpha + sum;
          m_buf[r] = m_new;
        }
        matmul_into(acc_t, s, wrap(v + j0 * D, cols, D, D), true);
      }
      T* o = O + (bh * N + i0) * D;
      T* lse = LSE + bh * N + i0;
      for (int64_t r = 0; r < rows; ++r) {
        if (l_buf[r] == T(0)) {  // a row with no allowed key: zero output, lse = -inf
          std::fill(o + r * D, o + (r + 1) * D, T(0));
          lse[r] = neg_inf<T>();
        } else {
          const T inv = T(1) / l_buf[r];
          for (int64_t d = 0; d < D; ++d) o[r * D + d] = acc_buf[r * D + d] * inv;
          lse[r] = m_buf[r] + std::log(l_buf[r]);
        }
      }
    }
  });
}

// Into how many groups of key tiles the backward splits each (batch, head), so that the B * H * G
// tasks share out evenly over the threads: the G (at most one per key tile, and B * H * G at most
// 4 threads' worth, which bounds the dQ buffers) with the least rounds of tasks per head's work,
// ceil(B * H * G / threads) / G, the smallest such G on ties. One head on 2 threads: 2 groups;
// 3 heads on 2 threads: 2 (3 rounds of half a head instead of 2 of a whole one); as many heads
// as threads, or a multiple: 1.
int64_t backward_key_groups(const AttnParams& p) {
  if (at::in_parallel_region()) return 1;  // nested: the caller's threads are already busy
  const int64_t heads = std::max<int64_t>(p.B * p.H, 1), threads = at::get_num_threads();
  const int64_t key_tiles = std::max<int64_t>((p.M + kBlockK - 1) / kBlockK, 1);
  auto rounds_of = [&](int64_t g) { return (heads * g + threads - 1) / threads; };  // rounds of g tasks
  int64_t best = 1;
  for (int64_t g = 2; g <= key_tiles && heads * g <= 4 * threads; ++g)
    if (rounds_of(g) * best < rounds_of(best) * g) best = g;  // rounds(g)/g < rounds(best)/best
  return best;
}

template <typename T>
void backward_kernel(const AttnParams& p, const T* Q, const T* K, const T* V, const T* O,
                     const T* dO, const T* LSE, T* dQ, T* dK, T* dV) {
  const int64_t B = p.B, H = p.H, N = p.N, M = p.M, D = p.D;
  const T scale = static_cast<T>(p.scale);
  const int64_t tile = kBlockQ * kBlockK;
  // One task per (batch, head, key group); group g owns key tiles g, g + G, g + 2G, ... (so that
  // under causality the groups get about equal work) and their dK and dV rows, so no atomics.
  // With one group the task also owns the head's dQ rows; with several, each task adds its dQ
  // terms into its own N x D buffer (at most one per thread: O(N) memory), and the buffers are
  // summed in group order afterwards, so the result does not depend on the schedule.
  const int64_t G = backward_key_groups(p);
  std::vector<T> dq_parts(G > 1 ? B * H * G * N * D : 0);
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> P(tile), dS(tile), tmp(tile), Drow(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / G, g = task % G;
      const int64_t b = bh / H, h = bh % H;
      const T* q = Q + bh * N * D;
      const T* k = K + bh * M * D;
      const T* v = V + bh * M * D;
      const T* o = O + bh * N * D;
      const T* dout = dO + bh * N * D;
      const T* lse = LSE + bh * N;
      T* dq = G > 1 ? dq_parts.data() + task * N * D : dQ + bh * N * D;
      T* dk = dK + bh * M * D;
      T* dv = dV + bh * M * D;
      std::fill(dq, dq + N * D, T(0));
      for (int64_t j0 = g * kBlockK; j0 < M; j0 += G * kBlockK) {  // this group's dK, dV rows
        const int64_t rows = std::min(kBlockK, M - j0);
        std::fill(dk + j0 * D, dk + (j0 + rows) * D, T(0));
        std::fill(dv + j0 * D, dv + (j0 + rows) * D, T(0));
      }
      for (int64_t i = 0; i < N; ++i) Drow[i] = dot_row(dout + i * D, o + i * D, D);

      for (int64_t i0 = 0; i0 < N; i0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, N - i0);
        at::Tensor q_t = wrap(q + i0 * D, rows, D, D);
        at::Tensor do_t = wrap(dout + i0 * D, rows, D, D);
        at::Tensor dq_t = wrap(dq + i0 * D, rows, D, D);
        const int64_t jend = key_end(p, i0, rows);
        for (int64_t j0 = g * kBlockK; j0 < jend; j0 += G * kBlockK) {
          const int64_t cols = std::min(kBlockK, jend - j0);
          if (tile_hidden_by_region(p, h, i0, rows, j0, cols)) continue;
          at::Tensor k_t = wrap(k + j0 * D, cols, D, D);
          at::Tensor v_t = wrap(v + j0 * D, cols, D, D);
          at::Tensor p_t = wrap(P.data(), rows, cols, cols);
          at::Tensor ds_t = wrap(dS.data(), rows, cols, cols);

          // P = exp(scale * q k^T - lse), zero where not allowed
          scaled_matmul_into(p_t, q_t, k_t.t(), p.scale);
          T* pp = P.data();
          if (tile_needs_masking(p, h, i0, rows, j0, cols))
            mask_scores_tile(p, b, h, i0, rows, j0, cols, pp, cols);
          for (int64_t r = 0; r < rows; ++r) {
            T* row = pp + r * cols;
            if (lse[i0 + r] == neg_inf<T>()) {
              std::fill(row, row + cols, T(0));
            } else {
              exp_sub_sum(row, cols, lse[i0 + r]);
            }
          }

          // dV += (Fv * P)^T dO
          if (apply_factor_tile(p.v_stop, true, p, b, h, i0, rows, j0, cols, pp, tmp.data())) {
            matmul_into(wrap(dv + j0 * D, cols, D, D), wrap(tmp.data(), rows, cols, cols).t(), do_t, true);
          } else {
            matmul_into(wrap(dv + j0 * D, cols, D, D), p_t.t(), do_t, true);
          }

          // dS = P * (dO v^T - D)
          matmul_into(ds_t, do_t, v_t.t(), false);
          T* dsp = dS.data();
          for (int64_t r = 0; r < rows; ++r)
            softmax_grad_row(dsp + r * cols, pp + r * cols, dsp + r * cols, Drow[i0 + r], cols);

          // dQ += (Fq * dS) k      (scale applied once at the end)
          if (apply_factor_tile(p.q_stop, false, p, b, h, i0, rows, j0, cols, dsp, tmp.data())) {
            matmul_into(dq_t, wrap(tmp.data(), rows, cols, cols), k_t, true);
          } else {
            matmul_into(dq_t, ds_t, k_t, true);
          }

          // dK += (Fk * dS)^T q
          if (apply_factor_tile(p.k_stop, true, p, b, h, i0, rows, j0, cols, dsp, tmp.data())) {
            matmul_into(wrap(dk + j0 * D, cols, D, D), wrap(tmp.data(), rows, cols, cols).t(), q_t, true);
          } else {
            matmul_into(wrap(dk + j0 * D, cols, D, D), ds_t.t(), q_t, true);
          }
        }
      }
      if (G == 1) scale_row(dq, N * D, scale);
      for (int64_t j0 = g * kBlockK; j0 < M; j0 += G * kBlockK)
        scale_row(dk + j0 * D, std::min(kBlockK, M - j0) * D, scale);
    }
  });
  if (G > 1) {  // dQ = scale * (sum of the groups' terms, in group order)
    at::parallel_for(0, B * H * N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bh = row / N, i = row % N;
        T* out = dQ + row * D;
        std::fill(out, out + D, T(0));
        for (int64_t g = 0; g < G; ++g) {
          const T* part = dq_parts.data() + ((bh * G + g) * N + i) * D;
          for (int64_t d = 0; d < D; ++d) out[d] += part[d];
        }
        scale_row(out, D, scale);
      }
    });
  }
}

// Float32 working copy for reduced-precision inputs; the tensor itself otherwise.
at::Tensor working(const at::Tensor& t) {
  if (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf)
    return t.to(at::kFloat).contiguous();
  return t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> attn_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& q_stop, const std::optional<at::Tensor>& k_stop,
    const std::optional<at::Tensor>& v_stop, bool causal, double scale, int64_t num_reason_tokens,
    int64_t reason_window, bool reason_stop_grad, const std::optional<at::Tensor>& reason_heads) {
  AttnParams p = make_params(q, k, v, key_padding, attn_mask, q_stop, k_stop, v_stop, causal,
                             scale, num_reason_tokens, reason_window, reason_stop_grad,
                             reason_heads);
  at::Tensor qw = working(q), kw = working(k), vw = working(v);
  at::Tensor out = at::empty_like(qw);
  at::Tensor lse = at::empty({p.B, p.H, p.N}, qw.options().dtype(lse_dtype(q.scalar_type())));
  if (lse.numel() > 0 && p.M > 0) {  // head_dim 0 included: its scores are 0, its lse log(#allowed)
    AT_DISPATCH_FLOATING_TYPES(qw.scalar_type(), "attn_fwd_cpu", [&] {
      forward_kernel<scalar_t>(p, qw.data_ptr<scalar_t>(), kw.data_ptr<scalar_t>(),
                               vw.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                               lse.data_ptr<scalar_t>());
    });
  } else {  // no keys at all: every row is fully masked
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& q_stop,
    const std::optional<at::Tensor>& k_stop, const std::optional<at::Tensor>& v_stop, bool causal,
    double scale, int64_t num_reason_tokens, int64_t reason_window, bool reason_stop_grad,
    const std::optional<at::Tensor>& reason_heads) {
  AttnParams p = make_backward_params(grad_out, q, k, v, out, lse, key_padding, attn_mask,
                                      q_stop, k_stop, v_stop, causal, scale, num_reason_tokens,
                                      reason_window, reason_stop_grad, reason_heads);
  at::Tensor qw = working(q), kw = working(k), vw = working(v), ow = working(out),
             dow = working(grad_out), lw = lse.contiguous();
  at::Tensor dq = at::empty_like(qw), dk = at::empty_like(kw), dv = at::empty_like(vw);
  if (qw.numel() > 0 && kw.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(qw.scalar_type(), "attn_bwd_cpu", [&] {
      backward_kernel<scalar_t>(p, qw.data_ptr<scalar_t>(), kw.data_ptr<scalar_t>(),
                                vw.data_ptr<scalar_t>(), ow.data_ptr<scalar_t>(),
                                dow.data_ptr<scalar_t>(), lw.data_ptr<scalar_t>(),
                                dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                                dv.data_ptr<scalar_t>());
    });
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(self_reasoning_tokens, CPU, m) {
  m.impl("attn_fwd", &attn_fwd_cpu);
  m.impl("attn_bwd", &attn_bwd_cpu);
}

}  // namespace srt::cpu
