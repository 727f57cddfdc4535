// DenseGemm.hpp: C = alpha op(A) op(B) + beta C for row-major (LayoutRight)
// views, op(X) = X or X^T; the GEMM behind every dense module.
//
// Two paths behind one call:
// - host execution spaces on HostSpace views, with Kokkos Kernels
//   (HEXAMOE_ENABLE_KOKKOSKERNELS, link hexamoe::kokkoskernels), for double,
//   and for float where the tile kernel has no vectorised host micro-kernel
//   (HEXAMOE_HOST_VECTORS, core/TileGemm.hpp): KokkosBlas::gemm
//   on unmanaged LayoutLeft views of the transposed problem (row-major
//   C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T), which reaches the
//   BLAS library (sgemm/dgemm) when Kokkos Kernels was built with it;
// - otherwise (devices, no Kokkos Kernels, K = 0, float on vectorised hosts):
//   a Kokkos team tile kernel on the machinery of core/TileGemm.hpp, where each
//   element of C is computed by one thread in a fixed order over K
//   (deterministic). On the 2-core development host it ran the model's
//   float GEMMs faster on one core than OpenBLAS on two (docs/PERFORMANCE.md,
//   default job), so float takes it wherever it is vectorised.
// With beta = 0, C is never read (it may hold NaN), as in BLAS.
//
// OpenBLAS picks its kernels from the CPU model at load time; where it does not
// recognise the model (some virtual machines report a generic "Intel Xeon
// Processor") it falls back to its Prescott (SSE3) kernels, 3-5x slower than
// the AVX-512 ones. OPENBLAS_CORETYPE=SkylakeX (or Haswell) in the environment
// of the run overrides the detection.
#pragma once

#include "core/TileGemm.hpp"
#include "core/nn/Module.hpp"

#ifdef HEXAMOE_ENABLE_KOKKOSKERNELS
#include <KokkosBlas3_gemm.hpp>
#endif

namespace hexamoe {
namespace nn {
namespace detail {

template <class ExecutionSpace, class T, class MemorySpace>
struct DenseGemmKernel {
  static constexpr bool host = hexamoe::detail::runs_on_host<ExecutionSpace>;
  using Shape = hexamoe::detail::TileShape<host>;
  using member_type = typename Kokkos::TeamPolicy<ExecutionSpace>::member_type;

  Kokkos::View<T const **, Kokkos::LayoutRight, MemorySpace> a, b;
  Kokkos::View<T **, Kokkos::LayoutRight, MemorySpace> c;
  T alpha, beta;
  bool trans_a, trans_b;
  int M, N, K, col_tiles;

  KOKKOS_INLINE_FUNCTION void operator()(member_type const &team) const {
    using hexamoe::detail::team_for_2d;
    int const league = team.league_rank();
    int const m0 = (league / col_tiles) * Shape::TM;
    int const n0 = (league % col_tiles) * Shape::TN;
    int const rows = (M - m0) < Shape::TM ? (M - m0) : Shape::TM;
    int const cols = (N - n0) < Shape::TN ? (N - n0) : Shape::TN;

    T *xs = static_cast<T *>(team.team_shmem().get_shmem(sizeof(T) * Shape::TM * Shape::TK));
    T *ws = static_cast<T *>(team.team_shmem().get_shmem(sizeof(T) * Shape::TK * Shape::TN));
    T *cs = nullptr;
    if constexpr (host) {
      cs = static_cast<T *>(team.team_shmem().get_shmem(sizeof(T) * Shape::TM * Shape::TN));
      for (int i = 0; i < Shape::TM * Shape::TN; ++i) cs[i] = T(0);
    }
    int const tr = host ? 0 : team.team_rank() / (Shape::TN / Shape::RN);
    int const tc = host ? 0 : team.team_rank() % (Shape::TN / Shape::RN);
    T acc[Shape::RM][Shape::RN];
    for (int r = 0; r < Shape::RM; ++r)
      for (int q = 0; q < Shape::RN; ++q) acc[r][q] = T(0);

    for (int k0 = 0; k0 < K; k0 += Shape::TK) {
      int const tk = (K - k0) < Shape::TK ? (K - k0) : Shape::TK;
      team.team_barrier();
      // Stage op(A)[m0.., k0..] as xs[r][kk] and op(B)[k0.., n0..] as ws[kk][c],
      // walking the stored array along its rows (contiguous reads).
      if (trans_a) {
        team_for_2d<host>(team, Shape::TK, Shape::TM, [&](int kk, int r) {
          xs[r * Shape::TK + kk] = (r < rows && kk < tk) ? a(k0 + kk, m0 + r) : T(0);
        });
      } else {
        team_for_2d<host>(team, Shape::TM, Shape::TK, [&](int r, int kk) {
          xs[r * Shape::TK + kk] = (r < rows && kk < tk) ? a(m0 + r, k0 + kk) : T(0);
        });
      }
      if (trans_b) {
        team_for_2d<host>(team, Shape::TN, Shape::TK, [&](int q, int kk) {
          ws[kk * Shape::TN + q] = (q < cols && kk < tk) ? b(n0 + q, k0 + kk) : T(0);
        });
      } else {
        team_for_2d<host>(team, Shape::TK, Shape::TN, [&](int kk, int q) {
          ws[kk * Shape::TN + q] = (q < cols && kk < tk) ? b(k0 + kk, n0 + q) : T(0);
        });
      }
      team.team_barrier();
      if constexpr (host) {
        hexamoe::detail::host_tile_accumulate<Shape>(xs, ws, cs, rows, cols, tk);
      } else {
        if (tr * Shape::RM < rows && tc * Shape::RN < cols)
          hexamoe::detail::device_thread_accumulate<Shape>(acc, xs, ws, tr * Shape::RM, tc * Shape::RN, tk);
      }
    }

    if constexpr (host) {
      for (int r = 0; r < rows; ++r) {
        T *o = &c(m0 + r, n0);  // a contiguous run (the loops vectorise)
        T const *v = cs + r * Shape::TN;
        if (beta != T(0)) {
          for (int q = 0; q < cols; ++q) o[q] = alpha * v[q] + beta * o[q];
        } else {
          for (int q = 0; q < cols; ++q) o[q] = alpha * v[q];
        }
      }
    } else {
      for (int r = 0; r < Shape::RM; ++r) {
        int const rr = tr * Shape::RM + r;
        if (rr >= rows) break;
        for (int q = 0; q < Shape::RN; ++q) {
          int const cc = tc * Shape::RN + q;
          if (cc < cols) store(m0 + rr, n0 + cc, acc[r][q]);
        }
      }
    }
  }

  KOKKOS_INLINE_FUNCTION void store(int m, int n, T v) const {
    T out = alpha * v;
    if (beta != T(0)) out += beta * c(m, n);
    c(m, n) = out;
  }
};

// Static and extent checks shared by both paths; returns {M, N, K}.
template <class ExecutionSpace, class AView, class BView, class CView>
std::array<int, 3> check_gemm(AView const &A, BView const &B, CView const &C, bool trans_a, bool trans_b) {
  static_assert(Kokkos::is_view<AView>::value && Kokkos::is_view<BView>::value && Kokkos::is_view<CView>::value,
                "dense_gemm: operands must be Kokkos views");
  static_assert(AView::rank == 2 && BView::rank == 2 && CView::rank == 2, "dense_gemm: operands must be rank 2");
  static_assert(std::is_same_v<typename AView::array_layout, Kokkos::LayoutRight> &&
                    std::is_same_v<typename BView::array_layout, Kokkos::LayoutRight> &&
                    std::is_same_v<typename CView::array_layout, Kokkos::LayoutRight>,
                "dense_gemm: operands must be row-major (LayoutRight)");
  using T = typename CView::non_const_value_type;
  static_assert(std::is_same_v<typename CView::value_type, T>, "dense_gemm: C must be non-const");
  static_assert(std::is_same_v<typename AView::non_const_value_type, T> &&
                    std::is_same_v<typename BView::non_const_value_type, T>,
                "dense_gemm: A, B and C must have the same value type");
  using MemorySpace = typename CView::memory_space;
  static_assert(std::is_same_v<typename AView::memory_space, MemorySpace> &&
                    std::is_same_v<typename BView::memory_space, MemorySpace>,
                "dense_gemm: A, B and C must live in the same memory space");
  static_assert(Kokkos::SpaceAccessibility<ExecutionSpace, MemorySpace>::accessible,
                "dense_gemm: execution space cannot access the operands' memory space");
  std::string const op = "dense_gemm";
  int const M = static_cast<int>(trans_a ? A.extent(1) : A.extent(0));
  int const K = static_cast<int>(trans_a ? A.extent(0) : A.extent(1));
  int const KB = static_cast<int>(trans_b ? B.extent(1) : B.extent(0));
  int const N = static_cast<int>(trans_b ? B.extent(0) : B.extent(1));
  std::string const opa = trans_a ? "A^T" : "A", opb = trans_b ? "B^T" : "B";
  require(K == KB, op,
          opa + " has " + std::to_string(K) + " columns but " + opb + " has " + std::to_string(KB) + " rows (A is " +
              extents(A) + ", B is " + extents(B) + ")");
  require(C.extent(0) == std::size_t(M) && C.extent(1) == std::size_t(N), op,
          "C is " + extents(C) + ", expected [" + std::to_string(M) + ", " + std::to_string(N) + "] (A is " +
              extents(A) + ", B is " + extents(B) + ")");
  return {M, N, K};
}

}  // namespace detail

// The portable team tile kernel, on any backend (dense_gemm's fallback; public
// so that tests and benchmarks can reach it where Kokkos Kernels is used).
template <class ExecutionSpace, class AView, class BView, class CView>
void dense_gemm_tiled(ExecutionSpace const &space, AView const &A, BView const &B, CView const &C,
                      typename CView::non_const_value_type alpha = 1, typename CView::non_const_value_type beta = 0,
                      bool trans_a = false, bool trans_b = false) {
  auto const [M, N, K] = detail::check_gemm<ExecutionSpace>(A, B, C, trans_a, trans_b);
  if (M == 0 || N == 0) return;
  compat::ScopedRegion region("hexamoe::dense_gemm_tiled");
  using T = typename CView::non_const_value_type;
  using MemorySpace = typename CView::memory_space;
  using Kernel = detail::DenseGemmKernel<ExecutionSpace, T, MemorySpace>;
  using Shape = typename Kernel::Shape;
  int const col_tiles = (N + Shape::TN - 1) / Shape::TN;
  int const row_tiles = (M + Shape::TM - 1) / Shape::TM;
  Kernel kernel{A, B, C, alpha, beta, trans_a, trans_b, M, N, K, col_tiles};
  Kokkos::TeamPolicy<ExecutionSpace> policy(space, row_tiles * col_tiles, Kernel::host ? 1 : Shape::team_size);
  policy.set_scratch_size(0, Kokkos::PerTeam(hexamoe::detail::tile_scratch_bytes<T, Shape>(Kernel::host)));
  Kokkos::parallel_for("hexamoe::dense_gemm_tiled", policy, kernel);
}

// C[M, N] = alpha op(A) op(B) + beta C, op(A) [M, K], op(B) [K, N]. A, B and
// C must not overlap. Throws std::invalid_argument on mismatched extents.
template <class ExecutionSpace, class AView, class BView, class CView>
void dense_gemm(ExecutionSpace const &space, AView const &A, BView const &B, CView const &C,
                typename CView::non_const_value_type alpha = 1, typename CView::non_const_value_type beta = 0,
                bool trans_a = false, bool trans_b = false) {
  [[maybe_unused]] auto const [M, N, K] = detail::check_gemm<ExecutionSpace>(A, B, C, trans_a, trans_b);
#ifdef HEXAMOE_ENABLE_KOKKOSKERNELS
  using T = typename CView::non_const_value_type;
#if defined(HEXAMOE_HOST_VECTORS)
  constexpr bool blas_type = std::is_same_v<T, double>;
#else
  constexpr bool blas_type = std::is_same_v<T, float> || std::is_same_v<T, double>;
#endif
  if constexpr (detail::on_host<ExecutionSpace> &&
                std::is_same_v<typename CView::memory_space, Kokkos::HostSpace> && blas_type) {
    if (M == 0 || N == 0) return;
    if (K > 0) {  // KokkosBlas::gemm returns early on K = 0 without scaling C
      compat::ScopedRegion region("hexamoe::dense_gemm");
      using Dev = Kokkos::Device<ExecutionSpace, Kokkos::HostSpace>;
      using Unmanaged = Kokkos::MemoryTraits<Kokkos::Unmanaged>;
      // Row-major X [r, c] is column-major X^T [c, r] over the same memory.
      Kokkos::View<T const **, Kokkos::LayoutLeft, Dev, Unmanaged> at(A.data(), A.extent(1), A.extent(0));
      Kokkos::View<T const **, Kokkos::LayoutLeft, Dev, Unmanaged> bt(B.data(), B.extent(1), B.extent(0));
      Kokkos::View<T **, Kokkos::LayoutLeft, Dev, Unmanaged> ct(C.data(), N, M);
      space.fence();  // kernels that produced A, B or C have finished
      KokkosBlas::gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", alpha, bt, at, beta, ct);
      return;
    }
  }
#endif
  dense_gemm_tiled(space, A, B, C, alpha, beta, trans_a, trans_b);
}

}  // namespace nn
}  // namespace hexamoe
