// AdamW.hpp: the AdamW optimiser (decoupled weight decay, bias-corrected
// moments) over a model's Parameters, global-norm gradient clipping and the
// warm-up + cosine learning-rate schedule. Moments are float32 views shaped
// like the parameters, so checkpoints store them beside the values.
#pragma once

#include "core/Compat.hpp"
#include "core/Parameter.hpp"

#include <Kokkos_Core.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace hexamoe {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.05;
};

// lr at step s (0-based) of total: linear warm-up to lr over warmup steps,
// then cosine decay to min_lr at the last step (constant when !cosine).
inline double learning_rate(long step, long total, double lr, double min_lr, long warmup, bool cosine) {
  if (warmup > 0 && step < warmup) return lr * double(step + 1) / double(warmup);
  if (!cosine || total <= warmup) return lr;
  double const t = std::min(1.0, double(step - warmup) / double(std::max(1L, total - warmup)));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * t));
}

template <class ExecutionSpace>
class AdamW {
 public:
  using memory_space = typename ExecutionSpace::memory_space;
  using flat_view = Kokkos::View<float *, memory_space>;

  AdamW(std::vector<Parameter<memory_space>> params, AdamWOptions opt) : params_(std::move(params)), opt_(opt) {
    for (auto const &p : params_) {
      m_.push_back(flat_view("hexamoe::adamw.m:" + p.name, p.value.extent(0)));
      v_.push_back(flat_view("hexamoe::adamw.v:" + p.name, p.value.extent(0)));
    }
  }

  std::vector<Parameter<memory_space>> const &parameters() const { return params_; }
  flat_view first_moment(std::size_t i) const { return m_[i]; }
  flat_view second_moment(std::size_t i) const { return v_[i]; }
  long steps_taken() const { return t_; }
  void set_steps_taken(long t) { t_ = t; }

  // Sum of squares of every gradient (float64, each parameter reduced in order).
  double grad_sq_norm(ExecutionSpace const &space) const {
    double total = 0;
    for (auto const &p : params_) total += sq_norm(space, p.grad);
    return total;
  }

  static double sq_norm(ExecutionSpace const &space, flat_view g) {
    double s = 0;
    Kokkos::parallel_reduce(
        "hexamoe::adamw::grad_norm", Kokkos::RangePolicy<ExecutionSpace>(space, 0, g.extent(0)),
        KOKKOS_LAMBDA(std::size_t i, double &acc) { acc += double(g(i)) * double(g(i)); }, s);
    return s;
  }

  // One update with learning rate lr; gradients are multiplied by grad_scale
  // first (clipping). Returns nothing; moments and values change in place.
  void step(ExecutionSpace const &space, double lr, double grad_scale) {
    compat::ScopedRegion region("hexamoe::AdamW::step");
    ++t_;
    float const b1 = float(opt_.beta1), b2 = float(opt_.beta2), eps = float(opt_.eps);
    float const c1 = float(1.0 - std::pow(opt_.beta1, double(t_)));
    float const c2 = float(1.0 - std::pow(opt_.beta2, double(t_)));
    float const gs = float(grad_scale), lrf = float(lr);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto w = params_[i].value;
      auto g = params_[i].grad;
      auto m = m_[i];
      auto v = v_[i];
      float const decay = params_[i].decay ? float(lr * opt_.weight_decay) : 0.0f;
      Kokkos::parallel_for(
          "hexamoe::adamw::update", Kokkos::RangePolicy<ExecutionSpace>(space, 0, w.extent(0)), KOKKOS_LAMBDA(std::size_t j) {
            float const gj = g(j) * gs;
            float const mj = b1 * m(j) + (1.0f - b1) * gj;
            float const vj = b2 * v(j) + (1.0f - b2) * gj * gj;
            m(j) = mj;
            v(j) = vj;
            float const update = (mj / c1) / (compat::sqrt(vj / c2) + eps);
            w(j) = w(j) - decay * w(j) - lrf * update;
          });
    }
  }

 private:
  std::vector<Parameter<memory_space>> params_;
  AdamWOptions opt_;
  std::vector<flat_view> m_, v_;
  long t_ = 0;
};

}  // namespace hexamoe
