// RowOperand.hpp: how an expert-specific operator reads the rows of an operand
// through the routing index, without a gathered copy.
//
//   sorted       row p of a [S, n] array in expert-sorted order (z1, h, dz1, ...)
//   token        row t(p) of a [T, n] token array (x)
//   token_gated  row t(p) of a [T, n] token array times the gate g(p) (dy: the
//                operators read do = g * dy through the index, never stored)
#pragma once

#include "BFloat16.hpp"

#include <Kokkos_Core.hpp>

namespace hexamoe {

enum class RowSource { sorted, token, token_gated };

template <class T, class MemorySpace>
struct RowOperand {
  using value_type = T;
  using acc_type = accumulator_t<T>;
  Kokkos::View<T const **, Kokkos::LayoutRight, MemorySpace> rows;
  RowSource source = RowSource::sorted;
  Kokkos::View<acc_type const *, MemorySpace> gate;  // [S] by flat id t*k+j, for token_gated

  // Row of `rows` that sorted position p (flat id `flat`, top-k `k`) reads.
  KOKKOS_INLINE_FUNCTION int row(int p, int flat, int k) const { return source == RowSource::sorted ? p : flat / k; }
  KOKKOS_INLINE_FUNCTION acc_type scale(int flat) const {
    return source == RowSource::token_gated ? gate(flat) : acc_type(1);
  }
  int cols() const { return static_cast<int>(rows.extent(1)); }
};

template <class T, class MemorySpace>
RowOperand<T, MemorySpace> sorted_rows(Kokkos::View<T const **, Kokkos::LayoutRight, MemorySpace> v) {
  return {v, RowSource::sorted, {}};
}
template <class T, class MemorySpace>
RowOperand<T, MemorySpace> token_rows(Kokkos::View<T const **, Kokkos::LayoutRight, MemorySpace> v) {
  return {v, RowSource::token, {}};
}
template <class T, class MemorySpace>
RowOperand<T, MemorySpace> gated_token_rows(Kokkos::View<T const **, Kokkos::LayoutRight, MemorySpace> v,
                                            Kokkos::View<accumulator_t<T> const *, MemorySpace> gate) {
  return {v, RowSource::token_gated, gate};
}

}  // namespace hexamoe
