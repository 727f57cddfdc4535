// MachineBenchmark.hpp: the short start-up micro-benchmarks the planner reads
// (DESIGN.md section 3): each rank's compute rate R_i, timed on a small MoE
// layer forward + backward (ranks take turns; a rank's simulated slowdown
// multiplies its time, as a device that much slower would; timing the idle
// wait itself would only add the machine's wake-up latency), and the group's
// collective bandwidth and latency, timed on MPI_Allgather. All ranks of the
// job end with the same numbers: rates are gathered over the group and the
// minimum over the replicas of each group rank is kept; bandwidth is the
// job's minimum, latency its maximum.
//
// Rates that differ by less than the measurement noise (max/min below
// noise_ratio) are replaced by their median, so a homogeneous machine gets
// equal proportions and reproducible runs; rates that look heterogeneous are
// measured again (up to three rounds, each rank's best kept) before they
// count, since a passing load on a shared machine looks like a slow device.
#pragma once

#include <mpi.h>

#include <Kokkos_Core.hpp>
#include <algorithm>
#include <chrono>
#include <limits>
#include <random>
#include <vector>

#include "core/MoeLayer.hpp"
#include "parallel/ModeCostModel.hpp"
#include "parallel/MoeGroup.hpp"
#include "parallel/SimulatedSlowdown.hpp"

namespace hexamoe::parallel {

struct MachineMeasurement {
  MachineModel model;                  // what the planner uses
  std::vector<double> measured_rates;  // before the noise floor
  double seconds = 0;                  // time the benchmarks took
};

inline constexpr double noise_ratio = 1.5;

// flop/s of one rank: the fastest of `reps` runs of a small MoE
// layer (d 64, H 256, 4 experts, top-1, 512 tokens) forward + backward.
template <class ExecutionSpace>
double measure_rate(ExecutionSpace const &space, MPI_Comm comm, SimulatedSlowdown slowdown, int reps = 7) {
  using Mem = typename ExecutionSpace::memory_space;
  MoeLayerConfig c;
  c.dim = 64;
  c.hidden = 256;
  c.experts = 4;
  c.top_k = 1;
  int const T = 512;
  MoeLayer<float, ExecutionSpace> layer(c);
  layer.init(12345);
  Matrix<float, Mem> x("hexamoe::bench.x", T, c.dim), y("hexamoe::bench.y", T, c.dim),
      dx("hexamoe::bench.dx", T, c.dim);
  {
    auto h = Kokkos::create_mirror_view(x);
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < c.dim; ++i) h(t, i) = nd(rng);
    Kokkos::deep_copy(x, h);
  }
  LayerShape s;
  s.dim = c.dim;
  s.hidden = c.hidden;
  s.experts = c.experts;
  double const flops = ModeCostModel::expert_flops(s, T, c.hidden) + ModeCostModel::router_flops(s, T);
  // Ranks take turns, so that ranks sharing a node (or oversubscribed cores)
  // measure their device and not each other; the turns interleave, so that a
  // passing load on the machine does not fall on one rank's runs only.
  int me = 0, n = 1;
  MPI_Comm_rank(comm, &me);
  MPI_Comm_size(comm, &n);
  double best = std::numeric_limits<double>::max();
  for (int r = 0; r <= reps; ++r) {  // run 0 warms up
    for (int turn = 0; turn < n; ++turn) {
      MPI_Barrier(comm);
      if (turn != me) continue;
      space.fence();
      auto const t0 = std::chrono::steady_clock::now();
      layer.forward(space, x, y);
      layer.backward(space, y, dx);
      space.fence();
      double const t = slowdown.factor() * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) best = std::min(best, t);
    }
  }
  MPI_Barrier(comm);
  return flops / best;
}

// Bytes per second a rank receives in MPI_Allgather (1 MiB per rank), and the
// latency of a one-float MPI_Allgather, over comm.
inline std::pair<double, double> measure_network(MPI_Comm comm, int reps = 3) {
  int n = 1;
  MPI_Comm_size(comm, &n);
  if (n == 1) return {std::numeric_limits<double>::infinity(), 0.0};
  std::size_t const m = 1 << 18;
  std::vector<float> mine(m, 1.0f), all(m * std::size_t(n));
  double best = std::numeric_limits<double>::max(), lat = std::numeric_limits<double>::max();
  for (int r = 0; r <= reps; ++r) {
    MPI_Barrier(comm);
    double const t0 = MPI_Wtime();
    MPI_Allgather(mine.data(), int(m), MPI_FLOAT, all.data(), int(m), MPI_FLOAT, comm);
    double const t1 = MPI_Wtime();
    MPI_Allgather(mine.data(), 1, MPI_FLOAT, all.data(), 1, MPI_FLOAT, comm);
    double const t2 = MPI_Wtime();
    if (r > 0) {
      best = std::min(best, t1 - t0);
      lat = std::min(lat, t2 - t1);
    }
  }
  // Agree on the numbers (each rank timed its own view of the collective).
  MPI_Allreduce(MPI_IN_PLACE, &best, 1, MPI_DOUBLE, MPI_MAX, comm);
  MPI_Allreduce(MPI_IN_PLACE, &lat, 1, MPI_DOUBLE, MPI_MAX, comm);
  return {4.0 * double(m) * (n - 1) / best, lat};
}

// The full start-up measurement over the group (collective over the job).
template <class ExecutionSpace>
MachineMeasurement measure_machine(ExecutionSpace const &space, MoeGroup const &group, SimulatedSlowdown slowdown) {
  double const t0 = MPI_Wtime();
  MachineMeasurement out;
  // A load on the machine only ever slows a run down: while the rates look
  // heterogeneous, measure again and keep each rank's best (a truly slower
  // device stays slower). Every rank sees the same vector, so all loop alike.
  std::vector<double> rates(std::size_t(group.size()), 0.0);
  for (int round = 0; round < 3; ++round) {
    double const mine = measure_rate(space, group.comm(), slowdown);
    std::vector<double> r(std::size_t(group.size()));
    MPI_Allgather(&mine, 1, MPI_DOUBLE, r.data(), 1, MPI_DOUBLE, group.comm());
    MPI_Allreduce(MPI_IN_PLACE, r.data(), group.size(), MPI_DOUBLE, MPI_MIN, group.replicas());
    for (std::size_t i = 0; i < r.size(); ++i) rates[i] = std::max(rates[i], r[i]);
    auto const [lo, hi] = std::minmax_element(rates.begin(), rates.end());
    if (*hi < noise_ratio * *lo) break;
  }
  auto [bw, lat] = measure_network(group.comm());
  MPI_Allreduce(MPI_IN_PLACE, &bw, 1, MPI_DOUBLE, MPI_MIN, group.replicas());
  MPI_Allreduce(MPI_IN_PLACE, &lat, 1, MPI_DOUBLE, MPI_MAX, group.replicas());
  out.measured_rates = rates;
  auto sorted = rates;
  std::sort(sorted.begin(), sorted.end());
  double const median = sorted[sorted.size() / 2];
  if (sorted.back() < noise_ratio * sorted.front()) std::fill(rates.begin(), rates.end(), median);
  out.model.rates = rates;
  out.model.bandwidth = bw;
  out.model.latency = lat;
  out.seconds = MPI_Wtime() - t0;
  MPI_Allreduce(MPI_IN_PLACE, &out.seconds, 1, MPI_DOUBLE, MPI_MAX, group.comm());
  return out;
}

}  // namespace hexamoe::parallel
