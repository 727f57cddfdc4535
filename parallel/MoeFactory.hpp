// MoeFactory.hpp: what the training driver needs from parallel/: the MoE
// group of this rank (from the deck's parallel section), the plan (mode and
// proportions per MoE layer), and a factory that builds each MoE layer of a
// model in its planned mode: LocalMoeFfn (a group of one rank in auto mode),
// DataCentricMoe (all data-centric layers of one model share one
// PipelineSharedCache) or ModelCentricMoe. Collective over the job.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "core/model/MoeFfn.hpp"
#include "io/Deck.hpp"
#include "parallel/DataCentricMoe.hpp"
#include "parallel/ModelCentricMoe.hpp"
#include "parallel/Planner.hpp"

namespace hexamoe::parallel {

template <class ExecutionSpace>
class MoeFactory {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  using Factory = std::function<std::unique_ptr<MoeFfn<ExecutionSpace>>(MoeLayerConfig const &, int block)>;

  // measure: run the start-up benchmarks even when no decision needs them
  // (for printing predicted times). pinned: a plan_to_string() of the run
  // being resumed; with parallel.mode = "auto" and neither proportions nor
  // rates in the deck it is kept when it fits this job (same ranks, group
  // size and model), so that a resumed run splits the work alike.
  MoeFactory(ExecutionSpace const &space, Deck const &deck, MPI_Comm comm, bool measure = false,
             std::string const &pinned = "") {
    int rank = 0, n = 1;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &n);
    group_ = std::make_shared<MoeGroup>(comm, deck.parallel.group_size, deck.parallel.proportions);
    auto const &p = deck.parallel;
    std::optional<Plan> kept;
    if (!pinned.empty() && p.mode == ParallelSection::Mode::automatic && p.proportions.empty() && p.rates.empty())
      kept = plan_from_string(pinned, deck, group_->size(), n);
    plan_ = kept ? *kept : plan_for_deck(space, deck, *group_, rank, n, measure);
    slowdown_ = SimulatedSlowdown(slowdown_of(deck, rank));
    overlap_ = p.overlap;
  }

  Plan const &plan() const { return plan_; }
  MoeGroup const &group() const { return *group_; }

  // A factory for one model (its data-centric layers share one cache).
  Factory factory() const {
    auto cache = std::make_shared<std::shared_ptr<PipelineSharedCache<memory_space>>>();
    auto group = group_;
    auto plan = std::make_shared<Plan const>(plan_);
    auto slowdown = slowdown_;
    bool const overlap = overlap_;
    return [cache, group, plan, slowdown, overlap](MoeLayerConfig const &cfg,
                                          int block) -> std::unique_ptr<MoeFfn<ExecutionSpace>> {
      LayerPlan const *lp = plan->for_block(block);
      if (!lp)
        throw std::logic_error("MoeFactory: block " + std::to_string(block) + " is not an MoE layer of the plan");
      if (lp->slice.hidden != cfg.hidden)
        throw std::logic_error("MoeFactory: the plan has hidden " + std::to_string(lp->slice.hidden) + ", the layer " +
                               std::to_string(cfg.hidden));
      switch (lp->mode) {
        case MoeMode::local:
          return std::make_unique<LocalMoeFfn<ExecutionSpace>>(cfg);
        case MoeMode::data:
          if (!*cache) *cache = std::make_shared<PipelineSharedCache<memory_space>>(group, overlap);
          return std::make_unique<DataCentricMoe<ExecutionSpace>>(cfg, lp->slice, *cache, slowdown);
        case MoeMode::model:
          return std::make_unique<ModelCentricMoe<ExecutionSpace>>(cfg, lp->slice, group, slowdown);
      }
      return nullptr;
    };
  }

 private:
  std::shared_ptr<MoeGroup> group_;
  Plan plan_;
  SimulatedSlowdown slowdown_;
  bool overlap_ = true;
};

}  // namespace hexamoe::parallel
