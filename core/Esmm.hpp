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
#include "EsmmHopper.hpp"
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
  // Host teams: consecutive row tiles of one expert per team (esmm_host_row_group),
  // which stage each chunk of W once for all of them. Devices: 1.
  int row_group = 1;

#if defined(HEXAMOE_HOST_BF16_DOT)
  // bf16 operands on a host with vdpbf16ps (TileGemm.hpp). A row's gate
  // scales its sum instead of its operands ((g x) W = g (x W)), which bf16
  // could not hold without a second product.
  static constexpr bool bf16_dot = host && std::is_same_v<TX, bfloat16> && std::is_same_v<TW, bfloat16>;
#else
  static constexpr bool bf16_dot = false;
#endif

  KOKKOS_INLINE_FUNCTION void operator()(member_type const &team) const {
    int const league = team.league_rank();
    int const ct = league % col_tiles;
    int tile = league / col_tiles;
    // Find this team's expert and row tile, or group of row_group row tiles
    // on the host (tiles and groups never straddle experts).
    int const G = host ? row_group : 1;
    int e = 0;
    int const E = R.num_experts;
    for (; e < E; ++e) {
      int const nt = (R.counts(e) + G * Shape::TM - 1) / (G * Shape::TM);
      if (tile < nt) break;
      tile -= nt;
    }
    if (e == E) return;  // past the last tile (the league is an upper bound)
    int const c0 = ct * Shape::TN;
    int const cols = (N - c0) < Shape::TN ? (N - c0) : Shape::TN;
    int const k = R.top_k;
    if constexpr (host) {
      int const rest = R.counts(e) - tile * G * Shape::TM;
      host_group(team, e, R.offsets(e) + tile * G * Shape::TM, rest < G * Shape::TM ? rest : G * Shape::TM, c0, cols);
    } else {
      int const p0 = R.offsets(e) + tile * Shape::TM;
      int const rows = (R.counts(e) - tile * Shape::TM) < Shape::TM ? (R.counts(e) - tile * Shape::TM) : Shape::TM;

      // The portable kernel on a device: a team of threads per tile, each
      // thread an RM x RN block of accumulators in registers.
      Acc *xs = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TM * Shape::TK));
      Acc *ws = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TK * Shape::TN));
      int const tr = team.team_rank() / (Shape::TN / Shape::RN);
      int const tc = team.team_rank() % (Shape::TN / Shape::RN);
      Acc acc[Shape::RM][Shape::RN];
      for (int r = 0; r < Shape::RM; ++r)
        for (int c = 0; c < Shape::RN; ++c) acc[r][c] = Acc(0);

      auto const we = Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL);
      for (int k0 = 0; k0 < K; k0 += Shape::TK) {
        int const tk = (K - k0) < Shape::TK ? (K - k0) : Shape::TK;
        team.team_barrier();
        // Stage X rows (through the index, gate-scaled if asked) ...
        team_for_2d<false>(team, Shape::TM, Shape::TK, [&](int r, int kk) {
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
          team_for_2d<false>(team, Shape::TN, Shape::TK, [&](int c, int kk) {
            ws[kk * Shape::TN + c] = (c < cols && kk < tk) ? to_acc<Acc>(we(c0 + c, k0 + kk)) : Acc(0);
          });
        } else {
          team_for_2d<false>(team, Shape::TK, Shape::TN, [&](int kk, int c) {
            ws[kk * Shape::TN + c] = (c < cols && kk < tk) ? to_acc<Acc>(we(k0 + kk, c0 + c)) : Acc(0);
          });
        }
        team.team_barrier();
        if (tr * Shape::RM < rows && tc * Shape::RN < cols)
          device_thread_accumulate<Shape>(acc, xs, ws, tr * Shape::RM, tc * Shape::RN, tk);
      }

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

  // A host team (one thread): `grows` rows of expert e from position g0, in
  // row tiles of TM, and the columns c0 .. c0 + cols. Each chunk of W is
  // staged once for all of the team's row tiles; each row's sum runs over the
  // chunks in order, as with one tile a team, so the grouping keeps the bits.
  KOKKOS_INLINE_FUNCTION void host_group(member_type const &team, int e, int g0, int grows, int c0, int cols) const {
    int const k = R.top_k;
    Acc *xs = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TM * Shape::TK));
    Acc *ws = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * Shape::TK * Shape::TN));
    Acc *cs = static_cast<Acc *>(team.team_shmem().get_shmem(sizeof(Acc) * std::size_t(row_group) * Shape::TM * Shape::TN));
    for (int i = 0; i < grows * Shape::TN; ++i) cs[i] = Acc(0);

    auto const we = Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL);
    for (int k0 = 0; k0 < K; k0 += Shape::TK) {
      int const tk = (K - k0) < Shape::TK ? (K - k0) : Shape::TK;
#if defined(HEXAMOE_HOST_BF16_DOT)
      if constexpr (bf16_dot) {
        // W staged as pairs, X rows read in place (no staged copy).
        stage_bf16_pairs(ws, we, c0, cols, k0, tk);
        for (int t0 = 0; t0 < grows; t0 += Shape::TM) {
          int const rows = grows - t0 < Shape::TM ? grows - t0 : Shape::TM;
          std::uint16_t const *rowp[Shape::TM];
          for (int r = 0; r < rows; ++r) {
            int const p = g0 + t0 + r;
            rowp[r] = &x.rows(x.row(p, R.sorted_flat(p), k), k0).bits;
          }
          host_tile_accumulate_bf16_rowp<Shape>(rowp, reinterpret_cast<std::uint32_t const *>(ws),
                                                cs + std::size_t(t0) * Shape::TN, rows, tk);
        }
        continue;
      }
#endif
      if (transpose_w) {
        if (!stage_float_transposed(ws, we, c0, cols, k0, tk))
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
      for (int t0 = 0; t0 < grows; t0 += Shape::TM) {
        int const rows = grows - t0 < Shape::TM ? grows - t0 : Shape::TM;
        // Resolve each row once, then convert a contiguous run.
        for (int r = 0; r < rows; ++r) {
          int const p = g0 + t0 + r;
          int const flat = R.sorted_flat(p);
          Acc const sc = x.scale(flat);
          TX const *src = &x.rows(x.row(p, flat, k), k0);
          Acc *dst = xs + r * Shape::TK;
          for (int kk = 0; kk < tk; ++kk) dst[kk] = sc * to_acc<Acc>(src[kk]);
        }
        host_tile_accumulate<Shape>(xs, ws, cs + std::size_t(t0) * Shape::TN, rows, cols, tk);
      }
    }

    if (bf16_dot && x.source == RowSource::token_gated)
      for (int r = 0; r < grows; ++r) {
        Acc const g = x.scale(R.sorted_flat(g0 + r));
        for (int c = 0; c < cols; ++c) cs[r * Shape::TN + c] *= g;
      }
    host_epilogue(e, g0, grows, c0, cols, k, cs);
  }

  // float32 W^T on a host with vector extensions: the chunk as a transposed
  // copy of words (TileGemm.hpp's host_transpose32); false elsewhere.
  template <class WE>
  KOKKOS_INLINE_FUNCTION bool stage_float_transposed(Acc *ws, WE const &we, int c0, int cols, int k0, int tk) const {
#if defined(HEXAMOE_HOST_VECTORS)
    if constexpr (std::is_same_v<TW, float> && std::is_same_v<Acc, float>) {
      host_transpose32(reinterpret_cast<char const *>(&we(c0, k0)), we.stride_0() * sizeof(float), cols, tk,
                       reinterpret_cast<std::uint32_t *>(ws), Shape::TN);
      return true;
    }
#endif
    (void)ws, (void)we, (void)c0, (void)cols, (void)k0, (void)tk;
    return false;
  }

#if defined(HEXAMOE_HOST_BF16_DOT)
  // Stages a chunk of W as bf16 pairs along k (TileGemm.hpp's
  // host_micro_bf16_rowp): ws2[j][c] = (w[2j][c], w[2j+1][c]), a zero past an
  // odd tk and zero columns past cols, in the scratch the float staging uses.
  template <class WE>
  void stage_bf16_pairs(Acc *ws, WE const &we, int c0, int cols, int k0, int tk) const {
    constexpr int TN = Shape::TN;
    int const tk2 = (tk + 1) / 2;
    auto *ws2 = reinterpret_cast<std::uint32_t *>(ws);
    if (transpose_w) {
      // Pairs along k are adjacent in W^T's rows: a transposed copy of words.
      host_transpose32(reinterpret_cast<char const *>(&we(c0, k0)), we.stride_0() * sizeof(bfloat16), cols, tk / 2,
                       ws2, TN);
      if (tk & 1)
        for (int c = 0; c < cols; ++c) ws2[(tk2 - 1) * TN + c] = we(c0 + c, k0 + tk - 1).bits;
    } else {
      for (int j = 0; j < tk2; ++j) {
        bfloat16 const *lo = &we(k0 + 2 * j, c0);
        std::uint32_t *dst = ws2 + j * TN;
        if (2 * j + 1 < tk) {
          bfloat16 const *hi = &we(k0 + 2 * j + 1, c0);
          for (int c = 0; c < cols; ++c) dst[c] = std::uint32_t(lo[c].bits) | (std::uint32_t(hi[c].bits) << 16);
        } else {
          for (int c = 0; c < cols; ++c) dst[c] = lo[c].bits;
        }
      }
    }
    for (int j = 0; j < tk2; ++j)
      for (int c = cols; c < TN; ++c) ws2[j * TN + c] = 0;
  }
#endif

  // The epilogue on the host, a row of the tile at a time: each step a loop
  // over the row that the compiler vectorises (the activation through
  // activate_row's float32 exp and erf).
  KOKKOS_INLINE_FUNCTION void host_epilogue(int e, int p0, int rows, int c0, int cols, int k, Acc *cs) const {
    for (int r = 0; r < rows; ++r) {
      int const p = p0 + r;
      Acc *v = cs + r * Shape::TN;
      if (has_bias) {
        TW const *b = &bias(e, c0);
        for (int c = 0; c < cols; ++c) v[c] += to_acc<Acc>(b[c]);
      }
      bool const grad = ep.act_grad_of.data() != nullptr;
      if (grad) activate_grad_row(ep.act, v, &ep.act_grad_of(p, c0), cols);
      if (ep.pre.data() != nullptr) {
        TY *out = &ep.pre(p, c0);  // may be act_grad_of's row, read above
        for (int c = 0; c < cols; ++c) out[c] = from_acc<TY>(v[c]);
      }
      if (ep.post.data() == nullptr && ep.token_out.data() == nullptr) continue;
      if (!grad) activate_row(ep.act, v, cols);
      if (ep.post.data() != nullptr) {
        TY *out = &ep.post(p, c0);
        for (int c = 0; c < cols; ++c) out[c] = from_acc<TY>(v[c]);
      }
      if (ep.token_out.data() != nullptr) {
        int const flat = R.sorted_flat(p);
        Acc const g = ep.token_gate.data() != nullptr ? ep.token_gate(flat) : Acc(1);
        TY *out = &ep.token_out(flat / k, c0);
        for (int c = 0; c < cols; ++c) out[c] = from_acc<TY>(g * v[c]);
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


// Device ESMM on the engine of TileGemm.hpp: a team of 256 threads owns 128
// sorted positions of one expert x 128 output columns. The gate scale of a
// token_gated X is a per-row factor, applied in the epilogue.
template <class ExecutionSpace, class TX, class TW, class TY, class MemorySpace, dev::Math M, bool TransW>
struct EsmmDeviceKernel {
  using Base = EsmmKernel<ExecutionSpace, TX, TW, TY, MemorySpace>;
  using member_type = typename Base::member_type;
  using Acc = typename Base::Acc;
  static constexpr int BM = dev::BM, BN = dev::BN, NT = dev::NT, BKF = dev::BKF;
  static constexpr bool mma_bf16 = M == dev::Math::bf16_mma;
  static constexpr bool tensor_cores = mma_bf16 || M == dev::Math::tf32_mma || M == dev::Math::tf32x3_mma;
  static constexpr int BK = mma_bf16 ? dev::BKH : dev::BKF;
  static constexpr bool trans_w = TransW;

  Base k;       // operands, epilogue and extents
  bool vec_x;   // X rows readable in 16-byte vectors
  bool vec_w;   // W rows likewise
  bool async;   // asynchronous copies allowed (dev::async_copies_for)
  bool pairs;   // outputs (and bias, act' input) as aligned pairs of elements
  // Tail split (see dev::TailSplit): the resident team slots (0: off), the
  // partial accumulators of split tiles and their arrival counters and flags.
  int tail_slots = 0;
  Kokkos::View<float *, MemorySpace> tail_part;
  Kokkos::View<int *, MemorySpace> tail_sync;

  // Scratch: the main loop's buffers, reused by the epilogue's staging of
  // 128 x 64 accumulators (and, before the loop, by the experts' tile counts),
  // then the row table (flat id, row scale, token gate of each tile row).
  static constexpr std::size_t async_bytes = std::size_t(dev::PSH) * 2 * BM * dev::PKH * sizeof(bfloat16);
  static constexpr std::size_t main_bytes = mma_bf16 && async_bytes > dev::scratch_bytes<M>(BK, false) - 128
                                                ? async_bytes
                                                : dev::scratch_bytes<M>(BK, false) - 128;
  static constexpr std::size_t table_bytes = std::size_t(BM) * 3 * 4 + 16;  // (+ one int: the arrival order)
  // (+ 1024: stages start at multiples of 1024 bytes, as wgmma's 128-byte
  // swizzle needs.)
  static constexpr std::size_t align = mma_bf16 ? 1024 : 128;
  KOKKOS_INLINE_FUNCTION static constexpr std::size_t scratch() { return main_bytes + table_bytes + align; }
  static int max_experts() { return static_cast<int>(main_bytes / sizeof(int)); }

  KOKKOS_INLINE_FUNCTION void operator()(member_type const &team) const {
    auto const &R = k.R;
    int const tid = team.team_rank();
    char *smem = static_cast<char *>(team.team_shmem().get_shmem_aligned(scratch() - align, align));
    int *rflat = reinterpret_cast<int *>(smem + main_bytes);
    Acc *rscale = reinterpret_cast<Acc *>(rflat + BM);
    Acc *rgate = rscale + BM;

    // This team's expert and row tile: the experts' tile counts are read
    // once, in parallel, into scratch (tiles never straddle experts).
    int const league = team.league_rank();
    int const E = R.num_experts;
    int *ntiles = reinterpret_cast<int *>(smem);
    for (int i = tid; i < E; i += NT) ntiles[i] = (R.counts(i) + BM - 1) / BM;
    team.team_barrier();
    // Tail split: when the tiles fill one wave of resident teams and leave a
    // second at most half full, each tile of that second wave runs as two
    // teams over the two halves of K. (Measured on H200: the narrow h W2 of
    // Swin-MoE-S stage 3, 363 tiles on 264 slots, 10% faster; x W1, 1452
    // tiles, a sixth wave half full, 5% slower, so longer runs do not split.)
    int unit = league, half = -1, slot = -1;
    if (tail_slots > 0) {
      int total = 0;
      for (int i = 0; i < E; ++i) total += ntiles[i];
      total *= k.col_tiles;
      int const rem = total % tail_slots;
      if (total > tail_slots && total < 2 * tail_slots && 2 * rem <= tail_slots && league >= total - rem) {
        int const j = league - (total - rem);
        if (j >= 2 * rem) return;  // past the split tiles (the league is an upper bound)
        unit = total - rem + j / 2;
        half = j % 2;
        slot = j / 2;
      }
    }
    int const ct = unit % k.col_tiles;
    int tile = unit / k.col_tiles;
    int e = 0;
    for (; e < E; ++e) {
      int const nt = ntiles[e];
      if (tile < nt) break;
      tile -= nt;
    }
    if (e == E) return;  // the whole team leaves (every thread found the same e)
    int const p0 = R.offsets(e) + tile * BM;
    int const rows = (R.counts(e) - tile * BM) < BM ? (R.counts(e) - tile * BM) : BM;
    int const c0 = ct * BN;
    int const cols = (k.N - c0) < BN ? (k.N - c0) : BN;
    if (tid < BM) {
      int const flat = tid < rows ? R.sorted_flat(p0 + tid) : 0;
      rflat[tid] = flat;
      rscale[tid] = tid < rows ? k.x.scale(flat) : Acc(0);
      rgate[tid] = tid < rows && k.ep.token_gate.data() != nullptr ? k.ep.token_gate(flat) : Acc(1);
    }
    team.team_barrier();  // the tile counts are dead, the row table is ready

    float acc[8][8];
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    // The accumulators' layout: wgmma's where the asynchronous bf16 loop runs
    // on it (this machine code has it), else mma.sync's (or the FMA kernel's).
    bool const wg = dev::wgmma_compiled() && mma_bf16 && vec_x && vec_w && async;
    if constexpr (mma_bf16) {
      if (vec_x && vec_w && async) {
        int const nk = (k.K + dev::PKH - 1) / dev::PKH;
        int const ks0 = half == 1 ? nk / 2 : 0, ks1 = half == 0 ? nk / 2 : nk;
        main_loop_bf16_async(team, reinterpret_cast<bfloat16 *>(smem), rflat, acc, e, p0, rows, c0, cols, tid, ks0,
                             ks1);
        if (half >= 0 && !combine_halves(team, reinterpret_cast<int *>(rgate + BM), acc, slot, tid)) return;
      } else {
        main_loop_bf16(team, reinterpret_cast<bfloat16 *>(smem), rflat, acc, e, p0, rows, c0, cols, tid);
      }
    } else {
      int const nk = (k.K + BKF - 1) / BKF;
      int const ks0 = half == 1 ? nk / 2 : 0, ks1 = half == 0 ? nk / 2 : nk;
      main_loop_f32(team, reinterpret_cast<float *>(smem), rflat, acc, e, p0, rows, c0, cols, tid, ks0, ks1);
      if (half >= 0 && !combine_halves(team, reinterpret_cast<int *>(rgate + BM), acc, slot, tid)) return;
    }

    // Tensor-core layouts with paired outputs: straight from the registers.
    if constexpr (tensor_cores) {
      if (pairs) {
        switch (k.ep.act) {
          case Activation::gelu: epilogue_direct<Activation::gelu>(acc, rflat, rscale, rgate, e, p0, rows, c0, cols, tid, wg); break;
          case Activation::relu: epilogue_direct<Activation::relu>(acc, rflat, rscale, rgate, e, p0, rows, c0, cols, tid, wg); break;
          case Activation::silu: epilogue_direct<Activation::silu>(acc, rflat, rscale, rgate, e, p0, rows, c0, cols, tid, wg); break;
          default: epilogue_direct<Activation::identity>(acc, rflat, rscale, rgate, e, p0, rows, c0, cols, tid, wg); break;
        }
        return;
      }
    }

    // Epilogue through scratch, 64 columns at a time: the accumulators go to
    // scratch with compile-time indices (they stay in registers); then each
    // thread owns one column (tid % 64) and every fourth row, reads its bias
    // once and the act' inputs eight rows at a time before any store (they
    // may alias the output), so that loads overlap; stores are coalesced.
    float *stage = reinterpret_cast<float *>(smem);
    constexpr int LD = dev::LDE;
    int const topk = R.top_k;
    auto const &ep = k.ep;
    bool const agrad = ep.act_grad_of.data() != nullptr;
    bool const want_act = ep.post.data() != nullptr || ep.token_out.data() != nullptr;
    for (int half = 0; half < 2; ++half) {
      team.team_barrier();  // the main loop's scratch (or the last half) is free
HEXAMOE_UNROLL
      for (int i = 0; i < 8; ++i)
HEXAMOE_UNROLL
        for (int j = 0; j < 8; ++j) {
          int const c = wg ? dev::wgmma_acc_col(tid, i, j) : dev::acc_col<M>(tid, j);
          int const r = wg ? dev::wgmma_acc_row(tid, i) : dev::acc_row<M>(tid, i);
          if ((c >> 6) == half) stage[r * LD + (c & 63)] = acc[i][j];
        }
      team.team_barrier();
      if constexpr (mma_bf16) {  // (float: measured slower, register pressure of the FMA kernel)
        if (pairs) {
          epilogue_pairs(stage, rflat, rscale, rgate, e, p0, rows, c0 + half * 64, cols - half * 64, tid);
          continue;
        }
      }
      int const c = tid & 63;
      int const n = c0 + half * 64 + c;
      if (half * 64 + c >= cols) continue;
      Acc const bc = k.has_bias ? to_acc<Acc>(k.bias(e, n)) : Acc(0);
      for (int r0 = tid >> 6; r0 < rows; r0 += 32) {
        Acc z[8];
HEXAMOE_UNROLL
        for (int q = 0; q < 8; ++q) {
          int const r = r0 + 4 * q;
          z[q] = agrad && r < rows ? to_acc<Acc>(ep.act_grad_of(p0 + r, n)) : Acc(0);
        }
HEXAMOE_UNROLL
        for (int q = 0; q < 8; ++q) {
          int const r = r0 + 4 * q;
          if (r >= rows) break;
          int const p = p0 + r;
          Acc v = rscale[r] * static_cast<Acc>(stage[r * LD + c]) + bc;
          if (agrad) v *= activate_grad(ep.act, z[q]);
          if (ep.pre.data() != nullptr) ep.pre(p, n) = from_acc<TY>(v);
          if (want_act) {
            Acc const a = agrad ? v : activate(ep.act, v);
            if (ep.post.data() != nullptr) ep.post(p, n) = from_acc<TY>(a);
            if (ep.token_out.data() != nullptr) ep.token_out(rflat[r] / topk, n) = from_acc<TY>(rgate[r] * a);
          }
        }
      }
    }
  }

  // Two adjacent output elements (n, n + 1) of a row: one 4-byte store for
  // bf16 (rounded by the hardware on CUDA), else a pair.
  KOKKOS_INLINE_FUNCTION static void put2(TY *p, Acc a, Acc b) {
    if constexpr (std::is_same_v<TY, bfloat16>) {
      *reinterpret_cast<unsigned *>(p) = dev::pack_bf16x2(a, b);
    } else {
      *reinterpret_cast<Two<TY> *>(p) = Two<TY>{{from_acc<TY>(a), from_acc<TY>(b)}};
    }
  }

  // Rows 2 G and 2 G + 1 of the accumulators.
  template <int G>
  KOKKOS_INLINE_FUNCTION static void take_rows(float const (&acc)[8][8], float (&a)[2][8]) {
HEXAMOE_UNROLL
    for (int h = 0; h < 2; ++h)
HEXAMOE_UNROLL
      for (int j = 0; j < 8; ++j) a[h][j] = acc[2 * G + h][j];
  }

  // The epilogue of the tensor-core layouts, from the accumulators in
  // registers (no scratch, no barrier). mma.sync: thread (warp, lane) holds
  // rows 64 (warp / 4) + 16 g + lane / 4 + {0, 8} and column pairs
  // 32 (warp % 4) + 8 j + 2 (lane % 4) + {0, 1} (acc[2 g + h][2 j + {0, 1}]);
  // wgmma (wg): rows 64 (warp / 4) + 16 (warp % 4) + lane / 4 + {0, 8} and
  // column pairs 32 g + 8 j + 2 (lane % 4) + {0, 1}. Each element has one
  // owner, which reads its act' input before it writes the same element (pre
  // may alias act_grad_of). The activation is a template argument, so that
  // its switch stays out of the loop.
  template <Activation A>
  KOKKOS_INLINE_FUNCTION void epilogue_direct(float const (&acc)[8][8], int const *rflat, Acc const *rscale,
                                              Acc const *rgate, int e, int p0, int rows, int c0, int cols, int tid,
                                              bool wg, Acc const *rbias = nullptr) const {
    auto const &ep = k.ep;
    int const lane = tid & 31, warp = tid >> 5;
    int const r_base = (warp >> 2) * 64 + (wg ? (warp & 3) * 16 : 0) + (lane >> 2);
    int const c_base = (wg ? 0 : (warp & 3) * 32) + (lane & 3) * 2;
    int const RI = wg ? 0 : 16, CI = wg ? 32 : 0;  // row and column step of g
    if (r_base >= rows || c_base >= cols) return;
    TY *const pre = ep.pre.data();
    TY *const post = ep.post.data();
    TY *const tok = ep.token_out.data();
    TY const *const zg = ep.act_grad_of.data();
    std::size_t const ld_pre = ep.pre.stride_0(), ld_post = ep.post.stride_0(), ld_tok = ep.token_out.stride_0(),
                      ld_z = ep.act_grad_of.stride_0();
    int const topk = k.R.top_k;
    // float32: the act' inputs (backward) of each row are read one row
    // ahead: the loads of row q + 1 are issued before row q's act' and
    // stores, so that their latency overlaps that work instead of following
    // it (pre may alias act_grad_of, so the compiler may not hoist them
    // itself; another row's elements are never this row's). Row q is
    // (g, h) = (q / 2, q % 2); where (g, 1) is past the tile's rows, the next
    // row is (g + 1, 0). (bf16 reads them row by row: its kernels have 128
    // registers, and the prefetch took their spills from 40-80 to 320-344
    // bytes a thread, ptxas.)
    constexpr bool z_ahead = std::is_same_v<TY, float>;
    auto load_z = [&](int q, Two<TY> (&z)[4]) {
      int const g = q >> 1, h = q & 1;
      int const cg = c_base + g * CI, r = r_base + g * RI + h * 8;
      if (q >= 8 || cg >= cols || r >= rows) return;
      int const np = (cols - cg + 7) / 8 < 4 ? (cols - cg + 7) / 8 : 4;
      TY const *zr = zg + static_cast<std::size_t>(p0 + r) * ld_z + static_cast<std::size_t>(c0 + cg);
HEXAMOE_UNROLL
      for (int j = 0; j < 4; ++j)
        if (j < np) z[j] = *reinterpret_cast<Two<TY> const *>(zr + 8 * j);
    };
    Two<TY> zc[4] = {}, zn[4] = {};
    if constexpr (z_ahead) {
      if (zg != nullptr) load_z(0, zc);
    }
    Acc bv[4][2];
    // A loop, not unrolled: the body (two rows of eight values) is a few
    // hundred instructions, where four unrolled copies of it ran the warps
    // out of instruction cache (Nsight Compute: "no instruction" was the
    // epilogue's largest stall). Each pass takes its two rows of
    // accumulators by compile-time indices, so that they stay in registers.
HEXAMOE_NO_UNROLL
    for (int g = 0; g < 4; ++g) {
      int const cg = c_base + g * CI;
      if (cg >= cols) break;  // columns grow with g (wgmma) or stay (mma.sync)
      float a[2][8];
      switch (g) {
        case 0: take_rows<0>(acc, a); break;
        case 1: take_rows<1>(acc, a); break;
        case 2: take_rows<2>(acc, a); break;
        default: take_rows<3>(acc, a); break;
      }
      if (g == 0 || wg) {
HEXAMOE_UNROLL
        for (int j = 0; j < 4; ++j) {
          int const c = cg + 8 * j;
          bv[j][0] = bv[j][1] = Acc(0);
          if (rbias != nullptr) {  // the tile's bias, in shared memory (0 past its columns)
            bv[j][0] = rbias[c];
            bv[j][1] = rbias[c + 1];
          } else if (k.has_bias && c < cols) {
            Two<TW> const b = *reinterpret_cast<Two<TW> const *>(&k.bias(e, c0 + c));
            bv[j][0] = to_acc<Acc>(b.v[0]);
            bv[j][1] = to_acc<Acc>(b.v[1]);
          }
        }
      }
      // Per row: the column pairs this thread owns (all four unless the
      // tile's columns end inside them), the row's pointers once, then one
      // branch per output kind (not per element), stores at constant offsets.
      int const npair = (cols - cg + 7) / 8 < 4 ? (cols - cg + 7) / 8 : 4;
      std::size_t const n0 = static_cast<std::size_t>(c0 + cg);
HEXAMOE_UNROLL
      for (int h = 0; h < 2; ++h) {
        int const i = 2 * g + h;
        int const r = r_base + g * RI + h * 8;
        if (r >= rows) continue;
        std::size_t const p = static_cast<std::size_t>(p0 + r);
        Acc const s = rscale[r];
        Acc v[4][2];
HEXAMOE_UNROLL
        for (int j = 0; j < 4; ++j) {
          v[j][0] = s * static_cast<Acc>(a[h][2 * j]) + bv[j][0];
          v[j][1] = s * static_cast<Acc>(a[h][2 * j + 1]) + bv[j][1];
        }
        if (zg != nullptr) {
          if constexpr (z_ahead) {
            load_z(h == 0 && r + 8 < rows ? i + 1 : 2 * g + 2, zn);  // the next row this thread stores
HEXAMOE_UNROLL
            for (int j = 0; j < 4; ++j) {
              if (j < npair) {
                v[j][0] *= activate_grad(A, to_acc<Acc>(zc[j].v[0]));
                v[j][1] *= activate_grad(A, to_acc<Acc>(zc[j].v[1]));
              }
              zc[j] = zn[j];
            }
          } else {
            TY const *zr = zg + p * ld_z + n0;
HEXAMOE_UNROLL
            for (int j = 0; j < 4; ++j) {
              if (j < npair) {
                Two<TY> const z = *reinterpret_cast<Two<TY> const *>(zr + 8 * j);
                v[j][0] *= activate_grad(A, to_acc<Acc>(z.v[0]));
                v[j][1] *= activate_grad(A, to_acc<Acc>(z.v[1]));
              }
            }
          }
        }
        if (pre != nullptr) {
          TY *const pr = pre + p * ld_pre + n0;
HEXAMOE_UNROLL
          for (int j = 0; j < 4; ++j)
            if (j < npair) put2(pr + 8 * j, v[j][0], v[j][1]);
        }
        if (post != nullptr || tok != nullptr) {
          if (zg == nullptr) {
HEXAMOE_UNROLL
            for (int j = 0; j < 4; ++j) {
              v[j][0] = activate(A, v[j][0]);
              v[j][1] = activate(A, v[j][1]);
            }
          }
          if (post != nullptr) {
            TY *const qr = post + p * ld_post + n0;
HEXAMOE_UNROLL
            for (int j = 0; j < 4; ++j)
              if (j < npair) put2(qr + 8 * j, v[j][0], v[j][1]);
          }
          if (tok != nullptr) {
            Acc const gt = rgate[r];
            TY *const tr = tok + static_cast<std::size_t>(rflat[r] / topk) * ld_tok + n0;
HEXAMOE_UNROLL
            for (int j = 0; j < 4; ++j)
              if (j < npair) put2(tr + 8 * j, gt * v[j][0], gt * v[j][1]);
          }
        }
      }
    }
  }

  // The warp-specialized kernel's epilogue (EsmmHopper.hpp): a warpgroup's
  // two 64-row blocks in wgmma's layout, as the team kernel's two warpgroups
  // hold them (thread t of the warpgroup is thread t, then t + 128, there).
  template <Activation A>
  KOKKOS_INLINE_FUNCTION void epilogue_ws_as(float const (&a0)[8][8], float const (&a1)[8][8], int const *rflat,
                                             Acc const *rscale, Acc const *rgate, Acc const *rbias, int e, int p0,
                                             int rows, int c0, int cols, int t) const {
    epilogue_direct<A>(a0, rflat, rscale, rgate, e, p0, rows, c0, cols, t, true, rbias);
    epilogue_direct<A>(a1, rflat, rscale, rgate, e, p0, rows, c0, cols, t + 128, true, rbias);
  }
  KOKKOS_INLINE_FUNCTION void epilogue_ws(float const (&a0)[8][8], float const (&a1)[8][8], int const *rflat,
                                          Acc const *rscale, Acc const *rgate, Acc const *rbias, int e, int p0,
                                          int rows, int c0, int cols, int t) const {
    switch (k.ep.act) {
      case Activation::gelu: epilogue_ws_as<Activation::gelu>(a0, a1, rflat, rscale, rgate, rbias, e, p0, rows, c0, cols, t); break;
      case Activation::relu: epilogue_ws_as<Activation::relu>(a0, a1, rflat, rscale, rgate, rbias, e, p0, rows, c0, cols, t); break;
      case Activation::silu: epilogue_ws_as<Activation::silu>(a0, a1, rflat, rscale, rgate, rbias, e, p0, rows, c0, cols, t); break;
      default: epilogue_ws_as<Activation::identity>(a0, a1, rflat, rscale, rgate, rbias, e, p0, rows, c0, cols, t); break;
    }
  }

  // The epilogue for 64 staged columns (n0 .. n0 + 63, `cols` of them valid)
  // with two adjacent columns per thread: 8- or 4-byte loads and stores
  // (launched only when every output row holds an even count of aligned
  // elements, so that pairs never straddle rows). Thread tid owns columns
  // 2 (tid % 32) + {0, 1} and every eighth row from tid / 32, four rows at a
  // time (their act' inputs are read before any store: they may alias).
  template <class V>
  struct alignas(2 * sizeof(V)) Two {
    V v[2];
  };
  KOKKOS_INLINE_FUNCTION void epilogue_pairs(float const *stage, int const *rflat, Acc const *rscale,
                                             Acc const *rgate, int e, int p0, int rows, int n0, int cols,
                                             int tid) const {
    constexpr int LD = dev::LDE;
    auto const &ep = k.ep;
    int const c = (tid & 31) * 2, n = n0 + c, topk = k.R.top_k;
    if (c >= cols) return;
    bool const agrad = ep.act_grad_of.data() != nullptr;
    bool const want_act = ep.post.data() != nullptr || ep.token_out.data() != nullptr;
    Acc b0 = Acc(0), b1 = Acc(0);
    if (k.has_bias) {
      Two<TW> const b = *reinterpret_cast<Two<TW> const *>(&k.bias(e, n));
      b0 = to_acc<Acc>(b.v[0]);
      b1 = to_acc<Acc>(b.v[1]);
    }
    for (int r0 = tid >> 5; r0 < rows; r0 += 32) {
      Two<TY> z[4];
HEXAMOE_UNROLL
      for (int q = 0; q < 4; ++q) {
        int const r = r0 + 8 * q;
        if (agrad && r < rows) z[q] = *reinterpret_cast<Two<TY> const *>(&ep.act_grad_of(p0 + r, n));
      }
HEXAMOE_UNROLL
      for (int q = 0; q < 4; ++q) {
        int const r = r0 + 8 * q;
        if (r >= rows) break;
        int const p = p0 + r;
        dev::Float2 const sv = *reinterpret_cast<dev::Float2 const *>(stage + r * LD + c);
        Acc v0 = rscale[r] * static_cast<Acc>(sv.v[0]) + b0, v1 = rscale[r] * static_cast<Acc>(sv.v[1]) + b1;
        if (agrad) {
          v0 *= activate_grad(ep.act, to_acc<Acc>(z[q].v[0]));
          v1 *= activate_grad(ep.act, to_acc<Acc>(z[q].v[1]));
        }
        if (ep.pre.data() != nullptr) *reinterpret_cast<Two<TY> *>(&ep.pre(p, n)) = Two<TY>{{from_acc<TY>(v0), from_acc<TY>(v1)}};
        if (want_act) {
          Acc const a0 = agrad ? v0 : activate(ep.act, v0), a1 = agrad ? v1 : activate(ep.act, v1);
          if (ep.post.data() != nullptr) *reinterpret_cast<Two<TY> *>(&ep.post(p, n)) = Two<TY>{{from_acc<TY>(a0), from_acc<TY>(a1)}};
          if (ep.token_out.data() != nullptr)
            *reinterpret_cast<Two<TY> *>(&ep.token_out(rflat[r] / topk, n)) =
                Two<TY>{{from_acc<TY>(rgate[r] * a0), from_acc<TY>(rgate[r] * a1)}};
        }
      }
    }
  }

  // Pointer to the X row of tile row r (null past the valid rows).
  KOKKOS_INLINE_FUNCTION TX const *x_row(int const *rflat, int p0, int rows, int r) const {
    if (r >= rows) return nullptr;
    return &k.x.rows(k.x.row(p0 + r, rflat[r], k.R.top_k), 0);
  }

  // bf16 with 16-byte aligned rows: asynchronous copies (no registers) into
  // PSH stages of k = 16, so that PSH - 1 stages of loads are in flight while
  // the tensor cores work on the oldest; one barrier per stage. Each thread
  // copies one 16-byte chunk of A and one of B per stage; chunks past the
  // valid rows, columns or K are zero-filled by the copy itself.
  // Stages [ks0, ks1) of k (all of them unless the tile is split; a split
  // needs K to be a multiple of the k step).
  KOKKOS_INLINE_FUNCTION void main_loop_bf16_async(member_type const &team, bfloat16 *smem, int const *rflat,
                                                   float (&acc)[8][8], int e, int p0, int rows, int c0, int cols,
                                                   int tid, int ks0, int ks1) const {
    if (k.K % dev::PKH == 0) {
      main_loop_bf16_async_k<true>(team, smem, rflat, acc, e, p0, rows, c0, cols, tid, ks0, ks1);
    } else {
      main_loop_bf16_async_k<false>(team, smem, rflat, acc, e, p0, rows, c0, cols, tid, 0, (k.K + dev::PKH - 1) / dev::PKH);
    }
  }

  // The two halves of a split tile meet: the first to arrive stores its
  // accumulators (this thread's 64 floats, slot-major) and raises the slot's
  // flag, then leaves (false); the second waits for the flag, adds them to its
  // own (a + b = b + a: the same bits whichever half came first), resets the
  // slot's counter and flag for the next launch, and goes on to the epilogue
  // (true). No spin can wait on a team that has not started: the first has
  // run, it incremented the counter. CUDA only (the split runs with the
  // tensor cores: bf16, 3xtf32, tf32).
  KOKKOS_INLINE_FUNCTION bool combine_halves(member_type const &team, int *order, float (&acc)[8][8], int slot,
                                             int tid) const {
    if constexpr (tensor_cores) {
      int *cnt = tail_sync.data() + 2 * slot, *flag = cnt + 1;
      float *part = tail_part.data() + (std::size_t(slot) * NT + tid) * 64;
      if (tid == 0) *order = Kokkos::atomic_fetch_add(cnt, 1);
      team.team_barrier();
      if (*order == 0) {
HEXAMOE_UNROLL
        for (int i = 0; i < 8; ++i)
HEXAMOE_UNROLL
          for (int h = 0; h < 2; ++h)
            *reinterpret_cast<dev::Float4 *>(part + 8 * i + 4 * h) =
                dev::Float4{{acc[i][4 * h], acc[i][4 * h + 1], acc[i][4 * h + 2], acc[i][4 * h + 3]}};
        Kokkos::memory_fence();
        team.team_barrier();
        if (tid == 0) Kokkos::atomic_exchange(flag, 1);
        return false;
      }
      if (tid == 0) {
        while (Kokkos::atomic_fetch_add(flag, 0) == 0) {
        }
        Kokkos::atomic_exchange(flag, 0);
        Kokkos::atomic_exchange(cnt, 0);
      }
      team.team_barrier();
      Kokkos::memory_fence();
HEXAMOE_UNROLL
      for (int i = 0; i < 8; ++i)
HEXAMOE_UNROLL
        for (int h = 0; h < 2; ++h) {
          dev::Float4 const q = dev::load_cg(part + 8 * i + 4 * h);
          for (int u = 0; u < 4; ++u) acc[i][4 * h + u] += q.v[u];
        }
      return true;
    } else {
      (void)team, (void)order, (void)acc, (void)slot, (void)tid;
      return true;
    }
  }

  // KFull (K a multiple of the k step, the usual case): every chunk of a
  // thread copies the same byte count at every stage, so an issue is two
  // copies and two pointer increments. The ldmatrix addresses of the four
  // 16-row blocks of A (and of the two 16-column halves of a transposed B)
  // differ by constants (the swizzle repeats every 4 rows).
  template <bool KFull>
  KOKKOS_INLINE_FUNCTION void main_loop_bf16_async_k(member_type const &team, bfloat16 *smem, int const *rflat,
                                                     float (&acc)[8][8], int e, int p0, int rows, int c0, int cols,
                                                     int tid, int ks0, int ks1) const {
    if constexpr (mma_bf16) {
      constexpr int PK = dev::PKH, PS = dev::PSH;
      constexpr unsigned stage_bytes = BM * PK * sizeof(bfloat16);
      int const K = k.K;
      // Scratch: PS x A [BM][PK] (rows m, sw16), then PS x B [PK][BN] (rows k,
      // sw128) or [BN][PK] (rows n, sw16); addresses in the shared state space.
      unsigned const sA = dev::smem_u32(smem), sB = sA + PS * stage_bytes;
      // This thread's chunk of each stage: A row tid / 2, 8 columns at 8 (tid % 2);
      // B likewise when transposed, else row tid / 16, 8 columns at 8 (tid % 16).
      // Source pointers advance by one stage per issue; `rem` counts the
      // elements left in the chunk's row (A, W^T) or the k rows left (W).
      int const ar = tid >> 1, ac = (tid & 1) * 8;
      TX const *xa = x_row(rflat, p0, rows, ar);
      char const *dummy = reinterpret_cast<char const *>(k.w.data());  // aligned; read for no byte
      char const *a_src = xa ? reinterpret_cast<char const *>(xa + ac) : dummy;
      int a_rem = xa ? K - ac : 0;
      int const a_full = xa ? 16 : 0;
      unsigned const a_dst = sA + 2u * static_cast<unsigned>(dev::sw16(ar, ac));
      char const *b_src;
      int b_rem, b_bytes = 16;
      unsigned b_dst;
      std::size_t b_step;
      if constexpr (TransW) {
        int const br = tid >> 1, bc = (tid & 1) * 8;
        b_src = br < cols ? reinterpret_cast<char const *>(&k.w(e, c0 + br, bc)) : dummy;
        b_rem = br < cols ? K - bc : 0;
        b_bytes = br < cols ? 16 : 0;
        b_dst = sB + 2u * static_cast<unsigned>(dev::sw16(br, bc));
        b_step = PK * sizeof(TW);
      } else {
        int const br = tid >> 4, bc = (tid & 15) * 8;
        int const bn = cols - bc < 0 ? 0 : (cols - bc > 8 ? 8 : cols - bc);
        b_src = bn > 0 ? reinterpret_cast<char const *>(&k.w(e, br < K ? br : 0, c0 + bc)) : dummy;
        b_rem = bn > 0 ? K - br : 0;
        b_bytes = 2 * bn;
        b_dst = sB + 2u * static_cast<unsigned>(dev::wgmma_compiled() ? dev::sw_n128(br, bc) : dev::sw128(br, bc));
        b_step = std::size_t(PK) * k.w.stride_1() * sizeof(TW);
      }
      unsigned off_w = 0;  // byte offset of the stage the next issue fills
      std::size_t const a_adv = a_full > 0 ? PK * sizeof(TX) : 0, b_adv = b_bytes > 0 ? b_step : 0;
      if constexpr (KFull) {  // start at stage ks0 (the second half of a split tile)
        a_src += ks0 * a_adv;
        b_src += ks0 * b_adv;
      }
      auto issue = [&]() {
        if constexpr (KFull) {
          dev::cp_async16_at(a_dst + off_w, a_src, a_full);
          dev::cp_async16_at(b_dst + off_w, b_src, b_bytes);
          a_src += a_adv;
          b_src += b_adv;
        } else {
          int const an = a_rem < 0 ? 0 : (a_rem > 8 ? 8 : a_rem);
          dev::cp_async16_at(a_dst + off_w, an > 0 ? a_src : dummy, 2 * an);
          int bb;
          if constexpr (TransW) {
            bb = 2 * (b_rem < 0 ? 0 : (b_rem > 8 ? 8 : b_rem));
          } else {
            bb = b_rem > 0 ? b_bytes : 0;
          }
          dev::cp_async16_at(b_dst + off_w, bb > 0 ? b_src : dummy, bb);
          a_src += PK * sizeof(TX);
          a_rem -= PK;
          b_src += b_step;
          b_rem -= PK;
        }
        off_w = off_w + stage_bytes == PS * stage_bytes ? 0u : off_w + stage_bytes;
      };
      if constexpr (dev::wgmma_compiled()) {
        // Hopper (sm_90a): each warpgroup multiplies its 64 rows of A by the
        // whole B of a stage with one asynchronous wgmma and keeps two in
        // flight; the stage a new copy overwrites is the one two steps back,
        // which every warpgroup has finished reading at the barrier. Copies
        // run PS - 2 stages ahead. The PTX ISA requires an asynchronous-
        // proxy fence between a thread's (generic-proxy) copies into shared
        // memory and the wgmma reads of them; it compiles to MEMBAR.ALL.CTA
        // + FENCE.VIEW.ASYNC.S a stage, and the forward ESMMs ran 7-10%
        // faster without it (docs/PERFORMANCE.md), but it stays.
        int const grp = tid >> 7;
        bool const active_g = grp * 64 < rows;
        std::uint64_t const da = dev::gmma_desc(sA + grp * 64u * PK * 2u, 16u, 256u, 3u);
        std::uint64_t const db = TransW ? dev::gmma_desc(sB, 16u, 256u, 3u) : dev::gmma_desc(sB, 2048u, 1024u, 1u);
        unsigned const da_lo = static_cast<unsigned>(da), da_hi = static_cast<unsigned>(da >> 32);
        unsigned const db_lo = static_cast<unsigned>(db), db_hi = static_cast<unsigned>(db >> 32);
        int const nk = ks1 - ks0;
        for (int s = 0; s < PS - 2; ++s) {
          if (s < nk) issue();
          dev::cp_async_commit();
        }
        unsigned off_r = 0;
        for (int kt = 0; kt < nk; ++kt) {
          dev::cp_async_wait<PS - 3>();  // this thread's copies of stage kt have landed
          dev::fence_proxy_async();      // and are visible to the tensor cores
          dev::wgmma_wait<1>(acc);       // this warpgroup's product of stage kt - 2 is done
          team.team_barrier();
          if (kt + PS - 2 < nk) issue();  // into the slot of stage kt - 2
          dev::cp_async_commit();
          if (active_g) {
            dev::wgmma_fence();
            dev::wgmma_m64n128k16_bf16<TransW ? 0 : 1>(acc, da_lo + (off_r >> 4), da_hi, db_lo + (off_r >> 4), db_hi);
            dev::wgmma_commit();
          }
          off_r = off_r + stage_bytes == PS * stage_bytes ? 0u : off_r + stage_bytes;
        }
        dev::wgmma_wait<0>(acc);
        dev::cp_async_wait<0>();
        return;
      }
      unsigned a_ld[4], b_ld[2];
      dev::ldsm_addresses<false, TransW>(a_ld, b_ld, sA, sB, tid);
      unsigned const a0 = a_ld[0], b0 = b_ld[0], b1 = TransW ? b_ld[0] + 512u : b_ld[1];
      int const warp = tid >> 5;
      bool const active = (warp >> 2) * 64 < rows && (warp & 3) * 32 < cols;
      int const nk = ks1 - ks0;
      for (int s = 0; s < PS - 1; ++s) {
        if (s < nk) issue();
        dev::cp_async_commit();  // empty groups keep the count uniform
      }
      unsigned off_r = 0;
      for (int kt = 0; kt < nk; ++kt) {
        dev::cp_async_wait<PS - 2>();  // this thread's copies of stage kt have landed
        team.team_barrier();           // everyone's have; stage kt - 1 is free again
        if (kt + PS - 1 < nk) issue();
        dev::cp_async_commit();
        if (active) {
          unsigned const al[4] = {a0, a0 + 512u, a0 + 1024u, a0 + 1536u};
          unsigned const bl[2] = {b0, b1};
          dev::mma_k16_bf16<false, TransW>(acc, al, bl, off_r);
        }
        off_r = off_r + stage_bytes == PS * stage_bytes ? 0u : off_r + stage_bytes;
      }
      dev::cp_async_wait<0>();
    } else {
      (void)team, (void)smem, (void)rflat, (void)acc, (void)e, (void)p0, (void)rows, (void)c0, (void)cols, (void)tid;
      (void)ks0, (void)ks1;
    }
  }

  KOKKOS_INLINE_FUNCTION void main_loop_bf16(member_type const &team, bfloat16 *smem, int const *rflat,
                                             float (&acc)[8][8], int e, int p0, int rows, int c0, int cols,
                                             int tid) const {
    if constexpr (mma_bf16) {
      int const K = k.K;
      bfloat16 *sA = smem;                // 2 x [BM][BK]
      bfloat16 *sB = smem + 2 * BM * BK;  // 2 x [BK][BN] or [BN][BK]
      // Staging slots: A rows (tid>>2) + 64 i, 8 columns at (tid&3)*8; B the
      // same when transposed ([n][k]), else rows (tid>>4) + 16 i, columns (tid&15)*8.
      TX const *xa[2] = {x_row(rflat, p0, rows, tid >> 2), x_row(rflat, p0, rows, (tid >> 2) + 64)};
      int const ac = (tid & 3) * 8;
      TW const *wb[2];
      int bc;
      if constexpr (TransW) {
        bc = (tid & 3) * 8;
        for (int i = 0; i < 2; ++i) {
          int const n = (tid >> 2) + 64 * i;
          wb[i] = n < cols ? &k.w(e, c0 + n, 0) : nullptr;
        }
      } else {
        bc = (tid & 15) * 8;
        for (int i = 0; i < 2; ++i) wb[i] = bc < cols ? &k.w(e, 0, c0 + bc) : nullptr;
      }
      std::size_t const ldw = TransW ? 0 : k.w.stride_1();
      dev::Vec16 ra[2], rb[2];
      auto load = [&](int k0) {
        for (int i = 0; i < 2; ++i) {
          ra[i] = dev::load8(xa[i] ? xa[i] + k0 + ac : nullptr, xa[i] ? K - k0 - ac : 0, vec_x);
          if constexpr (TransW) {
            rb[i] = dev::load8(wb[i] ? wb[i] + k0 + bc : nullptr, wb[i] ? K - k0 - bc : 0, vec_w);
          } else {
            int const kk = k0 + (tid >> 4) + 16 * i;
            bool const ok = wb[i] != nullptr && kk < K;
            rb[i] = dev::load8(ok ? wb[i] + kk * ldw : nullptr, ok ? cols - bc : 0, vec_w);
          }
        }
      };
      auto store = [&](int stage) {
        bfloat16 *a = sA + stage * BM * BK, *b = sB + stage * BM * BK;
        for (int i = 0; i < 2; ++i) {
          *reinterpret_cast<dev::Vec16 *>(a + dev::sw32((tid >> 2) + 64 * i, ac)) = ra[i];
          if constexpr (TransW) {
            *reinterpret_cast<dev::Vec16 *>(b + dev::sw32((tid >> 2) + 64 * i, bc)) = rb[i];
          } else {
            *reinterpret_cast<dev::Vec16 *>(b + dev::sw128((tid >> 4) + 16 * i, bc)) = rb[i];
          }
        }
      };
      int const warp = tid >> 5;
      bool const active = (warp >> 2) * 64 < rows && (warp & 3) * 32 < cols;
      int const nk = (K + BK - 1) / BK;
      if (nk > 0) {
        load(0);
        store(0);
      }
      team.team_barrier();
      for (int kt = 0; kt < nk; ++kt) {
        if (kt + 1 < nk) load((kt + 1) * BK);
        if (active)
          dev::mma_step_bf16<BK, false, TransW, false>(acc, sA + (kt & 1) * BM * BK, sB + (kt & 1) * BM * BK, nullptr,
                                                       tid);
        if (kt + 1 < nk) store((kt + 1) & 1);
        team.team_barrier();
      }
    } else {
      (void)team, (void)smem, (void)rflat, (void)acc, (void)e, (void)p0, (void)rows, (void)c0, (void)cols, (void)tid;
    }
  }

  // Stages [ks0, ks1) of k (all of them unless the tile is split).
  KOKKOS_INLINE_FUNCTION void main_loop_f32(member_type const &team, float *smem, int const *rflat,
                                            float (&acc)[8][8], int e, int p0, int rows, int c0, int cols,
                                            int tid, int ks0, int ks1) const {
    if constexpr (!mma_bf16) {
      int const K = k.K;
      float *sA = smem;                      // 2 x [BKF][LDF]: rows k, columns m
      float *sB = smem + 2 * BKF * dev::LDF;  // 2 x [BKF][LDF]: rows k, columns n
      constexpr int LD = dev::LDF;
      // A slots: rows (tid>>2) + 64 i, 4 k at (tid&3)*4 (stored transposed).
      TX const *xa[2] = {x_row(rflat, p0, rows, tid >> 2), x_row(rflat, p0, rows, (tid >> 2) + 64)};
      int const ac = (tid & 3) * 4;
      TW const *wb[2];
      int bc;
      if constexpr (TransW) {  // rows n (tid>>2) + 64 i, 4 k at (tid&3)*4
        bc = (tid & 3) * 4;
        for (int i = 0; i < 2; ++i) {
          int const n = (tid >> 2) + 64 * i;
          wb[i] = n < cols ? &k.w(e, c0 + n, 0) : nullptr;
        }
      } else {  // rows k (tid>>5) + 8 i, 4 n at (tid&31)*4
        bc = (tid & 31) * 4;
        for (int i = 0; i < 2; ++i) wb[i] = bc < cols ? &k.w(e, 0, c0 + bc) : nullptr;
      }
      std::size_t const ldw = TransW ? 0 : k.w.stride_1();
      dev::Float4 ra[2], rb[2];
      // Full tiles of 16-byte rows with K a multiple of the k step (most
      // tiles) load without per-element bounds.
      bool const full = vec_x && vec_w && rows == BM && cols == BN && K % BKF == 0;
      auto load = [&](int k0) {
        if (full) {
          for (int i = 0; i < 2; ++i) {
            ra[i] = dev::load4_full(xa[i] + k0 + ac);
            if constexpr (TransW) {
              rb[i] = dev::load4_full(wb[i] + k0 + bc);
            } else {
              rb[i] = dev::load4_full(wb[i] + (k0 + (tid >> 5) + 8 * i) * ldw);
            }
          }
          return;
        }
        for (int i = 0; i < 2; ++i) {
          ra[i] = dev::load4(xa[i] ? xa[i] + k0 + ac : nullptr, xa[i] ? K - k0 - ac : 0, vec_x);
          if constexpr (TransW) {
            rb[i] = dev::load4(wb[i] ? wb[i] + k0 + bc : nullptr, wb[i] ? K - k0 - bc : 0, vec_w);
          } else {
            int const kk = k0 + (tid >> 5) + 8 * i;
            bool const ok = wb[i] != nullptr && kk < K;
            rb[i] = dev::load4(ok ? wb[i] + kk * ldw : nullptr, ok ? cols - bc : 0, vec_w);
          }
        }
      };
      auto store = [&](int stage) {
        float *a = sA + stage * BKF * LD, *b = sB + stage * BKF * LD;
        for (int i = 0; i < 2; ++i) {
          dev::put4_col<M>(a + ac * LD + (tid >> 2) + 64 * i, ra[i]);
          if constexpr (TransW) {
            dev::put4_col<M>(b + bc * LD + (tid >> 2) + 64 * i, rb[i]);
          } else {
            dev::put4_row<M>(b + ((tid >> 5) + 8 * i) * LD + bc, rb[i]);
          }
        }
      };
      if (ks0 < ks1) {
        load(ks0 * BKF);
        store(0);
      }
      team.team_barrier();
      for (int kt = ks0; kt < ks1; ++kt) {
        int const buf = (kt - ks0) & 1;
        if (kt + 1 < ks1) load((kt + 1) * BKF);
        if constexpr (M == dev::Math::tf32x3_mma) {
          dev::step_tf32x3_k16(acc, sA + buf * BKF * LD, sB + buf * BKF * LD, tid);
        } else {
          dev::step_f32<M>(acc, sA + buf * BKF * LD, sB + buf * BKF * LD, tid);
        }
        if (kt + 1 < ks1) store(buf ^ 1);
        team.team_barrier();
      }
    } else {
      (void)team, (void)smem, (void)rflat, (void)acc, (void)e, (void)p0, (void)rows, (void)c0, (void)cols, (void)tid;
      (void)ks0, (void)ks1;
    }
  }
};

// Launch the device ESMM for arithmetic M (instantiated only where M fits the types).
template <dev::Math M, class ExecutionSpace, class TX, class TW, class TY, class MemorySpace>
void launch_esmm_device(ExecutionSpace const &space, EsmmKernel<ExecutionSpace, TX, TW, TY, MemorySpace> const &base,
                        int S, int E) {
  constexpr int width = M == dev::Math::bf16_mma ? 8 : 4;
  auto const &x = base.x.rows;
  auto const &w = base.w;
  bool const vec_x = dev::vector_ok(x.data(), x.stride_0(), width);
  bool const vec_w = dev::vector_ok(w.data(), w.stride_1(), width) && w.stride_0() % width == 0;
  int const col_tiles = (base.N + dev::BN - 1) / dev::BN;
  int const row_tiles = (S + dev::BM - 1) / dev::BM + E;  // upper bound on sum_e ceil(count_e / BM)
  auto b = base;
  b.col_tiles = col_tiles;
  // The tail split: the tensor cores (bf16 with asynchronous copies, 3xtf32,
  // tf32), K a multiple of the k step and at least two steps; up to half a
  // wave of extra teams.
  bool const split_ok = M == dev::Math::bf16_mma ? vec_x && vec_w && dev::async_copies()
                                                : M == dev::Math::tf32x3_mma || M == dev::Math::tf32_mma;
  int const slots = split_ok && base.K % dev::PKH == 0 && base.K >= 2 * dev::PKH
                        ? dev::tail_slots(space, M == dev::Math::bf16_mma, dev::esmm_teams_per_sm(M))
                        : 0;
  // Pairs of output elements: every row an even count of aligned elements.
  auto even_rows = [](auto const &v) {
    using V = typename std::decay_t<decltype(v)>::value_type;
    return v.data() == nullptr ||
           (v.stride_0() % 2 == 0 && reinterpret_cast<std::uintptr_t>(v.data()) % (2 * sizeof(V)) == 0);
  };
  auto const &ep = base.ep;
  bool const pairs = base.N % 2 == 0 && even_rows(ep.pre) && even_rows(ep.post) && even_rows(ep.act_grad_of) &&
                     even_rows(ep.token_out) && (!base.has_bias || even_rows(base.bias));
  auto run = [&](auto kernel) {
    using Kernel = decltype(kernel);
    // Light weight: the functor travels as a kernel argument (a constant-memory
    // launch would make the host wait for the previous such kernel).
    auto policy = Kokkos::Experimental::require(
        Kokkos::TeamPolicy<ExecutionSpace, Kokkos::LaunchBounds<dev::NT, dev::esmm_teams_per_sm(M)>>(
            space, row_tiles * col_tiles + slots / 2, dev::NT),
        Kokkos::Experimental::WorkItemProperty::HintLightWeight);
    policy.set_scratch_size(0, Kokkos::PerTeam(Kernel::scratch()));
    Kokkos::parallel_for(dev::kernel_label("hexamoe::esmm", M, base.transpose_w ? ", W^T" : ""), policy, kernel);
  };
  auto with_split = [&](auto kernel) {
    if (slots > 0) {
      auto const ws = dev::tail_workspace<MemorySpace>(slots / 2, dev::NT * 64);
      kernel.tail_slots = slots;
      kernel.tail_part = ws.first;
      kernel.tail_sync = ws.second;
    }
    run(kernel);
  };
  bool const async = dev::async_copies_for(M, false);
#if defined(HEXAMOE_ESMM_WS)
  // Hopper with sm_90a machine code: the warp-specialized kernel
  // (EsmmHopper.hpp) where the team kernel would run wgmma with paired
  // outputs, A's rows are the sorted positions, K is a positive multiple of
  // 8 (tensor maps have no empty extents) and the experts' tile counts fit
  // its table.
  if constexpr (M == dev::Math::bf16_mma && std::is_same_v<ExecutionSpace, Kokkos::Cuda>) {
    bool const contiguous = base.x.source == RowSource::sorted;  // A's rows are the sorted positions
    if (vec_x && vec_w && async && pairs && base.K > 0 && base.K % 8 == 0 && E <= dev::WS_MAX_EXPERTS &&
        dev::esmm_ws_enabled() && contiguous && dev::wgmma_in_use(space)) {
      std::string const label = dev::kernel_label("hexamoe::esmm", M, base.transpose_w ? ", W^T, ws" : ", ws");
      if (base.transpose_w) {
        dev::launch_esmm_ws(space, label, EsmmDeviceKernel<ExecutionSpace, TX, TW, TY, MemorySpace, M, true>{b, vec_x, vec_w, async, pairs, 0, {}, {}}, row_tiles * col_tiles);
      } else {
        dev::launch_esmm_ws(space, label, EsmmDeviceKernel<ExecutionSpace, TX, TW, TY, MemorySpace, M, false>{b, vec_x, vec_w, async, pairs, 0, {}, {}}, row_tiles * col_tiles);
      }
      return;
    }
  }
#endif
  if (base.transpose_w) {
    with_split(EsmmDeviceKernel<ExecutionSpace, TX, TW, TY, MemorySpace, M, true>{b, vec_x, vec_w, async, pairs, 0, {}, {}});
  } else {
    with_split(EsmmDeviceKernel<ExecutionSpace, TX, TW, TY, MemorySpace, M, false>{b, vec_x, vec_w, async, pairs, 0, {}, {}});
  }
}

// Device dispatch: returns false where the generic tile must run.
template <class ExecutionSpace, class TX, class TW, class TY, class MemorySpace>
bool esmm_on_device_engine(ExecutionSpace const &space, EsmmKernel<ExecutionSpace, TX, TW, TY, MemorySpace> const &base,
                           int S, int E) {
  using X = std::remove_const_t<TX>;
  using W = std::remove_const_t<TW>;
  if constexpr (runs_on_host<ExecutionSpace> || !std::is_same_v<X, W> ||
                !(std::is_same_v<X, float> || std::is_same_v<X, bfloat16>)) {
    (void)space, (void)base, (void)S, (void)E;
    return false;
  } else {
    if (E > EsmmDeviceKernel<ExecutionSpace, TX, TW, TY, MemorySpace, dev::Math::simt, false>::max_experts())
      return false;  // the experts' tile counts would not fit in scratch
    // (math_for picks a tensor-core case only where has_cuda_tensor_cores.)
    switch (dev::math_for<ExecutionSpace, TX, TW>()) {
      case dev::Math::bf16_mma:
        if constexpr (std::is_same_v<X, bfloat16> && dev::has_cuda_tensor_cores<ExecutionSpace>)
          launch_esmm_device<dev::Math::bf16_mma>(space, base, S, E);
        return true;
      case dev::Math::tf32_mma:
        if constexpr (std::is_same_v<X, float> && dev::has_cuda_tensor_cores<ExecutionSpace>)
          launch_esmm_device<dev::Math::tf32_mma>(space, base, S, E);
        return true;
      case dev::Math::tf32x3_mma:
        if constexpr (std::is_same_v<X, float> && dev::has_cuda_tensor_cores<ExecutionSpace>)
          launch_esmm_device<dev::Math::tf32x3_mma>(space, base, S, E);
        return true;
      case dev::Math::simt:
        launch_esmm_device<dev::Math::simt>(space, base, S, E);
        return true;
      default:
        return false;
    }
  }
}

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

// Row tiles per host team: up to four of one expert, which share each staged
// chunk of W, when the experts hold two or more tiles on average and at least
// eight teams per thread remain. (One core, Swin-MoE-S stage 3 at 7200
// tokens: the transposed ESMMs of the backward 10-20% faster, the layer's
// forward + backward 3% in bf16 and 6% in float32; docs/PERFORMANCE.md.)
inline int esmm_host_row_group(int S, int E, int col_tiles, int concurrency) {
  constexpr int TM = TileShape<true>::TM;
  int g = 4;
  while (g > 1 && (S < 2 * g * TM * E || static_cast<long>(S / (g * TM)) * col_tiles < 8L * concurrency)) g /= 2;
  return g;
}

}  // namespace detail

// ESMM: see the file comment. W is [E, K, N], or [E, N, K] with transpose_w.
// bias (optional, may be an empty view) is [E, N].
// Whether a caller that reads token rows through the index (x W1) should
// first copy them into sorted order (SortedRowCopy, RoutingIndex.hpp) and
// pass them as sorted rows: bf16 on Hopper where the warp-specialized
// kernel runs (core/EsmmHopper.hpp; HEXAMOE_ESMM_WS_GATHER=sort, the
// default), and nothing is dropped (every sorted position has its
// assignment).
template <class T, class ExecutionSpace>
bool esmm_sorts_gathered_rows(ExecutionSpace const &space, bool dropless) {
#if defined(HEXAMOE_ESMM_WS)
  if constexpr (std::is_same_v<ExecutionSpace, Kokkos::Cuda> && std::is_same_v<T, bfloat16>) {
    return dropless && detail::dev::esmm_ws_enabled() && detail::dev::ws_gather() == detail::dev::WsGather::sort &&
           detail::dev::async_copies_for(detail::dev::Math::bf16_mma, false) && detail::dev::wgmma_in_use(space);
  }
#endif
  (void)space, (void)dropless;
  return false;
}

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
  Kernel kernel{R, x, w, bias, ep, transpose_w, has_bias, K, N, col_tiles};
  if (detail::esmm_on_device_engine(space, kernel, S, E)) return;
  if constexpr (Kernel::host) kernel.row_group = detail::esmm_host_row_group(S, E, col_tiles, space.concurrency());
  // An upper bound on sum_e ceil(count_e / (TM row_group)), the teams of each column tile.
  int const units = (S + Shape::TM * kernel.row_group - 1) / (Shape::TM * kernel.row_group) + E;
  detail::tile_team_policy<ExecutionSpace> policy(space, units * col_tiles, Kernel::host ? 1 : Shape::team_size);
  policy.set_scratch_size(0, Kokkos::PerTeam(detail::tile_scratch_bytes<typename Kernel::Acc, Shape>(Kernel::host) +
                                             (kernel.row_group - 1) * sizeof(typename Kernel::Acc) *
                                                 std::size_t(Shape::TM) * Shape::TN));
  Kokkos::parallel_for("hexamoe::esmm", policy, kernel);
}

}  // namespace hexamoe
