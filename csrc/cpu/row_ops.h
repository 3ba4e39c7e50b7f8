// Elementwise row operations of the CPU kernels. The float versions are compiled for several
// instruction sets (GCC target_clones picks AVX-512, AVX2 or baseline at load time) and use a
// vectorisable exp; the double versions use std::exp so float64 results stay exact for gradcheck.
#pragma once

#include <cstdint>
#include <limits>

namespace srt::cpu {

// x[j] = exp(x[j] - sub) for j < n; entries equal to -inf become exactly 0. Returns the sum.
float exp_sub_sum(float* x, int64_t n, float sub);
double exp_sub_sum(double* x, int64_t n, double sub);

// x[j] *= a
void scale_row(float* x, int64_t n, float a);
void scale_row(double* x, int64_t n, double a);

// max_j x[j] (-inf for an empty row)
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);

// out[j] = p[j] * (dp[j] - d)
void softmax_grad_row(float* out, const float* p, const float* dp, float d, int64_t n);
void softmax_grad_row(double* out, const double* p, const double* dp, double d, int64_t n);

// out[j] = stop[j] ? 0 : a[j]   (a contiguous bool stop mask)
void stop_row(float* out, const float* a, const bool* stop, int64_t n);
void stop_row(double* out, const double* a, const bool* stop, int64_t n);

// sum_j a[j] * b[j]
float dot_row(const float* a, const float* b, int64_t n);
double dot_row(const double* a, const double* b, int64_t n);

}  // namespace srt::cpu
