// Mlp.hpp: the dense feed-forward block of the non-MoE transformer blocks,
//   y = fc2(gelu(fc1(x))),  fc1: D -> hidden, fc2: hidden -> D,
// as timm's Mlp (parameter names fc1.*, fc2.*).
//
// forward saves a view of x and the pre- and post-activation [N, hidden]
// (module-owned buffers); backward overwrites the gradients of fc1 and fc2
// and writes dx.
#pragma once

#include "core/nn/Gelu.hpp"
#include "core/nn/Linear.hpp"

namespace hexamoe {
namespace nn {

template <class ExecutionSpace, class Scalar = float>
class Mlp {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<Scalar, memory_space>;
  using const_matrix = Matrix<Scalar const, memory_space>;

  Linear<ExecutionSpace, Scalar> fc1, fc2;
  Gelu<ExecutionSpace, Scalar> act;

  Mlp() = default;
  Mlp(ExecutionSpace const &space, int dim, int hidden)
      : fc1(space, dim, hidden), fc2(space, hidden, dim), act(space), dim_(dim), hidden_(hidden) {}

  int dim() const { return dim_; }
  int hidden() const { return hidden_; }

  void init(std::uint64_t seed) {
    fc1.init(detail::derive_seed(seed, 0));
    fc2.init(detail::derive_seed(seed, 1));
  }

  std::vector<Parameter<memory_space>> parameters(std::string const &prefix) const {
    auto p = fc1.parameters(prefix + ".fc1");
    auto q = fc2.parameters(prefix + ".fc2");
    p.insert(p.end(), q.begin(), q.end());
    return p;
  }

  // x [N, D] -> y [N, D]. Saves x, z = fc1(x) and h = gelu(z).
  void forward(ExecutionSpace const &space, const_matrix x, matrix y) {
    compat::ScopedRegion region("hexamoe::nn::Mlp::forward");
    std::size_t const n = x.extent(0);
    detail::require_extents(x, {n, std::size_t(dim_)}, "Mlp::forward", "x");
    detail::require_extents(y, {n, std::size_t(dim_)}, "Mlp::forward", "y");
    detail::ensure(space, z_, "hexamoe::nn::Mlp::pre_activation", n, std::size_t(hidden_));
    detail::ensure(space, h_, "hexamoe::nn::Mlp::activation", n, std::size_t(hidden_));
    fc1.forward(space, x, z_);
    act.forward(space, z_, h_);
    fc2.forward(space, h_, y);
    forwarded_ = true;
  }

  // dy [N, D] -> fc1/fc2 gradients (overwritten), dx [N, D] (skipped when empty).
  void backward(ExecutionSpace const &space, const_matrix dy, matrix dx) {
    compat::ScopedRegion region("hexamoe::nn::Mlp::backward");
    detail::require(forwarded_, "Mlp::backward", "called before forward");
    std::size_t const n = z_.extent(0);
    detail::require_extents(dy, {n, std::size_t(dim_)}, "Mlp::backward", "dy");
    detail::ensure(space, dh_, "hexamoe::nn::Mlp::dactivation", n, std::size_t(hidden_));
    fc2.backward(space, dy, dh_);
    act.backward(space, dh_, dh_);  // in place: dz = dh * gelu'(z)
    fc1.backward(space, dh_, dx);
  }

 private:
  int dim_ = 0, hidden_ = 0;
  matrix z_, h_, dh_;
  bool forwarded_ = false;
};

}  // namespace nn
}  // namespace hexamoe
