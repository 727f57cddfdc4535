// RoutingIndex.hpp: the routing index of the expert-specific operators.
//
// For the S = T*k assignments s = (t, j) (flat id t*k + j) of a top-k router it
// holds per-expert counts, their exclusive scan (offsets) and the assignment
// list sorted by expert, stable in (t, j). It is built with a chunked
// count / scan / place scheme: every chunk of assignments counts per expert,
// one scan over the (expert, chunk) table gives each chunk its write cursor,
// and every chunk places its assignments in order. No atomics decide the order,
// so the index (and everything computed through it) is deterministic.
#pragma once

#include "Compat.hpp"

#include <Kokkos_Core.hpp>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace hexamoe {

template <class MemorySpace>
struct RoutingIndex {
  using memory_space = MemorySpace;

  int num_tokens = 0;
  int top_k = 0;
  int num_experts = 0;
  int capacity = 0;  // assignments kept per expert; 0 = dropless (the default)

  Kokkos::View<int *, MemorySpace> counts;       // [E] assignments computed by expert e
  Kokkos::View<int *, MemorySpace> offsets;      // [E+1] exclusive scan of counts
  Kokkos::View<int *, MemorySpace> sorted_flat;  // [S] flat id of the assignment at sorted position p
  Kokkos::View<int *, MemorySpace> position;     // [S] sorted position of flat id, -1 if dropped

  int num_assignments() const { return num_tokens * top_k; }

  // Per-expert counts on the host (for logging and load-balance reports).
  std::vector<int> counts_host() const {
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), counts);
    return std::vector<int>(h.data(), h.data() + h.extent(0));
  }
};

namespace detail {
inline int routing_chunk_size() { return 256; }
}  // namespace detail

// Build the routing index from expert ids idx[T, k] (values in [0, E)).
// capacity_factor > 0 keeps at most ceil(cf * k * T / E) assignments per expert
// (dropping later ones in (t, j) order); it exists only to reproduce padded peers.
// validate = true checks every id on the device (one reduction read back).
template <class ExecutionSpace, class MemorySpace>
RoutingIndex<MemorySpace> build_routing_index(ExecutionSpace const &space,
                                              Kokkos::View<int const **, Kokkos::LayoutRight, MemorySpace> idx,
                                              int num_experts, double capacity_factor = 0.0,
                                              bool validate = true) {
  static_assert(Kokkos::SpaceAccessibility<ExecutionSpace, MemorySpace>::accessible,
                "build_routing_index: execution space cannot access the index's memory space");
  compat::ScopedRegion region("hexamoe::build_routing_index");
  if (num_experts < 1) {
    throw std::invalid_argument("build_routing_index: number of experts must be >= 1, got " +
                                std::to_string(num_experts));
  }
  int const T = static_cast<int>(idx.extent(0));
  int const k = static_cast<int>(idx.extent(1));
  int const E = num_experts;
  if (k < 1 || k > E) {
    throw std::invalid_argument("build_routing_index: top_k must be in [1, num_experts=" + std::to_string(E) +
                                "], got " + std::to_string(k));
  }
  if (capacity_factor < 0.0 || !std::isfinite(capacity_factor)) {
    throw std::invalid_argument("build_routing_index: capacity_factor must be >= 0 (0 = dropless)");
  }
  RoutingIndex<MemorySpace> R;
  R.num_tokens = T;
  R.top_k = k;
  R.num_experts = E;
  int const S = T * k;
  R.capacity = capacity_factor > 0.0
                   ? static_cast<int>(std::ceil(capacity_factor * static_cast<double>(S) / static_cast<double>(E)))
                   : 0;

  using policy = Kokkos::RangePolicy<ExecutionSpace>;
  int const chunk = detail::routing_chunk_size();
  int const nchunks = (S + chunk - 1) / chunk;
  auto const flat_idx = Kokkos::View<int const *, MemorySpace>(idx.data(), static_cast<std::size_t>(S));

  // 1. Count per (expert, chunk), expert-major so that one scan orders by expert then chunk.
  Kokkos::View<int *, MemorySpace> table(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::routing_table"),
                                         static_cast<std::size_t>(E) * nchunks + 1);
  int invalid = 0;
  Kokkos::parallel_reduce(
      "hexamoe::routing_count", policy(space, 0, nchunks),
      KOKKOS_LAMBDA(int c, int &bad) {
        for (int e = 0; e < E; ++e) table(static_cast<std::size_t>(e) * nchunks + c) = 0;
        int const end = (c + 1) * chunk < S ? (c + 1) * chunk : S;
        for (int s = c * chunk; s < end; ++s) {
          int const e = flat_idx(s);
          if (e < 0 || e >= E) {
            ++bad;
          } else {
            ++table(static_cast<std::size_t>(e) * nchunks + c);
          }
        }
      },
      invalid);
  // The reduction result is on the host already (a scalar reducer synchronises).
  if (validate && invalid != 0) {
    std::ostringstream msg;
    msg << "build_routing_index: " << invalid << " expert id(s) outside [0, " << E << ")";
    throw std::invalid_argument(msg.str());
  }
  Kokkos::deep_copy(space, Kokkos::subview(table, static_cast<std::size_t>(E) * nchunks), 0);

  // 2. Exclusive scan of the table: each entry becomes the chunk's first sorted position.
  std::size_t const ntab = static_cast<std::size_t>(E) * nchunks + 1;
  Kokkos::parallel_scan(
      "hexamoe::routing_scan", Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<std::size_t>>(space, 0, ntab),
      KOKKOS_LAMBDA(std::size_t i, int &run, bool final) {
        int const v = table(i);
        if (final) table(i) = run;
        run += v;
      });

  R.offsets = Kokkos::View<int *, MemorySpace>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::routing_offsets"), E + 1);
  R.counts = Kokkos::View<int *, MemorySpace>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::routing_counts"), E);
  R.sorted_flat = Kokkos::View<int *, MemorySpace>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::routing_sorted_flat"), S);
  R.position = Kokkos::View<int *, MemorySpace>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::routing_position"), S);
  auto offsets = R.offsets;
  auto counts = R.counts;
  auto sorted = R.sorted_flat;
  auto position = R.position;

  // 3. Place: each chunk walks its assignments in order, bumping its own cursors.
  Kokkos::parallel_for(
      "hexamoe::routing_place", policy(space, 0, nchunks), KOKKOS_LAMBDA(int c) {
        int const end = (c + 1) * chunk < S ? (c + 1) * chunk : S;
        for (int s = c * chunk; s < end; ++s) {
          int const e = flat_idx(s);
          if (e < 0 || e >= E) {
            position(s) = -1;
            continue;
          }
          int const p = table(static_cast<std::size_t>(e) * nchunks + c)++;
          sorted(p) = s;
          position(s) = p;
        }
      });
  // After placement each entry holds the next chunk's start; the first chunk of
  // expert e+1 starts where expert e ended. Offsets are read before placement
  // moved them, so recompute them from the scan of counts instead.
  int const cap = R.capacity;
  Kokkos::parallel_for(
      "hexamoe::routing_offsets", policy(space, 0, 1), KOKKOS_LAMBDA(int) {
        // table(e * nchunks + nchunks - 1) now holds the end of expert e.
        int start = 0;
        for (int e = 0; e < E; ++e) {
          int const end = table(static_cast<std::size_t>(e) * nchunks + nchunks - 1);
          counts(e) = end - start;
          start = end;
        }
        int run = 0;
        for (int e = 0; e < E; ++e) {
          offsets(e) = run;
          int const n = cap > 0 && counts(e) > cap ? cap : counts(e);
          run += n;
        }
        offsets(E) = run;
      });

  if (cap > 0) {
    // Keep the first `cap` assignments of each expert: compact the sorted list.
    Kokkos::View<int *, MemorySpace> kept(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::routing_sorted_flat"), S);
    Kokkos::parallel_for(
        "hexamoe::routing_drop", policy(space, 0, S), KOKKOS_LAMBDA(int s) {
          int const e = flat_idx(s);
          if (e < 0 || e >= E) return;
          // Dropless start of expert e: sum of full counts before it.
          int start = 0;
          for (int f = 0; f < e; ++f) start += counts(f);
          int const local = position(s) - start;
          if (local < cap) {
            int const p = offsets(e) + local;
            kept(p) = s;
            position(s) = p;
          } else {
            position(s) = -1;
          }
        });
    Kokkos::parallel_for(
        "hexamoe::routing_clip", policy(space, 0, E), KOKKOS_LAMBDA(int e) {
          counts(e) = offsets(e + 1) - offsets(e);
        });
    R.sorted_flat = kept;
  }
  return R;
}

}  // namespace hexamoe
