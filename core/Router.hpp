// Router.hpp: the top-k router of an MoE layer and its backward pass.
//
//   logits = x Wr + br,  p = softmax(logits) (in the accumulation type, float32
//   for float and bf16 storage), idx = top-k of p per token (ties: lower expert
//   first), gate g = p[idx] (optionally renormalised over the k).
//   L_aux = a * E * sum_e f_e P_e   (Switch/GShard; f_e = share of assignments
//           to e, no gradient; P_e = mean_t p[t, e])
//   L_z   = b * mean_t logsumexp(logits_t)^2   (router z-loss)
// Backward turns dL/dg (from the experts) and both losses into dlogits, then
// into dWr, dbr and the router's share of dx. Every reduction is written by one
// thread in a fixed order (deterministic).
#pragma once

#include "BFloat16.hpp"
#include "Compat.hpp"
#include "Parameter.hpp"

#include <Kokkos_Core.hpp>

namespace hexamoe {

struct RouterOptions {
  int top_k = 1;
  bool renormalize = false;
  double aux_loss_weight = 0.0;
  double z_loss_weight = 0.0;
};

template <class T, class ExecutionSpace>
class Router {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using Acc = accumulator_t<T>;

  Router() = default;
  Router(int dim, int experts, RouterOptions opt) : dim_(dim), experts_(experts), opt_(opt) {
    weight = Matrix<Acc, memory_space>("hexamoe::router.weight", dim, experts);
    bias = Kokkos::View<Acc *, memory_space>("hexamoe::router.bias", experts);
    weight_grad = Matrix<Acc, memory_space>("hexamoe::router.weight_grad", dim, experts);
    bias_grad = Kokkos::View<Acc *, memory_space>("hexamoe::router.bias_grad", experts);
    losses_ = Kokkos::View<Acc *, memory_space>("hexamoe::router.losses", 2);
    stats_ = Matrix<Acc, memory_space>("hexamoe::router.stats", 2, experts);
  }

  int dim() const { return dim_; }
  int experts() const { return experts_; }
  RouterOptions const &options() const { return opt_; }

  Matrix<Acc, memory_space> weight;  // [d, E]
  Kokkos::View<Acc *, memory_space> bias;
  Matrix<Acc, memory_space> weight_grad;
  Kokkos::View<Acc *, memory_space> bias_grad;

  // Results of the last forward (valid until the next one).
  Matrix<Acc, memory_space> probs;             // [T, E]
  Kokkos::View<Acc *, memory_space> lse;        // [T] logsumexp of the logits
  Kokkos::View<int **, Kokkos::LayoutRight, memory_space> idx;  // [T, k]
  Kokkos::View<Acc *, memory_space> gate;       // [T*k], flat id t*k + j

  void forward(ExecutionSpace const &space, Matrix<T const, memory_space> x) {
    compat::ScopedRegion region("hexamoe::Router::forward");
    int const T_ = static_cast<int>(x.extent(0)), d = dim_, E = experts_, k = opt_.top_k;
    if (static_cast<int>(x.extent(1)) != d)
      throw std::invalid_argument("Router: x has " + std::to_string(x.extent(1)) + " columns, the router dimension is " +
                                  std::to_string(d));
    ensure(space, T_);
    auto W = weight;
    auto b = bias;
    auto P = probs;
    auto L = lse;
    auto I = idx;
    auto G = gate;
    bool const renorm = opt_.renormalize;
    Kokkos::parallel_for(
        "hexamoe::router_forward", Kokkos::RangePolicy<ExecutionSpace>(space, 0, T_), KOKKOS_LAMBDA(int t) {
          for (int e = 0; e < E; ++e) P(t, e) = b(e);
          for (int i = 0; i < d; ++i) {
            Acc const xi = to_acc<Acc>(x(t, i));
            for (int e = 0; e < E; ++e) P(t, e) += xi * W(i, e);
          }
          Acc mx = P(t, 0);
          for (int e = 1; e < E; ++e) mx = P(t, e) > mx ? P(t, e) : mx;
          Acc sum = 0;
          for (int e = 0; e < E; ++e) {
            Acc const v = compat::exp(P(t, e) - mx);
            P(t, e) = v;
            sum += v;
          }
          L(t) = mx + compat::log(sum);
          for (int e = 0; e < E; ++e) P(t, e) /= sum;
          // Top-k by repeated selection: largest first, ties to the lower expert.
          Acc z = 0;
          for (int j = 0; j < k; ++j) {
            int best = -1;
            for (int e = 0; e < E; ++e) {
              bool taken = false;
              for (int m = 0; m < j; ++m) taken = taken || I(t, m) == e;
              if (!taken && (best < 0 || P(t, e) > P(t, best))) best = e;
            }
            I(t, j) = best;
            G(t * k + j) = P(t, best);
            z += P(t, best);
          }
          if (renorm)
            for (int j = 0; j < k; ++j) G(t * k + j) /= z;
        });
    // Per-expert statistics for the auxiliary loss: f_e and P_e.
    auto st = stats_;
    auto ls = losses_;
    Acc const aw = static_cast<Acc>(opt_.aux_loss_weight), zw = static_cast<Acc>(opt_.z_loss_weight);
    Kokkos::parallel_for(
        "hexamoe::router_stats", Kokkos::RangePolicy<ExecutionSpace>(space, 0, E), KOKKOS_LAMBDA(int e) {
          Acc pe = 0;
          int cnt = 0;
          for (int t = 0; t < T_; ++t) {
            pe += P(t, e);
            for (int j = 0; j < k; ++j) cnt += I(t, j) == e ? 1 : 0;
          }
          st(0, e) = T_ > 0 ? Acc(cnt) / Acc(T_ * k) : Acc(0);  // f_e
          st(1, e) = T_ > 0 ? pe / Acc(T_) : Acc(0);            // P_e
        });
    Kokkos::parallel_for(
        "hexamoe::router_losses", Kokkos::RangePolicy<ExecutionSpace>(space, 0, 1), KOKKOS_LAMBDA(int) {
          Acc aux = 0, zl = 0;
          for (int e = 0; e < E; ++e) aux += st(0, e) * st(1, e);
          for (int t = 0; t < T_; ++t) zl += L(t) * L(t);
          ls(0) = aw * Acc(E) * aux;
          ls(1) = T_ > 0 ? zw * zl / Acc(T_) : Acc(0);
        });
  }

  // Auxiliary balance loss and z-loss of the last forward (reads back two numbers).
  std::pair<double, double> losses() const {
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), losses_);
    return {static_cast<double>(h(0)), static_cast<double>(h(1))};
  }

  // dgate: dL/dg per flat id [T*k]. Writes weight_grad, bias_grad (overwritten)
  // and adds the router's part of dL/dx into dx.
  void backward(ExecutionSpace const &space, Matrix<T const, memory_space> x, Kokkos::View<Acc const *, memory_space> dgate,
                Matrix<T, memory_space> dx) {
    compat::ScopedRegion region("hexamoe::Router::backward");
    int const T_ = static_cast<int>(x.extent(0)), d = dim_, E = experts_, k = opt_.top_k;
    auto P = probs;
    auto L = lse;
    auto I = idx;
    auto G = gate;
    auto st = stats_;
    auto dl = dlogits_;
    bool const renorm = opt_.renormalize;
    Acc const aw = static_cast<Acc>(opt_.aux_loss_weight), zw = static_cast<Acc>(opt_.z_loss_weight);
    Kokkos::parallel_for(
        "hexamoe::router_dlogits", Kokkos::RangePolicy<ExecutionSpace>(space, 0, T_), KOKKOS_LAMBDA(int t) {
          // dL/dp: the auxiliary loss, then the gates.
          for (int e = 0; e < E; ++e) dl(t, e) = aw * Acc(E) * st(0, e) / Acc(T_);
          if (renorm) {
            // g_j = p_j / Z: dp_m = dg_m / Z - sum_j dg_j g_j / Z
            Acc z = 0, s = 0;
            for (int j = 0; j < k; ++j) z += P(t, I(t, j));
            for (int j = 0; j < k; ++j) s += dgate(t * k + j) * G(t * k + j);
            for (int j = 0; j < k; ++j) dl(t, I(t, j)) += (dgate(t * k + j) - s) / z;
          } else {
            for (int j = 0; j < k; ++j) dl(t, I(t, j)) += dgate(t * k + j);
          }
          // Softmax backward, plus the z-loss: d(lse^2)/dlogit_e = 2 lse p_e.
          Acc dot = 0;
          for (int e = 0; e < E; ++e) dot += P(t, e) * dl(t, e);
          for (int e = 0; e < E; ++e)
            dl(t, e) = P(t, e) * (dl(t, e) - dot) + zw * Acc(2) * L(t) * P(t, e) / Acc(T_);
        });
    auto Wg = weight_grad;
    auto bg = bias_grad;
    Kokkos::parallel_for(
        "hexamoe::router_dweight", Kokkos::RangePolicy<ExecutionSpace>(space, 0, (d + 1) * E), KOKKOS_LAMBDA(int i) {
          int const r = i / E, e = i % E;
          Acc s = 0;
          if (r < d) {
            for (int t = 0; t < T_; ++t) s += to_acc<Acc>(x(t, r)) * dl(t, e);
            Wg(r, e) = s;
          } else {
            for (int t = 0; t < T_; ++t) s += dl(t, e);
            bg(e) = s;
          }
        });
    auto W = weight;
    Kokkos::parallel_for(
        "hexamoe::router_dx", Kokkos::RangePolicy<ExecutionSpace>(space, 0, T_ * d), KOKKOS_LAMBDA(int i) {
          int const t = i / d, c = i % d;
          Acc s = to_acc<Acc>(dx(t, c));
          for (int e = 0; e < E; ++e) s += dl(t, e) * W(c, e);
          dx(t, c) = from_acc<T>(s);
        });
  }

 private:
  void ensure(ExecutionSpace const &space, int T_) {
    if (static_cast<int>(probs.extent(0)) == T_) return;
    int const E = experts_, k = opt_.top_k;
    probs = Matrix<Acc, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.probs"), T_, E);
    dlogits_ = Matrix<Acc, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.dlogits"), T_, E);
    lse = Kokkos::View<Acc *, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.lse"), T_);
    idx = Kokkos::View<int **, Kokkos::LayoutRight, memory_space>(
        Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.idx"), T_, k);
    gate = Kokkos::View<Acc *, memory_space>(Kokkos::view_alloc(space, Kokkos::WithoutInitializing, "hexamoe::router.gate"), T_ * k);
  }

  int dim_ = 0, experts_ = 0;
  RouterOptions opt_;
  Matrix<Acc, memory_space> dlogits_;
  Kokkos::View<Acc *, memory_space> losses_;  // [aux, z]
  Matrix<Acc, memory_space> stats_;          // [f_e; P_e]
};

}  // namespace hexamoe
