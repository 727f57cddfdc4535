// Wgmma.hpp: Hopper's warpgroup tensor-core instructions (wgmma) for the bf16
// expert GEMMs, behind the same team kernels as the mma.sync path.
//
// wgmma needs the architecture-specific target sm_90a. A CUDA Kokkos built for
// Hopper compiles for sm_90; a build that also generates sm_90a machine code
// (docs/GPU.md: NVCC_APPEND_FLAGS=-gencode=arch=compute_90a,code=sm_90a) gets
// this path in that pass, which the driver runs on compute capability 9.0;
// every other pass keeps mma.sync. wgmma_compiled() says, in device code,
// which one the running machine code has (dev::wgmma_in_use() asks the device).
//
// Layouts (team scratch, one k = 16 stage): A is [128][16] rows m, 32 bytes
// a row with the 32-byte swizzle (sw16 in TileGemm.hpp): the canonical
// K-major layout of wgmma with 8-row atoms of 256 bytes. B is either
// [128][16] rows n likewise (K-major, a transposed W), or two halves of
// [16][64] rows k, 128 bytes a row with the 128-byte swizzle (N-major, W as
// stored): atoms of 8 k rows x 64 n of 1024 bytes, the halves 2048 bytes
// apart. Stages start at multiples of 1024 bytes.
//
// Accumulators: each warpgroup (warps 4 g .. 4 g + 3) owns rows 64 g .. 64 g
// + 63 of the 128 x 128 tile; thread (warp w, lane l) holds rows
// 64 g + 16 (w % 4) + l / 4 + 8 (i % 2) and columns 32 (i / 2) + 8 (j / 2) +
// 2 (l % 4) + j % 2 in acc[i][j] (wgmma_acc_row / wgmma_acc_col).
#pragma once

#include <Kokkos_Core.hpp>

#include <cstdint>

#if defined(KOKKOS_ENABLE_CUDA) && defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HEXAMOE_WGMMA 1
#endif

namespace hexamoe {
namespace detail {
namespace dev {

// Whether this pass of the device compiler emits wgmma (false on the host).
KOKKOS_INLINE_FUNCTION constexpr bool wgmma_compiled() {
#if defined(HEXAMOE_WGMMA)
  return true;
#else
  return false;
#endif
}

KOKKOS_INLINE_FUNCTION int wgmma_acc_row(int tid, int i) {
  return (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + ((tid & 31) >> 2) + (i & 1) * 8;
}
KOKKOS_INLINE_FUNCTION int wgmma_acc_col(int tid, int i, int j) {
  return (i >> 1) * 32 + (j >> 1) * 8 + (tid & 3) * 2 + (j & 1);
}

// Shared-memory matrix descriptor: start address, leading and stride byte
// offsets (16-byte units), swizzle (1: 128 bytes, 2: 64, 3: 32).
KOKKOS_INLINE_FUNCTION std::uint64_t gmma_desc(unsigned addr, unsigned lbo, unsigned sbo, unsigned swizzle) {
  return static_cast<std::uint64_t>((addr & 0x3FFFFu) >> 4) |
         (static_cast<std::uint64_t>((lbo >> 4) & 0x3FFFu) << 16) |
         (static_cast<std::uint64_t>((sbo >> 4) & 0x3FFFu) << 32) | (static_cast<std::uint64_t>(swizzle) << 62);
}

// Ordinary (or cp.async) writes to shared memory become visible to the
// tensor cores' asynchronous reads (then a barrier). (The release-only form,
// fence.proxy.async::generic.release.sync_restrict::shared::cta.cluster,
// compiles to the same two instructions for sm_90a with CUDA 13.)
KOKKOS_INLINE_FUNCTION void fence_proxy_async() {
#if defined(HEXAMOE_WGMMA)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
KOKKOS_INLINE_FUNCTION void wgmma_fence() {
#if defined(HEXAMOE_WGMMA)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
KOKKOS_INLINE_FUNCTION void wgmma_commit() {
#if defined(HEXAMOE_WGMMA)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Wait until at most N committed groups of this warpgroup are pending. The
// accumulators are named so that the compiler neither reads nor moves them
// before the instructions that write them have finished.
template <int N>
KOKKOS_INLINE_FUNCTION void wgmma_wait(float (&d)[8][8]) {
#if defined(HEXAMOE_WGMMA)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
#else
  (void)d;
#endif
}

// d (64 x 128 of this warpgroup, float) += A (64 x 16, bf16) B (16 x 128,
// bf16), both from shared memory; TB: B is N-major (W as stored).
// The descriptors come as 32-bit halves: a stage's offset changes only the
// low half (the start address field), so that the loop adds 32-bit words.
template <int TB>
KOKKOS_INLINE_FUNCTION void wgmma_m64n128k16_bf16(float (&d)[8][8], unsigned da_lo, unsigned da_hi, unsigned db_lo,
                                                  unsigned db_hi) {
#if defined(HEXAMOE_WGMMA)
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %69, 0;\n"
      "mov.b64 da, {%64, %65};\nmov.b64 db, {%66, %67};\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, "
      "%45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "da, db, p, 1, 1, 0, %68;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][2]),
        "+f"(d[1][3]), "+f"(d[0][4]), "+f"(d[0][5]), "+f"(d[1][4]), "+f"(d[1][5]), "+f"(d[0][6]), "+f"(d[0][7]),
        "+f"(d[1][6]), "+f"(d[1][7]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[2][2]),
        "+f"(d[2][3]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[2][4]), "+f"(d[2][5]), "+f"(d[3][4]), "+f"(d[3][5]),
        "+f"(d[2][6]), "+f"(d[2][7]), "+f"(d[3][6]), "+f"(d[3][7]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[5][0]),
        "+f"(d[5][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[4][4]), "+f"(d[4][5]),
        "+f"(d[5][4]), "+f"(d[5][5]), "+f"(d[4][6]), "+f"(d[4][7]), "+f"(d[5][6]), "+f"(d[5][7]), "+f"(d[6][0]),
        "+f"(d[6][1]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][2]), "+f"(d[7][3]),
        "+f"(d[6][4]), "+f"(d[6][5]), "+f"(d[7][4]), "+f"(d[7][5]), "+f"(d[6][6]), "+f"(d[6][7]), "+f"(d[7][6]),
        "+f"(d[7][7])
      : "r"(da_lo), "r"(da_hi), "r"(db_lo), "r"(db_hi), "n"(TB), "r"(1));
#else
  (void)d, (void)da_lo, (void)da_hi, (void)db_lo, (void)db_hi;
#endif
}

// Two accumulator blocks (a warpgroup's 128 rows: two m64 products).
template <int N>
KOKKOS_INLINE_FUNCTION void wgmma_wait(float (&d0)[8][8], float (&d1)[8][8]) {
#if defined(HEXAMOE_WGMMA)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) asm volatile("" : "+f"(d0[i][j]), "+f"(d1[i][j])::"memory");
#else
  (void)d0, (void)d1;
#endif
}

// --- the warp-specialized kernel's synchronization (sm_90a) ------------------
// Transaction barriers in shared memory (mbarrier; addresses in the shared
// state space) and the per-warpgroup register budget (setmaxnreg: the
// copying warpgroup gives registers to the two that multiply).

KOKKOS_INLINE_FUNCTION void mbar_init(unsigned bar, unsigned count) {
#if defined(HEXAMOE_WGMMA)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  (void)bar, (void)count;
#endif
}
KOKKOS_INLINE_FUNCTION void mbar_arrive(unsigned bar) {
#if defined(HEXAMOE_WGMMA)
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
#else
  (void)bar;
#endif
}
// Arrive and expect `bytes` more of tensor-copy transactions in this phase.
KOKKOS_INLINE_FUNCTION void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
#if defined(HEXAMOE_WGMMA)
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
               : "memory");
#else
  (void)bar, (void)bytes;
#endif
}
// Tensor copies (TMA) of a box of a 2- or 3-dimensional tensor map (the
// generic address of a __grid_constant__ CUtensorMap) to shared memory,
// completing on barrier `bar`; coordinates innermost first, elements past
// the tensor's extents read as zero.
KOKKOS_INLINE_FUNCTION void tma_load_2d(unsigned dst, void const *map, int c0, int c1, unsigned bar) {
#if defined(HEXAMOE_WGMMA)
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)bar;
#endif
}
KOKKOS_INLINE_FUNCTION void tma_load_3d(unsigned dst, void const *map, int c0, int c1, int c2, unsigned bar) {
#if defined(HEXAMOE_WGMMA)
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)c2, (void)bar;
#endif
}
// Wait for the completion of the barrier's phase of the given parity (the
// phase before the first counts as complete for parity 1).
KOKKOS_INLINE_FUNCTION void mbar_wait(unsigned bar, unsigned parity) {
#if defined(HEXAMOE_WGMMA)
  asm volatile(
      "{\n.reg .pred p;\nHEXAMOE_MBAR_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra HEXAMOE_MBAR_WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  (void)bar, (void)parity;
#endif
}
template <int R>
KOKKOS_INLINE_FUNCTION void regs_dec() {
#if defined(HEXAMOE_WGMMA)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}
template <int R>
KOKKOS_INLINE_FUNCTION void regs_inc() {
#if defined(HEXAMOE_WGMMA)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}

// Whether the machine code that `space` runs has the wgmma path (asks the
// device once per process: the driver picks sm_90a code over sm_90 only
// where both are present and the device is compute capability 9.0).
template <class ExecutionSpace>
int wgmma_probe(ExecutionSpace const &space) {
  Kokkos::View<int, typename ExecutionSpace::memory_space> v("hexamoe::wgmma_probe");
  Kokkos::parallel_for(
      "hexamoe::wgmma_probe", Kokkos::RangePolicy<ExecutionSpace>(space, 0, 1),
      KOKKOS_LAMBDA(int) { v() = wgmma_compiled() ? 1 : 0; });
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  return h();
}
template <class ExecutionSpace>
bool wgmma_in_use(ExecutionSpace const &space) {
  static int const in_use = wgmma_probe(space);
  return in_use == 1;
}

}  // namespace dev
}  // namespace detail
}  // namespace hexamoe
