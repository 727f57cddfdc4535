// WarpEmulation.hpp: a host emulation of one CUDA team of 256 threads (eight
// warps, the router's tensor-core team) for kernels written against the warp
// operations of core/RouterMma.hpp (rank, league, barrier, fence,
// atomic_inc, load_cg, shfl_xor, mma m16n8k8 tf32), so that tests check the
// tensor-core kernel's fragment layouts, shuffles and reductions without a
// GPU. One std::thread per lane; every exchange is a
// barrier. The mma follows the PTX ISA's fragment layouts for
// mma.m16n8k8.row.col.f32.tf32.tf32.f32 and reads its operands as the
// hardware does (the top 19 bits of each 32-bit pattern); products of tf32
// values are exact in float, summed in k order onto the accumulator.
#pragma once

#include "core/RouterMma.hpp"

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

namespace hexamoe::test {

class EmuBarrier {
 public:
  explicit EmuBarrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    long const gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_;
  int count_ = 0;
  long gen_ = 0;
};

struct EmuWarp {
  EmuBarrier bar{32};
  unsigned a[32][4] = {};
  unsigned b[32][2] = {};
  unsigned x[32] = {};
};

struct EmuTeam {
  static constexpr int threads = detail::router_mma_team_threads;
  EmuBarrier bar{threads};
  EmuWarp warp[threads / 32];
};

inline float tf32_operand(unsigned bits) {
  bits &= 0xffffe000u;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct EmuWarpOps {
  EmuTeam *team;
  int tid;
  int league_rank;
  int league_count;

  int rank() const { return tid; }
  int league() const { return league_rank; }
  int league_size() const { return league_count; }
  void barrier() const { team->bar.wait(); }
  void fence() const { std::atomic_thread_fence(std::memory_order_seq_cst); }
  unsigned atomic_inc(unsigned *p) const { return __atomic_fetch_add(p, 1u, __ATOMIC_SEQ_CST); }
  // Another team's value (after the fence): a plain load on the host.
  template <class V>
  V load_cg(V const *p) const {
    return *p;
  }
  // A 32-bit value (float or int) from lane l ^ m.
  template <class V>
  V shfl_xor(V v, int m) const {
    static_assert(sizeof(V) == sizeof(unsigned), "32-bit shuffles only");
    EmuWarp &w = team->warp[tid / 32];
    int const l = tid % 32;
    std::memcpy(&w.x[l], &v, sizeof v);
    w.bar.wait();
    V r;
    std::memcpy(&r, &w.x[l ^ m], sizeof r);
    w.bar.wait();
    return r;
  }
  // d (16 x 8) += a (16 x 8, row) b (8 x 8, col); lane = 4 g + t holds
  // a: (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4); b: (t, g), (t + 4, g);
  // d: (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
  void mma(float (&acc)[4], unsigned const (&a)[4], unsigned b0, unsigned b1) const {
    EmuWarp &w = team->warp[tid / 32];
    int const l = tid % 32, g = l >> 2, t = l & 3;
    for (int q = 0; q < 4; ++q) w.a[l][q] = a[q];
    w.b[l][0] = b0;
    w.b[l][1] = b1;
    w.bar.wait();
    float out[4];
    for (int q = 0; q < 4; ++q) {
      int const row = g + (q >= 2 ? 8 : 0), col = 2 * t + (q & 1);
      float s = acc[q];
      for (int k = 0; k < 8; ++k) {
        unsigned const av = w.a[(row % 8) * 4 + k % 4][(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)];
        unsigned const bv = w.b[col * 4 + k % 4][k >= 4 ? 1 : 0];
        s += tf32_operand(av) * tf32_operand(bv);
      }
      out[q] = s;
    }
    w.bar.wait();
    for (int q = 0; q < 4; ++q) acc[q] = out[q];
  }
};

// body(ops) for every league rank c < league, teams one after another in
// reverse order (the last to finish is rank 0, as a GPU may order them),
// each on 256 lane threads. Teams never overlap here, so what orders one
// team's writes before another's reads (fences, the counter) is checked on
// GPUs only.
template <class Body>
void emulate_teams(int league, Body const &body) {
  EmuTeam team;
  std::vector<std::thread> lanes;
  for (int tid = 0; tid < EmuTeam::threads; ++tid)
    lanes.emplace_back([&team, &body, league, tid] {
      for (int c = league - 1; c >= 0; --c) {
        body(EmuWarpOps{&team, tid, c, league});
        team.bar.wait();
      }
    });
  for (auto &l : lanes) l.join();
}

}  // namespace hexamoe::test
