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
//   micro-kernel the compiler vectorises (bf16 operands on CPUs with
//   AVX512-BF16: pairs along k on vdpbf16ps, host_micro_bf16 below); rows
//   and columns past the valid extent are never computed;
// - device backends (CUDA, HIP, SYCL): (TM/RM) x (TN/RN) threads, each holding
//   an RM x RN block of accumulators in registers for the whole reduction.
//
// The expert operators on devices use the larger engine in namespace `dev`
// below (128 x 128 tiles, 256 threads, 16-byte loads into team scratch:
// asynchronous copies in five stages for aligned bf16 on CUDA, else a
// register-staged double buffer): bf16 on CUDA with tensor cores (mma.sync,
// or wgmma in sm_90a machine code: Wgmma.hpp); float32 on CUDA with tensor
// cores too (three tf32 products by default, HEXAMOE_F32_MATH below); both,
// on other devices, with an 8 x 8 register-blocked FMA micro-kernel. The
// generic tile above remains for double and mixed storage types.
#pragma once

#include "BFloat16.hpp"
#include "Compat.hpp"
#include "Wgmma.hpp"

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) && !defined(KOKKOS_ENABLE_CUDA) && !defined(KOKKOS_ENABLE_HIP) && \
    !defined(KOKKOS_ENABLE_SYCL) && !defined(KOKKOS_ENABLE_OPENMPTARGET)
#include <immintrin.h>  // the host bf16 micro-kernel and the transposed staging below
#endif

// CUDA device code for compute capability 8.0 or later, where the
// tensor-core primitives below (mma.sync on bf16 and tf32, ldmatrix,
// cp.async) are instructions; in device code for older GPUs they trap, and
// dev::math_for never selects a path that reaches them there
// (dev::cuda_tensor_cores).
#if defined(KOKKOS_ENABLE_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define HEXAMOE_CUDA_SM80 1
#elif defined(KOKKOS_ENABLE_CUDA) && defined(__CUDA_ARCH__)
#define HEXAMOE_CUDA_PRE_SM80 1
#endif

// Loop unrolling hint for device compilers (host compilers would warn on it).
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define HEXAMOE_UNROLL _Pragma("unroll")
#define HEXAMOE_NO_UNROLL _Pragma("unroll 1")
#else
#define HEXAMOE_UNROLL
#define HEXAMOE_NO_UNROLL
#endif

namespace hexamoe {
namespace detail {

template <class ExecutionSpace>
inline constexpr bool runs_on_host = Kokkos::SpaceAccessibility<ExecutionSpace, Kokkos::HostSpace>::accessible;

// The team policy of the tile kernels' portable path. Their teams differ in
// work (an expert's last row tile is partial; ESMM's league is an upper bound
// whose last teams return at once), so host backends hand teams out
// dynamically: under the default static schedule one OpenMP thread got every
// non-empty tile of a small batch. Devices keep the default.
template <class ExecutionSpace>
using tile_team_policy = std::conditional_t<runs_on_host<ExecutionSpace>,
                                            Kokkos::TeamPolicy<ExecutionSpace, Kokkos::Schedule<Kokkos::Dynamic>>,
                                            Kokkos::TeamPolicy<ExecutionSpace>>;

template <bool Host>
struct TileShape;

template <>
struct TileShape<true> {
  static constexpr int TM = 96, TN = 64, TK = 128, RM = 6, RN = 32;
  static constexpr int team_size = 1;
};

template <>
struct TileShape<false> {
  static constexpr int TM = 64, TN = 64, TK = 16, RM = 4, RN = 4;
  static constexpr int team_size = (TM / RM) * (TN / RN);
};

// Host-only builds with GCC or Clang: float micro-kernels on the compilers'
// generic vectors (16 floats; one AVX-512 register, two AVX2 ones, ...), which
// keep the RM x RN accumulators in registers where the plain loops below
// spill (measured on AVX-512: 70-80 GFLOP/s a core against about 10). Device
// builds keep the plain loops for their host backend (tests only).
#if (defined(__GNUC__) || defined(__clang__)) && !defined(KOKKOS_ENABLE_CUDA) && !defined(KOKKOS_ENABLE_HIP) && \
    !defined(KOKKOS_ENABLE_SYCL) && !defined(KOKKOS_ENABLE_OPENMPTARGET)
#define HEXAMOE_HOST_VECTORS 1
typedef float host_v16f __attribute__((vector_size(64)));

// cs[r][c] += sum_kk xs[r ldx + kk ksx] * ws[kk][c] for r < R, c < 16 NV
// (ksx = 1: xs row-major; ldx = 1: xs staged k-major, as ESTMM's A^T).
template <int R, int NV>
inline void host_micro_vec(float const *xs, int ldx, int ksx, float const *ws, int ldw, float *cs, int ldc, int tk) {
  host_v16f acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(&acc[r][v], cs + r * ldc + 16 * v, sizeof(host_v16f));
  for (int kk = 0; kk < tk; ++kk) {
    host_v16f b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], ws + kk * ldw + 16 * v, sizeof(host_v16f));
    for (int r = 0; r < R; ++r) {
      float const a = xs[r * ldx + kk * ksx];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(cs + r * ldc + 16 * v, &acc[r][v], sizeof(host_v16f));
}

// Rows 1..RM of a block whose width is 16 NV.
template <int RM, int NV>
inline void host_micro_vec_rows(float const *xs, int ldx, int ksx, float const *ws, int ldw, float *cs, int ldc,
                                int tk, int rm) {
  if constexpr (RM > 0) {
    if (rm == RM) return host_micro_vec<RM, NV>(xs, ldx, ksx, ws, ldw, cs, ldc, tk);
    host_micro_vec_rows<RM - 1, NV>(xs, ldx, ksx, ws, ldw, cs, ldc, tk, rm);
  }
}

// A transposed copy of 32-bit words (a transposed W's chunk, float32 or bf16
// pairs along k): dst[j ldd + c] = the word at byte src + c lds + 4 j, for
// c < nc, j < nj. With AVX-512, blocks of 16 x 16 go through registers
// (unpacks and lane shuffles) instead of 256 scattered stores; the edges go
// a word at a time.
inline void host_transpose32(char const *src, std::size_t lds, int nc, int nj, std::uint32_t *dst, int ldd) {
  int c0 = 0;
#if defined(__AVX512F__)
  for (; c0 + 16 <= nc; c0 += 16) {
    int j0 = 0;
    for (; j0 + 16 <= nj; j0 += 16) {
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (c0 + i) * lds + 4 * std::size_t(j0));
      // (The masked forms with every lane set: GCC 12 warns on the unmasked
      // ones' undefined pass-through operand.)
      __mmask16 const m = 0xFFFF;
      __mmask8 const m8 = 0xFF;
      for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_mask_unpacklo_epi32(r[i], m, r[i], r[i + 1]);
        t[i + 1] = _mm512_mask_unpackhi_epi32(r[i], m, r[i], r[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_mask_unpacklo_epi64(t[i], m8, t[i], t[i + 2]);
        r[i + 1] = _mm512_mask_unpackhi_epi64(t[i], m8, t[i], t[i + 2]);
        r[i + 2] = _mm512_mask_unpacklo_epi64(t[i + 1], m8, t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_mask_unpackhi_epi64(t[i + 1], m8, t[i + 1], t[i + 3]);
      }
      for (int i = 0; i < 16; i += 8)
        for (int q = 0; q < 4; ++q) {
          t[i + q] = _mm512_mask_shuffle_i32x4(r[i + q], m, r[i + q], r[i + q + 4], 0x88);
          t[i + q + 4] = _mm512_mask_shuffle_i32x4(r[i + q], m, r[i + q], r[i + q + 4], 0xdd);
        }
      for (int q = 0; q < 8; ++q) {
        r[q] = _mm512_mask_shuffle_i32x4(t[q], m, t[q], t[q + 8], 0x88);
        r[q + 8] = _mm512_mask_shuffle_i32x4(t[q], m, t[q], t[q + 8], 0xdd);
      }
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (j0 + i) * ldd + c0, r[i]);
    }
    for (int c = c0; c < c0 + 16; ++c)
      for (int j = j0; j < nj; ++j) std::memcpy(dst + j * ldd + c, src + c * lds + 4 * std::size_t(j), 4);
  }
#endif
  for (int c = c0; c < nc; ++c)
    for (int j = 0; j < nj; ++j) std::memcpy(dst + j * ldd + c, src + c * lds + 4 * std::size_t(j), 4);
}
#endif

// Host builds for CPUs with AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4
// and later; -march=native on one of them): bf16 operands multiply in pairs
// along k with vdpbf16ps, which adds both exact products to the float32
// accumulator (twice the work per instruction of a float32 FMA, and half the
// operand bytes). xs2[r][j] holds the pair (x[r][2j], x[r][2j+1]) and
// ws2[j][c] the pair (w[2j][c], w[2j+1][c]), bf16 bits in one 32-bit word.
#if defined(HEXAMOE_HOST_VECTORS) && defined(__AVX512BF16__) && defined(__AVX512F__)
#define HEXAMOE_HOST_BF16_DOT 1

// cs[r][c] += sum_j dot(xs2[r ldx + j ksx], ws2[j][c]) for r < R, c < 16 NV.
template <int R, int NV>
inline void host_micro_bf16(std::uint32_t const *xs2, int ldx, int ksx, std::uint32_t const *ws2, int ldw, float *cs,
                            int ldc, int tk2) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(cs + r * ldc + 16 * v);
  for (int j = 0; j < tk2; ++j) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(ws2 + j * ldw + 16 * v);
    for (int r = 0; r < R; ++r) {
      __m512bh const a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xs2[r * ldx + j * ksx]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(cs + r * ldc + 16 * v, acc[r][v]);
}

template <int RM, int NV>
inline void host_micro_bf16_rows(std::uint32_t const *xs2, int ldx, int ksx, std::uint32_t const *ws2, int ldw,
                                 float *cs, int ldc, int tk2, int rm) {
  if constexpr (RM > 0) {
    if (rm == RM) return host_micro_bf16<RM, NV>(xs2, ldx, ksx, ws2, ldw, cs, ldc, tk2);
    host_micro_bf16_rows<RM - 1, NV>(xs2, ldx, ksx, ws2, ldw, cs, ldc, tk2, rm);
  }
}

// As host_micro_bf16 with the left operand read in place: row r's pair j is
// the two bf16 at rowp[r] + 2j; the last pair of an odd tk holds one element
// (the other half zero, nothing past it is read).
template <int R, int NV>
inline void host_micro_bf16_rowp(std::uint16_t const *const *rowp, std::uint32_t const *ws2, int ldw, float *cs,
                                 int ldc, int tk) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(cs + r * ldc + 16 * v);
  int const full = tk / 2;
  for (int j = 0; j <= full; ++j) {
    if (j == full && !(tk & 1)) break;
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512(ws2 + j * ldw + 16 * v);
    for (int r = 0; r < R; ++r) {
      std::uint32_t u = rowp[r][2 * j];
      if (j < full) std::memcpy(&u, rowp[r] + 2 * j, sizeof u);
      __m512bh const a = (__m512bh)_mm512_set1_epi32(static_cast<int>(u));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(cs + r * ldc + 16 * v, acc[r][v]);
}

template <int RM, int NV>
inline void host_micro_bf16_rowp_rows(std::uint16_t const *const *rowp, std::uint32_t const *ws2, int ldw, float *cs,
                                      int ldc, int tk, int rm) {
  if constexpr (RM > 0) {
    if (rm == RM) return host_micro_bf16_rowp<RM, NV>(rowp, ws2, ldw, cs, ldc, tk);
    host_micro_bf16_rowp_rows<RM - 1, NV>(rowp, ws2, ldw, cs, ldc, tk, rm);
  }
}

// A host tile's valid rows for one chunk of tk elements of k, rows read in
// place through rowp (ws2 staged as pairs, zero columns past the valid extent).
template <class Shape>
inline void host_tile_accumulate_bf16_rowp(std::uint16_t const *const *rowp, std::uint32_t const *ws2, float *cs,
                                           int rows, int tk) {
  constexpr int RB = 6;
  for (int r0 = 0; r0 < rows; r0 += RB) {
    int const rm = rows - r0 < RB ? rows - r0 : RB;
    for (int c0 = 0; c0 < Shape::TN; c0 += 64)
      host_micro_bf16_rowp_rows<RB, 4>(rowp + r0, ws2 + c0, Shape::TN, cs + r0 * Shape::TN + c0, Shape::TN, tk, rm);
  }
}

// The valid rows of a host tile for one staged chunk of tk2 pairs, over the
// tile's full width (staged columns past the valid extent hold zeros); xs2
// row-major [TM][TK / 2], or k-major [TK / 2][TM].
template <class Shape>
inline void host_tile_accumulate_bf16(std::uint32_t const *xs2, std::uint32_t const *ws2, float *cs, int rows,
                                      int tk2, bool kmajor = false) {
  int const ldx = kmajor ? 1 : Shape::TK / 2, ksx = kmajor ? Shape::TM : 1;
  static_assert(Shape::TN % 64 == 0, "the bf16 micro-kernel takes 64 columns at a time");
  constexpr int RB = 6;  // 6 x 64 accumulators: 24 of the 32 vector registers
  for (int r0 = 0; r0 < rows; r0 += RB) {
    int const rm = rows - r0 < RB ? rows - r0 : RB;
    for (int c0 = 0; c0 < Shape::TN; c0 += 64)
      host_micro_bf16_rows<RB, 4>(xs2 + r0 * ldx, ldx, ksx, ws2 + c0, Shape::TN, cs + r0 * Shape::TN + c0,
                                  Shape::TN, tk2, rm);
  }
}
#endif

// Host micro-kernel: cs[r][c] += sum_kk xs[r][kk] * ws[kk][c] over an RM x RN
// block (full blocks take the fixed-size path the compiler unrolls).
template <int RM, int RN, class Acc>
KOKKOS_INLINE_FUNCTION void host_micro(Acc const *xs, int ldx, int ksx, Acc const *ws, int ldw, Acc *cs, int ldc,
                                       int tk, int rm, int rn) {
#if defined(HEXAMOE_HOST_VECTORS)
  if constexpr (std::is_same_v<Acc, float> && RN % 16 == 0) {
    if (rn == RN) return host_micro_vec_rows<RM, RN / 16>(xs, ldx, ksx, ws, ldw, cs, ldc, tk, rm);
    if (rn % 16 == 0) {  // a narrower edge block: 16 columns at a time
      for (int c = 0; c < rn; c += 16) host_micro_vec_rows<RM, 1>(xs, ldx, ksx, ws + c, ldw, cs + c, ldc, tk, rm);
      return;
    }
  }
#endif
  if (rm == RM && rn == RN) {
    Acc acc[RM][RN];
    for (int r = 0; r < RM; ++r)
      for (int c = 0; c < RN; ++c) acc[r][c] = cs[r * ldc + c];
    for (int kk = 0; kk < tk; ++kk) {
      Acc const *wr = ws + kk * ldw;
      for (int r = 0; r < RM; ++r) {
        Acc const a = xs[r * ldx + kk * ksx];
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
        Acc const a = xs[r * ldx + kk * ksx];
        Acc const *wr = ws + kk * ldw;
        for (int c = 0; c < rn; ++c) acc[c] += a * wr[c];
      }
      for (int c = 0; c < rn; ++c) cs[r * ldc + c] = acc[c];
    }
  }
}

// Host: accumulate the valid rows x cols of the tile for one staged chunk;
// xs row-major [TM][TK], or k-major [TK][TM] (contiguous stores when it is
// staged from rows that run along the tile's rows, as ESTMM's A^T).
template <class Shape, class Acc>
KOKKOS_INLINE_FUNCTION void host_tile_accumulate(Acc const *xs, Acc const *ws, Acc *cs, int rows, int cols, int tk,
                                                 bool kmajor = false) {
  int const ldx = kmajor ? 1 : Shape::TK, ksx = kmajor ? Shape::TM : 1;
  for (int r0 = 0; r0 < rows; r0 += Shape::RM) {
    int const rm = rows - r0 < Shape::RM ? rows - r0 : Shape::RM;
    for (int c0 = 0; c0 < cols; c0 += Shape::RN) {
      int const rn = cols - c0 < Shape::RN ? cols - c0 : Shape::RN;
      host_micro<Shape::RM, Shape::RN>(xs + r0 * ldx, ldx, ksx, ws + c0, Shape::TN, cs + r0 * Shape::TN + c0,
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


// ---------------------------------------------------------------------------
// The device engine of ESMM and ESTMM.
namespace dev {

// Which arithmetic a device kernel uses.
enum class Math {
  generic,   // the portable tile above (double, mixed storage types, host)
  simt,      // float accumulators from FMA on float32 or bf16 operands (any device)
  bf16_mma,  // CUDA tensor cores, bf16 operands, float32 accumulation
  tf32_mma,  // CUDA tensor cores, float32 storage rounded to tf32 (opt-in)
  tf32x3_mma,  // CUDA tensor cores, float32 storage as tf32 hi + lo, three products
};

// How float32 expert GEMMs run on CUDA:
// - tf32x3 (default): each operand x is split into hi = tf32(x) (rounded to
//   nearest) and lo = x - hi, of which the tensor cores read the top 11
//   significant bits, and they add hi*hi' + hi*lo' + lo*hi' (CUTLASS's fast
//   3xTF32 split): at most 2^-21 |x| is lost per operand and 2^-22 |x w| per
//   product with lo*lo'. The tensor cores' float32 sums truncate, so they only
//   ever sum one k step of 8 (ESTMM) or 16 (ESMM, step_tf32x3_k16), three
//   products per term, from zero; that block sum is added to the
//   accumulator with a float32 add that rounds to nearest. Measured on H200,
//   the layer's output is closer to float64 than with fma (4.5e-7 against
//   1.4e-6 relative on Swin-MoE-S stage 3, docs/PERFORMANCE.md) in less
//   time. (Summing the whole reduction on the tensor cores instead, as
//   before, ended at 1.4e-5.)
// - fma: the 8 x 8 register-blocked FMA micro-kernel (exact float32 products,
//   float32 sums, one rounding per term);
// - tf32 (opt-in): one tf32 product (10 mantissa bits per operand, relative
//   error near 4e-4).
// HEXAMOE_F32_MATH=tf32x3|fma|tf32 in the environment picks one (HEXAMOE_TF32=1
// is the older spelling of tf32); an unknown value is an error that names it.
// Other backends always use the FMA kernel.
enum class Float32Math { fma, tf32x3, tf32 };

inline Float32Math parse_float32_math(char const *v) {
  std::string const s = v == nullptr ? "" : v;
  if (s.empty() || s == "tf32x3") return Float32Math::tf32x3;
  if (s == "fma") return Float32Math::fma;
  if (s == "tf32") return Float32Math::tf32;
  throw std::invalid_argument("HEXAMOE_F32_MATH='" + s + "' is not one of tf32x3, fma, tf32");
}

inline Float32Math &float32_math() {
  static Float32Math m = [] {
    char const *t = std::getenv("HEXAMOE_TF32");
    if (t != nullptr && t[0] == '1') return Float32Math::tf32;
    return parse_float32_math(std::getenv("HEXAMOE_F32_MATH"));
  }();
  return m;
}

template <class ExecutionSpace>
inline constexpr bool is_cuda =
#if defined(KOKKOS_ENABLE_CUDA)
    std::is_same_v<ExecutionSpace, Kokkos::Cuda>;
#else
    false;
#endif

// Whether this build's CUDA code may use the instructions of compute
// capability 8.0 that the tensor-core paths need (mma.sync on bf16 and tf32,
// ldmatrix, cp.async). Kokkos builds for one device architecture; for the
// older ones (Kepler to Turing: V100, T4, ...) every expert GEMM and the
// router take the portable paths, and those instructions are compiled out.
inline constexpr bool cuda_tensor_cores =
#if defined(KOKKOS_ENABLE_CUDA) &&                                                                     \
    !(defined(KOKKOS_ARCH_KEPLER) || defined(KOKKOS_ARCH_MAXWELL) || defined(KOKKOS_ARCH_PASCAL) || \
      defined(KOKKOS_ARCH_VOLTA) || defined(KOKKOS_ARCH_TURING75))
    true;
#else
    false;
#endif

template <class ExecutionSpace>
inline constexpr bool has_cuda_tensor_cores = is_cuda<ExecutionSpace> && cuda_tensor_cores;

// Tests: bf16 on the FMA kernel even where the tensor cores are available
// (the path of GPUs before compute capability 8.0), so that a GPU with
// tensor cores checks it too.
inline bool &bf16_fma_for_tests() {
  static bool on = false;
  return on;
}

// The arithmetic for (execution space, operand storage types).
template <class ExecutionSpace, class TA, class TB>
Math math_for() {
  using A = std::remove_const_t<TA>;
  using B = std::remove_const_t<TB>;
  if constexpr (runs_on_host<ExecutionSpace> || !std::is_same_v<A, B>) {
    return Math::generic;
  } else if constexpr (std::is_same_v<A, bfloat16>) {
    return has_cuda_tensor_cores<ExecutionSpace> && !bf16_fma_for_tests() ? Math::bf16_mma : Math::simt;
  } else if constexpr (std::is_same_v<A, float>) {
    if (!has_cuda_tensor_cores<ExecutionSpace>) return Math::simt;
    switch (float32_math()) {
      case Float32Math::tf32: return Math::tf32_mma;
      case Float32Math::tf32x3: return Math::tf32x3_mma;
      default: return Math::simt;
    }
  } else {
    return Math::generic;
  }
}

constexpr int BM = 128, BN = 128, NT = 256;  // output tile, threads per team
constexpr int BKF = 16, LDF = BM + 8;        // float scratch: k step, row pitch (floats)
constexpr int BKH = 32;                      // bf16 scratch: k step of ESMM (register-staged)
constexpr int PKH = 16, PSH = 5;             // bf16 ESMM with asynchronous copies: k step, stages
constexpr int LDE = 64 + 4;                  // epilogue staging: row pitch (floats) of 64 columns

// Teams of NT threads an ESMM launch asks to keep resident on a CUDA
// multiprocessor (the minimum of its launch bounds): two, with registers
// capped at 128 a thread, except for the 3xtf32 kernels, whose hi + lo
// fragments spilled 400-900 bytes a thread under that cap (ptxas); they get
// one team and up to 255 registers (timed in docs/PERFORMANCE.md).
constexpr int esmm_teams_per_sm(Math m) { return m == Math::tf32x3_mma ? 1 : 2; }

// 16 bytes of operand data in registers.
struct alignas(16) Vec16 {
  unsigned u[4];
};
struct alignas(16) Float4 {
  float v[4];
};
struct alignas(8) Float2 {
  float v[2];
};

// Kernel labels name the arithmetic (Kokkos Tools show where time goes).
inline std::string kernel_label(char const *op, Math m, char const *variant) {
  return std::string(op) +
         (m == Math::bf16_mma ? "[bf16 mma" : m == Math::tf32_mma ? "[tf32 mma" : m == Math::tf32x3_mma ? "[3xtf32 mma" : "[fma") +
         variant +
         "]";
}

// Scratch bytes of a team (plus slack for the 128-byte alignment).
template <Math M>
KOKKOS_INLINE_FUNCTION constexpr std::size_t scratch_bytes(int bk, bool lo) {
  // The ESMM epilogue stages 128 x 64 accumulators in the same scratch.
  return (M == Math::bf16_mma ? std::size_t(2) * (BM * bk + BN * bk * (lo ? 2 : 1)) * 2
                              : std::size_t(2) * 2 * BKF * LDF * sizeof(float)) > std::size_t(BM) * LDE * sizeof(float)
             ? (M == Math::bf16_mma ? std::size_t(2) * (BM * bk + BN * bk * (lo ? 2 : 1)) * 2
                                    : std::size_t(2) * 2 * BKF * LDF * sizeof(float)) +
                   128
             : std::size_t(BM) * LDE * sizeof(float) + 128;
}

// Swizzled element offsets of bf16 tiles: rows of 32 (4 chunks of 16 bytes) or
// of 128 (16 chunks); the chunk index is XOR-ed with the row so that the eight
// 16-byte rows of an ldmatrix hit distinct banks.
KOKKOS_INLINE_FUNCTION int sw32(int r, int c) { return r * 32 + ((((c >> 3) ^ (r >> 1)) & 3) << 3) + (c & 7); }
KOKKOS_INLINE_FUNCTION int sw128(int r, int c) { return r * 128 + (((c >> 3) ^ (r & 7)) << 3) + (c & 7); }
// wgmma's N-major B of a k = 16 stage: two halves of [16][64] (rows k, 64
// columns of 128 bytes, the chunk index XOR-ed with the row), so that each
// 8-row block of a half is one 1024-byte atom of the 128-byte swizzle.
KOKKOS_INLINE_FUNCTION int sw_n128(int r, int c) {
  return (c >> 6) * 1024 + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
}
// Rows of 16 (2 chunks): rows 4..7 of every 8 take the other chunk first.
KOKKOS_INLINE_FUNCTION int sw16(int r, int c) { return r * 16 + ((((c >> 3) ^ (r >> 2)) & 1) << 3) + (c & 7); }
// The swizzle of bf16 tiles whose rows hold BK (16 or 32) elements.
template <int BK>
KOKKOS_INLINE_FUNCTION int swk(int r, int c) {
  static_assert(BK == 16 || BK == 32, "bf16 tiles have rows of 16 or 32 elements");
  if constexpr (BK == 16) {
    return sw16(r, c);
  } else {
    return sw32(r, c);
  }
}

// Rows and columns (within the tile) of a thread's 8 x 8 accumulators.
// Tensor cores: warps as 2 (m) x 4 (n), each 64 x 32, m16n8 blocks; SIMT:
// a 16 x 16 thread grid, each thread rows {4ty.., 64+4ty..}, columns likewise.
template <Math M>
KOKKOS_INLINE_FUNCTION int acc_row(int tid, int i) {
  if constexpr (M == Math::bf16_mma || M == Math::tf32_mma || M == Math::tf32x3_mma) {
    return ((tid >> 5) >> 2) * 64 + (i >> 1) * 16 + ((tid & 31) >> 2) + (i & 1) * 8;
  } else {
    return (i < 4 ? 0 : 64) + (tid >> 4) * 4 + (i & 3);
  }
}
template <Math M>
KOKKOS_INLINE_FUNCTION int acc_col(int tid, int j) {
  if constexpr (M == Math::bf16_mma || M == Math::tf32_mma || M == Math::tf32x3_mma) {
    return ((tid >> 5) & 3) * 32 + (j >> 1) * 8 + (tid & 3) * 2 + (j & 1);
  } else {
    return (j < 4 ? 0 : 64) + (tid & 15) * 4 + (j & 3);
  }
}

// --- operand loads (any device) ---------------------------------------------

// Eight bf16 (16 bytes) from p, of which `avail` are valid (zeros elsewhere).
KOKKOS_INLINE_FUNCTION Vec16 load8(bfloat16 const *p, int avail, bool vec) {
  Vec16 r{{0u, 0u, 0u, 0u}};
  if (avail <= 0) return r;
  if (vec && avail >= 8) return *reinterpret_cast<Vec16 const *>(p);
  for (int j = 0; j < 8 && j < avail; ++j) r.u[j >> 1] |= static_cast<unsigned>(p[j].bits) << ((j & 1) * 16);
  return r;
}
// Four values as float from p (16 bytes for float, 8 for bf16).
KOKKOS_INLINE_FUNCTION Float4 load4(float const *p, int avail, bool vec) {
  Float4 r{{0.f, 0.f, 0.f, 0.f}};
  if (avail <= 0) return r;
  if (vec && avail >= 4) return *reinterpret_cast<Float4 const *>(p);
  for (int j = 0; j < 4 && j < avail; ++j) r.v[j] = p[j];
  return r;
}
KOKKOS_INLINE_FUNCTION Float4 load4(bfloat16 const *p, int avail, bool vec) {
  Float4 r{{0.f, 0.f, 0.f, 0.f}};
  if (avail <= 0) return r;
  if (vec && avail >= 4) {
    struct alignas(8) U2 {
      unsigned u[2];
    } const w = *reinterpret_cast<U2 const *>(p);
    for (int j = 0; j < 4; ++j) r.v[j] = bfloat16::to_float(static_cast<std::uint16_t>(w.u[j >> 1] >> ((j & 1) * 16)));
    return r;
  }
  for (int j = 0; j < 4 && j < avail; ++j) r.v[j] = static_cast<float>(p[j]);
  return r;
}
// Four values as float from a 16-byte (float) or 8-byte (bf16) aligned p, all valid.
KOKKOS_INLINE_FUNCTION Float4 load4_full(float const *p) { return *reinterpret_cast<Float4 const *>(p); }
KOKKOS_INLINE_FUNCTION Float4 load4_full(bfloat16 const *p) { return load4(p, 4, true); }
KOKKOS_INLINE_FUNCTION float bf16_at(Vec16 const &v, int j) {
  return bfloat16::to_float(static_cast<std::uint16_t>(v.u[j >> 1] >> ((j & 1) * 16)));
}
// x * y rounded to float32 by itself: never contracted with a later add or
// subtract into one fused multiply-add. Where two code paths must give the
// same bits (a product stored to scratch on one, used from a register on the
// other), the register side multiplies with this.
KOKKOS_INLINE_FUNCTION float mul_rn(float x, float y) {
#if defined(KOKKOS_ENABLE_CUDA) && defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}

// s * v as bf16 (hi) and the bf16 of the remainder (lo): hi + lo carries 16 bits.
KOKKOS_INLINE_FUNCTION void scale_split(Vec16 const &v, float s, Vec16 &hi, Vec16 &lo) {
  for (int q = 0; q < 4; ++q) {
    unsigned h = 0, l = 0;
    for (int j = 0; j < 2; ++j) {
      float const x = mul_rn(s, bf16_at(v, 2 * q + j));  // lo below is s x - hi of this rounded product
      std::uint16_t const hb = bfloat16::from_float(x);
      std::uint16_t const lb = bfloat16::from_float(x - bfloat16::to_float(hb));
      h |= static_cast<unsigned>(hb) << (16 * j);
      l |= static_cast<unsigned>(lb) << (16 * j);
    }
    hi.u[q] = h;
    lo.u[q] = l;
  }
}

// Whether rows of a 2-d (or the last two extents of a 3-d) view can be read
// in vectors of `width` elements: aligned base, row pitch a multiple of width.
template <class T>
bool vector_ok(T const *data, std::size_t pitch, int width) {
  return reinterpret_cast<std::uintptr_t>(data) % (std::size_t(width) * sizeof(T)) == 0 && pitch % width == 0;
}

// --- the tail split of the expert GEMMs ---------------------------------------

// Resident teams of 256 threads: the space's concurrency (2048 threads per
// streaming multiprocessor) / 2048 times the teams a multiprocessor keeps
// (esmm_teams_per_sm); none for bf16 where the wgmma path runs.
// HEXAMOE_TAIL_SPLIT=0 in the environment turns the split off (for
// comparison); tail_slots_override() sets the slots (tests use small values
// so that small problems split, on either path).
inline int &tail_slots_override() {
  static int v = 0;
  return v;
}
template <class ExecutionSpace>
int tail_slots(ExecutionSpace const &space, bool bf16, int teams_per_sm) {
  static bool const off = [] {
    char const *v = std::getenv("HEXAMOE_TAIL_SPLIT");
    return v != nullptr && v[0] == '0';
  }();
  if (off) return 0;
  if (tail_slots_override() > 0) return tail_slots_override();
  // With wgmma (Hopper, sm_90a code) the bf16 split measured slower (H200,
  // swinS-s3-top1 bf16 forward 0.280 against 0.267 ms without it).
  if (bf16 && wgmma_in_use(space)) return 0;
  return static_cast<int>(std::max<long>(1, static_cast<long>(space.concurrency()) / 2048 * teams_per_sm));
}

// Buffers of the split tiles: `slots` x `per_slot` floats of partial
// accumulators, and a (counter, flag) pair of ints per slot, zero when no
// launch is running (each launch leaves them zero). Grown when needed,
// released by release (benchmarks measuring one layer's peak).
template <class MemorySpace>
std::pair<Kokkos::View<float *, MemorySpace>, Kokkos::View<int *, MemorySpace>> tail_workspace(std::size_t slots,
                                                                                                std::size_t per_slot,
                                                                                                bool release = false) {
  using P = Kokkos::View<float *, MemorySpace>;
  using Q = Kokkos::View<int *, MemorySpace>;
  static P *part = nullptr;
  static Q *sync = nullptr;
  if (release) {
    if (part != nullptr) *part = P();
    if (sync != nullptr) *sync = Q();
    return {};
  }
  if (part == nullptr) {
    part = new P();
    sync = new Q();
    Kokkos::push_finalize_hook([] {
      delete part;
      delete sync;
      part = nullptr;
      sync = nullptr;
    });
  }
  if (part->extent(0) < slots * per_slot) {
    *part = P();
    *part = P(Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::tail_partials"), slots * per_slot);
  }
  if (sync->extent(0) < 2 * slots) {
    *sync = Q();
    *sync = Q("hexamoe::tail_sync", 2 * slots);  // zero-initialised
  }
  return {*part, *sync};
}

// Four floats from global memory through L2 only (data another team wrote
// during this launch).
KOKKOS_INLINE_FUNCTION Float4 load_cg(float const *p) {
#if defined(KOKKOS_ENABLE_CUDA) && defined(__CUDA_ARCH__)
  float4 const v = __ldcg(reinterpret_cast<float4 const *>(p));
  return Float4{{v.x, v.y, v.z, v.w}};
#else
  return *reinterpret_cast<Float4 const *>(p);
#endif
}

// --- asynchronous copies (CUDA sm_80+) ----------------------------------------

// Which operands of the expert kernels on CUDA travel to team scratch by
// asynchronous copies (cp.async, sm_80 and later) where their rows are 16-byte
// aligned, instead of through registers into a double buffer
// (HEXAMOE_ASYNC_COPY in the environment, read once):
// - "1" or unset (default): the bf16 operands, including ESTMM's gate-scaled
//   one (dW2's g dy), whose row scales apply as fragments are read (the same
//   float products and the same order of tensor-core products as the
//   register path, so the same bits);
// - "stored": only the bf16 operands as stored (the gate-scaled one through
//   registers; the default before it was timed, for comparison);
// - "0": none (for comparison and diagnosis).
// float32 operands always go through registers: the asynchronous float32
// path, timed on H200, was 5-30% slower in every kernel and was removed
// (docs/PERFORMANCE.md). Other values are an error that names them.
enum class AsyncCopies { none, stored_bf16, bf16 };

inline AsyncCopies parse_async_copies(char const *v) {
  std::string const s = v == nullptr ? "" : v;
  if (s.empty() || s == "1") return AsyncCopies::bf16;
  if (s == "0") return AsyncCopies::none;
  if (s == "stored") return AsyncCopies::stored_bf16;
  throw std::invalid_argument("HEXAMOE_ASYNC_COPY='" + s + "' is not 0, 1 or stored");
}
inline AsyncCopies &async_copy_setting() {
  static AsyncCopies a = parse_async_copies(std::getenv("HEXAMOE_ASYNC_COPY"));
  return a;
}
inline bool async_copies() { return async_copy_setting() != AsyncCopies::none; }
// Whether a kernel of arithmetic m (with a gate-scaled operand: gated) may
// stage with asynchronous copies.
inline bool async_copies_for(Math m, bool gated) {
  AsyncCopies const a = async_copy_setting();
  return m == Math::bf16_mma && (a == AsyncCopies::bf16 || (a == AsyncCopies::stored_bf16 && !gated));
}

KOKKOS_INLINE_FUNCTION void cp_async_commit() {
#if defined(HEXAMOE_CUDA_SM80)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
KOKKOS_INLINE_FUNCTION void cp_async_wait() {
#if defined(HEXAMOE_CUDA_SM80)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// A team's pipeline of PS stages of asynchronous copies over nk k steps:
// issue() copies the next stage into the next slot (PS - 1 stages ahead, so
// PS - 1 are in flight), step(slot) consumes stage kt from slot kt % PS once
// every thread's copies of it have landed; the slot an issue fills is the
// one of stage kt - 1, which every thread finished at the barrier. Empty
// commit groups keep each thread's group count uniform.
template <int PS, class Member, class Issue, class Step>
KOKKOS_INLINE_FUNCTION void async_pipeline(Member const &team, int nk, Issue &&issue, Step &&step) {
  for (int s = 0; s < PS - 1; ++s) {
    if (s < nk) issue();
    cp_async_commit();
  }
  int slot = 0;
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<PS - 2>();  // this thread's copies of stage kt have landed
    team.team_barrier();      // everyone's have; stage kt - 1's slot is free
    if (kt + PS - 1 < nk) issue();
    cp_async_commit();
    step(slot);
    slot = slot + 1 == PS ? 0 : slot + 1;
  }
  cp_async_wait<0>();
}

// --- tensor-core primitives (CUDA device code; no-ops elsewhere) -------------


KOKKOS_INLINE_FUNCTION float to_tf32(float x) {
#if defined(HEXAMOE_CUDA_SM80)
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
#else
  return x;
#endif
}

// Two floats as adjacent bf16 (lo at the lower address), rounded to nearest
// even: one cvt.rn.bf16x2.f32 on sm_80 and later, else bfloat16::from_float.
KOKKOS_INLINE_FUNCTION unsigned pack_bf16x2(float lo, float hi) {
#if defined(HEXAMOE_CUDA_SM80)
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#else
  return static_cast<unsigned>(bfloat16::from_float(lo)) | (static_cast<unsigned>(bfloat16::from_float(hi)) << 16);
#endif
}

// The 32-bit shared-state address of a team scratch pointer (0 off CUDA).
KOKKOS_INLINE_FUNCTION unsigned smem_u32(void const *p) {
#if defined(KOKKOS_ENABLE_CUDA) && defined(__CUDA_ARCH__)
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
#else
  (void)p;
  return 0u;
#endif
}

// ldmatrix x4 (plain or transposed) from a shared-state address.
template <bool Trans>
KOKKOS_INLINE_FUNCTION void ldsm_x4_at(unsigned (&r)[4], unsigned a) {
#if defined(HEXAMOE_CUDA_SM80)
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  }
#else
#if defined(HEXAMOE_CUDA_PRE_SM80)
  __trap();  // unreachable: no tensor-core path below compute capability 8.0
#endif
  (void)a;
  r[0] = r[1] = r[2] = r[3] = 0u;
#endif
}

// ldmatrix x4 (plain, transposed) from a generic pointer into team scratch.
KOKKOS_INLINE_FUNCTION void ldsm_x4(unsigned (&r)[4], void const *p) { ldsm_x4_at<false>(r, smem_u32(p)); }
KOKKOS_INLINE_FUNCTION void ldsm_x4_t(unsigned (&r)[4], void const *p) { ldsm_x4_at<true>(r, smem_u32(p)); }

// 16 bytes from global src to the shared-state address dst without passing
// through registers (sm_80+); only the first src_bytes (0..16) are read, the
// rest of dst is zero-filled; src must be 16-byte aligned (and valid even when
// src_bytes is 0). CUDA device code only: a no-op elsewhere, where the kernels
// that call it never run.
KOKKOS_INLINE_FUNCTION void cp_async16_at(unsigned dst, void const *src, int src_bytes) {
#if defined(HEXAMOE_CUDA_SM80)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#else
#if defined(HEXAMOE_CUDA_PRE_SM80)
  __trap();  // unreachable: no tensor-core path below compute capability 8.0
#endif
  (void)dst, (void)src, (void)src_bytes;
#endif
}

// d (16 x 8, float) += a (16 x 16 bf16, row) b (16 x 8 bf16, col).
KOKKOS_INLINE_FUNCTION void mma_bf16(float &d0, float &d1, float &d2, float &d3, unsigned const (&a)[4], unsigned b0,
                                     unsigned b1) {
#if defined(HEXAMOE_CUDA_SM80)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
#if defined(HEXAMOE_CUDA_PRE_SM80)
  __trap();  // unreachable: no tensor-core path below compute capability 8.0
#endif
  (void)d0, (void)d1, (void)d2, (void)d3, (void)a, (void)b0, (void)b1;
#endif
}

// d (16 x 8, float) += a (16 x 8 tf32, row) b (8 x 8 tf32, col).
KOKKOS_INLINE_FUNCTION void mma_tf32(float &d0, float &d1, float &d2, float &d3, unsigned const (&a)[4], unsigned b0,
                                     unsigned b1) {
#if defined(HEXAMOE_CUDA_SM80)
  asm(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
#if defined(HEXAMOE_CUDA_PRE_SM80)
  __trap();  // unreachable: no tensor-core path below compute capability 8.0
#endif
  (void)d0, (void)d1, (void)d2, (void)d3, (void)a, (void)b0, (void)b1;
#endif
}

// d (16 x 8, float) = a b, starting from zero.
KOKKOS_INLINE_FUNCTION void mma_tf32_zero(float (&d)[4], unsigned const (&a)[4], unsigned b0, unsigned b1) {
#if defined(HEXAMOE_CUDA_SM80)
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
#else
#if defined(HEXAMOE_CUDA_PRE_SM80)
  __trap();  // unreachable: no tensor-core path below compute capability 8.0
#endif
  (void)a, (void)b0, (void)b1;
  d[0] = d[1] = d[2] = d[3] = 0.f;
#endif
}

KOKKOS_INLINE_FUNCTION unsigned float_bits(float x) {
  union {
    float f;
    unsigned u;
  } v;
  v.f = x;
  return v.u;
}

// x as tf32 hi + lo (CUTLASS's fast 3xTF32 split): hi is x rounded to the
// nearest tf32, ties away from zero, on the bits (two integer operations; as
// cvt.rna.tf32.f32 for finite x); lo = x - hi is exact, and the tensor cores
// read its top 19 bits, so |x - hi - lo_read| < 2^-10 |lo| <= 2^-21 |x|.
// An infinite x gives lo = NaN (inf - inf), so products with it are NaN.
KOKKOS_INLINE_FUNCTION void split_tf32(float x, unsigned &hi, unsigned &lo) {
  union {
    float f;
    unsigned u;
  } h, l;
  h.f = x;
  h.u = (h.u + 0x1000u) & 0xffffe000u;
  l.f = x - h.f;
  hi = h.u;
  lo = l.u;
}

// --- one staged k step of the 128 x 128 tile ---------------------------------

// bf16 tensor cores. A is [BM][BK] (rows m, swk<BK>) or, with A_KM,
// [BK][BM] (rows k, sw128); B is [BK][BN] (rows k, sw128) or, with B_NK,
// [BN][BK] (rows n, swk<BK>). With lo, a second B (the low half of a
// split operand) is multiplied by the same A fragments.
template <int BK, bool A_KM, bool B_NK, bool LO>
KOKKOS_INLINE_FUNCTION void mma_step_bf16(float (&acc)[8][8], bfloat16 const *sA, bfloat16 const *sB,
                                          bfloat16 const *sBlo, int tid) {
  int const lane = tid & 31, warp = tid >> 5;
  int const wm0 = (warp >> 2) * 64, wn0 = (warp & 3) * 32;
  for (int ks = 0; ks < BK; ks += 16) {
    unsigned a[4][4];
    for (int mi = 0; mi < 4; ++mi) {
      int const mb = wm0 + mi * 16;
      if constexpr (A_KM) {
        ldsm_x4_t(a[mi], sA + sw128(ks + (lane & 7) + ((lane >> 4) << 3), mb + ((lane >> 3) & 1) * 8));
      } else {
        ldsm_x4(a[mi], sA + swk<BK>(mb + (lane & 15), ks + (lane >> 4) * 8));
      }
    }
    for (int part = 0; part < (LO ? 2 : 1); ++part) {
      bfloat16 const *sb = part == 0 ? sB : sBlo;
      unsigned b[4][2];
      for (int nj = 0; nj < 4; nj += 2) {
        int const nb = wn0 + nj * 8;
        unsigned r[4];
        if constexpr (B_NK) {
          ldsm_x4(r, sb + swk<BK>(nb + (lane & 7) + (lane >> 4) * 8, ks + ((lane >> 3) & 1) * 8));
        } else {
          ldsm_x4_t(r, sb + sw128(ks + (lane & 7) + ((lane >> 3) & 1) * 8, nb + (lane >> 4) * 8));
        }
        b[nj][0] = r[0];
        b[nj][1] = r[1];
        b[nj + 1][0] = r[2];
        b[nj + 1][1] = r[3];
      }
      for (int mi = 0; mi < 4; ++mi)
        for (int ni = 0; ni < 4; ++ni)
          mma_bf16(acc[2 * mi][2 * ni], acc[2 * mi][2 * ni + 1], acc[2 * mi + 1][2 * ni], acc[2 * mi + 1][2 * ni + 1],
                   a[mi], b[ni][0], b[ni][1]);
    }
  }
}

// One k = 16 step of the 128 x 128 bf16 tile with the ldmatrix addresses of
// this thread precomputed (see ldsm_addresses) plus the stage's byte offset:
// A is [16][BM] rows k (A_KM, sw128) or [BM][16] rows m (sw16); B is
// [BN][16] rows n (B_NK, sw16) or [16][BN] rows k (sw128).
template <bool A_KM, bool B_NK>
KOKKOS_INLINE_FUNCTION void mma_k16_bf16(float (&acc)[8][8], unsigned const (&a_ld)[4], unsigned const (&b_ld)[2],
                                         unsigned off) {
  unsigned a[4][4], b[4][2];
HEXAMOE_UNROLL
  for (int mi = 0; mi < 4; ++mi) ldsm_x4_at<A_KM>(a[mi], a_ld[mi] + off);
HEXAMOE_UNROLL
  for (int h = 0; h < 2; ++h) {
    unsigned r[4];
    ldsm_x4_at<!B_NK>(r, b_ld[h] + off);
    b[2 * h][0] = r[0];
    b[2 * h][1] = r[1];
    b[2 * h + 1][0] = r[2];
    b[2 * h + 1][1] = r[3];
  }
HEXAMOE_UNROLL
  for (int mi = 0; mi < 4; ++mi)
HEXAMOE_UNROLL
    for (int ni = 0; ni < 4; ++ni)
      mma_bf16(acc[2 * mi][2 * ni], acc[2 * mi][2 * ni + 1], acc[2 * mi + 1][2 * ni], acc[2 * mi + 1][2 * ni + 1],
               a[mi], b[ni][0], b[ni][1]);
}

// Two bf16 (a register of a B fragment: rows k and k + 1 of one column, k in
// the low half) scaled by their rows' scales s0, s1 in float and split into
// bf16 hi + lo, as scale_split does (hi = bf16(s x), lo = bf16(s x - hi),
// both rounded to nearest even).
KOKKOS_INLINE_FUNCTION void scale_split_pair(unsigned r, float s0, float s1, unsigned &hi, unsigned &lo) {
  float const x0 = mul_rn(s0, bfloat16::to_float(static_cast<std::uint16_t>(r & 0xffffu)));
  float const x1 = mul_rn(s1, bfloat16::to_float(static_cast<std::uint16_t>(r >> 16)));
  hi = pack_bf16x2(x0, x1);
  lo = pack_bf16x2(x0 - bfloat16::to_float(static_cast<std::uint16_t>(hi & 0xffffu)),
                   x1 - bfloat16::to_float(static_cast<std::uint16_t>(hi >> 16)));
}

// mma_k16_bf16 for ESTMM's layouts (A [16][BM] rows k, B [16][BN] rows k)
// with B's rows scaled: row k by s[k] (the stage's 16 scales), each product
// split into bf16 hi + lo and both multiplied by the same A fragments, all
// hi products first, as mma_step_bf16 with LO does on the register-staged
// path. Lane 4 g + t holds rows 2t, 2t + 1 (fragment registers 0) and
// 2t + 8, 2t + 9 (registers 1) of B.
KOKKOS_INLINE_FUNCTION void mma_k16_bf16_scaled(float (&acc)[8][8], unsigned const (&a_ld)[4],
                                                unsigned const (&b_ld)[2], unsigned off, float const *s, int tid) {
  unsigned a[4][4], bh[4][2], bl[4][2];
HEXAMOE_UNROLL
  for (int mi = 0; mi < 4; ++mi) ldsm_x4_at<true>(a[mi], a_ld[mi] + off);
  int const t = tid & 3;
  float const s0 = s[2 * t], s1 = s[2 * t + 1], s8 = s[2 * t + 8], s9 = s[2 * t + 9];
HEXAMOE_UNROLL
  for (int h = 0; h < 2; ++h) {
    unsigned r[4];
    ldsm_x4_at<true>(r, b_ld[h] + off);
    scale_split_pair(r[0], s0, s1, bh[2 * h][0], bl[2 * h][0]);
    scale_split_pair(r[1], s8, s9, bh[2 * h][1], bl[2 * h][1]);
    scale_split_pair(r[2], s0, s1, bh[2 * h + 1][0], bl[2 * h + 1][0]);
    scale_split_pair(r[3], s8, s9, bh[2 * h + 1][1], bl[2 * h + 1][1]);
  }
HEXAMOE_UNROLL
  for (int mi = 0; mi < 4; ++mi)
HEXAMOE_UNROLL
    for (int ni = 0; ni < 4; ++ni)
      mma_bf16(acc[2 * mi][2 * ni], acc[2 * mi][2 * ni + 1], acc[2 * mi + 1][2 * ni], acc[2 * mi + 1][2 * ni + 1],
               a[mi], bh[ni][0], bh[ni][1]);
HEXAMOE_UNROLL
  for (int mi = 0; mi < 4; ++mi)
HEXAMOE_UNROLL
    for (int ni = 0; ni < 4; ++ni)
      mma_bf16(acc[2 * mi][2 * ni], acc[2 * mi][2 * ni + 1], acc[2 * mi + 1][2 * ni], acc[2 * mi + 1][2 * ni + 1],
               a[mi], bl[ni][0], bl[ni][1]);
}

// This thread's ldmatrix addresses for mma_k16_bf16 (stage 0; sA, sB the
// shared-state addresses of the A and B tiles).
template <bool A_KM, bool B_NK>
KOKKOS_INLINE_FUNCTION void ldsm_addresses(unsigned (&a_ld)[4], unsigned (&b_ld)[2], unsigned sA, unsigned sB,
                                           int tid) {
  int const lane = tid & 31, warp = tid >> 5;
  int const wm0 = (warp >> 2) * 64, wn0 = (warp & 3) * 32;
  for (int mi = 0; mi < 4; ++mi) {
    int const mb = wm0 + mi * 16;
    int const e = A_KM ? sw128((lane & 7) + ((lane >> 4) << 3), mb + ((lane >> 3) & 1) * 8)
                       : sw16(mb + (lane & 15), (lane >> 4) * 8);
    a_ld[mi] = sA + 2u * static_cast<unsigned>(e);
  }
  for (int h = 0; h < 2; ++h) {
    int const nb = wn0 + h * 16;
    int const e = B_NK ? sw16(nb + (lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8)
                       : sw128((lane & 7) + ((lane >> 3) & 1) * 8, nb + (lane >> 4) * 8);
    b_ld[h] = sB + 2u * static_cast<unsigned>(e);
  }
}

// Float scratch: A as [BKF][LDF] (rows k, columns m), B as [BKF][LDF] (rows k,
// columns n). tf32 tensor cores (values already rounded to tf32) or FMA.
template <Math M>
KOKKOS_INLINE_FUNCTION void step_f32(float (&acc)[8][8], float const *sA, float const *sB, int tid) {
  if constexpr (M == Math::tf32_mma) {
    int const lane = tid & 31, warp = tid >> 5;
    int const g = lane >> 2, t = lane & 3;
    int const wm0 = (warp >> 2) * 64, wn0 = (warp & 3) * 32;
    for (int ks = 0; ks < BKF; ks += 8) {
      unsigned a[4][4], b[4][2];
      float const *r0 = sA + (ks + t) * LDF, *r1 = sA + (ks + t + 4) * LDF;
      for (int mi = 0; mi < 4; ++mi) {
        int const m = wm0 + mi * 16 + g;
        a[mi][0] = float_bits(r0[m]);
        a[mi][1] = float_bits(r0[m + 8]);
        a[mi][2] = float_bits(r1[m]);
        a[mi][3] = float_bits(r1[m + 8]);
      }
      float const *q0 = sB + (ks + t) * LDF, *q1 = sB + (ks + t + 4) * LDF;
      for (int ni = 0; ni < 4; ++ni) {
        int const n = wn0 + ni * 8 + g;
        b[ni][0] = float_bits(q0[n]);
        b[ni][1] = float_bits(q1[n]);
      }
      for (int mi = 0; mi < 4; ++mi)
        for (int ni = 0; ni < 4; ++ni)
          mma_tf32(acc[2 * mi][2 * ni], acc[2 * mi][2 * ni + 1], acc[2 * mi + 1][2 * ni], acc[2 * mi + 1][2 * ni + 1],
                   a[mi], b[ni][0], b[ni][1]);
    }
  } else if constexpr (M == Math::tf32x3_mma) {
    // Scratch holds float32; fragments are split as they are read (b for the
    // whole warp tile, a one 16-row block at a time to bound the registers).
    // For each 16 x 8 block, the three products of a k step of 8 start from
    // zero on the tensor cores (term by term across the four column blocks,
    // so that consecutive tensor-core instructions are independent) and
    // their sum is added to the accumulator in float32, rounded to nearest:
    // the tensor cores' truncating sums never carry a running total.
    int const lane = tid & 31, warp = tid >> 5;
    int const g = lane >> 2, t = lane & 3;
    int const wm0 = (warp >> 2) * 64, wn0 = (warp & 3) * 32;
    for (int ks = 0; ks < BKF; ks += 8) {
      unsigned bh[4][2], bl[4][2];
      float const *q0 = sB + (ks + t) * LDF, *q1 = sB + (ks + t + 4) * LDF;
      for (int ni = 0; ni < 4; ++ni) {
        int const n = wn0 + ni * 8 + g;
        split_tf32(q0[n], bh[ni][0], bl[ni][0]);
        split_tf32(q1[n], bh[ni][1], bl[ni][1]);
      }
      float const *r0 = sA + (ks + t) * LDF, *r1 = sA + (ks + t + 4) * LDF;
      for (int mi = 0; mi < 4; ++mi) {
        int const m = wm0 + mi * 16 + g;
        unsigned ah[4], al[4];
        split_tf32(r0[m], ah[0], al[0]);
        split_tf32(r0[m + 8], ah[1], al[1]);
        split_tf32(r1[m], ah[2], al[2]);
        split_tf32(r1[m + 8], ah[3], al[3]);
        float d[4][4];
        for (int ni = 0; ni < 4; ++ni) mma_tf32_zero(d[ni], al, bh[ni][0], bh[ni][1]);  // small terms first
        for (int ni = 0; ni < 4; ++ni) mma_tf32(d[ni][0], d[ni][1], d[ni][2], d[ni][3], ah, bl[ni][0], bl[ni][1]);
        for (int ni = 0; ni < 4; ++ni) mma_tf32(d[ni][0], d[ni][1], d[ni][2], d[ni][3], ah, bh[ni][0], bh[ni][1]);
        for (int ni = 0; ni < 4; ++ni) {
          acc[2 * mi][2 * ni] += d[ni][0];
          acc[2 * mi][2 * ni + 1] += d[ni][1];
          acc[2 * mi + 1][2 * ni] += d[ni][2];
          acc[2 * mi + 1][2 * ni + 1] += d[ni][3];
        }
      }
    }
  } else {
    int const ty = tid >> 4, tx = tid & 15;
    for (int kk = 0; kk < BKF; ++kk) {
      Float4 const a0 = *reinterpret_cast<Float4 const *>(sA + kk * LDF + ty * 4);
      Float4 const a1 = *reinterpret_cast<Float4 const *>(sA + kk * LDF + 64 + ty * 4);
      Float4 const b0 = *reinterpret_cast<Float4 const *>(sB + kk * LDF + tx * 4);
      Float4 const b1 = *reinterpret_cast<Float4 const *>(sB + kk * LDF + 64 + tx * 4);
      float a[8], b[8];
      for (int q = 0; q < 4; ++q) {
        a[q] = a0.v[q];
        a[4 + q] = a1.v[q];
        b[q] = b0.v[q];
        b[4 + q] = b1.v[q];
      }
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
    }
  }
}

// d[i][ni] += a[s][i] b[s][ni] over both k steps of 8 (s), for each of MG x 4
// blocks of 16 x 8 in turn.
template <int MG>
KOKKOS_INLINE_FUNCTION void mma_tf32_terms(float (&d)[MG][4][4], unsigned const (&a)[2][MG][4],
                                           unsigned const (&b)[2][4][2]) {
HEXAMOE_UNROLL
  for (int s = 0; s < 2; ++s)
HEXAMOE_UNROLL
    for (int i = 0; i < MG; ++i)
HEXAMOE_UNROLL
      for (int ni = 0; ni < 4; ++ni)
        mma_tf32(d[i][ni][0], d[i][ni][1], d[i][ni][2], d[i][ni][3], a[s][i], b[s][ni][0], b[s][ni][1]);
}

// One staged k step (BKF = 16) of the 3xtf32 tile for the kernels that keep
// one team on a multiprocessor (up to 255 registers a thread: the ESMM). As
// the tf32x3 case of step_f32 below, with two changes in the schedule:
// - each 16 x 8 block sums the three products over the whole k step of 16 on
//   the tensor cores before the float32 add that rounds to nearest (half the
//   adds of step_f32's k steps of 8; the truncating sums still start from
//   zero at every staged step), small terms first: lo x hi' over both k
//   steps of 8, then hi x lo', then hi x hi';
// - two of the warp's four 16-row blocks at a time, so that eight
//   independent tensor-core instructions follow one another.
// Measured on the H200 (docs/PERFORMANCE.md): the layer's float32 forward
// 2-3% faster and forward+backward 3-4%, and its output closer to float64
// (4.5e-7 against 5.0e-7 relative on Swin-MoE-S stage 3).
KOKKOS_INLINE_FUNCTION void step_tf32x3_k16(float (&acc)[8][8], float const *sA, float const *sB, int tid) {
  constexpr int MG = 2;
  int const lane = tid & 31, warp = tid >> 5;
  int const g = lane >> 2, t = lane & 3;
  int const wm0 = (warp >> 2) * 64, wn0 = (warp & 3) * 32;
  unsigned bh[2][4][2], bl[2][4][2];
HEXAMOE_UNROLL
  for (int s = 0; s < 2; ++s) {
    float const *q0 = sB + (8 * s + t) * LDF, *q1 = sB + (8 * s + t + 4) * LDF;
HEXAMOE_UNROLL
    for (int ni = 0; ni < 4; ++ni) {
      int const n = wn0 + ni * 8 + g;
      split_tf32(q0[n], bh[s][ni][0], bl[s][ni][0]);
      split_tf32(q1[n], bh[s][ni][1], bl[s][ni][1]);
    }
  }
HEXAMOE_UNROLL
  for (int m0 = 0; m0 < 4; m0 += MG) {
    unsigned ah[2][MG][4], al[2][MG][4];
HEXAMOE_UNROLL
    for (int s = 0; s < 2; ++s) {
      float const *r0 = sA + (8 * s + t) * LDF, *r1 = sA + (8 * s + t + 4) * LDF;
HEXAMOE_UNROLL
      for (int i = 0; i < MG; ++i) {
        int const m = wm0 + (m0 + i) * 16 + g;
        split_tf32(r0[m], ah[s][i][0], al[s][i][0]);
        split_tf32(r0[m + 8], ah[s][i][1], al[s][i][1]);
        split_tf32(r1[m], ah[s][i][2], al[s][i][2]);
        split_tf32(r1[m + 8], ah[s][i][3], al[s][i][3]);
      }
    }
    float d[MG][4][4];
HEXAMOE_UNROLL
    for (int i = 0; i < MG; ++i)
HEXAMOE_UNROLL
      for (int ni = 0; ni < 4; ++ni) mma_tf32_zero(d[i][ni], al[0][i], bh[0][ni][0], bh[0][ni][1]);
HEXAMOE_UNROLL
    for (int i = 0; i < MG; ++i)
HEXAMOE_UNROLL
      for (int ni = 0; ni < 4; ++ni)
        mma_tf32(d[i][ni][0], d[i][ni][1], d[i][ni][2], d[i][ni][3], al[1][i], bh[1][ni][0], bh[1][ni][1]);
    mma_tf32_terms(d, ah, bl);
    mma_tf32_terms(d, ah, bh);
HEXAMOE_UNROLL
    for (int i = 0; i < MG; ++i)
HEXAMOE_UNROLL
      for (int ni = 0; ni < 4; ++ni) {
        int const mi = m0 + i;
        acc[2 * mi][2 * ni] += d[i][ni][0];
        acc[2 * mi][2 * ni + 1] += d[i][ni][1];
        acc[2 * mi + 1][2 * ni] += d[i][ni][2];
        acc[2 * mi + 1][2 * ni + 1] += d[i][ni][3];
      }
  }
}

// Store four loaded values into float scratch (rounded to tf32 when asked):
// along a row (contiguous) or down a column (transposing).
template <Math M>
KOKKOS_INLINE_FUNCTION void put4_row(float *dst, Float4 v) {
  if constexpr (M == Math::tf32_mma)
    for (int j = 0; j < 4; ++j) v.v[j] = to_tf32(v.v[j]);
  *reinterpret_cast<Float4 *>(dst) = v;
}
template <Math M>
KOKKOS_INLINE_FUNCTION void put4_col(float *dst, Float4 const &v) {
  for (int j = 0; j < 4; ++j) dst[j * LDF] = M == Math::tf32_mma ? to_tf32(v.v[j]) : v.v[j];
}

}  // namespace dev
}  // namespace detail
}  // namespace hexamoe
