// RoutingIndex.hpp: the routing index of the expert-specific operators.
//
// For the S = T*k assignments s = (t, j) (flat id t*k + j) of a top-k router it
// holds per-expert counts, their exclusive scan (offsets) and the assignment
// list sorted by expert, stable in (t, j). It is built with a chunked
// count / scan / place scheme: every chunk of assignments counts per expert,
// one scan over the (expert, chunk) table gives each chunk its write cursor,
// and every chunk places its assignments in order. No atomics decide the order,
// so the index (and everything computed through it) is deterministic. Nothing
// is read back to the host unless ids are validated. On devices the scan and
// the placement are one launch, which can also take the counts from the
// router and copy rows into sorted order on the way.
#pragma once

#include "Compat.hpp"

#include <Kokkos_Core.hpp>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
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

// Assignments to each expert per chunk of flat ids, as a router that chose
// them can count them on the way: n(c, e) for the flat ids [c per,
// (c + 1) per), expert e (columns past the experts ignored). per = 0: none.
template <class MemorySpace>
struct ChunkCounts {
  Kokkos::View<int const **, Kokkos::LayoutRight, MemorySpace> n;
  int per = 0;
};

// A copy of rows into sorted order that the index's build makes on the way:
// to(p, :) = from(t, :) for every sorted position p of an assignment of
// token t. Empty views: none.
template <class T, class MemorySpace>
struct SortedRowCopy {
  Kokkos::View<T const **, Kokkos::LayoutRight, MemorySpace> from;  // [tokens, d]
  Kokkos::View<T **, Kokkos::LayoutRight, MemorySpace> to;          // [>= assignments, d]
};

namespace detail {
inline int routing_chunk_size() { return 256; }

// Whether build_routing_index takes the fused path (routing_place_fused):
// by default on device backends; tests set 1 (everywhere) or -1 (nowhere).
inline int &routing_fused_setting() {
  static int v = 0;
  return v;
}
template <bool Host>
bool routing_fused() {
  int const v = routing_fused_setting();
  return v > 0 || (v == 0 && !Host);
}
// The fused path's bound on chunks x experts: every team reads the whole
// table of chunk counts (128 KB at most).
inline constexpr std::size_t routing_fused_max_table = std::size_t(1) << 15;

// The fused launch's team scratch in bytes (chunks of `per` assignments),
// and its bound.
inline constexpr int routing_fused_groups = 256;  // (expert, group of chunks) partial sums
inline std::size_t routing_fused_scratch(int per, int E) {
  std::size_t const gmax = routing_fused_groups / E > 1 ? routing_fused_groups / E : 1;
  return sizeof(int) * (2 * std::size_t(per) + 3 * std::size_t(E) + 2 * gmax * std::size_t(E));
}
inline constexpr std::size_t routing_fused_max_scratch = 32768;

// Chunk counts n(c, e) at p[c sc + e se].
struct CountTable {
  int const *p;
  std::size_t sc, se;
  KOKKOS_INLINE_FUNCTION int operator()(int c, int e) const {
    return p[static_cast<std::size_t>(c) * sc + static_cast<std::size_t>(e) * se];
  }
};

// 16 bytes of a row.
struct alignas(16) RowPiece {
  unsigned u[4];
};

// Whether rows of `copy` move 16 bytes at a time.
template <class T, class MemorySpace>
bool row_copy_vectors(SortedRowCopy<T, MemorySpace> const &copy) {
  constexpr std::size_t V = 16 / sizeof(T);
  std::size_t const d = copy.from.extent(1);
  return sizeof(T) <= 16 && 16 % sizeof(T) == 0 && d % V == 0 && copy.from.stride_0() % V == 0 &&
         copy.to.stride_0() % V == 0 && reinterpret_cast<std::uintptr_t>(copy.from.data()) % 16 == 0 &&
         reinterpret_cast<std::uintptr_t>(copy.to.data()) % 16 == 0;
}

// Per (expert, chunk) counts into table (expert-major, entry E * nchunks set
// to 0) by one team per chunk, a histogram in team scratch (atomic adds
// only count).
template <class ExecutionSpace, class MemorySpace>
void routing_count_teams(ExecutionSpace const &space, Kokkos::View<int const *, MemorySpace> flat_idx, int S, int E,
                         int chunk, int nchunks, int team_size, Kokkos::View<int *, MemorySpace> table) {
  using team_policy = Kokkos::TeamPolicy<ExecutionSpace>;
  using member = typename team_policy::member_type;
  auto tp = compat::light(team_policy(space, nchunks > 0 ? nchunks : 1, team_size));
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

// The dropless index in one launch from chunk counts n (nchunks chunks of
// `per` assignments): one team per chunk sums, for each expert, the counts
// of all chunks and of the chunks before its own, scans the totals over
// the experts (the offsets; team 0 stores them and the counts), and places
// each of its assignments at its expert's start plus the earlier chunks'
// count plus its rank among the chunk's earlier assignments to the same
// expert (stable, no atomics); then, with `copy`, it copies each of its
// assignments' token rows to their sorted positions (16 bytes at a time
// where rows allow: the chunk's tokens are consecutive rows of from; the
// first loads are issued before the sums).
template <class ExecutionSpace, class MemorySpace, class T>
void routing_place_fused(ExecutionSpace const &space, Kokkos::View<int const *, MemorySpace> flat_idx, int S, int k,
                         int E, int per, int nchunks, int team_size, CountTable n, RoutingIndex<MemorySpace> const &R,
                         SortedRowCopy<T, MemorySpace> const &copy) {
  using team_policy = Kokkos::TeamPolicy<ExecutionSpace>;
  using member = typename team_policy::member_type;
  int const gmax = routing_fused_groups / E > 1 ? routing_fused_groups / E : 1;
  std::size_t const scratch = routing_fused_scratch(per, E);
  auto tp = compat::light(team_policy(space, nchunks > 0 ? nchunks : 1, team_size));
  tp.set_scratch_size(0, Kokkos::PerTeam(scratch));
  auto counts = R.counts;
  auto offsets = R.offsets;
  auto sorted = R.sorted_flat;
  auto position = R.position;
  auto from = copy.from;
  auto to = copy.to;
  bool const copying = to.data() != nullptr;
  bool const vec = copying && row_copy_vectors(copy);
  int const d = copying ? static_cast<int>(from.extent(1)) : 0;
  constexpr int V = sizeof(T) <= 16 && 16 % sizeof(T) == 0 ? static_cast<int>(16 / sizeof(T)) : 1;
  int const pieces = vec ? d / V : d;  // a row's units of copy
  constexpr int PF = 8;                 // pieces a thread has in flight
  Kokkos::parallel_for(
      "hexamoe::routing_place_fused", tp, KOKKOS_LAMBDA(member const &team) {
        auto &sh = team.team_shmem();
        int *ids = static_cast<int *>(sh.get_shmem(sizeof(int) * per));
        int *pos = static_cast<int *>(sh.get_shmem(sizeof(int) * per));
        int *start = static_cast<int *>(sh.get_shmem(sizeof(int) * E));  // this chunk's first position per expert
        int *tot = static_cast<int *>(sh.get_shmem(sizeof(int) * E));
        int *run = static_cast<int *>(sh.get_shmem(sizeof(int) * E));
        int *pb = static_cast<int *>(sh.get_shmem(sizeof(int) * gmax * E));
        int *pt = static_cast<int *>(sh.get_shmem(sizeof(int) * gmax * E));
        int const c = team.league_rank(), ts = team.team_size(), tr = team.team_rank();
        int const beg = c * per, here = S - beg < per ? S - beg : per;
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, here > 0 ? here : 0), [&](int i) { ids[i] = flat_idx(beg + i); });
        // Rows by 16-byte pieces, PF a thread at a time (piece j: q = j %
        // pieces of the row of assignment i = j / pieces): the first PF
        // loads are issued now, so that their latency overlaps the sums.
        int const total = vec && here > 0 ? here * pieces : 0;
        RowPiece buf[PF];
        auto load = [&](int j0) {
          for (int m = 0; m < PF; ++m) {
            int const j = j0 + m * ts;
            if (j < total)
              buf[m] = *reinterpret_cast<RowPiece const *>(&from((beg + j / pieces) / k, (j % pieces) * V));
          }
        };
        auto store = [&](int j0) {
          for (int m = 0; m < PF; ++m) {
            int const j = j0 + m * ts;
            if (j < total && pos[j / pieces] >= 0)
              *reinterpret_cast<RowPiece *>(&to(pos[j / pieces], (j % pieces) * V)) = buf[m];
          }
        };
        if (vec) load(tr);
        // Column sums in G groups of rows, in a fixed order.
        int G = ts / E;
        G = G < 1 ? 1 : (G > gmax ? gmax : G);
        for (int j = tr; j < G * E; j += ts) {
          int const e = j % E, g = j / E;
          int b = 0, a = 0;
          int r = g;
          for (; r + 3 * G < nchunks; r += 4 * G) {
            int const v0 = n(r, e), v1 = n(r + G, e), v2 = n(r + 2 * G, e), v3 = n(r + 3 * G, e);
            a += (v0 + v1) + (v2 + v3);
            b += (r < c ? v0 : 0) + (r + G < c ? v1 : 0) + (r + 2 * G < c ? v2 : 0) + (r + 3 * G < c ? v3 : 0);
          }
          for (; r < nchunks; r += G) {
            int const v = n(r, e);
            a += v;
            b += r < c ? v : 0;
          }
          pb[j] = b;
          pt[j] = a;
        }
        team.team_barrier();
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, E), [&](int e) {
          int b = 0, a = 0;
          for (int g = 0; g < G; ++g) b += pb[g * E + e], a += pt[g * E + e];
          start[e] = b;
          tot[e] = a;
          run[e] = a;
        });
        team.team_barrier();
        // Inclusive scan of the totals over the experts (pb as the other buffer).
        for (int off = 1; off < E; off <<= 1) {
          Kokkos::parallel_for(Kokkos::TeamThreadRange(team, E),
                               [&](int e) { pb[e] = run[e] + (e >= off ? run[e - off] : 0); });
          team.team_barrier();
          Kokkos::parallel_for(Kokkos::TeamThreadRange(team, E), [&](int e) { run[e] = pb[e]; });
          team.team_barrier();
        }
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, E), [&](int e) {
          int const first = run[e] - tot[e];  // expert e's first sorted position
          start[e] += first;
          if (c == 0) {
            counts(e) = tot[e];
            offsets(e) = first;
            if (e == E - 1) offsets(E) = run[e];
          }
        });
        team.team_barrier();
        Kokkos::parallel_for(Kokkos::TeamThreadRange(team, here > 0 ? here : 0), [&](int i) {
          int const e = ids[i];
          int const s = beg + i;
          if (e < 0 || e >= E) {
            position(s) = -1;
            pos[i] = -1;
            return;
          }
          int rank = 0;  // every thread reads ids[q] in the same order: broadcasts
          for (int q = 0; q < i; ++q) rank += ids[q] == e ? 1 : 0;
          int const p = start[e] + rank;
          sorted(p) = s;
          position(s) = p;
          pos[i] = p;
        });
        if (vec) {
          team.team_barrier();
          store(tr);
          for (int j0 = tr + PF * ts; j0 < total; j0 += PF * ts) {
            load(j0);
            store(j0);
          }
        } else if (copying) {
          team.team_barrier();
          Kokkos::parallel_for(Kokkos::TeamThreadRange(team, here > 0 ? here * pieces : 0), [&](int j) {
            int const i = j / pieces, q = j % pieces, p = pos[i];
            if (p >= 0) to(p, q) = from((beg + i) / k, q);
          });
        }
      });
}

// to(position(s), :) = from(t, :) for every kept assignment s of token t,
// 16 bytes at a time where rows allow.
template <class ExecutionSpace, class T, class MemorySpace>
void copy_sorted_rows(ExecutionSpace const &space, RoutingIndex<MemorySpace> const &R,
                      SortedRowCopy<T, MemorySpace> const &copy) {
  auto const position = R.position;
  auto from = copy.from;
  auto to = copy.to;
  int const k = R.top_k, d = static_cast<int>(from.extent(1));
  constexpr int V = sizeof(T) <= 16 && 16 % sizeof(T) == 0 ? static_cast<int>(16 / sizeof(T)) : 1;
  bool const vec = row_copy_vectors(copy);
  int const per = vec ? d / V : d;
  Kokkos::parallel_for(
      "hexamoe::copy_sorted_rows",
      Kokkos::RangePolicy<ExecutionSpace>(space, 0, std::size_t(R.num_assignments()) * per),
      KOKKOS_LAMBDA(std::size_t i) {
        int const s = static_cast<int>(i / per), q = static_cast<int>(i % per);
        int const p = position(s);
        if (p < 0) return;
        int const t = s / k;
        if (vec) {
          *reinterpret_cast<RowPiece *>(&to(p, q * V)) = *reinterpret_cast<RowPiece const *>(&from(t, q * V));
        } else {
          to(p, q) = from(t, q);
        }
      });
}

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
// given (optional): the assignments' counts per chunk, as the router made
// them (no count pass then). copy (optional, dropless only): rows copied
// into sorted order on the way (SortedRowCopy).
//
// Device backends, dropless, up to routing_fused_max_table chunks x
// experts: one launch (routing_place_fused) after the counts (given, or
// one team per chunk of assignments counting in team scratch), which
// places each assignment at its chunk's cursor plus its rank among the
// chunk's earlier assignments to the same expert (no atomics decide an
// order) and copies the rows. Otherwise count, scan and place in three
// launches (devices: teams; host backends: one thread per chunk walks its
// assignments in order), then the copy.
template <class ExecutionSpace, class MemorySpace, class Row = float>
RoutingIndex<MemorySpace> build_routing_index(ExecutionSpace const &space,
                                              Kokkos::View<int const **, Kokkos::LayoutRight, MemorySpace> idx,
                                              int num_experts, double capacity_factor = 0.0,
                                              bool validate = true, RoutingIndex<MemorySpace> const &reuse = {},
                                              ChunkCounts<MemorySpace> const &given = {},
                                              SortedRowCopy<Row, MemorySpace> const &copy = {}) {
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
  bool const copying = copy.to.data() != nullptr;
  if (given.per < 0 || (given.per > 0 && (given.n.extent(0) < std::size_t((S + given.per - 1) / given.per) ||
                                          given.n.extent(1) < std::size_t(E))))
    throw std::invalid_argument("build_routing_index: chunk counts [" + std::to_string(given.n.extent(0)) + ", " +
                                std::to_string(given.n.extent(1)) + "] of " + std::to_string(given.per) +
                                " assignments each do not cover " + std::to_string(S) + " assignments to " +
                                std::to_string(E) + " experts");
  if (copying && (capacity_factor != 0.0 || copy.from.extent(0) != std::size_t(T) ||
                  copy.to.extent(0) < std::size_t(S) || copy.to.extent(1) != copy.from.extent(1)))
    throw std::invalid_argument("build_routing_index: a copy of rows into sorted order needs a dropless index, [" +
                                std::to_string(T) + ", d] rows and room for " + std::to_string(S) + " of them; got [" +
                                std::to_string(copy.from.extent(0)) + ", " + std::to_string(copy.from.extent(1)) +
                                "] into [" + std::to_string(copy.to.extent(0)) + ", " +
                                std::to_string(copy.to.extent(1)) + "], capacity factor " +
                                std::to_string(capacity_factor));
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
  // Devices (dropless): the counts, then one launch.
  int const team_size = host ? 1 : 256;
  int const per_f = given.per > 0 ? given.per : chunk;
  int const nchunks_f = (S + per_f - 1) / per_f;
  if (detail::routing_fused<host>() && R.capacity == 0 &&
      std::size_t(nchunks_f) * std::size_t(E) <= detail::routing_fused_max_table &&
      detail::routing_fused_scratch(per_f, E) <= detail::routing_fused_max_scratch) {
    R.offsets = detail::routing_buffer(space, reuse.offsets, E + 1, "hexamoe::routing_offsets");
    R.counts = detail::routing_buffer(space, reuse.counts, E, "hexamoe::routing_counts");
    R.sorted_flat = detail::routing_buffer(space, reuse.sorted_flat, S, "hexamoe::routing_sorted_flat");
    R.position = detail::routing_buffer(space, reuse.position, S, "hexamoe::routing_position");
    detail::CountTable n{};
    if (given.per > 0) {
      R.workspace = reuse.workspace;
      n = detail::CountTable{given.n.data(), given.n.stride_0(), given.n.stride_1()};
    } else {
      R.workspace = detail::routing_buffer(space, reuse.workspace, ntab, "hexamoe::routing_table");
      detail::routing_count_teams(space, flat_idx, S, E, chunk, nchunks, team_size, R.workspace);
      n = detail::CountTable{R.workspace.data(), 1, std::size_t(nchunks)};
    }
    detail::routing_place_fused(space, flat_idx, S, k, E, per_f, nchunks_f, team_size, n, R, copy);
    return R;
  }

  // 1. Count per (expert, chunk), expert-major so that one scan orders by expert then chunk.
  R.workspace = detail::routing_buffer(space, reuse.workspace, ntab, "hexamoe::routing_table");
  auto table = R.workspace;
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
    detail::routing_count_teams(space, flat_idx, S, E, chunk, nchunks, team_size, table);
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
  if (copying) detail::copy_sorted_rows(space, R, copy);
  return R;
}

}  // namespace hexamoe
