// EsmmHopper.hpp: the bf16 ESMM on Hopper (sm_90a machine code) as a
// persistent, warp-specialized kernel.
//
// The team kernel of Esmm.hpp (two teams of 256 threads per multiprocessor,
// 40 KB of scratch each, what a Kokkos TeamPolicy grants) copies and
// multiplies with the same warps, one k = 16 step per barrier. Here one block
// of 384 threads runs per multiprocessor with 206 KB of shared memory:
//
// - warpgroup 2 copies. Its first thread fills six stages of k = 64 with
//   tensor copies (TMA) of W and of A's 128-row box, A's rows being the
//   sorted positions (h W2 in the forward, dx = dz1 W1^T in the backward,
//   and x W1 from the layer's sorted copy of x's rows, see WsGather). Each
//   stage's transaction barrier ("full") completes when its bytes have
//   landed; the thread waits for a stage's "empty" barrier before refilling
//   it. Rows gathered through the routing index (dz1 = (g dy) W2^T) keep the
//   team kernel. Its warps 1 to 3 (the helpers) write each tile's header
//   and tables (the rows' flat ids, scales and gates, the columns' bias)
//   into a ring of four, for the tile's epilogue: the multiplying warps
//   then read no device memory before their stores (Nsight Compute: the
//   epilogue's bias loads, issued a row block at a time, stalled it).
// - warpgroups 0 and 1 multiply: each owns whole 128 x 128 output tiles (the
//   league of tiles is dealt round-robin to the blocks, and a block's tiles
//   alternate between its two warpgroups), two m64n128k16 wgmma a k = 16
//   step (also for tiles of 64 rows or fewer, whose second block is zeros:
//   a branch there makes ptxas serialize the wgmma), float32 accumulators
//   in registers (setmaxnreg gives them 224 registers a thread, the copying
//   warpgroup 56); then the fused epilogue of Esmm.hpp from the registers.
//   While one warpgroup runs its epilogue the other multiplies, so the
//   tensor cores do not wait for epilogues.
//
// A stage of A (and of W^T) is [128][64] K-major, rows of 128 bytes with
// the 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r % 8), the
// pattern a tensor copy writes; 8-row atoms of 1024 bytes); a k = 16 step
// starts 32 bytes further along the rows. A stage of W (N-major) is two
// halves of [64][64] (k rows of 64 columns, 128 bytes, the same swizzle),
// 8192 bytes apart; a k = 16 step starts 16 rows further down.
#pragma once

#include "EnvSwitch.hpp"
#include "TileGemm.hpp"
#include "Wgmma.hpp"

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

// (Kokkos 4 for its instance streams, CUDA 12 for tensor maps.)
#if defined(KOKKOS_ENABLE_CUDA) && KOKKOS_VERSION >= 40000 && defined(CUDART_VERSION) && CUDART_VERSION >= 12000
#define HEXAMOE_ESMM_WS 1
#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled (header only)
#endif

namespace hexamoe {
namespace detail {
namespace dev {

constexpr int WS_STAGES = 6;          // stages of k = 64 in flight
constexpr int WS_KS = 64;             // k of a stage
constexpr int WS_THREADS = 384;       // two multiplying warpgroups + one copying
constexpr int WS_HELPERS = 96;        // the copying warpgroup's warps 1 to 3: the tiles' information
constexpr int WS_INFOS = 4;           // tiles' information in the ring (even: a slot serves one warpgroup)
constexpr int WS_MAX_EXPERTS = 1024;  // experts whose tile counts fit the block's table
constexpr unsigned WS_STAGE_BYTES = BM * WS_KS * 2;  // one operand's stage: 128 x 64 bf16, 16 KB
constexpr unsigned WS_INFO_BYTES = 32u + 4u * (3u * BM + BN);  // WsTileInfo (float32 accumulation)
constexpr std::size_t WS_SMEM = 2u * WS_STAGES * WS_STAGE_BYTES + 16u * WS_STAGES + 16u + 16u * WS_INFOS +
                                WS_INFOS * WS_INFO_BYTES + 4u * (WS_MAX_EXPERTS + 1) + 1024u;

// HEXAMOE_ESMM_WS=0 keeps the team kernel on Hopper (comparison runs).
inline bool parse_esmm_ws(char const *v) { return parse_env_switch("HEXAMOE_ESMM_WS", v); }
// Gathered rows of A (HEXAMOE_ESMM_WS_GATHER): "sort" (the default): the
// layer copies the rows it gathers into sorted order first (MoeLayer's x W1,
// into a buffer it holds anyway; esmm_sorts_gathered_rows in Esmm.hpp) and
// this kernel reads the copy as one box a stage; "team": the team kernel
// reads them through the index. Measured on an H100 (docs/PERFORMANCE.md),
// swinS-s3-top1 x W1: from the sorted copy 89 us (+ 10 us for the copy),
// the team kernel 110 us; this kernel gathering the rows itself was slower
// (cp.async 121 us, a tensor copy a row 341 us) and was removed.
enum class WsGather { sort, team };
inline WsGather parse_ws_gather(char const *v) {
  std::string const s = v == nullptr ? "" : v;
  if (s.empty() || s == "sort") return WsGather::sort;
  if (s == "team") return WsGather::team;
  throw std::invalid_argument("HEXAMOE_ESMM_WS_GATHER='" + s + "' is not sort or team");
}
// Both settings are read once from the environment (tests set them).
inline WsGather &ws_gather() {
  static WsGather g = parse_ws_gather(std::getenv("HEXAMOE_ESMM_WS_GATHER"));
  return g;
}
inline bool &esmm_ws_enabled() {
  static bool on = parse_esmm_ws(std::getenv("HEXAMOE_ESMM_WS"));
  return on;
}

// At most this many blocks when positive (tests: a few blocks run many
// tiles each, so that small problems wrap the stage ring and alternate the
// warpgroups).
inline int &ws_blocks_override() {
  static int v = 0;
  return v;
}

// The body; DK is Esmm.hpp's EsmmDeviceKernel (bf16 operands). Device code
// of the sm_90a pass only: elsewhere the kernel is empty and never launched
// (wgmma_in_use).
// A tile's header and row tables in shared memory, filled by the copying
// warpgroup's helper warps ahead of the tile's epilogue.
template <class Acc>
struct WsTileInfo {
  int e, p0, rows, c0, cols, pad[3];
  int flat[BM];   // flat assignment id of each of the tile's rows (0 past them)
  Acc scale[BM];  // the row's scale (0 past the rows)
  Acc gate[BM];   // the gate of a token's output (1 without one)
  Acc bias[BN];   // bias of each of the tile's columns (0 without one)
};

// The body; DK is Esmm.hpp's EsmmDeviceKernel (bf16 operands, A's rows the
// sorted positions). Device code of the sm_90a pass only: elsewhere the
// kernel is empty and never launched (wgmma_in_use).
template <class DK>
KOKKOS_INLINE_FUNCTION void esmm_ws_body(DK const &f, char *smem_raw, int tid, int block, int blocks,
                                         void const *map_a, void const *map_b) {
#if defined(HEXAMOE_WGMMA)
  constexpr int S = WS_STAGES;
  constexpr int NI = WS_INFOS;
  constexpr unsigned SB = WS_STAGE_BYTES;
  using Acc = typename DK::Acc;
  using Info = WsTileInfo<Acc>;
  static_assert(sizeof(Info) == WS_INFO_BYTES, "WS_INFO_BYTES: the tile information's size");
  auto const &k = f.k;
  auto const &R = k.R;
  unsigned const raw = smem_u32(smem_raw);
  unsigned const pad = (1024u - (raw & 1023u)) & 1023u;
  char *const smem = smem_raw + pad;
  unsigned const sA = raw + pad, sB = sA + S * SB;
  unsigned const full = sB + S * SB, empty = full + 8u * S, turn = empty + 8u * S, ifull = turn + 16u,
                 iempty = ifull + 8u * NI;
  Info *const infos = reinterpret_cast<Info *>(smem + 2u * S * SB + 16u * S + 16u + 16u * NI);
  int *const tstart = reinterpret_cast<int *>(infos + NI);

  // The experts' first tiles (prefix sums of their tile counts) and the barriers.
  int const E = R.num_experts;
  for (int i = tid; i < E; i += WS_THREADS) tstart[i + 1] = (R.counts(i) + BM - 1) / BM;
  if (tid < S) {
    mbar_init(full + 8u * tid, 1u);  // the tensor copies' thread
    mbar_init(empty + 8u * tid, 1u);
  }
  if (tid < NI) {
    mbar_init(ifull + 8u * tid, WS_HELPERS);  // every helper thread
    mbar_init(iempty + 8u * tid, 128u);       // every thread of the tile's warpgroup
  }
  if (tid < 2) mbar_init(turn + 8u * tid, 1u);
  __syncthreads();
  if (tid == 0) {
    tstart[0] = 0;
    for (int i = 0; i < E; ++i) tstart[i + 1] += tstart[i];
  }
  __syncthreads();
  int const col_tiles = k.col_tiles;
  int const units = tstart[E] * col_tiles;
  int const K = k.K;
  int const nk = (K + WS_KS - 1) / WS_KS;
  // Unit u: column tile u % col_tiles of row tile u / col_tiles (the row
  // tiles of expert 0 first, then of expert 1, ...).
  auto decode = [&](int u, int &e, int &p0, int &rows, int &c0, int &cols) {
    int const ct = u % col_tiles;
    int const tile = u / col_tiles;
    e = 0;
    while (tstart[e + 1] <= tile) ++e;
    p0 = R.offsets(e) + (tile - tstart[e]) * BM;
    int const left = R.counts(e) - (tile - tstart[e]) * BM;
    rows = left < BM ? left : BM;
    c0 = ct * BN;
    cols = (k.N - c0) < BN ? (k.N - c0) : BN;
  };

  if (tid >= 256) {
    // The copying warpgroup. Its first thread issues the tensor copies of W
    // and A into the stages and announces their bytes. Its warps 1 to 3
    // (the helpers) fill each tile's header and row tables (rows' flat ids,
    // scales and gates, the columns' bias) in a ring of NI, so that the
    // multiplying warpgroups read no device memory before their stores.
    regs_dec<56>();
    int const pt = tid - 256;
    if (pt == 0) {
      int s = 0;  // the block's stage count
      for (int u = block; u < units; u += blocks) {
        int e, p0, rows, c0, cols;
        decode(u, e, p0, rows, c0, cols);
        (void)rows, (void)cols;
        for (int j = 0; j < nk; ++j, ++s) {
          int const slot = s % S;
          int const k0 = j * WS_KS;
          mbar_wait(empty + 8u * slot, ((s / S) & 1) ^ 1);
          unsigned const dA = sA + slot * SB, dB = sB + slot * SB, bar = full + 8u * slot;
          mbar_arrive_expect_tx(bar, 2u * SB);
          if constexpr (DK::trans_w) {
            tma_load_3d(dB, map_b, k0, c0, e, bar);  // W^T [e][c0 .. c0 + 127][k0 .. k0 + 63]
          } else {
            tma_load_3d(dB, map_b, c0, k0, e, bar);  // W [e][k0 .. k0 + 63][c0 .. c0 + 63], then the next 64 columns
            tma_load_3d(dB + SB / 2, map_b, c0 + 64, k0, e, bar);
          }
          tma_load_2d(dA, map_a, k0, p0, bar);  // rows p0 .. p0 + 127
        }
      }
    } else if (pt >= 32) {
      int const h = pt - 32;
      bool const gated = k.ep.token_gate.data() != nullptr;
      int i = 0;
      for (int u = block; u < units; u += blocks, ++i) {
        int const slot = i % NI;
        mbar_wait(iempty + 8u * slot, ((i / NI) & 1) ^ 1);  // the tile NI before has left the slot
        Info &in = infos[slot];
        int e, p0, rows, c0, cols;
        decode(u, e, p0, rows, c0, cols);
        if (h == 0) in.e = e, in.p0 = p0, in.rows = rows, in.c0 = c0, in.cols = cols;
        for (int r = h; r < BM; r += WS_HELPERS) {
          int const flat = r < rows ? R.sorted_flat(p0 + r) : 0;
          in.flat[r] = flat;
          in.scale[r] = r < rows ? k.x.scale(flat) : Acc(0);
          in.gate[r] = r < rows && gated ? k.ep.token_gate(flat) : Acc(1);
          in.bias[r] = k.has_bias && r < cols ? to_acc<Acc>(k.bias(e, c0 + r)) : Acc(0);
        }
        mbar_arrive(ifull + 8u * slot);  // (release: the consumers' wait acquires these writes)
      }
    }
    return;
  }

  // The multiplying warpgroups.
  regs_inc<224>();
  int const w = tid >> 7, t = tid & 127;
  std::uint64_t const da = gmma_desc(sA, 16u, 1024u, 1u);
  std::uint64_t const db = DK::trans_w ? gmma_desc(sB, 16u, 1024u, 1u) : gmma_desc(sB, SB / 2, 1024u, 1u);
  // Start-address steps (16-byte units) of a k = 16 block within a stage:
  // 32 bytes along the 128-byte rows of A and W^T; 16 rows of 128 bytes
  // down W's two halves. A's rows 64..127 start 8192 bytes in.
  constexpr unsigned a_k = 2u, b_k = DK::trans_w ? 2u : 128u, a_half = 512u;
  unsigned const da_lo = static_cast<unsigned>(da), da_hi = static_cast<unsigned>(da >> 32);
  unsigned const db_lo = static_cast<unsigned>(db), db_hi = static_cast<unsigned>(db >> 32);
  // The warpgroups take turns at the main loop: a tile's waits for its
  // stages begin only once the block's previous tile (the other
  // warpgroup's) has passed all of its own, so that no wait is ever a phase
  // ahead of its barrier (a parity wait cannot tell phase n from n - 2).
  // turn[w] completes its phase n when the other warpgroup has passed the
  // stage waits of its n-th tile. (The ring of tile information holds an
  // even count NI: slot i % NI last held tile i - NI, this warpgroup's.)
  static_assert(NI % 2 == 0, "WS_INFOS: each slot serves one warpgroup");
  int s = 0, i = 0, n = 0;
  for (int u = block; u < units; u += blocks, ++i) {
    if ((i & 1) != w) {  // the other warpgroup's tile
      s += nk;
      continue;
    }
    float acc[2][8][8];
HEXAMOE_UNROLL
    for (int h = 0; h < 2; ++h)
HEXAMOE_UNROLL
      for (int a = 0; a < 8; ++a)
HEXAMOE_UNROLL
        for (int b = 0; b < 8; ++b) acc[h][a][b] = 0.f;
    if (w == 1 || n > 0) mbar_wait(turn + 8u * w, static_cast<unsigned>(w == 1 ? n : n - 1) & 1u);
    if (nk == 0 && t == 0) mbar_arrive(turn + 8u * (1 - w));
    for (int j = 0; j < nk; ++j, ++s) {
      int const slot = s % S;
      mbar_wait(full + 8u * slot, (s / S) & 1);
      if (j == nk - 1 && t == 0) mbar_arrive(turn + 8u * (1 - w));  // the other warpgroup's turn
      unsigned const off = (slot * SB) >> 4;
      wgmma_fence();
HEXAMOE_UNROLL
      for (int jj = 0; jj < 4; ++jj) {
        wgmma_m64n128k16_bf16<DK::trans_w ? 0 : 1>(acc[0], da_lo + off + jj * a_k, da_hi, db_lo + off + jj * b_k,
                                                   db_hi);
        wgmma_m64n128k16_bf16<DK::trans_w ? 0 : 1>(acc[1], da_lo + off + jj * a_k + a_half, da_hi,
                                                   db_lo + off + jj * b_k, db_hi);
      }
      wgmma_commit();
      wgmma_wait<1>(acc[0], acc[1]);  // the product of stage s - 1 is done: release its slot
      if (j > 0 && t == 0) mbar_arrive(empty + 8u * ((s - 1) % S));
    }
    wgmma_wait<0>(acc[0], acc[1]);
    if (nk > 0 && t == 0) mbar_arrive(empty + 8u * ((s - 1) % S));
    int const slot = i % NI;
    mbar_wait(ifull + 8u * slot, (i / NI) & 1);
    Info const &in = infos[slot];
    f.epilogue_ws(acc[0], acc[1], in.flat, in.scale, in.gate, in.bias, in.e, in.p0, in.rows, in.c0, in.cols, t);
    mbar_arrive(iempty + 8u * slot);  // this thread is done with the slot
    ++n;
  }
#else
  (void)f, (void)smem_raw, (void)tid, (void)block, (void)blocks, (void)map_a, (void)map_b;
#endif
}

#if defined(HEXAMOE_ESMM_WS)

// The tensor maps of a launch: A (where its rows are the sorted positions)
// and W.
struct WsMaps {  // (CUtensorMap carries its own alignment)
  CUtensorMap a, b;
};

template <class DK>
__global__ void __launch_bounds__(WS_THREADS, 1)
    esmm_ws_kernel(__grid_constant__ DK const f, __grid_constant__ WsMaps const maps) {
  extern __shared__ __align__(16) char esmm_ws_smem[];
  esmm_ws_body(f, esmm_ws_smem, static_cast<int>(threadIdx.x), static_cast<int>(blockIdx.x),
               static_cast<int>(gridDim.x), &maps.a, &maps.b);
}

// cuTensorMapEncodeTiled, from the driver through the runtime (no link to
// the driver library).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 const fn = [] {
    void *p = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    cudaError_t const err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
#else
    cudaError_t const err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
    if (err != cudaSuccess || q != cudaDriverEntryPointSuccess || p == nullptr)
      throw std::runtime_error("hexamoe: the CUDA driver offers no cuTensorMapEncodeTiled (tensor copies)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A bf16 tensor map of `rank` dimensions (innermost first; strides in bytes
// of dimensions 1..rank-1), boxes of 128-byte rows with the 128-byte swizzle.
inline void encode_bf16_map(CUtensorMap *m, void const *base, cuuint32_t rank, cuuint64_t const *dims,
                            cuuint64_t const *strides, cuuint32_t const *box, char const *what) {
  cuuint32_t const es[3] = {1, 1, 1};
  CUresult const r = tensor_map_encoder()(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, rank, const_cast<void *>(base), dims,
                                          strides, box, es, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw std::runtime_error(std::string("hexamoe: cannot describe ") + what + " for tensor copies (CUresult " +
                             std::to_string(static_cast<int>(r)) + ")");
}

// One block per multiprocessor (at most `units_bound` blocks) on space's
// stream; A's rows are the sorted positions.
template <class DK>
void launch_esmm_ws(Kokkos::Cuda const &space, std::string const &label, DK const &f, int units_bound) {
  if (units_bound <= 0) return;
  WsMaps maps{};
  auto const &w = f.k.w;
  {
    cuuint64_t const dims[3] = {w.extent(2), w.extent(1), w.extent(0)};
    cuuint64_t const strides[2] = {w.stride_1() * 2u, w.stride_0() * 2u};
    cuuint32_t const box[3] = {64u, DK::trans_w ? 128u : 64u, 1u};
    encode_bf16_map(&maps.b, w.data(), 3, dims, strides, box, "the expert weights");
  }
  {
    auto const &x = f.k.x.rows;
    cuuint64_t const dims[2] = {x.extent(1), x.extent(0)};
    cuuint64_t const strides[1] = {x.stride_0() * 2u};
    cuuint32_t const box[2] = {64u, 128u};
    encode_bf16_map(&maps.a, x.data(), 2, dims, strides, box, "the sorted rows");
  }
  auto kernel = esmm_ws_kernel<DK>;
  // Opting into more shared memory is per kernel and device (a process may
  // drive several devices): once for each device this kernel meets.
  static std::uint64_t opted = 0;
  int const dev_id = space.cuda_device();
  std::uint64_t const bit = dev_id >= 0 && dev_id < 64 ? std::uint64_t(1) << dev_id : 0;
  if (bit == 0 || (opted & bit) == 0) {
    cudaError_t const err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(WS_SMEM));
    if (err != cudaSuccess)
      throw std::runtime_error("hexamoe: " + label + ": cannot give a block " + std::to_string(WS_SMEM) +
                               " bytes of shared memory: " + cudaGetErrorString(err));
    opted |= bit;
  }
  int const sms = space.cuda_device_prop().multiProcessorCount;
  int blocks = units_bound < sms ? units_bound : sms;
  if (ws_blocks_override() > 0 && ws_blocks_override() < blocks) blocks = ws_blocks_override();
  std::uint64_t kid = 0;
  bool const tools = Kokkos::Tools::profileLibraryLoaded();
  if (tools) Kokkos::Tools::beginParallelFor(label, Kokkos::Tools::Experimental::device_id(space), &kid);
  kernel<<<blocks, WS_THREADS, WS_SMEM, space.cuda_stream()>>>(f, maps);
  cudaError_t const err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error("hexamoe: " + label + ": launch failed: " + cudaGetErrorString(err));
  if (tools) Kokkos::Tools::endParallelFor(kid);
}

#endif

}  // namespace dev
}  // namespace detail
}  // namespace hexamoe
