// BFloat16.hpp: a portable bfloat16 storage type (Kokkos 3.4 has no bhalf_t).
// Storage only: arithmetic happens in float after conversion; conversion from
// float rounds to nearest even, NaN stays NaN.
#pragma once

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <type_traits>

namespace hexamoe {

struct bfloat16 {
  std::uint16_t bits;

  bfloat16() = default;
  KOKKOS_INLINE_FUNCTION explicit bfloat16(float f) : bits(from_float(f)) {}
  KOKKOS_INLINE_FUNCTION explicit bfloat16(double d) : bits(from_float(static_cast<float>(d))) {}
  KOKKOS_INLINE_FUNCTION explicit operator float() const { return to_float(bits); }
  KOKKOS_INLINE_FUNCTION explicit operator double() const { return to_float(bits); }

  KOKKOS_INLINE_FUNCTION static float to_float(std::uint16_t b) {
    union {
      std::uint32_t u;
      float f;
    } v;
    v.u = static_cast<std::uint32_t>(b) << 16;
    return v.f;
  }
  KOKKOS_INLINE_FUNCTION static std::uint16_t from_float(float f) {
    union {
      std::uint32_t u;
      float f;
    } v;
    v.f = f;
    if ((v.u & 0x7f800000u) == 0x7f800000u && (v.u & 0x007fffffu) != 0u) {
      return static_cast<std::uint16_t>((v.u >> 16) | 0x0040u);  // quiet NaN
    }
    std::uint32_t const rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return static_cast<std::uint16_t>((v.u + rounding) >> 16);
  }
};
static_assert(sizeof(bfloat16) == 2, "bfloat16 must be 16 bits");
static_assert(std::is_trivial<bfloat16>::value, "bfloat16 must be trivial for Kokkos views");

// Accumulation type of a storage type: float for float and bfloat16, double for double.
template <class T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};
template <class T>
using accumulator_t = typename AccumulatorOf<std::remove_const_t<T>>::type;

// Conversions used by the kernels (one spelling for all storage types).
template <class Acc, class T>
KOKKOS_INLINE_FUNCTION Acc to_acc(T v) {
  return static_cast<Acc>(v);
}
template <class T, class Acc>
KOKKOS_INLINE_FUNCTION T from_acc(Acc v) {
  return static_cast<T>(v);
}

}  // namespace hexamoe
