// ModeCostModel.hpp: predicted time and memory of one MoE layer's training
// step (forward + backward) in each parallel mode (DESIGN.md section 3), from
// the layer's shape, the tokens of each rank of the MoE group, per-rank
// compute rates R_i (flop/s) and the interconnect (bandwidth B, latency).
//
//   expert flops per assignment: 12 d H (forward 2 GEMMs of 2 d H, backward 4)
//   router flops per token:       6 d E
//   |W| = 4 E (2d + 1) H bytes (W1, b1, W2; b2 and the router are replicated)
//
//   data-centric:  compute_i = (12 d H S_i + 6 d E T_i) / R_i        (own tokens, full H)
//                  comm_i    = 3 (|W| - |W_i|) / B                     (gather fwd, gather bwd,
//                                                                      reduce-scatter grads)
//   model-centric: compute_i = (12 d H_i S + 6 d E T_i) / R_i         (all S of the group, slice H_i)
//                  comm_i    = 4 (T - T_i) (4d + 3k) / B               (gather x, idx, gate, dy;
//                                                                      reduce-scatter y, dx, dgate)
//   time = max_i compute_i + max_i comm_i + collectives * latency * (n - 1)
//
// Collectives synchronise the group, so the slowest rank sets the time; the
// overlap of the data-centric gathers with compute is not counted (an upper
// bound). Memory per rank: the slice with its gradient and two AdamW moments
// (16 bytes per element), the replicated router and b2 likewise, and the
// activations the layer keeps for backward; the data-centric cache (two
// weight slots, a gradient and a reduce buffer, all layers together) is
// counted by the planner once.
#pragma once

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "parallel/ExpertSlice.hpp"

namespace hexamoe::parallel {

enum class MoeMode { local, data, model };

inline char const *to_string(MoeMode m) {
  switch (m) {
    case MoeMode::local:
      return "local";
    case MoeMode::data:
      return "data";
    case MoeMode::model:
      return "model";
  }
  return "?";
}

struct LayerShape {
  int block = 0;  // transformer block index (for messages)
  int dim = 0, hidden = 0, experts = 0, top_k = 1;
  std::vector<int> tokens;  // tokens of each rank of the MoE group
  int total_tokens() const { return std::accumulate(tokens.begin(), tokens.end(), 0); }
  double weight_bytes() const { return 4.0 * experts * (2.0 * dim + 1.0) * hidden; }
};

struct MachineModel {
  std::vector<double> rates;  // flop/s of each rank of the group
  double bandwidth = 1e10;    // bytes/s a rank receives in a collective
  double latency = 0;         // seconds per collective step
};

struct ModeCost {
  std::vector<double> compute;  // seconds per rank
  std::vector<double> comm;     // seconds per rank
  std::vector<double> memory;   // bytes per rank (this layer; no shared cache)
  double time = 0;              // predicted seconds per training step
  double max_memory() const { return memory.empty() ? 0 : *std::max_element(memory.begin(), memory.end()); }
};

class ModeCostModel {
 public:
  static double expert_flops(LayerShape const &s, double assignments, double hidden) {
    return 12.0 * s.dim * hidden * assignments;
  }
  static double router_flops(LayerShape const &s, double tokens) { return 6.0 * s.dim * s.experts * tokens; }

  // Proportions minimising max_i p_i / R_i: p_i proportional to R_i.
  static std::vector<double> balanced(std::vector<double> const &rates) {
    double const sum = std::accumulate(rates.begin(), rates.end(), 0.0);
    std::vector<double> p;
    for (double r : rates) p.push_back(sum > 0 ? r / sum : 1.0 / rates.size());
    return p;
  }

  static ModeCost data(LayerShape const &s, MachineModel const &m, ExpertSlice const &slice) {
    int const n = static_cast<int>(s.tokens.size());
    ModeCost c;
    double const W = s.weight_bytes();
    for (int i = 0; i < n; ++i) {
      double const Ti = s.tokens[i], Si = Ti * s.top_k, Wi = W * slice.count(i) / double(s.hidden);
      c.compute.push_back((expert_flops(s, Si, s.hidden) + router_flops(s, Ti)) / m.rates[i]);
      c.comm.push_back(n > 1 ? 3.0 * (W - Wi) / m.bandwidth : 0.0);
      c.memory.push_back(4.0 * Wi + replicated_bytes(s) + activation_bytes(s, Si, s.hidden));
    }
    finish(c, n, 3, m);
    return c;
  }

  static ModeCost model(LayerShape const &s, MachineModel const &m, ExpertSlice const &slice) {
    int const n = static_cast<int>(s.tokens.size());
    ModeCost c;
    double const W = s.weight_bytes(), T = s.total_tokens(), S = T * s.top_k;
    for (int i = 0; i < n; ++i) {
      double const Ti = s.tokens[i], Hi = slice.count(i), Wi = W * Hi / double(s.hidden);
      c.compute.push_back((expert_flops(s, S, Hi) + router_flops(s, Ti)) / m.rates[i]);
      c.comm.push_back(n > 1 ? 4.0 * (T - Ti) * (4.0 * s.dim + 3.0 * s.top_k) / m.bandwidth : 0.0);
      // Gathered x and dy, the partial output / dx, routing and gates.
      double const gathered = 4.0 * T * (3.0 * s.dim + 3.0 * s.top_k);
      c.memory.push_back(4.0 * Wi + replicated_bytes(s) + activation_bytes(s, S, Hi) + gathered);
    }
    finish(c, n, 7, m);
    return c;
  }

  // The local layer of one process (no communication).
  static ModeCost local(LayerShape const &s, MachineModel const &m) {
    ModeCost c;
    double const T = s.total_tokens(), S = T * s.top_k;
    c.compute.push_back((expert_flops(s, S, s.hidden) + router_flops(s, T)) / m.rates.at(0));
    c.comm.push_back(0);
    c.memory.push_back(4.0 * s.weight_bytes() + replicated_bytes(s) + activation_bytes(s, S, s.hidden));
    finish(c, 1, 0, m);
    return c;
  }

  // Shared data-centric cache of a set of layers: two weight slots, the
  // gradient buffer and the reduce buffer, each sized for the largest layer.
  static double cache_bytes(std::vector<LayerShape> const &layers) {
    double w = 0;
    for (auto const &s : layers) w = std::max(w, s.weight_bytes());
    return 4.0 * w;
  }

 private:
  // Values, gradients and two AdamW moments of the router and b2.
  static double replicated_bytes(LayerShape const &s) {
    return 16.0 * (double(s.dim) * s.experts + s.experts + double(s.experts) * s.dim);
  }
  // z1 and h (S x H each), the output rows o (S x d), router state per token.
  static double activation_bytes(LayerShape const &s, double S, double H) {
    return 4.0 * S * (2.0 * H + s.dim) + 4.0 * (S / s.top_k) * (2.0 * s.experts + 2.0 * s.top_k);
  }
  static void finish(ModeCost &c, int n, int collectives, MachineModel const &m) {
    double const comp = *std::max_element(c.compute.begin(), c.compute.end());
    double const comm = *std::max_element(c.comm.begin(), c.comm.end());
    c.time = comp + comm + (n > 1 ? collectives * m.latency * (n - 1) : 0.0);
  }
};

}  // namespace hexamoe::parallel
