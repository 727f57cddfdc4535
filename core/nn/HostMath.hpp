// HostMath.hpp: exp and erf for float32 written as straight-line arithmetic
// (polynomials, integer selects on the bit patterns, no branches and no libm
// calls), so that host compilers vectorise the loops that call them: softmax,
// GELU and its derivative. libm's expf and erff are scalar calls and were the
// largest cost of those loops.
//
// Accuracy (checked in tests/tstNN.hpp against float64 std::exp / std::erf):
//   exp: relative error < 2e-7 for x in [-87, 88] (x < -87 gives exp(-87));
//   erf: relative error < 3e-7 everywhere (|x| >= 4 gives +-1).
// nn::exp_of / nn::erf_of use them for float32 on host backends only; float64
// and device backends call the library functions (compat::exp, compat::erf).
#pragma once

#include "core/Compat.hpp"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace hexamoe {
namespace nn {
namespace fastmath {

KOKKOS_INLINE_FUNCTION std::uint32_t bits_of(float x) {
  std::uint32_t u;
  memcpy(&u, &x, sizeof(u));
  return u;
}
KOKKOS_INLINE_FUNCTION float float_of(std::uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

// exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by its
// Taylor polynomial of degree 7 (truncation < 6e-9 relative).
KOKKOS_INLINE_FUNCTION float exp(float x) {
  // Clamp below at -87 with an unsigned compare of the bits: negative floats
  // order as their bit patterns do (a float compare here blocks vectorisation).
  std::uint32_t u = bits_of(x);
  u = u > 0xC2AE0000u ? 0xC2AE0000u : u;
  x = float_of(u);
  float const n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float const r = (x - n * 0.693359375f) + n * 2.12194440e-4f;               // x - n ln 2 in two parts
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * float_of(static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23);
}

// erf: for |x| < 1 its Maclaurin series (to x^21), for 1 <= |x| <= 4
// Abramowitz & Stegun 7.1.26, 1 - (a1 t + ... + a5 t^5) exp(-x^2) with
// t = 1 / (1 + p |x|); the sign is copied from x.
KOKKOS_INLINE_FUNCTION float erf(float x) {
  std::uint32_t const ux = bits_of(x);
  std::uint32_t ua = ux & 0x7FFFFFFFu;
  ua = ua > 0x40800000u ? 0x40800000u : ua;  // |x| clamped to 4 (erf(4) = 1 in float)
  float const a = float_of(ua), a2 = a * a;
  // sum_k (-1)^k a^2k / (k! (2k + 1)), k = 10 .. 0
  float s = 1.0f / (3628800.0f * 21.0f);
  s = s * a2 - 1.0f / (362880.0f * 19.0f);
  s = s * a2 + 1.0f / (40320.0f * 17.0f);
  s = s * a2 - 1.0f / (5040.0f * 15.0f);
  s = s * a2 + 1.0f / (720.0f * 13.0f);
  s = s * a2 - 1.0f / (120.0f * 11.0f);
  s = s * a2 + 1.0f / (24.0f * 9.0f);
  s = s * a2 - 1.0f / (6.0f * 7.0f);
  s = s * a2 + 1.0f / (2.0f * 5.0f);
  s = s * a2 - 1.0f / 3.0f;
  s = s * a2 + 1.0f;
  float const small = 1.12837916709551257f * a * s;  // 2 / sqrt(pi)
  float const t = 1.0f / (1.0f + 0.3275911f * a);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  float const large = 1.0f - q * t * exp(-a2);
  std::uint32_t const use_small = ua < 0x3F800000u ? 0xFFFFFFFFu : 0u;  // |x| < 1
  std::uint32_t const y = (bits_of(small) & use_small) | (bits_of(large) & ~use_small);
  return float_of(y | (ux & 0x80000000u));
}

}  // namespace fastmath

// exp and erf for the kernels: the vectorisable float32 versions on host
// backends, the library functions otherwise.
template <bool Host, class T>
KOKKOS_INLINE_FUNCTION T exp_of(T x) {
  if constexpr (Host && std::is_same_v<T, float>)
    return fastmath::exp(x);
  else
    return compat::exp(x);
}
template <bool Host, class T>
KOKKOS_INLINE_FUNCTION T erf_of(T x) {
  if constexpr (Host && std::is_same_v<T, float>)
    return fastmath::erf(x);
  else
    return compat::erf(x);
}

// Exact (erf) GELU and its derivative, x Phi(x) and Phi(x) + x phi(x).
template <bool Host, class T>
KOKKOS_INLINE_FUNCTION T gelu(T x) {
  return T(0.5) * x * (T(1) + erf_of<Host>(x * T(0.70710678118654752440)));
}
template <bool Host, class T>
KOKKOS_INLINE_FUNCTION T gelu_grad(T x) {
  T const cdf = T(0.5) * (T(1) + erf_of<Host>(x * T(0.70710678118654752440)));
  T const pdf = T(0.39894228040143267794) * exp_of<Host>(T(-0.5) * x * x);
  return cdf + x * pdf;
}

}  // namespace nn
}  // namespace hexamoe
