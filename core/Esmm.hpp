// Esmm.hpp: ESMM, the expert-specific matrix multiply.
//
//   Y[p] = epilogue( X[row(p)] W[e_p] (+ b[e_p]) )   for every sorted position p
//
// X is read through the routing index (no gathered copy), W[e] is [K, N] or,
// with transpose_w, an [N, K] array read as its transpose in place (no
// transposed copy). A team owns a tile of one expert's assignments x output
// columns; there is no capacity buffer and no padding row is computed.
// Fused epilogues: bias, activation (storing the pre- and/or post-activation),
// multiplication by act'(z) (backward), and a scatter to token rows scaled by
// the gate (the combine for top-1: each output row written once).
#pragma once

#include "Activation.hpp"
#include "RoutingIndex.hpp"
#include "RowOperand.hpp"
#include "TileGemm.hpp"

#include <sstream>
#include <stdexcept>

namespace hexamoe {

template <class TY, class MemorySpace>
struct EsmmEpilogue {
  using acc_type = accumulator_t<TY>;
  template <class V>
  using view2 = Kokkos::View<V **, Kokkos::LayoutRight, MemorySpace>;

  // Without act_grad_of: post and token_out receive act(value).
  // With act_grad_of (backward): the value is multiplied by act'(act_grad_of)
  // and stored as it is (pre, post and token_out alike).
  Activation act = Activation::identity;
  view2<TY> pre;                 // [S, N] value before the activation (optional)
  view2<TY> post;                // [S, N] act(value) (optional)
  view2<TY const> act_grad_of;   // [S, N] z of act'(z) (optional; pre may alias it)
  view2<TY> token_out;           // [T, N] row t(p) = gate * act(value); top-1 only (optional)
  Kokkos::View<acc_type const *, MemorySpace> token_gate;  // [S] by flat id (optional, else 1)
};

namespace detail {

template <class ExecutionSpace, class TX, class TW, class TY, class MemorySpace>
struct EsmmKernel {
  static constexpr bool host = runs_on_host<ExecutionSpace>;
  using Shape = TileShape<host>;
  using Acc = accumulator_t<TY>;
  using member_type = typename Kokkos::TeamPolicy<ExecutionSpace>::member_type;

  RoutingIndex<MemorySpace> R;
  RowOperand<TX, MemorySpace> x;
  Kokkos::View<TW const ***, Kokkos::LayoutRight, MemorySpace> w;
  Kokkos::View<TW const **, Kokkos::LayoutRight, MemorySpace> bias;
  EsmmEpilogue<TY, MemorySpace> ep;
  bool transpose_w;
  bool has_bias;
  int K, N, col_tiles;

  KOKKOS_INLINE_FUNCTION void operator()(member_type const &team) const {
    int const league = team.league_rank();
    int const ct = league % col_tiles;
    int tile = league / col_tiles;
    // Find this team's expert and row tile (tiles never straddle experts).
    int e = 0;
    int const E = R.num_experts;
    for (; e < E; ++e) {
      int const nt = (R.counts(e) + Shape::TM - 1) / Shape::TM;
      if (tile < nt) break;
      tile -= nt;
    }
    if (e == E) return;  // past the last tile (the league is an upper bound)
    int const p0 = R.offsets(e) + tile * Shape::TM;
    int const rows = (R.counts(e) - tile * Shape::TM) < Shape::TM ? (R.counts(e) - tile * Shape::TM) : Shape::TM;
    int const c0 = ct * Shape::TN;
    int const cols = (N - c0) < Shape::TN ? (N - c0) : Shape::TN;
    int const k = R.top_k;

    Acc *xs = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TM * Shape::TK));
    Acc *ws = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TK * Shape::TN));
    Acc *cs = nullptr;
    if constexpr (host) {
      cs = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TM * Shape::TN));
      for (int i = 0; i < Shape::TM * Shape::TN; ++i) cs[i] = Acc(0);
    }

    int const tr = host ? 0 : team.team_rank() / (Shape::TN / Shape::RN);
    int const tc = host ? 0 : team.team_rank() % (Shape::TN / Shape::RN);
    Acc acc[Shape::RM][Shape::RN];
    for (int r = 0; r < Shape::RM; ++r)
      for (int c = 0; c < Shape::RN; ++c) acc[r][c] = Acc(0);

    auto const we = Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL);
    for (int k0 = 0; k0 < K; k0 += Shape::TK) {
      int const tk = (K - k0) < Shape::TK ? (K - k0) : Shape::TK;
      team.team_barrier();
      if constexpr (host) {
        // One thread: resolve each row once, then convert a contiguous run.
        for (int r = 0; r < rows; ++r) {
          int const p = p0 + r;
          int const flat = R.sorted_flat(p);
          Acc const sc = x.scale(flat);
          TX const *src = &x.rows(x.row(p, flat, k), k0);
          Acc *dst = xs + r * Shape::TK;
          for (int kk = 0; kk < tk; ++kk) dst[kk] = sc * to_acc<Acc>(src[kk]);
        }
        if (transpose_w) {
          for (int c = 0; c < cols; ++c) {
            TW const *src = &we(c0 + c, k0);
            for (int kk = 0; kk < tk; ++kk) ws[kk * Shape::TN + c] = to_acc<Acc>(src[kk]);
          }
        } else {
          for (int kk = 0; kk < tk; ++kk) {
            TW const *src = &we(k0 + kk, c0);
            Acc *dst = ws + kk * Shape::TN;
            for (int c = 0; c < cols; ++c) dst[c] = to_acc<Acc>(src[c]);
          }
        }
      } else {
        // Stage X rows (through the index, gate-scaled if asked) ...
        team_for_2d<host>(team, Shape::TM, Shape::TK, [&](int r, int kk) {
          Acc v = Acc(0);
          if (r < rows && kk < tk) {
            int const p = p0 + r;
            int const flat = R.sorted_flat(p);
            v = x.scale(flat) * to_acc<Acc>(x.rows(x.row(p, flat, k), k0 + kk));
          }
          xs[r * Shape::TK + kk] = v;
        });
        // ... and the weight chunk, transposed in place when asked.
        if (transpose_w) {
          team_for_2d<host>(team, Shape::TN, Shape::TK, [&](int c, int kk) {
            ws[kk * Shape::TN + c] = (c < cols && kk < tk) ? to_acc<Acc>(we(c0 + c, k0 + kk)) : Acc(0);
          });
        } else {
          team_for_2d<host>(team, Shape::TK, Shape::TN, [&](int kk, int c) {
            ws[kk * Shape::TN + c] = (c < cols && kk < tk) ? to_acc<Acc>(we(k0 + kk, c0 + c)) : Acc(0);
          });
        }
      }
      team.team_barrier();
      if constexpr (host) {
        host_tile_accumulate<Shape>(xs, ws, cs, rows, cols, tk);
      } else {
        if (tr * Shape::RM < rows && tc * Shape::RN < cols)
          device_thread_accumulate<Shape>(acc, xs, ws, tr * Shape::RM, tc * Shape::RN, tk);
      }
    }

    if constexpr (host) {
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; ++c) epilogue(e, p0 + r, c0 + c, k, cs[r * Shape::TN + c]);
    } else {
      for (int r = 0; r < Shape::RM; ++r) {
        int const rr = tr * Shape::RM + r;
        if (rr >= rows) break;
        for (int c = 0; c < Shape::RN; ++c) {
          int const cc = tc * Shape::RN + c;
          if (cc < cols) epilogue(e, p0 + rr, c0 + cc, k, acc[r][c]);
        }
      }
    }
  }

  KOKKOS_INLINE_FUNCTION void epilogue(int e, int p, int n, int k, Acc v) const {
    if (has_bias) v += to_acc<Acc>(bias(e, n));
    if (ep.act_grad_of.data() != nullptr) v *= activate_grad(ep.act, to_acc<Acc>(ep.act_grad_of(p, n)));
    if (ep.pre.data() != nullptr) ep.pre(p, n) = from_acc<TY>(v);
    if (ep.post.data() != nullptr || ep.token_out.data() != nullptr) {
      Acc const a = ep.act_grad_of.data() != nullptr ? v : activate(ep.act, v);
      if (ep.post.data() != nullptr) ep.post(p, n) = from_acc<TY>(a);
      if (ep.token_out.data() != nullptr) {
        int const flat = R.sorted_flat(p);
        Acc const g = ep.token_gate.data() != nullptr ? ep.token_gate(flat) : Acc(1);
        ep.token_out(flat / k, n) = from_acc<TY>(g * a);
      }
    }
  }
};

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

}  // namespace detail

// ESMM: see the file comment. W is [E, K, N], or [E, N, K] with transpose_w.
// bias (optional, may be an empty view) is [E, N].
template <class ExecutionSpace, class TX, class TW, class TY, class MemorySpace>
void esmm(ExecutionSpace const &space, RoutingIndex<MemorySpace> const &R, RowOperand<TX, MemorySpace> const &x,
          Kokkos::View<TW const ***, Kokkos::LayoutRight, MemorySpace> w, bool transpose_w,
          Kokkos::View<TW const **, Kokkos::LayoutRight, MemorySpace> bias, EsmmEpilogue<TY, MemorySpace> const &ep) {
  static_assert(Kokkos::SpaceAccessibility<ExecutionSpace, MemorySpace>::accessible,
                "esmm: execution space cannot access the operands' memory space");
  using detail::extents;
  using detail::require;
  compat::ScopedRegion region("hexamoe::esmm");
  std::string const op = "esmm";
  int const E = R.num_experts, T = R.num_tokens, S = R.num_assignments();
  require(w.extent(0) == static_cast<std::size_t>(E), op,
          "W has " + std::to_string(w.extent(0)) + " experts, the routing index " + std::to_string(E));
  int const K = static_cast<int>(transpose_w ? w.extent(2) : w.extent(1));
  int const N = static_cast<int>(transpose_w ? w.extent(1) : w.extent(2));
  require(x.cols() == K, op, "X has " + std::to_string(x.cols()) + " columns but W" + (transpose_w ? "^T" : "") +
                                 " has " + std::to_string(K) + " rows (W is " + extents(w) + ")");
  std::size_t const need_rows = x.source == RowSource::sorted ? std::size_t(S) : std::size_t(T);
  require(x.rows.extent(0) == need_rows, op,
          std::string("X has ") + std::to_string(x.rows.extent(0)) + " rows, expected " + std::to_string(need_rows) +
              (x.source == RowSource::sorted ? " (one per assignment)" : " (one per token)"));
  require(x.source != RowSource::token_gated || x.gate.extent(0) == std::size_t(S), op,
          "gate has " + std::to_string(x.gate.extent(0)) + " entries, expected T*k = " + std::to_string(S));
  bool const has_bias = bias.data() != nullptr;
  require(!has_bias || (bias.extent(0) == std::size_t(E) && bias.extent(1) == std::size_t(N)), op,
          "bias is " + extents(bias) + ", expected [" + std::to_string(E) + ", " + std::to_string(N) + "]");
  auto check_sn = [&](auto const &v, char const *name) {
    require(v.data() == nullptr || (v.extent(0) == std::size_t(S) && v.extent(1) == std::size_t(N)), op,
            std::string(name) + " is " + extents(v) + ", expected [" + std::to_string(S) + ", " + std::to_string(N) + "]");
  };
  check_sn(ep.pre, "pre-activation output");
  check_sn(ep.post, "output");
  check_sn(ep.act_grad_of, "act' input");
  if (ep.token_out.data() != nullptr) {
    require(R.top_k == 1, op, "the fused token output needs top_k = 1 (use the combine for top_k > 1)");
    require(R.capacity == 0, op, "the fused token output needs a dropless routing index");
    require(ep.token_out.extent(0) == std::size_t(T) && ep.token_out.extent(1) == std::size_t(N), op,
            "token output is " + extents(ep.token_out) + ", expected [" + std::to_string(T) + ", " + std::to_string(N) + "]");
    require(ep.token_gate.data() == nullptr || ep.token_gate.extent(0) == std::size_t(S), op,
            "token gate has " + std::to_string(ep.token_gate.extent(0)) + " entries, expected " + std::to_string(S));
  }
  if (S == 0 || N == 0) return;

  using Kernel = detail::EsmmKernel<ExecutionSpace, TX, TW, TY, MemorySpace>;
  using Shape = typename Kernel::Shape;
  int const col_tiles = (N + Shape::TN - 1) / Shape::TN;
  int const row_tiles = (S + Shape::TM - 1) / Shape::TM + E;  // upper bound on sum_e ceil(count_e / TM)
  Kernel kernel{R, x, w, bias, ep, transpose_w, has_bias, K, N, col_tiles};
  Kokkos::TeamPolicy<ExecutionSpace> policy(space, row_tiles * col_tiles, Kernel::host ? 1 : Shape::team_size);
  policy.set_scratch_size(0, Kokkos::PerTeam(detail::tile_scratch_bytes<typename Kernel::Acc, Shape>(Kernel::host)));
  Kokkos::parallel_for("hexamoe::esmm", policy, kernel);
}

}  // namespace hexamoe
