// Router.hpp: the top-k router of an MoE layer and its backward pass.
//
//   logits = x Wr + br,  p = softmax(logits) (in the accumulation type, float32
//   for float and bf16 storage), idx = top-k of p per token (ties: lower expert
//   first), gate g = p[idx] (optionally renormalised over the k).
//   L_aux = a * E * sum_e f_e P_e   (Switch/GShard; f_e = share of assignments
//           to e, no gradient; P_e = mean_t p[t, e])
//   L_z   = b * mean_t logsumexp(logits_t)^2   (router z-loss)
// Backward turns dL/dg (from the experts) and both losses into dlogits, then
// into dWr, dbr and the router's share of dx.
//
// On CUDA (bf16 and float32 storage, at most 64 experts) the forward is one
// tensor-core kernel with the statistics and losses fused (RouterMma.hpp;
// HEXAMOE_ROUTER_MMA=0 selects the kernels below instead).
// Elsewhere kernels are hierarchical (team threads x vector lanes; one thread and one
// lane per team on hosts, warp-wide vectors on GPUs, see RouterShape). Logits:
// a thread per token, vector-lane reductions over d (coalesced rows of x)
// against a transposed copy of Wr (one lane: a GEMV row, SIMD over experts).
// The per-expert statistics and [x 1]^T dlogits are two-stage reductions: per
// token chunk into a partial buffer, then a fixed-order sum over chunks (hosts
// use one chunk, so every sum runs in token order as a plain loop would).
// No floating-point atomics: repeat runs are bit-identical.
#pragma once

#include "BFloat16.hpp"
#include "Compat.hpp"
#include "Parameter.hpp"
#include "RouterMma.hpp"
#include "RoutingIndex.hpp"

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <stdexcept>
#include <string>
#include <utility>

namespace hexamoe {

struct RouterOptions {
  int top_k = 1;
  bool renormalize = false;
  double aux_loss_weight = 0.0;
  double z_loss_weight = 0.0;
};

// Launch shape of the router kernels. The defaults suit the backend; tests set
// GPU-like shapes on the host to cover the chunking and column blocking.
struct RouterShape {
  int team = 1;       // threads per team (one token per thread in the forward)
  int vector = 1;     // vector lanes per thread
  int chunk = 512;    // tokens per partial sum (statistics, weight gradient)
  int columns = 256;  // weight-gradient columns of x (plus the bias column) per team
};

template <class ExecutionSpace>
RouterShape default_router_shape() {
  if constexpr (Kokkos::SpaceAccessibility<ExecutionSpace, Kokkos::HostSpace>::accessible) {
    // One thread: one chunk (sums in token order, no partials to add up).
    return RouterShape{1, 1, std::numeric_limits<int>::max(), 256};
  } else {
    return RouterShape{8, 32, 256, 32};  // 32 lanes: one warp (half a HIP wavefront) per thread
  }
}

namespace detail {

// Experts handled together by one vector reduction (registers per lane).
inline constexpr int router_expert_block = 8;

KOKKOS_INLINE_FUNCTION int router_padded_experts(int E) {
  return (E + router_expert_block - 1) / router_expert_block * router_expert_block;
}

inline int router_chunks(int tokens, int chunk) { return tokens > 0 ? 1 + (tokens - 1) / chunk : 0; }

// Elements of x per 16-byte vector in the router's logits (0: no vector path).
template <class T, class Acc>
inline constexpr int router_x_vector =
    std::is_same_v<Acc, float> && std::is_same_v<std::remove_const_t<T>, bfloat16> ? 8
    : std::is_same_v<Acc, float> && std::is_same_v<std::remove_const_t<T>, float> ? 4
                                                                                   : 0;

struct alignas(16) RouterVec16 {
  std::uint32_t u[4];
};
struct alignas(16) RouterFloat4 {
  float v[4];
};

// 16 bytes of x (8 bf16 or 4 float) as float.
KOKKOS_INLINE_FUNCTION void router_load_x(bfloat16 const *p, float (&v)[8]) {
  RouterVec16 const r = *reinterpret_cast<RouterVec16 const *>(p);
  for (int j = 0; j < 8; ++j) v[j] = bfloat16::to_float(static_cast<std::uint16_t>(r.u[j >> 1] >> ((j & 1) * 16)));
}
KOKKOS_INLINE_FUNCTION void router_load_x(float const *p, float (&v)[4]) {
  RouterFloat4 const r = *reinterpret_cast<RouterFloat4 const *>(p);
  for (int j = 0; j < 4; ++j) v[j] = r.v[j];
}
// N floats of a transposed-weight row (16-byte aligned).
template <int N>
KOKKOS_INLINE_FUNCTION void router_load_w(float const *p, float (&v)[N]) {
  for (int h = 0; h < N / 4; ++h) {
    RouterFloat4 const r = reinterpret_cast<RouterFloat4 const *>(p)[h];
    for (int j = 0; j < 4; ++j) v[4 * h + j] = r.v[j];
  }
}

// One block of logits over the vector lanes from 16-byte vectors of x:
// lg.v[q] = sum_i x[i] Wt(e0 + q, i) (XV elements of x per lane step).
template <int XV, class Member, class T, class WtView, class Logits>
KOKKOS_INLINE_FUNCTION void router_logits_vec(Member const &team, T const *xrow, WtView const &Wt, int e0, int d,
                                              Logits &lg) {
  if constexpr (XV > 0) {
    Kokkos::parallel_reduce(
        Kokkos::ThreadVectorRange(team, d / XV),
        [&](int c, Logits &s) {
          float xv[XV];
          router_load_x(xrow + c * XV, xv);
          for (int q = 0; q < router_expert_block; ++q) {
            float w[XV];
            router_load_w<XV>(&Wt(e0 + q, c * XV), w);
            for (int j = 0; j < XV; ++j) s.v[q] += xv[j] * w[j];
          }
        },
        lg);
  } else {
    (void)team, (void)xrow, (void)Wt, (void)e0, (void)d, (void)lg;
  }
}

// Nested-reduction values (joined with +=, identity from the default
// constructor, as Kokkos's sum reductions require): the maximum, and the
// largest probability with ties to the lower expert.
template <class Acc>
struct RouterMax {
  Acc v;
  bool set;
  KOKKOS_INLINE_FUNCTION RouterMax() : v(Acc(0)), set(false) {}
  KOKKOS_INLINE_FUNCTION void take(Acc x) {
    if (!set || x > v) {
      v = x;
      set = true;
    }
  }
  KOKKOS_INLINE_FUNCTION RouterMax &operator+=(RouterMax const &o) {
    if (o.set) take(o.v);
    return *this;
  }
};
template <class Acc>
struct RouterArgMax {
  Acc v;
  int e;
  KOKKOS_INLINE_FUNCTION RouterArgMax() : v(Acc(-1)), e(-1) {}
  KOKKOS_INLINE_FUNCTION void take(Acc pv, int pe) {
    if (e < 0 || pv > v || (pv == v && pe < e)) {
      v = pv;
      e = pe;
    }
  }
  KOKKOS_INLINE_FUNCTION RouterArgMax &operator+=(RouterArgMax const &o) {
    if (o.e >= 0) take(o.v, o.e);
    return *this;
  }
};

// A block of logits summed across vector lanes (default-constructed zero: the
// identity of Kokkos's nested sum reductions).
template <class Acc>
struct RouterLogitBlock {
  Acc v[router_expert_block];
  KOKKOS_INLINE_FUNCTION RouterLogitBlock() {
    for (int q = 0; q < router_expert_block; ++q) v[q] = Acc(0);
  }
  KOKKOS_INLINE_FUNCTION RouterLogitBlock &operator+=(RouterLogitBlock const &o) {
    for (int q = 0; q < router_expert_block; ++q) v[q] += o.v[q];
    return *this;
  }
};

// Per-expert probability sums and assignment counts of a block of experts.
template <class Acc>
struct RouterStatBlock {
  Acc p[router_expert_block];
  int n[router_expert_block];
  KOKKOS_INLINE_FUNCTION RouterStatBlock() {
    for (int q = 0; q < router_expert_block; ++q) {
      p[q] = Acc(0);
      n[q] = 0;
    }
  }
  KOKKOS_INLINE_FUNCTION RouterStatBlock &operator+=(RouterStatBlock const &o) {
    for (int q = 0; q < router_expert_block; ++q) {
      p[q] += o.p[q];
      n[q] += o.n[q];
    }
    return *this;
  }
};

}  // namespace detail

template <class T, class ExecutionSpace>
class Router {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using Acc = accumulator_t<T>;
  static constexpr bool host = Kokkos::SpaceAccessibility<ExecutionSpace, Kokkos::HostSpace>::accessible;
  // Transposed weight Wt(e, i): contiguous along i on devices (lanes walk d),
  // along e on hosts (a block of experts is one SIMD vector).
  using weight_t_type = Kokkos::View<Acc **, std::conditional_t<host, Kokkos::LayoutLeft, Kokkos::LayoutRight>, memory_space>;

  Router() = default;
  Router(int dim, int experts, RouterOptions opt) : dim_(dim), experts_(experts), opt_(opt) {
    weight = Matrix<Acc, memory_space>("hexamoe::router.weight", dim, experts);
    bias = Kokkos::View<Acc *, memory_space>("hexamoe::router.bias", experts);
    weight_grad = Matrix<Acc, memory_space>("hexamoe::router.weight_grad", dim, experts);
    bias_grad = Kokkos::View<Acc *, memory_space>("hexamoe::router.bias_grad", experts);
    losses_ = Kokkos::View<Acc *, memory_space>("hexamoe::router.losses", 2);
    stats_ = Matrix<Acc, memory_space>("hexamoe::router.stats", 2, experts);
    // Zero-initialised: the padding rows (experts E..Epad) stay zero.
    weight_t_ = weight_t_type("hexamoe::router.weight_t", detail::router_padded_experts(experts), dim);
  }

  int dim() const { return dim_; }
  int experts() const { return experts_; }
  RouterOptions const &options() const { return opt_; }

  // Launch shape; a new one takes effect at the next forward (the results of
  // the last forward are dropped).
  RouterShape const &shape() const { return shape_; }
  void set_shape(RouterShape s) {
    if (s.team < 1 || s.vector < 1 || s.chunk < 1 || s.columns < 1)
      throw std::invalid_argument("Router: shape needs team, vector, chunk and columns >= 1");
    shape_ = s;
    drop_results();
  }

  Matrix<Acc, memory_space> weight;  // [d, E]
  Kokkos::View<Acc *, memory_space> bias;
  Matrix<Acc, memory_space> weight_grad;
  Kokkos::View<Acc *, memory_space> bias_grad;

  // Results of the last forward (valid until the next one).
  Matrix<Acc, memory_space> probs;             // [T, E]
  Kokkos::View<Acc *, memory_space> lse;        // [T] logsumexp of the logits
  Kokkos::View<int **, Kokkos::LayoutRight, memory_space> idx;  // [T, k]
  Kokkos::View<Acc *, memory_space> gate;       // [T*k], flat id t*k + j

  void forward(ExecutionSpace const &space, Matrix<T const, memory_space> x) {
    compat::ScopedRegion region("hexamoe::Router::forward");
    (void)routed_rows("Router", x.extent(0), opt_.top_k);
    int const T_ = static_cast<int>(x.extent(0)), d = dim_, E = experts_, k = opt_.top_k;
    if (static_cast<int>(x.extent(1)) != d)
      throw std::invalid_argument("Router: x has " + std::to_string(x.extent(1)) + " columns, the router dimension is " +
                                  std::to_string(d));
    ensure(space, T_);
    constexpr int EB = detail::router_expert_block;
    int const Ep = detail::router_padded_experts(E);
    int const ts = shape_.team, vl = shape_.vector, cs = shape_.chunk;
    int const nch = detail::router_chunks(T_, cs);
    using policy = Kokkos::TeamPolicy<ExecutionSpace>;
    using member = typename policy::member_type;
    using Logits = detail::RouterLogitBlock<Acc>;
    using Stats = detail::RouterStatBlock<Acc>;

    // Wt(e, i) = W(i, e) (rows past E stay zero); for the tensor cores also
    // the split copy Ws (RouterMma.hpp).
    bool const mma = detail::router_mma_in_use<T, ExecutionSpace>(E);
    int const dp = detail::router_mma_cols(d);
    if (mma && wsplit_.extent(0) != std::size_t(detail::router_mma_ntiles(E)) * 8 * dp * 2)
      wsplit_ = Kokkos::View<unsigned *, memory_space>("hexamoe::router.weight_split",
                                                       std::size_t(detail::router_mma_ntiles(E)) * 8 * dp * 2);
    auto W = weight;
    auto Wt = weight_t_;
    auto Ws = wsplit_;
    Kokkos::parallel_for(
        "hexamoe::router_weight_t", compat::light(Kokkos::RangePolicy<ExecutionSpace>(space, 0, E * d)),
        KOKKOS_LAMBDA(int j) {
          int const e = j / d, i = j % d;
          Acc const w = W(i, e);
          Wt(e, i) = w;
          if (mma) {
            unsigned hi = 0, lo = 0;
            detail::dev::split_tf32(static_cast<float>(w), hi, lo);
            std::size_t const at = detail::router_ws_index(e, i, dp);
            Ws(at) = hi;
            Ws(at + 8) = lo;
          }
        });

    // One token per team thread: logits (with vector lanes, blocks of EB experts,
    // each block one vector reduction over d; with one lane, a GEMV row) into
    // the thread's row of team scratch, then softmax, top-k and gates in one
    // lane on that row (scratch, not device memory, between the steps), and
    // the probabilities written once.
    auto b = bias;
    auto P = probs;
    auto L = lse;
    auto I = idx;
    auto G = gate;
    bool const renorm = opt_.renormalize;
    // Lanes read x in 16-byte vectors (and Wt in float4) where rows allow.
    constexpr int XV = detail::router_x_vector<T, Acc>;
    constexpr int XVd = XV > 0 ? XV : 1;  // (a divisor either way)
    bool const vec = XV > 0 && vl > 1 && d % XVd == 0 && x.stride_0() % XVd == 0 &&
                     reinterpret_cast<std::uintptr_t>(x.data()) % 16 == 0 &&
                     reinterpret_cast<std::uintptr_t>(Wt.data()) % 16 == 0 && Wt.stride_0() % 4 == 0;
    // Softmax and top-k over the vector lanes where one lane's loops would
    // be long (E k >= 64); else in one lane. Measured on H200 (Nsight
    // Compute, bf16): router_forward 46 us with lanes against 40 in one lane
    // for E = 32, k = 1 (Swin-MoE-S stage 3), while E = 64, k = 2 (the
    // skewed case) took 0.08 ms off the layer's forward with lanes.
    bool const lane_softmax = vl > 1 && E * k >= 64;
    std::size_t const row_bytes = sizeof(Acc) * Ep + sizeof(int) * k;
    std::size_t const row_pitch = (row_bytes + 15) / 16 * 16;
    auto sp = stat_part_;   // [chunks, Ep + 1]: sum_t p[t, e], then sum_t lse^2
    auto sn = count_part_;  // [chunks, Ep]: assignments to e
    // Partial rows of the statistics: a team of the tensor-core kernel, or a chunk.
    int const nparts = mma ? (T_ + detail::router_mma_tokens - 1) / detail::router_mma_tokens : nch;
    chunk_counts_ = {};
    if constexpr (detail::dev::has_cuda_tensor_cores<ExecutionSpace> && std::is_same_v<Acc, float>) {
      if (mma && T_ > 0) {
        chunk_counts_ = {Kokkos::subview(Matrix<int const, memory_space>(count_part_),
                                         std::make_pair(0, nparts), Kokkos::ALL),
                         detail::router_mma_tokens * k};
        bool const xvec = d % 8 == 0 && x.stride_0() % 8 == 0 && reinterpret_cast<std::uintptr_t>(x.data()) % 16 == 0;
        switch (detail::router_mma_ntiles(E)) {
          case 1: forward_mma<1>(space, x, xvec, nparts); break;
          case 2: forward_mma<2>(space, x, xvec, nparts); break;
          case 4: forward_mma<4>(space, x, xvec, nparts); break;
          default: forward_mma<8>(space, x, xvec, nparts); break;
        }
      }
    }
    if (!mma && T_ > 0) {
      auto pol = compat::light(policy(space, (T_ + ts - 1) / ts, ts, vl));
      pol.set_scratch_size(0, Kokkos::PerTeam(row_pitch * ts + 64));
      Kokkos::parallel_for(
          "hexamoe::router_forward", pol, KOKKOS_LAMBDA(member const &team) {
            char *rows = static_cast<char *>(team.team_shmem().get_shmem(row_pitch * ts));
            int const t0 = team.league_rank() * ts, t1 = t0 + ts < T_ ? t0 + ts : T_;
            Kokkos::parallel_for(Kokkos::TeamThreadRange(team, t0, t1), [&](int t) {
              Acc *sp = reinterpret_cast<Acc *>(rows + row_pitch * (t - t0));
              int *si = reinterpret_cast<int *>(sp + Ep);
              if (vl == 1) {
                if (host) {  // (not if constexpr: CUDA's lambdas may not first-capture in one)
                  // One lane (hosts): the logits row as a GEMV, SIMD over blocks of
                  // EB experts (Wt is contiguous along e there and EB-padded), four
                  // partial sums over i (independent chains of FMAs, in registers)
                  // added in a fixed order.
                  T const *xr = &x(t, 0);
                  std::size_t const ld = Wt.stride(1);
                  for (int e0 = 0; e0 < E; e0 += EB) {
                    Acc const *w = &Wt(e0, 0);
                    Acc acc[4][EB];
                    for (int u = 0; u < 4; ++u)
                      for (int q = 0; q < EB; ++q) acc[u][q] = Acc(0);
                    int i = 0;
                    for (; i + 4 <= d; i += 4)
                      for (int u = 0; u < 4; ++u) {
                        Acc const xi = to_acc<Acc>(xr[i + u]);
                        Acc const *wi = w + (i + u) * ld;
                        for (int q = 0; q < EB; ++q) acc[u][q] += xi * wi[q];
                      }
                    for (; i < d; ++i) {
                      Acc const xi = to_acc<Acc>(xr[i]);
                      Acc const *wi = w + i * ld;
                      for (int q = 0; q < EB; ++q) acc[0][q] += xi * wi[q];
                    }
                    for (int q = 0; q < EB && e0 + q < E; ++q)
                      sp[e0 + q] = b(e0 + q) + ((acc[0][q] + acc[1][q]) + (acc[2][q] + acc[3][q]));
                  }
                } else {
                  for (int e = 0; e < E; ++e) sp[e] = b(e);
                  for (int i = 0; i < d; ++i) {
                    Acc const xi = to_acc<Acc>(x(t, i));
                    for (int e = 0; e < E; ++e) sp[e] += xi * Wt(e, i);
                  }
                }
              } else {
                // Lanes along d (coalesced rows of x), EB experts per reduction.
                for (int e0 = 0; e0 < E; e0 += EB) {
                  Logits lg;
                  if (vec) {
                    detail::router_logits_vec<XV>(team, &x(t, 0), Wt, e0, d, lg);
                  } else {
                    Kokkos::parallel_reduce(
                        Kokkos::ThreadVectorRange(team, d),
                        [&](int i, Logits &s) {
                          Acc const xi = to_acc<Acc>(x(t, i));
                          for (int q = 0; q < EB; ++q) s.v[q] += xi * Wt(e0 + q, i);
                        },
                        lg);
                  }
                  Kokkos::single(Kokkos::PerThread(team), [&]() {
                    for (int q = 0; q < EB; ++q)
                      if (e0 + q < E) sp[e0 + q] = lg.v[q] + b(e0 + q);
                  });
                }
              }
              if (lane_softmax) {
                // Lanes over the experts: max, sum of exponentials and each
                // top-k choice are vector reductions (the probabilities in
                // the row, then stored coalesced).
                detail::RouterMax<Acc> mx;
                Kokkos::parallel_reduce(
                    Kokkos::ThreadVectorRange(team, E), [&](int e, detail::RouterMax<Acc> &m) { m.take(sp[e]); }, mx);
                Acc sum = 0;
                Kokkos::parallel_reduce(
                    Kokkos::ThreadVectorRange(team, E),
                    [&](int e, Acc &s) {
                      Acc const v = compat::exp(sp[e] - mx.v);
                      sp[e] = v;
                      s += v;
                    },
                    sum);
                Kokkos::parallel_for(Kokkos::ThreadVectorRange(team, E), [&](int e) {
                  Acc const pv = sp[e] / sum;
                  sp[e] = pv;
                  P(t, e) = pv;
                });
                // Top-k by repeated selection: largest first, ties to the lower expert.
                Acc z = 0;
                for (int j = 0; j < k; ++j) {
                  detail::RouterArgMax<Acc> best;
                  Kokkos::parallel_reduce(
                      Kokkos::ThreadVectorRange(team, E),
                      [&](int e, detail::RouterArgMax<Acc> &a) {
                        bool taken = false;
                        for (int m = 0; m < j; ++m) taken = taken || si[m] == e;
                        if (!taken) a.take(sp[e], e);
                      },
                      best);
                  si[j] = best.e;  // every lane writes the same value, and reads back its own
                  z += best.v;
                  Kokkos::single(Kokkos::PerThread(team), [&]() {
                    I(t, j) = best.e;
                    G(t * k + j) = best.v;
                  });
                }
                Kokkos::single(Kokkos::PerThread(team), [&]() {
                  L(t) = mx.v + compat::log(sum);
                  if (renorm)
                    for (int j = 0; j < k; ++j) G(t * k + j) = sp[si[j]] / z;
                });
                return;
              }
              // One lane: in order (hosts).
              Kokkos::single(Kokkos::PerThread(team), [&]() {
                Acc mx = sp[0];
                for (int e = 1; e < E; ++e) mx = sp[e] > mx ? sp[e] : mx;
                Acc sum = 0;
                for (int e = 0; e < E; ++e) {
                  Acc const v = compat::exp(sp[e] - mx);
                  sp[e] = v;
                  sum += v;
                }
                L(t) = mx + compat::log(sum);
                for (int e = 0; e < E; ++e) {
                  sp[e] /= sum;
                  P(t, e) = sp[e];
                }
                // Top-k by repeated selection: largest first, ties to the lower expert.
                Acc z = 0;
                for (int j = 0; j < k; ++j) {
                  int best = -1;
                  for (int e = 0; e < E; ++e) {
                    bool taken = false;
                    for (int m = 0; m < j; ++m) taken = taken || si[m] == e;
                    if (!taken && (best < 0 || sp[e] > sp[best])) best = e;
                  }
                  si[j] = best;
                  I(t, j) = best;
                  G(t * k + j) = sp[best];
                  z += sp[best];
                }
                if (renorm)
                  for (int j = 0; j < k; ++j) G(t * k + j) = sp[si[j]] / z;
              });
            });
          });
    }

    // Statistics per token chunk: each team thread reduces a contiguous share
    // of the chunk over its lanes, the team adds the shares in thread order.
    if (!mma && T_ > 0) {
      auto pol = compat::light(policy(space, nch, ts, vl));
      std::size_t const acc_bytes = sizeof(Acc) * ts * (Ep + 1), int_bytes = sizeof(int) * ts * Ep;
      pol.set_scratch_size(0, Kokkos::PerTeam(acc_bytes + int_bytes + 64));
      Kokkos::parallel_for(
          "hexamoe::router_stats", pol, KOKKOS_LAMBDA(member const &team) {
            int const c = team.league_rank();
            int const t0 = c * cs, t1 = t0 + cs < T_ ? t0 + cs : T_, share = (t1 - t0 + ts - 1) / ts;
            Acc *ps = static_cast<Acc *>(team.team_shmem().get_shmem(acc_bytes));
            int *ns = static_cast<int *>(team.team_shmem().get_shmem(int_bytes));
            Kokkos::parallel_for(Kokkos::TeamThreadRange(team, ts), [&](int r) {
              int const s0 = t0 + r * share < t1 ? t0 + r * share : t1, s1 = s0 + share < t1 ? s0 + share : t1;
              for (int e0 = 0; e0 < Ep; e0 += EB) {
                Stats a;
                Kokkos::parallel_reduce(
                    Kokkos::ThreadVectorRange(team, s0, s1),
                    [&](int t, Stats &s) {
                      for (int q = 0; q < EB; ++q)
                        if (e0 + q < E) s.p[q] += P(t, e0 + q);
                      for (int j = 0; j < k; ++j) {
                        int const e = I(t, j);
                        for (int q = 0; q < EB; ++q) s.n[q] += e == e0 + q ? 1 : 0;
                      }
                    },
                    a);
                Kokkos::single(Kokkos::PerThread(team), [&]() {
                  for (int q = 0; q < EB; ++q) {
                    ps[r * (Ep + 1) + e0 + q] = a.p[q];
                    ns[r * Ep + e0 + q] = a.n[q];
                  }
                });
              }
              Acc z = 0;
              Kokkos::parallel_reduce(
                  Kokkos::ThreadVectorRange(team, s0, s1), [&](int t, Acc &s) { s += L(t) * L(t); }, z);
              Kokkos::single(Kokkos::PerThread(team), [&]() { ps[r * (Ep + 1) + Ep] = z; });
            });
            team.team_barrier();
            Kokkos::parallel_for(Kokkos::TeamVectorRange(team, Ep + 1), [&](int e) {
              Acc s = 0;
              int n = 0;
              for (int r = 0; r < ts; ++r) {
                s += ps[r * (Ep + 1) + e];
                if (e < Ep) n += ns[r * Ep + e];
              }
              sp(c, e) = s;
              if (e < Ep) sn(c, e) = n;
            });
          });
    }

    // f_e, P_e and both losses: one team, each expert's chunk partials summed
    // over vector lanes (fixed order), the aux sum over experts in one lane.
    // (The tensor-core forward's last team did this already.)
    auto st = stats_;
    auto ls = losses_;
    Acc const aw = static_cast<Acc>(opt_.aux_loss_weight), zw = static_cast<Acc>(opt_.z_loss_weight);
    if (!(mma && T_ > 0)) {
      auto pol = compat::light(policy(space, 1, ts, vl));
      std::size_t const bytes = sizeof(Acc) * (2 * E + 1);
      pol.set_scratch_size(0, Kokkos::PerTeam(bytes + 64));
      Kokkos::parallel_for(
          "hexamoe::router_losses", pol, KOKKOS_LAMBDA(member const &team) {
            Acc *fp = static_cast<Acc *>(team.team_shmem().get_shmem(bytes));  // f_e, P_e, sum lse^2
            Kokkos::parallel_for(Kokkos::TeamThreadRange(team, E + 1), [&](int e) {
              Acc p = 0;
              Kokkos::parallel_reduce(
                  Kokkos::ThreadVectorRange(team, nparts), [&](int c, Acc &s) { s += sp(c, e < E ? e : Ep); }, p);
              int n = 0;
              if (e < E) Kokkos::parallel_reduce(Kokkos::ThreadVectorRange(team, nparts), [&](int c, int &s) { s += sn(c, e); }, n);
              Kokkos::single(Kokkos::PerThread(team), [&]() {
                if (e < E) {
                  Acc const f = T_ > 0 ? Acc(n) / Acc(T_ * k) : Acc(0);
                  Acc const pe = T_ > 0 ? p / Acc(T_) : Acc(0);
                  st(0, e) = f;
                  st(1, e) = pe;
                  fp[e] = f;
                  fp[E + e] = pe;
                } else {
                  fp[2 * E] = p;
                }
              });
            });
            team.team_barrier();
            Kokkos::single(Kokkos::PerTeam(team), [&]() {
              Acc aux = 0;
              for (int e = 0; e < E; ++e) aux += fp[e] * fp[E + e];
              ls(0) = aw * Acc(E) * aux;
              ls(1) = T_ > 0 ? zw * fp[2 * E] / Acc(T_) : Acc(0);
            });
          });
    }
  }

  // The last forward's assignments to each expert per team of the
  // tensor-core forward (64 tokens), for the routing index; none (per = 0)
  // after the other forward.
  ChunkCounts<memory_space> chunk_counts() const { return chunk_counts_; }

  // Auxiliary balance loss and z-loss of the last forward (reads back two numbers).
  std::pair<double, double> losses() const {
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), losses_);
    return {static_cast<double>(h(0)), static_cast<double>(h(1))};
  }

  // dgate: dL/dg per flat id [T*k]. Writes weight_grad, bias_grad (overwritten)
  // and adds the router's part of dL/dx into dx. dx uses the weight of the last
  // forward (its transposed copy).
  void backward(ExecutionSpace const &space, Matrix<T const, memory_space> x, Kokkos::View<Acc const *, memory_space> dgate,
                Matrix<T, memory_space> dx) {
    compat::ScopedRegion region("hexamoe::Router::backward");
    int const T_ = static_cast<int>(x.extent(0)), d = dim_, E = experts_, k = opt_.top_k;
    constexpr int EB = detail::router_expert_block;
    int const Ep = detail::router_padded_experts(E);
    int const ts = shape_.team, vl = shape_.vector, cs = shape_.chunk, cb = shape_.columns;
    int const nch = detail::router_chunks(T_, cs);
    if (static_cast<int>(probs.extent(0)) != T_ || static_cast<int>(wgrad_part_.extent(0)) != nch)
      throw std::logic_error("Router::backward: x has " + std::to_string(T_) + " rows, the last forward had " +
                             std::to_string(probs.extent(0)) + " (or the shape changed since)");
    using policy = Kokkos::TeamPolicy<ExecutionSpace>;
    using member = typename policy::member_type;
    auto P = probs;
    auto L = lse;
    auto I = idx;
    auto G = gate;
    auto st = stats_;
    auto dl = dlogits_;
    bool const renorm = opt_.renormalize;
    Acc const aw = static_cast<Acc>(opt_.aux_loss_weight), zw = static_cast<Acc>(opt_.z_loss_weight);
    Kokkos::parallel_for(
        "hexamoe::router_dlogits", compat::light(Kokkos::RangePolicy<ExecutionSpace>(space, 0, T_)), KOKKOS_LAMBDA(int t) {
          // dL/dp: the auxiliary loss, then the gates.
          for (int e = 0; e < E; ++e) dl(t, e) = aw * Acc(E) * st(0, e) / Acc(T_);
          if (renorm) {
            // g_j = p_j / Z: dp_m = dg_m / Z - sum_j dg_j g_j / Z
            Acc z = 0, s = 0;
            for (int j = 0; j < k; ++j) z += P(t, I(t, j));
            for (int j = 0; j < k; ++j) s += dgate(t * k + j) * G(t * k + j);
            for (int j = 0; j < k; ++j) dl(t, I(t, j)) += (dgate(t * k + j) - s) / z;
          } else {
            for (int j = 0; j < k; ++j) dl(t, I(t, j)) += dgate(t * k + j);
          }
          // Softmax backward, plus the z-loss: d(lse^2)/dlogit_e = 2 lse p_e.
          Acc dot = 0;
          for (int e = 0; e < E; ++e) dot += P(t, e) * dl(t, e);
          for (int e = 0; e < E; ++e)
            dl(t, e) = P(t, e) * (dl(t, e) - dot) + zw * Acc(2) * L(t) * P(t, e) / Acc(T_);
          for (int e = E; e < Ep; ++e) dl(t, e) = Acc(0);  // padding: blocks of EB need no bounds checks
        });

    // [dWr; dbr] = [x 1]^T dlogits, stage 1: a team per (token chunk, block of
    // columns of [x 1]); each thread takes every ts-th token of the chunk, each
    // lane a column, accumulating EB experts in team scratch; the threads'
    // sums are added in thread order into the chunk's partial.
    auto wp = wgrad_part_;  // [chunks, (d + 1) * E]: entry i * E + e is (row i of [dWr; dbr], expert e)
    int const ncb = (d + 1 + cb - 1) / cb;
    if (T_ > 0) {
      auto pol = compat::light(policy(space, nch * ncb, ts, vl));
      std::size_t const bytes = sizeof(Acc) * ts * EB * cb;
      pol.set_scratch_size(0, Kokkos::PerTeam(bytes + 64));
      Kokkos::parallel_for(
          "hexamoe::router_dweight", pol, KOKKOS_LAMBDA(member const &team) {
            int const c = team.league_rank() / ncb, c0 = (team.league_rank() % ncb) * cb;
            int const ncol = d + 1 - c0 < cb ? d + 1 - c0 : cb;
            int const t0 = c * cs, t1 = t0 + cs < T_ ? t0 + cs : T_;
            // [thread][q][column] on devices (lanes on consecutive banks), [thread][column][q] on hosts (SIMD over q).
            Acc *acc = static_cast<Acc *>(team.team_shmem().get_shmem(bytes));
            int const qs = host ? 1 : cb;  // stride between experts
            auto at = [&](int r, int q, int col) -> Acc & {
              return acc[host ? (r * cb + col) * EB + q : (r * EB + q) * cb + col];
            };
            for (int e0 = 0; e0 < E; e0 += EB) {
              Kokkos::parallel_for(Kokkos::TeamThreadRange(team, ts), [&](int r) {
                Kokkos::parallel_for(Kokkos::ThreadVectorRange(team, ncol), [&](int col) {
                  for (int q = 0; q < EB; ++q) at(r, q, col) = Acc(0);
                });
                for (int t = t0 + r; t < t1; t += ts) {
                  Acc g[EB];
                  for (int q = 0; q < EB; ++q) g[q] = dl(t, e0 + q);
                  Kokkos::parallel_for(Kokkos::ThreadVectorRange(team, ncol), [&](int col) {
                    int const i = c0 + col;
                    Acc *a = &at(r, 0, col);
                    if (i < d) {
                      Acc const xv = to_acc<Acc>(x(t, i));
                      for (int q = 0; q < EB; ++q) a[q * qs] += xv * g[q];
                    } else {  // the bias column
                      for (int q = 0; q < EB; ++q) a[q * qs] += g[q];
                    }
                  });
                }
              });
              team.team_barrier();
              Kokkos::parallel_for(Kokkos::TeamVectorRange(team, EB * ncol), [&](int j) {
                int const q = j / ncol, col = j % ncol;
                if (e0 + q < E) {
                  Acc s = 0;
                  for (int r = 0; r < ts; ++r) s += at(r, q, col);
                  wp(c, (c0 + col) * E + e0 + q) = s;
                }
              });
              team.team_barrier();
            }
          });
    }
    // Stage 2: each output sums its chunk partials in chunk order.
    auto Wg = weight_grad;
    auto bg = bias_grad;
    Kokkos::parallel_for(
        "hexamoe::router_dweight_sum", compat::light(Kokkos::RangePolicy<ExecutionSpace>(space, 0, (d + 1) * E)), KOKKOS_LAMBDA(int o) {
          Acc s = 0;
          for (int c = 0; c < nch; ++c) s += wp(c, o);
          if (o < d * E)
            Wg(o / E, o % E) = s;
          else
            bg(o - d * E) = s;
        });

    // dx[t, c] += sum_e dlogits[t, e] Wt(e, c): a thread per token, lanes along c
    // (coalesced on devices).
    auto Wt = weight_t_;
    if (T_ > 0)
      Kokkos::parallel_for(
          "hexamoe::router_dx", compat::light(policy(space, (T_ + ts - 1) / ts, ts, vl)), KOKKOS_LAMBDA(member const &team) {
            int const t0 = team.league_rank() * ts, t1 = t0 + ts < T_ ? t0 + ts : T_;
            Kokkos::parallel_for(Kokkos::TeamThreadRange(team, t0, t1), [&](int t) {
              Kokkos::parallel_for(Kokkos::ThreadVectorRange(team, d), [&](int c) {
                Acc s = to_acc<Acc>(dx(t, c));
                for (int e = 0; e < E; ++e) s += dl(t, e) * Wt(e, c);
                dx(t, c) = from_acc<T>(s);
              });
            });
          });
  }

  // The tensor-core forward (RouterMma.hpp) with NT tiles of 8 experts:
  // probs, lse, idx, gate and nparts rows of statistics partials.
  template <int NT>
  void forward_mma(ExecutionSpace const &space, Matrix<T const, memory_space> x, bool xvec, int nparts) {
    using policy = Kokkos::TeamPolicy<ExecutionSpace>;
    using member = typename policy::member_type;
    int const T_ = static_cast<int>(x.extent(0)), d = dim_, E = experts_, k = opt_.top_k;
    int const Ep = detail::router_padded_experts(E);
    bool const renorm = opt_.renormalize;
    auto Ws = Kokkos::View<unsigned const *, memory_space>(wsplit_);
    auto b = bias;
    auto P = probs;
    auto L = lse;
    auto I = idx;
    auto G = gate;
    auto sp = stat_part_;
    auto sn = count_part_;
    auto st = stats_;
    auto ls = losses_;
    float const aw = static_cast<float>(opt_.aux_loss_weight), zw = static_cast<float>(opt_.z_loss_weight);
    if (!teams_done_.data()) teams_done_ = Kokkos::View<unsigned, memory_space>("hexamoe::router.teams_done");
    unsigned *done = teams_done_.data();
    std::size_t const pbytes = sizeof(float) * detail::router_mma_scratch_floats(Ep),
                      nbytes = sizeof(int) * detail::router_mma_scratch_ints(Ep);
    auto pol = compat::light(policy(space, nparts, detail::router_mma_team_threads));
    pol.set_scratch_size(0, Kokkos::PerTeam(pbytes + nbytes + 64));
    Kokkos::parallel_for(
        "hexamoe::router_forward_mma", pol, KOKKOS_LAMBDA(member const &team) {
          float *shp = static_cast<float *>(team.team_shmem().get_shmem(pbytes));
          int *shn = static_cast<int *>(team.team_shmem().get_shmem(nbytes));
          detail::router_mma_team<NT>(detail::RouterWarpCuda<member>{team}, x, T_, d, E, Ep, k, renorm, xvec, Ws, b, P,
                                      L, I, G, sp, sn, st, ls, aw, zw, done, shp, shn);
        });
  }

 private:
  void drop_results() {
    probs = {};
    lse = {};
    idx = {};
    gate = {};
    dlogits_ = {};
    stat_part_ = {};
    count_part_ = {};
    wgrad_part_ = {};
  }

  // Per-forward buffers, reallocated only when the token count (or the shape) changes.
  void ensure(ExecutionSpace const &space, int T_) {
    int const E = experts_, k = opt_.top_k, Ep = detail::router_padded_experts(E);
    if (T_ == 0) {  // nothing is read or written for zero tokens
      drop_results();
      return;
    }
    if (static_cast<int>(probs.extent(0)) != T_) {
      probs = Matrix<Acc, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.probs"), T_, E);
      dlogits_ = Matrix<Acc, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.dlogits"), T_, Ep);
      lse = Kokkos::View<Acc *, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.lse"), T_);
      idx = Kokkos::View<int **, Kokkos::LayoutRight, memory_space>(
          Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.idx"), T_, k);
      gate = Kokkos::View<Acc *, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.gate"), T_ * k);
    }
    int const nch = detail::router_chunks(T_, shape_.chunk);
    // Statistics rows: a chunk each, or a team of the tensor-core forward.
    int const nstat = std::max(nch, (T_ + detail::router_mma_tokens - 1) / detail::router_mma_tokens);
    if (static_cast<int>(wgrad_part_.extent(0)) != nch || static_cast<int>(stat_part_.extent(0)) != nstat) {
      auto alloc = [&](std::string const &label) { return Kokkos::view_alloc(space, Kokkos::WithoutInitializing, label); };
      stat_part_ = Matrix<Acc, memory_space>(alloc("hexamoe::router.stat_partials"), nstat, Ep + 1);
      count_part_ = Matrix<int, memory_space>(alloc("hexamoe::router.count_partials"), nstat, Ep);
      wgrad_part_ = Matrix<Acc, memory_space>(alloc("hexamoe::router.weight_grad_partials"), nch, (dim_ + 1) * E);
    }
  }

  int dim_ = 0, experts_ = 0;
  RouterOptions opt_;
  RouterShape shape_ = default_router_shape<ExecutionSpace>();
  weight_t_type weight_t_;                   // [Epad, d] copy of weight, made by forward
  Kokkos::View<unsigned *, memory_space> wsplit_;  // tf32 hi + lo of weight (RouterMma.hpp), made by forward
  Kokkos::View<unsigned, memory_space> teams_done_;  // the tensor-core forward's finished teams (zero between launches)
  Matrix<Acc, memory_space> dlogits_;        // [T, Epad], columns past E zero
  Kokkos::View<Acc *, memory_space> losses_;  // [aux, z]
  Matrix<Acc, memory_space> stats_;          // [f_e; P_e]
  Matrix<Acc, memory_space> stat_part_;      // [chunks, Epad + 1]
  Matrix<int, memory_space> count_part_;     // [chunks, Epad]
  ChunkCounts<memory_space> chunk_counts_;   // rows of count_part_ by the tensor-core forward
  Matrix<Acc, memory_space> wgrad_part_;     // [chunks, (d + 1) * E]
};

}  // namespace hexamoe
