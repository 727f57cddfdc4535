// TileGemm.hpp: the team-level tile machinery shared by ESMM and ESTMM.
//
// A team owns an output tile of TM rows x TN columns and walks the reduction
// dimension in chunks of TK: each chunk of the left operand (xs, TM x TK,
// row-major) and the right operand (ws, TK x TN, row-major) is staged in team
// scratch memory, converted to the accumulation type, then multiplied.
//
// Two paths sit behind one interface:
// - host backends (Serial, OpenMP, Threads): one thread per team that
//   accumulates the tile in scratch (cs) with a register-blocked RM x RN
//   micro-kernel the compiler vectorises; rows and columns past the valid
//   extent are never computed;
// - device backends (CUDA, HIP, SYCL): (TM/RM) x (TN/RN) threads, each holding
//   an RM x RN block of accumulators in registers for the whole reduction.
#pragma once

#include "BFloat16.hpp"
#include "Compat.hpp"

#include <Kokkos_Core.hpp>

namespace hexamoe {
namespace detail {

template <class ExecutionSpace>
inline constexpr bool runs_on_host = Kokkos::SpaceAccessibility<ExecutionSpace, Kokkos::HostSpace>::accessible;

template <bool Host>
struct TileShape;

template <>
struct TileShape<true> {
  static constexpr int TM = 48, TN = 64, TK = 128, RM = 6, RN = 16;
  static constexpr int team_size = 1;
};

template <>
struct TileShape<false> {
  static constexpr int TM = 64, TN = 64, TK = 16, RM = 4, RN = 4;
  static constexpr int team_size = (TM / RM) * (TN / RN);
};

// Host micro-kernel: cs[r][c] += sum_kk xs[r][kk] * ws[kk][c] over an RM x RN
// block (full blocks take the fixed-size path the compiler unrolls).
template <int RM, int RN, class Acc>
KOKKOS_INLINE_FUNCTION void host_micro(Acc const *xs, int ldx, Acc const *ws, int ldw, Acc *cs, int ldc, int tk,
                                       int rm, int rn) {
  if (rm == RM && rn == RN) {
    Acc acc[RM][RN];
    for (int r = 0; r < RM; ++r)
      for (int c = 0; c < RN; ++c) acc[r][c] = cs[r * ldc + c];
    for (int kk = 0; kk < tk; ++kk) {
      Acc const *wr = ws + kk * ldw;
      for (int r = 0; r < RM; ++r) {
        Acc const a = xs[r * ldx + kk];
        for (int c = 0; c < RN; ++c) acc[r][c] += a * wr[c];
      }
    }
    for (int r = 0; r < RM; ++r)
      for (int c = 0; c < RN; ++c) cs[r * ldc + c] = acc[r][c];
  } else {
    for (int r = 0; r < rm; ++r) {
      Acc acc[RN];
      for (int c = 0; c < rn; ++c) acc[c] = cs[r * ldc + c];
      for (int kk = 0; kk < tk; ++kk) {
        Acc const a = xs[r * ldx + kk];
        Acc const *wr = ws + kk * ldw;
        for (int c = 0; c < rn; ++c) acc[c] += a * wr[c];
      }
      for (int c = 0; c < rn; ++c) cs[r * ldc + c] = acc[c];
    }
  }
}

// Host: accumulate the valid rows x cols of the tile for one staged chunk.
template <class Shape, class Acc>
KOKKOS_INLINE_FUNCTION void host_tile_accumulate(Acc const *xs, Acc const *ws, Acc *cs, int rows, int cols, int tk) {
  for (int r0 = 0; r0 < rows; r0 += Shape::RM) {
    int const rm = rows - r0 < Shape::RM ? rows - r0 : Shape::RM;
    for (int c0 = 0; c0 < cols; c0 += Shape::RN) {
      int const rn = cols - c0 < Shape::RN ? cols - c0 : Shape::RN;
      host_micro<Shape::RM, Shape::RN>(xs + r0 * Shape::TK, Shape::TK, ws + c0, Shape::TN, cs + r0 * Shape::TN + c0,
                                       Shape::TN, tk, rm, rn);
    }
  }
}

// Device: one thread's RM x RN register block at (r0, c0) of the tile.
template <class Shape, class Acc>
KOKKOS_INLINE_FUNCTION void device_thread_accumulate(Acc (&acc)[Shape::RM][Shape::RN], Acc const *xs, Acc const *ws,
                                                     int r0, int c0, int tk) {
  for (int kk = 0; kk < tk; ++kk) {
    Acc a[Shape::RM], b[Shape::RN];
    for (int r = 0; r < Shape::RM; ++r) a[r] = xs[(r0 + r) * Shape::TK + kk];
    for (int c = 0; c < Shape::RN; ++c) b[c] = ws[kk * Shape::TN + c0 + c];
    for (int r = 0; r < Shape::RM; ++r)
      for (int c = 0; c < Shape::RN; ++c) acc[r][c] += a[r] * b[c];
  }
}

// Run f(i, j) for i < n0, j < n1 across the team: nested on the host (so the
// inner loop vectorises), flat on devices (consecutive threads, consecutive j).
template <bool Host, class Member, class F>
KOKKOS_INLINE_FUNCTION void team_for_2d(Member const &team, int n0, int n1, F const &f) {
  if constexpr (Host) {
    Kokkos::parallel_for(Kokkos::TeamThreadRange(team, n0), [&](int i) {
      for (int j = 0; j < n1; ++j) f(i, j);
    });
  } else {
    Kokkos::parallel_for(Kokkos::TeamThreadRange(team, n0 * n1), [&](int ij) { f(ij / n1, ij % n1); });
  }
}

template <class Acc, class Shape>
constexpr std::size_t tile_scratch_bytes(bool host) {
  return sizeof(Acc) * (std::size_t(Shape::TM) * Shape::TK + std::size_t(Shape::TK) * Shape::TN +
                        (host ? std::size_t(Shape::TM) * Shape::TN : 0)) +
         64;
}

}  // namespace detail
}  // namespace hexamoe
