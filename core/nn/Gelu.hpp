// Gelu.hpp: the exact (erf) GELU, elementwise over a [N, D] matrix, with its
// backward dx = dy * gelu'(x). No parameters. float32 on host backends uses
// the vectorisable erf/exp of HostMath.hpp (within 3e-7 of the exact values).
//
// forward saves a view of x (not a copy): x must stay unchanged until backward.
// y may alias x only when backward is never called (x would be overwritten);
// dx may alias dy.
#pragma once

#include "core/nn/HostMath.hpp"
#include "core/nn/Module.hpp"

namespace hexamoe {
namespace nn {

template <class ExecutionSpace, class Scalar = float>
class Gelu {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<Scalar, memory_space>;
  using const_matrix = Matrix<Scalar const, memory_space>;

  Gelu() = default;
  explicit Gelu(ExecutionSpace const &) {}

  void init(std::uint64_t) {}
  std::vector<Parameter<memory_space>> parameters(std::string const &) const { return {}; }

  void forward(ExecutionSpace const &space, const_matrix x, matrix y) {
    compat::ScopedRegion region("hexamoe::nn::Gelu::forward");
    detail::require_extents(y, {x.extent(0), x.extent(1)}, "Gelu::forward", "y");
    x_ = x;
    forwarded_ = true;
    apply(space, x, y);
  }

  static void apply(ExecutionSpace const &space, const_matrix x, matrix y) {
    detail::require_extents(y, {x.extent(0), x.extent(1)}, "Gelu::apply", "y");
    for_each_element(space, "hexamoe::nn::Gelu::forward", int(x.extent(0)), int(x.extent(1)),
                     KOKKOS_LAMBDA(int r, int c) { y(r, c) = gelu<detail::on_host<ExecutionSpace>>(x(r, c)); });
  }

  void backward(ExecutionSpace const &space, const_matrix dy, matrix dx) const {
    compat::ScopedRegion region("hexamoe::nn::Gelu::backward");
    detail::require(forwarded_, "Gelu::backward", "called before forward");
    detail::require_extents(dy, {x_.extent(0), x_.extent(1)}, "Gelu::backward", "dy");
    detail::require_extents(dx, {x_.extent(0), x_.extent(1)}, "Gelu::backward", "dx");
    const_matrix x = x_;
    for_each_element(
        space, "hexamoe::nn::Gelu::backward", int(x.extent(0)), int(x.extent(1)),
        KOKKOS_LAMBDA(int r, int c) { dx(r, c) = dy(r, c) * gelu_grad<detail::on_host<ExecutionSpace>>(x(r, c)); });
  }

 private:
  const_matrix x_;
  bool forwarded_ = false;
};

}  // namespace nn
}  // namespace hexamoe
