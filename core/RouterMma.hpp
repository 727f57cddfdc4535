// RouterMma.hpp: the router's forward on CUDA tensor cores.
//
// A team of eight warps takes 64 tokens, warps w and w + 4 the same 16 of
// them: logits = x Wr + br with mma.sync m16n8k8 (tf32 operands, float32
// accumulation; 8 experts per n tile), warp w over the first half of d's
// chunks of 32 columns and warp w + 4 over the second (twice the loads in
// flight: the kernel waits on memory), the halves added in that order in
// warp w; then softmax, top-k and the gates within each quad of lanes that
// holds a token's logits (shuffles, no scratch), and the team's statistics
// (sum_t p[t, e], assignments to e, sum_t lse^2) as one partial row per team;
// the last team to finish adds the rows up into the losses. So no separate
// statistics or losses kernel runs.
//
// Accuracy: Wr enters as tf32 hi + lo (split_tf32, about 2^-21 relative).
// bf16 x is exact in tf32, so a logit is x (Wr_hi + Wr_lo) with two products;
// float32 x is split too, three products (3xTF32: x_lo Wr_hi + x_hi Wr_lo +
// x_hi Wr_hi), as the float32 ESMMs. Sums run in a fixed order (k in steps of
// 8 per mma, quad and warp butterflies, warps in order): repeat runs are
// bit-identical. Ties in top-k go to the lower expert, as on every path.
//
// The split weight Ws is [8 NT][dp / 8][16] (dp = d rounded up to 32; per
// expert and group of 8 columns: 8 hi, then 8 lo), zero past E and d.
#pragma once

#include "BFloat16.hpp"
#include "Compat.hpp"
#include "EnvSwitch.hpp"
#include "TileGemm.hpp"

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace hexamoe {
namespace detail {

inline constexpr int router_mma_tokens = 64;        // per team: 4 warps x 16
inline constexpr int router_mma_threads = 128;      // the warps that own tokens
inline constexpr int router_mma_team_threads = 256;  // and as many again for the second half of d
inline constexpr int router_mma_max_experts = 64;   // 8 n tiles of accumulators

// Team scratch of the kernel: floats (the second half's accumulators, then
// the warps' statistics rows, then the last team's partial sums, one per
// thread) and ints (likewise, plus the last-team flag in the final slot).
KOKKOS_INLINE_FUNCTION constexpr int router_mma_scratch_floats(int Ep) {
  int const stats = (router_mma_threads / 32) * (Ep + 1) > router_mma_threads ? (router_mma_threads / 32) * (Ep + 1)
                                                                             : router_mma_threads;
  int const n = (Ep + 7) / 8, nt = n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8;  // router_mma_ntiles
  int const accs = router_mma_threads * 4 * nt;                               // four floats a thread an n tile
  return stats > accs ? stats : accs;
}
KOKKOS_INLINE_FUNCTION constexpr int router_mma_scratch_ints(int Ep) {
  return ((router_mma_threads / 32) * Ep > router_mma_threads ? (router_mma_threads / 32) * Ep : router_mma_threads) + 1;
}

// -1: automatic; 0 or 1 forces the choice (tests run both paths).
inline int &router_mma_override() {
  static int v = -1;
  return v;
}

// The router's forward runs on the tensor cores where they apply (the default,
// measured 6-11% faster on the bf16 layer forward: docs/PERFORMANCE.md);
// HEXAMOE_ROUTER_MMA=0 in the environment selects the vector-lane kernels.
inline bool parse_router_mma(char const *v) { return parse_env_switch("HEXAMOE_ROUTER_MMA", v); }
inline bool router_mma_env() {
  static bool const on = parse_router_mma(std::getenv("HEXAMOE_ROUTER_MMA"));
  return on;
}

// The tensor-core forward runs on CUDA for bf16 and float32 storage (float32
// unless HEXAMOE_F32_MATH=fma asks for FMA arithmetic) with at most 64
// experts, unless turned off (router_mma_env) or forced either way (tests).
template <class T, class ExecutionSpace>
bool router_mma_in_use(int E) {
  if constexpr (!dev::has_cuda_tensor_cores<ExecutionSpace>) {
    (void)E;
    return false;
  } else {
    using S = std::remove_const_t<T>;
    bool ok = E >= 1 && E <= router_mma_max_experts;
    if constexpr (std::is_same_v<S, float>)
      ok = ok && dev::float32_math() != dev::Float32Math::fma;
    else if constexpr (!std::is_same_v<S, bfloat16>)
      ok = false;
    int const o = router_mma_override();
    return ok && (o >= 0 ? o == 1 : router_mma_env());
  }
}

// n tiles of 8 experts (a power of two: one instantiation each).
inline int router_mma_ntiles(int E) {
  int const n = (E + 7) / 8;
  return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8;
}
KOKKOS_INLINE_FUNCTION int router_mma_cols(int d) { return (d + 31) / 32 * 32; }
KOKKOS_INLINE_FUNCTION std::size_t router_ws_index(int e, int i, int dp) {
  return (std::size_t(e) * (dp / 8) + i / 8) * 16 + i % 8;
}

// Columns c .. c + 7 of row r of x as tf32 bit patterns (zero past the rows
// or d): bf16 exactly (hi only), float32 as hi + lo. vec: 16-byte loads (d a
// multiple of 8, rows 16-byte aligned).
template <class XView>
KOKKOS_INLINE_FUNCTION void router_mma_load(XView const &x, int r, int c, int T_, int d, bool vec, unsigned (&h)[8],
                                            unsigned (&l)[8]) {
  using S = std::remove_const_t<typename XView::value_type>;
  struct alignas(16) U4 {
    unsigned u[4];
  };
  struct alignas(16) F4 {
    float v[4];
  };
  bool const row = r < T_;
  if constexpr (std::is_same_v<S, bfloat16>) {
    unsigned w[4] = {0u, 0u, 0u, 0u};
    if (vec) {
      if (row && c < d) {
        U4 const v = *reinterpret_cast<U4 const *>(&x(r, c));
        for (int j = 0; j < 4; ++j) w[j] = v.u[j];
      }
    } else if (row) {
      for (int j = 0; j < 8; ++j)
        if (c + j < d) w[j >> 1] |= unsigned(x(r, c + j).bits) << ((j & 1) * 16);
    }
    for (int j = 0; j < 4; ++j) {
      h[2 * j] = w[j] << 16;
      h[2 * j + 1] = w[j] & 0xffff0000u;
      l[2 * j] = l[2 * j + 1] = 0u;
    }
  } else {
    float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (vec) {
      if (row && c < d) {
        F4 const a = *reinterpret_cast<F4 const *>(&x(r, c));
        F4 const b = *reinterpret_cast<F4 const *>(&x(r, c + 4));
        for (int j = 0; j < 4; ++j) f[j] = a.v[j], f[4 + j] = b.v[j];
      }
    } else if (row) {
      for (int j = 0; j < 8; ++j)
        if (c + j < d) f[j] = static_cast<float>(x(r, c + j));
    }
    for (int j = 0; j < 8; ++j) dev::split_tf32(f[j], h[j], l[j]);
  }
}

// The warp and team operations of the kernel on CUDA (lane shuffles,
// mma.sync, the team barrier). Tests run the same kernel on the host through
// an emulation of these (tests/WarpEmulation.hpp).
template <class Member>
struct RouterWarpCuda {
  Member const &team;
  KOKKOS_INLINE_FUNCTION int rank() const { return team.team_rank(); }
  KOKKOS_INLINE_FUNCTION int league() const { return team.league_rank(); }
  KOKKOS_INLINE_FUNCTION int league_size() const { return team.league_size(); }
  KOKKOS_INLINE_FUNCTION void barrier() const { team.team_barrier(); }
  // Device-wide ordering of this thread's writes (a release before the
  // counter, an acquire after it).
  KOKKOS_INLINE_FUNCTION void fence() const { Kokkos::memory_fence(); }
  // A value another team wrote (after the acquire fence): read through L2,
  // never from this multiprocessor's L1.
  template <class V>
  KOKKOS_INLINE_FUNCTION V load_cg(V const *p) const {
#if defined(KOKKOS_ENABLE_CUDA) && defined(__CUDA_ARCH__)
    return __ldcg(p);
#else
    return *reinterpret_cast<V const volatile *>(p);
#endif
  }
  KOKKOS_INLINE_FUNCTION unsigned atomic_inc(unsigned *p) const { return Kokkos::atomic_fetch_add(p, 1u); }
  template <class V>
  KOKKOS_INLINE_FUNCTION V shfl_xor(V v, int m) const {
#if defined(KOKKOS_ENABLE_CUDA) && defined(__CUDA_ARCH__)
    return __shfl_xor_sync(0xffffffffu, v, m);
#else
    (void)m;
    return v;
#endif
  }
  KOKKOS_INLINE_FUNCTION void mma(float (&acc)[4], unsigned const (&a)[4], unsigned b0, unsigned b1) const {
    dev::mma_tf32(acc[0], acc[1], acc[2], acc[3], a, b0, b1);
  }
};

// f(n, q, e) for each of this thread's logit slots (quad lane t): expert
// e = 8n + 2t + q, in acc[n][q] (first row) and acc[n][2 + q] (second).
#if defined(__CUDACC__) && !defined(__HIP__)
#pragma nv_exec_check_disable
#endif
template <int NT, class F>
KOKKOS_FORCEINLINE_FUNCTION void router_slots(int t, F &&f) {
HEXAMOE_UNROLL
  for (int n = 0; n < NT; ++n)
HEXAMOE_UNROLL
    for (int q = 0; q < 2; ++q) f(n, q, 8 * n + 2 * t + q);
}

// One team: 64 tokens from league rank c; writes P, L, I, G for its tokens
// and row c of the partials sp [.., Ep + 1] and sn [.., Ep]; the last team
// to finish (a counter, done, back to zero after) adds every team's row (in
// a fixed order) and writes st [f_e; P_e] and ls [aux, z] (weights aw, zw).
// shp, shn: team scratch of router_mma_scratch_floats(Ep) floats and
// router_mma_scratch_ints(Ep) ints. W: the warp operations.
// (Host-only warp operations, as the tests' emulation, instantiate it for
// the host alone: no host-device check for them.)
#if defined(__CUDACC__) && !defined(__HIP__)
#pragma nv_exec_check_disable
#endif
template <int NT, class Warp, class XView, class WsView, class BView, class PView, class LView, class IView,
          class GView, class SPView, class SNView, class STView, class LSView>
KOKKOS_INLINE_FUNCTION void router_mma_team(Warp const &W, XView const &x, int T_, int d, int E, int Ep, int k,
                                            bool renorm, bool vec, WsView const &ws, BView const &b, PView const &P,
                                            LView const &L, IView const &I, GView const &G, SPView const &sp,
                                            SNView const &sn, STView const &st, LSView const &ls, float aw,
                                            float zw, unsigned *done, float *shp, int *shn) {
  using S = std::remove_const_t<typename XView::value_type>;
  constexpr bool BF = std::is_same_v<S, bfloat16>;
  int const tid = W.rank(), half = tid / router_mma_threads, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2,
            t = lane & 3;
  int const c = W.league();
  int const r0 = c * router_mma_tokens + warp * 16 + g, r1 = r0 + 8;
  bool const ok0 = r0 < T_, ok1 = r1 < T_;
  int const dp = router_mma_cols(d), groups = dp / 8;
  int const chunks = dp / 32, first = (chunks + 1) / 2;  // the first half's chunks of 32 columns
  int const cbeg = half == 0 ? 0 : 32 * first, cend = half == 0 ? 32 * first : dp;
  float acc[NT][4];
  for (int n = 0; n < NT; ++n)
    for (int q = 0; q < 4; ++q) acc[n][q] = 0.f;
  unsigned const *wsp = ws.data();
  // Batches of CH chunks of 32 columns: every load of a batch issued first.
  constexpr int CH = BF ? 4 : 2;
  for (int c0 = cbeg; c0 < cend; c0 += 32 * CH) {
    unsigned ah[CH][2][8], al[CH][2][8];
HEXAMOE_UNROLL
    for (int h = 0; h < CH; ++h) {
      int const col = c0 + 32 * h + 8 * t;
      router_mma_load(x, r0, col, T_, d, vec, ah[h][0], al[h][0]);
      router_mma_load(x, r1, col, T_, d, vec, ah[h][1], al[h][1]);
    }
HEXAMOE_UNROLL
    for (int h = 0; h < CH; ++h) {
      int const cc = c0 + 32 * h;
      if (cc >= cend) break;
HEXAMOE_UNROLL
      for (int n = 0; n < NT; ++n) {
        struct alignas(16) U4 {
          unsigned u[4];
        };
        U4 const *wp = reinterpret_cast<U4 const *>(wsp + (std::size_t(8 * n + g) * groups + cc / 8 + t) * 16);
        U4 const h0 = wp[0], h1 = wp[1], l0 = wp[2], l1 = wp[3];
        unsigned const wh[8] = {h0.u[0], h0.u[1], h0.u[2], h0.u[3], h1.u[0], h1.u[1], h1.u[2], h1.u[3]};
        unsigned const wl[8] = {l0.u[0], l0.u[1], l0.u[2], l0.u[3], l1.u[0], l1.u[1], l1.u[2], l1.u[3]};
HEXAMOE_UNROLL
        for (int j = 0; j < 4; ++j) {
          // k slot t: column 8t + 2j of the chunk, slot t + 4: 8t + 2j + 1.
          unsigned const a[4] = {ah[h][0][2 * j], ah[h][1][2 * j], ah[h][0][2 * j + 1], ah[h][1][2 * j + 1]};
          if constexpr (!BF) {
            unsigned const a2[4] = {al[h][0][2 * j], al[h][1][2 * j], al[h][0][2 * j + 1], al[h][1][2 * j + 1]};
            W.mma(acc[n], a2, wh[2 * j], wh[2 * j + 1]);
          }
          W.mma(acc[n], a, wl[2 * j], wl[2 * j + 1]);
          W.mma(acc[n], a, wh[2 * j], wh[2 * j + 1]);
        }
      }
    }
  }
  // The second half's sums to the first (slot (4n + q) x 128 + thread: no
  // bank conflicts), added after the first half's own: a fixed order.
  {
    int const lt = tid % router_mma_threads;
    if (half == 1)
      for (int n = 0; n < NT; ++n)
        for (int q = 0; q < 4; ++q) shp[(4 * n + q) * router_mma_threads + lt] = acc[n][q];
    W.barrier();
    if (half == 0)
      for (int n = 0; n < NT; ++n)
        for (int q = 0; q < 4; ++q) acc[n][q] += shp[(4 * n + q) * router_mma_threads + lt];
    W.barrier();  // (shp holds the statistics rows next)
  }
  if (half == 0) {
    // This thread's logits: rows r0 (acc[n][q]) and r1 (acc[n][2 + q]), experts 8n + 2t + q.
    float m0 = -3.402823466e38f, m1 = -3.402823466e38f;
    router_slots<NT>(t, [&](int n, int q, int e) {
      if (e < E) {
        float const be = b(e);
        acc[n][q] += be;
        acc[n][2 + q] += be;
        m0 = acc[n][q] > m0 ? acc[n][q] : m0;
        m1 = acc[n][2 + q] > m1 ? acc[n][2 + q] : m1;
      }
    });
    for (int o = 1; o <= 2; o <<= 1) {
      float const a0 = W.shfl_xor(m0, o), a1 = W.shfl_xor(m1, o);
      m0 = a0 > m0 ? a0 : m0;
      m1 = a1 > m1 ? a1 : m1;
    }
    float s0 = 0.f, s1 = 0.f;
    router_slots<NT>(t, [&](int n, int q, int e) {
      float const v0 = e < E ? compat::exp(acc[n][q] - m0) : 0.f, v1 = e < E ? compat::exp(acc[n][2 + q] - m1) : 0.f;
      acc[n][q] = v0;
      acc[n][2 + q] = v1;
      s0 += v0;
      s1 += v1;
    });
    // Butterflies: every lane of the quad ends with the same sum.
    s0 += W.shfl_xor(s0, 1);
    s1 += W.shfl_xor(s1, 1);
    s0 += W.shfl_xor(s0, 2);
    s1 += W.shfl_xor(s1, 2);
    float const lse0 = m0 + compat::log(s0), lse1 = m1 + compat::log(s1);
    router_slots<NT>(t, [&](int n, int q, int e) {
      acc[n][q] /= s0;
      acc[n][2 + q] /= s1;
      if (e < E) {
        if (ok0) P(r0, e) = acc[n][q];
        if (ok1) P(r1, e) = acc[n][2 + q];
      }
    });
    if (t == 0) {
      if (ok0) L(r0) = lse0;
      if (ok1) L(r1) = lse1;
    }
    // Top-k by repeated selection over the quad: largest first, ties to the lower expert.
    unsigned tk0 = 0u, tk1 = 0u;  // bit 2n + q: expert 8n + 2t + q taken
    float z0 = 0.f, z1 = 0.f;
    for (int j = 0; j < k; ++j) {
      float v0 = -1.f, v1 = -1.f;
      int e0 = -1, e1 = -1;
      router_slots<NT>(t, [&](int n, int q, int e) {
        if (e < E) {
          if (!((tk0 >> (2 * n + q)) & 1u) && (e0 < 0 || acc[n][q] > v0)) v0 = acc[n][q], e0 = e;
          if (!((tk1 >> (2 * n + q)) & 1u) && (e1 < 0 || acc[n][2 + q] > v1)) v1 = acc[n][2 + q], e1 = e;
        }
      });
      for (int o = 1; o <= 2; o <<= 1) {
        float const ov0 = W.shfl_xor(v0, o), ov1 = W.shfl_xor(v1, o);
        int const oe0 = W.shfl_xor(e0, o), oe1 = W.shfl_xor(e1, o);
        if (oe0 >= 0 && (e0 < 0 || ov0 > v0 || (ov0 == v0 && oe0 < e0))) v0 = ov0, e0 = oe0;
        if (oe1 >= 0 && (e1 < 0 || ov1 > v1 || (ov1 == v1 && oe1 < e1))) v1 = ov1, e1 = oe1;
      }
      if (((e0 & 7) >> 1) == t) tk0 |= 1u << (2 * (e0 >> 3) + (e0 & 1));
      if (((e1 & 7) >> 1) == t) tk1 |= 1u << (2 * (e1 >> 3) + (e1 & 1));
      z0 += v0;
      z1 += v1;
      if (t == 0) {
        if (ok0) I(r0, j) = e0, G(std::size_t(r0) * k + j) = v0;
        if (ok1) I(r1, j) = e1, G(std::size_t(r1) * k + j) = v1;
      }
    }
    if (renorm && t == 0)
      for (int j = 0; j < k; ++j) {
        if (ok0) G(std::size_t(r0) * k + j) = G(std::size_t(r0) * k + j) / z0;
        if (ok1) G(std::size_t(r1) * k + j) = G(std::size_t(r1) * k + j) / z1;
      }
    // The warp's statistics: both rows, then butterflies over the 8 row groups.
    float ps[NT][2];
    int pn[NT][2];
    router_slots<NT>(t, [&](int n, int q, int) {
      ps[n][q] = (ok0 ? acc[n][q] : 0.f) + (ok1 ? acc[n][2 + q] : 0.f);
      pn[n][q] = (ok0 && ((tk0 >> (2 * n + q)) & 1u) ? 1 : 0) + (ok1 && ((tk1 >> (2 * n + q)) & 1u) ? 1 : 0);
    });
    float zz = (ok0 ? lse0 * lse0 : 0.f) + (ok1 ? lse1 * lse1 : 0.f);
    for (int o = 4; o <= 16; o <<= 1) {
      router_slots<NT>(t, [&](int n, int q, int) {
        ps[n][q] += W.shfl_xor(ps[n][q], o);
        pn[n][q] += W.shfl_xor(pn[n][q], o);
      });
      zz += W.shfl_xor(zz, o);
    }
    if (g == 0) {
      router_slots<NT>(t, [&](int n, int q, int e) {
        if (e < Ep) {
          shp[warp * (Ep + 1) + e] = ps[n][q];
          shn[warp * Ep + e] = pn[n][q];
        }
      });
      if (t == 0) shp[warp * (Ep + 1) + Ep] = zz;
    }
  }  // (the first half's warps)
  W.barrier();
  for (int e = tid; e < Ep + 1 && tid < router_mma_threads; e += router_mma_threads) {
    float s = 0.f;
    int m = 0;
    for (int w = 0; w < router_mma_threads / 32; ++w) {
      s += shp[w * (Ep + 1) + e];
      if (e < Ep) m += shn[w * Ep + e];
    }
    sp(c, e) = s;
    if (e < Ep) sn(c, e) = m;
  }
  // The last team: every row of partials (written before each team's count,
  // read after this team's), each column summed over the teams in a fixed
  // order, then the losses in one thread, as the separate losses kernel of
  // the other path. Column e = tid % C of C = Ep + 1 is summed by the G =
  // threads / C threads with that e, thread tid / C = g over the rows g, g +
  // G, ..., eight rows at a time with all eight loads issued before the adds
  // (this team runs alone at the kernel's end: when each lane waited for one
  // load at a time, that took 4-6 us of the kernel's 26-34 us on an H100);
  // then thread e adds the G partial sums in g order.
  W.fence();
  W.barrier();
  int const teams = W.league_size();
  int const flag = router_mma_scratch_ints(Ep) - 1;
  if (tid == 0) shn[flag] = W.atomic_inc(done) == unsigned(teams - 1) ? 1 : 0;
  W.barrier();
  if (shn[flag] == 0) return;
  W.fence();
  {
    int const C = Ep + 1, G = router_mma_threads / C > 0 ? router_mma_threads / C : 1;
    int const e = tid % C, g = tid / C;
    if (g < G) {
      float s = 0.f;
      int m = 0;
      for (int r0 = g; r0 < teams; r0 += 8 * G) {
        float v[8];
        int n[8];
HEXAMOE_UNROLL
        for (int u = 0; u < 8; ++u) {
          int const r = r0 + u * G;
          v[u] = r < teams ? W.load_cg(&sp(r, e)) : 0.f;
          n[u] = r < teams && e < Ep ? W.load_cg(&sn(r, e)) : 0;
        }
HEXAMOE_UNROLL
        for (int u = 0; u < 8; ++u) {
          s += v[u];
          m += n[u];
        }
      }
      shp[tid] = s;  // slot g C + e
      shn[tid] = m;
    }
    W.barrier();
    if (tid < C) {  // slot e (g = 0) is read and written by thread e alone
      float s = 0.f;
      int m = 0;
      for (int q = 0; q < G; ++q) {
        s += shp[q * C + tid];
        m += shn[q * C + tid];
      }
      shp[tid] = s;
      shn[tid] = m;
    }
  }
  W.barrier();
  if (tid == 0) {
    float aux = 0.f;
    for (int e = 0; e < E; ++e) {
      float const f = float(shn[e]) / float(T_ * k), pe = shp[e] / float(T_);
      st(0, e) = f;
      st(1, e) = pe;
      aux += f * pe;
    }
    ls(0) = aw * float(E) * aux;
    ls(1) = zw * shp[Ep] / float(T_);
    *done = 0u;
  }
}

}  // namespace detail
}  // namespace hexamoe
