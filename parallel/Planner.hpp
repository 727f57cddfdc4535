// Planner.hpp: the adaptive choice of DESIGN.md section 3. Per MoE layer it
// predicts the data-centric and the model-centric step (ModeCostModel) and
// picks the cheaper one, unless the deck forces a mode; it sets the hidden
// proportions so that the slowest rank's predicted time is minimal (model-
// centric: p_i proportional to R_i; data-centric: the slices only set memory
// and traffic, so they are equal), unless the deck gives them.
//
// make_plan is a pure function of its inputs; plan_for_deck measures the
// machine when a decision depends on it (collective) and gives every rank of
// the job the same plan (the measurements are agreed on first).
#pragma once

#include "io/Deck.hpp"
#include "parallel/MachineBenchmark.hpp"
#include "parallel/ModeCostModel.hpp"
#include "parallel/MoeGroup.hpp"

#include <cstdio>
#include <ostream>
#include <string>
#include <vector>

namespace hexamoe::parallel {

struct LayerPlan {
  LayerShape shape;
  MoeMode mode = MoeMode::local;
  std::vector<double> proportions;  // of the group's ranks
  ExpertSlice slice;                // hidden units per rank from the proportions
  ModeCost data, model, local;      // predictions (data/model with their own proportions)
  ModeCost const &chosen() const { return mode == MoeMode::data ? data : mode == MoeMode::model ? model : local; }
};

struct Plan {
  int job_ranks = 1, group_size = 1;
  MachineModel machine;
  std::string rates_from;  // how R_i were obtained
  bool measured = false;
  std::vector<LayerPlan> layers;
  double cache_bytes = 0;  // data-centric cache per rank (all data-centric layers)

  int groups() const { return job_ranks / group_size; }
  LayerPlan const *for_block(int block) const {
    for (auto const &l : layers)
      if (l.shape.block == block) return &l;
    return nullptr;
  }
  double predicted_seconds() const {
    double t = 0;
    for (auto const &l : layers) t += l.chosen().time;
    return t;
  }
};

// The plan for `layers` on a group with the given machine model. proportions:
// the group's entries of the deck's list, or empty.
inline Plan make_plan(ParallelSection::Mode mode, std::vector<double> const &proportions,
                      std::vector<LayerShape> const &layers, MachineModel const &machine, int job_ranks) {
  Plan plan;
  plan.job_ranks = job_ranks;
  plan.group_size = static_cast<int>(machine.rates.size());
  plan.machine = machine;
  int const n = plan.group_size;
  std::vector<LayerShape> data_layers;
  for (auto const &s : layers) {
    LayerPlan lp;
    lp.shape = s;
    std::vector<double> const equal(std::size_t(n), 1.0 / n);
    auto const pd = proportions.empty() ? equal : proportions;
    auto const pm = proportions.empty() ? ModeCostModel::balanced(machine.rates) : proportions;
    auto const sd = ExpertSlice::split(s.hidden, pd, n), sm = ExpertSlice::split(s.hidden, pm, n);
    lp.data = ModeCostModel::data(s, machine, sd);
    lp.model = ModeCostModel::model(s, machine, sm);
    if (n == 1) lp.local = ModeCostModel::local(s, machine);
    switch (mode) {
      case ParallelSection::Mode::data: lp.mode = MoeMode::data; break;
      case ParallelSection::Mode::model: lp.mode = MoeMode::model; break;
      case ParallelSection::Mode::automatic:
        if (n == 1) lp.mode = MoeMode::local;
        else if (lp.data.time < lp.model.time) lp.mode = MoeMode::data;
        else if (lp.model.time < lp.data.time) lp.mode = MoeMode::model;
        else lp.mode = lp.model.max_memory() <= lp.data.max_memory() ? MoeMode::model : MoeMode::data;
        break;
    }
    lp.proportions = lp.mode == MoeMode::model ? pm : lp.mode == MoeMode::data ? pd : std::vector<double>{1.0};
    lp.slice = lp.mode == MoeMode::model ? sm : lp.mode == MoeMode::data ? sd : ExpertSlice::split(s.hidden, {}, 1);
    if (lp.mode == MoeMode::data) data_layers.push_back(s);
    plan.layers.push_back(std::move(lp));
  }
  plan.cache_bytes = data_layers.empty() ? 0 : ModeCostModel::cache_bytes(data_layers);
  return plan;
}

// The MoE layers of the deck's model as seen by a group of `n` ranks, each
// with its share of the global batch.
inline std::vector<LayerShape> layer_shapes(Deck const &deck, int group_size, int job_ranks) {
  std::vector<LayerShape> out;
  int const local_batch = deck.train.batch_size / job_ranks;
  for (int b : deck.derived.moe_blocks) {
    LayerShape s;
    s.block = b;
    s.dim = deck.model.dim;
    s.hidden = deck.derived.hidden;
    s.experts = deck.moe.experts;
    s.top_k = deck.moe.top_k;
    s.tokens.assign(std::size_t(group_size), local_batch * deck.derived.num_patches);
    out.push_back(s);
  }
  return out;
}

// Whether the plan of this deck depends on measured rates or bandwidth.
inline bool plan_needs_measurement(Deck const &deck, int group_size) {
  auto const &p = deck.parallel;
  if (group_size == 1) return false;
  if (p.mode == ParallelSection::Mode::automatic) return true;
  return p.mode == ParallelSection::Mode::model && p.proportions.empty() && p.rates.empty();
}

// The deck's per-rank slowdown factor of this job rank (1 = none).
inline double slowdown_of(Deck const &deck, int job_rank) {
  auto const &s = deck.parallel.slowdown;
  return s.empty() ? 1.0 : s.at(std::size_t(job_rank));
}

// The plan of the deck for this job (collective over the job). With measure =
// false and no need, rates are nominal and the predicted times only relative.
template <class ExecutionSpace>
Plan plan_for_deck(ExecutionSpace const &space, Deck const &deck, MoeGroup const &group, int job_rank, int job_ranks,
                   bool measure) {
  auto const &p = deck.parallel;
  int const n = group.size();
  MachineModel m;
  std::string from;
  bool measured = false;
  if (measure || plan_needs_measurement(deck, n)) {
    auto mm = measure_machine(space, group, SimulatedSlowdown(slowdown_of(deck, job_rank)));
    m = mm.model;
    measured = true;
    from = "measured";
  } else {
    m.rates.assign(std::size_t(n), 1e10);
    m.bandwidth = 1e10;
    from = "nominal (not measured)";
  }
  if (!p.rates.empty()) {
    // Relative speeds from the deck, scaled by the measured (or nominal) median.
    auto sorted = m.rates;
    std::sort(sorted.begin(), sorted.end());
    double const base = sorted[sorted.size() / 2];
    std::vector<double> rel;
    for (int i = 0; i < n; ++i) rel.push_back(p.rates[std::size_t(group.index() * n + i)]);
    // Same plan on every group: the slowest device at each group position.
    MPI_Allreduce(MPI_IN_PLACE, rel.data(), n, MPI_DOUBLE, MPI_MIN, group.replicas());
    double const mx = *std::max_element(rel.begin(), rel.end());
    for (int i = 0; i < n; ++i) m.rates[i] = base * rel[i] / mx;
    from = std::string("deck rates x ") + (measured ? "measured" : "nominal") + " median";
  }
  std::vector<double> props;
  if (!p.proportions.empty()) {
    props = group.proportions();
    // Every group must slice alike (replicas sum slice gradients): group 0's split.
    MPI_Bcast(props.data(), n, MPI_DOUBLE, 0, group.replicas());
    from += ", deck proportions";
  }
  Plan plan = make_plan(p.mode, props, layer_shapes(deck, n, job_ranks), m, job_ranks);
  plan.rates_from = from;
  plan.measured = measured;
  return plan;
}

inline std::string format_plan(Plan const &plan, std::string const &title) {
  std::string out;
  char buf[512];
  auto add = [&](char const *fmt, auto... a) {
    std::snprintf(buf, sizeof buf, fmt, a...);
    out += buf;
  };
  int const n = plan.group_size;
  add("%s: %d rank(s), %d MoE group(s) of %d, %zu MoE layer(s)\n", title.c_str(), plan.job_ranks, plan.groups(), n,
      plan.layers.size());
  add("rates (GFLOP/s, %s):", plan.rates_from.c_str());
  for (double r : plan.machine.rates) add(" %.2f", r * 1e-9);
  if (n > 1) add(" | bandwidth %.2f GB/s, latency %.1f us", plan.machine.bandwidth * 1e-9, plan.machine.latency * 1e6);
  out += "\n";
  add("%-6s %-6s %-*s %12s %12s %12s %s\n", "block", "mode", 7 * n, "proportions", "data ms", "model ms", "predicted ms",
      "memory per rank MiB");
  for (auto const &l : plan.layers) {
    std::string pr;
    for (double v : l.proportions) {
      std::snprintf(buf, sizeof buf, "%.3f ", v);
      pr += buf;
    }
    std::string mem;
    for (double v : l.chosen().memory) {
      std::snprintf(buf, sizeof buf, "%s%.1f", mem.empty() ? "" : " ", v / (1 << 20));
      mem += buf;
    }
    auto ms = [](ModeCost const &c) { return c.time * 1e3; };
    if (l.mode == MoeMode::local)
      add("%-6d %-6s %-*s %12s %12s %12.2f %s\n", l.shape.block, to_string(l.mode), 7 * n, pr.c_str(), "-", "-",
          ms(l.local), mem.c_str());
    else
      add("%-6d %-6s %-*s %12.2f %12.2f %12.2f %s\n", l.shape.block, to_string(l.mode), 7 * n, pr.c_str(), ms(l.data),
          ms(l.model), ms(l.chosen()), mem.c_str());
  }
  add("data-centric cache: %.1f MiB per rank (2 weight slots + gradient + reduce buffer, shared by all layers)\n",
      plan.cache_bytes / (1 << 20));
  add("predicted MoE time per training step: %.2f ms (tokens per rank: %d)\n", plan.predicted_seconds() * 1e3,
      plan.layers.empty() ? 0 : plan.layers.front().shape.tokens.front());
  return out;
}

}  // namespace hexamoe::parallel
