// MpiView.hpp: how Kokkos views are handed to MPI. MPI reads and writes host
// memory: a view the host can access is used in place (its "mirror" is the
// view itself, and the copies below are no-ops apart from a fence, which MPI
// needs anyway before it reads what a kernel wrote); a device view goes
// through a host mirror in page-locked memory (compat::HostPinnedSpace on
// CUDA and HIP), so that the staging copies run at the bus's speed.
#pragma once

#include <mpi.h>

#include <Kokkos_Core.hpp>
#include <cstdint>

#include "core/Compat.hpp"
#include <type_traits>
#include <utility>

namespace hexamoe::parallel {

template <class T>
MPI_Datatype mpi_type() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>)
    return MPI_FLOAT;
  else if constexpr (std::is_same_v<U, double>)
    return MPI_DOUBLE;
  else if constexpr (std::is_same_v<U, int>)
    return MPI_INT;
  else if constexpr (std::is_same_v<U, std::int64_t>)
    return MPI_INT64_T;
  else
    static_assert(!sizeof(U), "mpi_type: no MPI datatype for this type");
}

// Whether host_mirror(v) is v (no copies needed).
template <class MemorySpace>
inline constexpr bool host_accessible = Kokkos::SpaceAccessibility<Kokkos::HostSpace, MemorySpace>::accessible;

// Where MPI's host copies of views in MemorySpace live.
template <class MemorySpace>
using host_staging_space = std::conditional_t<host_accessible<MemorySpace>, Kokkos::HostSpace, compat::HostPinnedSpace>;

// The host view MPI uses for v (v itself when host-accessible).
template <class View>
auto host_mirror(View const &v) {
  return Kokkos::create_mirror_view(host_staging_space<typename View::memory_space>(), v);
}
template <class View>
using host_mirror_t = decltype(host_mirror(std::declval<View>()));

// Make what kernels wrote into dev visible to MPI through host.
template <class Host, class Dev>
void to_host(Host const &host, Dev const &dev) {
  if constexpr (host_accessible<typename Dev::memory_space>) {
    if (host.data() == dev.data()) {
      Kokkos::fence();
      return;
    }
  }
  Kokkos::deep_copy(host, dev);
}

// Make what MPI wrote into host visible to kernels on dev.
template <class Dev, class Host>
void from_host(Dev const &dev, Host const &host) {
  if constexpr (host_accessible<typename Dev::memory_space>) {
    if (host.data() == dev.data()) return;
  }
  Kokkos::deep_copy(dev, host);
}

}  // namespace hexamoe::parallel
