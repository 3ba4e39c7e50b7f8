#pragma once
#include <c10/util/Half.h>
#include <cstdint>
struct __half { uint16_t bits; };
inline float __half2float(__half h) { return static_cast<float>(c10::Half(h.bits, c10::Half::from_bits())); }
inline __half __float2half_rn(float x) { __half h; h.bits = c10::Half(x).x; return h; }
