// Estmm.hpp: ESTMM and ESS, the expert-specific reductions over assignments.
//
//   ESTMM: G[e] = sum_{p in e} A(p)^T B(p)   -> [E, M, N]  (weight gradients)
//   ESS:   g[e] = sum_{p in e} B(p)          -> [E, N]     (bias gradients)
//
// A and B are read through the routing index (RowOperand). A team owns one
// (expert, M tile, N tile) and walks that expert's assignments in order, so
// every output element is written once, by one team, in a fixed order:
// deterministic, no atomics. Experts without assignments get zeros. ESTMM can
// produce ESS of B in the same pass (bias_out), saving a read of B.
#pragma once

#include "Esmm.hpp"

namespace hexamoe {
namespace detail {

template <class ExecutionSpace, class TA, class TB, class TO, class MemorySpace>
struct EstmmKernel {
  static constexpr bool host = runs_on_host<ExecutionSpace>;
  using Shape = TileShape<host>;
  using Acc = accumulator_t<TO>;
  using member_type = typename Kokkos::TeamPolicy<ExecutionSpace>::member_type;

  RoutingIndex<MemorySpace> R;
  RowOperand<TA, MemorySpace> a;
  RowOperand<TB, MemorySpace> b;
  Kokkos::View<TO ***, Kokkos::LayoutRight, MemorySpace> out;
  Kokkos::View<TO **, Kokkos::LayoutRight, MemorySpace> bias_out;
  int M, N, m_tiles, n_tiles;

  KOKKOS_INLINE_FUNCTION void operator()(member_type const &team) const {
    int const league = team.league_rank();
    int const nt = league % n_tiles;
    int const mt = (league / n_tiles) % m_tiles;
    int const e = league / (n_tiles * m_tiles);
    int const m0 = mt * Shape::TM, n0 = nt * Shape::TN;
    int const rows = (M - m0) < Shape::TM ? (M - m0) : Shape::TM;
    int const cols = (N - n0) < Shape::TN ? (N - n0) : Shape::TN;
    int const pbeg = R.offsets(e), pend = R.offsets(e + 1);
    int const k = R.top_k;
    bool const do_bias = bias_out.data() != nullptr && mt == 0;

    Acc *xs = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TM * Shape::TK));
    Acc *ws = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TK * Shape::TN));
    Acc *cs = nullptr;
    if constexpr (host) {
      cs = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TM * Shape::TN));
      for (int i = 0; i < Shape::TM * Shape::TN; ++i) cs[i] = Acc(0);
    }
    int const tr = host ? 0 : team.team_rank() / (Shape::TN / Shape::RN);
    int const tc = host ? 0 : team.team_rank() % (Shape::TN / Shape::RN);
    constexpr int BS = host ? Shape::TN : Shape::RN;  // bias columns this thread sums
    Acc bsum[BS];
    for (int c = 0; c < BS; ++c) bsum[c] = Acc(0);
    Acc acc[Shape::RM][Shape::RN];
    for (int r = 0; r < Shape::RM; ++r)
      for (int c = 0; c < Shape::RN; ++c) acc[r][c] = Acc(0);

    for (int p0 = pbeg; p0 < pend; p0 += Shape::TK) {
      int const tk = (pend - p0) < Shape::TK ? (pend - p0) : Shape::TK;
      team.team_barrier();
      // xs[m][kk] = A(p0 + kk)[m0 + m]  (A^T staged), ws[kk][n] = B(p0 + kk)[n0 + n]
      if constexpr (host) {
        for (int kk = 0; kk < tk; ++kk) {
          int const p = p0 + kk;
          int const flat = R.sorted_flat(p);
          Acc const sa = a.scale(flat), sb = b.scale(flat);
          TA const *ar = &a.rows(a.row(p, flat, k), m0);
          TB const *br = &b.rows(b.row(p, flat, k), n0);
          for (int m = 0; m < rows; ++m) xs[m * Shape::TK + kk] = sa * to_acc<Acc>(ar[m]);
          Acc *dst = ws + kk * Shape::TN;
          for (int n = 0; n < cols; ++n) dst[n] = sb * to_acc<Acc>(br[n]);
          for (int n = cols; n < Shape::TN; ++n) dst[n] = Acc(0);  // the fused ESS sums whole rows
        }
      } else {
        team_for_2d<host>(team, Shape::TK, Shape::TM, [&](int kk, int m) {
          Acc v = Acc(0);
          if (kk < tk && m < rows) {
            int const p = p0 + kk;
            int const flat = R.sorted_flat(p);
            v = a.scale(flat) * to_acc<Acc>(a.rows(a.row(p, flat, k), m0 + m));
          }
          xs[m * Shape::TK + kk] = v;
        });
        team_for_2d<host>(team, Shape::TK, Shape::TN, [&](int kk, int n) {
          Acc v = Acc(0);
          if (kk < tk && n < cols) {
            int const p = p0 + kk;
            int const flat = R.sorted_flat(p);
            v = b.scale(flat) * to_acc<Acc>(b.rows(b.row(p, flat, k), n0 + n));
          }
          ws[kk * Shape::TN + n] = v;
        });
      }
      team.team_barrier();
      if constexpr (host) {
        host_tile_accumulate<Shape>(xs, ws, cs, rows, cols, tk);
        if (do_bias)
          for (int kk = 0; kk < tk; ++kk)
            for (int c = 0; c < Shape::TN; ++c) bsum[c] += ws[kk * Shape::TN + c];
      } else {
        if (tr * Shape::RM < rows && tc * Shape::RN < cols)
          device_thread_accumulate<Shape>(acc, xs, ws, tr * Shape::RM, tc * Shape::RN, tk);
        if (do_bias && tr == 0)
          for (int kk = 0; kk < tk; ++kk)
            for (int c = 0; c < Shape::RN; ++c) bsum[c] += ws[kk * Shape::TN + tc * Shape::RN + c];
      }
    }

    if constexpr (host) {
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) out(e, m0 + r, n0 + c) = static_cast<TO>(cs[r * Shape::TN + c]);
      if (do_bias)
        for (int c = 0; c < cols; ++c) bias_out(e, n0 + c) = static_cast<TO>(bsum[c]);
    } else {
      for (int r = 0; r < Shape::RM; ++r) {
        int const rr = tr * Shape::RM + r;
        if (rr >= rows) break;
        for (int c = 0; c < Shape::RN; ++c) {
          int const cc = tc * Shape::RN + c;
          if (cc < cols) out(e, m0 + rr, n0 + cc) = static_cast<TO>(acc[r][c]);
        }
      }
      if (do_bias && tr == 0)
        for (int c = 0; c < Shape::RN; ++c) {
          int const cc = tc * Shape::RN + c;
          if (cc < cols) bias_out(e, n0 + cc) = static_cast<TO>(bsum[c]);
        }
    }
  }
};

template <class ExecutionSpace, class TB, class TO, class MemorySpace>
struct EssKernel {
  using Acc = accumulator_t<TO>;
  RoutingIndex<MemorySpace> R;
  RowOperand<TB, MemorySpace> b;
  Kokkos::View<TO **, Kokkos::LayoutRight, MemorySpace> out;
  int N;

  // One thread per (expert, column): consecutive threads read consecutive columns.
  KOKKOS_INLINE_FUNCTION void operator()(int i) const {
    int const e = i / N, n = i % N;
    Acc s = Acc(0);
    for (int p = R.offsets(e); p < R.offsets(e + 1); ++p) {
      int const flat = R.sorted_flat(p);
      s += b.scale(flat) * to_acc<Acc>(b.rows(b.row(p, flat, R.top_k), n));
    }
    out(e, n) = static_cast<TO>(s);
  }
};

template <class T, class MemorySpace>
void check_operand_rows(RowOperand<T, MemorySpace> const &v, RoutingIndex<MemorySpace> const &R, std::string const &op,
                        char const *name) {
  std::size_t const need = v.source == RowSource::sorted ? std::size_t(R.num_assignments()) : std::size_t(R.num_tokens);
  require(v.rows.extent(0) == need, op,
          std::string(name) + " has " + std::to_string(v.rows.extent(0)) + " rows, expected " + std::to_string(need));
  require(v.source != RowSource::token_gated || v.gate.extent(0) == std::size_t(R.num_assignments()), op,
          std::string(name) + ": gate has " + std::to_string(v.gate.extent(0)) + " entries, expected T*k = " +
              std::to_string(R.num_assignments()));
}

}  // namespace detail

// ESTMM: out[e] = sum_{p in e} A(p)^T B(p), out is [E, M, N] with M = A's
// columns and N = B's. bias_out (optional, [E, N]) receives ESS(B) fused.
template <class ExecutionSpace, class TA, class TB, class TO, class MemorySpace>
void estmm(ExecutionSpace const &space, RoutingIndex<MemorySpace> const &R, RowOperand<TA, MemorySpace> const &a,
           RowOperand<TB, MemorySpace> const &b, Kokkos::View<TO ***, Kokkos::LayoutRight, MemorySpace> out,
           Kokkos::View<TO **, Kokkos::LayoutRight, MemorySpace> bias_out = {}) {
  static_assert(Kokkos::SpaceAccessibility<ExecutionSpace, MemorySpace>::accessible,
                "estmm: execution space cannot access the operands' memory space");
  using detail::extents;
  using detail::require;
  compat::ScopedRegion region("hexamoe::estmm");
  std::string const op = "estmm";
  int const E = R.num_experts, M = a.cols(), N = b.cols();
  detail::check_operand_rows(a, R, op, "A");
  detail::check_operand_rows(b, R, op, "B");
  require(out.extent(0) == std::size_t(E) && out.extent(1) == std::size_t(M) && out.extent(2) == std::size_t(N), op,
          "output is " + extents(out) + ", expected [" + std::to_string(E) + ", " + std::to_string(M) + ", " +
              std::to_string(N) + "]");
  require(bias_out.data() == nullptr || (bias_out.extent(0) == std::size_t(E) && bias_out.extent(1) == std::size_t(N)),
          op, "bias output is " + extents(bias_out) + ", expected [" + std::to_string(E) + ", " + std::to_string(N) + "]");
  if (M == 0 || N == 0) return;
  using Kernel = detail::EstmmKernel<ExecutionSpace, TA, TB, TO, MemorySpace>;
  using Shape = typename Kernel::Shape;
  int const m_tiles = (M + Shape::TM - 1) / Shape::TM, n_tiles = (N + Shape::TN - 1) / Shape::TN;
  Kernel kernel{R, a, b, out, bias_out, M, N, m_tiles, n_tiles};
  Kokkos::TeamPolicy<ExecutionSpace> policy(space, E * m_tiles * n_tiles, Kernel::host ? 1 : Shape::team_size);
  policy.set_scratch_size(0, Kokkos::PerTeam(detail::tile_scratch_bytes<typename Kernel::Acc, Shape>(Kernel::host)));
  Kokkos::parallel_for("hexamoe::estmm", policy, kernel);
}

// ESS: out[e] = sum_{p in e} B(p), out is [E, N].
template <class ExecutionSpace, class TB, class TO, class MemorySpace>
void ess(ExecutionSpace const &space, RoutingIndex<MemorySpace> const &R, RowOperand<TB, MemorySpace> const &b,
         Kokkos::View<TO **, Kokkos::LayoutRight, MemorySpace> out) {
  static_assert(Kokkos::SpaceAccessibility<ExecutionSpace, MemorySpace>::accessible,
                "ess: execution space cannot access the operands' memory space");
  compat::ScopedRegion region("hexamoe::ess");
  int const E = R.num_experts, N = b.cols();
  detail::check_operand_rows(b, R, "ess", "B");
  detail::require(out.extent(0) == std::size_t(E) && out.extent(1) == std::size_t(N), "ess",
                  "output is " + detail::extents(out) + ", expected [" + std::to_string(E) + ", " + std::to_string(N) + "]");
  if (N == 0) return;
  Kokkos::parallel_for("hexamoe::ess", Kokkos::RangePolicy<ExecutionSpace>(space, 0, E * N),
                       detail::EssKernel<ExecutionSpace, TB, TO, MemorySpace>{R, b, out, N});
}

}  // namespace hexamoe
