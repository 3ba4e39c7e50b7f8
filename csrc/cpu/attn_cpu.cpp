// CPU implementation of self_reasoning_tokens::attn_fwd / attn_bwd.
//
// Flash-style: queries and keys are cut into blocks; the forward keeps a running row max and
// row sum (online softmax) and saves the log-sum-exp, the backward recomputes P block by block
// from it. Only per-thread tiles and O(B*H*N) row statistics are ever allocated: never an
// N x M matrix. Block products run on the BLAS behind at::cpu::mm_out; masks are read through
// their strides (csrc/mask_semantics.h) one tile at a time.
//
// float32 and float64 compute in their own precision. bfloat16/float16 compute in float32, so
// accumulation is always fp32+: each thread converts the query block it works on, and (backward)
// the key tiles of its task, into float32 buffers and writes its results back converted. The
// forward reads every key of a head for each query block: it converts a whole head of k and v
// per thread when there are more (batch, head)s than threads, else one float32 copy of k and v
// that the threads share (half_types_per_thread).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
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

// A buffer of n T's from PyTorch's CPU allocator, 64-byte aligned like tensor memory: the block
// products then see the same operand alignment whether they read a tensor or a buffer, so a BLAS
// whose results depend on alignment (MKL outside its reproducibility mode) gives the half types'
// float32 computation exactly the numbers of the float32 op.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { resize(n); }
  void resize(int64_t n) {  // at least n elements
    if (!t_.defined() || t_.numel() < n) {
      t_ = at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
      ptr_ = t_.data_ptr<T>();
    }
  }
  T* data() const { return ptr_; }
  T& operator[](int64_t i) const { return ptr_[i]; }

 private:
  at::Tensor t_;
  T* ptr_ = nullptr;
};

// dst[i] = src[i] converted to T.
template <typename T, typename In>
void convert_rows(const In* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// One (batch, head)'s rows of an input in the compute type T. When the input already holds T
// this is its own memory; otherwise (bfloat16/float16 inputs) the head is converted into a
// buffer owned by the calling thread, once per head in a row of calls for the same head.
template <typename T, typename In>
class HeadRows {
 public:
  HeadRows(const In* data, int64_t rows_per_head, int64_t D) : data_(data), size_(rows_per_head * D) {}

  const T* head(int64_t bh) {
    const In* src = data_ + bh * size_;
    if constexpr (std::is_same_v<T, In>) {
      return src;
    } else {
      if (bh != cached_) {
        buf_.resize(size_);
        convert_rows(src, size_, buf_.data());
        cached_ = bh;
      }
      return buf_.data();
    }
  }

 private:
  const In* data_;
  int64_t size_;
  int64_t cached_ = -1;
  Buffer<T> buf_;
};

// Where gradient rows (a query block's dQ, a key group's packed dK/dV, a row of the G > 1 dQ sum)
// accumulate in T: the output itself when it holds T, else a per-thread buffer of at least
// `size` elements that store_rows later converts into the output.
template <typename T, typename In>
T* accumulator(In* out, Buffer<T>& buf, int64_t size) {
  if constexpr (std::is_same_v<T, In>) {
    return out;
  } else {
    buf.resize(size);
    return buf.data();
  }
}

// dst[i] = src[i] converted, when accumulator() gave a buffer (nothing to do otherwise).
template <typename T, typename In>
void store_rows(const T* src, In* dst, int64_t n) {
  if constexpr (!std::is_same_v<T, In>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<In>(src[i]);
  }
}

// n elements of an input in T: its own memory when it holds T, else converted into buf.
template <typename T, typename In>
const T* in_compute_type(const In* src, int64_t n, Buffer<T>& buf) {
  if constexpr (std::is_same_v<T, In>) {
    return src;
  } else {
    buf.resize(n);
    convert_rows(src, n, buf.data());
    return buf.data();
  }
}

// T: the compute type; In: the type of q and out (T, or bfloat16/float16 with T = float); KV: the
// type of k and v (In, or T when the caller converted them).
template <typename T, typename In, typename KV>
void forward_kernel(const AttnParams& p, const In* Q, const KV* K, const KV* V, In* O, T* LSE) {
  const int64_t B = p.B, H = p.H, N = p.N, M = p.M, D = p.D;
  const int64_t nqb = (N + kBlockQ - 1) / kBlockQ;
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> s_buf(kBlockQ * kBlockK), acc_buf(kBlockQ * D), q_buf;
    std::vector<T> m_buf(kBlockQ), l_buf(kBlockQ);
    HeadRows<T, KV> k_rows(K, M, D), v_rows(V, M, D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / nqb, qb = idx % nqb;
      const int64_t b = bh / H, h = bh % H;
      const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, N - i0);
      const T* q = in_compute_type(Q + (bh * N + i0) * D, rows * D, q_buf);
      const T* k = k_rows.head(bh);
      const T* v = v_rows.head(bh);
      std::fill(acc_buf.data(), acc_buf.data() + kBlockQ * D, T(0));
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
      In* o = O + (bh * N + i0) * D;
      T* lse = LSE + bh * N + i0;
      for (int64_t r = 0; r < rows; ++r) {
        if (l_buf[r] == T(0)) {  // a row with no allowed key: zero output, lse = -inf
          std::fill(o + r * D, o + (r + 1) * D, In(0));
          lse[r] = neg_inf<T>();
        } else {
          const T inv = T(1) / l_buf[r];
          for (int64_t d = 0; d < D; ++d) o[r * D + d] = static_cast<In>(acc_buf[r * D + d] * inv);
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

// T: the compute type; In: the tensors' type (T, or bfloat16/float16 with T = float).
template <typename T, typename In>
void backward_kernel(const AttnParams& p, const In* Q, const In* K, const In* V, const In* O,
                     const In* dO, const T* LSE, In* dQ, In* dK, In* dV) {
  const int64_t B = p.B, H = p.H, N = p.N, M = p.M, D = p.D;
  const T scale = static_cast<T>(p.scale);
  const int64_t tile = kBlockQ * kBlockK;
  // One task per (batch, head, key group); group g owns key tiles g, g + G, g + 2G, ... (so that
  // under causality the groups get about equal work) and their dK and dV rows, so no atomics.
  // With one group the task also owns the head's dQ rows; with several, each task adds its dQ
  // terms into its own N x D buffer (at most one per thread: O(N) memory), and the buffers are
  // summed in group order afterwards, so the result does not depend on the schedule.
  // Reduced-precision tensors are read through per-thread float32 copies of the query block
  // (q, dO, a row of O at a time) and of the task's own key tiles (k, v, packed: tile t of the
  // group at row t * kBlockK), and gradients accumulate in per-thread float32 rows converted
  // when they are complete: a query block's dQ after its key tiles, the group's dK and dV at
  // the end of the task.
  constexpr bool kConvert = !std::is_same_v<T, In>;
  const int64_t G = backward_key_groups(p);
  Buffer<T> dq_parts(G > 1 ? B * H * G * N * D : 0);
  at::parallel_for(0, B * H * G, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> P(tile), dS(tile), tmp(tile), q_buf, do_buf, o_row, dq_buf, k_buf, v_buf, dk_buf, dv_buf;
    std::vector<T> Drow(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / G, g = task % G;
      const int64_t b = bh / H, h = bh % H;
      const T* lse = LSE + bh * N;
      // Row of key j0 (the first of one of this group's tiles) in k, v, dk and dv below: the
      // head's own rows, or the packed per-thread copies.
      auto slot = [&](int64_t j0) { return kConvert ? (j0 / kBlockK - g) / G * kBlockK : j0; };
      const int64_t packed_rows = kConvert ? ((M + kBlockK - 1) / kBlockK - g + G - 1) / G * kBlockK : M;
      const T* k = nullptr;
      const T* v = nullptr;
      if constexpr (kConvert) {
        k_buf.resize(packed_rows * D);
        v_buf.resize(packed_rows * D);
        k = k_buf.data();
        v = v_buf.data();
      } else {
        k = K + bh * M * D;
        v = V + bh * M * D;
      }
      T* dk = accumulator(dK + bh * M * D, dk_buf, packed_rows * D);
      T* dv = accumulator(dV + bh * M * D, dv_buf, packed_rows * D);
      for (int64_t j0 = g * kBlockK; j0 < M; j0 += G * kBlockK) {  // this group's k, v, dK, dV rows
        const int64_t n = std::min(kBlockK, M - j0) * D, off = slot(j0) * D;
        if constexpr (kConvert) {
          convert_rows(K + (bh * M + j0) * D, n, k_buf.data() + off);
          convert_rows(V + (bh * M + j0) * D, n, v_buf.data() + off);
        }
        std::fill(dk + off, dk + off + n, T(0));
        std::fill(dv + off, dv + off + n, T(0));
      }

      for (int64_t i0 = 0; i0 < N; i0 += kBlockQ) {
        const int64_t rows = std::min(kBlockQ, N - i0);
        const T* q = in_compute_type(Q + (bh * N + i0) * D, rows * D, q_buf);
        const T* dout = in_compute_type(dO + (bh * N + i0) * D, rows * D, do_buf);
        for (int64_t r = 0; r < rows; ++r)
          Drow[r] = dot_row(dout + r * D, in_compute_type(O + (bh * N + i0 + r) * D, D, o_row), D);
        T* dq = G > 1 ? dq_parts.data() + (task * N + i0) * D
                      : accumulator(dQ + (bh * N + i0) * D, dq_buf, rows * D);
        std::fill(dq, dq + rows * D, T(0));
        at::Tensor q_t = wrap(q, rows, D, D);
        at::Tensor do_t = wrap(dout, rows, D, D);
        at::Tensor dq_t = wrap(dq, rows, D, D);
        const int64_t jend = key_end(p, i0, rows);
        for (int64_t j0 = g * kBlockK; j0 < jend; j0 += G * kBlockK) {
          const int64_t cols = std::min(kBlockK, jend - j0), off = slot(j0) * D;
          if (tile_hidden_by_region(p, h, i0, rows, j0, cols)) continue;
          at::Tensor k_t = wrap(k + off, cols, D, D);
          at::Tensor v_t = wrap(v + off, cols, D, D);
          at::Tensor dk_t = wrap(dk + off, cols, D, D);
          at::Tensor dv_t = wrap(dv + off, cols, D, D);
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
            matmul_into(dv_t, wrap(tmp.data(), rows, cols, cols).t(), do_t, true);
          } else {
            matmul_into(dv_t, p_t.t(), do_t, true);
          }

          // dS = P * (dO v^T - D)
          matmul_into(ds_t, do_t, v_t.t(), false);
          T* dsp = dS.data();
          for (int64_t r = 0; r < rows; ++r)
            softmax_grad_row(dsp + r * cols, pp + r * cols, dsp + r * cols, Drow[r], cols);

          // dQ += (Fq * dS) k      (scale applied once at the end)
          if (apply_factor_tile(p.q_stop, false, p, b, h, i0, rows, j0, cols, dsp, tmp.data())) {
            matmul_into(dq_t, wrap(tmp.data(), rows, cols, cols), k_t, true);
          } else {
            matmul_into(dq_t, ds_t, k_t, true);
          }

          // dK += (Fk * dS)^T q
          if (apply_factor_tile(p.k_stop, true, p, b, h, i0, rows, j0, cols, dsp, tmp.data())) {
            matmul_into(dk_t, wrap(tmp.data(), rows, cols, cols).t(), q_t, true);
          } else {
            matmul_into(dk_t, ds_t.t(), q_t, true);
          }
        }
        if (G == 1) {  // this block's dQ rows are complete
          scale_row(dq, rows * D, scale);
          store_rows(dq, dQ + (bh * N + i0) * D, rows * D);
        }
      }
      for (int64_t j0 = g * kBlockK; j0 < M; j0 += G * kBlockK) {
        const int64_t n = std::min(kBlockK, M - j0) * D, off = slot(j0) * D;
        scale_row(dk + off, n, scale);
        store_rows(dk + off, dK + (bh * M + j0) * D, n);
        store_rows(dv + off, dV + (bh * M + j0) * D, n);
      }
    }
  });
  if (G > 1) {  // dQ = scale * (sum of the groups' terms, in group order)
    at::parallel_for(0, B * H * N, 64, [&](int64_t begin, int64_t end) {
      Buffer<T> row_buf;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bh = row / N, i = row % N;
        T* out = accumulator(dQ + row * D, row_buf, D);
        std::fill(out, out + D, T(0));
        for (int64_t g = 0; g < G; ++g) {
          const T* part = dq_parts.data() + ((bh * G + g) * N + i) * D;
          for (int64_t d = 0; d < D; ++d) out[d] += part[d];
        }
        scale_row(out, D, scale);
        store_rows(out, dQ + row * D, D);
      }
    });
  }
}

// The bfloat16/float16 forward reads k and v in float32 in one of two ways that give the same
// numbers: with more (batch, head)s than threads, each thread converts the head it works on
// (HeadRows: a few heads per thread); otherwise those per-thread copies would outnumber the heads
// themselves, and one float32 copy of k and v, shared by the threads, costs less.
bool half_types_per_thread(const AttnParams& p) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  return threads < p.B * p.H;
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
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({p.B, p.H, p.N}, qc.options().dtype(lse_dtype(q.scalar_type())));
  if (lse.numel() == 0 || p.M == 0) {  // no query rows, or no keys: every row is fully masked
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  // head_dim 0 runs too: its scores are 0, its lse log(#allowed)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attn_fwd_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    if (std::is_same_v<T, scalar_t> || half_types_per_thread(p)) {
      forward_kernel<T, scalar_t, scalar_t>(p, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                            vc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                            lse.data_ptr<T>());
    } else {
      const at::Tensor k32 = kc.to(at::kFloat), v32 = vc.to(at::kFloat);
      forward_kernel<T, scalar_t, T>(p, qc.data_ptr<scalar_t>(), k32.data_ptr<T>(), v32.data_ptr<T>(),
                                     out.data_ptr<scalar_t>(), lse.data_ptr<T>());
    }
  });
  return {out, lse};
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
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(),
                   oc = out.contiguous(), doc = grad_out.contiguous(), lc = lse.contiguous();
  at::Tensor dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  if (qc.numel() == 0 || kc.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attn_bwd_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    backward_kernel<T, scalar_t>(p, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(),
                                 vc.data_ptr<scalar_t>(), oc.data_ptr<scalar_t>(),
                                 doc.data_ptr<scalar_t>(), lc.data_ptr<T>(), dq.data_ptr<scalar_t>(),
                                 dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(self_reasoning_tokens, CPU, m) {
  m.impl("attn_fwd", &attn_fwd_cpu);
  m.impl("attn_bwd", &attn_bwd_cpu);
}

}  // namespace srt::cpu
