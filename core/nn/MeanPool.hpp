// MeanPool.hpp: the mean over the tokens of each image, [B*L, D] -> [B, D]
// (token rows b*L .. b*L+L-1 belong to image b), and its backward
// dx[b*L + l] = dy[b] / L. No parameters; L follows from the extents.
#pragma once

#include "core/nn/Module.hpp"

namespace hexamoe {
namespace nn {

template <class ExecutionSpace, class Scalar = float>
class MeanPool {
 public:
  using execution_space = ExecutionSpace;
  using memory_space = typename ExecutionSpace::memory_space;
  using matrix = Matrix<Scalar, memory_space>;
  using const_matrix = Matrix<Scalar const, memory_space>;

  MeanPool() = default;
  explicit MeanPool(ExecutionSpace const &) {}

  void init(std::uint64_t) {}
  std::vector<Parameter<memory_space>> parameters(std::string const &) const { return {}; }

  // x [B*L, D] -> y [B, D]; saves B and L.
  void forward(ExecutionSpace const &space, const_matrix x, matrix y) {
    compat::ScopedRegion region("hexamoe::nn::MeanPool::forward");
    std::size_t const B = y.extent(0), D = x.extent(1);
    detail::require(B > 0 && x.extent(0) % B == 0 && x.extent(0) > 0, "MeanPool::forward",
                    "x has " + std::to_string(x.extent(0)) + " rows, not a positive multiple of the " +
                        std::to_string(B) + " images of y");
    detail::require_extents(y, {B, D}, "MeanPool::forward", "y");
    batch_ = static_cast<int>(B);
    tokens_ = static_cast<int>(x.extent(0) / B);
    int const L = tokens_;
    Scalar const inv = Scalar(1) / Scalar(L);
    // Each output summed over its image's tokens in order.
    for_each_element(space, "hexamoe::nn::MeanPool::forward", int(B), int(D), KOKKOS_LAMBDA(int b, int c) {
      Scalar s = 0;
      for (int l = 0; l < L; ++l) s += x(b * L + l, c);
      y(b, c) = s * inv;
    });
  }

  // dy [B, D] -> dx [B*L, D].
  void backward(ExecutionSpace const &space, const_matrix dy, matrix dx) const {
    compat::ScopedRegion region("hexamoe::nn::MeanPool::backward");
    detail::require(tokens_ > 0, "MeanPool::backward", "called before forward");
    std::size_t const D = dy.extent(1);
    detail::require_extents(dy, {std::size_t(batch_), D}, "MeanPool::backward", "dy");
    detail::require_extents(dx, {std::size_t(batch_) * tokens_, D}, "MeanPool::backward", "dx");
    int const L = tokens_;
    Scalar const inv = Scalar(1) / Scalar(L);
    for_each_element(space, "hexamoe::nn::MeanPool::backward", batch_ * L, int(D),
                     KOKKOS_LAMBDA(int r, int c) { dx(r, c) = dy(r / L, c) * inv; });
  }

  int tokens_per_image() const { return tokens_; }

 private:
  int batch_ = 0, tokens_ = 0;
};

}  // namespace nn
}  // namespace hexamoe
