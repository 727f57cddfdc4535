// Planner.hpp: the adaptive choice of DESIGN.md section 3. Per MoE layer it
// predicts the data-centric and the model-centric step (ModeCostModel) and
// picks the cheaper one, unless the deck forces a mode; it sets the hidden
// proportions so that the slowest rank's predicted time is minimal (model-
// centric: p_i proportional to R_i; data-centric: the slices only set memory
// and traffic, so they are equal), unless the deck gives them.
//
// It also splits the global batch over the ranks: evenly (the remainder to
// the lowest ranks; any batch of at least one sample per rank), or, when
// data-centric layers run (whose compute on a rank is its own tokens), in
// proportion to the deck's proportions when given, else to the rates when
// that predicts a shorter step.
//
// make_plan is a pure function of its inputs; plan_for_deck measures the
// machine when a decision depends on it (collective) and gives every rank of
// the job the same plan (the measurements are agreed on first).
#pragma once

#include <algorithm>
#include <cstdio>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "io/Deck.hpp"
#include "parallel/MachineBenchmark.hpp"
#include "parallel/ModeCostModel.hpp"
#include "parallel/MoeGroup.hpp"

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
  bool kept = false;  // read back from a checkpoint (plan_from_string)
  std::vector<LayerPlan> layers;
  double cache_bytes = 0;  // data-centric cache per rank (all data-centric layers)
  std::vector<int> batch;  // samples of the global batch per job rank

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
      case ParallelSection::Mode::data:
        lp.mode = MoeMode::data;
        break;
      case ParallelSection::Mode::model:
        lp.mode = MoeMode::model;
        break;
      case ParallelSection::Mode::automatic:
        if (n == 1)
          lp.mode = MoeMode::local;
        else if (lp.data.time < lp.model.time)
          lp.mode = MoeMode::data;
        else if (lp.model.time < lp.data.time)
          lp.mode = MoeMode::model;
        else
          lp.mode = lp.model.max_memory() <= lp.data.max_memory() ? MoeMode::model : MoeMode::data;
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

// `total` split in proportion to `weights` (equal if empty): integers summing
// to total (largest remainder, ties to the lower rank), each at least 1 when
// total allows.
inline std::vector<int> split_batch(int total, std::vector<double> weights, int ranks) {
  if (weights.empty()) weights.assign(std::size_t(ranks), 1.0);
  auto s = ExpertSlice::split(total, weights, ranks).counts;
  for (int i = 0; i < ranks; ++i)
    while (s[i] < 1 && total >= ranks) {
      auto big = std::max_element(s.begin(), s.end());
      --*big;
      ++s[i];
    }
  return s;
}

// The MoE layers of the deck's model as seen by MoE group 0, whose ranks
// hold batch[0 .. group_size) samples.
inline std::vector<LayerShape> layer_shapes(Deck const &deck, int group_size, std::vector<int> const &batch) {
  std::vector<LayerShape> out;
  for (int b : deck.derived.moe_blocks) {
    LayerShape s;
    s.block = b;
    s.dim = deck.model.dim;
    s.hidden = deck.derived.hidden;
    s.experts = deck.moe.experts;
    s.top_k = deck.moe.top_k;
    for (int i = 0; i < group_size; ++i) s.tokens.push_back(batch.at(std::size_t(i)) * deck.derived.num_patches);
    out.push_back(s);
  }
  return out;
}

// Whether the plan of this deck depends on measured rates or bandwidth.
inline bool plan_needs_measurement(Deck const &deck, int group_size) {
  auto const &p = deck.parallel;
  if (group_size == 1) return false;
  if (p.mode == ParallelSection::Mode::automatic) return true;
  return p.proportions.empty() && p.rates.empty();  // proportions or batch shares follow the rates
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
  int const B = deck.train.batch_size;
  std::vector<int> const even = split_batch(B, {}, job_ranks);
  Plan plan = make_plan(p.mode, props, layer_shapes(deck, n, even), m, job_ranks);
  plan.batch = even;
  // Batch shares by rate (rates per job rank: the group's, for every group),
  // or as the deck's proportions say (the share of the work of each rank).
  std::vector<double> job_rates;
  for (int r = 0; r < job_ranks; ++r) job_rates.push_back(m.rates[std::size_t(r % n)]);
  bool const given = !props.empty();
  std::vector<int> const rated = split_batch(B, given ? p.proportions : job_rates, job_ranks);
  bool const any_data =
      std::any_of(plan.layers.begin(), plan.layers.end(), [](LayerPlan const &l) { return l.mode == MoeMode::data; });
  if (rated != even && (any_data || p.mode == ParallelSection::Mode::automatic)) {
    Plan alt = make_plan(p.mode, props, layer_shapes(deck, n, rated), m, job_ranks);
    alt.batch = rated;
    bool const alt_data =
        std::any_of(alt.layers.begin(), alt.layers.end(), [](LayerPlan const &l) { return l.mode == MoeMode::data; });
    if (given ? alt_data : alt.predicted_seconds() < plan.predicted_seconds()) plan = std::move(alt);
  }
  plan.rates_from = from;
  plan.measured = measured;
  return plan;
}

// A plan as text (stored in checkpoints, so that a resumed run splits the
// work as the run that wrote them), and back. Numbers round-trip exactly.
inline std::string plan_to_string(Plan const &plan) {
  auto num = [](double v) {
    char b[40];
    std::snprintf(b, sizeof b, "%.17g", v);
    return std::string(b);
  };
  auto list = [&](auto const &v) {
    std::string s;
    for (auto x : v) s += (s.empty() ? "" : ",") + num(double(x));
    return s;
  };
  std::string s = "moe-plan-1;ranks=" + std::to_string(plan.job_ranks) + ";group=" + std::to_string(plan.group_size) +
                  ";rates=" + list(plan.machine.rates) + ";bandwidth=" + num(plan.machine.bandwidth) +
                  ";latency=" + num(plan.machine.latency) + ";batch=" + list(plan.batch) + ";from=" + plan.rates_from;
  for (auto const &l : plan.layers)
    s += ";layer=" + std::to_string(l.shape.block) + ":" + to_string(l.mode) + ":" + list(l.proportions);
  return s;
}

// The plan of `text` for this deck and job, or nothing when it does not fit
// (another format, rank count, group size or model).
inline std::optional<Plan> plan_from_string(std::string const &text, Deck const &deck, int group_size, int job_ranks) {
  auto split = [](std::string const &s, char c) {
    std::vector<std::string> out;
    std::size_t a = 0;
    for (std::size_t b; (b = s.find(c, a)) != std::string::npos; a = b + 1) out.push_back(s.substr(a, b - a));
    out.push_back(s.substr(a));
    return out;
  };
  auto nums = [&](std::string const &s) {
    std::vector<double> v;
    if (!s.empty())
      for (auto const &x : split(s, ',')) v.push_back(std::stod(x));
    return v;
  };
  try {
    auto const parts = split(text, ';');
    if (parts.empty() || parts[0] != "moe-plan-1") return std::nullopt;
    std::map<std::string, std::string> kv;
    std::vector<std::string> layers;
    for (std::size_t i = 1; i < parts.size(); ++i) {
      auto const eq = parts[i].find('=');
      if (eq == std::string::npos) return std::nullopt;
      std::string const k = parts[i].substr(0, eq), v = parts[i].substr(eq + 1);
      if (k == "layer")
        layers.push_back(v);
      else
        kv[k] = v;
    }
    if (std::stoi(kv.at("ranks")) != job_ranks || std::stoi(kv.at("group")) != group_size) return std::nullopt;
    MachineModel m;
    m.rates = nums(kv.at("rates"));
    m.bandwidth = std::stod(kv.at("bandwidth"));
    m.latency = std::stod(kv.at("latency"));
    std::vector<int> batch;
    for (double b : nums(kv.at("batch"))) batch.push_back(static_cast<int>(b));
    if (static_cast<int>(m.rates.size()) != group_size || static_cast<int>(batch.size()) != job_ranks)
      return std::nullopt;
    auto const shapes = layer_shapes(deck, group_size, batch);
    if (layers.size() != shapes.size()) return std::nullopt;
    Plan plan;
    plan.job_ranks = job_ranks;
    plan.group_size = group_size;
    plan.machine = m;
    plan.batch = batch;
    plan.rates_from = kv.at("from");
    plan.kept = true;
    std::vector<LayerShape> data_layers;
    for (std::size_t i = 0; i < layers.size(); ++i) {
      auto const f = split(layers[i], ':');
      if (f.size() != 3 || std::stoi(f[0]) != shapes[i].block) return std::nullopt;
      LayerPlan lp;
      lp.shape = shapes[i];
      lp.mode = f[1] == "data" ? MoeMode::data : f[1] == "model" ? MoeMode::model : MoeMode::local;
      if (lp.mode == MoeMode::local && (f[1] != "local" || group_size != 1)) return std::nullopt;
      lp.proportions = nums(f[2]);
      if (static_cast<int>(lp.proportions.size()) != group_size) return std::nullopt;
      lp.slice = ExpertSlice::split(lp.shape.hidden, lp.proportions, group_size);
      lp.data = ModeCostModel::data(lp.shape, m, lp.slice);
      lp.model = ModeCostModel::model(lp.shape, m, lp.slice);
      if (group_size == 1) lp.local = ModeCostModel::local(lp.shape, m);
      if (lp.mode == MoeMode::data) data_layers.push_back(lp.shape);
      plan.layers.push_back(std::move(lp));
    }
    plan.cache_bytes = data_layers.empty() ? 0 : ModeCostModel::cache_bytes(data_layers);
    return plan;
  } catch (std::exception const &) {
    return std::nullopt;
  }
}

inline std::string format_plan(Plan const &plan, std::string const &title) {
  auto fmt = [](char const *f, double v) {
    char b[64];
    std::snprintf(b, sizeof b, f, v);
    return std::string(b);
  };
  auto join = [&](std::vector<double> const &v, char const *f, double scale) {
    std::string s;
    for (double x : v) s += (s.empty() ? "" : " ") + fmt(f, x * scale);
    return s;
  };
  int const n = plan.group_size;
  std::string out = title + ": " + std::to_string(plan.job_ranks) + " rank(s), " + std::to_string(plan.groups()) +
                    " MoE group(s) of " + std::to_string(n) + ", " + std::to_string(plan.layers.size()) +
                    " MoE layer(s)\n";
  out += "rates (GFLOP/s, " + plan.rates_from + (plan.kept ? "; plan kept from the checkpoint" : "") +
         "): " + join(plan.machine.rates, "%.2f", 1e-9);
  if (n > 1)
    out += " | bandwidth " + fmt("%.2f", plan.machine.bandwidth * 1e-9) + " GB/s, latency " +
           fmt("%.1f", plan.machine.latency * 1e6) + " us";
  out += "\n";
  std::vector<std::vector<std::string>> rows = {
      {"block", "mode", "proportions", "data ms", "model ms", "predicted ms", "memory per rank MiB"}};
  for (auto const &l : plan.layers) {
    bool const local = l.mode == MoeMode::local;
    rows.push_back({std::to_string(l.shape.block), to_string(l.mode), join(l.proportions, "%.3f", 1),
                    local ? "-" : fmt("%.2f", l.data.time * 1e3), local ? "-" : fmt("%.2f", l.model.time * 1e3),
                    fmt("%.2f", l.chosen().time * 1e3), join(l.chosen().memory, "%.1f", 1.0 / (1 << 20))});
  }
  std::vector<std::size_t> w(rows[0].size(), 0);
  for (auto const &r : rows)
    for (std::size_t c = 0; c < r.size(); ++c) w[c] = std::max(w[c], r[c].size());
  for (auto const &r : rows) {
    std::string line;
    for (std::size_t c = 0; c < r.size(); ++c) {
      bool const right = c >= 3 && c <= 5;  // numbers
      std::string const pad(w[c] - r[c].size(), ' ');
      line += (c ? "  " : "") + (right ? pad + r[c] : (c + 1 < r.size() ? r[c] + pad : r[c]));
    }
    out += line + "\n";
  }
  out += "data-centric cache: " + fmt("%.1f", plan.cache_bytes / (1 << 20)) +
         " MiB per rank (2 weight slots, gradient and reduce buffers, shared by all data-centric layers)\n";
  std::vector<double> batch(plan.batch.begin(), plan.batch.end());
  out += "batch per rank: " + join(batch, "%.0f", 1) + "\n";
  out += "predicted MoE time per training step: " + fmt("%.2f", plan.predicted_seconds() * 1e3) + " ms\n";
  return out;
}

}  // namespace hexamoe::parallel
