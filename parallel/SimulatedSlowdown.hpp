// SimulatedSlowdown.hpp: heterogeneity on a homogeneous machine (the deck's
// parallel.slowdown). A rank with factor s makes each expert compute phase
// last s times as long: it times the phase and then stays idle for (s - 1)
// times that. Idling rather than repeating the compute keeps the simulation
// honest when ranks share cores: a repeated compute would also slow the
// "fast" ranks it competes with. The planner's start-up benchmark multiplies
// the rank's measured time by s, so it sees the slowdown as a lower rate.
#pragma once

#include <Kokkos_Core.hpp>
#include <chrono>
#include <thread>

namespace hexamoe::parallel {

class SimulatedSlowdown {
 public:
  using clock = std::chrono::steady_clock;
  SimulatedSlowdown() = default;
  explicit SimulatedSlowdown(double factor) : factor_(factor > 1 ? factor : 1.0) {}
  double factor() const { return factor_; }
  bool active() const { return factor_ > 1; }

  // Start of a compute phase on space (fences only when active).
  template <class ExecutionSpace>
  void begin(ExecutionSpace const &space) {
    if (!active()) return;
    space.fence();
    start_ = clock::now();
  }
  // End of the phase: wait out the simulated extra time.
  template <class ExecutionSpace>
  void end(ExecutionSpace const &space) {
    if (!active()) return;
    space.fence();
    auto const spent = clock::now() - start_;
    std::this_thread::sleep_for(std::chrono::duration_cast<clock::duration>(spent * (factor_ - 1)));
  }

 private:
  double factor_ = 1.0;
  clock::time_point start_{};
};

}  // namespace hexamoe::parallel
