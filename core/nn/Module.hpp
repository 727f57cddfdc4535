// Module.hpp: what the dense modules of core/nn share: view aliases, extent
// checks that throw std::invalid_argument, labelled work buffers that follow
// the batch size, the deterministic host initialisers (truncated normal,
// constants) and a deterministic column sum (bias and LayerNorm gradients).
#pragma once

#include "core/Compat.hpp"
#include "core/ForEachElement.hpp"
#include "core/Parameter.hpp"

#include <Kokkos_Core.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace hexamoe {
namespace nn {

template <class T, class MemorySpace>
using Vector = Kokkos::View<T *, MemorySpace>;

namespace detail {

template <class ExecutionSpace>
inline constexpr bool on_host = Kokkos::SpaceAccessibility<ExecutionSpace, Kokkos::HostSpace>::accessible;

inline void require(bool ok, std::string const &op, std::string const &what) {
  if (!ok) throw std::invalid_argument(op + ": " + what);
}

template <class View>
std::string extents(View const &v) {
  std::ostringstream s;
  s << "[";
  for (unsigned i = 0; i < View::rank; ++i) s << (i ? ", " : "") << v.extent(i);
  s << "]";
  return s.str();
}

// "x is [4, 7], expected [4, 8]" unless v has exactly the extents dims.
template <class View>
void require_extents(View const &v, std::vector<std::size_t> const &dims, std::string const &op,
                     std::string const &name) {
  bool ok = dims.size() == View::rank;
  for (unsigned i = 0; ok && i < View::rank; ++i) ok = v.extent(i) == dims[i];
  if (ok) return;
  std::ostringstream s;
  s << name << " is " << extents(v) << ", expected [";
  for (std::size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << "]";
  throw std::invalid_argument(op + ": " + s.str());
}

// A work buffer that is reallocated (uninitialised) only when its extents change.
template <class View, class ExecutionSpace>
void ensure(ExecutionSpace const &space, View &v, std::string const &label, std::size_t n0, std::size_t n1 = 0,
            std::size_t n2 = 0) {
  bool same = v.data() != nullptr && v.extent(0) == n0;
  if constexpr (View::rank > 1) same = same && v.extent(1) == n1;
  if constexpr (View::rank > 2) same = same && v.extent(2) == n2;
  if (same) return;
  v = View();  // release before allocating
  if constexpr (View::rank == 1) v = View(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, label), n0);
  if constexpr (View::rank == 2) v = View(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, label), n0, n1);
  if constexpr (View::rank == 3) v = View(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, label), n0, n1, n2);
}

// splitmix64: sub-seeds for the parts of a module, platform-independent.
inline std::uint64_t derive_seed(std::uint64_t seed, std::uint64_t part) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ull * (part + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Normal(0, std) truncated to [-2 std, 2 std] (resampled), from splitmix64 and
// Box-Muller: the same numbers with every compiler and standard library (the
// std:: distributions are implementation-defined).
inline std::vector<double> truncated_normal(std::size_t n, double std_dev, std::uint64_t seed) {
  std::vector<double> out(n);
  std::uint64_t state = seed;
  auto uniform = [&state] {  // (0, 1)
    state = derive_seed(state, 0);
    return (static_cast<double>(state >> 11) + 0.5) * 0x1.0p-53;
  };
  double const two_pi = 6.283185307179586476925;
  for (std::size_t i = 0; i < n; ++i) {
    double z;
    do {
      z = std::sqrt(-2.0 * std::log(uniform())) * std::cos(two_pi * uniform());
    } while (std::fabs(z) > 2.0);
    out[i] = std_dev * z;
  }
  return out;
}

// Copy host values (or a constant) into a contiguous view of any rank.
template <class View>
void fill_from_host(View const &v, std::vector<double> const &values) {
  auto h = Kokkos::create_mirror_view(v);
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = static_cast<typename View::non_const_value_type>(values[i]);
  Kokkos::deep_copy(v, h);
}
template <class View>
void fill_constant(View const &v, double value) {
  Kokkos::deep_copy(v, static_cast<typename View::non_const_value_type>(value));
}

// out[c] = sum_r a(r, c) (+ out[c] if accumulate), each column summed in row
// order by one thread: chunks of 64 columns on the host (the row loop streams
// memory and the column loop vectorises), one column per thread on devices.
template <class ExecutionSpace, class AView, class OutView>
void column_sum(ExecutionSpace const &space, AView const &a, OutView const &out, bool accumulate = false) {
  using T = typename OutView::non_const_value_type;
  int const rows = static_cast<int>(a.extent(0)), cols = static_cast<int>(a.extent(1));
  constexpr int chunk = on_host<ExecutionSpace> ? 64 : 1;
  int const chunks = (cols + chunk - 1) / chunk;
  Kokkos::parallel_for(
      "hexamoe::nn::column_sum", Kokkos::RangePolicy<ExecutionSpace>(space, 0, chunks), KOKKOS_LAMBDA(int ch) {
        int const c0 = ch * chunk;
        int const nc = cols - c0 < chunk ? cols - c0 : chunk;
        T acc[chunk];
        for (int c = 0; c < nc; ++c) acc[c] = accumulate ? out(c0 + c) : T(0);
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < nc; ++c) acc[c] += a(r, c0 + c);
        for (int c = 0; c < nc; ++c) out(c0 + c) = acc[c];
      });
}

// y(r, :) = v for every row r.
template <class ExecutionSpace, class VView, class YView>
void broadcast_rows(ExecutionSpace const &space, VView const &v, YView const &y) {
  for_each_element(space, "hexamoe::nn::broadcast_rows", static_cast<int>(y.extent(0)),
                   static_cast<int>(y.extent(1)), KOKKOS_LAMBDA(int r, int c) { y(r, c) = v(c); });
}

// The Parameter entries exist for float32 modules only (Parameter is float).
template <class Scalar>
void require_float_parameters() {
  static_assert(std::is_same_v<Scalar, float>, "parameters() exists for float32 modules only");
}

// A replicated (not expert, not sharded) parameter over a value and its gradient.
template <class View>
Parameter<typename View::memory_space> parameter(std::string name, View const &value, View const &grad, bool decay) {
  Parameter<typename View::memory_space> p;
  p.name = std::move(name);
  for (unsigned i = 0; i < View::rank; ++i) p.shape.push_back(value.extent(i));
  p.value = flat(value);
  p.grad = flat(grad);
  p.decay = decay;
  return p;
}

}  // namespace detail
}  // namespace nn
}  // namespace hexamoe
