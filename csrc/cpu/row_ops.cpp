#include "row_ops.h"

#include <cmath>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// One body, three machine-code versions; the loader picks the best the CPU supports. Each string
// is one clone: "avx2,fma" would be two clones, AVX2 without FMA and FMA without AVX2, so the
// AVX2 level is named as the x86-64-v3 ISA level (AVX2 + FMA; GCC 12 and newer; plain AVX2
// before). The loops only vectorise for AVX2 because setup.py compiles with -fno-trapping-math
// (as PyTorch itself is): without it GCC keeps exp_approx's clamps as branches (AVX-512 has
// masked moves, AVX2 not).
#if __GNUC__ >= 12
#define SRT_AVX2_CLONE "arch=x86-64-v3"
#else
#define SRT_AVX2_CLONE "avx2"
#endif
#define SRT_CLONES __attribute__((target_clones("avx512f", SRT_AVX2_CLONE, "default")))
#else
#define SRT_CLONES
#endif

namespace srt::cpu {
namespace {

// exp(x) for float with ~1-2 ulp error, written without branches or library calls so that
// GCC vectorises the loops that use it. Range reduction x = k*ln2 + r with |r| <= ln2/2,
// then a degree-6 polynomial for exp(r) (the classic minimax coefficients), scaled by 2^k.
// Inputs below -87.3 (including -inf) give exactly 0.
inline float exp_approx(float x) {
  const bool tiny = x < -87.3f;
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  // round(x / ln2) by the 1.5 * 2^23 trick (valid for |x| < 2^22, round-to-nearest mode)
  const float magic = 12582912.0f;
  float k = (x * 1.44269504088896341f + magic) - magic;
  float r = x - k * 0.693359375f;
  r = r - k * (-2.12194440e-4f);
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  int32_t ki = static_cast<int32_t>(k);
  int32_t bits = (ki + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  y = y * pow2;
  return tiny ? 0.0f : y;
}

}  // namespace

SRT_CLONES float exp_sub_sum(float* x, int64_t n, float sub) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_approx(x[j] - sub);
    x[j] = e;
    sum += e;
  }
  return sum;
}

double exp_sub_sum(double* x, int64_t n, double sub) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double e = std::isinf(x[j]) && x[j] < 0 ? 0.0 : std::exp(x[j] - sub);
    x[j] = e;
    sum += e;
  }
  return sum;
}

SRT_CLONES void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}
void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

SRT_CLONES float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}
double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

SRT_CLONES void softmax_grad_row(float* out, const float* p, const float* dp, float d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] * (dp[j] - d);
}
void softmax_grad_row(double* out, const double* p, const double* dp, double d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = p[j] * (dp[j] - d);
}

SRT_CLONES void stop_row(float* out, const float* a, const bool* stop, int64_t n) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(stop);
  for (int64_t j = 0; j < n; ++j) out[j] = s[j] ? 0.0f : a[j];
}
void stop_row(double* out, const double* a, const bool* stop, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = stop[j] ? 0.0 : a[j];
}

SRT_CLONES float dot_row(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}
double dot_row(const double* a, const double* b, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace srt::cpu
