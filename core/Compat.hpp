// Compat.hpp: the few Kokkos APIs that moved between Kokkos 3.4 (Debian) and
// Kokkos 4.x/5.x. Everything else in hexamoe uses Kokkos directly.
#pragma once

#include <Kokkos_Core.hpp>

#include <string>

namespace hexamoe {
namespace compat {

// Math functions: Kokkos::Experimental:: in 3.x, Kokkos:: in 4.x and later.
#if KOKKOS_VERSION >= 40000
#define HEXAMOE_KOKKOS_MATH Kokkos
#else
#define HEXAMOE_KOKKOS_MATH Kokkos::Experimental
#endif

template <class T>
KOKKOS_INLINE_FUNCTION T exp(T x) { return HEXAMOE_KOKKOS_MATH::exp(x); }
template <class T>
KOKKOS_INLINE_FUNCTION T log(T x) { return HEXAMOE_KOKKOS_MATH::log(x); }
template <class T>
KOKKOS_INLINE_FUNCTION T tanh(T x) { return HEXAMOE_KOKKOS_MATH::tanh(x); }
template <class T>
KOKKOS_INLINE_FUNCTION T erf(T x) { return HEXAMOE_KOKKOS_MATH::erf(x); }
template <class T>
KOKKOS_INLINE_FUNCTION T sqrt(T x) { return HEXAMOE_KOKKOS_MATH::sqrt(x); }
template <class T>
KOKKOS_INLINE_FUNCTION T fabs(T x) { return HEXAMOE_KOKKOS_MATH::fabs(x); }

#undef HEXAMOE_KOKKOS_MATH

// Profiling region for the lifetime of the object (ScopedRegion is 4.x only).
class ScopedRegion {
 public:
  explicit ScopedRegion(std::string const &name) { Kokkos::Profiling::pushRegion(name); }
  ~ScopedRegion() { Kokkos::Profiling::popRegion(); }
  ScopedRegion(ScopedRegion const &) = delete;
  ScopedRegion &operator=(ScopedRegion const &) = delete;
};

// A policy whose functor travels as a kernel argument (Kokkos' light-weight
// hint): on CUDA a large functor is otherwise copied to constant memory, and
// that launch waits on the host for the previous such kernel to finish.
template <class Policy>
auto light(Policy const &p) {
  return Kokkos::Experimental::require(p, Kokkos::Experimental::WorkItemProperty::HintLightWeight);
}

// Page-locked host memory of the GPU backends, where host buffers that feed
// device copies (MPI staging) live: HIPHostPinnedSpace moved out of
// Kokkos::Experimental in 4.x; CudaHostPinnedSpace never moved.
#if defined(KOKKOS_ENABLE_CUDA)
using HostPinnedSpace = Kokkos::CudaHostPinnedSpace;
#elif defined(KOKKOS_ENABLE_HIP) && KOKKOS_VERSION >= 40000
using HostPinnedSpace = Kokkos::HIPHostPinnedSpace;
#elif defined(KOKKOS_ENABLE_HIP)
using HostPinnedSpace = Kokkos::Experimental::HIPHostPinnedSpace;
#else
using HostPinnedSpace = Kokkos::HostSpace;
#endif

}  // namespace compat
}  // namespace hexamoe
