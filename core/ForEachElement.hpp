// ForEachElement.hpp: elementwise loops whose index cannot wrap.
//
// for_each_element(space, label, rows, cols, f) calls f(r, c) for every
// element of a rows x cols matrix; for_each_index(space, label, n, f) calls
// f(i) for i in [0, n). On the host a row is one iteration (the column loop
// vectorises); on devices an element is one thread, with a 32-bit flat index
// while rows x cols fits in one (division by cols stays cheap) and a 64-bit
// one beyond 2^31 - 1 elements. A 32-bit product would wrap there: CUDA's
// default RangePolicy index is 32-bit unsigned, and a wrapped bound runs no
// iterations (Kokkos 3.4) or aborts (Kokkos 4).
#pragma once

#include "Compat.hpp"

#include <Kokkos_Core.hpp>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>

namespace hexamoe {

// The device branch of for_each_element, callable on any space (tests run it
// on the host).
template <class ExecutionSpace, class F>
void for_each_element_flat(ExecutionSpace const &space, std::string const &label, int rows, int cols, F const &f) {
  if (rows <= 0 || cols <= 0) return;
  std::int64_t const n = std::int64_t(rows) * cols;
  if (n <= INT_MAX) {
    Kokkos::parallel_for(
        label, compat::light(Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<int>>(space, 0, int(n))),
        KOKKOS_LAMBDA(int i) { f(i / cols, i % cols); });
  } else {
    Kokkos::parallel_for(
        label, compat::light(Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<std::int64_t>>(space, 0, n)),
        KOKKOS_LAMBDA(std::int64_t i) {
          int const r = int(i / cols);
          f(r, int(i - std::int64_t(r) * cols));
        });
  }
}

template <class ExecutionSpace, class F>
void for_each_element(ExecutionSpace const &space, std::string const &label, int rows, int cols, F const &f) {
  if constexpr (Kokkos::SpaceAccessibility<ExecutionSpace, Kokkos::HostSpace>::accessible) {
    if (rows <= 0 || cols <= 0) return;
    Kokkos::parallel_for(
        label, Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<int>>(space, 0, rows), KOKKOS_LAMBDA(int r) {
          for (int c = 0; c < cols; ++c) f(r, c);
        });
  } else {
    for_each_element_flat(space, label, rows, cols, f);
  }
}

template <class ExecutionSpace, class F>
void for_each_index(ExecutionSpace const &space, std::string const &label, std::size_t n, F const &f) {
  Kokkos::parallel_for(label, Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<std::size_t>>(space, 0, n), f);
}

}  // namespace hexamoe
