// CommStats.hpp: what the MoE parallel modes communicate, per process.
// Counters by kind of collective: calls, the bytes this rank sends and
// receives (logical volume of the collective, independent of the algorithm
// MPI picks: an all-gather receives every peer's part and sends its own to
// every peer; a reduce-scatter sends every peer's block of its contribution
// and receives every peer's contribution to its own block), and the wall time
// this rank was blocked: in blocking collectives, in the wait for a
// non-blocking one, and in the host staging copies around them. Issuing a
// non-blocking collective is counted under `issue`, not `blocked`.
//
// The benchmark `hexamoe bench --deck` reads these per step; resetting is
// up to the reader. Not thread-safe (one thread per rank issues MPI calls).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <string>

namespace hexamoe::parallel {

enum class CommKind : int {
  weight_gather = 0,    // data-centric: slices -> full weights (all-gather)
  gradient_reduce = 1,  // data-centric: full gradient -> slices (reduce-scatter)
  token_gather = 2,     // model-centric: tokens, routing, dy (all-gather)
  partial_reduce = 3,   // model-centric: partial outputs and dx (reduce-scatter)
  replica_reduce = 4,   // several MoE groups: slice gradients over replicas
};
inline constexpr int comm_kinds = 5;

inline char const *to_string(CommKind k) {
  switch (k) {
    case CommKind::weight_gather: return "weight_gather";
    case CommKind::gradient_reduce: return "gradient_reduce";
    case CommKind::token_gather: return "token_gather";
    case CommKind::partial_reduce: return "partial_reduce";
    case CommKind::replica_reduce: return "replica_reduce";
  }
  return "?";
}

struct CommCounter {
  std::int64_t calls = 0;
  double bytes_sent = 0, bytes_received = 0;
  double blocked_seconds = 0;  // waiting for the collective (and staging copies)
  double issue_seconds = 0;    // starting non-blocking collectives (and staging copies)
};

struct CommStats {
  std::array<CommCounter, comm_kinds> kind{};

  CommCounter &operator[](CommKind k) { return kind[static_cast<int>(k)]; }
  CommCounter const &operator[](CommKind k) const { return kind[static_cast<int>(k)]; }
  CommCounter total() const {
    CommCounter t;
    for (auto const &c : kind) {
      t.calls += c.calls;
      t.bytes_sent += c.bytes_sent;
      t.bytes_received += c.bytes_received;
      t.blocked_seconds += c.blocked_seconds;
      t.issue_seconds += c.issue_seconds;
    }
    return t;
  }
  void reset() { kind = {}; }
};

// The process's counters (MoE layers of every model add to them).
inline CommStats &comm_stats() {
  static CommStats s;
  return s;
}

// Adds the wall time of its scope to a counter field.
class CommTimer {
 public:
  using clock = std::chrono::steady_clock;
  explicit CommTimer(double &field) : field_(field), start_(clock::now()) {}
  ~CommTimer() { field_ += std::chrono::duration<double>(clock::now() - start_).count(); }
  CommTimer(CommTimer const &) = delete;
  CommTimer &operator=(CommTimer const &) = delete;

 private:
  double &field_;
  clock::time_point start_;
};

}  // namespace hexamoe::parallel
