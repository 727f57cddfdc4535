// RoutingIndex.hpp: the routing index of the expert-specific operators.
//
// For the S = T*k assignments s = (t, j) (flat id t*k + j) of a top-k router it
// holds per-expert counts, their exclusive scan (offsets) and the assignment
// list sorted by expert, stable in (t, j). It is built with a chunked
// count / scan / place scheme: every chunk of assignments counts per expert,
// one scan over the (expert, chunk) table gives each chunk its write cursor,
// and every chunk places its assignments in order. No atomics decide the order,
// so the index (and everything computed through it) is deterministic. Nothing
// is read back to the host unless ids are validated.
#pragma once

#include "Compat.hpp"

#include <Kokkos_Core.hpp>

#include <climits>
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
  Kokkos::View<int *, MemorySpace> workspace;    // (expert, chunk) cursors of the last build (reused by rebuilds)

  KOKKOS_INLINE_FUNCTION int num_assignments() const { return num_tokens * top_k; }

  // Per-expert counts on the host (for logging and load-balance reports).
  std::vector<int> counts_host() const {
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), counts);
    return std::vector<int>(h.data(), h.data() + h.extent(0));
  }
};

// The routed rows T * top_k of a batch of `tokens` tokens. The routing index
// and the expert operators number routed rows (and tokens) with int, so a
// batch beyond 2^31 - 1 of them is refused with std::length_error, where it
// would otherwise wrap into wrong results.
inline int routed_rows(std::string const &who, std::size_t tokens, int top_k) {
  std::size_t const rows = tokens * static_cast<std::size_t>(top_k < 1 ? 1 : top_k);
  if (tokens > std::size_t(INT_MAX) || rows > std::size_t(INT_MAX))
    throw std::length_error(who + ": " + std::to_string(tokens) + " tokens x top_k " + std::to_string(top_k) + " = " +
                            std::to_string(rows) + " routed rows, more than the " + std::to_string(INT_MAX) +
                            " one call can index (32-bit row numbers); split the batch");
  return static_cast<int>(rows);
}

namespace detail {
inline int routing_chunk_size() { return 256; }

// A view of at least n elements: `have` when it is large enough, else a new one.
template <class ExecutionSpace, class MemorySpace>
Kokkos::View<int *, MemorySpace> routing_buffer(ExecutionSpace const &space, Kokkos::View<int *, MemorySpace> have,
                                                std::size_t n, char const *label) {
  if (have.data() != nullptr && have.extent(0) >= n) return Kokkos::subview(have, std::make_pair(std::size_t(0), n));
  return Kokkos::View<int *, MemorySpace>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, std::string(label)), n);
}
}  // namespace detail

// Build the routing index from expert ids idx[T, k] (values in [0, E)).
// capacity_factor > 0 keeps at most ceil(cf * k * T / E) assignments per expert
// (dropping later ones in (t, j) order); it exists only to reproduce padded peers.
// validate = true checks every id on the device (one reduction read back: a
// host synchronisation); with validate = false nothing is read back.
// reuse (optional): an earlier index whose device buffers are recycled when
// large enough, so that a layer rebuilding its index every step allocates (and
// synchronises) nothing; that earlier index is invalid afterwards.
//
// Device backends: one team per chunk of assignments counts in team scratch
// and places each assignment at its chunk's cursor plus its rank among the
// chunk's earlier assignments to the same expert (no atomics decide an order).
// Host backends: one thread per chunk walks its assignments in order.
template <class ExecutionSpace, class MemorySpace>
RoutingIndex<MemorySpace> build_routing_index(ExecutionSpace const &space,
                                              Kokkos::View<int const **, Kokkos::LayoutRight, MemorySpace> idx,
                                              int num_experts, double capacity_factor = 0.0,
                                              bool validate = true, RoutingIndex<MemorySpace> const &reuse = {}) {
  static_assert(Kokkos::SpaceAccessibility<ExecutionSpace, MemorySpace>::accessible,
                "build_routing_index: execution space cannot access the index's memory space");
  compat::ScopedRegion region("hexamoe::build_routing_index");
  if (num_experts < 1) {
    throw std::invalid_argument("build_routing_index: number of experts must be >= 1, got " +
                                std::to_string(num_experts));
  }
  int const k = static_cast<int>(idx.extent(1));
  int const S = routed_rows("build_routing_index", idx.extent(0), k);
  int const T = static_cast<int>(idx.extent(0));
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
  R.capacity = capacity_factor > 0.0
                   ? static_cast<int>(std::ceil(capacity_factor * static_cast<double>(S) / static_cast<double>(E)))
                   : 0;

  using policy = Kokkos::RangePolicy<ExecutionSpace>;
  constexpr bool host = Kokkos::SpaceAccessibility<ExecutionSpace, Kokkos::HostSpace>::accessible;
  int const chunk = detail::routing_chunk_size();
  int const nchunks = (S + chunk - 1) / chunk;
  auto const flat_idx = Kokkos::View<int const *, MemorySpace>(idx.data(), static_cast<std::size_t>(S));
  std::size_t const ntab = static_cast<std::size_t>(E) * nchunks + 1;

  // 1. Count per (expert, chunk), expert-major so that one scan orders by expert then chunk.
  R.workspace = detail::routing_buffer(space, reuse.workspace, ntab, "hexamoe::routing_table");
  auto table = R.workspace;
  if (validate) {
    int invalid = 0;
    Kokkos::parallel_reduce(
        "hexamoe::routing_validate", policy(space, 0, S),
        KOKKOS_LAMBDA(int s, int &bad) {
          int const e = flat_idx(s);
          if (e < 0 || e >= E) ++bad;
        },
        invalid);  // a scalar reduction result synchronises
    if (invalid != 0) {
      std::ostringstream msg;
      msg << "build_routing_index: " << invalid << " expert id(s) outside [0, " << E << ")";
      throw std::invalid_argument(msg.str());
    }
  }
  if constexpr (host) {
    Kokkos::parallel_for(
        "hexamoe::routing_count", compat::light(policy(space, 0, nchunks + 1)), KOKKOS_LAMBDA(int c) {
          if (c == nchunks) {
            table(static_cast<std::size_t>(E) * nchunks) = 0;
            return;
          }
          for (int e = 0; e < E; ++e) table(static_cast<std::size_t>(e) * nchunks + c) = 0;
          int const end = (c + 1) * chunk < S ? (c + 1) * chunk : S;
          for (int s = c * chunk; s < end; ++s) {
            int const e = flat_idx(s);
            if (e >= 0 && e < E) ++table(static_cast<std::size_t>(e) * nchunks + c);
          }
        });
  } else {
    // One team per chunk, a histogram in team scratch (atomic adds only count).
    using team_policy = Kokkos::TeamPolicy<ExecutionSpace>;
    using member = typename team_policy::member_type;
    auto tp = compat::light(team_policy(space, nchunks > 0 ? nchunks : 1, chunk < 256 ? chunk : 256));
    tp.set_scratch_size(0, Kokkos::PerTeam(sizeof(int) * (E + 1)));
    Kokkos::parallel_for(
        "hexamoe::routing_count", tp, KOKKOS_LAMBDA(member const &team) {
          int const c = team.league_rank();
          int *hist = static_cast<int *>(team.team_shmem().get_shmem(sizeof(int) * E));
          Kokkos::parallel_for(Kokkos::TeamThreadRange(team, E), [&](int e) { hist[e] = 0; });
          team.team_barrier();
          int const beg = c * chunk, end = (c + 1) * chunk < S ? (c + 1) * chunk : S;
          Kokkos::parallel_for(Kokkos::TeamThreadRange(team, beg, end), [&](int s) {
            int const e = flat_idx(s);
            if (e >= 0 && e < E) Kokkos::atomic_add(&hist[e], 1);
          });
          team.team_barrier();
          if (c < nchunks)
            Kokkos::parallel_for(Kokkos::TeamThreadRange(team, E),
                                 [&](int e) { table(static_cast<std::size_t>(e) * nchunks + c) = hist[e]; });
          if (c == 0) Kokkos::single(Kokkos::PerTeam(team), [&]() { table(static_cast<std::size_t>(E) * nchunks) = 0; });
        });
  }

  R.offsets = detail::routing_buffer(space, reuse.offsets, E + 1, "hexamoe::routing_offsets");
  R.counts = detail::routing_buffer(space, reuse.counts, E, "hexamoe::routing_counts");
  R.sorted_flat = detail::routing_buffer(space, reuse.sorted_flat, S, "hexamoe::routing_sorted_flat");
  R.position = detail::routing_buffer(space, reuse.position, S, "hexamoe::routing_position");
  auto offsets = R.offsets;
  auto counts = R.counts;
  auto sorted = R.sorted_flat;
  auto position = R.position;
  int const cap = R.capacity;

  // 2. Exclusive scan of the table: each entry becomes the chunk's first sorted position.
  if constexpr (host) {
    Kokkos::parallel_scan(
        "hexamoe::routing_scan", Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<std::size_t>>(space, 0, ntab),
        KOKKOS_LAMBDA(std::size_t i, int &run, bool final) {
          int const v = table(i);
          if (final) table(i) = run;
          run += v;
        });
  } else {
    // The table is small (experts x chunks): one team scans it (segments per
    // thread, their sums scanned in scratch) and derives counts and offsets,
    // in one launch.
    using team_policy = Kokkos::TeamPolicy<ExecutionSpace>;
    using member = typename team_policy::member_type;
    int const ts = 256;
    auto tp = compat::light(team_policy(space, 1, ts));
    tp.set_scratch_size(0, Kokkos::PerTeam(sizeof(int) * (ts + 1)));
    Kokkos::parallel_for(
        "hexamoe::routing_scan", tp, KOKKOS_LAMBDA(member const &team) {
          int *part = static_cast<int *>(team.team_shmem().get_shmem(sizeof(int) * (ts + 1)));
          int const t = team.team_rank(), nt = team.team_size();
          std::size_t const seg = (ntab + nt - 1) / nt;
          std::size_t const beg = t * seg < ntab ? t * seg : ntab, end = beg + seg < ntab ? beg + seg : ntab;
          int sum = 0;
          for (std::size_t i = beg; i < end; ++i) sum += table(i);
          part[t] = sum;
          team.team_barrier();
          if (t == 0) {
            int run = 0;
            for (int q = 0; q < nt; ++q) {
              int const v = part[q];
              part[q] = run;
              run += v;
            }
          }
          team.team_barrier();
          int run = part[t];
          for (std::size_t i = beg; i < end; ++i) {
            int const v = table(i);
            table(i) = run;
            run += v;
          }
          team.team_barrier();
          if (t == 0) {
            int off = 0;
            for (int e = 0; e < E; ++e) {
              int const n = table(static_cast<std::size_t>(e + 1) * nchunks) - table(static_cast<std::size_t>(e) * nchunks);
              counts(e) = n;
              offsets(e) = off;
              off += cap > 0 && n > cap ? cap : n;
            }
            offsets(E) = off;
          }
        });
  }

  // 3. Place: an assignment goes to its chunk's cursor for its expert plus the
  // number of earlier assignments of the chunk to the same expert (stable).
  if constexpr (host) {
    // One thread per chunk bumps its own cursors: afterwards entry (e, c) holds
    // the start of chunk c + 1, and the last chunk's entry the end of expert e.
    Kokkos::parallel_for(
        "hexamoe::routing_place", compat::light(policy(space, 0, nchunks)), KOKKOS_LAMBDA(int c) {
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
  } else {
    using team_policy = Kokkos::TeamPolicy<ExecutionSpace>;
    using member = typename team_policy::member_type;
    auto tp = compat::light(team_policy(space, nchunks > 0 ? nchunks : 1, chunk < 256 ? chunk : 256));
    tp.set_scratch_size(0, Kokkos::PerTeam(sizeof(int) * chunk));
    Kokkos::parallel_for(
        "hexamoe::routing_place", tp, KOKKOS_LAMBDA(member const &team) {
          int const c = team.league_rank();
          int *ids = static_cast<int *>(team.team_shmem().get_shmem(sizeof(int) * chunk));
          int const beg = c * chunk, n = (c + 1) * chunk < S ? chunk : S - beg;
          Kokkos::parallel_for(Kokkos::TeamThreadRange(team, n), [&](int i) { ids[i] = flat_idx(beg + i); });
          team.team_barrier();
          Kokkos::parallel_for(Kokkos::TeamThreadRange(team, n), [&](int i) {
            int const e = ids[i];
            int const s = beg + i;
            if (e < 0 || e >= E) {
              position(s) = -1;
              return;
            }
            int rank = 0;  // every thread reads ids[q] in the same order: broadcasts
            for (int q = 0; q < i; ++q) rank += ids[q] == e ? 1 : 0;
            int const p = table(static_cast<std::size_t>(e) * nchunks + c) + rank;
            sorted(p) = s;
            position(s) = p;
          });
        });
  }
  // Counts and offsets on hosts (devices derived them with the scan): the
  // cursors were bumped, so the last chunk's entry is expert e's end.
  if constexpr (host) {
    Kokkos::parallel_for(
        "hexamoe::routing_offsets", compat::light(policy(space, 0, 1)), KOKKOS_LAMBDA(int) {
          int run = 0, start = 0;
          for (int e = 0; e < E; ++e) {
            int const end = nchunks > 0 ? table(static_cast<std::size_t>(e) * nchunks + nchunks - 1) : 0;
            counts(e) = end - start;
            start = end;
            offsets(e) = run;
            run += cap > 0 && counts(e) > cap ? cap : counts(e);
          }
          offsets(E) = run;
        });
  }

  if (cap > 0) {
    // Keep the first `cap` assignments of each expert: compact the sorted list.
    Kokkos::View<int *, MemorySpace> kept(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::routing_sorted_flat"), S);
    Kokkos::parallel_for(
        "hexamoe::routing_drop", compat::light(policy(space, 0, S)), KOKKOS_LAMBDA(int s) {
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
        "hexamoe::routing_clip", compat::light(policy(space, 0, E)), KOKKOS_LAMBDA(int e) {
          counts(e) = offsets(e + 1) - offsets(e);
        });
    R.sorted_flat = kept;
  }
  return R;
}

}  // namespace hexamoe
