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

#include <algorithm>

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

#if defined(HEXAMOE_HOST_BF16_DOT)
  // bf16 operands on a host with vdpbf16ps (TileGemm.hpp), pairs of
  // positions along the reduction; gate-scaled operands (dW2's g dy) keep the
  // float path: a position's gate cannot leave the sum over positions.
  static constexpr bool bf16_dot = host && std::is_same_v<TA, bfloat16> && std::is_same_v<TB, bfloat16>;
#else
  static constexpr bool bf16_dot = false;
#endif

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
#if defined(HEXAMOE_HOST_BF16_DOT)
      if constexpr (bf16_dot) {
        if (a.source != RowSource::token_gated && b.source != RowSource::token_gated) {
          stage_bf16_pairs(xs, ws, p0, tk, m0, rows, n0, cols, k);
          auto const *ws2 = reinterpret_cast<std::uint32_t const *>(ws);
          host_tile_accumulate_bf16<Shape>(reinterpret_cast<std::uint32_t const *>(xs), ws2, cs, rows, (tk + 1) / 2,
                                           /*kmajor=*/true);
          if (do_bias)
            for (int j = 0; j < (tk + 1) / 2; ++j)
              for (int c = 0; c < Shape::TN; ++c) {
                std::uint32_t const u = ws2[j * Shape::TN + c];
                bsum[c] += bfloat16::to_float(std::uint16_t(u & 0xFFFFu)) + bfloat16::to_float(std::uint16_t(u >> 16));
              }
          continue;
        }
      }
#endif
      // xs[m][kk] = A(p0 + kk)[m0 + m]  (A^T staged), ws[kk][n] = B(p0 + kk)[n0 + n]
      if constexpr (host) {
        for (int kk = 0; kk < tk; ++kk) {
          int const p = p0 + kk;
          int const flat = R.sorted_flat(p);
          Acc const sa = a.scale(flat), sb = b.scale(flat);
          TA const *ar = &a.rows(a.row(p, flat, k), m0);
          TB const *br = &b.rows(b.row(p, flat, k), n0);
          Acc *xk = xs + kk * Shape::TM;  // k-major: a contiguous run per position
          for (int m = 0; m < rows; ++m) xk[m] = sa * to_acc<Acc>(ar[m]);
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
        host_tile_accumulate<Shape>(xs, ws, cs, rows, cols, tk, /*kmajor=*/true);
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
      for (int r = 0; r < rows; ++r) {
        TO *o = &out(e, m0 + r, n0);  // a contiguous run (the loop vectorises)
        Acc const *v = cs + r * Shape::TN;
        for (int c = 0; c < cols; ++c) o[c] = static_cast<TO>(v[c]);
      }
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

#if defined(HEXAMOE_HOST_BF16_DOT)
  // Stages positions p0 .. p0 + tk as pairs (TileGemm.hpp's host_micro_bf16):
  // xs2[j][m] = (A(p0 + 2j)[m0 + m], A(p0 + 2j + 1)[m0 + m]) (k-major),
  // ws2[j][n] likewise from B, a zero past an odd tk and zero columns past cols.
  void stage_bf16_pairs(Acc *xs, Acc *ws, int p0, int tk, int m0, int rows, int n0, int cols, int k) const {
    constexpr int TM = Shape::TM, TN = Shape::TN;
    auto *xs2 = reinterpret_cast<std::uint32_t *>(xs);
    auto *ws2 = reinterpret_cast<std::uint32_t *>(ws);
    for (int j = 0; j < (tk + 1) / 2; ++j) {
      int const p = p0 + 2 * j;
      bool const two = 2 * j + 1 < tk;
      int const f0 = R.sorted_flat(p), f1 = two ? R.sorted_flat(p + 1) : f0;
      // Without a second position the first stands in for it (read, then masked to zero).
      bfloat16 const *a0 = &a.rows(a.row(p, f0, k), m0), *a1 = two ? &a.rows(a.row(p + 1, f1, k), m0) : a0;
      bfloat16 const *b0 = &b.rows(b.row(p, f0, k), n0), *b1 = two ? &b.rows(b.row(p + 1, f1, k), n0) : b0;
      std::uint32_t const hi = two ? 0xFFFFu : 0u;  // the second position's half, or zero
      for (int m = 0; m < rows; ++m)
        xs2[j * TM + m] = std::uint32_t(a0[m].bits) | ((std::uint32_t(a1[m].bits) & hi) << 16);
      std::uint32_t *dst = ws2 + j * TN;
      for (int n = 0; n < cols; ++n) dst[n] = std::uint32_t(b0[n].bits) | ((std::uint32_t(b1[n].bits) & hi) << 16);
      for (int n = cols; n < TN; ++n) dst[n] = 0;
    }
  }
#endif
};


// Device ESTMM on the engine of TileGemm.hpp: a team of 256 threads owns one
// (expert, 128 rows of M, 128 columns of N) and walks the expert's sorted
// positions in order (deterministic). With bf16 tensor cores, row scales (the
// gate of a token_gated operand) multiply B in float and B is split into two
// bf16 halves (hi + lo), so the scale costs no accuracy; float paths scale in
// float as they stage.
template <class ExecutionSpace, class TA, class TB, class TO, class MemorySpace, dev::Math M, bool Scaled>
struct EstmmDeviceKernel {
  using Base = EstmmKernel<ExecutionSpace, TA, TB, TO, MemorySpace>;
  using member_type = typename Base::member_type;
  static constexpr int BM = dev::BM, BN = dev::BN, NT = dev::NT, BKF = dev::BKF;
  static constexpr bool mma_bf16 = M == dev::Math::bf16_mma;
  static constexpr bool lo = mma_bf16 && Scaled;
  static constexpr int BK = mma_bf16 ? (Scaled ? 16 : 32) : dev::BKF;

  Base k;
  bool vec_a, vec_b;
  bool async;  // asynchronous copies allowed (dev::async_copies_for)
  // Split of each expert's positions into `splits` consecutive ranges (so
  // that few, long tiles still fill the device): range 0 writes out and
  // bias_out, range s > 0 its partial sums to part (s - 1), which
  // add_partials then adds in order (deterministic).
  int splits;
  Kokkos::View<float *, MemorySpace> part;

  // bf16 operands copied as they are stored (a gate-scaled B is scaled and
  // split as its fragments are read, its stage's scales beside the stages).
  static constexpr bool async_ok = mma_bf16;
  static constexpr std::size_t async_bytes = std::size_t(dev::PSH) * 2 * dev::PKH * BM * sizeof(bfloat16) +
                                             (Scaled ? std::size_t(dev::PSH) * dev::PKH * sizeof(float) : 0) + 128;
  KOKKOS_INLINE_FUNCTION static constexpr std::size_t scratch() {
    return async_ok && async_bytes > dev::scratch_bytes<M>(BK, lo) ? async_bytes : dev::scratch_bytes<M>(BK, lo);
  }

  KOKKOS_INLINE_FUNCTION void operator()(member_type const &team) const {
    auto const &R = k.R;
    int const split = team.league_rank() % splits;
    int const league = team.league_rank() / splits;
    int const nt = league % k.n_tiles;
    int const mt = (league / k.n_tiles) % k.m_tiles;
    int const e = league / (k.n_tiles * k.m_tiles);
    int const m0 = mt * BM, n0 = nt * BN;
    int const rows = (k.M - m0) < BM ? (k.M - m0) : BM;
    int const cols = (k.N - n0) < BN ? (k.N - n0) : BN;
    // This split's positions: ranges of a multiple of 32 (whole k steps).
    int const ebeg = R.offsets(e), eend = R.offsets(e + 1);
    int const chunk = ((eend - ebeg + splits - 1) / splits + 31) / 32 * 32;
    int const pbeg = ebeg + split * chunk < eend ? ebeg + split * chunk : eend;
    int const pend = pbeg + chunk < eend ? pbeg + chunk : eend;
    bool const do_bias = k.bias_out.data() != nullptr && mt == 0;
    int const tid = team.team_rank();
    void *smem = team.team_shmem().get_shmem_aligned(scratch() - 128, 128);

    float acc[8][8];
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    float bsum = 0.f;  // fused ESS: thread tid < BN sums column tid
    if constexpr (mma_bf16) {
      if (async_ok && vec_a && vec_b && async) {
        main_loop_bf16_async(team, static_cast<bfloat16 *>(smem), acc, bsum, do_bias, pbeg, pend, m0, rows, n0, cols,
                             tid);
      } else {
        main_loop_bf16(team, static_cast<bfloat16 *>(smem), acc, bsum, do_bias, pbeg, pend, m0, rows, n0, cols, tid);
      }
    } else {
      main_loop_f32(team, static_cast<float *>(smem), acc, bsum, do_bias, pbeg, pend, m0, rows, n0, cols, tid);
    }
    using TOut = typename Base::Acc;
    if (split == 0) {
      for (int i = 0; i < 8; ++i) {
        int const r = dev::acc_row<M>(tid, i);
        if (r >= rows) continue;
        for (int j = 0; j < 8; ++j) {
          int const c = dev::acc_col<M>(tid, j);
          if (c < cols) k.out(e, m0 + r, n0 + c) = static_cast<TO>(static_cast<TOut>(acc[i][j]));
        }
      }
      if (do_bias && tid < cols) k.bias_out(e, n0 + tid) = static_cast<TO>(static_cast<TOut>(bsum));
    } else {
      std::size_t const EMN = std::size_t(k.R.num_experts) * k.M * k.N;
      float *w = part.data() + std::size_t(split - 1) * EMN;
      for (int i = 0; i < 8; ++i) {
        int const r = dev::acc_row<M>(tid, i);
        if (r >= rows) continue;
        for (int j = 0; j < 8; ++j) {
          int const c = dev::acc_col<M>(tid, j);
          if (c < cols) w[(std::size_t(e) * k.M + m0 + r) * k.N + n0 + c] = acc[i][j];
        }
      }
      if (do_bias && tid < cols)
        part((splits - 1) * EMN + (std::size_t(split - 1) * k.R.num_experts + e) * k.N + n0 + tid) = bsum;
    }
  }

  // The loads of a k step read rows through flat ids fetched one step earlier
  // (fetch), so that the index load and the data load do not form a chain
  // inside one step; the row scales (gates) are applied when staged (store).
  KOKKOS_INLINE_FUNCTION int fetch_flat(int p, int pend) const { return p < pend ? k.R.sorted_flat(p) : -1; }
  template <class T>
  KOKKOS_INLINE_FUNCTION T const *row_ptr(RowOperand<T, MemorySpace> const &op, int p, int flat, int col) const {
    return flat < 0 ? nullptr : &op.rows(op.row(p, flat, k.R.top_k), 0) + col;
  }
  KOKKOS_INLINE_FUNCTION void scales(int flat, float &sa, float &sb) const {
    sa = sb = 1.f;
    if constexpr (Scaled) {
      if (flat >= 0) {
        sa = static_cast<float>(k.a.scale(flat));
        sb = static_cast<float>(k.b.scale(flat));
      }
    }
  }

  // bf16 operands with 16-byte aligned rows: asynchronous copies into PSH
  // stages of 16 positions (see the ESMM kernel); the flat ids of a stage are
  // read one stage before its copies are issued. With Scaled (dW2's g dy;
  // HEXAMOE_ASYNC_COPY=stored stages it through registers instead) the
  // product of a position's two scales goes beside its stage and B's
  // fragments are scaled and split into hi + lo as they are read
  // (dev::mma_k16_bf16_scaled): the same products, in the same order, as
  // main_loop_bf16 forms from the operands it scales as it stages.
  KOKKOS_INLINE_FUNCTION void main_loop_bf16_async(member_type const &team, bfloat16 *smem, float (&acc)[8][8],
                                                   float &bsum, bool do_bias, int pbeg, int pend, int m0, int rows,
                                                   int n0, int cols, int tid) const {
    if constexpr (async_ok) {
      constexpr int PK = dev::PKH, PS = dev::PSH;
      constexpr unsigned stage_bytes = PK * BM * sizeof(bfloat16);
      bfloat16 const *sBp = smem + PS * PK * BM;  // PS x [PK][BN] (rows p, sw128), after PS x A [PK][BM]
      float *sS = reinterpret_cast<float *>(smem + 2 * PS * PK * BM);  // PS x [PK] scales (Scaled only)
      unsigned const sA = dev::smem_u32(smem), sB = sA + PS * stage_bytes;
      // This thread copies position row tid / 16 of each stage, 8 columns at
      // 8 (tid % 16) of A and of B.
      int const pr = tid >> 4, cc = (tid & 15) * 8;
      int const an = rows - cc < 0 ? 0 : (rows - cc > 8 ? 8 : rows - cc);
      int const bn = cols - cc < 0 ? 0 : (cols - cc > 8 ? 8 : cols - cc);
      unsigned const dst = 2u * static_cast<unsigned>(dev::sw128(pr, cc));
      void const *dummy = k.a.rows.data();  // aligned; read for no byte
      int fl = fetch_flat(pbeg + pr, pend);  // flat id of the next stage's row
      int p = pbeg + pr, slot_w = 0;
      auto issue = [&]() {
        TA const *ap = row_ptr(k.a, p, fl, m0 + cc);
        TB const *bp = row_ptr(k.b, p, fl, n0 + cc);
        unsigned const off = slot_w * stage_bytes + dst;
        dev::cp_async16_at(sA + off, ap && an > 0 ? static_cast<void const *>(ap) : dummy, ap ? 2 * an : 0);
        dev::cp_async16_at(sB + off, bp && bn > 0 ? static_cast<void const *>(bp) : dummy, bp ? 2 * bn : 0);
        if constexpr (Scaled) {
          if ((tid & 15) == 0) {
            float sa, sb;
            scales(fl, sa, sb);
            sS[slot_w * PK + pr] = sa * sb;
          }
        }
        p += PK;
        fl = fetch_flat(p, pend);
        slot_w = slot_w + 1 == PS ? 0 : slot_w + 1;
      };
      unsigned a_ld[4], b_ld[2];
      dev::ldsm_addresses<true, false>(a_ld, b_ld, sA, sB, tid);
      int const warp = tid >> 5;
      bool const active = (warp >> 2) * 64 < rows && (warp & 3) * 32 < cols;
      dev::async_pipeline<PS>(team, (pend - pbeg + PK - 1) / PK, issue, [&](int slot_r) {
        if (active) {
          if constexpr (Scaled) {
            dev::mma_k16_bf16_scaled(acc, a_ld, b_ld, slot_r * stage_bytes, sS + slot_r * PK, tid);
          } else {
            dev::mma_k16_bf16<true, false>(acc, a_ld, b_ld, slot_r * stage_bytes);
          }
        }
        if (do_bias && tid < BN) {
          bfloat16 const *sb = sBp + slot_r * (PK * BM);
HEXAMOE_UNROLL
          for (int kk = 0; kk < PK; ++kk) {
            if constexpr (Scaled) {  // hi, then lo, as main_loop_bf16 adds them
              float const x = dev::mul_rn(sS[slot_r * PK + kk], static_cast<float>(sb[dev::sw128(kk, tid)]));
              bfloat16 const h(x);
              bsum += static_cast<float>(h);
              bsum += static_cast<float>(bfloat16(x - static_cast<float>(h)));
            } else {
              bsum += static_cast<float>(sb[dev::sw128(kk, tid)]);
            }
          }
        }
      });
    } else {
      (void)team, (void)smem, (void)acc, (void)bsum, (void)do_bias, (void)pbeg, (void)pend, (void)m0, (void)rows,
          (void)n0, (void)cols, (void)tid;
    }
  }

  KOKKOS_INLINE_FUNCTION void main_loop_bf16(member_type const &team, bfloat16 *smem, float (&acc)[8][8], float &bsum,
                                             bool do_bias, int pbeg, int pend, int m0, int rows, int n0, int cols,
                                             int tid) const {
    if constexpr (mma_bf16) {
      constexpr int NS = BK / 16;  // staging slots per thread and operand
      constexpr int stage = BK * BM;
      bfloat16 *sA = smem;               // 2 x [BK][BM] (rows p, sw128)
      bfloat16 *sB = smem + 2 * stage;   // 2 x [BK][BN]
      bfloat16 *sL = smem + 4 * stage;   // 2 x [BK][BN], low halves (lo only)
      int const cc = (tid & 15) * 8;
      dev::Vec16 ra[NS], rb[NS];
      float sa[NS], sb[NS];
      int fl[NS];  // flat ids of the next load
      auto fetch = [&](int p0) {
        for (int i = 0; i < NS; ++i) fl[i] = fetch_flat(p0 + (tid >> 4) + 16 * i, pend);
      };
      auto load = [&](int p0) {
        for (int i = 0; i < NS; ++i) {
          int const p = p0 + (tid >> 4) + 16 * i;
          TA const *ap = row_ptr(k.a, p, fl[i], m0 + cc);
          TB const *bp = row_ptr(k.b, p, fl[i], n0 + cc);
          ra[i] = dev::load8(ap, ap ? rows - cc : 0, vec_a);
          rb[i] = dev::load8(bp, bp ? cols - cc : 0, vec_b);
          scales(fl[i], sa[i], sb[i]);
        }
      };
      auto store = [&](int s) {
        for (int i = 0; i < NS; ++i) {
          int const off = dev::sw128((tid >> 4) + 16 * i, cc);
          *reinterpret_cast<dev::Vec16 *>(sA + s * stage + off) = ra[i];
          if constexpr (lo) {
            dev::Vec16 hi, low;
            dev::scale_split(rb[i], sa[i] * sb[i], hi, low);
            *reinterpret_cast<dev::Vec16 *>(sB + s * stage + off) = hi;
            *reinterpret_cast<dev::Vec16 *>(sL + s * stage + off) = low;
          } else {
            *reinterpret_cast<dev::Vec16 *>(sB + s * stage + off) = rb[i];
          }
        }
      };
      int const warp = tid >> 5;
      bool const active = (warp >> 2) * 64 < rows && (warp & 3) * 32 < cols;
      int const nk = (pend - pbeg + BK - 1) / BK;
      if (nk > 0) {
        fetch(pbeg);
        load(pbeg);
        fetch(pbeg + BK);
        store(0);
      }
      team.team_barrier();
      for (int kt = 0; kt < nk; ++kt) {
        if (kt + 1 < nk) {
          load(pbeg + (kt + 1) * BK);   // ids fetched a step ago
          fetch(pbeg + (kt + 2) * BK);  // used by the next step's load
        }
        int const s = kt & 1;
        if (active) dev::mma_step_bf16<BK, true, false, lo>(acc, sA + s * stage, sB + s * stage, sL + s * stage, tid);
        if (do_bias && tid < BN)
          for (int kk = 0; kk < BK; ++kk) {
            int const off = s * stage + dev::sw128(kk, tid);
            bsum += static_cast<float>(sB[off]);
            if constexpr (lo) bsum += static_cast<float>(sL[off]);
          }
        if (kt + 1 < nk) store((kt + 1) & 1);
        team.team_barrier();
      }
    } else {
      (void)team, (void)smem, (void)acc, (void)bsum, (void)do_bias, (void)pbeg, (void)pend, (void)m0, (void)rows,
          (void)n0, (void)cols, (void)tid;
    }
  }

  KOKKOS_INLINE_FUNCTION void main_loop_f32(member_type const &team, float *smem, float (&acc)[8][8], float &bsum,
                                            bool do_bias, int pbeg, int pend, int m0, int rows, int n0, int cols,
                                            int tid) const {
    if constexpr (!mma_bf16) {
      constexpr int LD = dev::LDF, stage = BKF * LD;
      float *sA = smem;              // 2 x [BKF][LDF]: rows p, columns m
      float *sB = smem + 2 * stage;  // 2 x [BKF][LDF]: rows p, columns n
      int const cc = (tid & 31) * 4;
      dev::Float4 ra[2], rb[2];
      float sa[2], sb[2];
      int fl[2];  // flat ids of the next load
      auto fetch = [&](int p0) {
        for (int i = 0; i < 2; ++i) fl[i] = fetch_flat(p0 + (tid >> 5) + 8 * i, pend);
      };
      // Full tiles of 16-byte rows load a whole k step of valid positions
      // without per-element bounds (all but the last step of a range).
      bool const full = vec_a && vec_b && rows == BM && cols == BN;
      auto load = [&](int p0) {
        bool const fast = full && p0 + BKF <= pend;
        for (int i = 0; i < 2; ++i) {
          int const p = p0 + (tid >> 5) + 8 * i;
          TA const *ap = row_ptr(k.a, p, fl[i], m0 + cc);
          TB const *bp = row_ptr(k.b, p, fl[i], n0 + cc);
          if (fast) {
            ra[i] = dev::load4_full(ap);
            rb[i] = dev::load4_full(bp);
          } else {
            ra[i] = dev::load4(ap, ap ? rows - cc : 0, vec_a);
            rb[i] = dev::load4(bp, bp ? cols - cc : 0, vec_b);
          }
          scales(fl[i], sa[i], sb[i]);
        }
      };
      auto store = [&](int s) {
        for (int i = 0; i < 2; ++i) {
          if constexpr (Scaled) {
            for (int j = 0; j < 4; ++j) {
              ra[i].v[j] *= sa[i];
              rb[i].v[j] *= sb[i];
            }
          }
          int const off = s * stage + ((tid >> 5) + 8 * i) * LD + cc;
          dev::put4_row<M>(sA + off, ra[i]);
          dev::put4_row<M>(sB + off, rb[i]);
        }
      };
      int const nk = (pend - pbeg + BKF - 1) / BKF;
      if (nk > 0) {
        fetch(pbeg);
        load(pbeg);
        fetch(pbeg + BKF);
        store(0);
      }
      team.team_barrier();
      for (int kt = 0; kt < nk; ++kt) {
        if (kt + 1 < nk) {
          load(pbeg + (kt + 1) * BKF);   // ids fetched a step ago
          fetch(pbeg + (kt + 2) * BKF);  // used by the next step's load
        }
        int const s = kt & 1;
        dev::step_f32<M>(acc, sA + s * stage, sB + s * stage, tid);
        if (do_bias && tid < BN)
          for (int kk = 0; kk < BKF; ++kk) bsum += sB[s * stage + kk * LD + tid];
        if (kt + 1 < nk) store((kt + 1) & 1);
        team.team_barrier();
      }
    } else {
      (void)team, (void)smem, (void)acc, (void)bsum, (void)do_bias, (void)pbeg, (void)pend, (void)m0, (void)rows,
          (void)n0, (void)cols, (void)tid;
    }
  }
};

// A float buffer in MemorySpace shared by every ESTMM call (the partial sums
// of split position ranges), grown on demand and released at Kokkos::finalize.
// ESTMM calls on different execution space instances must not overlap in time.
template <class MemorySpace>
Kokkos::View<float *, MemorySpace> split_workspace(std::size_t n, bool release = false) {
  static Kokkos::View<float *, MemorySpace> *ws = nullptr;
  if (release) {
    if (ws != nullptr) *ws = Kokkos::View<float *, MemorySpace>();
    return {};
  }
  if (ws == nullptr) {
    ws = new Kokkos::View<float *, MemorySpace>();
    Kokkos::push_finalize_hook([] {
      delete ws;
      ws = nullptr;
    });
  }
  if (ws->extent(0) < n) {
    *ws = Kokkos::View<float *, MemorySpace>();  // release first (the release waits for the device)
    *ws = Kokkos::View<float *, MemorySpace>(Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::split_partials"),
                                             n + n / 4);  // headroom: the next call's shape may differ a little
  }
  return *ws;
}

// Frees the shared partials buffer (benchmarks measuring one layer's peak).
template <class MemorySpace>
void release_split_workspace() {
  split_workspace<MemorySpace>(0, true);
  dev::tail_workspace<MemorySpace>(0, 0, true);
}

// How many position ranges each expert's ESTMM tiles split into: enough
// tiles for about four waves of two teams per streaming multiprocessor (from
// the space's concurrency, 2048 threads each), at most 3 (the partials' memory
// is (splits - 1) E M N floats), and ranges of 32 positions or more on average.
template <class ExecutionSpace>
int estmm_splits(ExecutionSpace const &space, int tiles, int assignments, int E) {
  long const slots = std::max<long>(1, static_cast<long>(space.concurrency()) / 1024);
  long const want = (4 * slots + tiles - 1) / std::max(1, tiles);
  long const by_len = std::max(1, assignments / std::max(1, E)) / 32;
  return static_cast<int>(std::max<long>(1, std::min<long>({3, want, by_len})));
}

template <class ExecutionSpace, class TO, class MemorySpace>
struct AddPartials {
  Kokkos::View<TO ***, Kokkos::LayoutRight, MemorySpace> out;
  Kokkos::View<TO **, Kokkos::LayoutRight, MemorySpace> bias_out;
  Kokkos::View<float *, MemorySpace> part;
  int splits, M, N;
  std::size_t EMN;
  KOKKOS_INLINE_FUNCTION void operator()(std::size_t i) const {
    if (i < EMN) {
      float v = static_cast<float>(out.data()[i]);
      for (int s = 1; s < splits; ++s) v += part(std::size_t(s - 1) * EMN + i);
      out.data()[i] = static_cast<TO>(v);
    } else if (bias_out.data() != nullptr) {
      std::size_t const j = i - EMN;  // e * N + n
      float v = static_cast<float>(bias_out.data()[j]);
      std::size_t const EN = bias_out.extent(0) * bias_out.extent(1);
      for (int s = 1; s < splits; ++s) v += part(std::size_t(splits - 1) * EMN + std::size_t(s - 1) * EN + j);
      bias_out.data()[j] = static_cast<TO>(v);
    }
  }
};

template <dev::Math M, class ExecutionSpace, class TA, class TB, class TO, class MemorySpace>
void launch_estmm_device(ExecutionSpace const &space, EstmmKernel<ExecutionSpace, TA, TB, TO, MemorySpace> const &base,
                         int E) {
  constexpr int width = M == dev::Math::bf16_mma ? 8 : 4;
  bool const vec_a = dev::vector_ok(base.a.rows.data(), base.a.rows.stride_0(), width);
  bool const vec_b = dev::vector_ok(base.b.rows.data(), base.b.rows.stride_0(), width);
  auto b = base;
  b.m_tiles = (base.M + dev::BM - 1) / dev::BM;
  b.n_tiles = (base.N + dev::BN - 1) / dev::BN;
  bool const scaled = base.a.source == RowSource::token_gated || base.b.source == RowSource::token_gated;
  int const tiles = E * b.m_tiles * b.n_tiles;
  int const splits = estmm_splits(space, tiles, base.R.num_assignments(), E);
  std::size_t const EMN = std::size_t(E) * base.M * base.N, EN = std::size_t(E) * base.N;
  Kokkos::View<float *, MemorySpace> part;
  if (splits > 1) part = split_workspace<MemorySpace>(std::size_t(splits - 1) * (EMN + EN));
  auto run = [&](auto kernel) {
    using Kernel = decltype(kernel);
    auto policy = Kokkos::Experimental::require(
        Kokkos::TeamPolicy<ExecutionSpace, Kokkos::LaunchBounds<dev::NT, 2>>(space, tiles * splits, dev::NT),
        Kokkos::Experimental::WorkItemProperty::HintLightWeight);  // no constant-memory launch (host wait)
    policy.set_scratch_size(0, Kokkos::PerTeam(Kernel::scratch()));
    Kokkos::parallel_for(dev::kernel_label("hexamoe::estmm", M, scaled ? ", gated" : ""), policy, kernel);
  };
  if (scaled) {
    run(EstmmDeviceKernel<ExecutionSpace, TA, TB, TO, MemorySpace, M, true>{b, vec_a, vec_b, dev::async_copies_for(M, true),
                                                                             splits, part});
  } else {
    run(EstmmDeviceKernel<ExecutionSpace, TA, TB, TO, MemorySpace, M, false>{b, vec_a, vec_b, dev::async_copies_for(M, false),
                                                                              splits, part});
  }
  if (splits > 1)
    Kokkos::parallel_for("hexamoe::estmm_add_partials",
                         compat::light(Kokkos::RangePolicy<ExecutionSpace, Kokkos::IndexType<std::size_t>>(space, 0, EMN + EN)),
                         AddPartials<ExecutionSpace, TO, MemorySpace>{base.out, base.bias_out, part, splits, base.M,
                                                                      base.N, EMN});
}

// Device dispatch: returns false where the generic tile must run.
template <class ExecutionSpace, class TA, class TB, class TO, class MemorySpace>
bool estmm_on_device_engine(ExecutionSpace const &space,
                            EstmmKernel<ExecutionSpace, TA, TB, TO, MemorySpace> const &base, int E) {
  using A = std::remove_const_t<TA>;
  using B = std::remove_const_t<TB>;
  if constexpr (runs_on_host<ExecutionSpace> || !std::is_same_v<A, B> ||
                !(std::is_same_v<A, float> || std::is_same_v<A, bfloat16>) ||
                !std::is_same_v<accumulator_t<TO>, float>) {
    (void)space, (void)base, (void)E;
    return false;
  } else {
    // (math_for picks a tensor-core case only where has_cuda_tensor_cores.)
    switch (dev::math_for<ExecutionSpace, TA, TB>()) {
      case dev::Math::bf16_mma:
        if constexpr (std::is_same_v<A, bfloat16> && dev::has_cuda_tensor_cores<ExecutionSpace>)
          launch_estmm_device<dev::Math::bf16_mma>(space, base, E);
        return true;
      case dev::Math::tf32_mma:
        if constexpr (std::is_same_v<A, float> && dev::has_cuda_tensor_cores<ExecutionSpace>)
          launch_estmm_device<dev::Math::tf32_mma>(space, base, E);
        return true;
      case dev::Math::tf32x3_mma:
        if constexpr (std::is_same_v<A, float> && dev::has_cuda_tensor_cores<ExecutionSpace>)
          launch_estmm_device<dev::Math::tf32x3_mma>(space, base, E);
        return true;
      case dev::Math::simt:
        launch_estmm_device<dev::Math::simt>(space, base, E);
        return true;
      default:
        return false;
    }
  }
}

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
  if (detail::estmm_on_device_engine(space, kernel, E)) return;
  detail::tile_team_policy<ExecutionSpace> policy(space, E * m_tiles * n_tiles, Kernel::host ? 1 : Shape::team_size);
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
