// StackBench.cpp: see StackBench.hpp.
#include "bench/StackBench.hpp"

#include "core/Activation.hpp"
#include "core/MemoryTracker.hpp"
#include "core/model/MoeFfn.hpp"
#include "io/InputError.hpp"
#include "parallel/CommStats.hpp"
#include "parallel/MoeFactory.hpp"

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace hexamoe::bench {

namespace {

using Space = Kokkos::DefaultExecutionSpace;
using Mem = Space::memory_space;
using Clock = std::chrono::steady_clock;

void fill_normal(Matrix<float, Mem> v, unsigned seed) {
  auto h = Kokkos::create_mirror_view(v);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (std::size_t i = 0; i < h.span(); ++i) h.data()[i] = nd(rng);
  Kokkos::deep_copy(v, h);
}

// c = a + b (the residual connection around each MoE layer).
void add(Space const &space, Matrix<float, Mem> c, Matrix<float const, Mem> a, Matrix<float const, Mem> b) {
  std::size_t const n = c.span();
  float *pc = c.data();
  float const *pa = a.data(), *pb = b.data();
  for_each_index(space, "hexamoe::stack_bench.residual", n, KOKKOS_LAMBDA(std::size_t i) { pc[i] = pa[i] + pb[i]; });
}

// The GPU this rank runs on (-1 on host backends).
int device_of(Space const &space) {
#if defined(KOKKOS_ENABLE_CUDA)
  if constexpr (std::is_same_v<Space, Kokkos::Cuda>) return space.cuda_device();
#endif
  (void)space;
  return -1;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::string fmt(char const *f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

// What one rank measured; gathered on rank 0 as doubles.
struct RankResult {
  double batch, tokens, fwd_ms, fb_ms, sent_mib, recv_mib, blocked_ms, gather_blocked_ms, reduce_blocked_ms,
      peak_mib, host_peak_mib, device;
  static constexpr int fields = 12;
};

}  // namespace

int run_stack_bench(Deck const &deck, StackOptions const &opt, MPI_Comm comm, std::ostream &out) {
  MemoryTracker::install();
  if (deck.moe.dtype != MoeSection::Dtype::float32)
    throw InputError(deck.where("moe.dtype"),
                     "hexamoe bench --deck runs float32 expert layers (bfloat16 experts have no data- or "
                     "model-centric mode); set moe.dtype = \"float32\"");
  if (opt.reps < 1) throw std::invalid_argument("bench --deck: --reps must be >= 1");
  int rank = 0, n = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &n);
  Space space;
  std::string const mem = Mem::name();
  std::string const host = Kokkos::HostSpace::name();
  MemoryTracker::reset_peak();
  std::int64_t const base = MemoryTracker::current(mem);
  std::int64_t const host_base = mem == host ? base : MemoryTracker::current(host);

  parallel::MoeFactory<Space> moe(space, deck, comm, /*measure=*/false);
  auto const &plan = moe.plan();
  int const batch = plan.batch.at(std::size_t(rank));
  int const tokens = batch * deck.derived.num_patches;
  int const d = deck.model.dim;

  MoeLayerConfig mc;
  mc.dim = d;
  mc.hidden = deck.derived.hidden;
  mc.experts = deck.moe.experts;
  mc.top_k = deck.moe.top_k;
  mc.activation = activation_from_string(deck.moe.activation);
  mc.renormalize = deck.moe.renormalize;
  mc.aux_loss_weight = deck.moe.aux_loss_weight / n;
  mc.z_loss_weight = deck.moe.z_loss_weight / n;
  mc.capacity_factor = deck.moe.capacity_factor;

  auto factory = moe.factory();
  std::vector<std::unique_ptr<MoeFfn<Space>>> layers;
  for (int block : deck.derived.moe_blocks) {
    layers.push_back(factory(mc, block));
    layers.back()->init(std::uint64_t(deck.run.seed) * 1000 + std::uint64_t(block));
  }
  int const L = static_cast<int>(layers.size());
  auto alloc = [&](std::string const &label) {
    return Matrix<float, Mem>(Kokkos::view_alloc(Kokkos::WithoutInitializing, "hexamoe::stack_bench." + label), tokens,
                              d);
  };
  std::vector<Matrix<float, Mem>> xs;  // xs[l]: input of layer l; xs[L]: output of the stack
  for (int l = 0; l <= L; ++l) xs.push_back(alloc("x" + std::to_string(l)));
  auto y = alloc("y"), g = alloc("grad"), g2 = alloc("grad2"), dx = alloc("dx");
  fill_normal(xs[0], unsigned(deck.run.seed) + 7919u * unsigned(rank + 1));

  auto forward = [&] {
    for (int l = 0; l < L; ++l) {
      layers[l]->forward(space, xs[l], y);
      add(space, xs[l + 1], xs[l], y);
    }
  };
  auto backward = [&] {
    auto *cur = &g, *next = &g2;
    for (int l = L - 1; l >= 0; --l) {
      layers[l]->backward(space, *cur, dx);
      add(space, *next, *cur, dx);  // residual: the gradient passes through unchanged too
      std::swap(cur, next);
    }
  };

  std::vector<double> fwd, fb;
  auto &stats = parallel::comm_stats();
  for (int it = 0; it < opt.warmup + opt.reps; ++it) {
    fill_normal(g, unsigned(deck.run.seed) + 104729u * unsigned(rank + 1) + unsigned(it));  // untimed
    if (it == opt.warmup) stats.reset();
    MPI_Barrier(comm);
    auto const t0 = Clock::now();
    forward();
    Kokkos::fence();
    double const tf = seconds_since(t0);
    backward();
    Kokkos::fence();
    double const tb = seconds_since(t0);
    if (it >= opt.warmup) {
      fwd.push_back(tf);
      fb.push_back(tb);
    }
  }
  // A step ends when its slowest rank ends: the max over ranks, per repetition.
  std::vector<double> fwd_max(fwd.size()), fb_max(fb.size());
  MPI_Allreduce(fwd.data(), fwd_max.data(), static_cast<int>(fwd.size()), MPI_DOUBLE, MPI_MAX, comm);
  MPI_Allreduce(fb.data(), fb_max.data(), static_cast<int>(fb.size()), MPI_DOUBLE, MPI_MAX, comm);

  auto const t = stats.total();
  double const reps = opt.reps, MiB = 1 << 20;
  using parallel::CommKind;
  RankResult me{double(batch),
                double(tokens),
                1e3 * median(fwd),
                1e3 * median(fb),
                t.bytes_sent / reps / MiB,
                t.bytes_received / reps / MiB,
                1e3 * t.blocked_seconds / reps,
                1e3 * (stats[CommKind::weight_gather].blocked_seconds + stats[CommKind::token_gather].blocked_seconds) /
                    reps,
                1e3 * (stats[CommKind::gradient_reduce].blocked_seconds +
                       stats[CommKind::partial_reduce].blocked_seconds) /
                    reps,
                double(MemoryTracker::peak(mem) - base) / MiB,
                mem == host ? 0.0 : double(MemoryTracker::peak(host) - host_base) / MiB,
                double(device_of(space))};
  std::vector<double> all(std::size_t(n) * RankResult::fields);
  MPI_Gather(&me, RankResult::fields, MPI_DOUBLE, all.data(), RankResult::fields, MPI_DOUBLE, 0, comm);
  if (rank != 0) return 0;

  std::string modes;
  for (auto const &l : plan.layers) {
    std::string const m = parallel::to_string(l.mode);
    if (modes.find(m) == std::string::npos) modes += (modes.empty() ? "" : "+") + m;
  }
  std::string const step_ms = fmt("%.3f", 1e3 * median(fb_max)), fwd_ms = fmt("%.3f", 1e3 * median(fwd_max));
  if (opt.json) {
    for (int r = 0; r < n; ++r) {
      auto const *v = &all[std::size_t(r) * RankResult::fields];
      out << "{\"bench\":\"stack\",\"deck\":\"" << deck.run.name << "\",\"backend\":\"" << Space::name()
          << "\",\"ranks\":" << n << ",\"mode\":\"" << modes << "\",\"overlap\":" << (deck.parallel.overlap ? "true" : "false")
          << ",\"layers\":" << L << ",\"rank\":" << r << ",\"batch\":" << v[0] << ",\"tokens\":" << v[1]
          << ",\"fwd_ms\":" << fmt("%.3f", v[2]) << ",\"fb_ms\":" << fmt("%.3f", v[3])
          << ",\"step_fwd_ms\":" << fwd_ms << ",\"step_fb_ms\":" << step_ms << ",\"sent_mib\":" << fmt("%.3f", v[4])
          << ",\"recv_mib\":" << fmt("%.3f", v[5]) << ",\"blocked_ms\":" << fmt("%.3f", v[6])
          << ",\"gather_blocked_ms\":" << fmt("%.3f", v[7]) << ",\"reduce_blocked_ms\":" << fmt("%.3f", v[8])
          << ",\"peak_mib\":" << fmt("%.1f", v[9]) << ",\"host_peak_mib\":" << fmt("%.1f", v[10])
          << ",\"device\":" << v[11]
          << ",\"reps\":" << opt.reps << "}\n";
    }
    out.flush();
    return 0;
  }
  out << "# hexamoe bench --deck: " << deck.run.name << ", " << L << " MoE layers (d " << d << ", H "
      << deck.derived.hidden << ", " << deck.moe.experts << " experts, top-" << deck.moe.top_k << "), global batch "
      << deck.train.batch_size << " x " << deck.derived.num_patches << " tokens, " << n << " rank(s), "
      << Space::name() << " backend, mode " << modes << (deck.parallel.overlap ? "" : " (overlap off)") << "; median of "
      << opt.reps << " after " << opt.warmup << " warm-up\n";
  out << "# per step: sent/recv = logical bytes of this rank's collectives; blocked = time in MPI waits and staging "
         "copies (gather = weight or token all-gathers, reduce = reduce-scatters); peak = memory allocated in "
      << mem << (mem == host ? "" : " (host: staging buffers)") << "\n";
  char line[256];
  std::snprintf(line, sizeof line, "%4s %6s %8s %9s %9s %9s %9s %10s %10s %10s %9s%s\n", "rank", "batch", "tokens",
                "fwd ms", "f+b ms", "sent MiB", "recv MiB", "blocked ms", "gather ms", "reduce ms", "peak MiB",
                mem == host ? "" : "  host MiB");
  out << line;
  for (int r = 0; r < n; ++r) {
    auto const *v = &all[std::size_t(r) * RankResult::fields];
    std::snprintf(line, sizeof line, "%4d %6.0f %8.0f %9.3f %9.3f %9.2f %9.2f %10.3f %10.3f %10.3f %9.1f", r, v[0], v[1],
                  v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]);
    out << line;
    if (mem != host) out << fmt("%10.1f", v[10]) << "  (device " << v[11] << ")";
    out << "\n";
  }
  out << "step (slowest rank): forward " << fwd_ms << " ms, forward+backward " << step_ms << " ms\n";
  out.flush();
  return 0;
}

}  // namespace hexamoe::bench
